//! Traces and logs, checked the way an operator's tools would see them: a real OTLP/HTTP
//! receiver inside the test decodes the `ExportTraceServiceRequest`s the exporter sends, and
//! the log output is captured at trace level.
//!
//! The tracing subscriber is global, so every test in this binary shares one set-up (see
//! [`telemetry`]) and tells its spans apart by trace id.

mod common;
mod otlp;

use std::sync::OnceLock;
use std::time::Duration;

use common::{Setup, cpf, spawn};
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use otlp::{Otel, assert_private, one, parse_traceparent};
use score_proxy::telemetry::TraceSampler;

/// The process-wide set-up: receiver, exporter with the default sampler
/// (`parentbased_always_on`), and log capture at trace level.
fn telemetry() -> &'static Otel {
    static OTEL: OnceLock<Otel> = OnceLock::new();
    OTEL.get_or_init(|| otlp::install(TraceSampler::default()))
}

/// Waits until the spans of `trace_id` include every name in `names`.
async fn spans_of(trace_id: &str, names: &[&str]) -> Vec<otlp::Span> {
    telemetry().spans_of(trace_id, names).await
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

    // The server span starts when the request did (before its first stage), and ends
    // after its last.
    assert!(server.start_ns > 0 && server.start_ns <= one(&spans, "validation").start_ns);
    assert!(server.end_ns >= one(&spans, "upstream.wait").end_ns);
    assert!(server.attributes.contains_key("score_proxy.cpf"));
    assert!(server.attributes.contains_key("score_proxy.client"));

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
    // Untraced (the caller did not sample): a miss and a hit, logged, with no span.
    let untraced = [(
        "traceparent",
        "00-66666666666666666666666666666666-00f067aa0ba902b7-00",
    )];
    for _ in 0..2 {
        let r = t.spawn_lookup_with(&secrets[8], SECRET_CLIENT, &untraced);
        assert_eq!(r.await.unwrap().status, 200);
    }

    // Everything the proxy emitted, now that the scenarios are over.
    telemetry().flush().await;
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
    let line = telemetry().log_line(trace).await;
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

#[tokio::test]
async fn the_access_log_has_exactly_one_line_per_request_when_its_buffer_has_room() {
    telemetry();
    let t = spawn(Setup::default()).await;
    // Each request under a trace id of its own, sharing a prefix no other test uses.
    let prefix = "9999999999999999999999999999";
    const REQUESTS: usize = 60;
    let lookup_cpf = cpf(4747);
    for i in 0..REQUESTS {
        let traceparent = format!("00-{prefix}{i:04}-{CALLER_SPAN}-00");
        let r = t.spawn_lookup_with(&lookup_cpf, "000", &[("traceparent", &traceparent)]);
        assert_eq!(r.await.unwrap().status, 200);
    }
    // Each line is buffered before its response is sent: flushing now writes them all.
    telemetry().flush().await;
    let logs = telemetry().logs.text();
    let lines: Vec<&str> = logs.lines().filter(|l| l.contains(prefix)).collect();
    assert_eq!(lines.len(), REQUESTS, "{lines:#?}");
    for line in lines {
        let entry: serde_json::Value = serde_json::from_str(line).unwrap();
        assert_eq!(entry["target"], "score_proxy::access");
    }
    assert_eq!(t.metric("score_proxy_log_lines_dropped_total").await, 0.0);
}

#[tokio::test]
async fn a_traced_hit_is_one_span_with_its_stage_timings() {
    telemetry();
    let t = spawn(Setup::default()).await;
    let lookup_cpf = cpf(4545);
    assert_eq!(t.lookup(&lookup_cpf, SECRET_CLIENT).await.x_cache(), "MISS");
    let trace = "44444444444444444444444444444444";
    let traceparent = format!("00-{trace}-{CALLER_SPAN}-01");
    let r = t
        .spawn_lookup_with(&lookup_cpf, SECRET_CLIENT, &[("traceparent", &traceparent)])
        .await
        .unwrap();
    assert_eq!(r.x_cache(), "HIT");

    // A hit makes no span but its request's, so once that one is in, the trace is whole.
    let spans = spans_of(trace, &["GET /proxy/score"]).await;
    assert_eq!(spans.len(), 1, "a hit is one span: {spans:#?}");
    let server = &spans[0];
    assert_eq!(server.kind, SpanKind::Server as i32);
    assert_eq!(server.parent_span_id, CALLER_SPAN);
    assert_eq!(server.attributes["score_proxy.cache"], "hit");
    assert_eq!(server.attributes["score_proxy.outcome"], "hit");
    assert_eq!(server.attributes["http.response.status_code"], "200");
    assert_eq!(server.attributes["http.route"], "/proxy/score");
    assert_eq!(server.attributes["http.request.method"], "GET");
    assert_eq!(server.attributes["url.path"], "/proxy/score");
    assert_eq!(server.attributes["url.scheme"], "http");
    assert!(server.attributes.contains_key("score_proxy.cpf"));
    assert!(server.attributes.contains_key("score_proxy.client"));
    assert!(0 < server.start_ns && server.start_ns <= server.end_ns);
    assert_eq!(server.status, 0, "a hit is no error");
    for timing in [
        "score_proxy.validation.duration_ns",
        "score_proxy.cache.lookup.duration_ns",
    ] {
        let nanos: u64 = server.attributes[timing].parse().unwrap();
        assert!(nanos < 60_000_000_000, "{timing} = {nanos}");
    }
    let (_, span_id, flags) = parse_traceparent(r.header("traceparent").unwrap());
    assert_eq!(
        (span_id.as_str(), flags.as_str()),
        (server.span_id.as_str(), "01")
    );
    assert_private(&spans, &[&lookup_cpf, SECRET_CLIENT]);
}

#[tokio::test]
async fn a_traced_lookup_refused_at_validation_is_its_server_span_and_the_stage() {
    telemetry();
    let t = spawn(Setup::default()).await;
    let trace = "45454545454545454545454545454545";
    let traceparent = format!("00-{trace}-{CALLER_SPAN}-01");
    let bad = format!("{}0", cpf(4546));
    let r = t
        .client
        .get(t.url(&format!("/proxy/score?cpf={bad}&client_id={SECRET_CLIENT}")))
        .header("traceparent", &traceparent)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let response_tp = r.headers()["traceparent"].to_str().unwrap().to_owned();

    let spans = spans_of(trace, &["GET /proxy/score", "validation"]).await;
    assert_eq!(spans.len(), 2, "{spans:#?}");
    let server = one(&spans, "GET /proxy/score");
    assert_eq!(server.parent_span_id, CALLER_SPAN);
    assert_eq!(server.attributes["http.response.status_code"], "400");
    assert!(!server.attributes.contains_key("score_proxy.cache"));
    assert!(!server.attributes.contains_key("score_proxy.cpf"));
    assert_eq!(response_tp, format!("00-{trace}-{}-01", server.span_id));
    let validation = one(&spans, "validation");
    assert_eq!(validation.parent_span_id, server.span_id);
    assert!(server.start_ns <= validation.start_ns && validation.end_ns <= server.end_ns);
    assert_private(&spans, &[&bad, SECRET_CLIENT]);
}

#[tokio::test]
async fn a_caller_that_did_not_sample_is_not_traced_and_its_trace_goes_on_upstream() {
    telemetry();
    let t = spawn(Setup::default()).await;
    let trace = "77777777777777777777777777777777";
    let traceparent = format!("00-{trace}-{CALLER_SPAN}-00");
    let r = t
        .spawn_lookup_with(&cpf(4646), SECRET_CLIENT, &[("traceparent", &traceparent)])
        .await
        .unwrap();
    assert_eq!((r.status, r.x_cache()), (200, "MISS"));
    assert_eq!(r.header("x-trace-id"), Some(trace));
    let (response_trace, response_span, flags) =
        parse_traceparent(r.header("traceparent").unwrap());
    assert_eq!((response_trace.as_str(), flags.as_str()), (trace, "00"));
    assert_ne!(response_span, CALLER_SPAN);
    // Upstream, the same trace, not sampled, under a span id of the call's own.
    let sent = t.sim.stats().arrivals[0]
        .traceparent
        .clone()
        .expect("a traceparent upstream");
    let (sent_trace, sent_span, sent_flags) = parse_traceparent(&sent);
    assert_eq!((sent_trace.as_str(), sent_flags.as_str()), (trace, "00"));
    assert_ne!(sent_span, CALLER_SPAN);

    // A traced lookup through the same stages afterwards: once its spans are in, any span
    // of the untraced one would be too.
    let traced = "78787878787878787878787878787878";
    let traceparent = format!("00-{traced}-{CALLER_SPAN}-01");
    let r = t
        .spawn_lookup_with(&cpf(4647), SECRET_CLIENT, &[("traceparent", &traceparent)])
        .await
        .unwrap();
    assert_eq!(r.x_cache(), "MISS");
    spans_of(traced, &["GET /proxy/score", "GET", "upstream.wait"]).await;
    assert!(
        telemetry().spans_with(trace).is_empty(),
        "the untraced lookup exported spans: {:#?}",
        telemetry().spans_with(trace)
    );
    // Its access-log line is written all the same.
    let line = telemetry().log_line(trace).await;
    assert!(line.contains("score_proxy::access"), "{line}");
}
