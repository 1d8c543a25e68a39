//! Scenario 10: restart under load (issue 14). The proxy with `--data-dir` and nginx with
//! its `proxy_cache_path` on disk are each warmed with their own copy of one working set of
//! distinct keys, restarted, and then loaded over that set for a minute: what the restart
//! cost upstream. Two kinds of restart: graceful (the proxy by SIGTERM, nginx by SIGQUIT,
//! what `nginx -s quit` sends) and a crash (SIGKILL to every process of the contender, sent
//! the moment the last warm answer arrived, without waiting for the store's commit: what a
//! crash loses is the point). A key is kept when the restarted contender answered it
//! without calling upstream: the simulator's record of the minute names the others.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use tokio::time::MissedTickBehavior;

use crate::client::{lookup_path, next_cpfs, warm};
use crate::now_s;
use crate::procs::Proc;
use crate::report::table;
use crate::scrape::scrape;
use crate::stats::{fmt_statuses, ms, percentile};
use crate::suite::{NginxSpec, Running, Suite, Telemetry};
use crate::wrk::FAST_PROXY;

/// The cache TTL of both contenders: the proxy's `--cache-ttl`, and what the nginx template
/// says in `proxy_cache_valid 200` (checked in the configuration each nginx runs with). It
/// outlasts a case (warm-up, restart and the minute of load), so nothing expires meanwhile.
const TTL: &str = "300s";

/// Lookups in flight while warming: as a few busy clients would send them.
const WARM_CONCURRENCY: usize = 16;

/// Longest a contender may take to exit after its signal before the run fails.
const STOP_WAIT: Duration = Duration::from_secs(20);

#[derive(Clone, Copy, PartialEq, Eq)]
enum Product {
    Proxy,
    Nginx,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Graceful,
    Crash,
}

impl Product {
    fn label(self) -> &'static str {
        match self {
            Product::Proxy => "score-proxy",
            Product::Nginx => "nginx",
        }
    }
}

impl Kind {
    fn label(self, product: Product) -> &'static str {
        match (self, product) {
            (Kind::Graceful, Product::Proxy) => "graceful (SIGTERM)",
            (Kind::Graceful, Product::Nginx) => "graceful (SIGQUIT, `nginx -s quit`)",
            (Kind::Crash, Product::Proxy) => "crash (SIGKILL)",
            (Kind::Crash, Product::Nginx) => "crash (SIGKILL to master and workers)",
        }
    }

    fn slug(self) -> &'static str {
        match self {
            Kind::Graceful => "graceful",
            Kind::Crash => "crash",
        }
    }
}

/// What one case measured.
struct Case {
    product: Product,
    kind: Kind,
    /// From the signal to the process's exit.
    stopped_in: Duration,
    /// From spawn to the first `/health` answer: with an empty cache, then on the warm one.
    cold_ready: Duration,
    warm_ready: Duration,
    /// Keys of the working set the restarted contender never called upstream for.
    kept: usize,
    /// The proxy's own count of entries loaded from its store at start, and of store files
    /// it moved aside (`None` for nginx).
    store: Option<(u64, u64)>,
    calls: u64,
    /// When the last upstream call arrived, in seconds after the contender was ready.
    last_call: Option<f64>,
    lookups: usize,
    p50: f64,
    p99: f64,
}

pub(crate) async fn run(suite: &mut Suite) -> Result<()> {
    println!("== 10. restart under load");
    // A fast, lenient upstream for the whole scenario and both contenders: the warm-up is
    // quick, and in the measured minute each key a contender lost costs exactly one call
    // (the figure this scenario is about), at once rather than paced.
    suite.sim.configure(0, 0).await?;
    let mut cases = Vec::new();
    for kind in [Kind::Graceful, Kind::Crash] {
        for product in [Product::Proxy, Product::Nginx] {
            let case = run_case(suite, product, kind)
                .await
                .with_context(|| format!("{}, {}", product.label(), kind.label(product)))?;
            cases.push(case);
        }
    }
    report(suite, &cases);
    Ok(())
}

async fn start(suite: &mut Suite, product: Product, dir: &Path) -> Result<Running> {
    match product {
        Product::Proxy => {
            let data_dir = dir.to_string_lossy();
            let mut flags: Vec<&str> = FAST_PROXY.to_vec();
            flags.extend(["--cache-ttl", TTL, "--data-dir", &data_dir]);
            suite
                .start_proxy(product.label(), &flags, Telemetry::Metrics)
                .await
        }
        Product::Nginx => {
            let spec = NginxSpec {
                rate: "1000r/s",
                burst: 1000,
                sim_port: suite.sim.port,
                read_timeout_s: None,
                variant: None,
            };
            let running = suite
                .start_nginx_at(product.label(), &spec, false, dir)
                .await?;
            let conf = std::fs::read_to_string(dir.join("nginx.conf"))?;
            let valid = format!("proxy_cache_valid 200 {TTL};");
            ensure!(
                conf.contains(&valid) && conf.contains("inactive=10m"),
                "nginx's configuration no longer says `{valid}` and `inactive=10m`: \
                 the two caches would not keep answers for the same time"
            );
            Ok(running)
        }
    }
}

async fn run_case(suite: &mut Suite, product: Product, kind: Kind) -> Result<Case> {
    let keys = suite.plan.restart_keys;
    let paths: Vec<String> = next_cpfs(keys).iter().map(|c| lookup_path(c)).collect();
    let dir = suite
        .ws
        .subdir(&format!("restart-{}-{}", product.label(), kind.slug()))?;

    suite.sim.reset().await?;
    let t = Instant::now();
    let mut running = start(suite, product, &dir).await?;
    let cold_ready = t.elapsed();
    warm(&suite.client, &running.base, &paths, WARM_CONCURRENCY).await?;
    // Straight after the last warm answer: a crash does not wait for the store.
    let t = Instant::now();
    match kind {
        Kind::Graceful if product == Product::Proxy => running.proc.signal("TERM", false),
        Kind::Graceful => running.proc.signal("QUIT", false),
        Kind::Crash => running.proc.signal("KILL", true),
    }
    wait_exit(&mut running.proc).await?;
    let stopped_in = t.elapsed();
    drop(running);
    let calls = suite.sim.calls().await?;
    ensure!(
        calls == keys as u64,
        "warming {keys} keys made {calls} upstream calls"
    );

    suite.sim.reset().await?;
    let t = Instant::now();
    let running = start(suite, product, &dir).await?;
    let warm_ready = t.elapsed();
    let ready_at = now_s();
    let store = match product {
        Product::Proxy => {
            let s = scrape(&suite.client, &running.base).await?;
            Some((
                s.sum(
                    "score_proxy_store_load_entries_total",
                    &[("result", "loaded")],
                ) as u64,
                s.sum("score_proxy_store_moved_aside_total", &[]) as u64,
            ))
        }
        Product::Nginx => None,
    };
    let plan = &suite.plan;
    let seen = steady_load(
        &suite.client,
        &running.base,
        &paths,
        plan.restart_clients,
        plan.restart_period,
        plan.restart_window,
    )
    .await?;
    let stats = suite.sim.stats().await?;
    let called: BTreeSet<&str> = stats.arrivals.iter().map(|a| a.cpf.as_str()).collect();
    let last_call = stats
        .arrivals
        .iter()
        .map(|a| suite.sim.to_harness(a.at) - ready_at)
        .max_by(f64::total_cmp);
    let case = Case {
        product,
        kind,
        stopped_in,
        cold_ready,
        warm_ready,
        kept: keys.saturating_sub(called.len()),
        store,
        calls: stats.calls,
        last_call,
        lookups: seen.len(),
        p50: percentile(&seen, 50.0),
        p99: percentile(&seen, 99.0),
    };
    println!(
        "  {} {}: stopped in {}, ready in {} (empty: {}), kept {}/{keys}{}, {} upstream calls \
         in {} lookups, p50 {} p99 {}",
        product.label(),
        kind.slug(),
        ms(stopped_in.as_secs_f64()),
        ms(warm_ready.as_secs_f64()),
        ms(cold_ready.as_secs_f64()),
        case.kept,
        store.map_or(String::new(), |(loaded, aside)| format!(
            " (store loaded {loaded}, moved aside {aside})"
        )),
        case.calls,
        case.lookups,
        ms(case.p50),
        ms(case.p99)
    );
    Ok(case)
}

/// Waits for the signalled contender to exit, polling: a [`Proc`] holds a std child, which
/// has no exit event to await.
async fn wait_exit(proc: &mut Proc) -> Result<()> {
    let until = Instant::now() + STOP_WAIT;
    while proc.exited().is_none() {
        if Instant::now() > until {
            bail!("{} did not exit within {STOP_WAIT:?}", proc.name);
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Ok(())
}

/// `clients` clients, each looking up the working set in turn from its own offset (so no
/// two ask for one key at once), one lookup per `period` (or as soon as the last one is
/// answered, if that is later), for `window`, over keep-alive connections: thousands of
/// lookups a minute on connections that close would run out of ephemeral ports. Returns
/// every lookup's latency; any answer but a `200` fails the run.
async fn steady_load(
    client: &reqwest::Client,
    base: &str,
    paths: &[String],
    clients: usize,
    period: Duration,
    window: Duration,
) -> Result<Vec<f64>> {
    let urls: Arc<[String]> = paths.iter().map(|p| format!("{base}{p}")).collect();
    let deadline = Instant::now() + window;
    let mut tasks = Vec::with_capacity(clients);
    for c in 0..clients {
        let (client, urls) = (client.clone(), urls.clone());
        tasks.push(tokio::spawn(async move {
            let mut tick = tokio::time::interval(period);
            tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
            let mut seen = Vec::new();
            let mut i = c * urls.len() / clients;
            loop {
                tick.tick().await;
                if Instant::now() >= deadline {
                    return seen;
                }
                let url = &urls[i % urls.len()];
                i += 1;
                let t = Instant::now();
                let outcome = match client
                    .get(url)
                    .timeout(Duration::from_secs(10))
                    .send()
                    .await
                {
                    Ok(resp) => {
                        let status = resp.status().as_u16();
                        match resp.bytes().await {
                            Ok(_) => status.to_string(),
                            Err(_) => "read error".to_owned(),
                        }
                    }
                    Err(e) if e.is_timeout() => "timeout".to_owned(),
                    Err(_) => "error".to_owned(),
                };
                seen.push((outcome, t.elapsed().as_secs_f64()));
            }
        }));
    }
    let mut latencies = Vec::new();
    let mut outcomes: BTreeMap<String, usize> = BTreeMap::new();
    for task in tasks {
        for (outcome, latency) in task.await? {
            *outcomes.entry(outcome).or_default() += 1;
            latencies.push(latency);
        }
    }
    ensure!(
        outcomes.keys().all(|k| k == "200"),
        "answers under the steady load after the restart: {}",
        fmt_statuses(&outcomes)
    );
    Ok(latencies)
}

fn report(suite: &mut Suite, cases: &[Case]) {
    let (keys, clients, period) = (
        suite.plan.restart_keys,
        suite.plan.restart_clients,
        suite.plan.restart_period.as_millis(),
    );
    let window = suite.plan.restart_window.as_secs();
    for c in cases.iter().filter(|c| c.product == Product::Proxy) {
        if c.kind == Kind::Graceful {
            suite.report.target(
                "restart under load: no upstream call in the minute after a SIGTERM restart \
                 with a warm store",
                format!("{} calls, {} of {keys} keys kept", c.calls, c.kept),
                c.calls == 0,
            );
        }
    }
    let rows: Vec<Vec<String>> = cases
        .iter()
        .map(|c| {
            vec![
                c.product.label().to_owned(),
                c.kind.label(c.product).to_owned(),
                ms(c.stopped_in.as_secs_f64()),
                format!(
                    "{} (empty: {})",
                    ms(c.warm_ready.as_secs_f64()),
                    ms(c.cold_ready.as_secs_f64())
                ),
                match c.store {
                    Some((loaded, 0)) => format!("{} (store loaded {loaded})", c.kept),
                    Some((loaded, aside)) => format!(
                        "{} (store loaded {loaded}, {aside} file(s) moved aside)",
                        c.kept
                    ),
                    None => c.kept.to_string(),
                },
                match c.last_call {
                    Some(at) if c.calls > 0 => format!("{} (last at +{at:.2} s)", c.calls),
                    _ => c.calls.to_string(),
                },
                c.lookups.to_string(),
                format!(
                    "{:.2} %",
                    100.0 * (1.0 - c.calls as f64 / c.lookups.max(1) as f64)
                ),
                ms(c.p50),
                ms(c.p99),
            ]
        })
        .collect();
    let mut body = format!(
        "A working set of {keys} distinct keys (one client id), new for each case. Each case \
         starts the contender on an empty cache directory, warms it ({WARM_CONCURRENCY} \
         lookups at a time, each key answered `200` once, {keys} upstream calls: checked), \
         restarts it on the same directory, and then {} clients look the set up in turn, \
         each from its own offset, one lookup every {} ms each, for {window} s, over \
         keep-alive connections; every answer must be a `200` (checked). *Graceful* is \
         SIGTERM for the proxy and SIGQUIT (what `nginx -s quit` sends) for nginx; *crash* is \
         SIGKILL to every process of the contender, sent as soon as the last warm answer \
         arrived, without waiting for the proxy's store to commit. The simulator is lenient \
         throughout, for both (no rate rule, no latency): warming takes a moment, and each \
         key a contender lost costs exactly one upstream call in the measured minute, at \
         once instead of at the upstream's pace.\n\n\
         The proxy runs with `{} --cache-ttl {TTL} --data-dir DIR` (metrics on, access log \
         off); nginx is scenario 3's `1000r/s` configuration (`proxy_cache_path DIR/cache \
         levels=1:2 keys_zone=scores:64m inactive=10m use_temp_path=off`, \
         `proxy_cache_valid 200 {TTL}`, key `$arg_client_id:$arg_cpf`), started again with \
         the same prefix. *Keys kept* is the working set less the keys the restarted \
         contender called upstream for (from the simulator's record); for the proxy, its \
         count of entries loaded from the store at start \
         (`score_proxy_store_load_entries_total{{result=\"loaded\"}}`) is beside it. *Upstream \
         calls* are every call from the restart to the end of the load, and *hit ratio* is \
         1 - calls / lookups. *Stopped in* runs from the signal to the exit; *ready in* from \
         spawn to the first `/health` answer (polled every 50 ms), on the warm directory and, \
         in brackets, on the empty one of the same case. Latencies are the clients' (request \
         sent to body read).\n\n{}",
        clients,
        period,
        FAST_PROXY.join(" "),
        table(
            &[
                "contender",
                "restart",
                "stopped in",
                "ready in (empty)",
                &format!("keys kept (of {keys})"),
                &format!("upstream calls in {window} s"),
                "lookups",
                "hit ratio",
                "p50",
                "p99",
            ],
            &rows
        )
    );
    let lost: Vec<String> = cases
        .iter()
        .filter(|c| c.kept < keys)
        .map(|c| {
            format!(
                "{} after a {}: {} of {keys} keys lost",
                c.product.label(),
                c.kind.slug(),
                keys - c.kept
            )
        })
        .collect();
    let _ = write!(
        body,
        "\n{}\n",
        if lost.is_empty() {
            "No contender lost a key in this run.".to_owned()
        } else {
            format!("Lost: {}.", lost.join("; "))
        }
    );
    suite.report.section("10. Restart under load", body);
}
