//! The client side of the bursts and of the overload: every lookup on its own connection,
//! written by hand so that the moment the request went out is known apart from the answer's,
//! all released at once from a barrier; and the helpers that warm a cache or wait for a
//! server to answer.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use futures_util::StreamExt;
use score_validation::Cpf;

use crate::now_s;
use crate::procs::{Proc, listen_overflows};

/// The client id every benchmark lookup carries.
pub(crate) const CLIENT_ID: &str = "bench-client";

pub(crate) fn client() -> Result<reqwest::Client> {
    Ok(reqwest::Client::builder()
        .no_proxy()
        .pool_idle_timeout(Duration::from_secs(5))
        .tcp_nodelay(true)
        .build()?)
}

#[derive(Clone, Debug)]
pub(crate) enum Outcome {
    Status(u16),
    Timeout,
    Error(String),
}

/// One lookup as the client saw it. Times are [`now_s`] seconds.
#[derive(Clone, Debug)]
pub(crate) struct Sample {
    pub(crate) cpf: String,
    pub(crate) start: f64,
    /// When the request was written (the connection was up); `None` if it never was.
    sent: Option<f64>,
    pub(crate) end: f64,
    pub(crate) outcome: Outcome,
    /// The answer's `X-Cache` and `Retry-After` headers, when it had them.
    pub(crate) x_cache: Option<String>,
    pub(crate) retry_after: Option<String>,
    /// Which of the targets it was sent to (0 when there is one).
    pub(crate) target: usize,
}

impl Sample {
    pub(crate) fn status(&self) -> Option<u16> {
        match self.outcome {
            Outcome::Status(s) => Some(s),
            _ => None,
        }
    }
    /// From the first connection attempt to the end of the answer.
    pub(crate) fn latency(&self) -> f64 {
        self.end - self.start
    }

    /// From the request written to the end of the answer: the server's part.
    pub(crate) fn after_connect(&self) -> f64 {
        self.sent.map_or(f64::NAN, |sent| self.end - sent)
    }
}

/// Sends every lookup at once (all tasks wait on a barrier, then go), each on its own
/// connection, and collects what each got. Returns the launch time, the samples, and how
/// many connection attempts the kernel dropped meanwhile for a full listen backlog
/// (machine-wide, see [`listen_overflows`]).
pub(crate) async fn fire(
    base: &str,
    cpfs: &[String],
    timeout: Duration,
) -> (f64, Vec<Sample>, u64) {
    fire_spread(&[base.to_owned()], cpfs, timeout).await
}

/// As [`fire`], lookup i going to `bases[i % bases.len()]` (round robin over replicas).
pub(crate) async fn fire_spread(
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

/// One lookup on its own connection, sent now: the steady streams of scenario 8 send one
/// after another from a few clients.
pub(crate) async fn lookup(base: &str, cpf: &str, timeout: Duration) -> Sample {
    let addr = base.trim_start_matches("http://");
    let start = now_s();
    let (sent, outcome, head) = raw_lookup(addr, &lookup_path(cpf), timeout).await;
    Sample {
        cpf: cpf.to_owned(),
        start,
        sent,
        end: now_s(),
        outcome,
        x_cache: head.x_cache,
        retry_after: head.retry_after,
        target: 0,
    }
}

/// The answer headers the harness looks at.
#[derive(Default)]
struct Head {
    pub(crate) x_cache: Option<String>,
    pub(crate) retry_after: Option<String>,
}

impl Head {
    pub(crate) fn parse(answer: &[u8]) -> Head {
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
pub(crate) async fn warm(
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

pub(crate) async fn wait_ready(client: &reqwest::Client, url: &str, proc: &mut Proc) -> Result<()> {
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
pub(crate) fn next_cpfs(n: usize) -> Vec<String> {
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

pub(crate) fn lookup_path(cpf: &str) -> String {
    format!("/proxy/score?cpf={cpf}&client_id={CLIENT_ID}")
}
