//! Traces and logs, checked the way an operator's tools would see them: a real OTLP/HTTP
//! receiver inside the test decodes the `ExportTraceServiceRequest`s the exporter sends, and
//! the log output is captured at trace level.
//!
//! The tracing subscriber is global, so every test in this binary shares one set-up (see
//! [`telemetry`]) and tells its spans apart by trace id.

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use common::{Setup, cpf, spawn};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{AnyValue, any_value};
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use prost::Message;
use score_proxy::telemetry::{self, LogFormat, OtelSettings, OtlpProtocol, TelemetryGuard};
use score_test_support::logs::LogCapture;

/// One span as received, flattened.
#[derive(Clone, Debug)]
struct Span {
    name: String,
    trace_id: String,
    span_id: String,
    parent_span_id: String,
    kind: i32,
    attributes: HashMap<String, String>,
    links: Vec<(String, String)>,
}

struct Shared {
    guard: TelemetryGuard,
    spans: Arc<Mutex<Vec<Span>>>,
    received: Arc<tokio::sync::Notify>,
    logs: LogCapture,
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
                            assert_eq!(service.as_deref(), Some("score-proxy-test"));
                            for ss in rs.scope_spans {
                                for s in ss.spans {
                                    out.push(Span {
                                        name: s.name,
                                        trace_id: hex(&s.trace_id),
                                        span_id: hex(&s.span_id),
                                        parent_span_id: hex(&s.parent_span_id),
                                        kind: s.kind,
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

/// The process-wide set-up: receiver, exporter, and log capture at trace level. Done on a
/// plain thread: the exporter's blocking HTTP client must not be built inside a runtime.
fn telemetry() -> &'static Shared {
    static SHARED: OnceLock<Shared> = OnceLock::new();
    SHARED.get_or_init(|| {
        std::thread::spawn(|| {
            let spans = Arc::new(Mutex::new(Vec::new()));
            let received = Arc::new(tokio::sync::Notify::new());
            let endpoint = start_receiver(spans.clone(), received.clone());
            let logs = LogCapture::new();
            let guard = telemetry::init_with(
                LogFormat::Json,
                &OtelSettings {
                    traces_endpoint: Some(endpoint),
                    protocol: OtlpProtocol::HttpProtobuf,
                    service_name: "score-proxy-test".into(),
                },
                Some("trace"),
                logs.make_writer(),
            )
            .expect("telemetry starts");
            Shared {
                guard,
                spans,
                received,
                logs,
            }
        })
        .join()
        .unwrap()
    })
}

/// Waits until the spans of `trace_id` include every name in `names`, flushing the exporter
/// (spans end when their request is done, which can be just after the client has its answer).
async fn spans_of(trace_id: &str, names: &[&str]) -> Vec<Span> {
    let shared = telemetry();
    let found = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            let notified = shared.received.notified();
            tokio::task::spawn_blocking(|| telemetry().guard.flush())
                .await
                .unwrap();
            let spans: Vec<Span> = shared
                .spans
                .lock()
                .unwrap()
                .iter()
                .filter(|s| s.trace_id == trace_id)
                .cloned()
                .collect();
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
            shared.spans.lock().unwrap()
        )
    })
}

fn one<'a>(spans: &'a [Span], name: &str) -> &'a Span {
    let matching: Vec<_> = spans.iter().filter(|s| s.name == name).collect();
    assert_eq!(matching.len(), 1, "one {name} span: {spans:#?}");
    matching[0]
}

const CALLER_TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CALLER_SPAN: &str = "00f067aa0ba902b7";
const SECRET_CLIENT: &str = "client-7a1f-never-in-telemetry";

#[tokio::test]
async fn a_miss_is_one_trace_with_a_span_per_stage_continuing_the_callers_trace() {
    telemetry();
    let t = spawn(Setup::default()).await;
    let lookup_cpf = cpf(4242);
    let r = t
        .client
        .get(t.url(&format!(
            "/proxy/score?cpf={lookup_cpf}&client_id={SECRET_CLIENT}"
        )))
        .header("traceparent", format!("00-{CALLER_TRACE}-{CALLER_SPAN}-01"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-trace-id"], CALLER_TRACE);
    let response_tp = r.headers()["traceparent"].to_str().unwrap().to_owned();

    let spans = spans_of(
        CALLER_TRACE,
        &[
            "GET /proxy/score",
            "validation",
            "cache.lookup",
            "queue.wait",
            "pacing.permit",
            "GET",
            "upstream.wait",
        ],
    )
    .await;
    let server = one(&spans, "GET /proxy/score");
    assert_eq!(server.kind, SpanKind::Server as i32);
    assert_eq!(
        server.parent_span_id, CALLER_SPAN,
        "continues the caller's span"
    );
    assert_eq!(server.attributes["http.route"], "/proxy/score");
    assert_eq!(server.attributes["http.request.method"], "GET");
    assert_eq!(server.attributes["http.response.status_code"], "200");
    assert_eq!(server.attributes["score_proxy.cache"], "miss");
    // The response's traceparent names the server span.
    assert_eq!(
        response_tp,
        format!("00-{CALLER_TRACE}-{}-01", server.span_id)
    );

    for stage in [
        "validation",
        "cache.lookup",
        "queue.wait",
        "upstream.wait",
        "pacing.permit",
    ] {
        assert_eq!(
            one(&spans, stage).parent_span_id,
            server.span_id,
            "{stage} is a child of the request"
        );
    }
    assert_eq!(
        one(&spans, "queue.wait").attributes["score_proxy.queue.position"],
        "0"
    );
    assert_eq!(
        one(&spans, "cache.lookup").attributes["score_proxy.cache.result"],
        "miss"
    );

    let client = one(&spans, "GET");
    assert_eq!(client.kind, SpanKind::Client as i32);
    assert_eq!(client.parent_span_id, server.span_id);
    assert_eq!(client.attributes["http.response.status_code"], "200");
    assert_eq!(client.attributes["http.request.method"], "GET");
    assert_eq!(client.attributes["server.address"], "127.0.0.1");
    assert!(client.attributes["url.full"].ends_with("/api/score"));

    // The upstream received the trace, naming the client span as the parent.
    let sent = t.sim.stats().arrivals[0].traceparent.clone().unwrap();
    assert_eq!(sent, format!("00-{CALLER_TRACE}-{}-01", client.span_id));

    assert_private(&spans, &[&lookup_cpf, SECRET_CLIENT]);
}

#[tokio::test]
async fn a_coalesced_lookup_links_to_the_call_it_shared() {
    telemetry();
    let t = spawn(Setup::default().sim(|s| s.latency = Duration::from_millis(500))).await;
    let lookup_cpf = cpf(4343);
    let url = t.url(&format!(
        "/proxy/score?cpf={lookup_cpf}&client_id={SECRET_CLIENT}"
    ));
    let leader_trace = "11111111111111111111111111111111";
    let follower_trace = "22222222222222222222222222222222";
    let leader = {
        let (client, url) = (t.client.clone(), url.clone());
        tokio::spawn(async move {
            client
                .get(url)
                .header("traceparent", format!("00-{leader_trace}-{CALLER_SPAN}-01"))
                .send()
                .await
                .unwrap()
        })
    };
    t.sim.wait_for_calls(1).await;
    let follower = t
        .client
        .get(&url)
        .header(
            "traceparent",
            format!("00-{follower_trace}-{CALLER_SPAN}-01"),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(follower.headers()["x-cache"], "COALESCED");
    assert_eq!(leader.await.unwrap().headers()["x-cache"], "MISS");

    let leader_spans = spans_of(leader_trace, &["GET /proxy/score", "GET"]).await;
    let call = one(&leader_spans, "GET");
    let follower_spans = spans_of(follower_trace, &["GET /proxy/score", "coalesce.wait"]).await;
    let wait = one(&follower_spans, "coalesce.wait");
    assert_eq!(
        wait.links,
        [(leader_trace.to_owned(), call.span_id.clone())],
        "the follower links to the leader's upstream call"
    );
    assert!(
        follower_spans.iter().all(|s| s.name != "GET"),
        "no upstream call in the follower's trace"
    );
    assert_eq!(t.sim.calls(), 1);
    assert_private(&leader_spans, &[&lookup_cpf, SECRET_CLIENT]);
    assert_private(&follower_spans, &[&lookup_cpf, SECRET_CLIENT]);
}

#[tokio::test]
async fn no_cpf_or_client_id_in_any_span_log_line_or_metric_across_every_scenario() {
    telemetry();
    let t = spawn(
        Setup::default()
            .arg("--upstream-timeout", "300ms")
            .arg("--queue-capacity", 2)
            .arg("--upstream-max-in-flight", 1)
            .sim(|s| s.client_ids = Some([SECRET_CLIENT.to_owned()].into())),
    )
    .await;
    let secrets: Vec<String> = (5000..5010).map(cpf).collect();
    let bad_client = "other-client-9c2e-also-secret";
    // Miss, hit, coalesced, 401 from the upstream, 400s, 404s with personal data in the path.
    let pair = (
        t.spawn_lookup(&secrets[0], SECRET_CLIENT),
        t.spawn_lookup(&secrets[0], SECRET_CLIENT),
    );
    assert_eq!(pair.0.await.unwrap().status, 200);
    assert_eq!(pair.1.await.unwrap().status, 200);
    assert_eq!(t.lookup(&secrets[0], SECRET_CLIENT).await.status, 200);
    assert_eq!(t.lookup(&secrets[1], bad_client).await.status, 401);
    assert_eq!(
        t.get(&format!(
            "/proxy/score?cpf={}0&client_id={SECRET_CLIENT}",
            secrets[2]
        ))
        .await
        .status,
        400
    );
    assert_eq!(
        t.get(&format!(
            "/proxy/score/{}?client_id={SECRET_CLIENT}",
            secrets[3]
        ))
        .await
        .status,
        404
    );
    // Timeout, queue full, a client that hangs up.
    t.sim.set_fault(score_sim::Fault::Hang);
    let hung = t.spawn_lookup(&secrets[4], SECRET_CLIENT);
    t.sim.wait_for_calls(3).await;
    t.sim.set_fault(score_sim::Fault::None);
    let queued = t.spawn_lookup(&secrets[5], SECRET_CLIENT);
    let quitter = t.spawn_lookup(&secrets[6], SECRET_CLIENT);
    t.queue_depth_reaches(2).await;
    assert_eq!(t.lookup(&secrets[7], SECRET_CLIENT).await.status, 429);
    quitter.abort();
    t.queue_depth_reaches(1).await;
    assert_eq!(hung.await.unwrap().status, 504);
    assert_eq!(queued.await.unwrap().status, 200);

    // Everything the proxy emitted, now that the scenarios are over.
    tokio::task::spawn_blocking(|| telemetry().guard.flush())
        .await
        .unwrap();
    let metrics = t.metrics().await;
    let logs = telemetry().logs.text();
    assert!(
        logs.contains("\"target\":\"score_proxy::access\""),
        "access log lines were captured"
    );
    let spans = telemetry().spans.lock().unwrap().clone();
    assert!(!spans.is_empty());
    let mut forbidden: Vec<&str> = secrets.iter().map(String::as_str).collect();
    forbidden.extend([SECRET_CLIENT, bad_client]);
    assert_private(&spans, &forbidden);
    for secret in &forbidden {
        assert!(!logs.contains(secret), "log output holds {secret}");
        assert!(!metrics.contains(secret), "metrics hold {secret}");
    }
    // The pseudonyms are there instead, so one lookup can still be followed.
    let tag = score_proxy::telemetry::redact::client(
        &score_proxy::lookup::validation::ClientId::parse(SECRET_CLIENT).unwrap(),
    );
    assert!(
        spans
            .iter()
            .any(|s| s.attributes.get("score_proxy.client") == Some(&tag)),
        "spans carry the client's keyed-hash tag"
    );
}

#[tokio::test]
async fn the_access_log_has_one_json_line_per_request_with_its_trace_id() {
    telemetry();
    let t = spawn(Setup::default()).await;
    let trace = "33333333333333333333333333333333";
    let r = t
        .client
        .get(t.url(&format!("/proxy/score?cpf={}&client_id=000", cpf(4444))))
        .header("traceparent", format!("00-{trace}-{CALLER_SPAN}-01"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // The line is written just after the response: wait for it.
    let line = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let logs = telemetry().logs.text();
            if let Some(line) = logs.lines().find(|l| l.contains(trace)) {
                return line.to_owned();
            }
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("an access log line for the request");
    let entry: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(entry["target"], "score_proxy::access");
    assert_eq!(entry["route"], "/proxy/score");
    assert_eq!(entry["status"], 200);
    assert_eq!(entry["outcome"], "miss");
    assert_eq!(entry["cache"], "miss");
    assert_eq!(entry["upstream_status"], 200);
    assert!(entry["queue_wait_ms"].is_number());
    assert!(entry["upstream_ms"].is_number());
    assert!(entry["duration_ms"].is_number());
}

/// No attribute value, name or link of any span holds one of `secrets`.
fn assert_private(spans: &[Span], secrets: &[&str]) {
    for span in spans {
        let text = format!("{span:?}");
        for secret in secrets {
            assert!(!text.contains(secret), "span holds {secret}: {span:#?}");
        }
    }
}
