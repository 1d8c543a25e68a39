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
//! `redis-server` started here, against one process). The full run writes `BENCHMARKS.md` (keeping its hand-written part,
//! everything after the `HAND-WRITTEN` marker) and the nginx configurations it used to
//! `bench/nginx-*.generated.conf`; `--quick` (the CI smoke test) and `--only` write under
//! `target/bench-report/` instead. Missed targets are reported, never a failure: timings on
//! shared machines are noisy. A step that fails (a process that does not start, a status
//! code that is deterministic and wrong) makes the run exit non-zero. Every child process
//! and the temporary directory are cleaned up however the run ends.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::fs;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::Arc;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;
use score_proxy::lookup::cache::{CacheConfig, CachedScore, LocalCache, ScoreCache};
use score_sim::SimStats;
use score_validation::{Cpf, parse_lookup};

/// The binary's allocator, so that the memory scenario measures what the proxy would hold.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const SCENARIOS: [&str; 7] = [
    "burst",
    "identical",
    "hits",
    "overload",
    "telemetry",
    "memory",
    "replicas",
];

/// The nginx configuration, with `{{PLACEHOLDERS}}` for paths, ports, rate and burst.
const NGINX_TEMPLATE: &str = include_str!("../../../bench/nginx.conf.template");

/// The client id every benchmark lookup carries.
const CLIENT_ID: &str = "bench-client";

/// The proxy's defaults that the targets are stated against (see `src/config.rs`).
const PROXY_RATE_GUARD: Duration = Duration::from_millis(10);

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
scenarios: burst, identical, hits, overload, telemetry, memory, replicas
the proxy binary is target/release/score-proxy (build it with `cargo build --release`)
or $SCORE_PROXY_BIN; nginx and wrk must be on PATH (apt-get install -y nginx wrk), and
redis-server for the replicas scenario (apt-get install -y redis-server)";

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
// Processes, ports, temporary directory
// ---------------------------------------------------------------------------------------

/// The run's temporary directory; removed when dropped.
struct Workspace {
    dir: PathBuf,
}

impl Workspace {
    fn new() -> Result<Self> {
        let dir = std::env::temp_dir().join(format!(
            "score-proxy-bench-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis())
                .unwrap_or_default()
        ));
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(Workspace { dir })
    }

    fn subdir(&self, name: &str) -> Result<PathBuf> {
        let d = self.dir.join(name);
        fs::create_dir_all(&d).with_context(|| format!("creating {}", d.display()))?;
        Ok(d)
    }
}

impl Drop for Workspace {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// A child process that is stopped when dropped. nginx is stopped through its master
/// (SIGTERM, so that it takes its workers with it), then anything left is killed.
struct Proc {
    name: String,
    child: Child,
    log: PathBuf,
    nginx: bool,
}

impl Proc {
    fn spawn(name: &str, mut cmd: Command, log: PathBuf, nginx: bool) -> Result<Proc> {
        let out = fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let err = out.try_clone()?;
        cmd.stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err));
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {name} ({cmd:?})"))?;
        Ok(Proc {
            name: name.to_owned(),
            child,
            log,
            nginx,
        })
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    fn log_tail(&self) -> String {
        let text = fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    /// The process and its descendants (nginx's workers, cache manager and loader).
    fn tree(&self) -> Vec<u32> {
        let mut all = vec![self.pid()];
        let mut i = 0;
        while i < all.len() {
            all.extend(children_of(all[i]));
            i += 1;
        }
        all
    }

    /// Peak resident memory (VmHWM) of the process and its descendants, in bytes.
    fn peak_rss(&self) -> u64 {
        self.tree()
            .iter()
            .filter_map(|&p| proc_status_kb(p, "VmHWM:"))
            .sum::<u64>()
            * 1024
    }

    /// CPU time (user + system) used so far by the process and its descendants, in seconds.
    fn cpu_seconds(&self) -> f64 {
        self.tree().iter().map(|&p| proc_cpu_seconds(p)).sum()
    }

    /// As [`Proc::cpu_seconds`], to the nanosecond: the run time of every live thread
    /// (`/proc/PID/task/TID/schedstat`), where `/proc/PID/stat` counts 10 ms ticks. Threads
    /// that have exited are not counted: for short measurements of long-lived processes.
    fn cpu_seconds_fine(&self) -> f64 {
        let mut ns = 0u64;
        for pid in self.tree() {
            let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else {
                continue;
            };
            for task in tasks.flatten() {
                ns += fs::read_to_string(task.path().join("schedstat"))
                    .ok()
                    .and_then(|t| t.split_whitespace().next()?.parse::<u64>().ok())
                    .unwrap_or(0);
            }
        }
        ns as f64 / 1e9
    }

    fn rss(&self) -> u64 {
        self.tree()
            .iter()
            .filter_map(|&p| proc_status_kb(p, "VmRSS:"))
            .sum::<u64>()
            * 1024
    }

    fn stop(&mut self) {
        if self.exited().is_some() {
            return;
        }
        if self.nginx {
            let tree = self.tree();
            signal(self.pid(), "TERM");
            let until = Instant::now() + Duration::from_secs(5);
            while Instant::now() < until && self.exited().is_none() {
                std::thread::sleep(Duration::from_millis(20));
            }
            for pid in tree.into_iter().skip(1) {
                if Path::new(&format!("/proc/{pid}")).exists() {
                    signal(pid, "KILL");
                }
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop();
    }
}

fn signal(pid: u32, sig: &str) {
    let _ = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

fn children_of(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    if let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) {
        for task in tasks.flatten() {
            if let Ok(text) = fs::read_to_string(task.path().join("children")) {
                out.extend(
                    text.split_whitespace()
                        .filter_map(|s| s.parse::<u32>().ok()),
                );
            }
        }
    }
    out
}

/// Clock ticks per second of `/proc/PID/stat`'s times (`getconf CLK_TCK`, 100 on Linux).
fn clock_ticks() -> f64 {
    static TICKS: OnceLock<f64> = OnceLock::new();
    *TICKS.get_or_init(|| {
        command_output("getconf", &["CLK_TCK"])
            .parse()
            .unwrap_or(100.0)
    })
}

fn proc_cpu_seconds(pid: u32) -> f64 {
    let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // Fields after the command name (which may hold spaces, hence the last ')'):
    // state is field 3, utime 14 and stime 15.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        f.get(i - 3)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (ticks(14) + ticks(15)) / clock_ticks()
}

/// Connections the kernel dropped because a listen backlog was full (machine-wide
/// `TcpExt: ListenOverflows`): each costs its client a 1 s SYN retransmission.
fn listen_overflows() -> u64 {
    let text = fs::read_to_string("/proc/net/netstat").unwrap_or_default();
    let mut lines = text.lines().filter(|l| l.starts_with("TcpExt:"));
    let (Some(names), Some(values)) = (lines.next(), lines.next()) else {
        return 0;
    };
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(n, _)| *n == "ListenOverflows")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0)
}

fn proc_status_kb(pid: u32, field: &str) -> Option<u64> {
    let text = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    text.lines()
        .find(|l| l.starts_with(field))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// A free loopback port (bound and released: another process could take it in between,
/// in which case the server that wanted it fails to start and the run says so).
fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/sbin")])
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

fn proxy_bin() -> Result<PathBuf> {
    let bin = std::env::var_os("SCORE_PROXY_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| manifest_dir().join("target/release/score-proxy"));
    ensure!(
        bin.is_file(),
        "the proxy binary {} does not exist: build it first with `cargo build --release` \
         (or point SCORE_PROXY_BIN at one); scripts/bench.sh does both",
        bin.display()
    );
    // A stale binary would benchmark old code: say so loudly (not fatal, it may be wanted).
    if let Ok(built) = fs::metadata(&bin).and_then(|m| m.modified()) {
        let newest_src = newest_mtime(&manifest_dir().join("src"));
        if newest_src.is_some_and(|src| src > built) {
            eprintln!(
                "compare: WARNING: {} is older than src/: run `cargo build --release` first",
                bin.display()
            );
        }
    }
    Ok(bin)
}

fn newest_mtime(dir: &Path) -> Option<std::time::SystemTime> {
    let mut newest = None;
    for entry in fs::read_dir(dir).ok()?.flatten() {
        let p = entry.path();
        let t = if p.is_dir() {
            newest_mtime(&p)
        } else {
            entry.metadata().ok().and_then(|m| m.modified().ok())
        };
        newest = newest.max(t);
    }
    newest
}

// ---------------------------------------------------------------------------------------
// HTTP client side
// ---------------------------------------------------------------------------------------

fn client() -> Result<reqwest::Client> {
    Ok(reqwest::Client::builder()
        .no_proxy()
        .pool_idle_timeout(Duration::from_secs(5))
        .tcp_nodelay(true)
        .build()?)
}

#[derive(Clone, Debug)]
enum Outcome {
    Status(u16),
    Timeout,
    Error(String),
}

/// One lookup as the client saw it. Times are [`now_s`] seconds.
#[derive(Clone, Debug)]
struct Sample {
    cpf: String,
    start: f64,
    /// When the request was written (the connection was up); `None` if it never was.
    sent: Option<f64>,
    end: f64,
    outcome: Outcome,
    /// The answer's `X-Cache` and `Retry-After` headers, when it had them.
    x_cache: Option<String>,
    retry_after: Option<String>,
    /// Which of the targets it was sent to (0 when there is one).
    target: usize,
}

impl Sample {
    fn status(&self) -> Option<u16> {
        match self.outcome {
            Outcome::Status(s) => Some(s),
            _ => None,
        }
    }
    /// From the first connection attempt to the end of the answer.
    fn latency(&self) -> f64 {
        self.end - self.start
    }

    /// From the request written to the end of the answer: the server's part.
    fn after_connect(&self) -> f64 {
        self.sent.map_or(f64::NAN, |sent| self.end - sent)
    }
}

/// Sends every lookup at once (all tasks wait on a barrier, then go), each on its own
/// connection, and collects what each got. Returns the launch time, the samples, and how
/// many connection attempts the kernel dropped meanwhile for a full listen backlog
/// (machine-wide, see [`listen_overflows`]).
async fn fire(base: &str, cpfs: &[String], timeout: Duration) -> (f64, Vec<Sample>, u64) {
    fire_spread(&[base.to_owned()], cpfs, timeout).await
}

/// As [`fire`], lookup i going to `bases[i % bases.len()]` (round robin over replicas).
async fn fire_spread(
    bases: &[String],
    cpfs: &[String],
    timeout: Duration,
) -> (f64, Vec<Sample>, u64) {
    let overflows = listen_overflows();
    let addrs: Vec<Arc<str>> = bases
        .iter()
        .map(|b| Arc::from(b.trim_start_matches("http://")))
        .collect();
    let barrier = Arc::new(tokio::sync::Barrier::new(cpfs.len() + 1));
    let mut tasks = Vec::with_capacity(cpfs.len());
    for (i, cpf) in cpfs.iter().enumerate() {
        let path = lookup_path(cpf);
        let target = i % addrs.len();
        let addr = addrs[target].clone();
        let barrier = barrier.clone();
        let cpf = cpf.clone();
        tasks.push(tokio::spawn(async move {
            barrier.wait().await;
            let start = now_s();
            let (sent, outcome, head) = raw_lookup(&addr, &path, timeout).await;
            Sample {
                cpf,
                start,
                sent,
                end: now_s(),
                outcome,
                x_cache: head.x_cache,
                retry_after: head.retry_after,
                target,
            }
        }));
    }
    barrier.wait().await;
    let launched = now_s();
    let mut samples = Vec::with_capacity(tasks.len());
    for t in tasks {
        if let Ok(s) = t.await {
            samples.push(s);
        }
    }
    (
        launched,
        samples,
        listen_overflows().saturating_sub(overflows),
    )
}

/// The answer headers the harness looks at.
#[derive(Default)]
struct Head {
    x_cache: Option<String>,
    retry_after: Option<String>,
}

impl Head {
    fn parse(answer: &[u8]) -> Head {
        let end = answer
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .unwrap_or(answer.len());
        let mut head = Head::default();
        for line in String::from_utf8_lossy(&answer[..end]).lines().skip(1) {
            if let Some((name, value)) = line.split_once(':') {
                let value = Some(value.trim().to_owned());
                if name.eq_ignore_ascii_case("x-cache") {
                    head.x_cache = value;
                } else if name.eq_ignore_ascii_case("retry-after") {
                    head.retry_after = value;
                }
            }
        }
        head
    }
}

/// One lookup over a fresh connection with `Connection: close`, by hand rather than through
/// an HTTP client library, so that the time the request was sent (connection set up) is
/// known apart from the time of the answer. The whole exchange gets `timeout`; when it runs
/// out the connection is dropped, which is how a real client gives up.
async fn raw_lookup(addr: &str, path: &str, timeout: Duration) -> (Option<f64>, Outcome, Head) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let deadline = tokio::time::Instant::now() + timeout;
    let send = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        let request = format!(
            "GET {path} HTTP/1.1\r\nHost: {addr}\r\nAccept: application/json\r\n\
             Connection: close\r\n\r\n"
        );
        stream.write_all(request.as_bytes()).await?;
        Ok::<_, std::io::Error>(stream)
    };
    let mut stream = match tokio::time::timeout_at(deadline, send).await {
        Err(_) => return (None, Outcome::Timeout, Head::default()),
        Ok(Err(e)) => {
            return (
                None,
                Outcome::Error(format!("connect/send: {e}")),
                Head::default(),
            );
        }
        Ok(Ok(stream)) => stream,
    };
    let sent = Some(now_s());
    let mut answer = Vec::with_capacity(1024);
    let outcome = match tokio::time::timeout_at(deadline, stream.read_to_end(&mut answer)).await {
        Err(_) => Outcome::Timeout,
        Ok(Err(e)) => Outcome::Error(format!("read: {e}")),
        Ok(Ok(_)) => {
            // "HTTP/1.1 200 OK": the status is the second word of the first line.
            let status = std::str::from_utf8(&answer[..answer.len().min(32)])
                .ok()
                .and_then(|head| head.split_whitespace().nth(1))
                .and_then(|code| code.parse::<u16>().ok());
            match status {
                Some(code) => Outcome::Status(code),
                None if answer.is_empty() => Outcome::Error("closed without an answer".into()),
                None => Outcome::Error("not an HTTP answer".into()),
            }
        }
    };
    (sent, outcome, Head::parse(&answer))
}

/// Looks every key up once, `concurrency` at a time, and insists on a `200` for each.
async fn warm(
    client: &reqwest::Client,
    base: &str,
    paths: &[String],
    concurrency: usize,
) -> Result<()> {
    let results: Vec<Result<()>> = futures_util::stream::iter(paths.iter().cloned())
        .map(|path| {
            let client = client.clone();
            let url = format!("{base}{path}");
            async move {
                let resp = client
                    .get(&url)
                    .timeout(Duration::from_secs(30))
                    .send()
                    .await
                    .with_context(|| format!("warming {url}"))?;
                let status = resp.status();
                let body = resp.bytes().await?;
                ensure!(
                    status == 200,
                    "warming {url}: {status} {}",
                    String::from_utf8_lossy(&body)
                );
                Ok(())
            }
        })
        .buffer_unordered(concurrency)
        .collect()
        .await;
    results.into_iter().collect()
}

async fn wait_ready(client: &reqwest::Client, url: &str, proc: &mut Proc) -> Result<()> {
    let until = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(status) = proc.exited() {
            bail!(
                "{} exited ({status}) before it was ready; its log:\n{}",
                proc.name,
                proc.log_tail()
            );
        }
        if let Ok(resp) = client
            .get(url)
            .timeout(Duration::from_millis(500))
            .send()
            .await
            && resp.status().is_success()
        {
            return Ok(());
        }
        if Instant::now() > until {
            bail!(
                "{} did not answer {url} within 20 s; its log:\n{}",
                proc.name,
                proc.log_tail()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Distinct valid CPFs, never repeated within a run (so no run sees another's cache).
fn next_cpfs(n: usize) -> Vec<String> {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        let i = NEXT.fetch_add(1, Ordering::Relaxed);
        if let Some(cpf) = Cpf::from_base(200_000_000 + i * 37) {
            out.push(cpf.to_string());
        }
    }
    out
}

fn lookup_path(cpf: &str) -> String {
    format!("/proxy/score?cpf={cpf}&client_id={CLIENT_ID}")
}

// ---------------------------------------------------------------------------------------
// The simulator
// ---------------------------------------------------------------------------------------

struct Sim {
    base: String,
    port: u16,
    client: reqwest::Client,
    /// Simulator clock minus harness clock ([`now_s`]), in seconds.
    offset: f64,
    /// Half the round trip of the probe that measured `offset`: its uncertainty.
    offset_error: f64,
    proc: Proc,
}

impl Sim {
    async fn start(bin: &Path, ws: &Workspace, client: &reqwest::Client) -> Result<Sim> {
        let port = free_port()?;
        let mut cmd = Command::new(bin);
        cmd.env_clear()
            .env("RUST_LOG", "off")
            .args(["--listen", &format!("127.0.0.1:{port}")]);
        let mut proc = Proc::spawn(
            "the upstream simulator",
            cmd,
            ws.dir.join("simulator.log"),
            false,
        )?;
        let base = format!("http://127.0.0.1:{port}");
        wait_ready(client, &format!("{base}/health"), &mut proc).await?;
        let mut sim = Sim {
            base,
            port,
            client: client.clone(),
            offset: 0.0,
            offset_error: 0.0,
            proc,
        };
        sim.measure_offset().await?;
        Ok(sim)
    }

    /// Aligns the simulator's arrival clock with ours: five direct probe calls, keeping the
    /// one with the shortest round trip (its arrival is stamped between send and answer).
    async fn measure_offset(&mut self) -> Result<()> {
        self.configure(0, 0).await?;
        let mut best: Option<(f64, f64)> = None;
        for cpf in next_cpfs(5) {
            self.reset().await?;
            let t0 = now_s();
            let resp = self
                .client
                .get(format!("{}/api/score?cpf={cpf}", self.base))
                .header("client-id", CLIENT_ID)
                .send()
                .await?;
            ensure!(resp.status() == 200, "simulator probe: {}", resp.status());
            let t1 = now_s();
            let stats = self.stats().await?;
            let at = stats
                .arrivals
                .iter()
                .find(|a| a.cpf == cpf)
                .context("the probe's arrival is not in the simulator's record")?
                .at
                .as_secs_f64();
            let rtt = t1 - t0;
            if best.is_none_or(|(r, _)| rtt < r) {
                best = Some((rtt, at - (t0 + t1) / 2.0));
            }
        }
        let (rtt, offset) = best.context("no probe")?;
        self.offset = offset;
        self.offset_error = rtt / 2.0;
        self.reset().await
    }

    async fn configure(&self, latency_ms: u64, min_interval_ms: u64) -> Result<()> {
        let body = serde_json::json!({
            "latency_ms": latency_ms,
            "min_interval_ms": min_interval_ms,
            "penalty_ms": 2000,
            "fault": "none",
        });
        let resp = self
            .client
            .put(format!("{}/__sim/config", self.base))
            .header("content-type", "application/json")
            .body(body.to_string())
            .send()
            .await?;
        ensure!(
            resp.status() == 200,
            "configuring the simulator: {}",
            resp.status()
        );
        Ok(())
    }

    async fn reset(&self) -> Result<()> {
        let resp = self
            .client
            .post(format!("{}/__sim/reset", self.base))
            .send()
            .await?;
        ensure!(
            resp.status().is_success(),
            "simulator reset: {}",
            resp.status()
        );
        Ok(())
    }

    async fn stats(&self) -> Result<SimStats> {
        let resp = self
            .client
            .get(format!("{}/__sim/stats", self.base))
            .send()
            .await?;
        ensure!(resp.status() == 200, "simulator stats: {}", resp.status());
        let body = resp.bytes().await?;
        serde_json::from_slice(&body).context("parsing /__sim/stats")
    }

    /// An arrival's time on the harness clock.
    fn to_harness(&self, at: Duration) -> f64 {
        at.as_secs_f64() - self.offset
    }
}

// ---------------------------------------------------------------------------------------
// Contenders
// ---------------------------------------------------------------------------------------

#[derive(Clone, Debug)]
enum Rival {
    Proxy,
    Nginx { rate: &'static str, burst: u32 },
}

#[derive(Clone, Debug)]
struct Contender {
    label: &'static str,
    rival: Rival,
    /// Upstream calls per second the contender is configured for.
    rate: f64,
}

fn paced_contenders() -> Vec<Contender> {
    vec![
        Contender {
            label: "score-proxy",
            rival: Rival::Proxy,
            rate: 1.0,
        },
        Contender {
            label: "nginx 1r/s",
            rival: Rival::Nginx {
                rate: "1r/s",
                burst: 20,
            },
            rate: 1.0,
        },
        Contender {
            label: "nginx 59r/m",
            rival: Rival::Nginx {
                rate: "59r/m",
                burst: 20,
            },
            rate: 59.0 / 60.0,
        },
    ]
}

/// A running contender; its processes stop when this is dropped.
struct Running {
    label: String,
    base: String,
    proc: Proc,
}

struct Suite {
    plan: Plan,
    bin: PathBuf,
    ws: Workspace,
    client: reqwest::Client,
    sim: Sim,
    conf_dir: PathBuf,
    written_confs: Vec<PathBuf>,
    instances: AtomicU64,
    report: Report,
}

/// How the proxy's telemetry is set up for one run (scenario 5 compares them).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Telemetry {
    /// `SCORE_PROXY_METRICS=false RUST_LOG=off`, no OTLP endpoint.
    Off,
    /// `SCORE_PROXY_METRICS=true RUST_LOG=off`.
    Metrics,
    /// Metrics, and every span exported to the harness's OTLP sink.
    Tracing(u16),
    /// Metrics and tracing, one trace in ten sampled (`parentbased_traceidratio`, 0.1).
    Sampled(u16),
    /// The shipped default: metrics, and the access log at `info` (to a file).
    Default,
}

impl Telemetry {
    fn label(self) -> &'static str {
        match self {
            Telemetry::Off => "off",
            Telemetry::Metrics => "metrics only",
            Telemetry::Tracing(_) => "metrics + tracing (always_on, OTLP)",
            Telemetry::Sampled(_) => "metrics + tracing (parentbased_traceidratio 0.1, OTLP)",
            Telemetry::Default => "default (metrics + access log at info)",
        }
    }

    fn env(self) -> Vec<(&'static str, String)> {
        match self {
            Telemetry::Off => vec![
                ("SCORE_PROXY_METRICS", "false".into()),
                ("RUST_LOG", "off".into()),
            ],
            Telemetry::Metrics => vec![
                ("SCORE_PROXY_METRICS", "true".into()),
                ("RUST_LOG", "off".into()),
            ],
            Telemetry::Tracing(port) => vec![
                ("SCORE_PROXY_METRICS", "true".into()),
                ("RUST_LOG", "off".into()),
                (
                    "OTEL_EXPORTER_OTLP_ENDPOINT",
                    format!("http://127.0.0.1:{port}"),
                ),
                ("OTEL_TRACES_SAMPLER", "always_on".into()),
            ],
            Telemetry::Sampled(port) => vec![
                ("SCORE_PROXY_METRICS", "true".into()),
                ("RUST_LOG", "off".into()),
                (
                    "OTEL_EXPORTER_OTLP_ENDPOINT",
                    format!("http://127.0.0.1:{port}"),
                ),
                ("OTEL_TRACES_SAMPLER", "parentbased_traceidratio".into()),
                ("OTEL_TRACES_SAMPLER_ARG", "0.1".into()),
            ],
            Telemetry::Default => vec![("SCORE_PROXY_METRICS", "true".into())],
        }
    }
}

impl Suite {
    fn instance_dir(&self, what: &str) -> Result<PathBuf> {
        let n = self.instances.fetch_add(1, Ordering::Relaxed);
        self.ws.subdir(&format!("{what}-{n}"))
    }

    async fn start(&mut self, c: &Contender) -> Result<Running> {
        match &c.rival {
            Rival::Proxy => self.start_proxy(c.label, &[], Telemetry::Metrics).await,
            Rival::Nginx { rate, burst } => self.start_nginx(c.label, rate, *burst).await,
        }
    }

    /// The release binary, on a free port, in front of the simulator. `extra` flags come
    /// after the defaults; the environment is cleared and then set from `telemetry`.
    async fn start_proxy(
        &self,
        label: &str,
        extra: &[&str],
        telemetry: Telemetry,
    ) -> Result<Running> {
        let dir = self.instance_dir("proxy")?;
        let port = free_port()?;
        let mut cmd = Command::new(&self.bin);
        cmd.env_clear();
        for (k, v) in telemetry.env() {
            cmd.env(k, v);
        }
        cmd.args([
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--upstream-url",
            &format!("http://127.0.0.1:{}/api/score", self.sim.port),
        ])
        .args(extra);
        let mut proc = Proc::spawn(label, cmd, dir.join("proxy.log"), false)?;
        let base = format!("http://127.0.0.1:{port}");
        wait_ready(&self.client, &format!("{base}/health"), &mut proc).await?;
        Ok(Running {
            label: label.to_owned(),
            base,
            proc,
        })
    }

    fn nginx_conf(&self, prefix: &Path, outer: u16, inner: u16, rate: &str, burst: u32) -> String {
        NGINX_TEMPLATE
            .replace("{{PREFIX}}", &prefix.display().to_string())
            .replace("{{OUTER_PORT}}", &outer.to_string())
            .replace("{{INNER_PORT}}", &inner.to_string())
            .replace("{{SIM_PORT}}", &self.sim.port.to_string())
            .replace("{{RATE}}", rate)
            .replace("{{BURST}}", &burst.to_string())
    }

    async fn start_nginx(&mut self, label: &str, rate: &str, burst: u32) -> Result<Running> {
        let nginx =
            on_path("nginx").context("nginx is not installed (apt-get install -y nginx)")?;
        let dir = self.instance_dir("nginx")?;
        let (outer, inner) = (free_port()?, free_port()?);
        let conf = self.nginx_conf(&dir, outer, inner, rate, burst);
        let conf_path = dir.join("nginx.conf");
        fs::write(&conf_path, &conf)?;
        // The exact configuration used, next to the report (once per rate).
        let kept = self.conf_dir.join(format!(
            "nginx-{}.generated.conf",
            rate.replace('/', "-per-")
        ));
        if !self.written_confs.contains(&kept) {
            fs::create_dir_all(&self.conf_dir)?;
            fs::write(
                &kept,
                format!(
                    "# Generated by benches/compare.rs from bench/nginx.conf.template for the\n\
                     # \"{label}\" runs; paths and ports are those of the run that wrote it.\n{conf}"
                ),
            )?;
            self.written_confs.push(kept);
        }
        let mut cmd = Command::new(nginx);
        cmd.arg("-p")
            .arg(&dir)
            .arg("-e")
            .arg(dir.join("error.log"))
            .arg("-c")
            .arg(&conf_path)
            .args(["-g", "daemon off;"]);
        let mut proc = Proc::spawn(label, cmd, dir.join("nginx.out"), true)?;
        let base = format!("http://127.0.0.1:{outer}");
        wait_ready(&self.client, &format!("{base}/health"), &mut proc)
            .await
            .with_context(|| {
                format!(
                    "nginx error log:\n{}",
                    fs::read_to_string(dir.join("error.log")).unwrap_or_default()
                )
            })?;
        Ok(Running {
            label: label.to_owned(),
            base,
            proc,
        })
    }
}

// ---------------------------------------------------------------------------------------
// Statistics and report
// ---------------------------------------------------------------------------------------

/// The p-th percentile (nearest rank) of unsorted values.
fn percentile(values: &[f64], p: f64) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * v.len() as f64).ceil() as usize;
    v[rank.clamp(1, v.len()) - 1]
}

fn ms(s: f64) -> String {
    if s.is_nan() {
        "n/a".into()
    } else if s < 0.01 {
        format!("{:.2} ms", s * 1e3)
    } else {
        format!("{:.1} ms", s * 1e3)
    }
}

fn secs(s: f64) -> String {
    if s.is_nan() {
        "n/a".into()
    } else {
        format!("{s:.3} s")
    }
}

fn mib(b: u64) -> String {
    format!("{:.1} MiB", b as f64 / (1024.0 * 1024.0))
}

fn ratio(a: f64, b: f64) -> String {
    if b == 0.0 || a.is_nan() || b.is_nan() {
        "n/a".into()
    } else {
        format!("{:.2}x", a / b)
    }
}

fn statuses(samples: &[Sample]) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for s in samples {
        let k = match &s.outcome {
            Outcome::Status(c) => c.to_string(),
            Outcome::Timeout => "timeout".into(),
            Outcome::Error(_) => "error".into(),
        };
        *m.entry(k).or_default() += 1;
    }
    m
}

/// Prints one example of each kind of transport error, so a failing run says why.
fn show_errors(label: &str, samples: &[Sample]) {
    let mut seen = Vec::new();
    for s in samples {
        if let Outcome::Error(e) = &s.outcome
            && !seen.contains(e)
        {
            println!("    {label}: client error: {e}");
            seen.push(e.clone());
        }
    }
}

fn fmt_statuses(m: &BTreeMap<String, usize>) -> String {
    m.iter()
        .map(|(k, v)| format!("{v}x{k}"))
        .collect::<Vec<_>>()
        .join(" ")
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Verdict {
    Met,
    Missed,
}

struct TargetCheck {
    target: String,
    measured: String,
    verdict: Verdict,
}

#[derive(Default)]
struct Report {
    sections: Vec<(String, String)>,
    targets: Vec<TargetCheck>,
}

impl Report {
    fn section(&mut self, title: &str, body: String) {
        self.sections.push((title.to_owned(), body));
    }

    fn target(&mut self, target: impl Into<String>, measured: impl Into<String>, met: bool) {
        let t = TargetCheck {
            target: target.into(),
            measured: measured.into(),
            verdict: if met { Verdict::Met } else { Verdict::Missed },
        };
        println!(
            "  target {}: {} -> {}",
            t.target,
            t.measured,
            if met { "met" } else { "MISSED" }
        );
        self.targets.push(t);
    }
}

fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "| {} |", headers.join(" | "));
    let _ = writeln!(
        s,
        "|{}",
        headers.iter().map(|_| " --- |").collect::<String>()
    );
    for r in rows {
        let _ = writeln!(s, "| {} |", r.join(" | "));
    }
    s
}

// ---------------------------------------------------------------------------------------
// Scenario 1: bursts of distinct lookups
// ---------------------------------------------------------------------------------------

async fn scenario_burst(suite: &mut Suite) -> Result<()> {
    println!("== 1. burst of distinct lookups");
    let mut rows = Vec::new();
    let bursts = suite.plan.bursts.clone();
    for (n, latency_ms) in bursts {
        for c in paced_contenders() {
            suite.sim.configure(latency_ms, 1000).await?;
            suite.sim.reset().await?;
            let running = suite.start(&c).await?;
            let cpfs = next_cpfs(n);
            print!("  {} N={n} latency={latency_ms}ms ... ", c.label);
            flush();
            let (launched, samples, drops) =
                fire(&running.base, &cpfs, Duration::from_secs(120)).await;
            // Every answer is in, so every call has arrived; let a last answer be recorded.
            tokio::time::sleep(Duration::from_millis(50)).await;
            let stats = suite.sim.stats().await?;
            drop(running);

            let st = statuses(&samples);
            show_errors(c.label, &samples);
            let ok: Vec<&Sample> = samples.iter().filter(|s| s.status() == Some(200)).collect();
            let served = ok.len();
            let wall_all = samples.iter().map(|s| s.end).fold(launched, f64::max) - launched;
            let wall_ok = ok.iter().map(|s| s.end).fold(launched, f64::max) - launched;
            let latency = latency_ms as f64 / 1000.0;
            let ideal = served.saturating_sub(1) as f64 / c.rate + latency;
            let bound = served.saturating_sub(1) as f64
                * (1.0 / c.rate + PROXY_RATE_GUARD.as_secs_f64())
                + latency
                + 0.050;
            let ats: Vec<f64> = stats.arrivals.iter().map(|a| a.at.as_secs_f64()).collect();
            let achieved = if ats.len() >= 2 {
                let span = ats.iter().cloned().fold(f64::MIN, f64::max)
                    - ats.iter().cloned().fold(f64::MAX, f64::min);
                (ats.len() - 1) as f64 / span
            } else {
                f64::NAN
            };
            println!(
                "{} in {}, {} calls, {} violations, {drops} listen drops",
                fmt_statuses(&st),
                secs(wall_all),
                stats.calls,
                stats.violations
            );
            let honest = samples
                .iter()
                .all(|s| matches!(s.status(), Some(200) | Some(429)));
            if matches!(c.rival, Rival::Proxy) {
                // Deterministic: the proxy answers with a score or an honest refusal, and never
                // something else (a 5xx here is a bug, not noise).
                ensure!(
                    samples
                        .iter()
                        .all(|s| matches!(s.status(), Some(200) | Some(429) | Some(503))),
                    "score-proxy burst N={n}: unexpected answers {}",
                    fmt_statuses(&st)
                );
                let what = format!("burst N={n}, upstream {latency_ms} ms");
                suite.report.target(
                    format!("{what}: 0 violations, only 200 or 429"),
                    format!("{} violations, {}", stats.violations, fmt_statuses(&st)),
                    stats.violations == 0 && honest,
                );
                suite.report.target(
                    format!("{what}: {served} served within (S-1)(1/rate+guard)+latency+50ms"),
                    format!("{} (bound {})", secs(wall_ok), secs(bound)),
                    wall_ok <= bound,
                );
                if latency_ms >= 500 {
                    suite.report.target(
                        format!("{what}: upstream pace at least 0.98 x rate"),
                        format!("{achieved:.3} calls/s"),
                        achieved >= 0.98 * c.rate,
                    );
                }
            }
            rows.push(vec![
                c.label.to_owned(),
                n.to_string(),
                format!("{latency_ms} ms"),
                fmt_statuses(&st),
                secs(wall_ok),
                secs(ideal),
                ratio(wall_ok, ideal),
                secs(wall_all),
                stats.calls.to_string(),
                stats.violations.to_string(),
                if achieved.is_nan() {
                    "n/a".into()
                } else {
                    format!("{achieved:.3}/s")
                },
                drops.to_string(),
            ]);
        }
    }
    let body = format!(
        "N distinct lookups sent at once, each on its own connection, against the strict \
         simulator (1 call/s for everyone, 2 s penalty). The proxy runs with its defaults \
         (queue of 20, 10 ms guard), nginx with `burst=20`: both take 1 + 20 lookups and refuse \
         the rest at once with 429. S = lookups answered 200. *Wall (200s)* is launch to the \
         last 200; *ideal* is (S-1)/rate + latency; *wall (all)* includes every answer (the \
         upstream's own 429s that nginx passes through). *Pace* is the upstream's arrivals per \
         second over the run. *Listen drops* are connection attempts the kernel dropped because \
         the server's listen backlog was full (`TcpExt ListenOverflows`, machine-wide): each \
         costs its client a 1 s SYN retransmission.\n\n{}",
        table(
            &[
                "contender",
                "N",
                "upstream latency",
                "answers",
                "wall (200s)",
                "ideal",
                "wall/ideal",
                "wall (all)",
                "upstream calls",
                "violations",
                "pace",
                "listen drops",
            ],
            &rows
        )
    );
    suite.report.section("1. Burst of distinct lookups", body);
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Scenario 2: an identical burst
// ---------------------------------------------------------------------------------------

async fn scenario_identical(suite: &mut Suite) -> Result<()> {
    println!("== 2. identical burst");
    let n = suite.plan.identical;
    let mut rows = Vec::new();
    for c in paced_contenders() {
        suite.sim.configure(0, 1000).await?;
        suite.sim.reset().await?;
        let running = suite.start(&c).await?;
        let cpf = next_cpfs(1).remove(0);
        let cpfs = vec![cpf; n];
        print!("  {} x{n} ... ", c.label);
        flush();
        let (launched, samples, drops) = fire(&running.base, &cpfs, Duration::from_secs(60)).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        let stats = suite.sim.stats().await?;
        drop(running);
        let st = statuses(&samples);
        show_errors(c.label, &samples);
        let wall = samples.iter().map(|s| s.end).fold(launched, f64::max) - launched;
        let lat: Vec<f64> = samples.iter().map(Sample::latency).collect();
        println!(
            "{} in {}, {} upstream calls, {drops} listen drops",
            fmt_statuses(&st),
            secs(wall),
            stats.calls
        );
        if matches!(c.rival, Rival::Proxy) {
            ensure!(
                st.get("200") == Some(&n),
                "score-proxy identical burst: expected {n}x200, got {}",
                fmt_statuses(&st)
            );
            suite.report.target(
                format!("identical burst x{n}: 1 upstream call"),
                format!("{} calls", stats.calls),
                stats.calls == 1,
            );
        }
        rows.push(vec![
            c.label.to_owned(),
            fmt_statuses(&st),
            stats.calls.to_string(),
            secs(wall),
            ms(percentile(&lat, 50.0)),
            ms(percentile(&lat, 99.0)),
            drops.to_string(),
        ]);
    }
    let body = format!(
        "{n} concurrent lookups of one key (same client id and CPF), cold cache, each on its own \
         connection. nginx coalesces with `proxy_cache_lock on`, whose waiters poll the cache \
         every 500 ms. *Listen drops* as in scenario 1.\n\n{}",
        table(
            &[
                "contender",
                "answers",
                "upstream calls",
                "wall",
                "latency p50",
                "latency p99",
                "listen drops"
            ],
            &rows
        )
    );
    suite.report.section("2. Identical burst", body);
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Scenario 3: cache hits under wrk
// ---------------------------------------------------------------------------------------

#[derive(Clone, Debug, serde::Deserialize)]
struct WrkResult {
    requests: u64,
    duration_us: u64,
    errors_connect: u64,
    errors_read: u64,
    errors_write: u64,
    errors_status: u64,
    errors_timeout: u64,
    p50_us: u64,
    p99_us: u64,
    p999_us: u64,
    /// Server-side CPU time per request (filled in by [`run_wrk`], not by wrk).
    #[serde(default)]
    cpu_us: f64,
}

impl WrkResult {
    fn rps(&self) -> f64 {
        self.requests as f64 / (self.duration_us as f64 / 1e6)
    }
    fn errors(&self) -> u64 {
        self.errors_connect
            + self.errors_read
            + self.errors_write
            + self.errors_status
            + self.errors_timeout
    }
}

/// From the proxy's Prometheus histogram of request durations: how many `/proxy/score`
/// requests took at most `le` seconds (a bucket bound, as written in the exposition), and
/// how many there were in all.
async fn handled_within(client: &reqwest::Client, base: &str, le: &str) -> Result<(u64, u64)> {
    let resp = client
        .get(format!("{base}/metrics?format=prometheus"))
        .send()
        .await?;
    ensure!(resp.status() == 200, "proxy /metrics: {}", resp.status());
    let text = resp.text().await?;
    let (mut within, mut all) = (0u64, 0u64);
    for line in text.lines() {
        if !line.starts_with("score_proxy_http_request_duration_seconds_bucket{")
            || !line.contains("route=\"/proxy/score\"")
        {
            continue;
        }
        let count = line
            .rsplit_once(' ')
            .and_then(|(_, v)| v.parse::<f64>().ok())
            .unwrap_or(0.0) as u64;
        if line.contains(&format!("le=\"{le}\"")) {
            within += count;
        } else if line.contains("le=\"+Inf\"") {
            all += count;
        }
    }
    Ok((within, all))
}

/// One wrk run; also measures the CPU time that `server` (and its children) spent on it.
fn run_wrk(plan: &Plan, base: &str, keys_file: &Path, server: &Proc) -> Result<WrkResult> {
    let cpu_before = server.cpu_seconds();
    let wrk = on_path("wrk").context("wrk is not installed (apt-get install -y wrk)")?;
    let script = manifest_dir().join("bench/wrk.lua");
    let out = Command::new(wrk)
        .env("BENCH_KEYS", keys_file)
        .arg(format!("-t{}", plan.wrk_threads))
        .arg(format!("-c{}", plan.wrk_connections))
        .arg(format!("-d{}s", plan.wrk_seconds))
        .arg("-s")
        .arg(&script)
        .arg(base)
        .output()
        .context("running wrk")?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.success(),
        "wrk failed: {}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let line = stdout
        .lines()
        .rev()
        .find(|l| l.starts_with('{'))
        .with_context(|| format!("no summary line in wrk's output:\n{stdout}"))?;
    let mut result: WrkResult =
        serde_json::from_str(line).with_context(|| format!("parsing wrk's summary {line}"))?;
    result.cpu_us = (server.cpu_seconds() - cpu_before) * 1e6 / result.requests.max(1) as f64;
    Ok(result)
}

struct Hits {
    /// Requests served over all rounds.
    requests: u64,
    rps: Vec<f64>,
    p50: Vec<f64>,
    p99: Vec<f64>,
    p999: Vec<f64>,
    cpu_us: Vec<f64>,
}

impl Hits {
    fn new() -> Self {
        Hits {
            requests: 0,
            rps: vec![],
            p50: vec![],
            p99: vec![],
            p999: vec![],
            cpu_us: vec![],
        }
    }
    fn add(&mut self, r: &WrkResult) {
        self.requests += r.requests;
        self.cpu_us.push(r.cpu_us);
        self.rps.push(r.rps());
        self.p50.push(r.p50_us as f64 / 1e6);
        self.p99.push(r.p99_us as f64 / 1e6);
        self.p999.push(r.p999_us as f64 / 1e6);
    }
}

/// The median of the rounds (the middle one of three): one disturbed round on a shared
/// machine does not move it.
fn median(v: &[f64]) -> f64 {
    percentile(v, 50.0)
}

fn write_keys(ws: &Workspace, name: &str, paths: &[String]) -> Result<PathBuf> {
    let p = ws.dir.join(name);
    fs::write(&p, paths.join("\n") + "\n")?;
    Ok(p)
}

/// The flags of every proxy instance that is warmed through a fast upstream.
const FAST_PROXY: [&str; 6] = [
    "--rate",
    "1000",
    "--rate-guard",
    "0ms",
    "--queue-capacity",
    "1000",
];

async fn scenario_hits(suite: &mut Suite) -> Result<()> {
    println!("== 3. cache hits");
    // A fast, lenient upstream for the warm-up only: the measured phase makes no call at all
    // (checked below), so the pacing settings are inert there.
    suite.sim.configure(0, 0).await?;
    let mut rows = Vec::new();
    let mut live_rss = Vec::new();
    for keys in suite.plan.hit_keysets.clone() {
        let cpfs = next_cpfs(keys);
        let paths: Vec<String> = cpfs.iter().map(|c| lookup_path(c)).collect();
        let keys_file = write_keys(&suite.ws, &format!("keys-{keys}.txt"), &paths)?;

        suite.sim.reset().await?;
        let proxy = suite
            .start_proxy("score-proxy", &FAST_PROXY, Telemetry::Metrics)
            .await?;
        let nginx = suite.start_nginx("nginx", "1000r/s", 1000).await?;
        let mut contenders = [(proxy, Hits::new()), (nginx, Hits::new())];
        for (running, _) in &contenders {
            let rss_before = running.proc.rss();
            let t = Instant::now();
            let calls_before = suite.sim.stats().await?.calls;
            warm(&suite.client, &running.base, &paths, 16).await?;
            let calls = suite.sim.stats().await?.calls - calls_before;
            ensure!(
                calls == keys as u64,
                "{}: warming {keys} keys made {calls} upstream calls",
                running.label
            );
            println!(
                "  {}: warmed {keys} keys in {:.1} s",
                running.label,
                t.elapsed().as_secs_f64()
            );
            if keys >= 1000 && running.label == "score-proxy" {
                // Not the memory target (that is scenario 6), a sanity check on the live
                // process: what 10 000 entries fetched through HTTP cost it.
                let grown = running.proc.rss().saturating_sub(rss_before);
                live_rss.push((keys, grown));
            }
        }
        let calls_before = suite.sim.stats().await?.calls;
        for round in 0..suite.plan.rounds {
            for (running, hits) in contenders.iter_mut() {
                let r = run_wrk(&suite.plan, &running.base, &keys_file, &running.proc)?;
                ensure!(
                    r.errors() == 0,
                    "{} under wrk ({keys} keys, round {}): {} errors or non-2xx answers: {r:?}",
                    running.label,
                    round + 1,
                    r.errors()
                );
                println!(
                    "  {} keys={keys} round {}: {:.0} req/s p50 {} p99 {} p99.9 {}, {:.1} us CPU/req",
                    running.label,
                    round + 1,
                    r.rps(),
                    ms(r.p50_us as f64 / 1e6),
                    ms(r.p99_us as f64 / 1e6),
                    ms(r.p999_us as f64 / 1e6),
                    r.cpu_us
                );
                hits.add(&r);
            }
        }
        let calls = suite.sim.stats().await?.calls - calls_before;
        ensure!(
            calls == 0,
            "{calls} upstream calls during the cache-hit measurement: not all were hits"
        );
        let (proxy_hits, nginx_hits) = (&contenders[0].1, &contenders[1].1);
        let (p_rps, n_rps) = (median(&proxy_hits.rps), median(&nginx_hits.rps));
        let (p_p99, n_p99) = (median(&proxy_hits.p99), median(&nginx_hits.p99));
        suite.report.target(
            format!("cache hits, {keys} keys: throughput at least 1.0x nginx"),
            format!("{p_rps:.0} vs {n_rps:.0} req/s = {}", ratio(p_rps, n_rps)),
            p_rps >= n_rps,
        );
        suite.report.target(
            format!("cache hits, {keys} keys: p99 no worse than nginx"),
            format!("{} vs {}", ms(p_p99), ms(n_p99)),
            p_p99 <= n_p99,
        );
        for (running, h) in &contenders {
            rows.push(vec![
                keys.to_string(),
                running.label.clone(),
                h.rps
                    .iter()
                    .map(|r| format!("{r:.0}"))
                    .collect::<Vec<_>>()
                    .join(" / "),
                format!("{:.0}", median(&h.rps)),
                ms(median(&h.p50)),
                ms(median(&h.p99)),
                ms(median(&h.p999)),
                format!("{:.1} us", median(&h.cpu_us)),
            ]);
        }
        rows.push(vec![
            keys.to_string(),
            "**proxy / nginx**".into(),
            String::new(),
            format!("**{}**", ratio(p_rps, n_rps)),
            ratio(median(&proxy_hits.p50), median(&nginx_hits.p50)),
            ratio(p_p99, n_p99),
            ratio(median(&proxy_hits.p999), median(&nginx_hits.p999)),
            ratio(median(&proxy_hits.cpu_us), median(&nginx_hits.cpu_us)),
        ]);
    }
    let mut body = format!(
        "`wrk {} -s bench/wrk.lua` against each, {} alternating round(s) (proxy, nginx, proxy, \
         nginx ...), all answers 200 and no upstream call during the measurement (checked). \
         The script rotates over the key set (each wrk thread from its own offset). All figures \
         are medians over the rounds (wrk's per-round percentiles for latencies).\n\n\
         How each was warmed: the simulator's rate rule off (`min_interval 0`), the proxy started \
         with `{}` and nginx's inner server with `rate=1000r/s burst=1000` \
         (`bench/nginx-1000r-per-s.generated.conf`); the harness then looked each key up once, 16 \
         at a time. Pacing settings only matter for misses, and there are none once warm. The \
         proxy runs with metrics on and the access log off (`RUST_LOG=off`), nginx with \
         `access_log off` and `worker_processes auto`; the proxy uses tokio's default runtime (a \
         worker per core). Both share the 2 cores with wrk. *Server CPU per request* is the \
         user + system time the server's processes used during the run (from `/proc/PID/stat`) \
         divided by the requests served: less sensitive to other load on the machine than \
         throughput.\n\n{}",
        suite.plan.wrk_args(),
        suite.plan.rounds,
        FAST_PROXY.join(" "),
        table(
            &[
                "keys",
                "contender",
                "req/s per round",
                "req/s (median)",
                "p50",
                "p99",
                "p99.9",
                "server CPU per request"
            ],
            &rows
        )
    );
    for (keys, grown) in live_rss {
        let _ = write!(
            body,
            "\nThe live proxy's resident memory grew by {} while it fetched and cached {keys} \
             entries over HTTP ({:.0} bytes per entry, all included: connection buffers, \
             allocator slack; scenario 6 measures the cache itself).\n",
            mib(grown),
            grown as f64 / keys as f64
        );
    }
    suite.report.section("3. Cache hits", body);
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Scenario 4: overload
// ---------------------------------------------------------------------------------------

async fn scenario_overload(suite: &mut Suite) -> Result<()> {
    println!("== 4. overload");
    let n = suite.plan.overload_clients;
    let timeout = suite.plan.overload_timeout;
    let mut rows = Vec::new();
    let mut server_note = String::new();
    for c in paced_contenders() {
        suite.sim.configure(0, 1000).await?;
        suite.sim.reset().await?;
        let running = suite.start(&c).await?;
        let cpfs = next_cpfs(n);
        print!("  {} {n} clients ... ", c.label);
        flush();
        let cpu_before = running.proc.cpu_seconds_fine();
        let (launched, samples, drops) = fire(&running.base, &cpfs, timeout).await;
        let finished = now_s();
        // The server's CPU time for the whole burst (accepting, parsing, answering, closing),
        // per client.
        let cpu_per_client = (running.proc.cpu_seconds_fine() - cpu_before) / n as f64;
        // Watch what still reaches the upstream after every client has gone.
        tokio::time::sleep(suite.plan.overload_watch).await;
        let stats = suite.sim.stats().await?;
        let peak_rss = running.proc.peak_rss();
        let server_side = match c.rival {
            Rival::Proxy => Some((
                handled_within(&suite.client, &running.base, "0.01").await?,
                scrape(&suite.client, &running.base).await?,
            )),
            Rival::Nginx { .. } => None,
        };
        drop(running);

        let st = statuses(&samples);
        show_errors(c.label, &samples);
        let refused: Vec<&Sample> = samples
            .iter()
            .filter(|s| matches!(s.status(), Some(429) | Some(503)))
            .collect();
        let refusals: Vec<f64> = refused.iter().map(|s| s.after_connect()).collect();
        let refusals_total: Vec<f64> = refused.iter().map(|s| s.latency()).collect();
        let p99_total = percentile(&refusals_total, 99.0);
        // A call is wasted when it reaches the upstream after its (only) client has given
        // up or was refused. The clocks are aligned to within `offset_error`, so only calls
        // later than that margin count.
        let ended: HashMap<&str, (f64, bool)> = samples
            .iter()
            .map(|s| (s.cpf.as_str(), (s.end, s.status() == Some(200))))
            .collect();
        let margin = suite.sim.offset_error + 0.001;
        let mut wasted_after_timeout = 0;
        let mut wasted_after_refusal = 0;
        for a in &stats.arrivals {
            if let Some(&(end, ok)) = ended.get(a.cpf.as_str())
                && !ok
                && suite.sim.to_harness(a.at) > end + margin
            {
                let timed_out = samples
                    .iter()
                    .any(|s| s.cpf == a.cpf && matches!(s.outcome, Outcome::Timeout));
                if timed_out {
                    wasted_after_timeout += 1;
                } else {
                    wasted_after_refusal += 1;
                }
            }
        }
        let wasted = wasted_after_timeout + wasted_after_refusal;
        let p99 = percentile(&refusals, 99.0);
        println!(
            "{} in {}, refusal p99 {} ({} with connecting), {} calls ({} wasted), {} violations, peak RSS {}, {drops} listen drops",
            fmt_statuses(&st),
            secs(finished - launched),
            ms(p99),
            ms(p99_total),
            stats.calls,
            wasted,
            stats.violations,
            mib(peak_rss)
        );
        if matches!(c.rival, Rival::Proxy) {
            ensure!(
                samples.iter().all(|s| matches!(
                    s.outcome,
                    Outcome::Status(200)
                        | Outcome::Status(429)
                        | Outcome::Status(503)
                        | Outcome::Timeout
                )),
                "score-proxy overload: unexpected answers {}",
                fmt_statuses(&st)
            );
            // The proxy's own view: its request-duration histogram, refusals only
            // (outcome queue_full), from the request parsed to the response handed to hyper.
            let mut own = String::new();
            if let Some(((within, all), text)) = &server_side {
                let refusals_label = ["route=\"/proxy/score\"", "outcome=\"queue_full\""];
                let count = metric_sum(
                    text,
                    "score_proxy_http_request_duration_seconds_count",
                    &refusals_label,
                );
                let quantile = |q: f64| {
                    bucket_quantile(
                        std::slice::from_ref(text),
                        "score_proxy_http_request_duration_seconds_bucket",
                        &refusals_label,
                        q,
                    )
                };
                let (own_p50, own_p99) = (quantile(0.5), quantile(0.99));
                own = format!(
                    "; the proxy's own histogram: refusal p99 at most {}",
                    ms(own_p99)
                );
                println!(
                    "  score-proxy's own histogram: {within} of {all} lookups handled within \
                     10 ms; {count:.0} refusals (queue_full), p50 at most {}, p99 at most {}",
                    ms(own_p50),
                    ms(own_p99)
                );
                server_note = format!(
                    "\n\nThe proxy's own `score_proxy_http_request_duration_seconds` histogram \
                     (from the request parsed to the response handed to hyper: admission to \
                     refusal, without the time the request waited for a core, in the kernel or \
                     in hyper) puts {within} of its {all} lookups in this run at 10 ms or less; \
                     of its {count:.0} refusals (`outcome=\"queue_full\"`) half took at most {} \
                     and 99 % at most {} (upper bounds: the histogram's bucket edges).",
                    ms(own_p50),
                    ms(own_p99)
                );
            }
            suite.report.target(
                format!("overload x{n}: refusal p99 under 10 ms (request sent to answer)"),
                format!(
                    "{} ({} counting the connection set-up{own})",
                    ms(p99),
                    ms(p99_total)
                ),
                p99 < 0.010,
            );
            suite.report.target(
                format!("overload x{n}: peak RSS under 100 MB"),
                mib(peak_rss),
                peak_rss < 100_000_000,
            );
            suite.report.target(
                format!("overload x{n}: 0 violations, 0 wasted calls"),
                format!("{} violations, {wasted} wasted", stats.violations),
                stats.violations == 0 && wasted == 0,
            );
        }
        rows.push(vec![
            c.label.to_owned(),
            fmt_statuses(&st),
            refusals.len().to_string(),
            ms(percentile(&refusals, 50.0)),
            ms(p99),
            ms(refusals.iter().cloned().fold(f64::NAN, f64::max)),
            ms(p99_total),
            mib(peak_rss),
            stats.calls.to_string(),
            stats.violations.to_string(),
            format!("{wasted} ({wasted_after_timeout} after timeout, {wasted_after_refusal} after refusal)"),
            drops.to_string(),
            format!("{:.0} us", cpu_per_client * 1e6),
        ]);
    }
    let body = format!(
        "{n} clients at once, each asking a distinct CPF on its own connection and giving up \
         after {} s; then the upstream is watched for {} s more. *Refusals* are answers 429 or \
         503; their latency is measured from the moment the request was written on an \
         established connection to the end of the answer (the server's part), and also from \
         the first connection attempt (*with connecting*: {n} handshakes at once through the \
         kernel's accept queue, on 2 cores shared with the {n}-task client). *Server CPU per \
         client* is the user + system time the server's processes used from the launch to the \
         last answer or timeout, divided by the clients: accepting, parsing, answering and \
         closing; times {n} and over 2 cores, about how long the burst keeps the server busy. \
         *Peak RSS* is \
         VmHWM (for nginx summed over the master and its workers, cache manager and loader). \
         A *wasted* call is one that reached the upstream after its only client had timed out \
         or been refused: the simulator's arrival times are put on the harness's clock with a \
         probe (uncertainty ±{:.2} ms, and only calls later than that count). *Listen drops* \
         as in scenario 1.\n\n{}{server_note}\n",
        timeout.as_secs_f64(),
        suite.plan.overload_watch.as_secs(),
        suite.sim.offset_error * 1e3,
        table(
            &[
                "contender",
                "answers",
                "refusals",
                "refusal p50",
                "refusal p99",
                "refusal max",
                "refusal p99 with connecting",
                "peak RSS",
                "upstream calls",
                "violations",
                "wasted calls",
                "listen drops",
                "server CPU per client",
            ],
            &rows
        )
    );
    suite.report.section("4. Overload", body);
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Scenario 5: what telemetry costs
// ---------------------------------------------------------------------------------------

#[derive(Default)]
struct SinkCounts {
    requests: AtomicU64,
    bytes: AtomicU64,
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

async fn scenario_telemetry(suite: &mut Suite) -> Result<()> {
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

// ---------------------------------------------------------------------------------------
// Scenario 6: memory per cached entry (in a child process)
// ---------------------------------------------------------------------------------------

fn rss_self() -> u64 {
    // /proc/self/statm's second field is resident pages; VmRSS is the same number in kB,
    // which spares asking for the page size.
    proc_status_kb(std::process::id(), "VmRSS:").unwrap_or(0) * 1024
}

/// How the memory child stores its entries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Store {
    /// `LocalCache`, bodies built as `upstream::read_capped` builds them: what the proxy does.
    Proxy,
    /// `LocalCache`, bodies copied into exact-size `Bytes` (one allocation, no slack).
    ExactBodies,
    /// A plain `HashMap` of the same keys and values: the data without the cache machinery.
    HashMap,
}

impl Store {
    const ALL: [Store; 3] = [Store::Proxy, Store::ExactBodies, Store::HashMap];

    fn name(self) -> &'static str {
        match self {
            Store::Proxy => "proxy",
            Store::ExactBodies => "exact-bodies",
            Store::HashMap => "hashmap",
        }
    }

    fn describe(self) -> &'static str {
        match self {
            Store::Proxy => "`LocalCache` as the proxy fills it",
            Store::ExactBodies => "`LocalCache`, bodies as exact-size `Bytes`",
            Store::HashMap => {
                "`HashMap<LookupKey, CachedScore>`, same entries (no cache machinery)"
            }
        }
    }
}

/// Fills a store with `n` entries as the proxy would (keys from `parse_lookup`, bodies built
/// the way `upstream::read_capped` builds them) and prints one JSON line.
fn memory_child(n: usize, store: &str) -> ExitCode {
    let Some(store) = Store::ALL.into_iter().find(|s| s.name() == store) else {
        eprintln!("compare: unknown store {store}");
        return ExitCode::from(2);
    };
    let before = rss_self();
    // Sized for the entries, as an operator would set --cache-max-entries.
    let cache = (store != Store::HashMap).then(|| {
        LocalCache::new(
            &CacheConfig {
                ttl: Duration::from_secs(300),
                stale_for: Duration::ZERO,
                max_entries: n as u64,
            },
            |_| {},
        )
    });
    let mut map = std::collections::HashMap::new();
    let mut body_bytes = 0usize;
    let mut inserted = 0usize;
    let mut base = 300_000_000u32;
    while inserted < n {
        base += 1;
        let Some(cpf) = Cpf::from_base(base) else {
            continue;
        };
        let query = format!("cpf={cpf}&client_id=client-{:03}", inserted % 100);
        let key = parse_lookup(Some(&query), None).expect("a valid lookup");
        let json = format!(
            r#"{{"cpf":"{cpf}","score":{},"request_id":{}}}"#,
            300 + inserted % 600,
            inserted + 1
        );
        body_bytes += json.len();
        let body = if store == Store::ExactBodies {
            Bytes::copy_from_slice(json.as_bytes())
        } else {
            let mut body = BytesMut::new();
            body.extend_from_slice(json.as_bytes());
            body.freeze()
        };
        let value = CachedScore {
            body,
            fetched_at: Instant::now(),
        };
        match &cache {
            Some(cache) => cache.insert(key, value),
            None => {
                map.insert(key, value);
            }
        }
        inserted += 1;
    }
    let entries = match &cache {
        Some(cache) => {
            cache.sync();
            cache.entry_count()
        }
        None => map.len() as u64,
    };
    let after = rss_self();
    println!(
        "{}",
        serde_json::json!({
            "n": n,
            "entries": entries,
            "rss_before": before,
            "rss_after": after,
            "body_bytes": body_bytes,
        })
    );
    // Keep the store alive until the measurement is printed.
    drop(cache);
    drop(map);
    ExitCode::SUCCESS
}

async fn scenario_memory(suite: &mut Suite) -> Result<()> {
    println!("== 6. memory per cached entry");
    let n = suite.plan.memory_entries;
    let exe = std::env::current_exe()?;
    let mut rows = Vec::new();
    let mut avg_body = 0.0;
    for store in Store::ALL {
        let out = tokio::process::Command::new(&exe)
            .args(["--memory-child", &n.to_string(), "--store", store.name()])
            .kill_on_drop(true)
            .output()
            .await?;
        ensure!(
            out.status.success(),
            "memory child ({}) failed: {}",
            store.name(),
            String::from_utf8_lossy(&out.stderr)
        );
        let line = String::from_utf8_lossy(&out.stdout);
        let v: serde_json::Value = serde_json::from_str(line.trim())
            .with_context(|| format!("parsing the memory child's output {line}"))?;
        let get = |k: &str| v[k].as_u64().unwrap_or(0);
        let (before, after, body, entries) = (
            get("rss_before"),
            get("rss_after"),
            get("body_bytes"),
            get("entries"),
        );
        ensure!(
            entries == n as u64,
            "the {} store holds {entries} entries, not {n}",
            store.name()
        );
        let per_entry = (after as f64 - before as f64 - body as f64) / n as f64;
        avg_body = body as f64 / n as f64;
        println!(
            "  {}: {n} entries, {per_entry:.0} bytes per entry beyond the body",
            store.name()
        );
        if store == Store::Proxy {
            suite.report.target(
                format!("memory: under 300 bytes per entry beyond the body ({n} entries)"),
                format!("{per_entry:.0} bytes"),
                per_entry < 300.0,
            );
        }
        rows.push(vec![
            store.describe().to_owned(),
            entries.to_string(),
            mib(before),
            mib(after),
            mib(body),
            if store == Store::Proxy {
                format!("**{per_entry:.0} bytes**")
            } else {
                format!("{per_entry:.0} bytes")
            },
        ]);
    }
    let body = format!(
        "Measured on the cache component itself (`score_proxy::cache::LocalCache`), in a fresh \
         child process of the harness per row: filling a live proxy with {n} entries through a \
         1 call/s upstream would take days. Keys come from `parse_lookup` (100 distinct client \
         ids, each held inline in its key, as a request's is), bodies are ~{avg_body:.0}-byte \
         JSON answers; the cache is sized to the entries (`max_entries` = {n}, TTL 300 s) and \
         moka's housekeeping is run (`sync`) before measuring. The harness uses the binary's \
         global allocator (mimalloc). Resident memory is read from `/proc/self/status` (VmRSS) \
         before creating the cache and after filling it; the JSON bodies' bytes are \
         subtracted. The first row is the target's; the other two locate the overhead.\n\n{}",
        table(
            &[
                "store",
                "entries",
                "RSS before",
                "RSS after",
                "JSON bodies",
                "per entry, beyond the body"
            ],
            &rows
        )
    );
    suite.report.section("6. Memory per cached entry", body);
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Scenario 7: three replicas sharing one budget through Redis
// ---------------------------------------------------------------------------------------

/// The pacing guard of every proxy in the replicas scenario: the proxy's default, as in
/// scenario 1 (the real contract, 1 call/s), two orders of magnitude above Redis's loopback
/// round trip (measured and reported by the scenario).
const REPLICA_GUARD: &str = "10ms";

/// A `redis-server` on a loopback port; stopped when dropped (through its [`Proc`]).
struct Redis {
    port: u16,
    proc: Proc,
}

impl Redis {
    async fn start(ws: &Workspace) -> Result<Redis> {
        let bin = on_path("redis-server").context(
            "redis-server is not installed: the replicas scenario needs it \
             (apt-get install -y redis-server; scripts/install-deps.sh installs it)",
        )?;
        let port = free_port()?;
        let dir = ws.subdir("redis")?;
        let mut cmd = Command::new(bin);
        cmd.current_dir(&dir).args([
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ]);
        let mut proc = Proc::spawn("redis-server", cmd, dir.join("redis.log"), false)?;
        let until = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = proc.exited() {
                bail!(
                    "redis-server exited ({status}) before it answered; its log:\n{}",
                    proc.log_tail()
                );
            }
            if redis_ping_rtts(port, 1).await.is_ok() {
                return Ok(Redis { port, proc });
            }
            if Instant::now() > until {
                bail!(
                    "redis-server did not answer PING on port {port} within 20 s; its log:\n{}",
                    proc.log_tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }
}

/// The round trips of `n` PINGs, one after the other on one connection, in seconds.
async fn redis_ping_rtts(port: u16, n: usize) -> Result<Vec<f64>> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let pings = async {
        let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
        stream.set_nodelay(true)?;
        let mut rtts = Vec::with_capacity(n);
        let mut buf = [0u8; 64];
        for _ in 0..n {
            let t = Instant::now();
            stream.write_all(b"PING\r\n").await?;
            let mut got = 0;
            while !buf[..got].ends_with(b"\r\n") {
                let k = stream.read(&mut buf[got..]).await?;
                ensure!(
                    k > 0 && got + k < buf.len(),
                    "redis: unexpected answer to PING"
                );
                got += k;
            }
            ensure!(
                &buf[..got] == b"+PONG\r\n",
                "redis answered PING with {:?}",
                String::from_utf8_lossy(&buf[..got])
            );
            rtts.push(t.elapsed().as_secs_f64());
        }
        Ok(rtts)
    };
    tokio::time::timeout(Duration::from_secs(5), pings)
        .await
        .context("redis PING timed out")?
}

/// A Prometheus scrape of the proxy at `base`.
async fn scrape(client: &reqwest::Client, base: &str) -> Result<String> {
    let resp = client
        .get(format!("{base}/metrics?format=prometheus"))
        .send()
        .await?;
    ensure!(resp.status() == 200, "{base}/metrics: {}", resp.status());
    Ok(resp.text().await?)
}

/// The sum of every sample of `name` (all label sets) whose labels contain each of `labels`.
fn metric_sum(text: &str, name: &str, labels: &[&str]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .filter(|l| labels.iter().all(|want| l.contains(want)))
        .filter_map(|l| l.rsplit_once(' ').and_then(|(_, v)| v.parse::<f64>().ok()))
        .sum()
}

/// The smallest bucket bound of histogram `name` (e.g. `..._bucket`) under which at least
/// `q` of the samples with `labels` fall, summed over every scrape in `texts`: an upper
/// bound of the q-quantile.
fn bucket_quantile(texts: &[String], name: &str, labels: &[&str], q: f64) -> f64 {
    let mut buckets: BTreeMap<u64, f64> = BTreeMap::new();
    let mut total = 0.0;
    for text in texts {
        for line in text.lines().filter(|l| l.starts_with(name)) {
            if !labels.iter().all(|want| line.contains(want)) {
                continue;
            }
            let Some((series, value)) = line.rsplit_once(' ') else {
                continue;
            };
            let value: f64 = value.parse().unwrap_or(0.0);
            let Some(le) = series
                .split("le=\"")
                .nth(1)
                .and_then(|rest| rest.split('"').next())
            else {
                continue;
            };
            if le == "+Inf" {
                total += value;
            } else if let Ok(bound) = le.parse::<f64>() {
                *buckets.entry((bound * 1e9) as u64).or_default() += value;
            }
        }
    }
    buckets
        .iter()
        .find(|&(_, &count)| total > 0.0 && count >= q * total)
        .map_or(f64::NAN, |(&ns, _)| ns as f64 / 1e9)
}

/// Waits until the proxy at `base` says it paces through Redis (`/ready`: `"pacing":
/// "shared"`).
async fn wait_shared(client: &reqwest::Client, running: &mut Running) -> Result<()> {
    let until = Instant::now() + Duration::from_secs(20);
    let mut last = String::new();
    loop {
        if let Some(status) = running.proc.exited() {
            bail!(
                "{} exited ({status}); its log:\n{}",
                running.label,
                running.proc.log_tail()
            );
        }
        if let Ok(resp) = client
            .get(format!("{}/ready", running.base))
            .timeout(Duration::from_millis(500))
            .send()
            .await
        {
            last = resp.text().await.unwrap_or_default();
            if serde_json::from_str::<serde_json::Value>(&last)
                .is_ok_and(|v| v["pacing"] == "shared")
            {
                return Ok(());
            }
        }
        if Instant::now() > until {
            bail!(
                "{} is not in shared pacing mode after 20 s (/ready: {last}); its log:\n{}",
                running.label,
                running.proc.log_tail()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// What one burst through one or three proxies did.
struct BurstResult {
    samples: Vec<Sample>,
    statuses: BTreeMap<String, usize>,
    served: usize,
    /// 429s that carried a Retry-After.
    honest_429: usize,
    wall_ok: f64,
    ideal: f64,
    bound: f64,
    calls: u64,
    distinct_called: usize,
    violations: u64,
    /// Upstream arrivals per second over the run, and the smallest gap between two.
    pace: f64,
    min_gap: Option<f64>,
    drops: u64,
    /// Upstream calls each proxy made and the Redis bookings it got (from its own metrics).
    calls_by_proxy: Vec<(f64, f64)>,
    /// Booked slots that passed without a call, by reason, summed over the proxies.
    unused: BTreeMap<String, f64>,
}

impl BurstResult {
    fn unused_text(&self) -> String {
        if self.unused.is_empty() {
            return "0".into();
        }
        self.unused
            .iter()
            .map(|(reason, n)| format!("{n:.0} {reason}"))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

impl BurstResult {
    fn clean(&self) -> bool {
        self.violations == 0
            && self.served + self.honest_429 == self.samples.len()
            && self.calls == self.served as u64
            && self.distinct_called == self.served
    }

    fn per_proxy(&self, n: usize) -> String {
        (0..n)
            .map(|i| {
                let mine: Vec<Sample> = self
                    .samples
                    .iter()
                    .filter(|s| s.target == i)
                    .cloned()
                    .collect();
                let (calls, books) = self
                    .calls_by_proxy
                    .get(i)
                    .copied()
                    .unwrap_or((f64::NAN, f64::NAN));
                format!(
                    "{} ({calls:.0} calls, {books:.0} booking requests)",
                    fmt_statuses(&statuses(&mine))
                )
            })
            .collect::<Vec<_>>()
            .join(" / ")
    }
}

async fn replica_burst(
    suite: &mut Suite,
    proxies: &[&Running],
    n: usize,
    latency_ms: u64,
    rate: f64,
    guard: f64,
) -> Result<BurstResult> {
    suite.sim.configure(latency_ms, 1000).await?;
    suite.sim.reset().await?;
    let bases: Vec<String> = proxies.iter().map(|p| p.base.clone()).collect();
    let mut calls_before = Vec::new();
    for b in &bases {
        let m = scrape(&suite.client, b).await?;
        calls_before.push((
            metric_sum(&m, "score_proxy_upstream_calls_total", &[]),
            bookings(&m),
            unused_slots(&m),
        ));
    }
    let cpfs = next_cpfs(n);
    let (launched, samples, drops) = fire_spread(&bases, &cpfs, Duration::from_secs(120)).await;
    // Every answer is in, so every call has arrived; let a last answer be recorded.
    tokio::time::sleep(Duration::from_millis(50)).await;
    let stats = suite.sim.stats().await?;
    let mut calls_by_proxy = Vec::new();
    let mut unused: BTreeMap<String, f64> = BTreeMap::new();
    for (b, (calls0, books0, unused0)) in bases.iter().zip(calls_before) {
        let m = scrape(&suite.client, b).await?;
        calls_by_proxy.push((
            metric_sum(&m, "score_proxy_upstream_calls_total", &[]) - calls0,
            bookings(&m) - books0,
        ));
        for (reason, n) in unused_slots(&m) {
            let d = n - unused0.get(&reason).copied().unwrap_or(0.0);
            if d > 0.0 {
                *unused.entry(reason).or_default() += d;
            }
        }
    }
    let st = statuses(&samples);
    let ok: Vec<&Sample> = samples.iter().filter(|s| s.status() == Some(200)).collect();
    let served = ok.len();
    let honest_429 = samples
        .iter()
        .filter(|s| s.status() == Some(429) && s.retry_after.is_some())
        .count();
    let wall_ok = ok.iter().map(|s| s.end).fold(launched, f64::max) - launched;
    let latency = latency_ms as f64 / 1000.0;
    let ideal = served.saturating_sub(1) as f64 / rate + latency;
    let bound = served.saturating_sub(1) as f64 * (1.0 / rate + guard) + latency + 0.050;
    let ats: Vec<f64> = stats.arrivals.iter().map(|a| a.at.as_secs_f64()).collect();
    let pace = if ats.len() >= 2 {
        let span = ats.iter().cloned().fold(f64::MIN, f64::max)
            - ats.iter().cloned().fold(f64::MAX, f64::min);
        (ats.len() - 1) as f64 / span
    } else {
        f64::NAN
    };
    let distinct_called = stats
        .arrivals
        .iter()
        .map(|a| a.cpf.as_str())
        .collect::<std::collections::HashSet<_>>()
        .len();
    Ok(BurstResult {
        statuses: st,
        served,
        honest_429,
        wall_ok,
        ideal,
        bound,
        calls: stats.calls,
        distinct_called,
        violations: stats.violations,
        pace,
        min_gap: stats.min_gap_seconds,
        drops,
        calls_by_proxy,
        unused,
        samples,
    })
}

/// Start slots booked in Redis (`score_proxy_redis_operations_total{op="book"}`, answered).
fn bookings(text: &str) -> f64 {
    metric_sum(
        text,
        "score_proxy_redis_operations_total",
        &["op=\"book\"", "outcome=\"ok\""],
    )
}

/// `score_proxy_pacing_unused_slots_total` by reason, from one scrape.
fn unused_slots(text: &str) -> BTreeMap<String, f64> {
    let name = "score_proxy_pacing_unused_slots_total{reason=\"";
    text.lines()
        .filter_map(|l| l.strip_prefix(name))
        .filter_map(|rest| {
            let (reason, rest) = rest.split_once('"')?;
            let value = rest.rsplit_once(' ')?.1.parse().ok()?;
            Some((reason.to_owned(), value))
        })
        .collect()
}

async fn scenario_replicas(suite: &mut Suite) -> Result<()> {
    println!("== 7. three replicas, one budget");
    let redis = Redis::start(&suite.ws).await?;
    let rtts = redis_ping_rtts(redis.port, 200).await?;
    let (rtt_p50, rtt_p99) = (percentile(&rtts, 50.0), percentile(&rtts, 99.0));
    println!(
        "  redis-server on port {}: PING round trip p50 {} p99 {}",
        redis.port,
        ms(rtt_p50),
        ms(rtt_p99)
    );
    let rate = 1.0;
    let guard = humantime::parse_duration(REPLICA_GUARD)?.as_secs_f64();
    let (rate_s, redis_url) = (format!("{rate}"), redis.url());
    let paced = ["--rate", rate_s.as_str(), "--rate-guard", REPLICA_GUARD];
    let mut shared = paced.to_vec();
    shared.extend([
        "--redis-url",
        redis_url.as_str(),
        "--redaction-key",
        "bench",
        "--expected-replicas",
        "3",
    ]);
    let mut fleet = Vec::new();
    for i in 0..3 {
        let label = ["replica 1", "replica 2", "replica 3"][i];
        let mut r = suite
            .start_proxy(label, &shared, Telemetry::Metrics)
            .await?;
        wait_shared(&suite.client, &mut r).await?;
        fleet.push(r);
    }

    let mut rows = Vec::new();
    let mut versus = Vec::new();
    for (n, latency_ms) in suite.plan.replica_bursts.clone() {
        let what = format!("burst N={n}, upstream {latency_ms} ms");
        print!("  3 replicas {what} ... ");
        flush();
        let refs: Vec<&Running> = fleet.iter().collect();
        let three = replica_burst(suite, &refs, n, latency_ms, rate, guard).await?;
        println!(
            "{} in {}, {} calls, {} violations, pace {:.3}/s, unused slots {}",
            fmt_statuses(&three.statuses),
            secs(three.wall_ok),
            three.calls,
            three.violations,
            three.pace,
            three.unused_text()
        );
        print!("  1 process {what} ... ");
        flush();
        let single = suite
            .start_proxy("one process", &paced, Telemetry::Metrics)
            .await?;
        let one = replica_burst(suite, &[&single], n, latency_ms, rate, guard).await?;
        drop(single);
        println!(
            "{} in {}, {} calls, {} violations, pace {:.3}/s, unused slots {}",
            fmt_statuses(&one.statuses),
            secs(one.wall_ok),
            one.calls,
            one.violations,
            one.pace,
            one.unused_text()
        );
        for (label, r) in [("3 replicas", &three), ("1 process", &one)] {
            show_errors(label, &r.samples);
            // Deterministic: a score or an honest refusal, never anything else.
            ensure!(
                r.samples
                    .iter()
                    .all(|s| matches!(s.status(), Some(200) | Some(429) | Some(503))),
                "{label} {what}: unexpected answers {}",
                fmt_statuses(&r.statuses)
            );
        }
        suite.report.target(
            format!(
                "3 replicas, {what}: 0 violations, one upstream call per key served, only 200 \
                 or 429 with Retry-After"
            ),
            format!(
                "{} violations, {} calls for {} distinct keys called and {} served, {}",
                three.violations,
                three.calls,
                three.distinct_called,
                three.served,
                fmt_statuses(&three.statuses)
            ),
            three.clean(),
        );
        suite.report.target(
            format!(
                "3 replicas, {what}: {} served within (S-1)(1/rate+guard)+latency+50ms",
                three.served
            ),
            format!("{} (bound {})", secs(three.wall_ok), secs(three.bound)),
            three.wall_ok <= three.bound,
        );
        if latency_ms >= 500 {
            suite.report.target(
                format!("3 replicas, {what}: upstream pace at least 0.98 x rate"),
                format!("{:.3} calls/s", three.pace),
                three.pace >= 0.98 * rate,
            );
        }
        for (label, r, count) in [("3 replicas", &three, 3), ("1 process", &one, 1)] {
            rows.push(vec![
                label.to_owned(),
                n.to_string(),
                format!("{latency_ms} ms"),
                fmt_statuses(&r.statuses),
                if count > 1 {
                    r.per_proxy(count)
                } else {
                    "".into()
                },
                secs(r.wall_ok),
                secs(r.ideal),
                ratio(r.wall_ok, r.ideal),
                format!("{} / {}", r.calls, r.distinct_called),
                r.violations.to_string(),
                r.min_gap.map_or("n/a".into(), |g| format!("{g:.4} s")),
                format!("{:.3}/s", r.pace),
                format!("{:.1}%", 100.0 * r.pace / rate),
                r.drops.to_string(),
                r.unused_text(),
            ]);
        }
        versus.push(vec![
            n.to_string(),
            format!("{latency_ms} ms"),
            format!("{:.1}%", 100.0 * three.pace / rate),
            format!("{:.1}%", 100.0 * one.pace / rate),
            format!("**{}**", ratio(three.pace, one.pace)),
            ratio(three.wall_ok, one.wall_ok),
        ]);
    }

    // Cross-replica coalescing: one new key asked on every replica at once, behind a slow
    // upstream so that every lookup arrives while the first call is out.
    let k = suite.plan.coalesce_per_replica;
    let coalesce_latency_ms = 500;
    suite.sim.configure(coalesce_latency_ms, 1000).await?;
    suite.sim.reset().await?;
    let bases: Vec<String> = fleet.iter().map(|r| r.base.clone()).collect();
    let flights = |text: &str, role: &str| {
        metric_sum(
            text,
            "score_proxy_shared_flights_total",
            &[&format!("role=\"{role}\"")],
        )
    };
    let mut before = Vec::new();
    for b in &bases {
        let m = scrape(&suite.client, b).await?;
        before.push((flights(&m, "leader"), flights(&m, "follower")));
    }
    let cpfs = vec![next_cpfs(1).remove(0); 3 * k];
    print!("  one key on 3 replicas x{} ... ", 3 * k);
    flush();
    let (launched, samples, drops) = fire_spread(&bases, &cpfs, Duration::from_secs(30)).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    let stats = suite.sim.stats().await?;
    let (mut leaders, mut followers) = (0.0, 0.0);
    let mut book_sum = 0.0;
    let mut book_count = 0.0;
    let mut fallbacks = 0.0;
    let mut modes = Vec::new();
    let mut scrapes = Vec::new();
    for (b, (l0, f0)) in bases.iter().zip(before) {
        let m = scrape(&suite.client, b).await?;
        leaders += flights(&m, "leader") - l0;
        followers += flights(&m, "follower") - f0;
        book_sum += metric_sum(
            &m,
            "score_proxy_redis_operation_duration_seconds_sum",
            &["op=\"book\""],
        );
        book_count += metric_sum(
            &m,
            "score_proxy_redis_operation_duration_seconds_count",
            &["op=\"book\""],
        );
        fallbacks += metric_sum(&m, "score_proxy_shared_fallbacks_total", &[]);
        modes.push(metric_sum(&m, "score_proxy_pacing_mode", &[]));
        scrapes.push(m);
    }
    let book_p99 = bucket_quantile(
        &scrapes,
        "score_proxy_redis_operation_duration_seconds_bucket",
        &["op=\"book\""],
        0.99,
    );
    let st = statuses(&samples);
    show_errors("3 replicas, one key", &samples);
    let wall = samples.iter().map(|s| s.end).fold(launched, f64::max) - launched;
    let lat: Vec<f64> = samples.iter().map(Sample::latency).collect();
    let mut kinds: BTreeMap<String, usize> = BTreeMap::new();
    for s in &samples {
        *kinds
            .entry(s.x_cache.clone().unwrap_or_else(|| "none".into()))
            .or_default() += 1;
    }
    let kinds_text = kinds
        .iter()
        .map(|(k, v)| format!("{v}x{k}"))
        .collect::<Vec<_>>()
        .join(" ");
    println!(
        "{} ({kinds_text}) in {}, {} upstream calls, {leaders} leader / {followers} follower \
         flights",
        fmt_statuses(&st),
        secs(wall),
        stats.calls
    );
    ensure!(
        st.get("200") == Some(&(3 * k)),
        "3 replicas, one key: expected {}x200, got {}",
        3 * k,
        fmt_statuses(&st)
    );
    suite.report.target(
        format!(
            "3 replicas, one key on all three at once x{}: 1 upstream call",
            3 * k
        ),
        format!("{} calls ({kinds_text})", stats.calls),
        stats.calls == 1,
    );
    ensure!(
        fallbacks == 0.0 && modes.iter().all(|&m| m == 1.0),
        "a replica left shared mode during the scenario ({fallbacks} fallbacks, pacing modes \
         {modes:?}): the bursts did not test shared pacing"
    );
    drop(fleet);
    let mut redis = redis;
    if let Some(status) = redis.proc.exited() {
        bail!(
            "redis-server exited ({status}) during the scenario; its log:\n{}",
            redis.proc.log_tail()
        );
    }
    drop(redis);

    let mean_book = if book_count > 0.0 {
        book_sum / book_count
    } else {
        f64::NAN
    };
    let body = format!(
        "Three proxy processes in shared mode (`--redis-url redis://127.0.0.1:PORT \
         --redaction-key bench --expected-replicas 3 --rate {rate} --rate-guard {REPLICA_GUARD}`, \
         metrics on, access log off) in front of the one strict simulator of scenario 1 (1 call/s \
         for everyone, 2 s penalty), sharing a `redis-server --port PORT --bind 127.0.0.1 \
         --save '' --appendonly no` started by the harness; and, in the same run, one process \
         with the same flags but no Redis (single-process pacing). Each burst is N distinct \
         lookups sent at once, each on its own connection, lookup i to replica i mod 3 (round \
         robin); both take the proxy's default queue of 20 (fleet-wide in shared mode) and \
         refuse the rest at once with 429.\n\n\
         **Why the real contract and the default 10 ms guard.** The guard must cover the \
         error of each replica's estimate of Redis's clock (half its quickest recent round \
         trip: the health check reads Redis's `TIME` every 500 ms, and every booking's reply \
         carries Redis's time too) plus each replica's own timer and scheduling jitter. Redis's \
         PING round trip on this loopback: p50 {}, p99 {} (200 PINGs); the replicas' own `book` \
         round trip (the Lua script, from their `score_proxy_redis_operation_duration_seconds`, \
         during the bursts, when every lookup of the burst talks to Redis at once): mean {} \
         over {book_count:.0} booking requests, 99 % at most {} (histogram bucket). A slot is \
         placed with the quiet round trip's error, not a busy booking's; 10 ms covers that with \
         room for timer and scheduling jitter (the *min gap* column shows what was left). At 1 \
         call/s \
         a larger guard costs budget (25 ms: 1/1.025 = 97.6 % of the rate, below the 0.98 \
         target), and scaling the rate up to make the burst shorter would make any guard a \
         larger share of the interval: the real contract keeps the comparison with one process \
         exact.\n\n\
         *Answers (per replica)* is what each replica answered, how many upstream calls it \
         made (its `score_proxy_upstream_calls_total`) and how many booking requests Redis \
         answered (slots booked, and requests refused at the fleet's capacity). *Unused slots* are booked slots that passed without a call \
         (`score_proxy_pacing_unused_slots_total`, all proxies, by reason: `late` is a slot a \
         replica reached more than half the guard after its time, given up rather than risk \
         the neighbouring replica's slot). *Calls / keys* is upstream calls \
         against distinct CPFs that reached the upstream (equal: no key fetched twice). *Min \
         gap* is the smallest interval between two upstream arrivals on the simulator's clock \
         (at least 1 s, or a violation). *Pace* and *budget use* are the upstream's arrivals per \
         second over the run, and that against the configured rate. *Wall*, *ideal* and *listen \
         drops* as in scenario 1.\n\n{}\n\
         **3 replicas against 1 process**, same run, same flags:\n\n{}\n\
         **Cross-replica coalescing.** One new key, {k} lookups of it sent to each of the three \
         replicas at once ({} in all), the upstream answering in {coalesce_latency_ms} ms: \
         {} upstream call(s); answers {} (X-Cache: {kinds_text}) in {}, latency p50 {} p99 {}; \
         flights {leaders:.0} leader / {followers:.0} follower (`score_proxy_shared_flights_total`: \
         a follower is a replica that waited on another's call); {drops} listen drops. No \
         replica fell back from shared mode during the scenario \
         (`score_proxy_shared_fallbacks_total` 0 on all three).\n",
        ms(rtt_p50),
        ms(rtt_p99),
        ms(mean_book),
        ms(book_p99),
        table(
            &[
                "pacing",
                "N",
                "upstream latency",
                "answers",
                "answers (per replica)",
                "wall (200s)",
                "ideal",
                "wall/ideal",
                "calls / keys",
                "violations",
                "min gap",
                "pace",
                "budget use",
                "listen drops",
                "unused slots",
            ],
            &rows
        ),
        table(
            &[
                "N",
                "upstream latency",
                "budget use, 3 replicas",
                "budget use, 1 process",
                "3 replicas vs 1 process",
                "wall, 3 replicas vs 1 process",
            ],
            &versus
        ),
        3 * k,
        stats.calls,
        fmt_statuses(&st),
        secs(wall),
        ms(percentile(&lat, 50.0)),
        ms(percentile(&lat, 99.0)),
    );
    suite.report.section("7. Three replicas, one budget", body);
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Machine facts and the report file
// ---------------------------------------------------------------------------------------

fn command_output(cmd: &str, args: &[&str]) -> String {
    Command::new(cmd)
        .args(args)
        .output()
        .map(|o| {
            let mut s = String::from_utf8_lossy(&o.stdout).trim().to_owned();
            if s.is_empty() {
                s = String::from_utf8_lossy(&o.stderr).trim().to_owned();
            }
            s.lines().next().unwrap_or("").to_owned()
        })
        .unwrap_or_else(|_| "not found".into())
}

/// The 1-minute load average: other work on the machine competes with the benchmark.
fn load_average() -> String {
    fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .next()
        .unwrap_or("?")
        .to_owned()
}

fn machine_facts() -> String {
    let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .unwrap_or("unknown")
        .trim()
        .to_owned();
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mem = fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("MemTotal"))
        .unwrap_or("")
        .split_whitespace()
        .nth(1)
        .and_then(|k| k.parse::<u64>().ok())
        .map_or("unknown".into(), |kb| mib(kb * 1024));
    let os = fs::read_to_string("/etc/os-release")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("PRETTY_NAME="))
        .unwrap_or("unknown")
        .trim_matches('"')
        .to_owned();
    let kernel = fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_owned();
    let load = fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let commit = command_output(
        "git",
        &[
            "-C",
            &manifest_dir().to_string_lossy(),
            "rev-parse",
            "--short",
            "HEAD",
        ],
    );
    let dirty = Command::new("git")
        .args([
            "-C",
            &manifest_dir().to_string_lossy(),
            "status",
            "--porcelain",
            "--",
            "src",
        ])
        .output()
        .map(|o| !o.stdout.is_empty())
        .unwrap_or(false);
    let rows = vec![
        vec![
            "date (UTC)".into(),
            command_output("date", &["-u", "+%Y-%m-%d %H:%M"]),
        ],
        vec!["CPU".into(), format!("{model}, {cores} cores visible")],
        vec!["memory".into(), mem],
        vec!["OS, kernel".into(), format!("{os}, Linux {kernel}")],
        vec![
            "load average at start".into(),
            load.split_whitespace()
                .take(3)
                .collect::<Vec<_>>()
                .join(" "),
        ],
        vec![
            "nginx".into(),
            command_output(
                on_path("nginx")
                    .map_or("nginx".into(), |p| p.display().to_string())
                    .as_str(),
                &["-v"],
            ),
        ],
        vec!["wrk".into(), command_output("wrk", &["-v"])],
        vec!["rustc".into(), command_output("rustc", &["-V"])],
        vec![
            "score-proxy".into(),
            format!(
                "commit {commit}{} (release profile)",
                if dirty {
                    " with uncommitted changes in src/"
                } else {
                    ""
                }
            ),
        ],
    ];
    table(&["what", "value"], &rows)
}

const MARKER: &str = "<!-- HAND-WRITTEN: everything below this line is kept when the benchmark rewrites this file -->";

fn render(suite: &Suite, facts: &str, scenarios: &[&str], elapsed: Duration) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "# Benchmarks: score-proxy against nginx\n");
    let _ = writeln!(
        s,
        "Generated by `benches/compare.rs` ({} run of {}, {:.0} s). The part above the \
         hand-written marker is rewritten by every run; do not edit it by hand.\n",
        if suite.plan.quick { "quick" } else { "full" },
        scenarios.join(", "),
        elapsed.as_secs_f64()
    );
    let _ = writeln!(s, "## Machine\n\n{facts}");
    let _ = writeln!(
        s,
        "Everything runs on this one machine over loopback: the simulator, the proxy or nginx, \
         and the load generator, which competes with them for the same cores. Other work on the \
         machine (see the load average) adds noise; compare the ratios, which are measured in \
         the same run, rather than absolute numbers.\n"
    );
    let _ = writeln!(
        s,
        "## How to reproduce\n\n```sh\n\
         apt-get install -y nginx wrk redis-server   # once\n\
         scripts/bench.sh                            # cargo build --release, then the full suite; writes this file\n\
         scripts/bench.sh --quick                    # the CI smoke test: small sizes, no thresholds\n\
         scripts/bench.sh --only hits,memory         # some scenarios (report under target/bench-report/)\n\
         # or, by hand:\n\
         cargo build --release --workspace && cargo run --release -p score-bench -- [--quick] [--only S] [--out PATH]\n\
         ```\n\n\
         Each run starts its own processes on free loopback ports: `target/release/score-sim`, \
         the proxy (`target/release/score-proxy --listen ... --upstream-url \
         ...`), `nginx -p TMP -e TMP/error.log -c TMP/nginx.conf -g 'daemon off;'`, and for \
         scenario 7 `redis-server --port PORT --bind 127.0.0.1 --save '' --appendonly no`; the \
         cache hits run `wrk {} -s bench/wrk.lua URL` with `BENCH_KEYS` naming the file of request \
         paths.\n",
        suite.plan.wrk_args()
    );
    let confs = suite
        .written_confs
        .iter()
        .map(|p| {
            format!(
                "`{}`",
                p.strip_prefix(manifest_dir()).unwrap_or(p).display()
            )
        })
        .collect::<Vec<_>>()
        .join(", ");
    let _ = writeln!(
        s,
        "## The rival\n\nnginx {}, configured from `bench/nginx.conf.template` as a capable \
         operator would: an outer server with `proxy_cache` keyed on `$arg_client_id:$arg_cpf`, \
         `proxy_cache_valid 200 300s`, `proxy_cache_lock on` (lock timeout and age raised to 60 s \
         so that waiters behind a paced fetch never go upstream on their own); an inner server \
         with `limit_req zone=pace burst=20` on one shared key, `limit_req_status 429`, passing \
         `client-id` as a header; keep-alive to both upstreams; `worker_processes auto`; \
         `access_log off`. It runs at the nominal `rate=1r/s` and at `rate=59r/m`, the rate an \
         operator tunes it to once the strict upstream penalises 1r/s. The exact files used: \
         {}.\n",
        command_output(
            on_path("nginx")
                .map_or("nginx".into(), |p| p.display().to_string())
                .as_str(),
            &["-v"]
        )
        .trim_start_matches("nginx version: "),
        if confs.is_empty() {
            "none in this run".into()
        } else {
            confs
        },
    );
    let _ = writeln!(s, "## Targets\n");
    let rows: Vec<Vec<String>> = suite
        .report
        .targets
        .iter()
        .map(|t| {
            vec![
                t.target.clone(),
                t.measured.clone(),
                match t.verdict {
                    Verdict::Met => "met".into(),
                    Verdict::Missed => "**missed**".into(),
                },
            ]
        })
        .collect();
    let _ = writeln!(
        s,
        "{}",
        table(&["target (score-proxy)", "measured", "verdict"], &rows)
    );
    for (title, body) in &suite.report.sections {
        let _ = writeln!(s, "## {title}\n\n{body}");
    }
    s
}

fn write_report(path: &Path, generated: &str) -> Result<()> {
    let kept = fs::read_to_string(path)
        .ok()
        .and_then(|old| old.find(MARKER).map(|i| old[i..].to_owned()))
        .unwrap_or_else(|| format!("{MARKER}\n\n## Analysis\n\n(to be written)\n"));
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir)?;
    }
    fs::write(path, format!("{generated}\n{kept}"))
        .with_context(|| format!("writing {}", path.display()))
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
    if scenarios.iter().any(|s| *s != "memory") {
        on_path("nginx").context(
            "nginx is not on PATH: install it with `apt-get install -y nginx` (CI does)",
        )?;
    }
    if scenarios.contains(&"replicas") {
        on_path("redis-server").context(
            "redis-server is not on PATH: the replicas scenario needs it \
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
    let client = client()?;
    let sim = Sim::start(&bin.with_file_name("score-sim"), &ws, &client).await?;
    println!(
        "compare: simulator on port {} (clock offset measured to ±{:.2} ms)",
        sim.port,
        sim.offset_error * 1e3
    );
    let mut suite = Suite {
        plan,
        bin,
        ws,
        client,
        sim,
        conf_dir,
        written_confs: Vec::new(),
        instances: AtomicU64::new(0),
        report: Report::default(),
    };
    for s in &scenarios {
        let t = Instant::now();
        let load_before = load_average();
        match *s {
            "burst" => scenario_burst(&mut suite).await,
            "identical" => scenario_identical(&mut suite).await,
            "hits" => scenario_hits(&mut suite).await,
            "overload" => scenario_overload(&mut suite).await,
            "telemetry" => scenario_telemetry(&mut suite).await,
            "memory" => scenario_memory(&mut suite).await,
            "replicas" => scenario_replicas(&mut suite).await,
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
    let generated = render(&suite, &facts, &scenarios, started.elapsed());
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
        return memory_child(n, &args.store);
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
