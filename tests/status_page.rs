//! The status page in a real browser: Debian's `chromium`, headless, against the proxy under
//! load from the in-process simulator. The page must render, its script must run and poll
//! the feed, and the figures in the DOM must be those `/status` and the feed report. A
//! screenshot is written to `target/status-page.png` (the one in `docs/` is a copy).
//!
//! Nothing here sleeps to let time pass: the load is awaited through the feed and the
//! metrics, and the figures that move under load (the count of upstream calls) are bounded
//! by a reading taken before the browser starts and one taken after it exits.
//!
//! The browser is required, not optional: a missing `chromium` fails the test with what to
//! install (`scripts/install-deps.sh` installs it, as CI does).

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::Duration;

use common::{Setup, TestApp, cpf, spawn};
use serde_json::Value;

/// The client id of every lookup of the load: it must never reach the page or the feed.
const SECRET_CLIENT: &str = "client-3f9d-status-page-secret";

/// The first of the CPFs the load uses (each miss takes the next one).
const FIRST_CPF: u32 = 7000;

/// How long the browser may take, start to exit, on a loaded two-core machine.
const BROWSER_TIMEOUT: Duration = Duration::from_secs(120);

/// The browser: `SCORE_PROXY_CHROMIUM` if set, else `chromium` on the `PATH`.
fn chromium() -> PathBuf {
    if let Some(path) = std::env::var_os("SCORE_PROXY_CHROMIUM") {
        let path = PathBuf::from(path);
        assert!(
            path.is_file(),
            "SCORE_PROXY_CHROMIUM={} is not a file: the status page test drives a real \
             headless browser",
            path.display()
        );
        return path;
    }
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join("chromium"))
            .find(|candidate| candidate.is_file())
    });
    found.unwrap_or_else(|| {
        panic!(
            "chromium not found on PATH: the status page test drives a real headless browser. \
             Install Debian's `chromium` (scripts/install-deps.sh does, as CI does: \
             `apt-get install -y --no-install-recommends chromium`) or point \
             SCORE_PROXY_CHROMIUM at a Chromium binary."
        )
    })
}

/// The workspace's target directory (`CARGO_TARGET_TMPDIR` is `<target>/tmp`).
fn target_dir() -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .expect("CARGO_TARGET_TMPDIR has a parent")
        .to_path_buf()
}

/// A fresh profile directory for one browser run, so that runs never share state.
fn profile_dir() -> PathBuf {
    static RUN: AtomicU32 = AtomicU32::new(0);
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!(
        "chromium-profile-{}-{}",
        std::process::id(),
        RUN.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir).expect("a profile directory");
    dir
}

/// Runs headless Chromium on `url` with `extra` arguments; returns its stdout. The virtual
/// time budget lets the page's one-second polls run (virtual time waits for each fetch).
async fn browser(url: &str, extra: &[String]) -> String {
    let profile = profile_dir();
    let mut command = tokio::process::Command::new(chromium());
    command
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--no-default-browser-check",
            "--disable-extensions",
            "--hide-scrollbars",
            "--virtual-time-budget=5000",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(extra)
        .arg(url)
        .kill_on_drop(true);
    let output = tokio::time::timeout(BROWSER_TIMEOUT, command.output())
        .await
        .unwrap_or_else(|_| panic!("chromium did not finish within {BROWSER_TIMEOUT:?}"))
        .expect("chromium starts");
    let _ = std::fs::remove_dir_all(&profile);
    assert!(
        output.status.success(),
        "chromium failed ({}): {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).expect("the DOM is UTF-8")
}

/// The start tag and the text (up to the next tag) of the element with this id.
fn element<'a>(dom: &'a str, id: &str) -> (&'a str, &'a str) {
    let at = dom
        .find(&format!("id=\"{id}\""))
        .unwrap_or_else(|| panic!("no element #{id} in the DOM"));
    let open = dom[..at].rfind('<').expect("a start tag");
    let close = at + dom[at..].find('>').expect("the tag ends");
    let text_end = close + dom[close..].find('<').unwrap_or(dom.len() - close);
    (&dom[open..=close], &dom[close + 1..text_end])
}

fn attr<'a>(tag: &'a str, name: &str) -> Option<&'a str> {
    let key = format!(" {name}=\"");
    let start = tag.find(&key)? + key.len();
    Some(&tag[start..start + tag[start..].find('"')?])
}

/// The raw value the script stored on an element (`data-value`).
fn value<'a>(dom: &'a str, id: &str) -> &'a str {
    let (tag, text) = element(dom, id);
    attr(tag, "data-value")
        .unwrap_or_else(|| panic!("#{id} has no data-value (the script never set it): {tag}{text}"))
}

/// A lookup load: workers that each ask for a new CPF (a miss: an upstream call) and then
/// for a warm one (a hit), until stopped.
struct Load {
    stop: Arc<AtomicBool>,
    next: Arc<AtomicU32>,
    workers: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    fn start(t: &TestApp, workers: u32) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let next = Arc::new(AtomicU32::new(FIRST_CPF + 1));
        let workers = (0..workers)
            .map(|_| {
                let (stop, next, client) = (stop.clone(), next.clone(), t.client.clone());
                let base = format!("http://{}/proxy/score", t.addr);
                tokio::spawn(async move {
                    while !stop.load(Ordering::Relaxed) {
                        let n = next.fetch_add(1, Ordering::Relaxed);
                        for cpf in [cpf(n), cpf(FIRST_CPF)] {
                            let url = format!("{base}?cpf={cpf}&client_id={SECRET_CLIENT}");
                            let reply = client.get(url).send().await.expect("the proxy answers");
                            let _ = reply.bytes().await;
                        }
                    }
                })
            })
            .collect();
        Load {
            stop,
            next,
            workers,
        }
    }

    /// Stops the load; returns the highest CPF number it used.
    async fn stop(self) -> u32 {
        self.stop.store(true, Ordering::Relaxed);
        for w in self.workers {
            w.await.expect("a load worker");
        }
        self.next.load(Ordering::Relaxed)
    }
}

async fn feed(t: &TestApp) -> Value {
    let reply = t.get("/status/feed").await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    reply.json()
}

/// Waits until the feed satisfies `done` (each reading is a request: an event, not a nap).
async fn feed_reaches(t: &TestApp, what: &str, done: impl Fn(&Value) -> bool) -> Value {
    tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            let f = feed(t).await;
            if done(&f) {
                return f;
            }
            tokio::task::yield_now().await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("the feed never showed {what}"))
}

fn calls_total(feed: &Value) -> u64 {
    feed["upstream"]["calls_total"]
        .as_u64()
        .expect("calls_total")
}

/// The proxy with an admin listener, under load, with a penalty and a few upstream errors
/// behind it, so that the timeline holds every outcome.
async fn busy_proxy() -> (TestApp, Load) {
    let t = spawn(Setup::default().arg("--admin-listen", "127.0.0.1:0")).await;
    assert_eq!(t.lookup(&cpf(FIRST_CPF), SECRET_CLIENT).await.status, 200);
    let load = Load::start(&t, 3);
    // One penalty: the upstream's rule briefly stricter than the proxy's spacing.
    t.sim.set_min_interval(Duration::from_millis(400));
    t.metric_reaches(
        "score_proxy_upstream_calls_total{class=\"4xx\",outcome=\"penalty\"}",
        1.0,
    )
    .await;
    t.sim.set_min_interval(common::SIM_INTERVAL);
    // Some errors: every fifth call answers 500 for a while.
    t.sim.set_fail_every(Some(5));
    t.sim.set_fault(score_sim::Fault::Error);
    t.metric_reaches(
        "score_proxy_upstream_calls_total{class=\"5xx\",outcome=\"server_error\"}",
        2.0,
    )
    .await;
    t.sim.set_fault(score_sim::Fault::None);
    let _ = feed_reaches(&t, "twenty upstream calls", |f| calls_total(f) >= 20).await;
    (t, load)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_in_a_real_browser_shows_what_status_says() {
    // Before anything else: a missing browser fails at once, saying what to install.
    chromium();
    let (t, load) = busy_proxy().await;
    let url = t.url("/");

    let before = calls_total(&feed(&t).await);
    let dom = browser(&url, &["--dump-dom".to_owned()]).await;
    let after_feed = feed(&t).await;
    let after = calls_total(&after_feed);
    let status = t.get("/status").await.json();

    // The script ran and polled more than once, and the last poll succeeded.
    let (body, _) = element(&dom, "timeline");
    let body_tag = &dom[dom.find("<body").expect("a body")..];
    let body_tag = &body_tag[..=body_tag.find('>').unwrap()];
    let polls: u32 = attr(body_tag, "data-polls").unwrap().parse().unwrap();
    assert!(polls >= 2, "the page polled {polls} times: {body_tag}");
    assert_eq!(attr(body_tag, "data-state"), Some("live"), "{body_tag}");

    // Figures that do not move under load: exactly what /status says.
    let rate: f64 = value(&dom, "rate").parse().unwrap();
    assert_eq!(rate, status["rate_per_second"].as_f64().unwrap());
    assert_eq!(element(&dom, "rate").1, "10.00");
    assert_eq!(
        value(&dom, "queue-capacity"),
        status["queue_capacity"].to_string()
    );
    assert_eq!(value(&dom, "breaker"), status["breaker"].as_str().unwrap());
    assert_eq!(
        value(&dom, "pacing-mode"),
        status["pacing_mode"].as_str().unwrap()
    );
    assert_eq!(value(&dom, "version"), status["version"].as_str().unwrap());
    let timeout: f64 = value(&dom, "queue-timeout").parse().unwrap();
    assert_eq!(
        timeout,
        after_feed["queue"]["timeout_seconds"].as_f64().unwrap()
    );

    // The count of calls moves: the page read it between the two readings around it.
    let shown: u64 = value(&dom, "calls-total").parse().unwrap();
    assert!(
        (before..=after).contains(&shown),
        "the page shows {shown} calls, the feed said {before} before and {after} after"
    );
    // The timeline drew one mark per call of the last minute, ok ones among them, and the
    // legend counts them with words beside the colours.
    let marks: usize = attr(body, "data-marks").unwrap().parse().unwrap();
    assert!(marks >= 20, "{marks} marks");
    assert_eq!(
        dom.matches("class=\"mark ").count(),
        marks,
        "one mark per call"
    );
    let ok: usize = value(&dom, "count-ok").parse().unwrap();
    let penalised: usize = value(&dom, "count-penalised").parse().unwrap();
    let errors: usize = value(&dom, "count-error").parse().unwrap();
    assert_eq!(ok + penalised + errors, marks);
    assert!(
        ok > 0 && penalised > 0 && errors > 0,
        "{ok} {penalised} {errors}"
    );
    assert!(
        dom.contains("class=\"span\""),
        "the penalty is a shaded span"
    );
    assert!(dom.contains("href=\"metrics?format=prometheus\""), "links");

    // A screenshot, for a person to look at (docs/status-page.png is a copy of it).
    let shot = target_dir().join("status-page.png");
    let _ = std::fs::remove_file(&shot);
    browser(
        &url,
        &[
            format!("--screenshot={}", shot.display()),
            "--window-size=1200,900".to_owned(),
        ],
    )
    .await;
    let png = std::fs::read(&shot).expect("chromium wrote the screenshot");
    assert!(png.starts_with(b"\x89PNG\r\n\x1a\n"), "a PNG");
    assert!(
        png.len() > 10_000,
        "a screenshot of a page, {} bytes",
        png.len()
    );

    // Nothing that names a person, in the page as rendered.
    let last = load.stop().await;
    assert_private(&dom, FIRST_CPF..=last);
    t.shutdown().await.expect("clean shutdown");
}

/// A poll that fails leaves the last figures on screen, marked stale, and the page keeps
/// polling: the page, as the proxy serves it, from a stand-in whose feed answers once and
/// then only 503.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_poll_leaves_the_figures_marked_stale() {
    chromium();
    let t = spawn(Setup::default()).await;
    let page = t
        .client
        .get(t.url("/"))
        .header("accept", "text/html")
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let first = t.get("/status/feed").await.body;
    let served = Arc::new(AtomicU32::new(0));
    let feeds = served.clone();
    let stand_in = axum::Router::new()
        .route(
            "/",
            axum::routing::get(move || async move { axum::response::Html(page) }),
        )
        .route(
            "/status/feed",
            axum::routing::get(move || async move {
                match feeds.fetch_add(1, Ordering::Relaxed) {
                    0 => (
                        axum::http::StatusCode::OK,
                        [("content-type", "application/json")],
                        first,
                    ),
                    _ => (
                        axum::http::StatusCode::SERVICE_UNAVAILABLE,
                        [("content-type", "application/json")],
                        String::new(),
                    ),
                }
            }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move { axum::serve(listener, stand_in).await });

    let dom = browser(&format!("http://{addr}/"), &["--dump-dom".to_owned()]).await;
    server.abort();
    let body_tag = &dom[dom.find("<body").expect("a body")..];
    let body_tag = &body_tag[..=body_tag.find('>').unwrap()];
    assert_eq!(attr(body_tag, "data-state"), Some("stale"), "{body_tag}");
    assert_eq!(attr(body_tag, "data-polls"), Some("1"), "{body_tag}");
    let (_, state) = element(&dom, "feed-state");
    assert!(state.starts_with("stale since "), "{state}");
    assert!(state.contains("HTTP 503"), "{state}");
    assert!(served.load(Ordering::Relaxed) >= 3, "the page kept polling");
    // The figures of the one good poll are still there.
    assert_eq!(element(&dom, "rate").1, "10.00");
    assert_eq!(value(&dom, "breaker"), "closed");
    t.shutdown().await.expect("clean shutdown");
}

/// The admin listener serves the page and its feed too; JSON clients get its endpoints.
#[tokio::test]
async fn the_admin_listener_serves_the_page_and_its_feed() {
    let t = spawn(Setup::default().arg("--admin-listen", "127.0.0.1:0")).await;
    let admin = t.admin.expect("admin listener bound");
    let get = |path: &str, accept: &str| {
        t.client
            .get(format!("http://{admin}{path}"))
            .header("accept", accept)
            .send()
    };
    let page = get("/", "text/html,application/xhtml+xml,*/*;q=0.8")
        .await
        .unwrap();
    assert_eq!(page.status(), 200);
    assert_eq!(page.headers()["content-type"], "text/html; charset=utf-8");
    assert!(page.text().await.unwrap().contains("status/feed"));
    let index: Value =
        serde_json::from_str(&get("/", "*/*").await.unwrap().text().await.unwrap()).unwrap();
    assert!(index["endpoints"]["/status/feed"].is_string(), "{index}");
    assert!(index["endpoints"]["/metrics"].is_string(), "{index}");
    assert!(index["endpoints"].get("/proxy/score").is_none(), "{index}");
    let feed = get("/status/feed", "application/json").await.unwrap();
    let feed: Value = serde_json::from_str(&feed.text().await.unwrap()).unwrap();
    assert_eq!(feed["status"]["rate_per_second"], 10.0);
    assert_eq!(feed["links"][0]["href"], "metrics");
    // The public listener's `GET /` without Accept is still the original's JSON index.
    let public = t.get("/").await;
    assert_eq!(public.header("content-type"), Some("application/json"));
    assert_eq!(public.json()["service"], "score-proxy");
    t.shutdown().await.expect("clean shutdown");
}

/// The feed, the page and the index, after lookups of every kind (hits, misses, a client id
/// the upstream refuses, a CPF that fails validation), hold no CPF and no client id.
#[tokio::test]
async fn no_cpf_or_client_id_in_the_page_or_its_feed() {
    let t = spawn(
        Setup::default()
            .arg("--admin-listen", "127.0.0.1:0")
            .sim(|s| s.client_ids = Some([SECRET_CLIENT.to_owned()].into())),
    )
    .await;
    let refused_client = "client-b71c-refused-also-secret";
    for n in FIRST_CPF..FIRST_CPF + 4 {
        assert_eq!(t.lookup(&cpf(n), SECRET_CLIENT).await.status, 200);
        assert_eq!(t.lookup(&cpf(n), SECRET_CLIENT).await.status, 200);
    }
    assert_eq!(
        t.lookup(&cpf(FIRST_CPF + 4), refused_client).await.status,
        401
    );
    let invalid = format!("{}0", cpf(FIRST_CPF + 5));
    assert_eq!(t.lookup(&invalid, SECRET_CLIENT).await.status, 400);

    let admin = t.admin.expect("admin listener bound");
    let mut seen = String::new();
    for url in [
        t.url("/status/feed"),
        t.url("/"),
        format!("http://{admin}/status/feed"),
    ] {
        seen.push_str(
            &t.client
                .get(url)
                .send()
                .await
                .unwrap()
                .text()
                .await
                .unwrap(),
        );
    }
    for url in [t.url("/"), format!("http://{admin}/")] {
        let page = t.client.get(url).header("accept", "text/html").send().await;
        seen.push_str(&page.unwrap().text().await.unwrap());
    }
    let f = feed(&t).await;
    assert_eq!(calls_total(&f), 5, "{f}");
    assert_eq!(f["timeline"]["calls"].as_array().unwrap().len(), 5);
    assert_private(&seen, FIRST_CPF..=FIRST_CPF + 5);
    assert!(!seen.contains(refused_client));
    assert!(!seen.contains(&invalid));
    t.shutdown().await.expect("clean shutdown");
}

/// No CPF of the range (with or without punctuation) and not the client id.
fn assert_private(text: &str, cpfs: std::ops::RangeInclusive<u32>) {
    assert!(!text.contains(SECRET_CLIENT), "the client id appears");
    for n in cpfs {
        let digits = cpf(n);
        let dotted = format!(
            "{}.{}.{}-{}",
            &digits[..3],
            &digits[3..6],
            &digits[6..9],
            &digits[9..]
        );
        assert!(!text.contains(&digits), "CPF {digits} appears");
        assert!(!text.contains(&dotted), "CPF {dotted} appears");
    }
}
