//! Logs and traces: the `tracing` subscriber, the OpenTelemetry exporter, and the spans of
//! each stage.
//!
//! Two layers sit on one `tracing` registry:
//! - the log layer (text or JSON lines, filtered by `RUST_LOG`) sees **events only**, so a
//!   span costs nothing when traces are off. The access line is formatted by hand
//!   ([`access`]), and every line goes through a bounded buffer emptied by a thread of its
//!   own ([`log_writer`]): a request never waits on stdout, and when the buffer is full a
//!   line is dropped and counted (`score_proxy_log_lines_dropped_total`);
//! - the OpenTelemetry layer, present only when an OTLP endpoint is configured, turns this
//!   crate's spans into OTel spans and exports them in batches from a background thread (an
//!   unreachable collector delays nothing on the request path; spans are dropped instead).
//!   Protobuf batches are encoded in one pass by [`otlp`], without the generated message
//!   tree; the queue and batches are larger than the specification's defaults
//!   ([`batch_config`]), both for the cost of tracing every request (issue 13).
//!   Which requests are traced is decided once, at the request head ([`trace`]): an
//!   untraced request makes no span at all. A traced lookup's server span bypasses the
//!   layer unless the lookup goes on to the upstream ([`request_span`]): a hit's one span
//!   goes straight to the SDK.
//!
//! Every response carries the trace id: the server span's for a traced request, otherwise
//! the caller's `traceparent` trace id continued, or a fresh one, so a log line and a
//! response always share an id. Span attributes never hold a CPF or a client id: only
//! [`crate::telemetry::redact`] tags.

mod access;
mod job_span;
mod log_writer;
pub(crate) mod metrics;
mod otlp;
pub(crate) mod recent_calls;
pub mod redact;
mod request_span;
mod sampling;
mod trace;

use std::time::Duration;

use opentelemetry::KeyValue;
use opentelemetry_sdk::trace::{
    BatchConfig, BatchConfigBuilder, BatchSpanProcessor, Sampler, SdkTracerProvider,
};
use tracing_subscriber::filter::{EnvFilter, FilterExt, Targets, filter_fn};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{Layer, Registry};

pub(crate) use job_span::{
    JobItemInfo, SubmissionLink, job_item_span, link_item_to_call, record_job_item,
};
pub use log_writer::{DEFAULT_BUFFER_LINES, lines_dropped};
pub(crate) use request_span::{HeadStages, RequestSpan, record_response, server_span};
pub use sampling::TraceSampler;
pub(crate) use trace::{
    FlightOrigin, TraceIds, fresh_ids, link_to_call, record_upstream_result, sampled_root,
    stage_span, traceparent_for, upstream_span,
};

/// How log lines are written (`SCORE_PROXY_LOG_FORMAT`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

/// How log lines are written, and how many may wait to be.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LogSettings {
    pub format: LogFormat,
    /// Lines the buffer holds at most (`SCORE_PROXY_LOG_BUFFER_LINES`); beyond, lines are
    /// dropped and counted.
    pub buffer_lines: usize,
}

impl LogSettings {
    pub fn new(format: LogFormat) -> LogSettings {
        LogSettings {
            format,
            buffer_lines: DEFAULT_BUFFER_LINES,
        }
    }

    /// Reads `SCORE_PROXY_LOG_BUFFER_LINES` (a whole number of lines, at least 1); a
    /// problem is returned as a message for start-up to report.
    pub fn from_env(
        format: LogFormat,
        get: impl Fn(&str) -> Option<String>,
    ) -> Result<LogSettings, String> {
        let buffer_lines = match get("SCORE_PROXY_LOG_BUFFER_LINES")
            .filter(|v| !v.trim().is_empty())
        {
            None => DEFAULT_BUFFER_LINES,
            Some(raw) => raw
                .trim()
                .parse::<usize>()
                .ok()
                .filter(|n| *n > 0)
                .ok_or_else(|| {
                    format!(
                        "SCORE_PROXY_LOG_BUFFER_LINES: '{raw}' is not a number of lines (1 or more)"
                    )
                })?,
        };
        Ok(LogSettings {
            format,
            buffer_lines,
        })
    }
}

/// Where traces go, from the standard `OTEL_*` variables.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct OtelSettings {
    /// The full traces URL (ending in `/v1/traces`); `None` means no exporter at all.
    pub traces_endpoint: Option<String>,
    pub protocol: OtlpProtocol,
    pub service_name: String,
    /// Which requests are traced (decided at each request's head).
    pub sampler: TraceSampler,
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
    /// `_PROTOCOL` variables, `OTEL_SERVICE_NAME`, and the sampler (`OTEL_TRACES_SAMPLER`,
    /// `_ARG`). Problems are returned as messages, for start-up to report with the rest of
    /// the configuration.
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
        let sampler = TraceSampler::from_env(
            non_empty("OTEL_TRACES_SAMPLER").as_deref(),
            non_empty("OTEL_TRACES_SAMPLER_ARG").as_deref(),
        )?;
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
            sampler,
        })
    }
}

/// Keeps the exporter and the log writer alive. Dropped at the very end (after the drain):
/// exports pending spans, then writes out every buffered log line.
pub struct TelemetryGuard {
    provider: Option<SdkTracerProvider>,
    /// Dropped after `drop` has shut the exporter down, so its last words are logged too.
    log: log_writer::LogWriterGuard,
}

impl TelemetryGuard {
    /// Exports every finished span and writes every buffered log line now (tests use this
    /// before reading what was received).
    pub fn flush(&self) {
        if let Some(p) = &self.provider {
            let _ = p.force_flush();
        }
        self.log.flush();
    }
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        if let Some(p) = self.provider.take() {
            let _ = p.shutdown_with_timeout(Duration::from_secs(5));
        }
    }
}

/// The batch processor's settings: the standard `OTEL_BSP_*` variables when set, otherwise
/// a queue and batches four times the specification's defaults (2048 and 512). With every
/// request traced at tens of thousands of requests a second, 2048 spans are a tenth of a
/// second: a queue that small drops spans whenever the export thread is descheduled, and
/// 512-span batches mean an HTTP round trip every few milliseconds. `is_set` tells whether
/// a variable is set.
fn batch_config(is_set: impl Fn(&str) -> bool) -> BatchConfig {
    let mut config = BatchConfigBuilder::default();
    if !is_set("OTEL_BSP_MAX_QUEUE_SIZE") {
        config = config.with_max_queue_size(8 * 1024);
    }
    if !is_set("OTEL_BSP_MAX_EXPORT_BATCH_SIZE") {
        config = config.with_max_export_batch_size(2 * 1024);
    }
    config.build()
}

/// How long one export of a batch of spans may take before it is given up.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(5);

/// Installs the global subscriber, logging to stdout with `RUST_LOG` (default `info`).
/// Call once, before serving.
pub fn init(log: &LogSettings, otel: &OtelSettings) -> anyhow::Result<TelemetryGuard> {
    // The writer thread hands stdout a whole batch of lines at once: one system call.
    init_with(log, otel, None, std::io::stdout)
}

/// [`init`] with the log filter and the log writer given (tests capture logs this way).
pub fn init_with<W>(
    log: &LogSettings,
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
    let (writer, log_guard) = log_writer::spawn(writer, log.buffer_lines)?;
    let events_only = filter_fn(|meta| meta.is_event());
    let log_layer = match log.format {
        LogFormat::Text => tracing_subscriber::fmt::layer()
            .with_writer(writer)
            .with_target(true)
            .with_ansi(filter.is_none() && std::io::IsTerminal::is_terminal(&std::io::stdout()))
            .map_event_format(access::AccessFormat::text)
            .boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .with_writer(writer)
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)
            .map_event_format(access::AccessFormat::json)
            .boxed(),
    }
    .with_filter(events_only.and(env_filter));

    let (otel_layer, provider) = match &otel.traces_endpoint {
        None => (None, None),
        Some(endpoint) => {
            use opentelemetry::trace::TracerProvider as _;
            let resource = opentelemetry_sdk::Resource::builder()
                .with_service_name(otel.service_name.clone())
                .with_attribute(KeyValue::new("service.version", env!("CARGO_PKG_VERSION")))
                .build();
            // The head decides (`trace::server_span`); the SDK records what it is given,
            // with the trace id the head sampled.
            let builder = SdkTracerProvider::builder()
                .with_sampler(Sampler::AlwaysOn)
                .with_id_generator(trace::HeadIds)
                .with_resource(resource);
            let builder = match otel.protocol {
                // Protobuf, the default, is encoded in one pass (`otlp`); JSON through the
                // crate's exporter.
                OtlpProtocol::HttpProtobuf => builder.with_batch_exporter(
                    otlp::ProtoExporter::new(endpoint.clone(), EXPORT_TIMEOUT, |name| {
                        std::env::var(name).ok()
                    }),
                ),
                OtlpProtocol::HttpJson => {
                    use opentelemetry_otlp::{Protocol, WithExportConfig};
                    let exporter = opentelemetry_otlp::SpanExporter::builder()
                        .with_http()
                        .with_endpoint(endpoint.clone())
                        .with_protocol(Protocol::HttpJson)
                        .with_timeout(EXPORT_TIMEOUT)
                        .build()?;
                    builder.with_span_processor(
                        BatchSpanProcessor::builder(exporter)
                            .with_batch_config(batch_config(|name| {
                                std::env::var_os(name).is_some()
                            }))
                            .build(),
                    )
                }
            };
            let provider = builder.build();
            let tracer = provider.tracer("score-proxy");
            trace::install(otel.sampler, tracer.clone());
            let tracer = trace::HeadTracer(tracer);
            // Only this crate's spans become OTel spans (not hyper's or reqwest's), and
            // only those of traced requests.
            let spans = Targets::new().with_target("score_proxy", tracing::Level::INFO);
            let layer = tracing_opentelemetry::layer()
                .with_tracer(tracer)
                .with_tracked_inactivity(false)
                .with_threads(false)
                .with_location(false)
                .with_level(false)
                .with_context_activation(false)
                .with_filter(sampling::OtelFilter(spans));
            (Some(layer), Some(provider))
        }
    };
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
    Ok(TelemetryGuard {
        provider,
        log: log_guard,
    })
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
    fn log_settings_from_env() {
        let json = |pairs: &[(&str, &str)]| LogSettings::from_env(LogFormat::Json, env(pairs));
        assert_eq!(json(&[]).unwrap().buffer_lines, DEFAULT_BUFFER_LINES);
        assert_eq!(
            json(&[("SCORE_PROXY_LOG_BUFFER_LINES", " 64 ")])
                .unwrap()
                .buffer_lines,
            64
        );
        assert!(json(&[("SCORE_PROXY_LOG_BUFFER_LINES", "0")]).is_err());
        assert!(json(&[("SCORE_PROXY_LOG_BUFFER_LINES", "lots")]).is_err());
    }

    #[test]
    fn the_sampler_is_read_with_the_rest() {
        let settings = OtelSettings::from_env(env(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://a:4318"),
            ("OTEL_TRACES_SAMPLER", "parentbased_traceidratio"),
            ("OTEL_TRACES_SAMPLER_ARG", "0.1"),
        ]))
        .unwrap();
        assert_eq!(settings.sampler, TraceSampler::ParentBasedTraceIdRatio(0.1));
        assert!(
            OtelSettings::from_env(env(&[("OTEL_TRACES_SAMPLER", "sometimes")])).is_err(),
            "a sampler that does not exist is a configuration error"
        );
    }
}
