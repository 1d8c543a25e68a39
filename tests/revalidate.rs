//! Stale-while-revalidate: an entry past its TTL by less than the window is answered at
//! once, and one background refresh, shared by every stale answer of that key, fetches it
//! again.

mod common;

use std::time::{Duration, Instant};

use common::{Setup, cpf, spawn};

const TTL: Duration = Duration::from_millis(300);
/// The upstream's latency: a stale answer must come well under it.
const LATENCY: Duration = Duration::from_millis(1000);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_entry_is_answered_at_once_and_refreshed_by_one_call() {
    let app = spawn(
        Setup::default()
            .arg("--cache-ttl", "300ms")
            .arg("--stale-while-revalidate", "30s")
            .sim(|s| s.latency = LATENCY),
    )
    .await;
    let first = app.lookup(&cpf(1), "000").await;
    assert_eq!((first.status, first.x_cache()), (200, "MISS"));
    assert_eq!(app.sim.stats().calls, 1);

    // Only time passing makes the entry expire.
    tokio::time::sleep(TTL).await;
    for _ in 0..5 {
        let started = Instant::now();
        let stale = app.lookup(&cpf(1), "000").await;
        let took = started.elapsed();
        assert_eq!((stale.status, stale.x_cache()), (200, "STALE"));
        assert!(stale.header("age").is_some());
        assert_eq!(stale.body, first.body);
        assert!(took < LATENCY / 4, "a stale answer took {took:?}");
    }
    // The five stale answers shared one refresh: the upstream sees one more call.
    app.metric_reaches(
        "score_proxy_background_lookups_total{outcome=\"fetched\",reason=\"revalidate\"}",
        1.0,
    )
    .await;
    let fresh = app.lookup(&cpf(1), "000").await;
    assert_eq!((fresh.status, fresh.x_cache()), (200, "HIT"));
    assert_eq!(
        app.sim.stats().calls,
        2,
        "exactly one refresh reached the upstream"
    );
    assert_eq!(
        app.metric("score_proxy_cache_revalidating_answers_total")
            .await,
        5.0
    );
    assert_eq!(
        app.metric("score_proxy_cache_lookups_total{result=\"hit\"}")
            .await,
        6.0,
        "a stale answer is a lookup answered from the cache"
    );
    app.assert_no_violations();
    app.shutdown().await.unwrap();
}

/// Past the window, an entry is a miss again (or stale-if-error's, when that is on).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_the_window_an_entry_is_fetched_again_while_the_caller_waits() {
    let app = spawn(
        Setup::default()
            .arg("--cache-ttl", "100ms")
            .arg("--stale-while-revalidate", "100ms"),
    )
    .await;
    assert_eq!(app.lookup(&cpf(2), "000").await.x_cache(), "MISS");
    tokio::time::sleep(Duration::from_millis(250)).await;
    assert_eq!(app.lookup(&cpf(2), "000").await.x_cache(), "MISS");
    assert_eq!(app.sim.stats().calls, 2);
    app.shutdown().await.unwrap();
}
