//! Which requests are traced: the sampler settings, and the OpenTelemetry layer's filter
//! that keeps the spans of untraced requests from existing at all (see [`super::trace`] for
//! the decision at the request head).

use opentelemetry_sdk::trace::Sampler;
use tracing::subscriber::Interest;
use tracing::{Metadata, Subscriber};
use tracing_subscriber::filter::Targets;
use tracing_subscriber::layer::{Context as LayerContext, Filter};
use tracing_subscriber::registry::LookupSpan;

/// Which requests are traced: `OTEL_TRACES_SAMPLER` and `OTEL_TRACES_SAMPLER_ARG`.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub enum TraceSampler {
    AlwaysOn,
    AlwaysOff,
    /// A fraction of traces, chosen by trace id (so every service picks the same ones).
    TraceIdRatio(f64),
    /// The caller's sampled flag when it sent a `traceparent`; otherwise always.
    #[default]
    ParentBasedAlwaysOn,
    ParentBasedAlwaysOff,
    ParentBasedTraceIdRatio(f64),
}

impl TraceSampler {
    /// The sampler the two variables name; the ratio defaults to 1 as the specification
    /// says. An unknown sampler or a ratio outside `[0, 1]` is a configuration error.
    pub fn from_env(sampler: Option<&str>, arg: Option<&str>) -> Result<TraceSampler, String> {
        let ratio = || match arg.map(str::trim) {
            None => Ok(1.0),
            Some(raw) => raw
                .parse::<f64>()
                .ok()
                .filter(|r| (0.0..=1.0).contains(r))
                .ok_or_else(|| {
                    format!("OTEL_TRACES_SAMPLER_ARG: '{raw}' is not a ratio between 0 and 1")
                }),
        };
        Ok(match sampler.map(str::trim) {
            None | Some("parentbased_always_on") => TraceSampler::ParentBasedAlwaysOn,
            Some("always_on") => TraceSampler::AlwaysOn,
            Some("always_off") => TraceSampler::AlwaysOff,
            Some("traceidratio") => TraceSampler::TraceIdRatio(ratio()?),
            Some("parentbased_always_off") => TraceSampler::ParentBasedAlwaysOff,
            Some("parentbased_traceidratio") => TraceSampler::ParentBasedTraceIdRatio(ratio()?),
            Some(other) => {
                return Err(format!(
                    "OTEL_TRACES_SAMPLER: '{other}' is not supported (use always_on, always_off, \
                     traceidratio, parentbased_always_on, parentbased_always_off or \
                     parentbased_traceidratio)"
                ));
            }
        })
    }

    /// The SDK's sampler of the same name, so decisions are exactly the standard ones.
    pub(super) fn sdk(self) -> Sampler {
        let parent_based = |root| Sampler::ParentBased(Box::new(root));
        match self {
            TraceSampler::AlwaysOn => Sampler::AlwaysOn,
            TraceSampler::AlwaysOff => Sampler::AlwaysOff,
            TraceSampler::TraceIdRatio(r) => Sampler::TraceIdRatioBased(r),
            TraceSampler::ParentBasedAlwaysOn => parent_based(Sampler::AlwaysOn),
            TraceSampler::ParentBasedAlwaysOff => parent_based(Sampler::AlwaysOff),
            TraceSampler::ParentBasedTraceIdRatio(r) => parent_based(Sampler::TraceIdRatioBased(r)),
        }
    }
}

/// Spans made with an explicit parent (or none: a background lookup's or a job item's root),
/// only ever for a traced request or a sampled background lookup or job item (they are
/// created on other tasks, where that request's span is not the current one).
const DETACHED: [&str; 5] = [
    "http.server",
    "http.client",
    "pacing.permit",
    "cache.refresh",
    "job.item",
];

/// The OpenTelemetry layer's filter: this crate's spans and `info` events, and of those only
/// the ones inside a traced request. A span made where no traced span is current (a Redis
/// operation of an untraced lookup, say) would otherwise start a trace of its own.
pub(super) struct OtelFilter(pub(super) Targets);

impl OtelFilter {
    fn detached(meta: &Metadata<'_>) -> bool {
        meta.is_span() && DETACHED.contains(&meta.name())
    }
}

impl<S> Filter<S> for OtelFilter
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn enabled(&self, meta: &Metadata<'_>, cx: &LayerContext<'_, S>) -> bool {
        self.0.would_enable(meta.target(), meta.level())
            && (Self::detached(meta) || cx.lookup_current().is_some())
    }

    fn callsite_enabled(&self, meta: &'static Metadata<'static>) -> Interest {
        if !self.0.would_enable(meta.target(), meta.level()) {
            Interest::never()
        } else if Self::detached(meta) {
            Interest::always()
        } else {
            Interest::sometimes()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samplers_from_env() {
        let parse = TraceSampler::from_env;
        assert_eq!(parse(None, None), Ok(TraceSampler::ParentBasedAlwaysOn));
        assert_eq!(
            parse(Some("parentbased_traceidratio"), Some("0.01")),
            Ok(TraceSampler::ParentBasedTraceIdRatio(0.01))
        );
        assert_eq!(
            parse(Some("traceidratio"), None),
            Ok(TraceSampler::TraceIdRatio(1.0)),
            "the ratio defaults to 1"
        );
        assert_eq!(parse(Some("always_off"), None), Ok(TraceSampler::AlwaysOff));
        assert!(parse(Some("traceidratio"), Some("1.5")).is_err());
        assert!(parse(Some("traceidratio"), Some("half")).is_err());
        assert!(parse(Some("xray"), None).is_err());
    }
}
