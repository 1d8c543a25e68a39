//! Sampling decided at the request head, with `parentbased_traceidratio` at 0: a new trace
//! is never sampled, a caller's sampled one always is (its own binary: the tracing
//! subscriber is global).

mod common;
mod otlp;

use std::sync::OnceLock;

use common::{Setup, cpf, spawn};
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use otlp::{Otel, assert_private, one, parse_traceparent};
use score_proxy::telemetry::TraceSampler;

fn telemetry() -> &'static Otel {
    static OTEL: OnceLock<Otel> = OnceLock::new();
    OTEL.get_or_init(|| otlp::install(TraceSampler::ParentBasedTraceIdRatio(0.0)))
}

const CALLER_SPAN: &str = "00f067aa0ba902b7";
const SECRET_CLIENT: &str = "client-5d0c-never-in-telemetry";

#[tokio::test]
async fn at_ratio_0_only_what_the_caller_sampled_is_traced_and_every_lookup_propagates() {
    let otel = telemetry();
    let t = spawn(Setup::default()).await;

    // Not sampled (a new trace, ratio 0): a miss, then a hit.
    let untraced_cpf = cpf(7001);
    let miss = t.lookup(&untraced_cpf, SECRET_CLIENT).await;
    assert_eq!((miss.status, miss.x_cache()), (200, "MISS"));
    let (trace, response_span, flags) = parse_traceparent(miss.header("traceparent").unwrap());
    assert_eq!(flags, "00");
    assert_eq!(miss.header("x-trace-id"), Some(trace.as_str()));
    // The upstream got a valid traceparent all the same: the same trace, not sampled.
    let sent = t.sim.stats().arrivals[0]
        .traceparent
        .clone()
        .expect("a traceparent upstream");
    let (sent_trace, sent_span, sent_flags) = parse_traceparent(&sent);
    assert_eq!(
        (sent_trace.as_str(), sent_flags.as_str()),
        (trace.as_str(), "00")
    );
    assert_ne!(
        sent_span, response_span,
        "the call has a span id of its own"
    );
    let hit = t.lookup(&untraced_cpf, SECRET_CLIENT).await;
    assert_eq!(hit.x_cache(), "HIT");
    let (hit_trace, _, hit_flags) = parse_traceparent(hit.header("traceparent").unwrap());
    assert_ne!(hit_trace, trace);
    assert_eq!(hit_flags, "00");

    // Sampled by the caller: traced whatever the ratio, and whole.
    let traced = "abababababababababababababababab";
    let traceparent = format!("00-{traced}-{CALLER_SPAN}-01");
    let lookup_cpf = cpf(7002);
    let r = t
        .spawn_lookup_with(&lookup_cpf, SECRET_CLIENT, &[("traceparent", &traceparent)])
        .await
        .unwrap();
    assert_eq!((r.status, r.x_cache()), (200, "MISS"));
    let (_, _, flags) = parse_traceparent(r.header("traceparent").unwrap());
    assert_eq!(flags, "01");
    let spans = otel
        .spans_of(
            traced,
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
    assert_eq!(server.parent_span_id, CALLER_SPAN);
    for stage in [
        "validation",
        "cache.lookup",
        "queue.wait",
        "pacing.permit",
        "GET",
        "upstream.wait",
    ] {
        assert_eq!(one(&spans, stage).parent_span_id, server.span_id, "{stage}");
    }
    let client = one(&spans, "GET");
    assert_eq!(client.kind, SpanKind::Client as i32);
    let sent = t.sim.stats().arrivals[1].traceparent.clone().unwrap();
    assert_eq!(sent, format!("00-{traced}-{}-01", client.span_id));
    assert_private(&spans, &[&lookup_cpf, &untraced_cpf, SECRET_CLIENT]);

    // The untraced lookups made no span at all: everything exported is the traced one's.
    let all = otel.spans.lock().unwrap().clone();
    assert!(
        all.iter().all(|s| s.trace_id == traced),
        "spans of untraced lookups were exported: {all:#?}"
    );
}
