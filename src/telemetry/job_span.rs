//! A bulk job's traces: the `POST /jobs` request's span context, kept in the job, and one
//! root span per item the runner asks for (`job.item`), linked to that request.
//!
//! An item is looked up long after its job was submitted (an hour later for a large job), on
//! no request's task, so it cannot be a child of the submission's trace: it is a trace of its
//! own, as a background refresh is (`cache.refresh`), sampled by the root sampler, with a
//! span link to the submission. Its `pacing.permit` and upstream call spans are its children
//! (the span is the flight's origin). It carries the job id (128 random bits, not personal),
//! the item's index, the client's keyed-hash tag and how the item ended; never a CPF or a
//! client id.

use opentelemetry::trace::{SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState};
use serde::{Deserialize, Serialize};
use tracing::{Span, field};
use tracing_opentelemetry::OpenTelemetrySpanExt;

use super::trace::{FlightOrigin, TraceIds, fresh_ids, sampled_root};
use crate::lookup::validation::ClientId;

/// The span context of the request that submitted a job, as the job record keeps it (hex,
/// as in a `traceparent`), so that a job resumed after a restart keeps its link.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct SubmissionLink {
    #[serde(with = "hex16")]
    pub(crate) trace_id: [u8; 16],
    #[serde(with = "hex8")]
    pub(crate) span_id: [u8; 8],
    pub(crate) sampled: bool,
}

impl SubmissionLink {
    /// The current span's context (the `POST /jobs` request's, in its handler), if that
    /// request is traced; an untraced request made no span to link to.
    pub(crate) fn current() -> Option<SubmissionLink> {
        let cx = Span::current().context();
        let span = cx.span();
        let sc = span.span_context();
        sc.is_valid().then(|| SubmissionLink {
            trace_id: sc.trace_id().to_bytes(),
            span_id: sc.span_id().to_bytes(),
            sampled: sc.is_sampled(),
        })
    }

    fn span_context(&self) -> SpanContext {
        let flags = if self.sampled {
            TraceFlags::SAMPLED
        } else {
            TraceFlags::default()
        };
        SpanContext::new(
            TraceId::from_bytes(self.trace_id),
            SpanId::from_bytes(self.span_id),
            flags,
            true,
            TraceState::default(),
        )
    }
}

/// What a job item's span says about it.
pub(crate) struct JobItemInfo<'a> {
    pub(crate) job_id: &'a str,
    pub(crate) index: usize,
    pub(crate) client: &'a ClientId,
    pub(crate) link: Option<SubmissionLink>,
}

/// A job item's span (`job.item`, a root span linked to the job's submission) if the sampler
/// samples a new trace, with its ids; otherwise no span, and ids for the upstream's
/// `traceparent` only.
pub(crate) fn job_item_span(info: &JobItemInfo<'_>) -> (Span, TraceIds) {
    let sampled = sampled_root("job.item", || {
        let span = tracing::info_span!(
            parent: None,
            "job.item",
            otel.kind = "internal",
            otel.status_code = field::Empty,
            score_proxy.job.id = info.job_id,
            score_proxy.job.item.index = info.index as u64,
            score_proxy.client = super::redact::client(info.client),
            score_proxy.job.item.outcome = field::Empty,
        );
        if let Some(link) = &info.link {
            span.add_link(link.span_context());
        }
        span
    });
    sampled.unwrap_or_else(|| (Span::none(), fresh_ids()))
}

/// How a job item ended, on its span: `from_cache`, `fetched`, `coalesced` (it joined a
/// lookup of the same key), `cancelled`, or the error's kind.
pub(crate) fn record_job_item(span: &Span, outcome: &'static str, failed: bool) {
    span.record("score_proxy.job.item.outcome", outcome);
    if failed {
        span.record("otel.status_code", "ERROR");
    }
}

/// Links a job item that joined another lookup to that lookup's upstream call.
pub(crate) fn link_item_to_call(span: &Span, call: &FlightOrigin) {
    super::trace::link_to_call(span, call);
}

/// Fixed-size byte arrays as lower-case hex strings.
macro_rules! hex_array {
    ($name:ident, $n:literal) => {
        mod $name {
            use serde::{Deserialize, Deserializer, Serializer, de::Error};

            pub(super) fn serialize<S: Serializer>(
                bytes: &[u8; $n],
                s: S,
            ) -> Result<S::Ok, S::Error> {
                let mut out = String::with_capacity(2 * $n);
                for b in bytes {
                    out.push(char::from(
                        crate::telemetry::redact::HEX[usize::from(b >> 4)],
                    ));
                    out.push(char::from(
                        crate::telemetry::redact::HEX[usize::from(b & 0xf)],
                    ));
                }
                s.serialize_str(&out)
            }

            pub(super) fn deserialize<'de, D: Deserializer<'de>>(
                d: D,
            ) -> Result<[u8; $n], D::Error> {
                let text = String::deserialize(d)?;
                let mut out = [0u8; $n];
                if text.len() != 2 * $n || !text.is_ascii() {
                    return Err(D::Error::custom("a hex id of the wrong length"));
                }
                for (i, byte) in out.iter_mut().enumerate() {
                    *byte = u8::from_str_radix(&text[2 * i..2 * i + 2], 16)
                        .map_err(D::Error::custom)?;
                }
                Ok(out)
            }
        }
    };
}

hex_array!(hex16, 16);
hex_array!(hex8, 8);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_link_round_trips_through_the_job_record() {
        let link = SubmissionLink {
            trace_id: [0xab; 16],
            span_id: [0x01; 8],
            sampled: true,
        };
        let json = serde_json::to_string(&link).unwrap();
        assert_eq!(
            json,
            r#"{"trace_id":"abababababababababababababababab","span_id":"0101010101010101","sampled":true}"#
        );
        assert_eq!(serde_json::from_str::<SubmissionLink>(&json).unwrap(), link);
        assert!(
            serde_json::from_str::<SubmissionLink>(
                r#"{"trace_id":"ab","span_id":"01","sampled":true}"#
            )
            .is_err()
        );
    }
}
