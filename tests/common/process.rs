//! The proxy as a process of its own, for the tests where a restart or a crash is the point
//! (`tests/store.rs`, `tests/jobs_shared.rs`): started with `--data-dir`, killed on drop, its
//! log lines kept.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use score_sim::SimulatorHandle;

use super::{cpf, metric_value};

const BIN: &str = env!("CARGO_BIN_EXE_score-proxy");

/// A proxy process, killed on drop; its log lines are kept.
pub struct Proxy {
    child: Option<Child>,
    pub addr: String,
    pub log: Arc<Mutex<Vec<String>>>,
    client: reqwest::Client,
}

/// Starts the proxy against `sim` with the data directory `dir` and `extra` flags, and waits
/// for the line that says it listens (the store is loaded before that).
pub fn start(sim: &SimulatorHandle, dir: &Path, extra: &[&str]) -> Proxy {
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
    pub async fn lookup(&self, n: u32, client: &str) -> (u16, String) {
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

    /// The body of `GET path` (read whole: a results stream until its job ends).
    pub async fn text(&self, path: &str) -> String {
        let url = format!("http://{}{path}", self.addr);
        let reply = self.client.get(url).send().await.unwrap();
        reply.text().await.unwrap()
    }

    pub async fn metric(&self, series: &str) -> f64 {
        metric_value(&self.text("/metrics?format=prometheus").await, series)
    }

    /// Waits until `series` reaches `value` (the writer's commits are the event to await).
    pub async fn metric_reaches(&self, series: &str, value: f64) {
        tokio::time::timeout(Duration::from_secs(20), async {
            while self.metric(series).await < value {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .unwrap_or_else(|_| panic!("{series} never reached {value}"));
    }

    pub fn logged(&self, text: &str) -> bool {
        self.log.lock().unwrap().iter().any(|l| l.contains(text))
    }

    /// SIGTERM, and the exit status once it has drained.
    pub fn stop(mut self) {
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
    pub fn kill(mut self) {
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

impl Proxy {
    /// Submits a bulk job of `cpfs` for `client`; its id.
    pub async fn submit(&self, client: &str, cpfs: &[String]) -> String {
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

    pub async fn job(&self, id: &str, client: &str) -> serde_json::Value {
        let url = format!("http://{}/jobs/{id}?client_id={client}", self.addr);
        let reply = self.client.get(url).send().await.unwrap();
        assert_eq!(reply.status(), 200);
        serde_json::from_str(&reply.text().await.unwrap()).unwrap()
    }

    /// Waits until the job has `done` results (its progress is the event to await).
    pub async fn job_reaches(&self, id: &str, client: &str, done: u64) {
        tokio::time::timeout(Duration::from_secs(30), async {
            while self.job(id, client).await["done"].as_u64().unwrap() < done {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .unwrap_or_else(|_| panic!("job {id} never reached {done} results"));
    }

    /// The job's whole results stream (it ends when the job does).
    pub async fn job_lines(&self, id: &str, client: &str) -> Vec<serde_json::Value> {
        let text = self
            .text(&format!("/jobs/{id}/results?client_id={client}"))
            .await;
        text.lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }
}
