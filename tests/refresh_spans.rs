//! A background refresh is a trace of its own: a `cache.refresh` root span naming its reason,
//! with the upstream call's client span under it, and the call carries that trace upstream
//! (its own binary: the tracing subscriber is global).

mod common;
mod otlp;

use std::sync::OnceLock;
use std::time::Duration;

use common::{Setup, cpf, spawn};
use otlp::{Otel, assert_private, one, parse_traceparent};
use score_proxy::telemetry::TraceSampler;

fn telemetry() -> &'static Otel {
    static OTEL: OnceLock<Otel> = OnceLock::new();
    OTEL.get_or_init(|| otlp::install(TraceSampler::AlwaysOn))
}

const SECRET_CLIENT: &str = "client-7e1a-never-in-telemetry";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_while_revalidate_refresh_is_a_trace_with_its_call_under_it() {
    let otel = telemetry();
    let app = spawn(
        Setup::default()
            .arg("--cache-ttl", "200ms")
            .arg("--stale-while-revalidate", "60s"),
    )
    .await;
    let key = cpf(8101);
    assert_eq!(app.lookup(&key, SECRET_CLIENT).await.x_cache(), "MISS");
    // Only time passing makes the entry expire.
    tokio::time::sleep(Duration::from_millis(250)).await;
    let stale = app.lookup(&key, SECRET_CLIENT).await;
    assert_eq!(stale.x_cache(), "STALE");
    app.metric_reaches(
        "score_proxy_background_lookups_total{outcome=\"fetched\",reason=\"revalidate\"}",
        1.0,
    )
    .await;

    // The refresh's call carried a trace of its own, not the stale answer's request's.
    let arrivals = app.sim.stats().arrivals;
    assert_eq!(arrivals.len(), 2);
    let sent = arrivals[1]
        .traceparent
        .clone()
        .expect("a traceparent upstream");
    let (trace, call_span, flags) = parse_traceparent(&sent);
    assert_eq!(flags, "01");
    let (stale_trace, _, _) = parse_traceparent(stale.header("traceparent").unwrap());
    assert_ne!(trace, stale_trace);

    let spans = otel.spans_of(&trace, &["cache.refresh", "GET"]).await;
    let refresh = one(&spans, "cache.refresh");
    assert_eq!(refresh.parent_span_id, "", "a root span");
    assert_eq!(
        refresh
            .attributes
            .get("score_proxy.refresh.reason")
            .map(String::as_str),
        Some("revalidate")
    );
    let call = one(&spans, "GET");
    assert_eq!(call.parent_span_id, refresh.span_id);
    assert_eq!(
        call.span_id, call_span,
        "the call's span is what went upstream"
    );
    assert_private(&spans, &[&key, SECRET_CLIENT]);
    app.shutdown().await.unwrap();
}
