//! A real OTLP/HTTP receiver for the trace tests: it decodes the `ExportTraceServiceRequest`s
//! the exporter sends, the way an operator's collector would. Each test binary that uses it
//! installs the (process-wide) telemetry once with [`install`] and tells its requests' spans
//! apart by trace id.
#![allow(dead_code)]

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{AnyValue, any_value};
use prost::Message;
use score_proxy::telemetry::{
    self, LogFormat, LogSettings, OtelSettings, OtlpProtocol, TelemetryGuard, TraceSampler,
};
use score_test_support::logs::LogCapture;

/// The service name the exporter is given; the receiver checks every batch carries it.
const SERVICE: &str = "score-proxy-test";

/// One span as received, flattened.
#[derive(Clone, Debug)]
pub struct Span {
    pub name: String,
    pub trace_id: String,
    pub span_id: String,
    pub parent_span_id: String,
    pub kind: i32,
    /// Start and end, in nanoseconds since the epoch.
    pub start_ns: u64,
    pub end_ns: u64,
    /// The span's status code (0 unset, 2 error).
    pub status: i32,
    pub attributes: HashMap<String, String>,
    pub links: Vec<(String, String)>,
}

/// The telemetry of a test binary: the exporter's guard, what the receiver got, the logs.
pub struct Otel {
    pub guard: TelemetryGuard,
    pub spans: Arc<Mutex<Vec<Span>>>,
    received: Arc<tokio::sync::Notify>,
    pub logs: LogCapture,
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn value(v: &Option<AnyValue>) -> String {
    match v.as_ref().and_then(|v| v.value.as_ref()) {
        Some(any_value::Value::StringValue(s)) => s.clone(),
        Some(any_value::Value::IntValue(i)) => i.to_string(),
        Some(any_value::Value::BoolValue(b)) => b.to_string(),
        Some(any_value::Value::DoubleValue(d)) => d.to_string(),
        other => format!("{other:?}"),
    }
}

/// The OTLP receiver: `POST /v1/traces` with a protobuf `ExportTraceServiceRequest`.
fn start_receiver(spans: Arc<Mutex<Vec<Span>>>, received: Arc<tokio::sync::Notify>) -> String {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let app = axum::Router::new().route(
                "/v1/traces",
                axum::routing::post(move |body: axum::body::Bytes| {
                    let spans = spans.clone();
                    let received = received.clone();
                    async move {
                        let request = ExportTraceServiceRequest::decode(body)
                            .expect("a valid ExportTraceServiceRequest");
                        let mut out = spans.lock().unwrap();
                        for rs in request.resource_spans {
                            let service = rs
                                .resource
                                .iter()
                                .flat_map(|r| &r.attributes)
                                .find(|kv| kv.key == "service.name")
                                .map(|kv| value(&kv.value));
                            assert_eq!(service.as_deref(), Some(SERVICE));
                            for ss in rs.scope_spans {
                                for s in ss.spans {
                                    out.push(Span {
                                        name: s.name,
                                        trace_id: hex(&s.trace_id),
                                        span_id: hex(&s.span_id),
                                        parent_span_id: hex(&s.parent_span_id),
                                        kind: s.kind,
                                        start_ns: s.start_time_unix_nano,
                                        end_ns: s.end_time_unix_nano,
                                        status: s.status.as_ref().map_or(0, |st| st.code),
                                        attributes: s
                                            .attributes
                                            .iter()
                                            .map(|kv| (kv.key.clone(), value(&kv.value)))
                                            .collect(),
                                        links: s
                                            .links
                                            .iter()
                                            .map(|l| (hex(&l.trace_id), hex(&l.span_id)))
                                            .collect(),
                                    });
                                }
                            }
                        }
                        drop(out);
                        received.notify_waiters();
                        ""
                    }
                }),
            );
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            tx.send(listener.local_addr().unwrap()).unwrap();
            axum::serve(listener, app).await.unwrap();
        });
    });
    format!("http://{}/v1/traces", rx.recv().unwrap())
}

/// Starts the receiver and installs the exporter with `sampler`, and the log capture at
/// trace level (JSON lines). Done on a plain thread: the exporter's blocking HTTP client
/// must not be built inside a runtime.
pub fn install(sampler: TraceSampler) -> Otel {
    std::thread::spawn(move || {
        let spans = Arc::new(Mutex::new(Vec::new()));
        let received = Arc::new(tokio::sync::Notify::new());
        let endpoint = start_receiver(spans.clone(), received.clone());
        let logs = LogCapture::new();
        let guard = telemetry::init_with(
            &LogSettings::new(LogFormat::Json),
            &OtelSettings {
                traces_endpoint: Some(endpoint),
                protocol: OtlpProtocol::HttpProtobuf,
                service_name: SERVICE.into(),
                sampler,
            },
            Some("trace"),
            logs.make_writer(),
        )
        .expect("telemetry starts");
        Otel {
            guard,
            spans,
            received,
            logs,
        }
    })
    .join()
    .unwrap()
}

impl Otel {
    /// Exports every finished span and writes every buffered log line, now.
    pub async fn flush(&'static self) {
        tokio::task::spawn_blocking(|| self.guard.flush())
            .await
            .unwrap();
    }

    /// The spans received so far of `trace_id`.
    pub fn spans_with(&self, trace_id: &str) -> Vec<Span> {
        self.spans
            .lock()
            .unwrap()
            .iter()
            .filter(|s| s.trace_id == trace_id)
            .cloned()
            .collect()
    }

    /// Waits until the spans of `trace_id` include every name in `names`, flushing the
    /// exporter (spans end when their request is done, which can be just after the client
    /// has its answer).
    pub async fn spans_of(&'static self, trace_id: &str, names: &[&str]) -> Vec<Span> {
        let found = tokio::time::timeout(Duration::from_secs(20), async {
            loop {
                let notified = self.received.notified();
                self.flush().await;
                let spans = self.spans_with(trace_id);
                if names.iter().all(|n| spans.iter().any(|s| s.name == *n)) {
                    return spans;
                }
                let _ = tokio::time::timeout(Duration::from_millis(200), notified).await;
            }
        })
        .await;
        found.unwrap_or_else(|_| {
            panic!(
                "spans {names:?} of trace {trace_id} never arrived; got {:#?}",
                self.spans.lock().unwrap()
            )
        })
    }

    /// Waits until at least `n` spans received (of any trace) match `keep`, flushing the
    /// exporter, and returns them all (for spans that are roots of traces of their own).
    pub async fn spans_where(&'static self, n: usize, keep: impl Fn(&Span) -> bool) -> Vec<Span> {
        let found = tokio::time::timeout(Duration::from_secs(20), async {
            loop {
                let notified = self.received.notified();
                self.flush().await;
                let spans: Vec<Span> = self
                    .spans
                    .lock()
                    .unwrap()
                    .iter()
                    .filter(|s| keep(s))
                    .cloned()
                    .collect();
                if spans.len() >= n {
                    return spans;
                }
                let _ = tokio::time::timeout(Duration::from_millis(200), notified).await;
            }
        })
        .await;
        found.unwrap_or_else(|_| panic!("{n} matching spans never arrived"))
    }

    /// Waits until a log line holds `needle` (lines are written a moment after their
    /// request), and returns it.
    pub async fn log_line(&'static self, needle: &str) -> String {
        tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                self.flush().await;
                if let Some(line) = self.logs.text().lines().find(|l| l.contains(needle)) {
                    return line.to_owned();
                }
                tokio::task::yield_now().await;
            }
        })
        .await
        .unwrap_or_else(|_| panic!("no log line holds {needle}"))
    }
}

pub fn one<'a>(spans: &'a [Span], name: &str) -> &'a Span {
    let matching: Vec<_> = spans.iter().filter(|s| s.name == name).collect();
    assert_eq!(matching.len(), 1, "one {name} span: {spans:#?}");
    matching[0]
}

/// No attribute value, name or link of any span holds one of `secrets`.
pub fn assert_private(spans: &[Span], secrets: &[&str]) {
    for span in spans {
        let text = format!("{span:?}");
        for secret in secrets {
            assert!(!text.contains(secret), "span holds {secret}: {span:#?}");
        }
    }
}

/// The parts of a `traceparent` value, checked to be well formed: version 00, a 32-digit
/// trace id and a 16-digit span id (neither all zeros), and the flags.
pub fn parse_traceparent(value: &str) -> (String, String, String) {
    let parts: Vec<&str> = value.split('-').collect();
    assert_eq!(parts.len(), 4, "{value}");
    let (version, trace, span, flags) = (parts[0], parts[1], parts[2], parts[3]);
    assert_eq!(version, "00", "{value}");
    let is_hex = |s: &str| {
        s.chars()
            .all(|c| c.is_ascii_hexdigit() && !c.is_uppercase())
    };
    assert!(trace.len() == 32 && is_hex(trace), "{value}");
    assert!(span.len() == 16 && is_hex(span), "{value}");
    assert!(trace.chars().any(|c| c != '0'), "{value}");
    assert!(span.chars().any(|c| c != '0'), "{value}");
    assert!(flags == "00" || flags == "01", "{value}");
    (trace.to_owned(), span.to_owned(), flags.to_owned())
}
