//! score-proxy against the rival a user would pick instead: nginx, with `limit_req` for
//! pacing and `proxy_cache` for caching, both in front of the project's upstream simulator,
//! in one run, on one machine.
//!
//! ```text
//! cargo build --release
//! cargo run --release -p score-bench -- [--quick] [--only SCENARIO[,SCENARIO...]] [--out PATH]
//! ```
//!
//! (`scripts/bench.sh` does both and checks that `nginx` and `wrk` are installed.)
//!
//! Everything under test runs as a separate process on loopback: the simulator
//! (`score-sim`), the release build of the proxy, and nginx with the
//! configuration rendered from `bench/nginx.conf.template`. The client side of the bursts
//! and of the overload is here, in Rust (one connection per lookup, per-request latencies);
//! cache-hit load comes from `wrk` with `bench/wrk.lua`. The memory scenario measures the
//! cache component in a child process of this binary.
//!
//! Scenarios (`--only` takes these names): `burst`, `identical`, `hits`, `overload`,
//! `telemetry`, `memory`, `replicas` (three proxies sharing one budget through a
//! `redis-server` started here, against one process), `network` (the strict simulator
//! behind a seeded one-way network delay, one simulator per contender: the learned guard
//! against a fixed one and nginx), `redis-down` (three replicas in shared mode while their
//! `redis-server` is stopped and restarted, against the fallback before time division),
//! `restart` (the proxy with `--data-dir` and nginx with its on-disk cache, each warmed,
//! restarted by SIGTERM and by SIGKILL, then loaded: what the first minute costs upstream).
//! The full run writes `BENCHMARKS.md` (keeping its hand-written part, everything after
//! the `HAND-WRITTEN` marker) and the nginx
//! configurations it used to `bench/nginx-*.generated.conf`; `--quick` (the CI smoke test)
//! and `--only` write under `target/bench-report/` instead. Missed targets are reported, never a failure: timings on
//! shared machines are noisy. A step that fails (a process that does not start, a status
//! code that is deterministic and wrong) makes the run exit non-zero. Every child process
//! and the temporary directory are cleaned up however the run ends.
//!
//! Modules: `procs` (child processes, `/proc` readings, the redis-server the replicas
//! scenario shares), `client` (the client side of bursts: one raw connection per lookup),
//! `sim` (the simulator and its clock), `suite` (the run's state and the contenders it
//! starts: the proxy, nginx), `wrk` (cache-hit load), `scrape` (the proxy's own metrics),
//! `stats` (percentiles and formatting), `report` (`BENCHMARKS.md`), and `scenario`, one
//! module per scenario. This file holds the command line, the plan (how big each scenario
//! is) and the run order.
#![forbid(unsafe_code)]

mod client;
mod procs;
mod report;
mod scenario;
mod scrape;
mod sim;
mod stats;
mod suite;
mod wrk;

use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};

use crate::procs::{Workspace, on_path, proxy_bin};
use crate::report::{Verdict, load_average, machine_facts, render, write_report};
use crate::sim::Sim;
use crate::suite::Suite;

/// The binary's allocator, so that the memory scenario measures what the proxy would hold.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const SCENARIOS: [&str; 10] = [
    "burst",
    "identical",
    "hits",
    "overload",
    "telemetry",
    "memory",
    "replicas",
    "network",
    "redis-down",
    "restart",
];

/// The workspace's root (this crate is `crates/bench`): where `target/`, `bench/` and
/// `BENCHMARKS.md` are.
fn manifest_dir() -> PathBuf {
    let here = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    here.join("../..").canonicalize().unwrap_or(here)
}

/// Seconds since the harness started: the clock of every client-side timestamp.
fn now_s() -> f64 {
    static BASE: OnceLock<Instant> = OnceLock::new();
    BASE.get_or_init(Instant::now).elapsed().as_secs_f64()
}

// ---------------------------------------------------------------------------------------
// Command line and plan
// ---------------------------------------------------------------------------------------

struct Args {
    quick: bool,
    only: Option<Vec<String>>,
    out: Option<PathBuf>,
    memory_child: Option<usize>,
    store: String,
}

const USAGE: &str =
    "usage: cargo run --release -p score-bench -- [--quick] [--only SCENARIO[,SCENARIO...]] [--out PATH]
scenarios: burst, identical, hits, overload, telemetry, memory, replicas, network,
redis-down, restart
the proxy binary is target/release/score-proxy (build it with `cargo build --release`)
or $SCORE_PROXY_BIN; nginx and wrk must be on PATH (apt-get install -y nginx wrk), and
redis-server for the replicas and redis-down scenarios (apt-get install -y redis-server)";

fn parse_args() -> Result<Args> {
    let mut args = Args {
        quick: false,
        only: None,
        out: None,
        memory_child: None,
        store: "proxy".into(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f.to_owned(), Some(v.to_owned())),
            _ => (arg.clone(), None),
        };
        let mut value = |name: &str| -> Result<String> {
            inline
                .clone()
                .or_else(|| it.next())
                .with_context(|| format!("{name} needs a value\n{USAGE}"))
        };
        match flag.as_str() {
            // `cargo bench` passes `--bench` to every bench target.
            "--bench" => {}
            "--quick" => args.quick = true,
            "--only" => {
                let list: Vec<String> = value("--only")?
                    .split(',')
                    .map(|s| s.trim().to_owned())
                    .filter(|s| !s.is_empty())
                    .collect();
                for s in &list {
                    ensure!(
                        SCENARIOS.contains(&s.as_str()),
                        "unknown scenario '{s}'\n{USAGE}"
                    );
                }
                args.only = Some(list);
            }
            "--out" => args.out = Some(PathBuf::from(value("--out")?)),
            "--store" => args.store = value("--store")?,
            "--memory-child" => {
                args.memory_child = Some(value("--memory-child")?.parse()?);
            }
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => bail!("unknown argument '{other}'\n{USAGE}"),
        }
    }
    Ok(args)
}

/// How big each scenario is: the issue's sizes in a full run, small ones in `--quick`.
struct Plan {
    quick: bool,
    /// (distinct lookups, upstream latency in ms)
    bursts: Vec<(usize, u64)>,
    identical: usize,
    hit_keysets: Vec<usize>,
    wrk_threads: u32,
    wrk_connections: u32,
    wrk_seconds: u32,
    /// Alternating measurement rounds (proxy, nginx, proxy, nginx...).
    rounds: usize,
    overload_clients: usize,
    overload_timeout: Duration,
    /// How long the upstream is watched after the overload's clients have given up.
    overload_watch: Duration,
    memory_entries: usize,
    /// Bursts spread over three replicas, and through one process: (distinct lookups,
    /// upstream latency in ms).
    replica_bursts: Vec<(usize, u64)>,
    /// Lookups of one new key sent to each replica at once (cross-replica coalescing).
    coalesce_per_replica: usize,
    /// Scenario 8: the burst of distinct lookups across the 0..30 ms and loopback networks,
    /// and across the spiky one (where the target is per 100 calls).
    network_burst: usize,
    network_spikes_burst: usize,
    /// Scenario 8's steady stream across the 0..30 ms network (none in `--quick`), and its
    /// clients.
    network_steady: Option<Duration>,
    network_steady_clients: usize,
    /// Scenario 9: distinct lookups in each burst over the three replicas (`--quick` runs
    /// case (a) only).
    redis_down_burst: usize,
    /// Scenario 10: the working set (distinct keys, each warmed once), the steady load after
    /// each restart (how long, how many clients, and the pause between one client's
    /// lookups).
    restart_keys: usize,
    restart_window: Duration,
    restart_clients: usize,
    restart_period: Duration,
}

impl Plan {
    fn new(quick: bool) -> Self {
        if quick {
            Plan {
                quick,
                bursts: vec![(5, 0), (5, 500)],
                identical: 200,
                hit_keysets: vec![1, 1000],
                wrk_threads: 2,
                wrk_connections: 32,
                wrk_seconds: 2,
                rounds: 1,
                overload_clients: 300,
                overload_timeout: Duration::from_secs(2),
                overload_watch: Duration::from_secs(3),
                memory_entries: 100_000,
                replica_bursts: vec![(6, 0)],
                coalesce_per_replica: 3,
                network_burst: 10,
                network_spikes_burst: 10,
                network_steady: None,
                network_steady_clients: 3,
                redis_down_burst: 9,
                restart_keys: 20,
                restart_window: Duration::from_secs(5),
                restart_clients: 2,
                restart_period: Duration::from_millis(10),
            }
        } else {
            Plan {
                quick,
                bursts: vec![(20, 0), (20, 500), (60, 0), (60, 500)],
                identical: 1000,
                hit_keysets: vec![1, 10_000],
                wrk_threads: 2,
                wrk_connections: 64,
                wrk_seconds: 10,
                rounds: 3,
                overload_clients: 2000,
                overload_timeout: Duration::from_secs(2),
                overload_watch: Duration::from_secs(25),
                memory_entries: 1_000_000,
                replica_bursts: vec![(20, 0), (20, 500), (60, 0)],
                coalesce_per_replica: 20,
                network_burst: 60,
                network_spikes_burst: 100,
                network_steady: Some(Duration::from_secs(180)),
                network_steady_clients: 3,
                redis_down_burst: 30,
                restart_keys: 200,
                restart_window: Duration::from_secs(60),
                restart_clients: 4,
                restart_period: Duration::from_millis(10),
            }
        }
    }

    fn wrk_args(&self) -> String {
        format!(
            "-t{} -c{} -d{}s",
            self.wrk_threads, self.wrk_connections, self.wrk_seconds
        )
    }
}

// ---------------------------------------------------------------------------------------
// Main
// ---------------------------------------------------------------------------------------

async fn run(args: Args) -> Result<()> {
    let started = Instant::now();
    now_s();
    let plan = Plan::new(args.quick);
    let scenarios: Vec<&str> = SCENARIOS
        .iter()
        .copied()
        .filter(|s| args.only.as_ref().is_none_or(|o| o.iter().any(|x| x == s)))
        .collect();
    let partial = plan.quick || args.only.is_some();
    let report_dir = manifest_dir().join("target/bench-report");
    let out = args.out.clone().unwrap_or_else(|| {
        if partial {
            report_dir.join("BENCHMARKS.md")
        } else {
            manifest_dir().join("BENCHMARKS.md")
        }
    });
    let conf_dir = if partial {
        report_dir.clone()
    } else {
        manifest_dir().join("bench")
    };

    let bin = proxy_bin()?;
    if scenarios
        .iter()
        .any(|s| !matches!(*s, "memory" | "redis-down"))
    {
        on_path("nginx").context(
            "nginx is not on PATH: install it with `apt-get install -y nginx` (CI does)",
        )?;
    }
    if scenarios
        .iter()
        .any(|s| matches!(*s, "replicas" | "redis-down"))
    {
        on_path("redis-server").context(
            "redis-server is not on PATH: the replicas scenarios need it \
             (`apt-get install -y redis-server`; scripts/install-deps.sh installs it)",
        )?;
    }
    if scenarios.iter().any(|s| matches!(*s, "hits" | "telemetry")) {
        on_path("wrk")
            .context("wrk is not on PATH: install it with `apt-get install -y wrk` (CI does)")?;
    }
    let facts = machine_facts();
    println!(
        "compare: {} run of {} with {}",
        if plan.quick { "quick" } else { "full" },
        scenarios.join(", "),
        bin.display()
    );

    let ws = Workspace::new()?;
    let client = client::client()?;
    let sim = Sim::start(
        &bin.with_file_name("score-sim"),
        &ws,
        &client,
        "simulator.log",
    )
    .await?;
    println!(
        "compare: simulator on port {} (clock offset measured to ±{:.2} ms)",
        sim.port,
        sim.offset_error * 1e3
    );
    let mut suite = Suite::new(plan, bin, ws, client, sim, conf_dir);
    for s in &scenarios {
        let t = Instant::now();
        let load_before = load_average();
        match *s {
            "burst" => scenario::burst::run(&mut suite).await,
            "identical" => scenario::identical::run(&mut suite).await,
            "hits" => scenario::hits::run(&mut suite).await,
            "overload" => scenario::overload::run(&mut suite).await,
            "telemetry" => scenario::telemetry::run(&mut suite).await,
            "memory" => scenario::memory::run(&mut suite).await,
            "replicas" => scenario::replicas::run(&mut suite).await,
            "network" => scenario::network::run(&mut suite).await,
            "redis-down" => scenario::redis_down::run(&mut suite).await,
            "restart" => scenario::restart::run(&mut suite).await,
            _ => unreachable!("scenario names are checked when parsed"),
        }
        .with_context(|| format!("scenario {s}"))?;
        if let Some((_, body)) = suite.report.sections.last_mut() {
            let _ = write!(
                body,
                "\n_Load average (1 min) on the machine: {load_before} when this scenario \
                 started, {} when it ended (2 cores)._\n",
                load_average()
            );
        }
        println!("   ({s} took {:.0} s)", t.elapsed().as_secs_f64());
        if let Some(status) = suite.sim.proc.exited() {
            bail!(
                "the simulator exited ({status}) during {s}; its log:\n{}",
                suite.sim.proc.log_tail()
            );
        }
    }
    let generated = render(
        &suite.plan,
        &suite.report,
        &suite.written_confs,
        &facts,
        &scenarios,
        started.elapsed(),
    );
    write_report(&out, &generated)?;
    let missed = suite
        .report
        .targets
        .iter()
        .filter(|t| t.verdict == Verdict::Missed)
        .count();
    println!(
        "compare: done in {:.0} s; {} targets, {missed} missed (reported, not a failure); \
         report written to {}",
        started.elapsed().as_secs_f64(),
        suite.report.targets.len(),
        out.display()
    );
    Ok(())
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("compare: {e:#}");
            return ExitCode::from(2);
        }
    };
    if let Some(n) = args.memory_child {
        return scenario::memory::memory_child(n, &args.store);
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("compare: cannot start the tokio runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(run(args));
    // Stops the sink and any task still holding a connection before the exit code is set.
    runtime.shutdown_timeout(Duration::from_secs(2));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("compare: FAILED: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Shows a progress line that has no newline yet.
fn flush() {
    use std::io::Write;
    let _ = std::io::stdout().flush();
}
