//! The core proxy, end to end over HTTP: every defect measured in the Python original has a
//! test here that would fail on it.
//!
//! Size: one file on purpose: it is the list of the original's defects (`docs/upstream.md`)
//! checked one by one, and reads as that list; each test is short.

mod common;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use common::{Setup, cpf, spawn};
use score_sim::{Fault, RetryAfterMode};

#[tokio::test]
async fn the_originals_curl_works_unchanged() {
    let t = spawn(Setup::default()).await;
    let r = t.get("/proxy/score?cpf=89336333089&client_id=000").await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.header("content-type"), Some("application/json"));
    assert_eq!(r.x_cache(), "MISS");
    let body = r.json();
    assert!(body["score"].is_i64(), "{body}");
    // The upstream's body is passed through as it came.
    assert_eq!(body["cpf"], "89336333089");
    // The formatted CPF is the same lookup, answered from the cache.
    let again = t.get("/proxy/score?cpf=893.363.330-89&client_id=000").await;
    assert_eq!(again.status, 200);
    assert_eq!(again.x_cache(), "HIT");
    assert_eq!(again.body, r.body);
    assert_eq!(t.sim.calls(), 1);
    // The original's health check and its index of endpoints.
    let health = t.get("/health").await;
    assert_eq!(health.status, 200);
    assert!(
        health.body.contains("\"status\":\"healthy\""),
        "{}",
        health.body
    );
    let index = t.get("/").await;
    assert_eq!(index.status, 200);
    assert_eq!(index.header("content-type"), Some("application/json"));
    let endpoints = &index.json()["endpoints"];
    for path in ["/proxy/score", "/health", "/metrics", "/status"] {
        assert!(endpoints[path].is_string(), "{path}: {}", index.body);
    }
    t.assert_no_violations();
}

#[tokio::test]
async fn twenty_distinct_concurrent_lookups_all_succeed_without_a_violation() {
    let t = spawn(Setup::default()).await;
    let lookups: Vec<_> = (0..20).map(|i| t.spawn_lookup(&cpf(i), "000")).collect();
    for lookup in lookups {
        let r = lookup.await.unwrap();
        assert_eq!(r.status, 200, "{}", r.body);
        assert_eq!(r.x_cache(), "MISS");
    }
    let stats = t.assert_no_violations();
    assert_eq!(stats.calls, 20);
    let distinct: HashSet<_> = stats.arrivals.iter().map(|a| a.cpf.clone()).collect();
    assert_eq!(distinct.len(), 20, "one call per distinct lookup");
}

#[tokio::test]
async fn twenty_identical_concurrent_lookups_make_one_upstream_call() {
    // A slow upstream keeps the one call open while the others arrive.
    let t = spawn(Setup::default().sim(|s| s.latency = Duration::from_millis(1000))).await;
    let lookups: Vec<_> = (0..20).map(|_| t.spawn_lookup(&cpf(1), "000")).collect();
    let mut kinds = Vec::new();
    let mut bodies = HashSet::new();
    for lookup in lookups {
        let r = lookup.await.unwrap();
        assert_eq!(r.status, 200, "{}", r.body);
        kinds.push(r.x_cache().to_owned());
        bodies.insert(r.body);
    }
    assert_eq!(
        t.sim.calls(),
        1,
        "one upstream call for twenty identical lookups"
    );
    assert_eq!(bodies.len(), 1, "everyone got the same answer");
    assert_eq!(
        kinds.iter().filter(|k| *k == "MISS").count(),
        1,
        "{kinds:?}"
    );
    assert!(
        kinds
            .iter()
            .all(|k| ["MISS", "COALESCED", "HIT"].contains(&k.as_str())),
        "{kinds:?}"
    );
    t.assert_no_violations();
}

#[tokio::test]
async fn a_second_client_never_gets_the_first_clients_cached_answer() {
    let t = spawn(Setup::default().sim(|s| {
        s.client_ids = Some(["alice", "bob"].iter().map(|s| s.to_string()).collect());
    }))
    .await;
    let alice = t.lookup(&cpf(7), "alice").await;
    assert_eq!(alice.status, 200);
    assert_eq!(alice.x_cache(), "MISS");

    // The original served this from its CPF-keyed cache with 200.
    let mallory = t.lookup(&cpf(7), "mallory").await;
    assert_eq!(mallory.status, 401, "{}", mallory.body);
    assert_eq!(mallory.json()["error"], "upstream_unauthorized");
    assert!(
        !mallory.body.contains("mallory"),
        "error bodies never echo a client id"
    );

    let bob = t.lookup(&cpf(7), "bob").await;
    assert_eq!(bob.status, 200);
    assert_eq!(
        bob.x_cache(),
        "MISS",
        "bob's lookup is fetched with bob's id"
    );
    assert_ne!(bob.json()["request_id"], alice.json()["request_id"]);

    let stats = t.assert_no_violations();
    let ids: Vec<_> = stats
        .arrivals
        .iter()
        .map(|a| a.client_id.as_str())
        .collect();
    assert_eq!(ids, ["alice", "mallory", "bob"]);
}

/// Holds the dispatcher still: the only concurrency slot is taken by a call that hangs until
/// the upstream timeout. Everything queued after it waits, deterministically.
async fn stall(t: &common::TestApp) -> tokio::task::JoinHandle<common::Reply> {
    t.sim.set_fault(Fault::Hang);
    let hung = t.spawn_lookup(&cpf(999), "000");
    t.sim.wait_for_calls(1).await;
    t.sim.set_fault(Fault::None);
    hung
}

#[tokio::test]
async fn the_21st_waiting_lookup_is_refused_at_once_with_retry_after() {
    let t = spawn(
        Setup::default()
            .arg("--upstream-max-in-flight", 1)
            .arg("--upstream-timeout", "2s"),
    )
    .await;
    let hung = stall(&t).await;
    let waiting: Vec<_> = (0..20).map(|i| t.spawn_lookup(&cpf(i), "000")).collect();
    t.queue_depth_reaches(20).await;

    let started = Instant::now();
    let refused = t.lookup(&cpf(20), "000").await;
    assert_eq!(refused.status, 429, "{}", refused.body);
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "refused at once"
    );
    assert_eq!(refused.json()["error"], "queue_full");
    let retry_after = refused.retry_after().expect("429 carries Retry-After");
    assert!(retry_after >= 1);

    // /health is not behind the queue.
    let health = tokio::time::timeout(Duration::from_secs(2), t.get("/health"))
        .await
        .expect("health answers while the queue is full");
    assert_eq!(health.status, 200);
    let status = t.get("/status").await.json();
    assert_eq!(status["queue_size"], 20);
    assert_eq!(status["processing"], 1);

    assert_eq!(hung.await.unwrap().status, 504);
    for w in waiting {
        assert_eq!(w.await.unwrap().status, 200);
    }
    assert_eq!(
        t.metric("score_proxy_queue_refusals_total{reason=\"full\"}")
            .await,
        1.0
    );
    t.assert_no_violations();
}

#[tokio::test]
async fn a_client_that_hangs_up_while_queued_causes_no_upstream_call() {
    let t = spawn(
        Setup::default()
            .arg("--upstream-max-in-flight", 1)
            .arg("--upstream-timeout", "1s"),
    )
    .await;
    let hung = stall(&t).await;
    let quitter = t.spawn_lookup(&cpf(42), "000");
    t.queue_depth_reaches(1).await;
    quitter.abort();
    // The lookup leaves the queue as soon as the connection is gone.
    t.queue_depth_reaches(0).await;
    assert_eq!(hung.await.unwrap().status, 504);

    // The dispatcher is free again: a new lookup is served, and it is the only other call.
    let after = t.lookup(&cpf(43), "000").await;
    assert_eq!(after.status, 200);
    let stats = t.assert_no_violations();
    let called: Vec<_> = stats.arrivals.iter().map(|a| a.cpf.clone()).collect();
    assert_eq!(
        called,
        [cpf(999), cpf(43)],
        "no call for the abandoned lookup"
    );
    assert_eq!(t.metric("score_proxy_queue_abandoned_total").await, 1.0);
}

#[tokio::test]
async fn identical_lookups_keep_the_call_if_one_of_them_hangs_up() {
    let t = spawn(
        Setup::default()
            .arg("--upstream-max-in-flight", 1)
            .arg("--upstream-timeout", "1s"),
    )
    .await;
    let hung = stall(&t).await;
    let quitter = t.spawn_lookup(&cpf(5), "000");
    t.queue_depth_reaches(1).await;
    let stayer = t.spawn_lookup(&cpf(5), "000");
    // Wait until the second lookup has joined the flight (it shares the queue place; the
    // coalesced counter moves when it joins).
    tokio::time::timeout(Duration::from_secs(20), async {
        while t
            .metric("score_proxy_cache_lookups_total{result=\"coalesced\"}")
            .await
            < 1.0
        {
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("the second lookup joins the flight");
    quitter.abort();
    assert_eq!(hung.await.unwrap().status, 504);
    let r = stayer.await.unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.x_cache(), "COALESCED");
    assert_eq!(t.sim.calls(), 2);
    t.assert_no_violations();
}

#[tokio::test]
async fn invalid_input_gets_400_and_costs_no_upstream_call() {
    let t = spawn(Setup::default()).await;
    let cases = [
        (
            "/proxy/score?cpf=12345678900&client_id=000",
            "cpf_check_digits",
        ),
        (
            "/proxy/score?cpf=11111111111&client_id=000",
            "cpf_repeated_digits",
        ),
        ("/proxy/score?cpf=123&client_id=000", "cpf_format"),
        (
            "/proxy/score?cpf=893.363.330.89&client_id=000",
            "cpf_format",
        ),
        ("/proxy/score?client_id=000", "cpf_missing"),
        ("/proxy/score?cpf=89336333089", "client_id_missing"),
        (
            "/proxy/score?cpf=89336333089&client_id=",
            "client_id_missing",
        ),
        (
            "/proxy/score?cpf=89336333089&client_id=%01x",
            "client_id_unprintable",
        ),
        (
            "/proxy/score?cpf=89336333089&cpf=01658739060&client_id=000",
            "repeated_parameter",
        ),
        (
            "/proxy/score?cpf=89336333089%26x%3Dy&client_id=000",
            "cpf_format",
        ),
        ("/proxy/score?cpf=%FF%FE&client_id=000", "not_utf8"),
    ];
    for (path, reason) in cases {
        let r = t.get(path).await;
        assert_eq!(r.status, 400, "{path}: {}", r.body);
        let body = r.json();
        assert_eq!(body["error"], "invalid_request", "{path}");
        assert!(body["message"].as_str().is_some_and(|m| !m.is_empty()));
        assert!(!r.body.contains("89336333089"), "no CPF echoed: {}", r.body);
        let series = format!("score_proxy_validation_rejections_total{{reason=\"{reason}\"}}");
        assert!(t.metric(&series).await >= 1.0, "{path} counted as {reason}");
    }
    let long = "x".repeat(129);
    let r = t.lookup(&cpf(1), &long).await;
    assert_eq!(r.status, 400);
    assert_eq!(t.sim.calls(), 0, "bad input never reaches the upstream");
}

#[tokio::test]
async fn the_default_client_id_stands_in_for_a_missing_one() {
    let t = spawn(Setup::default().arg("--client-id", "000")).await;
    let r = t.get(&format!("/proxy/score?cpf={}", cpf(3))).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let r = t
        .get(&format!("/proxy/score?cpf={}&client_id=", cpf(3)))
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.x_cache(), "HIT");
    assert_eq!(t.sim.stats().arrivals[0].client_id, "000");
}

/// The proxy's pace is made too fast for the simulator on purpose (300 ms rule against
/// 140 ms starts), so the second call is penalised; the proxy must pause, retry once the
/// penalty is over, and not be penalised again for it.
async fn penalty_then_retry(mode: RetryAfterMode) {
    let t = spawn(Setup::default().arg("--upstream-penalty", "1s").sim(|s| {
        s.min_interval = Duration::from_millis(300);
        s.penalty = Duration::from_millis(500);
        s.retry_after = mode;
    }))
    .await;
    let a = t.spawn_lookup(&cpf(1), "000");
    let b = t.spawn_lookup(&cpf(2), "000");
    let (a, b) = (a.await.unwrap(), b.await.unwrap());
    assert_eq!(a.status, 200, "{}", a.body);
    assert_eq!(b.status, 200, "{}", b.body);
    let stats = t.sim.stats();
    assert_eq!(
        stats.violations, 1,
        "exactly the one provoked penalty: {stats:#?}"
    );
    assert_eq!(stats.calls, 3, "two lookups, one retry");
    let retry = &stats.arrivals[2];
    let penalised = &stats.arrivals[1];
    assert!(penalised.violation && !retry.violation);
    assert!(
        retry.at >= penalised.at + Duration::from_millis(500),
        "the retry waited out the penalty: {:?} after",
        retry.at - penalised.at
    );
    assert_eq!(t.metric("score_proxy_pacing_penalties_total").await, 1.0);
    assert_eq!(t.metric("score_proxy_upstream_retries_total").await, 1.0);
}

#[tokio::test]
async fn upstream_429_without_retry_after_pauses_and_retries() {
    penalty_then_retry(RetryAfterMode::None).await;
}

#[tokio::test]
async fn upstream_429_with_retry_after_seconds_pauses_and_retries() {
    penalty_then_retry(RetryAfterMode::Seconds).await;
}

#[tokio::test]
async fn upstream_429_with_retry_after_date_pauses_and_retries() {
    penalty_then_retry(RetryAfterMode::HttpDate).await;
}

#[tokio::test]
async fn a_penalty_that_outlasts_the_deadline_is_a_503_not_a_wait() {
    let t = spawn(
        Setup::default()
            .arg("--upstream-penalty", "3s")
            .arg("--queue-timeout", "1s")
            .sim(|s| s.min_interval = Duration::from_millis(300)),
    )
    .await;
    let a = t.spawn_lookup(&cpf(1), "000");
    let b = t.spawn_lookup(&cpf(2), "000");
    assert_eq!(a.await.unwrap().status, 200);
    let b = b.await.unwrap();
    assert_eq!(b.status, 503, "{}", b.body);
    assert_eq!(b.json()["error"], "upstream_penalty");
    assert!(
        b.retry_after().unwrap() >= 2,
        "Retry-After reflects the penalty left"
    );
    // During the pause, nothing else is sent.
    let c = t.lookup(&cpf(3), "000").await;
    assert_eq!(c.status, 503, "cannot start within 1 s of a 3 s pause");
    assert_eq!(t.sim.calls(), 2);
}

#[tokio::test]
async fn a_hung_upstream_gives_504_within_the_timeout() {
    let t = spawn(
        Setup::default()
            .arg("--upstream-timeout", "500ms")
            .sim(|s| s.fault = Fault::Hang),
    )
    .await;
    let started = Instant::now();
    let r = t.lookup(&cpf(1), "000").await;
    let took = started.elapsed();
    assert_eq!(r.status, 504, "{}", r.body);
    assert_eq!(r.json()["error"], "upstream_timeout");
    assert!(took >= Duration::from_millis(500), "{took:?}");
    assert!(took < Duration::from_secs(3), "{took:?}");
    // Other lookups are not blocked by the hung one.
    t.sim.set_fault(Fault::None);
    assert_eq!(t.lookup(&cpf(2), "000").await.status, 200);
    t.assert_no_violations();
}

#[tokio::test]
async fn upstream_failures_are_never_200() {
    let t = spawn(Setup::default()).await;
    for (fault, status, kind) in [
        (Fault::Error, 502, "upstream_error"),
        (Fault::Unavailable, 502, "upstream_error"),
        (Fault::Garbage, 502, "upstream_bad_body"),
        (Fault::Reset, 502, "upstream_bad_body"),
    ] {
        t.sim.set_fault(fault);
        let r = t.lookup(&cpf(fault as u32 + 10), "000").await;
        assert_eq!(r.status, status, "{fault:?}: {}", r.body);
        assert_eq!(r.json()["error"], kind, "{fault:?}");
    }
    // Failures are not cached: once the upstream recovers, the same lookup succeeds.
    t.sim.set_fault(Fault::None);
    let r = t.lookup(&cpf(Fault::Error as u32 + 10), "000").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.x_cache(), "MISS");
    t.assert_no_violations();
}

#[tokio::test]
async fn an_unreachable_upstream_is_a_502() {
    // A port nobody listens on: bind, note it, close.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let sim = score_sim::Simulator::spawn(Default::default())
        .await
        .unwrap();
    let config = common::config(&format!("http://127.0.0.1:{port}/api/score"), &[]);
    let server = score_proxy::http::server::Server::bind(config)
        .await
        .unwrap();
    let addr = server.local_addr();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(server.run(async {
        let _ = stopped.await;
    }));
    let r = reqwest::get(format!(
        "http://{addr}/proxy/score?cpf={}&client_id=000",
        cpf(1)
    ))
    .await
    .unwrap();
    assert_eq!(r.status(), 502);
    let body: serde_json::Value = serde_json::from_str(&r.text().await.unwrap()).unwrap();
    assert_eq!(body["error"], "upstream_error");
    let _ = stop.send(());
    running.await.unwrap().unwrap();
    drop(sim);
}

#[tokio::test]
async fn a_lookup_that_cannot_start_before_its_deadline_is_refused_at_admission() {
    // 140 ms per start and a 500 ms deadline: about four lookups fit, the rest cannot.
    let t = spawn(Setup::default().arg("--queue-timeout", "500ms")).await;
    let lookups: Vec<_> = (0..10).map(|i| t.spawn_lookup(&cpf(i), "000")).collect();
    let mut ok = 0;
    let mut refused = 0;
    for lookup in lookups {
        let r = lookup.await.unwrap();
        match r.status {
            200 => ok += 1,
            503 => {
                refused += 1;
                assert_eq!(r.json()["error"], "deadline_unreachable");
                assert!(r.retry_after().unwrap() >= 1);
            }
            other => panic!("unexpected {other}: {}", r.body),
        }
    }
    assert!(ok >= 3 && refused >= 4, "ok {ok}, refused {refused}");
    // Refused lookups never reached the upstream, and none was refused after waiting.
    assert_eq!(t.sim.calls(), ok);
    assert_eq!(
        t.metric("score_proxy_queue_refusals_total{reason=\"deadline\"}")
            .await,
        refused as f64
    );
    assert_eq!(
        t.metric("score_proxy_queue_refusals_total{reason=\"expired\"}")
            .await,
        0.0
    );
    t.assert_no_violations();
}

#[tokio::test]
async fn a_client_can_shorten_its_own_deadline_with_x_queue_timeout() {
    // 140 ms per start; the proxy would queue these for up to 30 s, but each client says it
    // will wait at most 300 ms: about three fit (starts at 0, 140 and 280 ms), the rest are
    // refused at once instead of being queued for a client that will have left.
    let t = spawn(Setup::default()).await;
    let lookups: Vec<_> = (0..8)
        .map(|i| t.spawn_lookup_with(&cpf(i), "000", &[("x-queue-timeout", "0.3")]))
        .collect();
    let (mut ok, mut refused) = (0, 0);
    for lookup in lookups {
        let r = lookup.await.unwrap();
        match r.status {
            200 => ok += 1,
            503 => {
                refused += 1;
                assert_eq!(r.json()["error"], "deadline_unreachable", "{}", r.body);
                assert!(r.retry_after().unwrap() >= 1);
            }
            other => panic!("unexpected {other}: {}", r.body),
        }
    }
    assert!(
        (1..=3).contains(&ok) && ok + refused == 8,
        "ok {ok}, refused {refused}"
    );
    assert_eq!(t.sim.calls(), ok);
    assert_eq!(
        t.metric("score_proxy_queue_refusals_total{reason=\"deadline\"}")
            .await,
        refused as f64
    );

    // A header that is not a number of seconds in range is a 400 that costs no call.
    for bad in [
        "", "-1", "0", "1e3", "NaN", "inf", ".5", "5.", "1.2.3", "3601", "2s",
    ] {
        let r = t
            .spawn_lookup_with(&cpf(100), "000", &[("x-queue-timeout", bad)])
            .await
            .unwrap();
        assert_eq!(r.status, 400, "{bad:?}: {}", r.body);
        assert_eq!(r.json()["error"], "invalid_request");
        assert!(
            r.json()["message"]
                .as_str()
                .unwrap()
                .contains("X-Queue-Timeout")
        );
    }
    assert_eq!(t.sim.calls(), ok);
    assert_eq!(
        t.metric("score_proxy_validation_rejections_total{reason=\"queue_timeout_header\"}")
            .await,
        11.0
    );
    // A longer one than the proxy's own queue timeout is accepted and changes nothing.
    let r = t
        .spawn_lookup_with(&cpf(101), "000", &[("x-queue-timeout", "3600")])
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    t.assert_no_violations();
}

#[tokio::test]
async fn a_slow_upstream_does_not_lower_throughput() {
    // Each call takes 500 ms; starts still come every 140 ms.
    let t = spawn(Setup::default().sim(|s| s.latency = Duration::from_millis(500))).await;
    let lookups: Vec<_> = (0..6).map(|i| t.spawn_lookup(&cpf(i), "000")).collect();
    for lookup in lookups {
        assert_eq!(lookup.await.unwrap().status, 200);
    }
    let stats = t.assert_no_violations();
    let first = stats.arrivals[0].at;
    let last = stats.arrivals[5].at;
    // Serial calls would need at least 5 × 500 ms between the first and the last start.
    assert!(
        last - first < Duration::from_millis(2500),
        "calls overlapped: {:?}",
        last - first
    );
}

#[tokio::test]
async fn one_clients_burst_does_not_starve_another_clients_lookup() {
    let t = spawn(
        Setup::default()
            .arg("--upstream-max-in-flight", 1)
            .arg("--upstream-timeout", "1s"),
    )
    .await;
    let hung = stall(&t).await;
    let burst: Vec<_> = (0..10).map(|i| t.spawn_lookup(&cpf(i), "bulk")).collect();
    t.queue_depth_reaches(10).await;
    let single = t.spawn_lookup(&cpf(100), "single");
    t.queue_depth_reaches(11).await;
    assert_eq!(hung.await.unwrap().status, 504);
    assert_eq!(single.await.unwrap().status, 200);
    for b in burst {
        assert_eq!(b.await.unwrap().status, 200);
    }
    let stats = t.assert_no_violations();
    let order: Vec<_> = stats
        .arrivals
        .iter()
        .map(|a| a.client_id.as_str())
        .collect();
    let single_at = order.iter().position(|c| *c == "single").unwrap();
    assert_eq!(
        single_at, 2,
        "right after the burst's first lookup: {order:?}"
    );
}

#[tokio::test]
async fn graceful_shutdown_answers_every_queued_lookup() {
    // Ten lookups at 140 ms each take longer than the 500 ms grace: some finish, the rest
    // get 503, none is dropped, and the server exits cleanly.
    let mut t = spawn(Setup::default().arg("--shutdown-grace", "500ms")).await;
    let lookups: Vec<_> = (0..10).map(|i| t.spawn_lookup(&cpf(i), "000")).collect();
    t.sim.wait_for_calls(1).await;
    let server = t.begin_shutdown();
    let mut codes = Vec::new();
    for lookup in lookups {
        let r = lookup.await.unwrap();
        if r.status == 503 {
            assert_eq!(r.json()["error"], "shutting_down");
            assert!(r.retry_after().is_some());
        }
        codes.push(r.status);
    }
    server.await.unwrap().unwrap();
    assert!(codes.iter().all(|c| *c == 200 || *c == 503), "{codes:?}");
    assert!(codes.contains(&200) && codes.contains(&503), "{codes:?}");
    assert_eq!(
        t.sim.calls() as usize,
        codes.iter().filter(|c| **c == 200).count()
    );
    t.assert_no_violations();
}

#[tokio::test]
async fn status_and_legacy_metrics_json_keep_the_originals_fields() {
    let t = spawn(Setup::default()).await;
    assert_eq!(t.lookup(&cpf(1), "000").await.status, 200);
    for path in ["/status", "/metrics"] {
        let r = t.get(path).await;
        assert_eq!(r.status, 200, "{path}");
        let body = r.json();
        for field in ["queue_size", "cache_size", "processing", "system_status"] {
            assert!(body.get(field).is_some(), "{path} lacks {field}: {body}");
        }
        assert_eq!(body["cache_size"], 1);
        assert_eq!(body["system_status"], "healthy");
    }
    let prom = t
        .client
        .get(t.url("/metrics"))
        .header("accept", "text/plain;version=0.0.4;q=0.5,*/*;q=0.1")
        .send()
        .await
        .unwrap();
    assert!(
        prom.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain")
    );
    let text = prom.text().await.unwrap();
    assert_eq!(
        common::metric_value(&text, "score_proxy_cache_entries"),
        1.0
    );
    let ready = t.get("/ready").await;
    assert_eq!(ready.status, 200);
}

#[tokio::test]
async fn unknown_paths_and_methods_get_json_errors() {
    let t = spawn(Setup::default()).await;
    let r = t.get("/nope").await;
    assert_eq!(r.status, 404);
    assert_eq!(r.json()["error"], "not_found");
    let r = t
        .client
        .post(t.url("/proxy/score?cpf=89336333089&client_id=000"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 405);
    assert_eq!(t.sim.calls(), 0);
}

#[tokio::test]
async fn every_response_carries_a_trace_id_and_continues_the_callers() {
    let t = spawn(Setup::default()).await;
    let r = t.get("/health").await;
    let id = r.header("x-trace-id").expect("x-trace-id");
    assert_eq!(id.len(), 32);
    let caller = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let r = t
        .client
        .get(t.url(&format!("/proxy/score?cpf={}&client_id=000", cpf(1))))
        .header("traceparent", caller)
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.headers()["x-trace-id"],
        "4bf92f3577b34da6a3ce929d0e0e4736"
    );
    // The upstream call carries the same trace onwards.
    let sent = t.sim.stats().arrivals[0].traceparent.clone().unwrap();
    assert!(
        sent.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"),
        "{sent}"
    );
}
