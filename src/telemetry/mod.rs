//! Logs and traces: the `tracing` subscriber, the OpenTelemetry exporter, and the spans of
//! each stage.
//!
//! Two layers sit on one `tracing` registry:
//! - the log layer (text or JSON lines, filtered by `RUST_LOG`) sees **events only**, so a
//!   span costs nothing when traces are off;
//! - the OpenTelemetry layer, present only when an OTLP endpoint is configured, turns this
//!   crate's spans into OTel spans and exports them in batches from a background thread (an
//!   unreachable collector delays nothing on the request path; spans are dropped instead).
//!
//! Every response carries the trace id: the OTel span's when tracing is on, otherwise the
//! caller's `traceparent` trace id continued, or a fresh one, so a log line and a response
//! always share an id. Span attributes never hold a CPF or a client id: only
//! [`crate::telemetry::redact`] tags.

pub(crate) mod metrics;
pub mod redact;

use std::sync::OnceLock;
use std::time::Duration;

use http::{HeaderMap, HeaderValue};
use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::{SpanContext, SpanId, TraceContextExt, TraceId};
use opentelemetry::{Context, KeyValue};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{IdGenerator, RandomIdGenerator, SdkTracerProvider};
use tracing::{Span, field};
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::filter::{EnvFilter, FilterExt, Targets, filter_fn};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{Layer, Registry};

use crate::http::route::Route;
use crate::lookup::upstream::UpstreamOutcome;

/// How log lines are written (`SCORE_PROXY_LOG_FORMAT`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

/// Where traces go, from the standard `OTEL_*` variables.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct OtelSettings {
    /// The full traces URL (ending in `/v1/traces`); `None` means no exporter at all.
    pub traces_endpoint: Option<String>,
    pub protocol: OtlpProtocol,
    pub service_name: String,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum OtlpProtocol {
    #[default]
    HttpProtobuf,
    HttpJson,
}

impl OtelSettings {
    /// Reads `OTEL_SDK_DISABLED`, `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` (used as is),
    /// `OTEL_EXPORTER_OTLP_ENDPOINT` (a base: `/v1/traces` is appended), the matching
    /// `_PROTOCOL` variables and `OTEL_SERVICE_NAME`. The sampler variables
    /// (`OTEL_TRACES_SAMPLER`, `_ARG`) are read by the SDK itself. Problems are returned as
    /// messages, for start-up to report with the rest of the configuration.
    pub fn from_env(get: impl Fn(&str) -> Option<String>) -> Result<OtelSettings, String> {
        let non_empty = |name: &str| get(name).filter(|v| !v.trim().is_empty());
        let service_name =
            non_empty("OTEL_SERVICE_NAME").unwrap_or_else(|| "score-proxy".to_owned());
        if non_empty("OTEL_SDK_DISABLED").is_some_and(|v| v.trim().eq_ignore_ascii_case("true")) {
            return Ok(OtelSettings {
                service_name,
                ..OtelSettings::default()
            });
        }
        let traces_endpoint = non_empty("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT").or_else(|| {
            non_empty("OTEL_EXPORTER_OTLP_ENDPOINT")
                .map(|base| format!("{}/v1/traces", base.trim_end_matches('/')))
        });
        let protocol = match non_empty("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
            .or_else(|| non_empty("OTEL_EXPORTER_OTLP_PROTOCOL"))
            .as_deref()
            .map(str::trim)
        {
            None | Some("http/protobuf") => OtlpProtocol::HttpProtobuf,
            Some("http/json") => OtlpProtocol::HttpJson,
            Some(other) => {
                return Err(format!(
                    "OTEL_EXPORTER_OTLP_PROTOCOL: '{other}' is not supported (use http/protobuf or http/json)"
                ));
            }
        };
        if let Some(endpoint) = &traces_endpoint
            && url::Url::parse(endpoint).is_err()
        {
            return Err(format!(
                "OTEL_EXPORTER_OTLP_ENDPOINT: '{endpoint}' is not a URL"
            ));
        }
        Ok(OtelSettings {
            traces_endpoint,
            protocol,
            service_name,
        })
    }
}

/// Keeps the exporter alive; flushes pending spans when dropped.
pub struct TelemetryGuard {
    provider: Option<SdkTracerProvider>,
}

impl TelemetryGuard {
    /// Exports every finished span now (tests use this before reading what was received).
    pub fn flush(&self) {
        if let Some(p) = &self.provider {
            let _ = p.force_flush();
        }
    }
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        if let Some(p) = self.provider.take() {
            let _ = p.shutdown_with_timeout(Duration::from_secs(5));
        }
    }
}

/// Whether spans are being exported (decides where response trace ids come from).
static TRACING_ON: OnceLock<bool> = OnceLock::new();

fn tracing_on() -> bool {
    TRACING_ON.get().copied().unwrap_or(false)
}

/// Installs the global subscriber, logging to stdout with `RUST_LOG` (default `info`).
/// Call once, before serving.
pub fn init(format: LogFormat, otel: &OtelSettings) -> anyhow::Result<TelemetryGuard> {
    init_with(format, otel, None, std::io::stdout)
}

/// [`init`] with the log filter and the log writer given (tests capture logs this way).
pub fn init_with<W>(
    format: LogFormat,
    otel: &OtelSettings,
    filter: Option<&str>,
    writer: W,
) -> anyhow::Result<TelemetryGuard>
where
    W: for<'w> tracing_subscriber::fmt::MakeWriter<'w> + Send + Sync + 'static,
{
    let env_filter = match filter {
        Some(f) => EnvFilter::new(f),
        None => EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
    };
    let events_only = filter_fn(|meta| meta.is_event());
    let log_layer = match format {
        LogFormat::Text => tracing_subscriber::fmt::layer()
            .with_writer(writer)
            .with_target(true)
            .with_ansi(filter.is_none() && std::io::IsTerminal::is_terminal(&std::io::stdout()))
            .boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .with_writer(writer)
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)
            .boxed(),
    }
    .with_filter(events_only.and(env_filter));

    let (otel_layer, provider) = match &otel.traces_endpoint {
        None => (None, None),
        Some(endpoint) => {
            use opentelemetry::trace::TracerProvider as _;
            use opentelemetry_otlp::{Protocol, WithExportConfig};
            let protocol = match otel.protocol {
                OtlpProtocol::HttpProtobuf => Protocol::HttpBinary,
                OtlpProtocol::HttpJson => Protocol::HttpJson,
            };
            let exporter = opentelemetry_otlp::SpanExporter::builder()
                .with_http()
                .with_endpoint(endpoint.clone())
                .with_protocol(protocol)
                .with_timeout(Duration::from_secs(5))
                .build()?;
            let resource = opentelemetry_sdk::Resource::builder()
                .with_service_name(otel.service_name.clone())
                .with_attribute(KeyValue::new("service.version", env!("CARGO_PKG_VERSION")))
                .build();
            let provider = SdkTracerProvider::builder()
                .with_batch_exporter(exporter)
                .with_resource(resource)
                .build();
            let tracer = provider.tracer("score-proxy");
            // Only this crate's spans become OTel spans (not hyper's or reqwest's).
            let spans = Targets::new().with_target("score_proxy", tracing::Level::INFO);
            let layer = tracing_opentelemetry::layer()
                .with_tracer(tracer)
                .with_tracked_inactivity(false)
                .with_threads(false)
                .with_location(false)
                .with_level(false)
                .with_filter(spans);
            (Some(layer), Some(provider))
        }
    };
    let _ = TRACING_ON.set(provider.is_some());
    // With no exporter, nothing consumes spans: a global events-only filter makes every
    // `info_span!` a no-op at its callsite instead of a registry entry per request.
    let spans_off = otel_layer
        .is_none()
        .then(|| filter_fn(|meta| meta.is_event()));
    Registry::default()
        .with(spans_off)
        .with(log_layer)
        .with(otel_layer)
        .try_init()?;
    Ok(TelemetryGuard { provider })
}

/// The W3C trace context of a request, as the response headers and the access log show it.
#[derive(Clone, Copy, Debug)]
pub(crate) struct TraceIds {
    pub(crate) trace_id: TraceId,
    pub(crate) span_id: SpanId,
    pub(crate) sampled: bool,
}

impl TraceIds {
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

/// The server span of one request, continuing the caller's `traceparent` if it sent one.
/// Returns the span (not yet entered) and the ids to put on the response.
pub(crate) fn server_span(
    route: Route,
    method: &http::Method,
    path: &str,
    headers: &HeaderMap,
) -> (Span, TraceIds) {
    let span = tracing::info_span!(
        "http.server",
        otel.name = %SpanName(method, route),
        otel.kind = "server",
        otel.status_code = field::Empty,
        http.request.method = %method,
        http.route = route.as_str(),
        url.path = %redacted_path(route, path),
        url.scheme = "http",
        http.response.status_code = field::Empty,
        error.type = field::Empty,
        score_proxy.outcome = field::Empty,
        score_proxy.cache = field::Empty,
        score_proxy.cpf = field::Empty,
        score_proxy.client = field::Empty,
        score_proxy.stale_after = field::Empty,
    );
    let parent = if headers.contains_key("traceparent") {
        propagator().extract(&HeaderExtractor(headers))
    } else {
        Context::new()
    };
    let remote = parent.span().span_context().clone();
    if tracing_on() && !span.is_disabled() {
        // Must happen before the span is first entered (the OTel span is built then).
        let _ = span.set_parent(parent);
        let cx = span.context();
        let sc = cx.span().span_context().clone();
        if sc.is_valid() {
            let ids = TraceIds {
                trace_id: sc.trace_id(),
                span_id: sc.span_id(),
                sampled: sc.is_sampled(),
            };
            return (span, ids);
        }
    }
    // No exporter: continue the caller's trace id (or start one) so logs and responses
    // can still be correlated with the caller's own traces.
    let ids_gen = RandomIdGenerator::default();
    let ids = if remote.is_valid() {
        TraceIds {
            trace_id: remote.trace_id(),
            span_id: ids_gen.new_span_id(),
            sampled: remote.is_sampled(),
        }
    } else {
        TraceIds {
            trace_id: ids_gen.new_trace_id(),
            span_id: ids_gen.new_span_id(),
            sampled: false,
        }
    };
    (span, ids)
}

/// `{method} {route}`, formatted only if a subscriber records it.
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

    /// The first upstream call's span context, once it started.
    pub(crate) fn call_context(&self) -> Option<&SpanContext> {
        self.call.get()
    }
}

/// The client span of one upstream attempt, a child of the leader's request span. `url` is
/// the upstream's address without the query (which holds the CPF).
pub(crate) fn upstream_span(origin: &FlightOrigin, attempt: u64, url: &url::Url) -> Span {
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
    if tracing_on() {
        let sc = span.context().span().span_context().clone();
        if sc.is_valid() {
            let _ = origin.call.set(sc);
        }
    }
    span
}

/// The `traceparent` to send upstream: the client span's own when tracing is on, otherwise
/// the request's trace id with a fresh span id.
pub(crate) fn traceparent_for(span: &Span, fallback: &TraceIds) -> Option<HeaderValue> {
    let value = if tracing_on() {
        let mut out = OneHeader(None);
        propagator().inject_context(&span.context(), &mut out);
        out.0?
    } else {
        TraceIds {
            span_id: RandomIdGenerator::default().new_span_id(),
            ..*fallback
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

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: std::collections::HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| map.get(k).cloned()
    }

    #[test]
    fn otel_settings_from_env() {
        let none = OtelSettings::from_env(env(&[])).unwrap();
        assert_eq!(none.traces_endpoint, None);
        assert_eq!(none.service_name, "score-proxy");

        let base = OtelSettings::from_env(env(&[(
            "OTEL_EXPORTER_OTLP_ENDPOINT",
            "http://jaeger:4318/",
        )]))
        .unwrap();
        assert_eq!(
            base.traces_endpoint.as_deref(),
            Some("http://jaeger:4318/v1/traces")
        );

        let specific = OtelSettings::from_env(env(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://a:4318"),
            ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://b:4318/custom"),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json"),
            ("OTEL_SERVICE_NAME", "edge"),
        ]))
        .unwrap();
        assert_eq!(
            specific.traces_endpoint.as_deref(),
            Some("http://b:4318/custom")
        );
        assert_eq!(specific.protocol, OtlpProtocol::HttpJson);
        assert_eq!(specific.service_name, "edge");

        let disabled = OtelSettings::from_env(env(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://a:4318"),
            ("OTEL_SDK_DISABLED", "true"),
        ]))
        .unwrap();
        assert_eq!(disabled.traces_endpoint, None);

        assert!(
            OtelSettings::from_env(env(&[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://a:4317"),
                ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
            ]))
            .is_err()
        );
    }

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
}
