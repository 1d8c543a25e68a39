//! The load generator: traffic that makes every panel of the observability stack show
//! something, and a deterministic tour of every outcome for the end-to-end check.
//!
//! Two modes:
//! - **continuous** (`docker compose up`): a steady, seeded mix of repeated CPFs (cache
//!   hits), new ones (misses that spend upstream budget), identical concurrent lookups
//!   (coalesced), bad inputs (`400`), an id the upstream rejects (`401`), impatient clients
//!   that hang up while queued (abandoned), and periodic bursts of distinct lookups larger
//!   than the queue (refusals). With `--sim-url` and `--chaos-every` it also makes the
//!   simulator fail for a few seconds now and then. It runs for `--duration`, or until
//!   SIGINT/SIGTERM, and returns what it counted.
//! - **once** (`score-proxy loadgen --mode once`): drives each outcome at least once, in a
//!   fixed order, each within `--step-timeout`, and reports any it could not provoke in
//!   [`LoadgenReport::missing`]. Outcomes that need the upstream to misbehave (5xx, garbage,
//!   timeout, penalty) need `--sim-url`, and one (an unused pacer slot) can only
//!   be seen on the proxy's `/metrics`; without them they are listed in
//!   [`LoadgenReport::skipped`].
//!
//! Sizes come from the proxy itself (`/status` gives the queue's capacity and the pacing
//! interval), so the same command works against the fast settings of the tests and the
//! real 1 call/s of the compose stack.
//!
//! **Several targets** (`--target a,b,c`, e.g. the replicas of a fleet): requests go to them
//! in turn (round-robin), bursts are scaled by the number of targets so that each one still
//! sees more than its queue holds, a lookup repeated to provoke a hit or an unused slot goes
//! to the same target as the lookup it repeats, and the proxies' counters are summed over
//! every target. The targets are expected to share one upstream (the one `--sim-url`
//! controls): one fleet behind one budget, or proxies that each have their own.
//!
//! Like everything else here, it never logs a CPF or a client id: progress lines carry
//! counts only, and the report is keyed by status code and outcome name.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context as _, bail};
use serde::Serialize;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio::time::Instant;
use url::Url;

use score_validation::Cpf;

/// How the generator drives the proxy.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum LoadgenMode {
    /// A realistic mix, until `--duration` or a signal.
    Continuous,
    /// Every outcome at least once, then a report.
    Once,
}

impl LoadgenMode {
    fn as_str(self) -> &'static str {
        match self {
            LoadgenMode::Continuous => "continuous",
            LoadgenMode::Once => "once",
        }
    }
}

/// Arguments of `score-proxy loadgen`. Every setting has a flag and a `LOADGEN_*` variable.
#[derive(clap::Args, Debug, Clone)]
pub struct LoadgenArgs {
    /// Base URL of the proxy; several, comma-separated (e.g. the replicas of a fleet), get
    /// the requests in turn.
    #[arg(
        long,
        env = "LOADGEN_TARGET",
        value_delimiter = ',',
        default_value = "http://127.0.0.1:8000"
    )]
    pub target: Vec<Url>,
    /// Client ids the upstream accepts, comma-separated; lookups are spread over them.
    #[arg(
        long,
        env = "LOADGEN_CLIENT_IDS",
        value_delimiter = ',',
        default_value = "000,001,002,003"
    )]
    pub client_ids: Vec<String>,
    /// A client id the upstream rejects (provokes `401`).
    #[arg(long, env = "LOADGEN_BAD_CLIENT_ID", default_value = "unknown-client")]
    pub bad_client_id: String,
    /// How long to run (default: until stopped; `once` ignores it).
    #[arg(long, env = "LOADGEN_DURATION", value_parser = humantime::parse_duration)]
    pub duration: Option<Duration>,
    /// `continuous` (a realistic mix) or `once` (every outcome once, then a report).
    #[arg(long, env = "LOADGEN_MODE", value_enum, default_value_t = LoadgenMode::Continuous)]
    pub mode: LoadgenMode,
    /// Base URL of the upstream simulator, whose `/__sim/config` makes it fail on purpose.
    /// Leave unset in front of the real API.
    #[arg(long, env = "LOADGEN_SIM_URL")]
    pub sim_url: Option<Url>,
    /// Continuous mode: lookups per second of the steady mix (bursts come on top).
    #[arg(long, env = "LOADGEN_RATE", default_value_t = 3.0)]
    pub rate: f64,
    /// Continuous mode: how often a burst of distinct lookups larger than the queue arrives.
    #[arg(long, env = "LOADGEN_BURST_EVERY", default_value = "60s", value_parser = humantime::parse_duration)]
    pub burst_every: Duration,
    /// Continuous mode with --sim-url: how often the simulator fails for a few seconds
    /// (error, garbage, hang in turn); 0s never.
    #[arg(long, env = "LOADGEN_CHAOS_EVERY", default_value = "0s", value_parser = humantime::parse_duration)]
    pub chaos_every: Duration,
    /// Seed of the mix: the same seed sends the same sequence of choices.
    #[arg(long, env = "LOADGEN_SEED", default_value_t = 1)]
    pub seed: u64,
    /// How long a patient client waits for an answer.
    #[arg(long, env = "LOADGEN_REQUEST_TIMEOUT", default_value = "60s", value_parser = humantime::parse_duration)]
    pub request_timeout: Duration,
    /// Once mode: how long each outcome may take to appear.
    #[arg(long, env = "LOADGEN_STEP_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration)]
    pub step_timeout: Duration,
    /// Most requests open at once.
    #[arg(long, env = "LOADGEN_MAX_IN_FLIGHT", default_value_t = 256)]
    pub max_in_flight: usize,
}

/// What a run sent and what came back.
#[derive(Clone, Debug, Default, Serialize)]
pub struct LoadgenReport {
    pub mode: &'static str,
    pub elapsed_seconds: f64,
    /// Requests sent (lookups and the other routes).
    pub requests: u64,
    /// Answers by HTTP status code.
    pub by_status: BTreeMap<u16, u64>,
    /// Requests sent to each target (its base URL as given), answered or not.
    pub by_target: BTreeMap<String, u64>,
    /// Answers by outcome: the `X-Cache` value of a `200` (`hit`, `miss`, `coalesced`,
    /// `stale`), the `error` kind of any other answer; plus, in once mode, `abandoned`,
    /// `unused_slot` and `penalty` when the proxy's own counters moved.
    pub by_outcome: BTreeMap<String, u64>,
    /// Requests this generator hung up on before an answer came, on purpose.
    pub hung_up: u64,
    /// Requests that failed without an HTTP answer (connection refused or reset).
    pub transport_errors: u64,
    /// Once mode: outcomes that could not be provoked within the step timeout.
    pub missing: Vec<String>,
    /// Once mode: outcomes not attempted (they need `--sim-url`, or `/metrics` on the
    /// target to be seen).
    pub skipped: Vec<String>,
}

impl LoadgenReport {
    /// Whether every attempted outcome was seen (always true for continuous runs).
    pub fn is_complete(&self) -> bool {
        self.missing.is_empty()
    }
}

impl fmt::Display for LoadgenReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "loadgen ({}): {} requests in {:.1}s, {} hung up on purpose, {} transport errors",
            self.mode, self.requests, self.elapsed_seconds, self.hung_up, self.transport_errors
        )?;
        let statuses: Vec<String> = self
            .by_status
            .iter()
            .map(|(s, n)| format!("{s}={n}"))
            .collect();
        writeln!(f, "  by status:  {}", statuses.join(" "))?;
        if self.by_target.len() > 1 {
            let targets: Vec<String> = self
                .by_target
                .iter()
                .map(|(t, n)| format!("{t}={n}"))
                .collect();
            writeln!(f, "  by target:  {}", targets.join(" "))?;
        }
        let outcomes: Vec<String> = self
            .by_outcome
            .iter()
            .map(|(o, n)| format!("{o}={n}"))
            .collect();
        writeln!(f, "  by outcome: {}", outcomes.join(" "))?;
        if !self.skipped.is_empty() {
            writeln!(f, "  skipped (no --sim-url): {}", self.skipped.join(" "))?;
        }
        if !self.missing.is_empty() {
            writeln!(f, "  NOT PROVOKED: {}", self.missing.join(" "))?;
        }
        Ok(())
    }
}

/// Runs the generator as `args.mode` says and returns what it counted.
pub async fn run(args: LoadgenArgs) -> anyhow::Result<LoadgenReport> {
    if args.target.is_empty() {
        bail!("--target: at least one proxy URL is needed");
    }
    if args.client_ids.iter().all(|c| c.trim().is_empty()) {
        bail!("--client-ids: at least one client id is needed");
    }
    if !(args.rate.is_finite() && args.rate > 0.0 && args.rate <= 10_000.0) {
        bail!("--rate: must be more than 0 and at most 10000 per second");
    }
    let generator = Generator::new(&args)?;
    let started = Instant::now();
    generator.wait_until_up(Duration::from_secs(30)).await?;
    let (missing, skipped) = match args.mode {
        LoadgenMode::Once => generator.once(&args).await?,
        LoadgenMode::Continuous => {
            generator.continuous(&args).await?;
            (Vec::new(), Vec::new())
        }
    };
    let tally = generator
        .tally
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    Ok(LoadgenReport {
        mode: args.mode.as_str(),
        elapsed_seconds: started.elapsed().as_secs_f64(),
        requests: tally.requests,
        by_status: tally.by_status,
        by_target: tally.by_target,
        by_outcome: tally.by_outcome,
        hung_up: tally.hung_up,
        transport_errors: tally.transport_errors,
        missing,
        skipped,
    })
}

/// What one request came to.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Sent {
    Answered {
        status: u16,
        outcome: String,
    },
    /// We stopped waiting (the client "left").
    HungUp,
    /// No HTTP answer at all.
    Failed,
}

impl Sent {
    fn outcome(&self) -> Option<&str> {
        match self {
            Sent::Answered { outcome, .. } => Some(outcome),
            _ => None,
        }
    }
}

#[derive(Clone, Debug, Default)]
struct Tally {
    requests: u64,
    by_status: BTreeMap<u16, u64>,
    by_target: BTreeMap<String, u64>,
    by_outcome: BTreeMap<String, u64>,
    hung_up: u64,
    transport_errors: u64,
}

impl Tally {
    fn count(&mut self, target: &str, sent: &Sent) {
        self.requests += 1;
        *self.by_target.entry(target.to_owned()).or_default() += 1;
        match sent {
            Sent::Answered { status, outcome } => {
                *self.by_status.entry(*status).or_default() += 1;
                *self.by_outcome.entry(outcome.clone()).or_default() += 1;
            }
            Sent::HungUp => self.hung_up += 1,
            Sent::Failed => self.transport_errors += 1,
        }
    }
}

/// What the proxy says about itself in `/status` (the fields the generator sizes by).
#[derive(Clone, Copy, Debug)]
struct ProxyShape {
    queue_capacity: usize,
    interval: Duration,
}

/// Inputs the proxy must refuse with `400` before they reach the cache or the upstream.
const BAD_CPFS: [&str; 6] = [
    "12345678900",    // check digits do not match
    "1234",           // too short
    "11111111111",    // all digits the same
    "",               // missing
    "016.587.390-6x", // not a digit
    "abcdefghijk",    // not digits at all
];

/// How many distinct CPFs each client keeps asking about again (the cache's working set).
const POPULAR_CPFS: u32 = 40;

/// First nine digits of the popular CPFs; new ones are counted from [`NEW_CPF_BASE`] on.
const POPULAR_BASE: u32 = 100_000_000;
const NEW_CPF_BASE: u32 = 300_000_000;

/// Once mode: the least time between two tries at the same outcome.
const RETRY_PAUSE: Duration = Duration::from_millis(250);

/// How long a simulator fault lasts in continuous mode.
const CHAOS_LENGTH: Duration = Duration::from_secs(6);

/// Faults the continuous mode injects, in turn.
const CHAOS_FAULTS: [&str; 3] = ["error", "garbage", "hang"];

struct Generator {
    http: reqwest::Client,
    targets: Vec<Url>,
    /// The round-robin's position: the next request goes to `targets[next % len]`.
    next_target: AtomicUsize,
    sim: Option<Url>,
    clients: Vec<String>,
    bad_client: String,
    patience: Duration,
    next_cpf: AtomicU32,
    tally: Mutex<Tally>,
    limit: Arc<Semaphore>,
}

impl Generator {
    fn new(args: &LoadgenArgs) -> anyhow::Result<Arc<Generator>> {
        let http = reqwest::Client::builder()
            // Loopback and compose-network targets only: never through an environment proxy.
            .no_proxy()
            .connect_timeout(Duration::from_secs(5))
            .pool_max_idle_per_host(64)
            .build()
            .context("cannot build the HTTP client")?;
        let seed_offset = u32::try_from(args.seed % 1_000).unwrap_or(0) * 100_000;
        Ok(Arc::new(Generator {
            http,
            targets: args.target.clone(),
            next_target: AtomicUsize::new(0),
            sim: args.sim_url.clone(),
            clients: args
                .client_ids
                .iter()
                .map(|c| c.trim().to_owned())
                .filter(|c| !c.is_empty())
                .collect(),
            bad_client: args.bad_client_id.clone(),
            patience: args.request_timeout,
            next_cpf: AtomicU32::new(NEW_CPF_BASE + seed_offset),
            tally: Mutex::new(Tally::default()),
            limit: Arc::new(Semaphore::new(args.max_in_flight.max(1))),
        }))
    }

    /// The target the next request goes to (round-robin).
    fn next_target(&self) -> usize {
        self.next_target.fetch_add(1, Ordering::Relaxed) % self.targets.len()
    }

    /// How many proxies share the traffic: bursts are this many times larger, so each one
    /// still sees more than its queue holds (and a fleet sharing one queue, more than it).
    fn fleet(&self) -> usize {
        self.targets.len()
    }

    fn url(&self, target: usize, path: &str) -> Url {
        let mut url = self.targets[target].clone();
        url.set_path(path);
        url.set_query(None);
        url
    }

    fn count(&self, target: usize, sent: &Sent) {
        self.tally
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .count(self.targets[target].as_str(), sent);
    }

    fn note(&self, outcome: &str) {
        *self
            .tally
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .by_outcome
            .entry(outcome.to_owned())
            .or_default() += 1;
    }

    /// A valid CPF nobody asked about yet in this run.
    fn new_cpf(&self) -> String {
        loop {
            let base = self.next_cpf.fetch_add(1, Ordering::Relaxed);
            if let Some(cpf) = Cpf::from_base(base % 1_000_000_000) {
                return cpf.to_string();
            }
        }
    }

    fn popular_cpf(k: u32) -> String {
        let mut base = POPULAR_BASE + k * 7919;
        loop {
            if let Some(cpf) = Cpf::from_base(base) {
                return cpf.to_string();
            }
            base += 1;
        }
    }

    fn client(&self, i: usize) -> &str {
        &self.clients[i % self.clients.len()]
    }

    /// Waits for every target's `/health` to answer `200`, so a run started with the proxy
    /// fails clearly instead of counting connection errors.
    async fn wait_until_up(&self, within: Duration) -> anyhow::Result<()> {
        let end = Instant::now() + within;
        let mut waiting: Vec<usize> = (0..self.targets.len()).collect();
        loop {
            let mut still = Vec::new();
            for target in waiting {
                let ok = self
                    .http
                    .get(self.url(target, "/health"))
                    .timeout(Duration::from_secs(2))
                    .send()
                    .await
                    .is_ok_and(|r| r.status().is_success());
                if !ok {
                    still.push(target);
                }
            }
            if still.is_empty() {
                return Ok(());
            }
            if Instant::now() >= end {
                let names: Vec<&str> = still.iter().map(|&t| self.targets[t].as_str()).collect();
                bail!(
                    "the proxy at {} did not answer /health within {}",
                    names.join(", "),
                    humantime::format_duration(within)
                );
            }
            waiting = still;
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// One lookup, to the next target in turn; hangs up after `patience`.
    async fn lookup(&self, cpf: &str, client: &str, patience: Duration) -> Sent {
        self.lookup_on(self.next_target(), cpf, client, patience)
            .await
    }

    /// One lookup, to the given target.
    async fn lookup_on(&self, target: usize, cpf: &str, client: &str, patience: Duration) -> Sent {
        let mut url = self.url(target, "/proxy/score");
        url.query_pairs_mut()
            .append_pair("cpf", cpf)
            .append_pair("client_id", client);
        self.get(target, url, patience).await
    }

    /// A GET of a path other than a lookup, to the next target in turn.
    async fn get_path(&self, path: &str, patience: Duration) -> Sent {
        let target = self.next_target();
        self.get(target, self.url(target, path), patience).await
    }

    /// A GET to `target` whose answer is classified and counted.
    async fn get(&self, target: usize, url: Url, patience: Duration) -> Sent {
        self.get_with(target, url, patience, None).await
    }

    /// As [`Generator::get`], optionally telling the proxy how long this client will wait
    /// for its lookup to start (`X-Queue-Timeout`).
    async fn get_with(
        &self,
        target: usize,
        url: Url,
        patience: Duration,
        queue_timeout: Option<Duration>,
    ) -> Sent {
        let _permit = self.limit.acquire().await;
        let mut request = self.http.get(url);
        if let Some(wait) = queue_timeout {
            request = request.header(
                score_validation::QUEUE_TIMEOUT_HEADER,
                format!("{:.3}", wait.as_secs_f64()),
            );
        }
        let exchange = async {
            let response = request.send().await?;
            let status = response.status().as_u16();
            let cache = response
                .headers()
                .get("x-cache")
                .and_then(|v| v.to_str().ok())
                .map(str::to_ascii_lowercase);
            let body = response.bytes().await?;
            Ok::<_, reqwest::Error>((status, cache, body))
        };
        // Dropping the exchange closes the connection: to the proxy, the client left.
        let sent = match tokio::time::timeout(patience, exchange).await {
            Err(_) => Sent::HungUp,
            Ok(Err(_)) => Sent::Failed,
            Ok(Ok((status, cache, body))) => Sent::Answered {
                status,
                outcome: classify(status, cache, &body),
            },
        };
        self.count(target, &sent);
        sent
    }

    async fn status(&self, target: usize) -> anyhow::Result<serde_json::Value> {
        let body = self
            .http
            .get(self.url(target, "/status"))
            .timeout(Duration::from_secs(5))
            .send()
            .await
            .context("GET /status")?
            .error_for_status()
            .context("GET /status")?
            .bytes()
            .await
            .context("GET /status")?;
        serde_json::from_slice(&body).context("/status is not JSON")
    }

    /// The first target's shape: the replicas of a fleet share their settings.
    async fn shape(&self) -> ProxyShape {
        let status = self.status(0).await.ok();
        let field = |name: &str| status.as_ref().and_then(|s| s.get(name)).cloned();
        ProxyShape {
            queue_capacity: field("queue_capacity")
                .and_then(|v| v.as_u64())
                .map_or(20, |c| c as usize)
                .clamp(1, 1_000),
            interval: field("interval_seconds")
                .and_then(|v| v.as_f64())
                .filter(|s| s.is_finite() && *s > 0.0 && *s < 60.0)
                .map_or(Duration::from_millis(1010), Duration::from_secs_f64),
        }
    }

    /// Whether any target is pausing for a penalty.
    async fn penalty_active(&self) -> bool {
        for target in 0..self.targets.len() {
            let active = self
                .status(target)
                .await
                .ok()
                .and_then(|s| s.get("penalty_active").and_then(|v| v.as_bool()))
                .unwrap_or(false);
            if active {
                return true;
            }
        }
        false
    }

    /// The sum of every series of a counter on every target's `/metrics`, or `None` when
    /// any target does not serve them there (`--public-metrics false`): a partial sum could
    /// seem to rise when a target that failed once answers again.
    async fn metric(&self, name: &str) -> Option<f64> {
        let mut sum = 0.0;
        for target in 0..self.targets.len() {
            sum += self.metric_on(target, name).await?;
        }
        Some(sum)
    }

    async fn metric_on(&self, target: usize, name: &str) -> Option<f64> {
        let mut url = self.url(target, "/metrics");
        url.set_query(Some("format=prometheus"));
        let response = self
            .http
            .get(url)
            .header("accept", "text/plain")
            .timeout(Duration::from_secs(5))
            .send()
            .await
            .ok()?;
        if !response.status().is_success() {
            return None;
        }
        let text = response.text().await.ok()?;
        sum_metric(&text, name)
    }

    // The simulator's control endpoint.

    fn sim_url(&self) -> anyhow::Result<Url> {
        let mut url = self
            .sim
            .clone()
            .context("this step needs --sim-url (the simulator's base URL)")?;
        url.set_path("/__sim/config");
        url.set_query(None);
        Ok(url)
    }

    async fn sim_config(&self) -> anyhow::Result<serde_json::Value> {
        let url = self.sim_url()?;
        let body = self
            .http
            .get(url)
            .timeout(Duration::from_secs(5))
            .send()
            .await
            .context("GET /__sim/config")?
            .error_for_status()
            .context("GET /__sim/config")?
            .bytes()
            .await
            .context("GET /__sim/config")?;
        serde_json::from_slice(&body).context("/__sim/config is not JSON")
    }

    async fn sim_set(&self, change: serde_json::Value) -> anyhow::Result<()> {
        let url = self.sim_url()?;
        self.http
            .put(url)
            .header("content-type", "application/json")
            .body(change.to_string())
            .timeout(Duration::from_secs(5))
            .send()
            .await
            .context("PUT /__sim/config")?
            .error_for_status()
            .context("PUT /__sim/config")?;
        Ok(())
    }

    /// The knobs this generator turns, as they are now, to put back afterwards.
    async fn sim_saved(&self) -> anyhow::Result<serde_json::Value> {
        let config = self.sim_config().await?;
        Ok(serde_json::json!({
            "fault": config.get("fault").cloned().unwrap_or("none".into()),
            "min_interval_ms": config.get("min_interval_ms").cloned().unwrap_or(1000.into()),
        }))
    }

    // Once mode.

    async fn once(
        self: &Arc<Self>,
        args: &LoadgenArgs,
    ) -> anyhow::Result<(Vec<String>, Vec<String>)> {
        // The other routes, once each on every target, so their series have samples.
        for target in 0..self.targets.len() {
            for path in ["/health", "/ready", "/status", "/no-such-endpoint"] {
                self.get(target, self.url(target, path), Duration::from_secs(5))
                    .await;
            }
        }
        if self.sim.is_some() {
            // Fail early and clearly if the control endpoint is not there.
            self.sim_config().await?;
        }
        let shape = self.shape().await;
        let metrics = self.metric("score_proxy_build_info").await.is_some();
        let mut seen: BTreeSet<String> = BTreeSet::new();
        let mut missing = Vec::new();
        let mut skipped = Vec::new();
        for target in Target::ALL {
            if (target.needs_sim() && self.sim.is_none()) || (target.needs_metrics() && !metrics) {
                skipped.push(target.outcome().to_owned());
                continue;
            }
            let end = Instant::now() + args.step_timeout;
            let mut first = true;
            while !seen.contains(target.outcome()) {
                if Instant::now() >= end {
                    missing.push(target.outcome().to_owned());
                    break;
                }
                if !first {
                    // The proxy may be refusing everything for a while (an open circuit
                    // breaker, a penalty): try again at a walking pace, not in a tight loop.
                    tokio::time::sleep(shape.interval.max(RETRY_PAUSE)).await;
                }
                first = false;
                let observed = self.attempt(target, shape).await?;
                seen.extend(observed);
            }
            tracing::info!(
                outcome = target.outcome(),
                seen = seen.contains(target.outcome()),
                "loadgen step done"
            );
        }
        Ok((missing, skipped))
    }

    /// One try at provoking `target`; returns every outcome it produced.
    async fn attempt(
        self: &Arc<Self>,
        target: Target,
        shape: ProxyShape,
    ) -> anyhow::Result<Vec<String>> {
        let patient = self.patience;
        let client = self.client(0).to_owned();
        let outcomes = match target {
            Target::Miss | Target::Hit => {
                // Both to one target: a hit must not depend on a cache shared between them.
                let on = self.next_target();
                let cpf = self.new_cpf();
                let first = self.lookup_on(on, &cpf, &client, patient).await;
                let second = self.lookup_on(on, &cpf, &client, patient).await;
                outcomes_of([first, second])
            }
            Target::Coalesced => {
                let cpf = self.new_cpf();
                let sent = self
                    .all((0..8).map(|_| (cpf.clone(), client.clone(), patient)))
                    .await;
                outcomes_of(sent)
            }
            Target::InvalidRequest => {
                let mut sent = Vec::new();
                for cpf in BAD_CPFS {
                    sent.push(self.lookup(cpf, &client, patient).await);
                }
                outcomes_of(sent)
            }
            Target::NotFound => outcomes_of([self.get_path("/no-such-endpoint", patient).await]),
            Target::Unauthorized => {
                let bad = self.bad_client.clone();
                outcomes_of([self.lookup(&self.new_cpf(), &bad, patient).await])
            }
            Target::QueueFull => {
                let n = (shape.queue_capacity * 2 + 4) * self.fleet();
                let sent = self.all(self.distinct(n, patient)).await;
                outcomes_of(sent)
            }
            Target::Abandoned => {
                let before = self.metric("score_proxy_queue_abandoned_total").await;
                // Two starts' worth of patience: the head of the burst is answered, the
                // rest is still queued when its clients leave.
                let impatient = shape.interval * 2 + Duration::from_millis(100);
                let sent = self
                    .all(self.distinct(shape.queue_capacity * self.fleet(), impatient))
                    .await;
                let hung_up = sent.contains(&Sent::HungUp);
                let mut outcomes = outcomes_of(sent);
                let moved = self
                    .poll_metric_increase("score_proxy_queue_abandoned_total", before)
                    .await;
                // Without /metrics, the hang-ups are the only evidence there is.
                if moved.unwrap_or(hung_up) {
                    self.note("abandoned");
                    outcomes.push("abandoned".into());
                }
                outcomes
            }
            Target::UnusedSlot => {
                // A call starts; a second lookup, right behind it on the same target, waits
                // for the pacer's next start and hangs up before it comes: the slot goes
                // unused.
                let before = self.metric("score_proxy_pacing_unused_slots_total").await;
                let on = self.next_target();
                let quitter = (shape.interval / 4).max(Duration::from_millis(30));
                let spawn = |tasks: &mut JoinSet<Sent>, patience: Duration| {
                    let (generator, cpf, client) = (self.clone(), self.new_cpf(), client.clone());
                    tasks.spawn(
                        async move { generator.lookup_on(on, &cpf, &client, patience).await },
                    );
                };
                let mut tasks = JoinSet::new();
                spawn(&mut tasks, patient);
                tokio::time::sleep(Duration::from_millis(10)).await;
                spawn(&mut tasks, quitter);
                let mut sent = Vec::new();
                while let Some(done) = tasks.join_next().await {
                    if let Ok(s) = done {
                        sent.push(s);
                    }
                }
                let mut outcomes = outcomes_of(sent);
                let moved = self
                    .poll_metric_increase("score_proxy_pacing_unused_slots_total", before)
                    .await;
                // Without /metrics there is no way to tell; do not claim it.
                if moved == Some(true) {
                    self.note("unused_slot");
                    outcomes.push("unused_slot".into());
                }
                outcomes
            }
            Target::UpstreamError | Target::UpstreamBadBody | Target::UpstreamTimeout => {
                let fault = match target {
                    Target::UpstreamError => "error",
                    Target::UpstreamBadBody => "garbage",
                    _ => "hang",
                };
                let saved = self.sim_saved().await?;
                self.sim_set(serde_json::json!({ "fault": fault })).await?;
                let sent = self.lookup(&self.new_cpf(), &client, patient).await;
                self.sim_set(saved).await?;
                outcomes_of([sent])
            }
            Target::Penalty => self.penalty(shape).await?,
            Target::DeadlineUnreachable => self.deadline(shape).await,
        };
        Ok(outcomes)
    }

    /// A burst of distinct lookups from clients that will wait only an interval and a half
    /// for their call to start (`X-Queue-Timeout`): the third and later cannot, and are
    /// refused at once (`deadline_unreachable`).
    async fn deadline(self: &Arc<Self>, shape: ProxyShape) -> Vec<String> {
        let wait = shape.interval.mul_f64(1.5);
        let mut tasks = JoinSet::new();
        for (cpf, client, patience) in self.distinct(4, self.patience) {
            let generator = self.clone();
            tasks.spawn(async move {
                let target = generator.next_target();
                let mut url = generator.url(target, "/proxy/score");
                url.query_pairs_mut()
                    .append_pair("cpf", &cpf)
                    .append_pair("client_id", &client);
                generator.get_with(target, url, patience, Some(wait)).await
            });
        }
        let mut sent = Vec::new();
        while let Some(done) = tasks.join_next().await {
            if let Ok(s) = done {
                sent.push(s);
            }
        }
        outcomes_of(sent)
    }

    /// Makes the simulator stricter than the proxy's pace, so the proxy's second call lands
    /// inside the upstream's interval and is penalised; while the proxy pauses, a burst of
    /// distinct lookups finds its schedule pushed out (`upstream_penalty`: refused because
    /// of the penalty). The simulator is put back before the answers are awaited, so
    /// retries succeed.
    async fn penalty(self: &Arc<Self>, shape: ProxyShape) -> anyhow::Result<Vec<String>> {
        let saved = self.sim_saved().await?;
        let before = self.metric("score_proxy_pacing_penalties_total").await;
        let strict_ms = (shape.interval.as_millis() as u64 * 4).max(1_000);
        self.sim_set(serde_json::json!({ "min_interval_ms": strict_ms }))
            .await?;
        let mut tasks = JoinSet::new();
        let trigger: Vec<_> = self.distinct(3, self.patience).collect();
        self.spawn_all(&mut tasks, trigger);

        // Wait (bounded) for the proxy to report the pause.
        let mut penalised = false;
        let end = Instant::now() + shape.interval * 4 + Duration::from_secs(3);
        while Instant::now() < end {
            if self.penalty_active().await {
                penalised = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if penalised {
            let burst: Vec<_> = self
                .distinct(shape.queue_capacity * self.fleet(), self.patience)
                .collect();
            self.spawn_all(&mut tasks, burst);
        }
        let restored = self.sim_set(saved).await;
        let mut sent = Vec::new();
        while let Some(done) = tasks.join_next().await {
            if let Ok(s) = done {
                sent.push(s);
            }
        }
        restored?;
        let mut outcomes = outcomes_of(sent);
        let moved = self
            .poll_metric_increase("score_proxy_pacing_penalties_total", before)
            .await;
        if moved.unwrap_or(penalised) {
            self.note("penalty");
            outcomes.push("penalty".into());
        }
        // Let the pause end before the next step.
        let end = Instant::now() + Duration::from_secs(10);
        while self.penalty_active().await && Instant::now() < end {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(outcomes)
    }

    /// Whether the counter rose above `before` (polled briefly: the proxy records after it
    /// answers); `None` when the proxy's metrics cannot be read.
    async fn poll_metric_increase(&self, name: &str, before: Option<f64>) -> Option<bool> {
        let before = before?;
        let end = Instant::now() + Duration::from_secs(2);
        loop {
            let now = self.metric(name).await?;
            if now > before {
                return Some(true);
            }
            if Instant::now() >= end {
                return Some(false);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// `n` lookups of new CPFs, spread over the clients.
    fn distinct(
        &self,
        n: usize,
        patience: Duration,
    ) -> impl Iterator<Item = (String, String, Duration)> + '_ {
        (0..n).map(move |i| (self.new_cpf(), self.client(i).to_owned(), patience))
    }

    fn spawn_all(
        self: &Arc<Self>,
        tasks: &mut JoinSet<Sent>,
        lookups: impl IntoIterator<Item = (String, String, Duration)>,
    ) {
        for (cpf, client, patience) in lookups {
            let generator = self.clone();
            tasks.spawn(async move { generator.lookup(&cpf, &client, patience).await });
        }
    }

    /// Sends the lookups at once and waits for every one of them.
    async fn all(
        self: &Arc<Self>,
        lookups: impl IntoIterator<Item = (String, String, Duration)>,
    ) -> Vec<Sent> {
        let mut tasks = JoinSet::new();
        self.spawn_all(&mut tasks, lookups);
        let mut sent = Vec::new();
        while let Some(done) = tasks.join_next().await {
            if let Ok(s) = done {
                sent.push(s);
            }
        }
        sent
    }

    // Continuous mode.

    async fn continuous(self: &Arc<Self>, args: &LoadgenArgs) -> anyhow::Result<()> {
        let shape = self.shape().await;
        let mut rng = SplitMix64(args.seed);
        let mut tasks: JoinSet<Sent> = JoinSet::new();
        let stop = async {
            match args.duration {
                Some(d) => tokio::time::sleep(d).await,
                None => shutdown_signal().await,
            }
        };
        tokio::pin!(stop);

        let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / args.rate));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let first_burst = Instant::now() + args.burst_every.min(Duration::from_secs(20));
        let mut burst =
            tokio::time::interval_at(first_burst, args.burst_every.max(Duration::from_secs(1)));
        let mut coalesce = tokio::time::interval(Duration::from_secs(15));
        let mut progress = tokio::time::interval(Duration::from_secs(30));
        let chaos_on = self.sim.is_some() && !args.chaos_every.is_zero();
        let mut chaos = tokio::time::interval_at(
            Instant::now() + args.chaos_every,
            args.chaos_every.max(Duration::from_secs(1)),
        );
        let mut chaos_until: Option<(Instant, serde_json::Value)> = None;
        let mut next_fault = 0usize;

        loop {
            tokio::select! {
                () = &mut stop => break,
                _ = tick.tick() => {
                    let request = self.pick(&mut rng);
                    let generator = self.clone();
                    tasks.spawn(async move { generator.send(request).await });
                }
                _ = burst.tick() => {
                    // More distinct lookups than the queue holds: refusals, a full queue, and
                    // (for the impatient third) abandoned lookups.
                    let n = shape.queue_capacity * self.fleet() + 10;
                    for i in 0..n {
                        let patience = if i % 3 == 2 {
                            shape.interval * 3
                        } else {
                            self.patience
                        };
                        let request = Request::Lookup {
                            cpf: self.new_cpf(),
                            client: i,
                            patience,
                        };
                        let generator = self.clone();
                        tasks.spawn(async move { generator.send(request).await });
                    }
                }
                _ = coalesce.tick() => {
                    let cpf = self.new_cpf();
                    let client = rng.below(self.clients.len() as u64) as usize;
                    for _ in 0..5 {
                        let request = Request::Lookup { cpf: cpf.clone(), client, patience: self.patience };
                        let generator = self.clone();
                        tasks.spawn(async move { generator.send(request).await });
                    }
                }
                _ = chaos.tick(), if chaos_on && chaos_until.is_none() => {
                    let fault = CHAOS_FAULTS[next_fault % CHAOS_FAULTS.len()];
                    next_fault += 1;
                    match self.sim_saved().await {
                        Ok(saved) => match self.sim_set(serde_json::json!({ "fault": fault })).await {
                            Ok(()) => {
                                tracing::info!(fault, "loadgen: simulator failing on purpose");
                                chaos_until = Some((Instant::now() + CHAOS_LENGTH, saved));
                            }
                            Err(e) => tracing::warn!(error = %format!("{e:#}"), "loadgen: cannot set a simulator fault"),
                        },
                        Err(e) => tracing::warn!(error = %format!("{e:#}"), "loadgen: cannot read the simulator's config"),
                    }
                }
                () = sleep_until_opt(chaos_until.as_ref().map(|c| c.0)) => {
                    if let Some((_, saved)) = chaos_until.take() {
                        self.restore_sim(saved).await;
                    }
                }
                _ = progress.tick() => {
                    let t = self.tally.lock().unwrap_or_else(|e| e.into_inner()).clone();
                    let ok = t.by_status.get(&200).copied().unwrap_or(0);
                    let refused = t.by_status.get(&429).copied().unwrap_or(0)
                        + t.by_status.get(&503).copied().unwrap_or(0);
                    tracing::info!(
                        requests = t.requests,
                        ok,
                        refused,
                        hung_up = t.hung_up,
                        transport_errors = t.transport_errors,
                        "loadgen progress"
                    );
                }
                Some(_) = tasks.join_next() => {}
            }
        }
        if let Some((_, saved)) = chaos_until.take() {
            self.restore_sim(saved).await;
        }
        // Whatever is still waiting is abandoned with the run.
        tasks.shutdown().await;
        Ok(())
    }

    async fn restore_sim(&self, saved: serde_json::Value) {
        match self.sim_set(saved).await {
            Ok(()) => tracing::info!("loadgen: simulator back to normal"),
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "loadgen: cannot restore the simulator")
            }
        }
    }

    /// One request of the steady mix.
    fn pick(&self, rng: &mut SplitMix64) -> Request {
        let client = rng.below(self.clients.len() as u64) as usize;
        match rng.below(100) {
            // A CPF this client asks about again and again: mostly cache hits. Squaring a
            // uniform draw makes a few of them far more popular than the rest.
            0..=59 => {
                let u = rng.below(1_000) as f64 / 1_000.0;
                let k = (u * u * f64::from(POPULAR_CPFS)) as u32;
                Request::Lookup {
                    cpf: Self::popular_cpf(k),
                    client,
                    patience: self.patience,
                }
            }
            // Someone new: a miss that spends upstream budget. One in eight gives up early.
            60..=79 => Request::Lookup {
                cpf: self.new_cpf(),
                client,
                patience: if rng.below(8) == 0 {
                    Duration::from_millis(500 + rng.below(2_500))
                } else {
                    self.patience
                },
            },
            80..=88 => Request::BadInput {
                cpf: BAD_CPFS[rng.below(BAD_CPFS.len() as u64) as usize],
                client,
            },
            89..=92 => Request::BadClient {
                cpf: Self::popular_cpf(rng.below(u64::from(POPULAR_CPFS)) as u32),
            },
            93..=97 => Request::Path("/status"),
            _ => Request::Path("/health"),
        }
    }

    async fn send(&self, request: Request) -> Sent {
        match request {
            Request::Lookup {
                cpf,
                client,
                patience,
            } => self.lookup(&cpf, self.client(client), patience).await,
            Request::BadInput { cpf, client } => {
                self.lookup(cpf, self.client(client), self.patience).await
            }
            Request::BadClient { cpf } => self.lookup(&cpf, &self.bad_client, self.patience).await,
            Request::Path(path) => self.get_path(path, Duration::from_secs(10)).await,
        }
    }
}

/// One request of the continuous mix (clients by index: the ids themselves stay put).
enum Request {
    Lookup {
        cpf: String,
        client: usize,
        patience: Duration,
    },
    BadInput {
        cpf: &'static str,
        client: usize,
    },
    BadClient {
        cpf: String,
    },
    Path(&'static str),
}

/// The outcomes once mode drives, in order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Target {
    Miss,
    Hit,
    Coalesced,
    InvalidRequest,
    NotFound,
    Unauthorized,
    QueueFull,
    Abandoned,
    UnusedSlot,
    UpstreamError,
    UpstreamBadBody,
    UpstreamTimeout,
    Penalty,
    DeadlineUnreachable,
}

impl Target {
    const ALL: [Target; 14] = [
        Target::Miss,
        Target::Hit,
        Target::Coalesced,
        Target::InvalidRequest,
        Target::NotFound,
        Target::Unauthorized,
        Target::QueueFull,
        Target::Abandoned,
        Target::UnusedSlot,
        Target::UpstreamError,
        Target::UpstreamBadBody,
        Target::UpstreamTimeout,
        Target::Penalty,
        Target::DeadlineUnreachable,
    ];

    /// The outcome name that shows the target was reached.
    fn outcome(self) -> &'static str {
        match self {
            Target::Miss => "miss",
            Target::Hit => "hit",
            Target::Coalesced => "coalesced",
            Target::InvalidRequest => "invalid_request",
            Target::NotFound => "not_found",
            Target::Unauthorized => "upstream_unauthorized",
            Target::QueueFull => "queue_full",
            Target::Abandoned => "abandoned",
            Target::UnusedSlot => "unused_slot",
            Target::UpstreamError => "upstream_error",
            Target::UpstreamBadBody => "upstream_bad_body",
            Target::UpstreamTimeout => "upstream_timeout",
            Target::Penalty => "penalty",
            Target::DeadlineUnreachable => "deadline_unreachable",
        }
    }

    /// Only the proxy's own counters can show it happened.
    fn needs_metrics(self) -> bool {
        self == Target::UnusedSlot
    }

    fn needs_sim(self) -> bool {
        matches!(
            self,
            Target::UpstreamError
                | Target::UpstreamBadBody
                | Target::UpstreamTimeout
                | Target::Penalty
        )
    }
}

fn outcomes_of(sent: impl IntoIterator<Item = Sent>) -> Vec<String> {
    sent.into_iter()
        .filter_map(|s| s.outcome().map(str::to_owned))
        .collect()
}

/// `X-Cache` of a `200`, else the `error` kind of the JSON body, else `http_<status>`.
fn classify(status: u16, cache: Option<String>, body: &[u8]) -> String {
    if (200..300).contains(&status) {
        return cache.unwrap_or_else(|| "ok".to_owned());
    }
    serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_owned))
        // Only short, plain names: the kind set is small and fixed, and nothing else from
        // a body should end up in a report.
        .filter(|k| k.len() <= 40 && k.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'))
        .unwrap_or_else(|| format!("http_{status}"))
}

/// Sums every sample of `name` (any labels) in Prometheus text.
fn sum_metric(text: &str, name: &str) -> Option<f64> {
    let mut found = None;
    for line in text.lines() {
        let Some(rest) = line.strip_prefix(name) else {
            continue;
        };
        let value = match rest.as_bytes().first() {
            Some(b' ') => rest.split_whitespace().next(),
            Some(b'{') => rest
                .rsplit_once('}')
                .and_then(|(_, v)| v.split_whitespace().next()),
            _ => None,
        };
        if let Some(v) = value.and_then(|v| v.parse::<f64>().ok()) {
            *found.get_or_insert(0.0) += v;
        }
    }
    found
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// A small seeded generator (SplitMix64): the mix must be reproducible, and no randomness
/// here needs to be unpredictable.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (`n > 0`), close enough for traffic shaping.
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// Resolves on Ctrl-C or SIGTERM: a continuous run without `--duration` stops on either.
async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {},
        Some(()) = async { term.as_mut()?.recv().await } => {},
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classify_names_outcomes() {
        assert_eq!(classify(200, Some("hit".into()), b"{}"), "hit");
        assert_eq!(classify(200, None, b"{}"), "ok");
        assert_eq!(
            classify(429, None, br#"{"error":"queue_full","message":"x"}"#),
            "queue_full"
        );
        assert_eq!(classify(502, None, b"<html>"), "http_502");
        assert_eq!(
            classify(400, None, br#"{"error":"01658739060"}"#),
            "http_400",
            "nothing but a plain kind name is taken from a body"
        );
    }

    #[test]
    fn sums_every_series_of_a_metric() {
        let text =
            "# TYPE a counter\na_total{x=\"1\"} 2\na_total{x=\"2\"} 3\na_total_other 7\nb 1\n";
        assert_eq!(sum_metric(text, "a_total"), Some(5.0));
        assert_eq!(sum_metric(text, "b"), Some(1.0));
        assert_eq!(sum_metric(text, "c"), None);
    }

    #[test]
    fn the_mix_is_reproducible_and_cpfs_are_valid() {
        let (mut a, mut b) = (SplitMix64(7), SplitMix64(7));
        let xs: Vec<u64> = (0..10).map(|_| a.below(100)).collect();
        let ys: Vec<u64> = (0..10).map(|_| b.below(100)).collect();
        assert_eq!(xs, ys);
        for k in 0..POPULAR_CPFS {
            assert!(Cpf::parse(&Generator::popular_cpf(k)).is_ok());
        }
        for bad in BAD_CPFS {
            assert!(Cpf::parse(bad).is_err());
        }
    }
}
