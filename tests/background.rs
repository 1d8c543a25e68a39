//! Background refreshes (stale-while-revalidate's and refresh-ahead's) use only budget no
//! caller needs: they wait behind every caller's lookup, give their place to a caller's
//! lookup of the same key, and refresh-ahead keeps a hot key from ever missing at its TTL.

mod common;

use std::time::Duration;

use common::{Reply, Setup, TestApp, cpf, spawn};

/// The CPFs the simulator saw, in arrival order.
fn arrivals(app: &TestApp) -> Vec<String> {
    app.sim
        .stats()
        .arrivals
        .into_iter()
        .map(|a| a.cpf)
        .collect()
}

/// Waits until `n` lookups are accounted for: queued, or their upstream call started.
async fn placed(app: &TestApp, n: f64) {
    tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            let text = app.metrics().await;
            let queued = common::metric_value(&text, "score_proxy_queue_depth");
            let started = common::metric_value(&text, "score_proxy_upstream_call_starts_total");
            if queued + started >= n {
                break;
            }
            tokio::task::yield_now().await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{n} lookups were never queued or started"));
}

async fn all(handles: Vec<tokio::task::JoinHandle<Reply>>) -> Vec<Reply> {
    let mut replies = Vec::new();
    for handle in handles {
        replies.push(handle.await.unwrap());
    }
    replies
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refresh_starts_only_after_every_caller_queued_before_or_after_it() {
    let app = spawn(
        Setup::default()
            .arg("--cache-ttl", "200ms")
            .arg("--stale-while-revalidate", "60s"),
    )
    .await;
    assert_eq!(app.lookup(&cpf(1), "000").await.x_cache(), "MISS");
    // Only time passing makes the entry expire.
    tokio::time::sleep(Duration::from_millis(250)).await;

    // Callers queued before the stale answer...
    let mut callers: Vec<_> = (10..16).map(|n| app.spawn_lookup(&cpf(n), "000")).collect();
    placed(&app, 7.0).await;
    let stale = app.lookup(&cpf(1), "000").await;
    assert_eq!((stale.status, stale.x_cache()), (200, "STALE"));
    // ...and after it, while its refresh waits: they go first too.
    callers.extend((16..18).map(|n| app.spawn_lookup(&cpf(n), "000")));
    placed(&app, 9.0).await;
    for reply in all(callers).await {
        assert_eq!((reply.status, reply.x_cache()), (200, "MISS"));
    }
    app.metric_reaches(
        "score_proxy_background_lookups_total{outcome=\"fetched\",reason=\"revalidate\"}",
        1.0,
    )
    .await;
    let seen = arrivals(&app);
    assert_eq!(seen.len(), 10, "{seen:?}");
    assert_eq!(
        seen.last(),
        Some(&cpf(1)),
        "the refresh went after every caller: {seen:?}"
    );
    assert_eq!(app.lookup(&cpf(1), "000").await.x_cache(), "HIT");
    assert_eq!(
        app.metric("score_proxy_background_lookups_waiting").await,
        0.0
    );
    app.assert_no_violations();
    app.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_callers_lookup_takes_the_place_of_a_refresh_that_has_not_started() {
    let app = spawn(
        Setup::default()
            .arg("--cache-ttl", "300ms")
            .arg("--stale-while-revalidate", "1200ms"),
    )
    .await;
    assert_eq!(app.lookup(&cpf(2), "000").await.x_cache(), "MISS");
    let fetched = tokio::time::Instant::now();
    // Past the TTL, inside the stale window (0.3 s to 1.5 s after the fetch), which leaves
    // a loaded machine over a second to place the callers below.
    tokio::time::sleep(Duration::from_millis(350)).await;
    // Enough callers that the refresh cannot start before its window ends (about 2.8 s of
    // calls at the test's 140 ms interval, from 0.35 s, against a window ending at 1.5 s).
    let callers: Vec<_> = (20..40).map(|n| app.spawn_lookup(&cpf(n), "000")).collect();
    placed(&app, 21.0).await;
    assert_eq!(app.lookup(&cpf(2), "000").await.x_cache(), "STALE");
    // Past the window the entry is a miss: this caller's lookup takes the refresh's place.
    tokio::time::sleep_until(fetched + Duration::from_millis(1600)).await;
    let miss = app.lookup(&cpf(2), "000").await;
    assert_eq!((miss.status, miss.x_cache()), (200, "MISS"));
    all(callers).await;
    app.metric_reaches(
        "score_proxy_background_lookups_total{outcome=\"superseded\",reason=\"revalidate\"}",
        1.0,
    )
    .await;
    let calls_for_key = arrivals(&app).iter().filter(|c| **c == cpf(2)).count();
    assert_eq!(
        calls_for_key, 2,
        "one call for the first miss, one for the second"
    );
    app.assert_no_violations();
    app.shutdown().await.unwrap();
}

/// The acceptance test: a hot key queried without pause across several TTLs never
/// misses after the first lookup, while distinct lookups made meanwhile wait at most one
/// interval more than they would alone (a refresh already under way), by the simulator's
/// clock. The rate is lowered to 2/s here so that the interval (540 ms) dwarfs a noisy
/// machine's scheduling delays; the bound allows 250 ms of those.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refresh_ahead_keeps_a_hot_key_from_missing_without_delaying_callers() {
    let app = spawn(
        Setup::default()
            .arg("--rate", "2")
            .arg("--cache-ttl", "3s")
            .arg("--refresh-ahead", "2s"),
    )
    .await;
    let interval = app.app.pacer.interval();
    let hot = cpf(3);
    assert_eq!(app.lookup(&hot, "000").await.x_cache(), "MISS");

    // Distinct lookups, one every 1.3 s, each timed from its send to its arrival upstream.
    let callers = {
        let client = app.client.clone();
        let url = app.url("/proxy/score?client_id=000&cpf=");
        let sim = app.sim.sim().clone();
        tokio::spawn(async move {
            let mut sent = Vec::new();
            for n in 0..7 {
                let key = cpf(300 + n);
                let at = sim.elapsed();
                let reply = client.get(format!("{url}{key}")).send().await.unwrap();
                assert_eq!(reply.status(), 200);
                assert_eq!(reply.headers()["x-cache"], "MISS");
                sent.push((key, at));
                tokio::time::sleep(Duration::from_millis(1300)).await;
            }
            sent
        })
    };
    // The hot key, for 10 s (more than three TTLs).
    hits_for(&app, &hot, Duration::from_secs(10)).await;
    let sent = callers.await.unwrap();

    let stats = app.assert_no_violations();
    for (key, at) in sent {
        let arrival = stats
            .arrivals
            .iter()
            .find(|a| a.cpf == key)
            .expect("each caller's lookup reached the upstream");
        let waited = arrival.at.saturating_sub(at);
        assert!(
            waited <= interval + Duration::from_millis(250),
            "a caller waited {waited:?} for its call (interval {interval:?})"
        );
    }
    let refreshes = stats.arrivals.iter().filter(|a| a.cpf == hot).count() - 1;
    assert!(
        refreshes >= 3,
        "the hot key was refreshed {refreshes} times"
    );
    assert_eq!(
        app.metric(
            "score_proxy_background_lookups_total{outcome=\"fetched\",reason=\"refresh_ahead\"}"
        )
        .await,
        refreshes as f64
    );
    app.shutdown().await.unwrap();
}

/// Refresh-ahead goes before a bulk job's items: a job using every slot callers leave free
/// does not starve the refreshes that keep a hot key from missing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refresh_ahead_goes_before_a_bulk_jobs_items() {
    let app = spawn(
        Setup::default()
            .arg("--rate", "2")
            .arg("--cache-ttl", "3s")
            .arg("--refresh-ahead", "2s"),
    )
    .await;
    let hot = cpf(4);
    assert_eq!(app.lookup(&hot, "000").await.x_cache(), "MISS");
    // 30 CPFs at 2 calls a second: the job keeps an item waiting for the whole test.
    let cpfs: Vec<String> = (700..730).map(cpf).collect();
    let submitted = app
        .client
        .post(app.url("/jobs"))
        .header("content-type", "application/json")
        .body(serde_json::json!({ "client_id": "000", "cpfs": cpfs }).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(submitted.status(), 202);

    // The hot key, for 7 s (more than two TTLs).
    hits_for(&app, &hot, Duration::from_secs(7)).await;
    let job_calls = app
        .metric("score_proxy_background_lookups_total{outcome=\"fetched\",reason=\"job\"}")
        .await;
    assert!(
        job_calls >= 5.0,
        "the job went on meanwhile ({job_calls} items)"
    );
    assert!(
        app.metric(
            "score_proxy_background_lookups_total{outcome=\"fetched\",reason=\"refresh_ahead\"}"
        )
        .await
            >= 2.0
    );
    app.assert_no_violations();
    app.shutdown().await.unwrap();
}

/// Looks `hot` up every 20 ms for `how_long`, and asserts that every lookup is a hit.
async fn hits_for(app: &TestApp, hot: &str, how_long: Duration) {
    let until = tokio::time::Instant::now() + how_long;
    let mut lookups = 0;
    while tokio::time::Instant::now() < until {
        let reply = app.lookup(hot, "000").await;
        assert_eq!(
            (reply.status, reply.x_cache()),
            (200, "HIT"),
            "the hot key missed after {lookups} lookups"
        );
        lookups += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
