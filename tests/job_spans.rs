//! A bulk job's item calls are traces of their own, linked to the job: each item the runner
//! asks for is a `job.item` root span, with a span link to the `POST /jobs` request's span,
//! the job id and the item's index, and its upstream call's span under it; the call carries
//! that trace upstream. No CPF or client id in clear (its own binary: the tracing subscriber
//! is global).

mod common;
mod otlp;

use std::collections::HashMap;
use std::sync::OnceLock;

use common::{Setup, cpf, spawn};
use otlp::{Otel, Span, assert_private, one, parse_traceparent};
use score_proxy::telemetry::TraceSampler;

fn telemetry() -> &'static Otel {
    static OTEL: OnceLock<Otel> = OnceLock::new();
    OTEL.get_or_init(|| otlp::install(TraceSampler::AlwaysOn))
}

const SECRET_CLIENT: &str = "client-5b0c-never-in-telemetry";

/// Whether `span` is under `ancestor` in `spans` (its parent, or its parent's, ...).
fn descends_from(spans: &[Span], span: &Span, ancestor: &Span) -> bool {
    let by_id: HashMap<&str, &Span> = spans.iter().map(|s| (s.span_id.as_str(), s)).collect();
    let mut parent = span.parent_span_id.as_str();
    while let Some(p) = by_id.get(parent) {
        if p.span_id == ancestor.span_id {
            return true;
        }
        parent = p.parent_span_id.as_str();
    }
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_item_call_is_a_trace_linked_to_the_jobs_submission() {
    let otel = telemetry();
    let app = spawn(Setup::default().arg("--rate", "10")).await;
    let cpfs: Vec<String> = (0..3).map(|n| cpf(4200 + n)).collect();
    let reply = app
        .client
        .post(app.url("/jobs"))
        .header("content-type", "application/json")
        .body(serde_json::json!({ "client_id": SECRET_CLIENT, "cpfs": cpfs }).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(reply.status(), 202);
    let (post_trace, post_span, flags) =
        parse_traceparent(reply.headers()["traceparent"].to_str().unwrap());
    assert_eq!(flags, "01", "the submission is traced");
    let job: serde_json::Value = serde_json::from_str(&reply.text().await.unwrap()).unwrap();
    let id = job["id"].as_str().unwrap().to_owned();
    // The whole results stream: it ends when the job does.
    let results = app
        .client
        .get(app.url(&format!("/jobs/{id}/results?client_id={SECRET_CLIENT}")))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(results.lines().count(), 3, "{results}");

    // The submission's own span is what the items link to.
    let post = otel.spans_of(&post_trace, &["POST /jobs"]).await;
    assert_eq!(one(&post, "POST /jobs").span_id, post_span);

    // One `job.item` span per item, each linked to the submission.
    let link = (post_trace.clone(), post_span.clone());
    let items = otel
        .spans_where(3, |s| s.name == "job.item" && s.links.contains(&link))
        .await;
    assert_eq!(items.len(), 3, "{items:#?}");

    let arrivals = app.sim.stats().arrivals;
    assert_eq!(arrivals.len(), 3, "one call per item");
    let mut indexes = Vec::new();
    for item in &items {
        assert_eq!(item.parent_span_id, "", "a root span: {item:#?}");
        assert_ne!(item.trace_id, post_trace, "a trace of its own");
        assert_eq!(item.attributes["score_proxy.job.id"], id);
        assert_eq!(item.attributes["score_proxy.job.item.outcome"], "fetched");
        let index: usize = item.attributes["score_proxy.job.item.index"]
            .parse()
            .unwrap();
        indexes.push(index);
        // The item's upstream call is under it, and carried its trace upstream.
        let spans = otel.spans_of(&item.trace_id, &["job.item", "GET"]).await;
        let call = one(&spans, "GET");
        assert!(
            descends_from(&spans, call, item),
            "the call is under the item: {spans:#?}"
        );
        let arrival = arrivals
            .iter()
            .find(|a| a.cpf == cpfs[index])
            .expect("the item's call");
        let (trace, call_span, _) = parse_traceparent(arrival.traceparent.as_ref().unwrap());
        assert_eq!(
            (trace, call_span),
            (item.trace_id.clone(), call.span_id.clone())
        );
        let mut secrets: Vec<&str> = cpfs.iter().map(String::as_str).collect();
        secrets.push(SECRET_CLIENT);
        assert_private(&spans, &secrets);
    }
    indexes.sort_unstable();
    assert_eq!(indexes, [0, 1, 2]);
    assert_private(&post, &[SECRET_CLIENT]);
    app.shutdown().await.unwrap();
}
