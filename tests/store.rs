//! The persistent cache tier across real restarts of the binary: what the budget bought is
//! served again without an upstream call, after a clean stop and after `kill -9`; a store
//! that cannot be used is moved aside and the proxy serves anyway; and nothing under the
//! data directory names a CPF or a client id.
//!
//! The proxy runs as a process of its own (a restart is the point); the upstream is the
//! project's simulator, in this test's process, which counts every call it receives.

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{SIM_INTERVAL, cpf, metric_value};
use score_sim::{Simulator, SimulatorConfig, SimulatorHandle};

const BIN: &str = env!("CARGO_BIN_EXE_score-proxy");
/// Distinctive client ids, so that finding one among a file's bytes cannot be chance.
const CLIENTS: [&str; 2] = ["store-test-client-7f3a", "store-test-other-c91e"];
const N: u32 = 6;

/// A proxy process, killed on drop; its log lines are kept.
struct Proxy {
    child: Option<Child>,
    addr: String,
    log: Arc<Mutex<Vec<String>>>,
    client: reqwest::Client,
}

/// Starts the proxy against `sim` with the data directory `dir` and `extra` flags, and waits
/// for the line that says it listens (the store is loaded before that).
fn start(sim: &SimulatorHandle, dir: &Path, extra: &[&str]) -> Proxy {
    let mut cmd = Command::new(BIN);
    for (key, _) in std::env::vars() {
        if key.starts_with("SCORE_PROXY_") || key.starts_with("OTEL_") || key == "CLIENT_ID" {
            cmd.env_remove(key);
        }
    }
    cmd.env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .args(["--listen", "127.0.0.1:0", "--upstream-url", &sim.url()])
        // The harness's pace: 10/s plus a 40 ms guard against the simulator's 100 ms rule.
        .args([
            "--rate",
            "10",
            "--rate-guard",
            "40ms",
            "--shutdown-grace",
            "2s",
        ])
        .arg("--data-dir")
        .arg(dir)
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("the binary starts");
    let log = Arc::new(Mutex::new(Vec::new()));
    let (tx, rx) = std::sync::mpsc::channel();
    let streams: [Box<dyn std::io::Read + Send>; 2] = [
        Box::new(child.stdout.take().unwrap()),
        Box::new(child.stderr.take().unwrap()),
    ];
    for stream in streams {
        let (tx, log) = (tx.clone(), log.clone());
        std::thread::spawn(move || {
            for line in BufReader::new(stream).lines().map_while(Result::ok) {
                if line.contains("listening")
                    && let Some(addr) = line
                        .split_whitespace()
                        .find_map(|w| w.strip_prefix("address="))
                {
                    let _ = tx.send(addr.trim_matches('"').to_owned());
                }
                if std::env::var_os("TEST_LOG").is_some() {
                    eprintln!("{line}");
                }
                log.lock().unwrap().push(line);
            }
        });
    }
    let addr = rx
        .recv_timeout(Duration::from_secs(30))
        .unwrap_or_else(|_| panic!("the proxy never listened: {:#?}", log.lock().unwrap()));
    Proxy {
        child: Some(child),
        addr,
        log,
        client: reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .build()
            .unwrap(),
    }
}

impl Proxy {
    /// A lookup: its status and `X-Cache`.
    async fn lookup(&self, n: u32, client: &str) -> (u16, String) {
        let url = format!(
            "http://{}/proxy/score?cpf={}&client_id={client}",
            self.addr,
            cpf(n)
        );
        let reply = self
            .client
            .get(url)
            .send()
            .await
            .expect("the proxy answers");
        let x_cache = reply.headers()["x-cache"].to_str().unwrap().to_owned();
        (reply.status().as_u16(), x_cache)
    }

    async fn metric(&self, series: &str) -> f64 {
        let url = format!("http://{}/metrics?format=prometheus", self.addr);
        let text = self
            .client
            .get(url)
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        metric_value(&text, series)
    }

    /// Waits until `series` reaches `value` (the writer's commits are the event to await).
    async fn metric_reaches(&self, series: &str, value: f64) {
        tokio::time::timeout(Duration::from_secs(20), async {
            while self.metric(series).await < value {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .unwrap_or_else(|_| panic!("{series} never reached {value}"));
    }

    fn logged(&self, text: &str) -> bool {
        self.log.lock().unwrap().iter().any(|l| l.contains(text))
    }

    /// SIGTERM, and the exit status once it has drained.
    fn stop(mut self) {
        let child = self.child.take().unwrap();
        let pid = child.id().to_string();
        assert!(
            Command::new("kill")
                .args(["-TERM", &pid])
                .status()
                .unwrap()
                .success()
        );
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut child = child;
            let _ = tx.send(child.wait());
        });
        let status = rx.recv_timeout(Duration::from_secs(20)).unwrap().unwrap();
        assert_eq!(status.code(), Some(0));
    }

    /// SIGKILL: no drain, no last commit.
    fn kill(mut self) {
        let mut child = self.child.take().unwrap();
        child.kill().unwrap();
        child.wait().unwrap();
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if let Some(child) = &mut self.child {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

async fn simulator() -> SimulatorHandle {
    Simulator::spawn(SimulatorConfig {
        min_interval: SIM_INTERVAL,
        penalty: Duration::from_millis(300),
        ..SimulatorConfig::default()
    })
    .await
    .expect("the simulator starts")
}

/// `N` distinct answers for each client id (all misses: each costs one call).
async fn buy(proxy: &Proxy) {
    for client in CLIENTS {
        for n in 0..N {
            assert_eq!(proxy.lookup(n, client).await, (200, "MISS".to_owned()));
        }
    }
}

/// The same lookups again: every one a hit.
async fn all_hits(proxy: &Proxy) {
    for client in CLIENTS {
        for n in 0..N {
            assert_eq!(
                proxy.lookup(n, client).await,
                (200, "HIT".to_owned()),
                "lookup {n}"
            );
        }
    }
}

const BOUGHT: f64 = (N as usize * CLIENTS.len()) as f64;

/// Every file under `dir`, recursively.
fn files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(files(&path));
        } else {
            out.push(path);
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_serves_what_the_budget_bought_without_an_upstream_call() {
    let sim = simulator().await;
    let dir = tempfile::tempdir().unwrap();
    let proxy = start(&sim, dir.path(), &[]);
    assert_eq!(proxy.metric("score_proxy_store_enabled").await, 1.0);
    buy(&proxy).await;
    assert_eq!(sim.stats().calls, BOUGHT as u64);
    proxy.stop();

    let proxy = start(&sim, dir.path(), &[]);
    assert_eq!(
        proxy
            .metric("score_proxy_store_load_entries_total{result=\"loaded\"}")
            .await,
        BOUGHT
    );
    all_hits(&proxy).await;
    assert_eq!(
        sim.stats().calls,
        BOUGHT as u64,
        "no upstream call after the restart"
    );
    assert_eq!(
        proxy
            .metric("score_proxy_store_moved_aside_total{reason=\"corrupt\"}")
            .await,
        0.0
    );
    proxy.stop();

    // Nothing under the data directory names a CPF or a client id, in any file.
    let files = files(dir.path());
    assert!(files.len() >= 2, "{files:?}");
    for file in files {
        let bytes = std::fs::read(&file).unwrap();
        let needles = (0..N).map(cpf).chain(CLIENTS.iter().map(|c| c.to_string()));
        for needle in needles {
            assert!(
                !bytes.windows(needle.len()).any(|w| w == needle.as_bytes()),
                "{} holds a CPF or client id in clear",
                file.display()
            );
        }
    }
    assert_eq!(sim.stats().violations, 0);
}

/// The window of possible loss: an answer is on disk one batch commit after it was cached
/// (the writer commits whatever is queued as soon as it arrives; one fsync). Once
/// `score_proxy_store_writes_total` counts it, a `kill -9` cannot lose it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_once_the_writes_are_counted_loses_nothing() {
    let sim = simulator().await;
    let dir = tempfile::tempdir().unwrap();
    let proxy = start(&sim, dir.path(), &[]);
    buy(&proxy).await;
    proxy
        .metric_reaches("score_proxy_store_writes_total", BOUGHT)
        .await;
    proxy.kill();

    let proxy = start(&sim, dir.path(), &[]);
    all_hits(&proxy).await;
    assert_eq!(sim.stats().calls, BOUGHT as u64);
    proxy.stop();
}

/// Populates a store under `key`, then stops cleanly.
async fn populated(sim: &SimulatorHandle, dir: &Path, key: &str) {
    let proxy = start(sim, dir, &["--data-key", key]);
    buy(&proxy).await;
    proxy.stop();
}

/// Starts on a store that cannot be used: it is moved aside (said in the log and counted),
/// and the proxy serves from an empty cache.
async fn starts_anyway(sim: &SimulatorHandle, dir: &Path, key: &str, reason: &str) {
    let proxy = start(sim, dir, &["--data-key", key]);
    assert_eq!(
        proxy
            .metric(&format!(
                "score_proxy_store_moved_aside_total{{reason=\"{reason}\"}}"
            ))
            .await,
        1.0
    );
    assert!(
        proxy.logged("moved aside"),
        "{:#?}",
        proxy.log.lock().unwrap()
    );
    assert_eq!(proxy.metric("score_proxy_store_enabled").await, 1.0);
    assert_eq!(proxy.lookup(0, CLIENTS[0]).await, (200, "MISS".to_owned()));
    let aside = files(dir)
        .into_iter()
        .filter(|f| f.to_string_lossy().contains("cache.redb.aside-"))
        .count();
    assert_eq!(aside, 1);
    proxy.stop();
}

const KEY: &str = "0f1e2d3c4b5a69788796a5b4c3d2e1f00f1e2d3c4b5a69788796a5b4c3d2e1f0";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_truncated_store_is_moved_aside() {
    let sim = simulator().await;
    let dir = tempfile::tempdir().unwrap();
    populated(&sim, dir.path(), KEY).await;
    let path = dir.path().join("cache.redb");
    let len = std::fs::metadata(&path).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    starts_anyway(&sim, dir.path(), KEY, "corrupt").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_of_garbage_is_moved_aside() {
    let sim = simulator().await;
    let dir = tempfile::tempdir().unwrap();
    let garbage: Vec<u8> = (0..256 * 1024u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    std::fs::write(dir.path().join("cache.redb"), garbage).unwrap();
    starts_anyway(&sim, dir.path(), KEY, "corrupt").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_sealed_with_another_key_is_moved_aside() {
    let sim = simulator().await;
    let dir = tempfile::tempdir().unwrap();
    populated(&sim, dir.path(), KEY).await;
    let other = KEY.replace('0', "9");
    starts_anyway(&sim, dir.path(), &other, "wrong_key").await;
}

impl Proxy {
    /// Submits a bulk job of `cpfs` for `client`; its id.
    async fn submit(&self, client: &str, cpfs: &[String]) -> String {
        let body = serde_json::json!({ "client_id": client, "cpfs": cpfs }).to_string();
        let reply = self
            .client
            .post(format!("http://{}/jobs", self.addr))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(reply.status(), 202);
        let job: serde_json::Value = serde_json::from_str(&reply.text().await.unwrap()).unwrap();
        job["id"].as_str().unwrap().to_owned()
    }

    async fn job(&self, id: &str, client: &str) -> serde_json::Value {
        let url = format!("http://{}/jobs/{id}?client_id={client}", self.addr);
        let reply = self.client.get(url).send().await.unwrap();
        assert_eq!(reply.status(), 200);
        serde_json::from_str(&reply.text().await.unwrap()).unwrap()
    }

    /// Waits until the job has `done` results (its progress is the event to await).
    async fn job_reaches(&self, id: &str, client: &str, done: u64) {
        tokio::time::timeout(Duration::from_secs(30), async {
            while self.job(id, client).await["done"].as_u64().unwrap() < done {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .unwrap_or_else(|_| panic!("job {id} never reached {done} results"));
    }

    /// The job's whole results stream (it ends when the job does).
    async fn job_lines(&self, id: &str, client: &str) -> Vec<serde_json::Value> {
        let url = format!("http://{}/jobs/{id}/results?client_id={client}", self.addr);
        let text = self
            .client
            .get(url)
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        text.lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }
}

/// A bulk job survives a SIGTERM and then a `kill -9` in the middle of its run: after each
/// restart it resumes, and in the end every CPF has its line and was called exactly once.
/// The window of possible loss is the one of the cache's answers (one batch commit): a
/// result not yet on disk is recovered from the cached answer, which the writer committed
/// first; so `kill -9` is sent once `score_proxy_store_writes_total` counts every call made.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_resumes_after_sigterm_and_kill_9_without_calling_twice() {
    let sim = simulator().await;
    let dir = tempfile::tempdir().unwrap();
    let client = CLIENTS[0];
    let cpfs: Vec<String> = (200..230).map(cpf).collect();

    let proxy = start(&sim, dir.path(), &[]);
    let id = proxy.submit(client, &cpfs).await;
    proxy.job_reaches(&id, client, 5).await;
    proxy.stop();

    let proxy = start(&sim, dir.path(), &[]);
    let resumed = proxy.job(&id, client).await;
    assert!(resumed["done"].as_u64().unwrap() >= 5, "{resumed}");
    proxy.job_reaches(&id, client, 15).await;
    let calls = sim.stats().calls as f64;
    proxy
        .metric_reaches("score_proxy_store_writes_total", calls)
        .await;
    proxy.kill();

    let proxy = start(&sim, dir.path(), &[]);
    let lines = proxy.job_lines(&id, client).await;
    assert_eq!(lines.len(), cpfs.len(), "every CPF has its line");
    for (i, line) in lines.iter().enumerate() {
        assert_eq!(
            (line["index"].as_u64(), line["status"].as_u64()),
            (Some(i as u64), Some(200))
        );
        assert_eq!(line["cpf"], cpfs[i]);
    }
    assert_eq!(proxy.job(&id, client).await["state"], "done");
    let stats = sim.stats();
    for cpf in &cpfs {
        let calls = stats.arrivals.iter().filter(|a| &a.cpf == cpf).count();
        assert_eq!(calls, 1, "a CPF was called {calls} times");
    }
    assert_eq!(stats.violations, 0);
    proxy.stop();

    // The job's record and results are sealed like the cache's: no CPF or client id in clear.
    for file in files(dir.path()) {
        let bytes = std::fs::read(&file).unwrap();
        for needle in cpfs.iter().map(String::as_str).chain([client]) {
            assert!(
                !bytes.windows(needle.len()).any(|w| w == needle.as_bytes()),
                "{} holds a CPF or client id in clear",
                file.display()
            );
        }
    }
}
