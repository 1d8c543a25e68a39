//! Traces: the sampling decision at the request head, and the spans of a traced request.
//!
//! Whether a request is traced is decided **once, at its head**, by the standard sampler
//! (`OTEL_TRACES_SAMPLER`, parent-based by default, so an incoming `traceparent`'s sampled
//! flag is honoured both ways). An untraced request makes no span at all: its server span is
//! [`RequestSpan::none`], its stage spans are not created, and the OpenTelemetry layer's filter
//! ([`super::sampling::OtelFilter`]) refuses any span that would be its child; no OpenTelemetry span data is
//! built and no attribute converted. It still has ids: the caller's trace id or a fresh one,
//! a span id of its own, sent upstream in a `traceparent` with the sampled flag clear and
//! returned to the caller.
//!
//! A traced request is one trace. A cache hit is one span (the server span) carrying the
//! durations of validation and of the cache lookup as attributes, handed to the SDK whole
//! when the request ends, without the `tracing` layer ([`super::request_span`]); any other
//! lookup gets the stage spans, made after the fact with the times measured (`validation`,
//! `cache.lookup`), then `queue.wait`, `pacing.permit`, the upstream client span and
//! `upstream.wait`, or `coalesce.wait` linked to the call it shared. Span attributes never
//! hold a CPF or a client id: only [`crate::telemetry::redact`] tags.

use std::cell::Cell;
use std::sync::OnceLock;
use std::time::SystemTime;

use http::{HeaderMap, HeaderValue};
use opentelemetry::Context;
use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::{SpanBuilder, SpanContext, SpanId, SpanKind, TraceContextExt, TraceId};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{
    IdGenerator, RandomIdGenerator, Sampler, SamplingDecision, SdkTracer, ShouldSample,
};
use tracing::{Span, field};
use tracing_opentelemetry::OpenTelemetrySpanExt;

use super::sampling::TraceSampler;
use crate::http::route::Route;
use crate::lookup::upstream::UpstreamOutcome;

/// What the request head needs when spans are exported: the sampler, and the tracer that
/// makes the stage spans of a lookup after the fact.
struct Head {
    sampler: Sampler,
    tracer: SdkTracer,
}

/// Set once, when the exporter is set up; unset means no span is ever made.
static HEAD: OnceLock<Head> = OnceLock::new();

pub(super) fn install(sampler: TraceSampler, tracer: SdkTracer) {
    let _ = HEAD.set(Head {
        sampler: sampler.sdk(),
        tracer,
    });
}

/// Whether spans are exported at all.
fn tracing_on() -> bool {
    HEAD.get().is_some()
}

/// A root span (`make`) for work no request started, with its ids, if `name` is sampled.
pub(crate) fn sampled_root(name: &str, make: impl FnOnce() -> Span) -> Option<(Span, TraceIds)> {
    let head = HEAD.get()?;
    let trace_id = RandomIdGenerator::default().new_trace_id();
    let kind = SpanKind::Internal;
    let decision = head
        .sampler
        .should_sample(None, trace_id, name, &kind, &[], &[]);
    (decision.decision == SamplingDecision::RecordAndSample).then_some(())?;
    let span = make();
    NEXT_TRACE_ID.set(Some(trace_id));
    let sc = span.context().span().span_context().clone();
    NEXT_TRACE_ID.set(None);
    let (trace_id, span_id, sampled) = (sc.trace_id(), sc.span_id(), sc.is_sampled());
    sc.is_valid().then_some((
        span,
        TraceIds {
            trace_id,
            span_id,
            sampled,
        },
    ))
}

/// The tracer of the stage spans made after the fact and of direct server spans
/// ([`super::request_span`]); `None` when spans are not exported.
pub(super) fn tracer() -> Option<&'static SdkTracer> {
    HEAD.get().map(|head| &head.tracer)
}

thread_local! {
    /// The trace id the head chose for a new trace, for the SDK to use when it starts the
    /// server span on this same thread (a moment later, in [`server_span`]).
    static NEXT_TRACE_ID: Cell<Option<TraceId>> = const { Cell::new(None) };
    /// The span id the head chose for a server span, for the SDK to use when that span is
    /// started on this same thread (a direct span, exported or promoted).
    static NEXT_SPAN_ID: Cell<Option<SpanId>> = const { Cell::new(None) };
    /// The start time of a promoted server span (the head's, not the promotion's).
    static NEXT_START: Cell<Option<SystemTime>> = const { Cell::new(None) };
}

/// Runs `start` (which starts one span through the SDK) with the span's ids chosen: the
/// trace id is used only if the span has no parent.
pub(super) fn with_head_ids<R>(trace_id: TraceId, span_id: SpanId, start: impl FnOnce() -> R) -> R {
    NEXT_TRACE_ID.set(Some(trace_id));
    NEXT_SPAN_ID.set(Some(span_id));
    let started = start();
    NEXT_TRACE_ID.set(None);
    NEXT_SPAN_ID.set(None);
    started
}

/// Starts `span` (a server span made through `tracing`, not yet started) with the ids and
/// the start time a direct span had: its promotion keeps everything the head decided.
pub(super) fn start_as(
    span: &Span,
    parent: Option<Context>,
    trace_id: TraceId,
    span_id: SpanId,
    start: SystemTime,
) {
    if let Some(cx) = parent {
        let _ = span.set_parent(cx);
    }
    NEXT_START.set(Some(start));
    let started = with_head_ids(trace_id, span_id, || span.context());
    NEXT_START.set(None);
    debug_assert!(
        !started.span().span_context().is_valid()
            || started.span().span_context().span_id() == span_id
    );
}

/// The provider's id generator: random ids, except those the head has already drawn (a new
/// trace's id, on which the sampling decision depends, and a direct server span's id).
#[derive(Debug)]
pub(super) struct HeadIds;

impl IdGenerator for HeadIds {
    fn new_trace_id(&self) -> TraceId {
        NEXT_TRACE_ID
            .take()
            .unwrap_or_else(|| RandomIdGenerator::default().new_trace_id())
    }

    fn new_span_id(&self) -> SpanId {
        NEXT_SPAN_ID
            .take()
            .unwrap_or_else(|| RandomIdGenerator::default().new_span_id())
    }
}

/// The OpenTelemetry layer's tracer: the SDK's, except that a promoted server span starts
/// when its request did ([`start_as`]), not when it was promoted.
#[derive(Clone, Debug)]
pub(super) struct HeadTracer(pub(super) SdkTracer);

impl opentelemetry::trace::Tracer for HeadTracer {
    type Span = opentelemetry_sdk::trace::Span;

    fn build_with_context(&self, mut builder: SpanBuilder, parent_cx: &Context) -> Self::Span {
        if let Some(start) = NEXT_START.take() {
            builder.start_time = Some(start);
        }
        self.0.build_with_context(builder, parent_cx)
    }
}

/// The W3C trace context of a request, as the response headers and the access log show it.
#[derive(Clone, Copy, Debug)]
pub(crate) struct TraceIds {
    pub(crate) trace_id: TraceId,
    pub(crate) span_id: SpanId,
    /// The W3C sampled flag: the head's decision when spans are exported, otherwise the
    /// caller's flag, passed on.
    pub(crate) sampled: bool,
}

impl TraceIds {
    /// Whether this request's spans exist (are made and exported).
    pub(crate) fn traced(&self) -> bool {
        self.sampled && tracing_on()
    }

    /// `00-<trace id>-<span id>-<flags>`.
    pub(crate) fn traceparent(&self) -> String {
        String::from_utf8_lossy(&self.traceparent_bytes()).into_owned()
    }

    /// The `traceparent` value, hex-encoded on the stack (this runs on every response).
    pub(crate) fn traceparent_bytes(&self) -> [u8; 55] {
        let mut out = [b'-'; 55];
        out[..2].copy_from_slice(b"00");
        hex_into(&mut out[3..35], &self.trace_id.to_bytes());
        hex_into(&mut out[36..52], &self.span_id.to_bytes());
        hex_into(&mut out[53..55], &[u8::from(self.sampled)]);
        out
    }

    /// The trace id alone, 32 hex digits (the `x-trace-id` header and log field).
    pub(crate) fn trace_id_bytes(&self) -> [u8; 32] {
        let mut out = [0u8; 32];
        hex_into(&mut out, &self.trace_id.to_bytes());
        out
    }

    /// The trace id for the access log: displayed without the general formatting machinery
    /// (`TraceId`'s own `Display` pads through `{:032x}`).
    pub(crate) fn trace_id_hex(&self) -> TraceHex {
        TraceHex(self.trace_id_bytes())
    }
}

/// 32 hex digits, ready to be written.
pub(crate) struct TraceHex([u8; 32]);

impl std::fmt::Display for TraceHex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(std::str::from_utf8(&self.0).map_err(|_| std::fmt::Error)?)
    }
}

fn hex_into(out: &mut [u8], bytes: &[u8]) {
    for (pair, b) in out.chunks_exact_mut(2).zip(bytes) {
        pair[0] = crate::telemetry::redact::HEX[usize::from(b >> 4)];
        pair[1] = crate::telemetry::redact::HEX[usize::from(b & 0xf)];
    }
}

struct HeaderExtractor<'a>(&'a HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }
    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}

struct OneHeader(Option<String>);

impl Injector for OneHeader {
    fn set(&mut self, key: &str, value: String) {
        if key == "traceparent" {
            self.0 = Some(value);
        }
    }
}

fn propagator() -> &'static TraceContextPropagator {
    static P: OnceLock<TraceContextPropagator> = OnceLock::new();
    P.get_or_init(TraceContextPropagator::new)
}

/// The caller's trace context, if it sent a valid `traceparent`.
fn remote_parent(headers: &HeaderMap) -> Option<Context> {
    if !headers.contains_key("traceparent") {
        return None;
    }
    let cx = propagator().extract(&HeaderExtractor(headers));
    cx.span().span_context().is_valid().then_some(cx)
}

/// What the head of a request decided (`request_span::server_span` makes the span of it).
pub(super) enum Headed {
    /// Not traced: only the ids to put on the response.
    Untraced(TraceIds),
    /// A direct span, made when the request ends (the caller's context, the start time).
    Direct(TraceIds, Option<Context>, SystemTime),
    /// A `tracing` span, not yet entered.
    Span(Span, TraceIds),
}

/// The head of a request: decides whether it is traced, and how (see [`Headed`]). With
/// `direct`, a traced `GET /proxy/score` gets a direct span: the lookup's fast path passes
/// it, the router (whose handlers run inside the span) does not.
pub(super) fn decide_head(
    route: Route,
    method: &http::Method,
    path: &str,
    headers: &HeaderMap,
    direct: bool,
) -> Headed {
    let ids = RandomIdGenerator::default();
    let parent = remote_parent(headers);
    let (trace_id, caller_sampled) = match &parent {
        Some(cx) => {
            let sc = cx.span().span_context().clone();
            (sc.trace_id(), sc.is_sampled())
        }
        None => (ids.new_trace_id(), false),
    };
    let untraced = |sampled| {
        let ids = TraceIds {
            trace_id,
            span_id: ids.new_span_id(),
            sampled,
        };
        Headed::Untraced(ids)
    };
    let Some(head) = HEAD.get() else {
        // No exporter: continue the caller's trace (flag included) or start one, so that
        // logs and responses can still be correlated with the caller's own traces.
        return untraced(caller_sampled);
    };
    let decision = head.sampler.should_sample(
        parent.as_ref(),
        trace_id,
        "http.server",
        &SpanKind::Server,
        &[],
        &[],
    );
    if decision.decision != SamplingDecision::RecordAndSample {
        return untraced(false);
    }
    if direct && route == Route::Score && method == http::Method::GET {
        // Nothing made yet but the ids: the span is made when the request ends.
        let ids = TraceIds {
            trace_id,
            span_id: ids.new_span_id(),
            sampled: true,
        };
        return Headed::Direct(ids, parent, SystemTime::now());
    }

    // Plain strings, not `%` values: the OpenTelemetry layer formats a `%` value through
    // `fmt` into a growing `String`, and copies a `&str` once.
    let name: std::borrow::Cow<'static, str> =
        if route == Route::Score && method == http::Method::GET {
            "GET /proxy/score".into()
        } else {
            SpanName(method, route).to_string().into()
        };
    let span = server_tracing_span(&name, method.as_str(), route, redacted_path(route, path));
    // Before the span is first started: it continues the caller's trace, or starts the one
    // whose id was sampled. The SDK's own sampler is `always_on`: the decision is this one.
    match parent {
        Some(cx) => {
            let _ = span.set_parent(cx);
        }
        None => NEXT_TRACE_ID.set(Some(trace_id)),
    }
    let sc = span.context().span().span_context().clone();
    NEXT_TRACE_ID.set(None);
    if !sc.is_valid() {
        return untraced(false);
    }
    let ids = TraceIds {
        trace_id: sc.trace_id(),
        span_id: sc.span_id(),
        sampled: sc.is_sampled(),
    };
    Headed::Span(span, ids)
}

/// The `http.server` span made through `tracing`, not yet started: every field a server
/// span may record is declared here (a field not declared cannot be recorded later).
pub(super) fn server_tracing_span(name: &str, method: &str, route: Route, path: &str) -> Span {
    tracing::info_span!(
        "http.server",
        otel.name = name,
        otel.kind = "server",
        otel.status_code = field::Empty,
        http.request.method = method,
        http.route = route.as_str(),
        url.path = path,
        url.scheme = "http",
        http.response.status_code = field::Empty,
        error.type = field::Empty,
        score_proxy.outcome = field::Empty,
        score_proxy.cache = field::Empty,
        score_proxy.cpf = field::Empty,
        score_proxy.client = field::Empty,
        score_proxy.stale_after = field::Empty,
        score_proxy.validation.duration_ns = field::Empty,
        score_proxy.cache.lookup.duration_ns = field::Empty,
    )
}

/// The response on a `tracing` server span, all in one record. Each `Span::record` is a
/// trip through every layer and, once the OpenTelemetry span has started, a lock on it: on
/// a traced hit, five of them were a tenth of the request's CPU time.
pub(super) fn record_response_on(
    span: &Span,
    status: u16,
    outcome: &'static str,
    cache: Option<&'static str>,
) {
    let Some(fields) = span.metadata().map(|m| m.fields()) else {
        return;
    };
    let (Some(code), Some(out), Some(cached), Some(error), Some(otel_status)) = (
        fields.field("http.response.status_code"),
        fields.field("score_proxy.outcome"),
        fields.field("score_proxy.cache"),
        fields.field("error.type"),
        fields.field("otel.status_code"),
    ) else {
        return;
    };
    let failed = (500..600).contains(&status).then_some(outcome);
    let values = [
        (&code, Some(&status as &dyn field::Value)),
        (&out, Some(&outcome as &dyn field::Value)),
        (&cached, cache.as_ref().map(|c| c as &dyn field::Value)),
        (&error, failed.as_ref().map(|e| e as &dyn field::Value)),
        (&otel_status, failed.map(|_| &"ERROR" as &dyn field::Value)),
    ];
    span.record_all(&fields.value_set(&values));
}

/// `{method} {route}`, for the server span's name.
struct SpanName<'a>(&'a http::Method, Route);

impl std::fmt::Display for SpanName<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.0, self.1.as_str())
    }
}

/// Ids for a request that has none (a handler called outside `observe`).
pub(crate) fn fresh_ids() -> TraceIds {
    let ids = RandomIdGenerator::default();
    TraceIds {
        trace_id: ids.new_trace_id(),
        span_id: ids.new_span_id(),
        sampled: false,
    }
}

/// Only the path, and only a known route's: an unmatched path is whatever a client typed,
/// which may hold anything.
fn redacted_path(route: Route, path: &str) -> &str {
    if route == Route::Unmatched {
        "unmatched"
    } else {
        path
    }
}

/// A stage span of a traced request (`make` builds it); nothing for the others.
pub(crate) fn stage_span(trace: &TraceIds, make: impl FnOnce() -> Span) -> Span {
    if trace.traced() { make() } else { Span::none() }
}

/// What the leader of a flight leaves for the dispatcher: its request span (the upstream
/// call becomes its child) and, once the call starts, the call span's context (followers
/// link to it).
pub(crate) struct FlightOrigin {
    pub(crate) span: Span,
    pub(crate) trace: TraceIds,
    call: OnceLock<SpanContext>,
}

impl FlightOrigin {
    pub(crate) fn new(span: Span, trace: TraceIds) -> Self {
        FlightOrigin {
            span,
            trace,
            call: OnceLock::new(),
        }
    }

    /// Whether the leader's request is traced (its spans, and the call's, exist).
    pub(crate) fn traced(&self) -> bool {
        self.trace.traced()
    }

    /// The first upstream call's span context, once it started.
    pub(crate) fn call_context(&self) -> Option<&SpanContext> {
        self.call.get()
    }
}

/// The client span of one upstream attempt, a child of the leader's request span (none if
/// that request is not traced). `url` is the upstream's address without the query (which
/// holds the CPF).
pub(crate) fn upstream_span(origin: &FlightOrigin, attempt: u64, url: &url::Url) -> Span {
    if !origin.traced() {
        return Span::none();
    }
    let span = tracing::info_span!(
        parent: &origin.span,
        "http.client",
        otel.name = "GET",
        otel.kind = "client",
        otel.status_code = field::Empty,
        http.request.method = "GET",
        server.address = url.host_str().unwrap_or(""),
        server.port = url.port_or_known_default().unwrap_or(0),
        url.full = url.as_str(),
        http.response.status_code = field::Empty,
        error.type = field::Empty,
        http.request.resend_count = attempt.saturating_sub(1),
        score_proxy.upstream.outcome = field::Empty,
    );
    let sc = span.context().span().span_context().clone();
    if sc.is_valid() {
        let _ = origin.call.set(sc);
    }
    span
}

/// The `traceparent` to send upstream: the client span's own for a traced request,
/// otherwise the request's trace id and flag with a fresh span id.
pub(crate) fn traceparent_for(span: &Span, request: &TraceIds) -> Option<HeaderValue> {
    let value = if request.traced() {
        let mut out = OneHeader(None);
        propagator().inject_context(&span.context(), &mut out);
        out.0?
    } else {
        TraceIds {
            span_id: RandomIdGenerator::default().new_span_id(),
            ..*request
        }
        .traceparent()
    };
    HeaderValue::from_str(&value).ok()
}

pub(crate) fn record_upstream_result(span: &Span, status: Option<u16>, outcome: UpstreamOutcome) {
    if let Some(code) = status {
        span.record("http.response.status_code", code);
    }
    span.record("score_proxy.upstream.outcome", outcome.as_str());
    if outcome != UpstreamOutcome::Ok {
        span.record("error.type", outcome.as_str());
        span.record("otel.status_code", "ERROR");
    }
}

/// Links a follower's span to the upstream call it shared.
pub(crate) fn link_to_call(span: &Span, origin: &FlightOrigin) {
    if let Some(sc) = origin.call_context() {
        span.add_link(sc.clone());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::server_span;

    #[test]
    fn traceparent_format() {
        let ids = TraceIds {
            trace_id: TraceId::from_hex("4bf92f3577b34da6a3ce929d0e0e4736").unwrap(),
            span_id: SpanId::from_hex("00f067aa0ba902b7").unwrap(),
            sampled: true,
        };
        assert_eq!(
            ids.traceparent(),
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
        );
    }

    #[test]
    fn without_an_exporter_no_span_and_the_callers_flag_passes_on() {
        let mut headers = HeaderMap::new();
        headers.insert(
            "traceparent",
            HeaderValue::from_static("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
        );
        let (span, ids) = server_span(
            Route::Score,
            &http::Method::GET,
            "/proxy/score",
            &headers,
            true,
        );
        assert!(!span.is_traced());
        assert_eq!(
            ids.trace_id,
            TraceId::from_hex("4bf92f3577b34da6a3ce929d0e0e4736").unwrap()
        );
        assert!(ids.sampled && !ids.traced());
        assert_ne!(ids.span_id, SpanId::INVALID);
        let (span, ids) = server_span(
            Route::Score,
            &http::Method::GET,
            "/proxy/score",
            &HeaderMap::new(),
            true,
        );
        assert!(!span.is_traced());
        assert!(!ids.sampled);
        assert_ne!(ids.trace_id, TraceId::INVALID);
    }
}
