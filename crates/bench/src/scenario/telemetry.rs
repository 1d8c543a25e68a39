//! Scenario 5: what telemetry costs (issue 13), in one run of alternating rounds on one
//! warm key: the proxy with telemetry off, metrics only (the baseline the targets are
//! measured against: metrics are on in every other proxy set-up), the shipped default
//! (access log at `info` to a file), tracing at 1 %, 10 % and `always_on` to a small OTLP
//! sink here (one per mode; it counts the spans to prove they were exported), and nginx
//! with its buffered access log against nginx without, the anchor for what a log should
//! cost. Ratios are taken round by round (each round's set-ups ran back to back, so load
//! from elsewhere on the machine hits them alike), then the median over the rounds.

use std::fs;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use bytes::Bytes;

use crate::client::{lookup_path, next_cpfs, warm};
use crate::report::table;
use crate::scrape::scrape;
use crate::stats::{median, mib, ms};
use crate::suite::{NGINX_BUFFERED_LOG, NginxSpec, Running, Suite, Telemetry};
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
    counts.requests.fetch_add(1, Ordering::Relaxed);
    counts.bytes.fetch_add(body.len() as u64, Ordering::Relaxed);
    if let Some(spans) = count_spans(&body) {
        counts.spans.fetch_add(spans, Ordering::Relaxed);
    }
    (
        [(axum::http::header::CONTENT_TYPE, "application/x-protobuf")],
        Vec::<u8>::new(),
    )
}

/// The length-delimited fields numbered `field` in a protobuf message, other fields
/// skipped; `None` if the bytes are not a well-formed message.
fn fields(mut msg: &[u8], field: u64) -> Option<Vec<&[u8]>> {
    fn varint(b: &mut &[u8]) -> Option<u64> {
        let mut n = 0u64;
        for shift in (0..64).step_by(7) {
            let (&byte, rest) = b.split_first()?;
            *b = rest;
            n |= u64::from(byte & 0x7f) << shift;
            if byte < 0x80 {
                return Some(n);
            }
        }
        None
    }
    let mut out = Vec::new();
    while !msg.is_empty() {
        let key = varint(&mut msg)?;
        let skip = match key & 7 {
            0 => {
                varint(&mut msg)?;
                0
            }
            1 => 8,
            5 => 4,
            2 => {
                let len = usize::try_from(varint(&mut msg)?).ok()?;
                if key >> 3 == field {
                    out.push(msg.get(..len)?);
                }
                len
            }
            _ => return None,
        };
        msg = msg.get(skip..)?;
    }
    Some(out)
}

/// Spans in an `ExportTraceServiceRequest` (resource_spans = 1, scope_spans = 2, spans =
/// 2), counted without decoding them: the sink shares the cores with the proxy it measures,
/// so it does as little as it can.
fn count_spans(body: &[u8]) -> Option<u64> {
    let mut spans = 0;
    for resource in fields(body, 1)? {
        for scope in fields(resource, 2)? {
            spans += fields(scope, 2)?.len() as u64;
        }
    }
    Some(spans)
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

/// One set-up measured: a proxy with its telemetry, or nginx with or without its log.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Setup {
    Proxy(Telemetry),
    Nginx { access_log: bool },
}

impl Setup {
    fn label(self) -> String {
        match self {
            Setup::Proxy(t) => t.label(),
            Setup::Nginx { access_log: false } => "nginx, access log off".into(),
            Setup::Nginx { access_log: true } => "nginx, buffered access log".into(),
        }
    }
}

struct Measured {
    setup: Setup,
    running: Running,
    hits: Hits,
}

/// The targets: a set-up's throughput against metrics only's, at least this much.
fn target_of(setup: Setup) -> Option<(&'static str, f64)> {
    match setup {
        Setup::Proxy(Telemetry::Default) => {
            Some(("shipped default (metrics + access log to a file)", 0.95))
        }
        Setup::Proxy(Telemetry::Tracing { per_mille: 10, .. }) => Some(("tracing at 1 %", 0.95)),
        Setup::Proxy(Telemetry::Tracing { per_mille: 100, .. }) => Some(("tracing at 10 %", 0.90)),
        Setup::Proxy(Telemetry::Tracing {
            per_mille: 1000, ..
        }) => Some(("tracing always_on", 0.70)),
        _ => None,
    }
}

/// Round by round, `a`'s throughput over `b`'s; the median of those.
fn paired(a: &Hits, b: &Hits) -> f64 {
    let ratios: Vec<f64> = a
        .rps
        .iter()
        .zip(&b.rps)
        .map(|(a, b)| a / b.max(1.0))
        .collect();
    median(&ratios)
}

/// Lines in a file, without holding it in memory (the access log runs to hundreds of MiB).
fn count_lines(path: &Path) -> Result<u64> {
    let mut reader = BufReader::with_capacity(1 << 20, fs::File::open(path)?);
    let mut lines = 0u64;
    loop {
        let buf = reader.fill_buf()?;
        if buf.is_empty() {
            return Ok(lines);
        }
        lines += buf.iter().filter(|&&b| b == b'\n').count() as u64;
        let n = buf.len();
        reader.consume(n);
    }
}

pub(crate) async fn run(suite: &mut Suite) -> Result<()> {
    println!("== 5. telemetry cost");
    suite.sim.configure(0, 0).await?;
    suite.sim.reset().await?;
    // One sink per tracing set-up, so that each one's spans are counted apart.
    let mut sinks = Vec::new();
    let mut setups = vec![
        Setup::Proxy(Telemetry::Off),
        Setup::Proxy(Telemetry::Metrics),
        Setup::Proxy(Telemetry::Default),
    ];
    for per_mille in [10, 100, 1000] {
        let (port, counts, task) = start_sink().await?;
        sinks.push((per_mille, counts, task));
        setups.push(Setup::Proxy(Telemetry::Tracing { port, per_mille }));
    }
    setups.push(Setup::Nginx { access_log: false });
    setups.push(Setup::Nginx { access_log: true });

    let cpf = next_cpfs(1).remove(0);
    let path = lookup_path(&cpf);
    let keys_file = write_keys(&suite.ws, "keys-telemetry.txt", std::slice::from_ref(&path))?;
    let mut measured = Vec::new();
    for setup in setups {
        let label = setup.label();
        let running = match setup {
            Setup::Proxy(t) => suite.start_proxy(&label, &FAST_PROXY, t).await?,
            Setup::Nginx { access_log } => {
                let spec = NginxSpec {
                    rate: "1000r/s",
                    burst: 1000,
                    sim_port: suite.sim.port,
                    read_timeout_s: None,
                    variant: access_log.then_some("access-log"),
                };
                suite.start_nginx_logged(&label, &spec, access_log).await?
            }
        };
        warm(&suite.client, &running.base, std::slice::from_ref(&path), 1).await?;
        measured.push(Measured {
            setup,
            running,
            hits: Hits::new(),
        });
    }
    let spans_before: Vec<u64> = sinks
        .iter()
        .map(|(_, c, _)| c.spans.load(Ordering::Relaxed))
        .collect();
    // Eight set-ups share each round, so a full run's rounds take about four minutes: more
    // of them would outlast the 300 s the proxies and nginx keep the warm key, and the
    // measurement would no longer be of hits only (checked below).
    let calls_before = suite.sim.stats().await?.calls;
    let load_before = crate::report::load_average();
    for round in 0..suite.plan.rounds {
        for m in measured.iter_mut() {
            let w = run_wrk(&suite.plan, &m.running.base, &keys_file, &m.running.proc)?;
            ensure!(
                w.errors() == 0,
                "telemetry {}: {} errors under wrk",
                m.running.label,
                w.errors()
            );
            println!(
                "  {} round {}: {:.0} req/s p99 {}, {:.1} us CPU/req",
                m.running.label,
                round + 1,
                w.rps(),
                ms(w.p99_us as f64 / 1e6),
                w.cpu_us
            );
            m.hits.add(&w);
        }
    }
    let load_after = crate::report::load_average();
    let calls = suite.sim.stats().await?.calls - calls_before;
    ensure!(
        calls == 0,
        "{calls} upstream calls during the telemetry measurement: not all were hits"
    );
    // The batch exporters send on their own schedule: give them a moment to deliver.
    tokio::time::sleep(Duration::from_secs(if suite.plan.quick { 2 } else { 6 })).await;

    let find = |want: Setup| {
        measured
            .iter()
            .find(|m| m.setup == want)
            .context("a set-up of the telemetry scenario is missing")
    };
    let off = find(Setup::Proxy(Telemetry::Off))?;
    let metrics = find(Setup::Proxy(Telemetry::Metrics))?;
    let nginx_off = find(Setup::Nginx { access_log: false })?;
    let off_cpu = median(&off.hits.cpu_us);
    let metrics_cpu = median(&metrics.hits.cpu_us);
    let mut rows = Vec::new();
    for m in &measured {
        let h = &m.hits;
        let cpu = median(&h.cpu_us);
        let (of_metrics, of_off, of_cpu) = match m.setup {
            Setup::Proxy(_) => (
                format!("{:.1}%", 100.0 * paired(h, &metrics.hits)),
                format!("{:.1}%", 100.0 * paired(h, &off.hits)),
                format!("{:.1}%", 100.0 * metrics_cpu / cpu),
            ),
            Setup::Nginx { .. } => (
                format!(
                    "{:.1}% of nginx, log off",
                    100.0 * paired(h, &nginx_off.hits)
                ),
                String::new(),
                format!(
                    "{:.1}% of nginx, log off",
                    100.0 * median(&nginx_off.hits.cpu_us) / cpu
                ),
            ),
        };
        rows.push(vec![
            m.running.label.clone(),
            h.rps
                .iter()
                .map(|r| format!("{r:.0}"))
                .collect::<Vec<_>>()
                .join(" / "),
            format!("{:.0}", median(&h.rps)),
            of_metrics,
            of_off,
            ms(median(&h.p99)),
            format!("{cpu:.1} us"),
            of_cpu,
        ]);
    }

    let metrics_of_off = paired(&metrics.hits, &off.hits);
    suite.report.target(
        "telemetry: metrics only at least 95% of off",
        format!(
            "{:.1}% by throughput ({:.1}% by CPU per request)",
            100.0 * metrics_of_off,
            100.0 * off_cpu / metrics_cpu
        ),
        metrics_of_off >= 0.95,
    );
    let traced = |per_mille: u16| {
        measured
            .iter()
            .find(|m| {
                matches!(m.setup, Setup::Proxy(Telemetry::Tracing { per_mille: p, .. }) if p == per_mille)
            })
            .context("a tracing set-up of the telemetry scenario is missing")
    };
    let always_on = traced(1000)?;
    let full_of_off = paired(&always_on.hits, &off.hits);
    suite.report.target(
        "telemetry: metrics + full tracing at least 85% of off",
        format!(
            "{:.1}% by throughput ({:.1}% by CPU per request)",
            100.0 * full_of_off,
            100.0 * off_cpu / median(&always_on.hits.cpu_us)
        ),
        full_of_off >= 0.85,
    );
    for m in &measured {
        let Some((what, at_least)) = target_of(m.setup) else {
            continue;
        };
        let r = paired(&m.hits, &metrics.hits);
        suite.report.target(
            format!(
                "telemetry: {what} at least {:.0}% of metrics only",
                at_least * 100.0
            ),
            format!(
                "{:.1}% by throughput ({:.1}% of off; {:.1}% by CPU per request)",
                100.0 * r,
                100.0 * paired(&m.hits, &off.hits),
                100.0 * metrics_cpu / median(&m.hits.cpu_us)
            ),
            r >= at_least,
        );
    }

    let mut exported = String::new();
    for ((per_mille, counts, _), before) in sinks.iter().zip(&spans_before) {
        let spans = counts.spans.load(Ordering::Relaxed) - before;
        let m = traced(*per_mille)?;
        ensure!(
            spans > 0,
            "tracing at {per_mille}/1000 exported no span to its OTLP sink"
        );
        exported.push_str(&format!(
            "{}: {spans} spans in {} export requests ({}), {:.3} per request served; ",
            m.running.label,
            counts.requests.load(Ordering::Relaxed),
            mib(counts.bytes.load(Ordering::Relaxed)),
            spans as f64 / m.hits.requests.max(1) as f64,
        ));
    }
    let default = find(Setup::Proxy(Telemetry::Default))?;
    let log_bytes = fs::metadata(&default.running.proc.log).map_or(0, |m| m.len());
    let log_lines = count_lines(&default.running.proc.log).unwrap_or(0);
    let dropped = scrape(&suite.client, &default.running.base)
        .await
        .map(|s| s.sum("score_proxy_log_lines_dropped_total", &[]))
        .unwrap_or(f64::NAN);
    let nginx_log = find(Setup::Nginx { access_log: true })?;
    let nginx_log_bytes = nginx_log
        .running
        .proc
        .log
        .parent()
        .map(|d| d.join("access.log"))
        .and_then(|p| fs::metadata(p).ok())
        .map_or(0, |m| m.len());

    let body = format!(
        "Cache-hit throughput (one warm key, `wrk {}`, {} alternating round(s): every set-up \
         once per round, in the order of the table) of the proxy in six telemetry set-ups and \
         of nginx with and without its access log. *off* is `SCORE_PROXY_METRICS=false \
         RUST_LOG=off`; *metrics only* `SCORE_PROXY_METRICS=true RUST_LOG=off`, the baseline \
         of issue 13's targets (metrics are on in every other proxy set-up); *default* is the \
         shipped configuration, metrics on and the access log at `info` (the default \
         `RUST_LOG`), stdout to a file; the *tracing* rows are metrics only plus \
         `OTEL_EXPORTER_OTLP_ENDPOINT=http://127.0.0.1:PORT` and `OTEL_TRACES_SAMPLER=\
         parentbased_traceidratio OTEL_TRACES_SAMPLER_ARG=0.01` (1 %) or `0.1` (10 %) or \
         `OTEL_TRACES_SAMPLER=always_on`, PORT being a small OTLP/HTTP sink in the harness, \
         one per set-up (it counts each export's spans without decoding them, on the same 2 \
         cores; wrk sends no `traceparent`, so every request is a root). nginx is scenario 3's \
         (`rate=1000r/s burst=1000`), once with `access_log off` and once with `access_log \
         PATH {NGINX_BUFFERED_LOG}` at the `http` level. *of metrics only* and *of off* are \
         the medians over the rounds of each round's ratio (set-ups of one round ran back to \
         back, so load from elsewhere hits them alike); for nginx, the ratio to nginx without \
         its log. *Server CPU per request* is the server's user + system time during the run \
         divided by the requests served (exporting and log writing included; the sink's \
         counting is not); *of metrics only (CPU)* is metrics only's CPU per request over \
         this one's, the throughput the set-up would keep if CPU were the only limit. Load \
         average (1 min) {load_before} before the rounds, {load_after} after (2 cores).\n\n{}\n\
         Exported: {exported}the default run's access log: {log_lines} lines, {} (requests \
         served: {}; lines dropped because the buffer was full: {dropped}); nginx's access \
         log: {}.\n",
        suite.plan.wrk_args(),
        suite.plan.rounds,
        table(
            &[
                "set-up",
                "req/s per round",
                "req/s (median)",
                "of metrics only",
                "of off",
                "p99",
                "server CPU per request",
                "of metrics only (CPU)"
            ],
            &rows
        ),
        mib(log_bytes),
        default.hits.requests,
        mib(nginx_log_bytes),
    );
    drop(measured);
    for (_, _, task) in sinks {
        task.abort();
    }
    suite.report.section("5. Telemetry cost", body);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A small `ExportTraceServiceRequest` (two scopes, three spans), encoded by the generated
    /// types, to check the sink's counter against.
    fn sample_request() -> Vec<u8> {
        use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
        use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span};
        use prost::Message;
        let span = |name: &str| Span {
            name: name.into(),
            start_time_unix_nano: 1,
            ..Span::default()
        };
        ExportTraceServiceRequest {
            resource_spans: vec![ResourceSpans {
                scope_spans: vec![
                    ScopeSpans {
                        spans: vec![span("a"), span("b")],
                        ..ScopeSpans::default()
                    },
                    ScopeSpans {
                        spans: vec![span("c")],
                        schema_url: "x".into(),
                        ..ScopeSpans::default()
                    },
                ],
                ..ResourceSpans::default()
            }],
        }
        .encode_to_vec()
    }

    #[test]
    fn the_sink_counts_the_spans_of_a_request() {
        assert_eq!(count_spans(&sample_request()), Some(3));
        assert_eq!(count_spans(&[]), Some(0));
        assert_eq!(count_spans(&[0x0a, 0x05, 0x12]), None, "truncated");
    }
}
