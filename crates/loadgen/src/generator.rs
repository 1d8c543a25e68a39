//! The generator's HTTP side: requests to the targets in turn, each answer classified and
//! counted, the proxy's own description of itself (`/status`), and bursts of lookups sent
//! at once. The modes ([`crate::continuous`], [`crate::once`]) are built on it.

use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context as _, bail};
use score_validation::Cpf;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio::time::Instant;
use url::Url;

use crate::args::LoadgenArgs;
use crate::mix::NEW_CPF_BASE;
use crate::report::{Sent, Tally, classify};

/// What the proxy says about itself in `/status` (the fields the generator sizes by).
#[derive(Clone, Copy, Debug)]
pub(crate) struct ProxyShape {
    pub(crate) queue_capacity: usize,
    pub(crate) interval: Duration,
}

/// One run's state, shared by every request task: the HTTP client, the targets and whose
/// turn it is, the supply of new CPFs, the tally, and the cap on requests in flight.
pub(crate) struct Generator {
    pub(crate) http: reqwest::Client,
    pub(crate) targets: Vec<Url>,
    /// The round-robin's position: the next request goes to `targets[next % len]`.
    next_target: AtomicUsize,
    pub(crate) sim: Option<Url>,
    pub(crate) clients: Vec<String>,
    pub(crate) bad_client: String,
    pub(crate) patience: Duration,
    next_cpf: AtomicU32,
    pub(crate) tally: Mutex<Tally>,
    limit: Arc<Semaphore>,
}

impl Generator {
    pub(crate) fn new(args: &LoadgenArgs) -> anyhow::Result<Arc<Generator>> {
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
    pub(crate) fn next_target(&self) -> usize {
        self.next_target.fetch_add(1, Ordering::Relaxed) % self.targets.len()
    }

    /// How many proxies share the traffic: bursts are this many times larger, so each one
    /// still sees more than its queue holds (and a fleet sharing one queue, more than it).
    pub(crate) fn fleet(&self) -> usize {
        self.targets.len()
    }

    pub(crate) fn url(&self, target: usize, path: &str) -> Url {
        let mut url = self.targets[target].clone();
        url.set_path(path);
        url.set_query(None);
        url
    }

    pub(crate) fn count(&self, target: usize, sent: &Sent) {
        self.tally
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .count(self.targets[target].as_str(), sent);
    }

    pub(crate) fn note(&self, outcome: &str) {
        *self
            .tally
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .by_outcome
            .entry(outcome.to_owned())
            .or_default() += 1;
    }

    /// A valid CPF nobody asked about yet in this run.
    pub(crate) fn new_cpf(&self) -> String {
        loop {
            let base = self.next_cpf.fetch_add(1, Ordering::Relaxed);
            if let Some(cpf) = Cpf::from_base(base % 1_000_000_000) {
                return cpf.to_string();
            }
        }
    }

    pub(crate) fn client(&self, i: usize) -> &str {
        &self.clients[i % self.clients.len()]
    }

    /// Waits for every target's `/health` to answer `200`, so a run started with the proxy
    /// fails clearly instead of counting connection errors.
    pub(crate) async fn wait_until_up(&self, within: Duration) -> anyhow::Result<()> {
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
    pub(crate) async fn lookup(&self, cpf: &str, client: &str, patience: Duration) -> Sent {
        self.lookup_on(self.next_target(), cpf, client, patience)
            .await
    }

    /// One lookup, to the given target.
    pub(crate) async fn lookup_on(
        &self,
        target: usize,
        cpf: &str,
        client: &str,
        patience: Duration,
    ) -> Sent {
        let mut url = self.url(target, "/proxy/score");
        url.query_pairs_mut()
            .append_pair("cpf", cpf)
            .append_pair("client_id", client);
        self.get(target, url, patience).await
    }

    /// A GET of a path other than a lookup, to the next target in turn.
    pub(crate) async fn get_path(&self, path: &str, patience: Duration) -> Sent {
        let target = self.next_target();
        self.get(target, self.url(target, path), patience).await
    }

    /// A GET to `target` whose answer is classified and counted.
    pub(crate) async fn get(&self, target: usize, url: Url, patience: Duration) -> Sent {
        self.get_with(target, url, patience, None).await
    }

    /// As [`Generator::get`], optionally telling the proxy how long this client will wait
    /// for its lookup to start (`X-Queue-Timeout`).
    pub(crate) async fn get_with(
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

    pub(crate) async fn status(&self, target: usize) -> anyhow::Result<serde_json::Value> {
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
    pub(crate) async fn shape(&self) -> ProxyShape {
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
    pub(crate) async fn penalty_active(&self) -> bool {
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

    /// `n` lookups of new CPFs, spread over the clients.
    pub(crate) fn distinct(
        &self,
        n: usize,
        patience: Duration,
    ) -> impl Iterator<Item = (String, String, Duration)> + '_ {
        (0..n).map(move |i| (self.new_cpf(), self.client(i).to_owned(), patience))
    }

    pub(crate) fn spawn_all(
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
    pub(crate) async fn all(
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
}
