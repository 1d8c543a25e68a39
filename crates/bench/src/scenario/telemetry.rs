//! Scenario 5: what telemetry costs: cache-hit throughput of the proxy with telemetry off,
//! metrics only, tracing exported to a small OTLP sink here (every trace, and one in ten),
//! and the shipped default; the sink counts the spans to prove they were exported.

use std::fs;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Result, ensure};
use bytes::Bytes;

use crate::client::{lookup_path, next_cpfs, warm};
use crate::report::table;
use crate::stats::{median, mib, ms};
use crate::suite::{Suite, Telemetry};
use crate::wrk::{FAST_PROXY, Hits, run_wrk, write_keys};

#[derive(Default)]
struct SinkCounts {
    pub(crate) requests: AtomicU64,
    pub(crate) bytes: AtomicU64,
    spans: AtomicU64,
}

async fn sink_traces(
    axum::extract::State(counts): axum::extract::State<Arc<SinkCounts>>,
    body: Bytes,
) -> impl axum::response::IntoResponse {
    use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
    use prost::Message;
    counts.requests.fetch_add(1, Ordering::Relaxed);
    counts.bytes.fetch_add(body.len() as u64, Ordering::Relaxed);
    if let Ok(req) = ExportTraceServiceRequest::decode(body.as_ref()) {
        let spans: usize = req
            .resource_spans
            .iter()
            .flat_map(|r| &r.scope_spans)
            .map(|s| s.spans.len())
            .sum();
        counts.spans.fetch_add(spans as u64, Ordering::Relaxed);
    }
    (
        [(axum::http::header::CONTENT_TYPE, "application/x-protobuf")],
        Vec::<u8>::new(),
    )
}

/// A minimal OTLP/HTTP trace receiver: answers 200 to `POST /v1/traces` and counts what
/// arrived, to prove that the spans really were exported.
async fn start_sink() -> Result<(u16, Arc<SinkCounts>, tokio::task::JoinHandle<()>)> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    let counts = Arc::new(SinkCounts::default());
    let app = axum::Router::new()
        .route("/v1/traces", axum::routing::post(sink_traces))
        .layer(axum::extract::DefaultBodyLimit::disable())
        .with_state(counts.clone());
    let task = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Ok((port, counts, task))
}

pub(crate) async fn run(suite: &mut Suite) -> Result<()> {
    println!("== 5. telemetry cost");
    suite.sim.configure(0, 0).await?;
    suite.sim.reset().await?;
    // One sink per tracing mode, so that each one's spans are counted apart.
    let (sink_port, sink, sink_task) = start_sink().await?;
    let (sampled_port, sampled_sink, sampled_task) = start_sink().await?;
    let modes = [
        Telemetry::Off,
        Telemetry::Metrics,
        Telemetry::Tracing(sink_port),
        Telemetry::Sampled(sampled_port),
        Telemetry::Default,
    ];
    let cpf = next_cpfs(1).remove(0);
    let path = lookup_path(&cpf);
    let keys_file = write_keys(&suite.ws, "keys-telemetry.txt", std::slice::from_ref(&path))?;
    let mut running = Vec::new();
    for mode in modes {
        let r = suite.start_proxy(mode.label(), &FAST_PROXY, mode).await?;
        warm(&suite.client, &r.base, std::slice::from_ref(&path), 1).await?;
        running.push((mode, r, Hits::new()));
    }
    let spans_before = sink.spans.load(Ordering::Relaxed);
    let sampled_before = sampled_sink.spans.load(Ordering::Relaxed);
    for round in 0..suite.plan.rounds {
        for (mode, r, hits) in running.iter_mut() {
            let w = run_wrk(&suite.plan, &r.base, &keys_file, &r.proc)?;
            ensure!(
                w.errors() == 0,
                "telemetry {}: {} errors under wrk",
                mode.label(),
                w.errors()
            );
            println!(
                "  {} round {}: {:.0} req/s p99 {}, {:.1} us CPU/req",
                mode.label(),
                round + 1,
                w.rps(),
                ms(w.p99_us as f64 / 1e6),
                w.cpu_us
            );
            hits.add(&w);
        }
    }
    // The batch exporter sends on its own schedule: give it a moment to deliver.
    tokio::time::sleep(Duration::from_secs(6)).await;
    let spans = sink.spans.load(Ordering::Relaxed) - spans_before;
    let sampled_spans = sampled_sink.spans.load(Ordering::Relaxed) - sampled_before;
    let served = |want: fn(&Telemetry) -> bool| {
        running
            .iter()
            .find(|(m, ..)| want(m))
            .map_or(0, |(_, _, h)| h.requests)
    };
    let traced_requests = served(|m| matches!(m, Telemetry::Tracing(_)));
    let sampled_requests = served(|m| matches!(m, Telemetry::Sampled(_)));
    let log_bytes = running
        .iter()
        .find(|(m, ..)| *m == Telemetry::Default)
        .and_then(|(_, r, _)| fs::metadata(&r.proc.log).ok())
        .map_or(0, |m| m.len());
    ensure!(
        spans > 0,
        "the tracing run exported no span to the OTLP sink"
    );
    let off = median(&running[0].2.rps);
    let off_cpu = median(&running[0].2.cpu_us);
    let mut rows = Vec::new();
    for (mode, _, h) in &running {
        let rps = median(&h.rps);
        let cpu = median(&h.cpu_us);
        rows.push(vec![
            mode.label().to_owned(),
            h.rps
                .iter()
                .map(|r| format!("{r:.0}"))
                .collect::<Vec<_>>()
                .join(" / "),
            format!("{rps:.0}"),
            format!("{:.1}%", 100.0 * rps / off),
            ms(median(&h.p99)),
            format!("{cpu:.1} us"),
            format!("{:.1}%", 100.0 * off_cpu / cpu),
        ]);
        let measured = format!(
            "{:.1}% by throughput ({:.1}% by CPU per request)",
            100.0 * rps / off,
            100.0 * off_cpu / cpu
        );
        match mode {
            Telemetry::Metrics => suite.report.target(
                "telemetry: metrics only at least 95% of off",
                measured,
                rps >= 0.95 * off,
            ),
            Telemetry::Tracing(_) => suite.report.target(
                "telemetry: metrics + full tracing at least 85% of off",
                measured,
                rps >= 0.85 * off,
            ),
            _ => {}
        }
    }
    let body = format!(
        "Cache-hit throughput of the proxy (one warm key, `wrk {}`, {} alternating round(s)) \
         in five telemetry set-ups: *off* is `SCORE_PROXY_METRICS=false RUST_LOG=off`; *metrics \
         only* `SCORE_PROXY_METRICS=true RUST_LOG=off`; *metrics + tracing* adds \
         `OTEL_EXPORTER_OTLP_ENDPOINT=http://127.0.0.1:PORT OTEL_TRACES_SAMPLER=always_on`, PORT \
         being a small OTLP/HTTP sink in the harness (it decodes each export to count spans, on \
         the same 2 cores), every request's spans exported (the target's \"full tracing\"); the \
         *parentbased_traceidratio 0.1* row is the same with \
         `OTEL_TRACES_SAMPLER=parentbased_traceidratio OTEL_TRACES_SAMPLER_ARG=0.1` (one trace \
         in ten kept; wrk sends no `traceparent`, so every request is a root); *default* is the \
         shipped configuration, metrics on and the access log at `info`, written to a file. *Server CPU per request* is the proxy's user + system \
         time during the run divided by the requests served (exporting included; the sink's \
         decoding is not); *of off (CPU)* is off's CPU per request over this one's, the \
         throughput the mode would keep if CPU were the only limit.\n\n{}\n\
         The always_on sink received {} export requests, {} bytes, and {spans} spans during \
         the measurement ({:.2} per request served); the sampled run's sink {sampled_spans} \
         spans ({:.2} per request served); the default run's access log grew to {}.\n",
        suite.plan.wrk_args(),
        suite.plan.rounds,
        table(
            &[
                "telemetry",
                "req/s per round",
                "req/s (median)",
                "of off",
                "p99",
                "server CPU per request",
                "of off (CPU)"
            ],
            &rows
        ),
        sink.requests.load(Ordering::Relaxed),
        sink.bytes.load(Ordering::Relaxed),
        spans as f64 / traced_requests.max(1) as f64,
        sampled_spans as f64 / sampled_requests.max(1) as f64,
        mib(log_bytes),
    );
    drop(running);
    sink_task.abort();
    sampled_task.abort();
    suite.report.section("5. Telemetry cost", body);
    Ok(())
}
