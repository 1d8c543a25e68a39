//! The fault suite: a misbehaving upstream, hostile or broken clients, and overload. Each
//! case asserts the status code, the time to answer, that the upstream saw no violation,
//! that the counters moved, and that the proxy is still up afterwards.
//!
//! The long-running parts (the 10-minute soak) are `scripts/soak.sh`; ten thousand
//! connections are in `tests/cli.rs`, against the binary, where there are enough file
//! descriptors for both ends.

mod common;

use std::time::{Duration, Instant};

use common::{Setup, TestApp, cpf, spawn};
use score_sim::{Fault, RetryAfterMode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The proxy still answers, and the upstream saw nothing it should not have.
async fn still_up(t: &TestApp) {
    let health = tokio::time::timeout(Duration::from_secs(5), t.get("/health"))
        .await
        .expect("health answers");
    assert_eq!(health.status, 200);
}

/// Sends raw bytes on a new connection and returns everything the proxy sent back before
/// closing (or what it sent within `limit`).
async fn raw(t: &TestApp, request: &[u8], limit: Duration) -> String {
    let mut stream = TcpStream::connect(t.addr).await.unwrap();
    stream.write_all(request).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(limit, stream.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test]
async fn a_slow_upstream_within_the_timeout_is_waited_for() {
    let t = spawn(
        Setup::default()
            .arg("--upstream-timeout", "2s")
            .sim(|s| s.latency = Duration::from_millis(700)),
    )
    .await;
    let started = Instant::now();
    let r = t.lookup(&cpf(1), "000").await;
    assert_eq!(r.status, 200);
    assert!(started.elapsed() >= Duration::from_millis(700));
    assert!(started.elapsed() < Duration::from_secs(2));
    t.sim.set_latency(Duration::from_secs(3));
    let started = Instant::now();
    let r = t.lookup(&cpf(2), "000").await;
    assert_eq!(r.status, 504);
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(
        t.metric("score_proxy_upstream_calls_total{class=\"none\",outcome=\"timeout\"}")
            .await,
        1.0
    );
    t.assert_no_violations();
    still_up(&t).await;
}

#[tokio::test]
async fn a_429_storm_never_sends_into_a_known_penalty() {
    for mode in [
        RetryAfterMode::None,
        RetryAfterMode::Seconds,
        RetryAfterMode::HttpDate,
    ] {
        // The simulator's rule (300 ms) is stricter than our pace (140 ms): every other
        // call is penalised, by design of the test, not of the proxy.
        let t = spawn(Setup::default().arg("--upstream-penalty", "1s").sim(|s| {
            s.min_interval = Duration::from_millis(300);
            s.penalty = Duration::from_millis(500);
            s.retry_after = mode;
        }))
        .await;
        let lookups: Vec<_> = (0..6).map(|i| t.spawn_lookup(&cpf(i), "000")).collect();
        for lookup in lookups {
            let r = lookup.await.unwrap();
            assert_eq!(r.status, 200, "{mode:?}: {}", r.body);
        }
        let stats = t.sim.stats();
        assert!(stats.violations >= 1, "{mode:?}: the storm happened");
        // After every 429, nothing arrives until the penalty it announced is over.
        for pair in stats.arrivals.windows(2) {
            if pair[0].status == 429 {
                assert!(
                    pair[1].at >= pair[0].at + Duration::from_millis(500),
                    "{mode:?}: an arrival {:?} after a 429, inside its penalty",
                    pair[1].at - pair[0].at
                );
            }
        }
        let penalties = t.metric("score_proxy_pacing_penalties_total").await;
        assert_eq!(penalties, stats.violations as f64, "{mode:?}");
        assert_eq!(
            t.metric("score_proxy_upstream_retries_total").await,
            penalties
        );
        still_up(&t).await;
    }
}

#[tokio::test]
async fn the_circuit_breaker_opens_fails_fast_and_recovers_through_a_probe() {
    let t = spawn(
        Setup::default()
            .arg("--breaker-failures", 3)
            .arg("--breaker-cooldown", "1s")
            .sim(|s| s.fault = Fault::Error),
    )
    .await;
    for i in 0..3 {
        assert_eq!(t.lookup(&cpf(i), "000").await.status, 502);
    }
    // Open: refused at once, with the cool-down as Retry-After, and no upstream call.
    let started = Instant::now();
    let r = t.lookup(&cpf(3), "000").await;
    assert_eq!(r.status, 503, "{}", r.body);
    assert_eq!(r.json()["error"], "circuit_open");
    assert_eq!(r.retry_after(), Some(1));
    assert!(started.elapsed() < Duration::from_millis(500));
    assert_eq!(t.sim.calls(), 3);
    let ready = t.get("/ready").await;
    assert_eq!(ready.status, 200, "cached answers are still served");
    assert_eq!(ready.json()["breaker"], "open");
    assert_eq!(
        t.metric("score_proxy_breaker_state{state=\"open\"}").await,
        1.0
    );
    assert_eq!(
        t.metric("score_proxy_queue_refusals_total{reason=\"circuit_open\"}")
            .await,
        1.0
    );

    // The upstream recovers; after the cool-down one probe goes through and closes it.
    t.sim.set_fault(Fault::None);
    let reopen = t.app.breaker.open_until().expect("open");
    tokio::time::sleep_until(reopen).await;
    let r = t.lookup(&cpf(4), "000").await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(t.get("/ready").await.json()["breaker"], "closed");
    assert_eq!(
        t.metric("score_proxy_breaker_state{state=\"closed\"}")
            .await,
        1.0
    );
    for to in ["open", "half_open", "closed"] {
        let series = format!("score_proxy_breaker_transitions_total{{to=\"{to}\"}}");
        assert_eq!(t.metric(&series).await, 1.0, "{to}");
    }
    t.assert_no_violations();
}

#[tokio::test]
async fn an_opening_breaker_answers_what_is_queued_at_once() {
    let t = spawn(
        Setup::default()
            .arg("--breaker-failures", 1)
            .arg("--breaker-cooldown", "30s")
            .arg("--upstream-max-in-flight", 1)
            .arg("--upstream-timeout", "500ms")
            .sim(|s| s.fault = Fault::Hang),
    )
    .await;
    let first = t.spawn_lookup(&cpf(1), "000");
    t.sim.wait_for_calls(1).await;
    let queued: Vec<_> = (2..6).map(|i| t.spawn_lookup(&cpf(i), "000")).collect();
    t.queue_depth_reaches(4).await;
    assert_eq!(first.await.unwrap().status, 504);
    for q in queued {
        let r = q.await.unwrap();
        assert_eq!(r.status, 503);
        assert_eq!(r.json()["error"], "circuit_open");
        assert!(r.retry_after().unwrap() >= 29);
    }
    assert_eq!(
        t.sim.calls(),
        1,
        "nothing queued reached the failing upstream"
    );
    still_up(&t).await;
}

#[tokio::test]
async fn stale_if_error_serves_an_expired_answer_when_the_upstream_fails() {
    let t = spawn(
        Setup::default()
            .arg("--cache-ttl", "100ms")
            .arg("--stale-if-error", "10m"),
    )
    .await;
    let fresh = t.lookup(&cpf(1), "000").await;
    assert_eq!(fresh.status, 200);
    // Let the answer expire (the TTL is the event here: time has to pass).
    tokio::time::sleep(Duration::from_millis(150)).await;
    t.sim.set_fault(Fault::Error);
    let stale = t.lookup(&cpf(1), "000").await;
    assert_eq!(stale.status, 200, "{}", stale.body);
    assert_eq!(stale.x_cache(), "STALE");
    assert_eq!(stale.body, fresh.body);
    assert!(stale.header("warning").unwrap().starts_with("110"));
    assert!(stale.header("age").is_some());
    assert_eq!(t.metric("score_proxy_cache_stale_answers_total").await, 1.0);
    // No stale answer for a key never fetched, and none for a client the upstream refuses.
    assert_eq!(t.lookup(&cpf(2), "000").await.status, 502);
    t.sim.set_fault(Fault::None);
    assert_eq!(t.sim.calls(), 3);
    t.assert_no_violations();
}

#[tokio::test]
async fn without_stale_if_error_an_expired_answer_is_not_served() {
    let t = spawn(Setup::default().arg("--cache-ttl", "100ms")).await;
    assert_eq!(t.lookup(&cpf(1), "000").await.status, 200);
    tokio::time::sleep(Duration::from_millis(150)).await;
    t.sim.set_fault(Fault::Error);
    assert_eq!(t.lookup(&cpf(1), "000").await.status, 502);
}

#[tokio::test]
async fn a_client_that_hangs_up_during_the_call_still_fills_the_cache() {
    let t = spawn(Setup::default().sim(|s| s.latency = Duration::from_millis(400))).await;
    let quitter = t.spawn_lookup(&cpf(1), "000");
    t.sim.wait_for_calls(1).await;
    quitter.abort();
    // The call already spent its budget: its answer is kept for the next client.
    t.metric_reaches(
        "score_proxy_upstream_calls_total{class=\"2xx\",outcome=\"ok\"}",
        1.0,
    )
    .await;
    let r = t.lookup(&cpf(1), "000").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.x_cache(), "HIT");
    assert_eq!(t.sim.calls(), 1);
    assert_eq!(
        t.metric("score_proxy_http_requests_total{code=\"499\",route=\"/proxy/score\"}")
            .await,
        1.0
    );
    still_up(&t).await;
}

#[tokio::test]
async fn a_client_that_hangs_up_while_reading_the_answer_harms_nothing() {
    let t = spawn(Setup::default()).await;
    assert_eq!(t.lookup(&cpf(1), "000").await.status, 200);
    for _ in 0..20 {
        let mut stream = TcpStream::connect(t.addr).await.unwrap();
        let request = format!(
            "GET /proxy/score?cpf={}&client_id=000 HTTP/1.1\r\nhost: x\r\n\r\n",
            cpf(1)
        );
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut first = [0u8; 12];
        stream.read_exact(&mut first).await.unwrap();
        assert_eq!(&first, b"HTTP/1.1 200");
        drop(stream);
    }
    still_up(&t).await;
    assert_eq!(t.sim.calls(), 1);
}

#[tokio::test]
async fn a_slowloris_client_is_cut_off_and_others_are_served() {
    let t = spawn(Setup::default().arg("--header-read-timeout", "300ms")).await;
    let started = Instant::now();
    let mut slow = TcpStream::connect(t.addr).await.unwrap();
    slow.write_all(b"GET /health HTTP/1.1\r\nhost: x\r\n")
        .await
        .unwrap();
    // Meanwhile the proxy serves everyone else.
    assert_eq!(t.lookup(&cpf(1), "000").await.status, 200);
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(5), slow.read_to_end(&mut rest)).await;
    assert!(closed.is_ok(), "the connection is closed by the proxy");
    assert!(started.elapsed() >= Duration::from_millis(300));
    t.metric_reaches(
        "score_proxy_http_connection_errors_total{kind=\"header_timeout\",listener=\"public\"}",
        1.0,
    )
    .await;
    still_up(&t).await;
}

#[tokio::test]
async fn oversized_and_malformed_requests_get_clear_errors_and_no_upstream_call() {
    let t = spawn(Setup::default()).await;
    let long_query = format!("/proxy/score?cpf={}&client_id={}", cpf(1), "x".repeat(9000));
    let r = t.get(&long_query).await;
    assert_eq!(r.status, 414);
    assert_eq!(r.json()["error"], "uri_too_long");

    let r = t
        .client
        .get(t.url("/health"))
        .header("x-filler", "y".repeat(20_000))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 431);

    // Beyond what the HTTP parser reads at all: still a 431, from hyper.
    let huge = format!(
        "GET /health HTTP/1.1\r\nhost: x\r\nx-filler: {}\r\n\r\n",
        "z".repeat(70_000)
    );
    let answer = raw(&t, huge.as_bytes(), Duration::from_secs(5)).await;
    assert!(answer.starts_with("HTTP/1.1 431"), "{answer}");

    // Raw non-UTF-8 bytes in the request target: a 400 from the parser.
    let mut bad =
        b"GET /proxy/score?cpf=\xff\xfe&client_id=000 HTTP/1.1\r\nhost: x\r\n\r\n".to_vec();
    let answer = raw(&t, &bad, Duration::from_secs(5)).await;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    // Not HTTP at all.
    bad = b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03 hello\r\n\r\n".to_vec();
    let answer = raw(&t, &bad, Duration::from_secs(5)).await;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");

    // Path tricks do not reach the lookup, nor anything else (sent raw: an HTTP client
    // library would normalise them away).
    for path in [
        "/proxy/score/../health",
        "/health/../proxy/score?cpf=89336333089&client_id=000",
        "//proxy/score?cpf=89336333089&client_id=000",
        "/proxy/score%2F?cpf=89336333089&client_id=000",
        "/PROXY/SCORE?cpf=89336333089&client_id=000",
        "/proxy/score/?cpf=89336333089&client_id=000",
        "/proxy/./score?cpf=89336333089&client_id=000",
        "/proxy%2Fscore?cpf=89336333089&client_id=000",
    ] {
        let request = format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n");
        let answer = raw(&t, request.as_bytes(), Duration::from_secs(5)).await;
        assert!(answer.starts_with("HTTP/1.1 404"), "{path}: {answer}");
    }
    // Query tricks.
    for query in [
        "cpf=89336333089&client_id=000&cpf=01658739060",
        "cpf=89336333089%00&client_id=000",
        "cpf[]=89336333089&client_id=000",
        "cpf=89336333089&client_id=%E2%80%AE",
        "cpf=%2e%2e%2f%2e%2e%2fetc%2fpasswd&client_id=000",
        "cpf=89336333089;client_id=000",
    ] {
        let r = t.get(&format!("/proxy/score?{query}")).await;
        assert_eq!(r.status, 400, "{query}: {}", r.body);
    }
    // A body on a GET is ignored.
    let r = t
        .client
        .get(t.url(&format!("/proxy/score?cpf={}&client_id=000", cpf(2))))
        .body("x".repeat(100_000))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        t.sim.calls(),
        1,
        "only the one valid lookup reached the upstream"
    );
    still_up(&t).await;
}

#[tokio::test]
async fn shutdown_under_load_resets_nothing_and_answers_everyone() {
    let mut t = spawn(
        Setup::default()
            .arg("--shutdown-grace", "1s")
            .sim(|s| s.latency = Duration::from_millis(300)),
    )
    .await;
    let lookups: Vec<_> = (0..15).map(|i| t.spawn_lookup(&cpf(i), "000")).collect();
    t.sim.wait_for_calls(2).await;
    // An idle keep-alive connection, opened before the shutdown.
    let mut idle = TcpStream::connect(t.addr).await.unwrap();
    let server = t.begin_shutdown();
    // A connection that arrives during the drain is told why, not reset.
    let newcomer = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            let mut s = TcpStream::connect(t.addr).await.unwrap();
            s.write_all(b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n")
                .await
                .unwrap();
            let mut out = Vec::new();
            s.read_to_end(&mut out).await.unwrap();
            let text = String::from_utf8_lossy(&out).into_owned();
            // Until the accept loop has seen the signal, a /health may still be served.
            if text.starts_with("HTTP/1.1 503") {
                return text;
            }
        }
    })
    .await
    .expect("newcomers get a 503 during the drain");
    assert!(newcomer.contains("shutting_down"), "{newcomer}");

    let mut codes = Vec::new();
    for lookup in lookups {
        let r = lookup
            .await
            .expect("every lookup gets an HTTP answer, never a reset");
        codes.push(r.status);
    }
    assert!(codes.iter().all(|c| *c == 200 || *c == 503), "{codes:?}");
    assert!(codes.contains(&200), "{codes:?}");
    // The idle connection was closed cleanly (EOF, not a reset).
    let mut buf = Vec::new();
    let read = idle.read_to_end(&mut buf).await;
    assert!(read.is_ok(), "{read:?}");
    server.await.unwrap().unwrap();
    t.assert_no_violations();
}
