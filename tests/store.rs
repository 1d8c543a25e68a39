//! The persistent cache tier across real restarts of the binary: what the budget bought is
//! served again without an upstream call, after a clean stop and after `kill -9`; a store
//! that cannot be used is moved aside and the proxy serves anyway; and nothing under the
//! data directory names a CPF or a client id.
//!
//! The proxy runs as a process of its own (a restart is the point); the upstream is the
//! project's simulator, in this test's process, which counts every call it receives.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::process::{Proxy, start};
use common::{SIM_INTERVAL, cpf};
use score_sim::{Simulator, SimulatorConfig, SimulatorHandle};

/// Distinctive client ids, so that finding one among a file's bytes cannot be chance.
const CLIENTS: [&str; 2] = ["store-test-client-7f3a", "store-test-other-c91e"];
const N: u32 = 6;

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

/// A bulk job survives a SIGTERM and then a `kill -9` in the middle of its run: after each
/// restart it resumes, and in the end every CPF has its line and was called exactly once.
/// The window of possible loss is the one of the cache's answers (one batch commit): a
/// result not yet on disk is recovered from the cached answer, which the writer committed
/// first; so `kill -9` is sent once `score_proxy_store_writes_total` counts every call made
/// by then. A call the job makes between that count and the kill (the runner does not stop
/// for the test) may be lost and made again: only a CPF first called in that window may be
/// called twice.
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
    let counted = sim.stats().calls;
    proxy
        .metric_reaches("score_proxy_store_writes_total", counted as f64)
        .await;
    proxy.kill();
    // A call made between that count and the kill may not be on disk: the loss window.
    let at_kill = sim.stats().calls;

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
        let first = stats.arrivals.iter().position(|a| &a.cpf == cpf);
        let calls = stats.arrivals.iter().filter(|a| &a.cpf == cpf).count();
        // Once, unless its first call was in the loss window (then twice at most).
        let in_window = first.is_some_and(|i| (counted as usize..at_kill as usize).contains(&i));
        assert!(
            calls == 1 || (calls == 2 && in_window),
            "a CPF was called {calls} times (first call at {first:?}; loss window {counted}..{at_kill})"
        );
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
