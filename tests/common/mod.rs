//! Test harness: the real proxy on 127.0.0.1:0, in-process, in front of the project's own
//! upstream simulator, also in-process (zero-to-production's `spawn_app`).
//!
//! Tests run at a faster pace than production (the simulator's rate rule and the proxy's
//! rate are scaled together) so that a burst of twenty takes seconds, not twenty of them.
//! The guard margin is scaled with it: it is what absorbs scheduling jitter between the
//! proxy's start and the simulator's arrival stamp on a loaded machine.
#![allow(dead_code)]

#[allow(unused_imports)]
pub use score_test_support::redis;

pub mod process;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use score_proxy::app::App;
use score_proxy::config::{Cli, Config};
use score_proxy::http::server::Server;
use score_sim::{SimStats, Simulator, SimulatorConfig, SimulatorHandle};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// The simulator's rate rule in tests: one call per 100 ms.
pub const SIM_INTERVAL: Duration = Duration::from_millis(100);

/// A valid CPF, distinct for each `n` (the reference model's, not the parser's: a test
/// input does not depend on the code under test).
pub fn cpf(n: u32) -> String {
    score_test_support::cpf::nth(n)
}

/// Installs a log subscriber when `TEST_LOG=1` (tests are quiet by default).
pub fn init_test_log() {
    score_test_support::logs::init_test_log("debug,hyper=info,reqwest=info,h2=info");
}

pub struct Setup {
    /// Extra proxy flags, after the test defaults.
    pub args: Vec<String>,
    pub sim: SimulatorConfig,
}

impl Default for Setup {
    fn default() -> Self {
        Setup {
            args: Vec::new(),
            sim: SimulatorConfig {
                min_interval: SIM_INTERVAL,
                penalty: Duration::from_millis(300),
                ..SimulatorConfig::default()
            },
        }
    }
}

impl Setup {
    pub fn arg(mut self, flag: &str, value: impl ToString) -> Self {
        self.args.push(flag.to_owned());
        self.args.push(value.to_string());
        self
    }

    pub fn sim(mut self, change: impl FnOnce(&mut SimulatorConfig)) -> Self {
        change(&mut self.sim);
        self
    }
}

pub struct TestApp {
    pub addr: SocketAddr,
    /// The admin listener, when `--admin-listen` was given.
    pub admin: Option<SocketAddr>,
    pub app: Arc<App>,
    pub sim: SimulatorHandle,
    pub client: reqwest::Client,
    stop: Option<oneshot::Sender<()>>,
    server: Option<JoinHandle<anyhow::Result<()>>>,
}

/// Builds a validated config the way the binary does, from flags.
pub fn config(upstream_url: &str, extra: &[String]) -> Config {
    let mut argv: Vec<String> = [
        "score-proxy",
        "--listen",
        "127.0.0.1:0",
        "--upstream-url",
        upstream_url,
        // 10/s plus a 40 ms guard: 140 ms between starts against the simulator's 100 ms.
        "--rate",
        "10",
        "--rate-guard",
        "40ms",
        "--upstream-timeout",
        "5s",
        "--shutdown-grace",
        "5s",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    argv.extend(extra.iter().cloned());
    let cli = <Cli as clap::Parser>::try_parse_from(argv).expect("test flags parse");
    cli.serve
        .validate(|_| None)
        .unwrap_or_else(|problems| panic!("test config invalid: {problems:?}"))
}

pub async fn spawn(setup: Setup) -> TestApp {
    init_test_log();
    let sim = Simulator::spawn(setup.sim).await.expect("simulator starts");
    let config = config(&sim.url(), &setup.args);
    let server = Server::bind(config).await.expect("proxy binds");
    let addr = server.local_addr();
    let admin = server.admin_addr();
    let app = server.app();
    let (stop, stopped) = oneshot::channel::<()>();
    let server = tokio::spawn(server.run(async {
        let _ = stopped.await;
    }));
    TestApp {
        addr,
        admin,
        app,
        sim,
        client: reqwest::Client::builder()
            .timeout(Duration::from_secs(60))
            .build()
            .unwrap(),
        stop: Some(stop),
        server: Some(server),
    }
}

pub struct Reply {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    pub body: String,
}

impl Reply {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("body is not JSON ({e}): {}", self.body))
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    pub fn x_cache(&self) -> &str {
        self.header("x-cache").unwrap_or("-")
    }

    pub fn retry_after(&self) -> Option<u64> {
        self.header("retry-after")
            .map(|v| v.parse().expect("Retry-After is whole seconds"))
    }
}

impl TestApp {
    pub fn url(&self, path_and_query: &str) -> String {
        format!("http://{}{}", self.addr, path_and_query)
    }

    pub async fn get(&self, path_and_query: &str) -> Reply {
        let response = self
            .client
            .get(self.url(path_and_query))
            .send()
            .await
            .expect("the proxy answers");
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let body = response.text().await.expect("a readable body");
        Reply {
            status,
            headers,
            body,
        }
    }

    pub async fn lookup(&self, cpf: &str, client_id: &str) -> Reply {
        self.get(&format!("/proxy/score?cpf={cpf}&client_id={client_id}"))
            .await
    }

    /// Starts a lookup on its own task (for bursts and for clients that hang up).
    pub fn spawn_lookup(&self, cpf: &str, client_id: &str) -> JoinHandle<Reply> {
        self.spawn_lookup_with(cpf, client_id, &[])
    }

    /// As [`TestApp::spawn_lookup`], with extra request headers.
    pub fn spawn_lookup_with(
        &self,
        cpf: &str,
        client_id: &str,
        headers: &[(&'static str, &str)],
    ) -> JoinHandle<Reply> {
        let mut request = self
            .client
            .get(self.url(&format!("/proxy/score?cpf={cpf}&client_id={client_id}")));
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        tokio::spawn(async move {
            let response = request.send().await.expect("the proxy answers");
            let status = response.status().as_u16();
            let headers = response.headers().clone();
            let body = response.text().await.expect("a readable body");
            Reply {
                status,
                headers,
                body,
            }
        })
    }

    pub async fn metrics(&self) -> String {
        let r = self.get("/metrics?format=prometheus").await;
        assert_eq!(r.status, 200);
        r.body
    }

    /// The value of one sample line of the Prometheus exposition, e.g.
    /// `score_proxy_queue_depth` or `score_proxy_cache_lookups_total{result="hit"}`.
    pub async fn metric(&self, series: &str) -> f64 {
        let text = self.metrics().await;
        metric_value(&text, series)
    }

    /// Waits until a series reaches `value` (for steps that have no other event to await,
    /// such as a lookup joining a flight: the coalesced counter moves when it joins).
    pub async fn metric_reaches(&self, series: &str, value: f64) {
        tokio::time::timeout(Duration::from_secs(20), async {
            while self.metric(series).await < value {
                tokio::task::yield_now().await;
            }
        })
        .await
        .unwrap_or_else(|_| panic!("{series} never reached {value}"));
    }

    /// Waits until the queue holds exactly `depth` lookups.
    pub async fn queue_depth_reaches(&self, depth: usize) {
        let mut rx = self.app.scheduler.depth();
        tokio::time::timeout(Duration::from_secs(20), rx.wait_for(|d| *d == depth))
            .await
            .unwrap_or_else(|_| panic!("queue depth never reached {depth}"))
            .expect("scheduler alive");
    }

    /// Asserts the invariant every scenario must keep: no two arrivals at the upstream
    /// closer than its rate rule allows, by the simulator's own clock.
    pub fn assert_no_violations(&self) -> SimStats {
        let stats = self.sim.stats();
        assert_eq!(stats.violations, 0, "upstream violations: {stats:#?}");
        if let Some(gap) = stats.min_gap_seconds {
            assert!(
                gap >= self.sim.config().min_interval.as_secs_f64(),
                "arrivals {gap}s apart"
            );
        }
        stats
    }

    /// Stops the proxy the way SIGTERM would and waits for it to finish.
    pub async fn shutdown(mut self) -> anyhow::Result<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        match self.server.take() {
            Some(server) => server.await?,
            None => Ok(()),
        }
    }

    /// Signals shutdown without waiting (for tests that watch lookups during the drain).
    pub fn begin_shutdown(&mut self) -> JoinHandle<anyhow::Result<()>> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.server.take().expect("not shut down yet")
    }
}

/// The value of one series (labels in any order) in a scrape's text; panics with the scrape
/// when it is missing or the text is not Prometheus's format.
#[allow(unused_imports)]
pub use score_test_support::prom::value as metric_value;

#[allow(unused_imports)]
pub use score_test_support::free_port;
