//! `/metrics` after a scenario whose every step is known: the exact counter values and gauge
//! levels it must leave behind.

mod common;

use std::time::Duration;

use common::{Setup, cpf, metric_value, spawn};
use score_sim::Fault;
use score_test_support::prom::Scrape;

#[tokio::test]
async fn a_known_scenario_leaves_exact_counts() {
    let t = spawn(
        Setup::default()
            .arg("--upstream-max-in-flight", 1)
            .arg("--upstream-timeout", "1s")
            .arg("--queue-capacity", 2)
            .arg("--upstream-penalty", "1500ms")
            .sim(|s| s.penalty = Duration::from_secs(1)),
    )
    .await;

    // A miss, then a hit.
    assert_eq!(t.lookup(&cpf(1), "000").await.x_cache(), "MISS");
    assert_eq!(t.lookup(&cpf(1), "000").await.x_cache(), "HIT");
    // A bad input.
    assert_eq!(
        t.get("/proxy/score?cpf=12345678900&client_id=000")
            .await
            .status,
        400
    );

    // Stall the dispatcher behind a call that hangs until the upstream timeout (a miss).
    t.sim.set_fault(Fault::Hang);
    let hung = t.spawn_lookup(&cpf(999), "000");
    t.sim.wait_for_calls(2).await;
    t.sim.set_fault(Fault::None);

    // A queued miss and an identical lookup coalesced onto it.
    let leader = t.spawn_lookup(&cpf(2), "000");
    t.queue_depth_reaches(1).await;
    let follower = t.spawn_lookup(&cpf(2), "000");
    t.metric_reaches("score_proxy_cache_lookups_total{result=\"coalesced\"}", 1.0)
        .await;
    // A second queued miss fills the queue (capacity 2)...
    let quitter = t.spawn_lookup(&cpf(3), "000");
    t.queue_depth_reaches(2).await;
    // ...so the next distinct lookup is refused (not a cache lookup: it never got in).
    assert_eq!(t.lookup(&cpf(4), "000").await.status, 429);
    // A client that hangs up while queued.
    quitter.abort();
    t.queue_depth_reaches(1).await;

    let during = t.metrics().await;
    assert_eq!(metric_value(&during, "score_proxy_queue_depth"), 1.0);
    assert_eq!(
        metric_value(&during, "score_proxy_upstream_calls_in_flight"),
        1.0
    );
    assert_eq!(metric_value(&during, "score_proxy_queue_capacity"), 2.0);

    assert_eq!(hung.await.unwrap().status, 504);
    assert_eq!(leader.await.unwrap().x_cache(), "MISS");
    let f = follower.await.unwrap();
    assert_eq!(f.status, 200, "{}", f.body);
    assert_eq!(f.x_cache(), "COALESCED");

    // An upstream penalty: the simulator's rule becomes stricter than our pace (reset first,
    // so that the previous call does not count against the new rule).
    t.sim.reset();
    t.sim.set_min_interval(Duration::from_secs(1));
    let a = t.spawn_lookup(&cpf(5), "000");
    let b = t.spawn_lookup(&cpf(6), "000");
    assert_eq!(a.await.unwrap().status, 200);
    assert_eq!(b.await.unwrap().status, 200);

    let m = t.metrics().await;
    let v = |series: &str| metric_value(&m, series);
    assert_eq!(v("score_proxy_cache_lookups_total{result=\"hit\"}"), 1.0);
    // cpf 1, 999, 2, 3, 4 (then refused: the queue was full), 5 and 6 missed the cache and
    // led a lookup of their own; cpf 2's twin coalesced.
    assert_eq!(v("score_proxy_cache_lookups_total{result=\"miss\"}"), 7.0);
    assert_eq!(
        v("score_proxy_cache_lookups_total{result=\"coalesced\"}"),
        1.0
    );
    // Each valid lookup counted once (9 sent, the bad input not among them); no stale one.
    let scrape = Scrape::parse(&m).unwrap();
    assert_eq!(scrape.sum("score_proxy_cache_lookups_total", &[]), 9.0);
    assert!(!m.contains("result=\"stale\""));
    assert_eq!(v("score_proxy_cache_stale_answers_total"), 0.0);
    assert_eq!(
        v("score_proxy_validation_rejections_total{reason=\"cpf_check_digits\"}"),
        1.0
    );
    assert_eq!(v("score_proxy_queue_refusals_total{reason=\"full\"}"), 1.0);
    assert_eq!(
        v("score_proxy_queue_refusals_total{reason=\"deadline\"}"),
        0.0
    );
    assert_eq!(v("score_proxy_queue_abandoned_total"), 1.0);
    // Admitted: 999, 2, 3, 5, 6 (cpf 1 too). The retry is not a new admission.
    assert_eq!(v("score_proxy_queue_admissions_total"), 6.0);
    assert_eq!(v("score_proxy_queue_depth"), 0.0);
    assert_eq!(
        v("score_proxy_upstream_calls_total{class=\"2xx\",outcome=\"ok\"}"),
        4.0
    );
    assert_eq!(
        v("score_proxy_upstream_calls_total{class=\"none\",outcome=\"timeout\"}"),
        1.0
    );
    assert_eq!(
        v("score_proxy_upstream_calls_total{class=\"4xx\",outcome=\"penalty\"}"),
        1.0
    );
    assert_eq!(v("score_proxy_upstream_calls_in_flight"), 0.0);
    assert_eq!(v("score_proxy_upstream_retries_total"), 1.0);
    assert_eq!(v("score_proxy_pacing_penalties_total"), 1.0);
    assert!(v("score_proxy_pacing_penalty_pause_seconds_total") >= 1.5);
    assert_eq!(v("score_proxy_pacing_rate_per_second"), 10.0);
    assert_eq!(v("score_proxy_pacing_interval_seconds"), 0.14);
    // Six lookups were admitted with a booked start (1, 999, 2, 3, 5, 6), and six calls
    // started (1, 999, 2, 5, 6 and 6's retry).
    assert_eq!(v("score_proxy_pacing_permit_wait_seconds_count"), 6.0);
    assert_eq!(v("score_proxy_queue_wait_seconds_count"), 6.0);
    assert_eq!(v("score_proxy_upstream_call_starts_total"), 6.0);
    assert_eq!(v("score_proxy_cache_entries"), 4.0);

    let code = |c: u16| {
        v(&format!(
            "score_proxy_http_requests_total{{code=\"{c}\",route=\"/proxy/score\"}}"
        ))
    };
    assert_eq!(code(200), 6.0);
    assert_eq!(code(400), 1.0);
    assert_eq!(code(429), 1.0);
    assert_eq!(code(504), 1.0);
    assert_eq!(code(499), 1.0, "the client that hung up is counted");
    assert_eq!(
        v(
            "score_proxy_http_request_duration_seconds_count{outcome=\"hit\",route=\"/proxy/score\"}"
        ),
        1.0
    );
    assert_eq!(
        v(
            "score_proxy_http_request_duration_seconds_count{outcome=\"queue_full\",route=\"/proxy/score\"}"
        ),
        1.0
    );
    assert_eq!(
        v("score_proxy_http_requests_in_flight{route=\"/proxy/score\"}"),
        0.0
    );
    // The standard process metrics, unprefixed.
    assert!(m.contains("\nprocess_resident_memory_bytes "));
    assert!(m.contains("\nprocess_open_fds "));
    assert!(m.contains("\nprocess_cpu_seconds_total "));
    assert!(!m.contains("score_proxy_process_"));
    assert!(m.contains("score_proxy_build_info{version=\""));
    // States, one series each; configuration, as gauges.
    assert_eq!(v("score_proxy_breaker_state{state=\"closed\"}"), 1.0);
    assert_eq!(v("score_proxy_breaker_state{state=\"half_open\"}"), 0.0);
    assert_eq!(v("score_proxy_breaker_state{state=\"open\"}"), 0.0);
    assert_eq!(v("score_proxy_pacing_mode{mode=\"local\"}"), 1.0);
    assert_eq!(v("score_proxy_pacing_mode{mode=\"shared\"}"), 0.0);
    assert_eq!(v("score_proxy_pacing_mode{mode=\"fallback\"}"), 0.0);
    assert_eq!(v("score_proxy_queue_timeout_seconds"), 30.0);
    assert_eq!(v("score_proxy_expected_replicas"), 1.0);
}

/// `cache_lookups_total` counts each valid lookup once, whatever became of it (answered,
/// refused by a full queue or an open breaker, answered stale), so that its sum over
/// `result` is the valid lookups; stale answers are counted apart.
#[tokio::test]
async fn every_valid_lookup_is_counted_once_and_stale_answers_apart() {
    let t = spawn(
        Setup::default()
            .arg("--cache-ttl", "200ms")
            .arg("--stale-if-error", "10m")
            .arg("--upstream-timeout", "1s")
            .arg("--breaker-failures", 1)
            .arg("--breaker-cooldown", "60s"),
    )
    .await;
    let mut valid = 0.0;
    // A miss, then a hit (or a miss again on a machine slower than the TTL).
    assert_eq!(t.lookup(&cpf(1), "000").await.status, 200);
    assert_eq!(t.lookup(&cpf(1), "000").await.status, 200);
    valid += 2.0;
    // Not a valid lookup.
    assert_eq!(t.get("/proxy/score?cpf=1&client_id=000").await.status, 400);

    // A call that hangs until the upstream timeout, and an identical lookup joining it.
    t.sim.set_fault(Fault::Hang);
    let leader = t.spawn_lookup(&cpf(2), "000");
    let before = t.sim.calls();
    t.sim.wait_for_calls(before + 1).await;
    let follower = t.spawn_lookup(&cpf(2), "000");
    t.metric_reaches("score_proxy_cache_lookups_total{result=\"coalesced\"}", 1.0)
        .await;
    // The timeout opens the breaker (one failure is enough here).
    assert_eq!(leader.await.unwrap().status, 504);
    assert_eq!(follower.await.unwrap().status, 504);
    valid += 2.0;
    assert_eq!(t.get("/ready").await.json()["breaker"], "open");

    // cpf 1 expired during the timeout (TTL 200 ms < 1 s): refused by the open breaker, it
    // is answered stale; cpf 3, never fetched, is refused.
    let stale = t.lookup(&cpf(1), "000").await;
    assert_eq!(stale.status, 200, "{}", stale.body);
    assert_eq!(stale.x_cache(), "STALE");
    assert_eq!(t.lookup(&cpf(3), "000").await.status, 503);
    valid += 2.0;

    let m = t.metrics().await;
    let scrape = Scrape::parse(&m).unwrap();
    let lookups = scrape.sum("score_proxy_cache_lookups_total", &[]);
    assert_eq!(lookups, valid, "{m}");
    let requests = scrape.sum(
        "score_proxy_http_requests_total",
        &[("route", "/proxy/score")],
    );
    let rejected = scrape.sum("score_proxy_validation_rejections_total", &[]);
    assert_eq!(lookups, requests - rejected);
    assert_eq!(
        metric_value(&m, "score_proxy_cache_stale_answers_total"),
        1.0
    );
    assert!(!m.contains("result=\"stale\""));
    let results: Vec<&str> = scrape
        .samples("score_proxy_cache_lookups_total", &[])
        .filter_map(|s| s.label("result"))
        .collect();
    assert_eq!(results.len(), 3, "{results:?}");
    for r in ["hit", "miss", "coalesced"] {
        assert!(results.contains(&r), "{results:?}");
    }
}

/// The breaker's state is true at scrape time: once the cool-down has passed, an idle
/// proxy's `/metrics` reads `half_open` (the next lookup's call is the probe), with no
/// lookup to move it, so an alert on `open` clears by itself.
#[tokio::test]
async fn an_idle_breaker_reads_half_open_once_the_cool_down_has_passed() {
    let t = spawn(
        Setup::default()
            .arg("--breaker-failures", 1)
            .arg("--breaker-cooldown", "1s")
            .sim(|s| s.fault = Fault::Error),
    )
    .await;
    assert_eq!(t.lookup(&cpf(1), "000").await.status, 502);
    let state =
        |m: &str, s: &str| metric_value(m, &format!("score_proxy_breaker_state{{state=\"{s}\"}}"));
    let reopen = t.app.breaker.open_until().expect("open");
    let m = t.metrics().await;
    if tokio::time::Instant::now() < reopen {
        assert_eq!(state(&m, "open"), 1.0, "{m}");
        assert_eq!(state(&m, "half_open"), 0.0);
        assert_eq!(state(&m, "closed"), 0.0);
    }

    // The end of the cool-down is the event; nothing else happens meanwhile.
    tokio::time::sleep_until(reopen).await;
    let calls = t.sim.calls();
    let m = t.metrics().await;
    assert_eq!(state(&m, "half_open"), 1.0, "{m}");
    assert_eq!(state(&m, "open"), 0.0);
    assert_eq!(state(&m, "closed"), 0.0);
    let half_open = "score_proxy_breaker_transitions_total{to=\"half_open\"}";
    assert_eq!(metric_value(&m, half_open), 1.0);
    // Scraping again changes nothing, and nothing reached the upstream.
    let m = t.metrics().await;
    assert_eq!(state(&m, "half_open"), 1.0);
    assert_eq!(metric_value(&m, half_open), 1.0);
    assert_eq!(t.sim.calls(), calls);
    assert_eq!(
        metric_value(
            &m,
            "score_proxy_http_requests_total{code=\"200\",route=\"/proxy/score\"}"
        ),
        0.0
    );
}

#[tokio::test]
async fn metrics_can_move_to_an_admin_listener() {
    let t = spawn(
        Setup::default()
            .arg("--admin-listen", "127.0.0.1:0")
            .arg("--public-metrics", "false"),
    )
    .await;
    // Not on the public listener any more...
    assert_eq!(t.get("/metrics").await.status, 404);
    // ...but on the admin one, always in the Prometheus format.
    let admin = t.admin.expect("admin listener bound");
    let r = t
        .client
        .get(format!("http://{admin}/metrics"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(
        r.text()
            .await
            .unwrap()
            .contains("# TYPE score_proxy_queue_depth gauge")
    );
    let r = t
        .client
        .get(format!("http://{admin}/health"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // Lookups are not served on the admin listener.
    let r = t
        .client
        .get(format!(
            "http://{admin}/proxy/score?cpf={}&client_id=000",
            cpf(1)
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(t.sim.calls(), 0);
}

#[tokio::test]
async fn no_label_ever_holds_a_cpf_or_a_client_id() {
    let t = spawn(Setup::default()).await;
    let client = "client-id-that-must-not-leak";
    assert_eq!(t.lookup(&cpf(77), client).await.status, 200);
    assert_eq!(t.lookup(&cpf(77), client).await.status, 200);
    t.get(&format!("/proxy/score?cpf=1234567890x&client_id={client}"))
        .await;
    t.get(&format!("/nope/{}", cpf(78))).await;
    let m = t.metrics().await;
    assert!(!m.contains(&cpf(77)));
    assert!(!m.contains(&cpf(78)));
    assert!(!m.contains("1234567890x"));
    assert!(!m.contains(client));
}
