//! The upstream simulator on its own, spoken to over HTTP as the proxy will speak to it.
//!
//! Every other test of the project trusts the simulator to be exactly as strict as the
//! real API, so these tests pin its behaviour down. The rate rule runs on the simulator's
//! real clock, so tests of it use real time: calls meant to be "too soon" are sent back to
//! back against an interval of hundreds of milliseconds, and calls meant to be "not too
//! soon" wait twice the interval or more, so that a loaded machine only ever widens the
//! margins. Tests of everything else switch the rate rule off (`min_interval: 0`) and need
//! no waiting at all.
//!
//! Size: one file for the whole contract (rate rule, penalty, faults, control endpoints,
//! arguments), read top to bottom as the simulator's specification; each test is short.

use std::collections::{BTreeMap, HashSet};
use std::sync::Once;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use clap::Parser;
use reqwest::StatusCode;
use reqwest::header::{CONTENT_TYPE, HeaderMap, RETRY_AFTER};
use score_sim::{
    ArrivalDelay, ConfigView, Fault, RetryAfterMode, SimStats, SimulateArgs, Simulator,
    SimulatorConfig, SimulatorHandle, cpf, serve,
};
use serde_json::{Value, json};

const VALID: &str = "01658739060";
const OTHER_VALID: &str = "89336333089";
/// Long enough for anything that is meant to happen promptly, even on a loaded machine.
const PATIENCE: Duration = Duration::from_secs(10);

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// Logs only when asked for, so that a passing run is quiet.
fn init_logs() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        if std::env::var_os("TEST_LOG").is_some() {
            let _ = tracing_subscriber::fmt()
                .with_env_filter(
                    tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
                        tracing_subscriber::EnvFilter::new("score_proxy=debug")
                    }),
                )
                .with_test_writer()
                .try_init();
        }
    });
}

/// No rate rule: for tests of validation, faults and control, which then need no waits.
fn unlimited() -> SimulatorConfig {
    SimulatorConfig {
        min_interval: Duration::ZERO,
        ..Default::default()
    }
}

/// A fast but real rate rule.
fn paced(min_interval: Duration, penalty: Duration) -> SimulatorConfig {
    SimulatorConfig {
        min_interval,
        penalty,
        ..Default::default()
    }
}

async fn start(config: SimulatorConfig) -> SimulatorHandle {
    init_logs();
    Simulator::spawn(config).await.expect("simulator starts")
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(PATIENCE)
        .build()
        .expect("client builds")
}

struct Reply {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|err| {
            panic!(
                "body is not JSON ({err}): {}",
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    fn error(&self) -> String {
        self.json()["error"]
            .as_str()
            .expect("error is a string")
            .to_owned()
    }
}

async fn reply(request: reqwest::RequestBuilder) -> Reply {
    let response = request.send().await.expect("request is answered");
    let status = response.status();
    let headers = response.headers().clone();
    let body = response.bytes().await.expect("body is read");
    Reply {
        status,
        headers,
        body,
    }
}

/// A score request as the proxy sends it; `None` leaves the parameter or header out.
fn score_request(
    http: &reqwest::Client,
    sim: &SimulatorHandle,
    cpf: Option<&str>,
    client_id: Option<&str>,
) -> reqwest::RequestBuilder {
    let url = match cpf {
        Some(cpf) => format!("{}?cpf={cpf}", sim.url()),
        None => sim.url(),
    };
    let request = http.get(url).header("accept", "application/json");
    match client_id {
        Some(id) => request.header("client-id", id),
        None => request,
    }
}

async fn score(http: &reqwest::Client, sim: &SimulatorHandle, cpf: &str) -> Reply {
    reply(score_request(http, sim, Some(cpf), Some("client-a"))).await
}

#[tokio::test]
async fn a_valid_call_gets_a_score() {
    let sim = start(unlimited()).await;
    let http = client();

    let first = score(&http, &sim, VALID).await;
    assert_eq!(first.status, StatusCode::OK);
    assert_eq!(first.headers[CONTENT_TYPE], "application/json");
    let body = first.json();
    assert_eq!(body["cpf"], VALID);
    let value = body["score"].as_u64().expect("score is an integer");
    assert!((300..=900).contains(&value), "score {value} out of range");
    assert_eq!(body["request_id"], 1);

    // The score depends on the CPF alone; the request id counts arrivals.
    let again = score(&http, &sim, VALID).await.json();
    assert_eq!(again["score"], body["score"]);
    assert_eq!(again["request_id"], 2);
    let other = score(&http, &sim, OTHER_VALID).await.json();
    assert_eq!(other["cpf"], OTHER_VALID);
    assert_eq!(other["request_id"], 3);

    let stats = sim.stats();
    assert_eq!(stats.calls, 3);
    assert_eq!(stats.violations, 0);
    assert_eq!(stats.by_status, BTreeMap::from([(200, 3)]));
    assert!(!stats.penalty_active);
}

#[tokio::test]
async fn a_call_too_soon_gets_429_and_counts_as_a_violation() {
    let sim = start(paced(ms(300), ms(400))).await;
    let http = client();

    assert_eq!(score(&http, &sim, VALID).await.status, StatusCode::OK);
    let too_soon = score(&http, &sim, VALID).await;
    assert_eq!(too_soon.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(
        too_soon.error(),
        "Too many requests. Penalty of 0.4 seconds applied."
    );
    assert!(
        too_soon.headers.get(RETRY_AFTER).is_none(),
        "no Retry-After by default"
    );

    let stats = sim.stats();
    assert_eq!(stats.calls, 2);
    assert_eq!(stats.violations, 1);
    assert_eq!(stats.by_status, BTreeMap::from([(200, 1), (429, 1)]));
    assert_eq!(
        stats
            .arrivals
            .iter()
            .map(|a| (a.status, a.violation))
            .collect::<Vec<_>>(),
        vec![(200, false), (429, true)]
    );
    let gap = stats.min_gap_seconds.expect("two arrivals have a gap");
    assert!(gap < 0.3, "back-to-back gap was {gap}s");
    assert!(stats.penalty_active);
    let end = sim.penalty_ends_at().expect("a penalty was applied");
    assert_eq!(end, stats.arrivals[1].at + ms(400));
}

#[tokio::test]
async fn the_default_rule_is_one_call_a_second_with_a_two_second_penalty() {
    let sim = start(SimulatorConfig::default()).await;
    let http = client();
    assert_eq!(score(&http, &sim, VALID).await.status, StatusCode::OK);
    let too_soon = score(&http, &sim, VALID).await;
    assert_eq!(too_soon.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(
        too_soon.error(),
        "Too many requests. Penalty of 2 seconds applied."
    );
    let stats = sim.stats();
    assert_eq!(
        sim.penalty_ends_at(),
        Some(stats.arrivals[1].at + Duration::from_secs(2))
    );
}

#[tokio::test]
async fn a_call_during_the_penalty_extends_it_and_waiting_it_out_works() {
    let interval = ms(200);
    let penalty = ms(2000);
    let sim = start(paced(interval, penalty)).await;
    let http = client();

    assert_eq!(score(&http, &sim, VALID).await.status, StatusCode::OK);
    assert_eq!(
        score(&http, &sim, VALID).await.status,
        StatusCode::TOO_MANY_REQUESTS
    );
    // Well past the interval, still well inside the penalty.
    tokio::time::sleep(2 * interval).await;
    let during = score(&http, &sim, VALID).await;
    assert_eq!(during.status, StatusCode::TOO_MANY_REQUESTS);

    let arrivals = sim.stats().arrivals;
    let (second, third) = (&arrivals[1], &arrivals[2]);
    assert!(
        third.at - second.at >= interval,
        "the third call must not be too soon by itself"
    );
    assert!(third.violation);
    // The penalty now ends one penalty after the third call, not the second.
    assert_eq!(sim.penalty_ends_at(), Some(third.at + penalty));

    // Wait it out (plus margin), and the upstream answers again.
    let left = sim.penalty_remaining().unwrap_or_default();
    tokio::time::sleep(left + 2 * interval).await;
    assert!(!sim.stats_summary().penalty_active);
    assert_eq!(score(&http, &sim, VALID).await.status, StatusCode::OK);
    // And a call spaced by more than the interval keeps succeeding.
    tokio::time::sleep(2 * interval).await;
    assert_eq!(score(&http, &sim, OTHER_VALID).await.status, StatusCode::OK);

    let stats = sim.stats();
    assert_eq!((stats.calls, stats.violations), (5, 2));
}

#[tokio::test]
async fn well_spaced_calls_never_violate_and_the_minimum_gap_is_measured() {
    let sim = start(paced(ms(100), ms(200))).await;
    let http = client();
    for _ in 0..3 {
        assert_eq!(score(&http, &sim, VALID).await.status, StatusCode::OK);
        tokio::time::sleep(ms(250)).await;
    }
    let stats = sim.stats();
    assert_eq!(stats.violations, 0);
    let gap = stats.min_gap_seconds.expect("three arrivals have gaps");
    assert!(gap >= 0.25, "gap {gap}s is shorter than the sleep");
}

#[tokio::test]
async fn retry_after_in_seconds_rounds_up() {
    let sim = start(SimulatorConfig {
        retry_after: RetryAfterMode::Seconds,
        ..paced(ms(300), ms(1500))
    })
    .await;
    let http = client();
    score(&http, &sim, VALID).await;
    let limited = score(&http, &sim, VALID).await;
    assert_eq!(limited.status, StatusCode::TOO_MANY_REQUESTS);
    let seconds: u64 = limited.headers[RETRY_AFTER]
        .to_str()
        .expect("ASCII")
        .parse()
        .expect("Retry-After is an integer");
    assert!(
        (1..=2).contains(&seconds),
        "Retry-After {seconds} for a 1.5 s penalty"
    );
}

#[tokio::test]
async fn retry_after_as_an_http_date_is_not_early() {
    let sim = start(SimulatorConfig {
        retry_after: RetryAfterMode::HttpDate,
        ..paced(ms(300), ms(1500))
    })
    .await;
    let http = client();
    score(&http, &sim, VALID).await;
    let before = SystemTime::now();
    let limited = score(&http, &sim, VALID).await;
    assert_eq!(limited.status, StatusCode::TOO_MANY_REQUESTS);
    let header = limited.headers[RETRY_AFTER].to_str().expect("ASCII");
    let date = httpdate::parse_http_date(header).expect("Retry-After is an HTTP date");
    // The penalty ends at least 1.5 s after `before` and the date is rounded up, so only
    // a tiny skew between the wall clock and the monotonic one is allowed for.
    assert!(date >= before + ms(1400), "{header} is early");
    assert!(date <= SystemTime::now() + ms(1500) + Duration::from_secs(1));
}

#[tokio::test]
async fn retry_after_mode_can_change_at_run_time() {
    let sim = start(paced(ms(300), ms(600))).await;
    let http = client();
    score(&http, &sim, VALID).await;
    sim.set_retry_after(RetryAfterMode::Seconds);
    let limited = score(&http, &sim, VALID).await;
    assert_eq!(limited.headers[RETRY_AFTER], "1");
}

#[tokio::test]
async fn client_ids_outside_the_allow_list_or_missing_get_401() {
    let sim = start(SimulatorConfig {
        client_ids: Some(HashSet::from(["alpha".to_owned()])),
        ..unlimited()
    })
    .await;
    let http = client();

    for client_id in [Some("beta"), None, Some(""), Some("ALPHA")] {
        let denied = reply(score_request(&http, &sim, Some(VALID), client_id)).await;
        assert_eq!(denied.status, StatusCode::UNAUTHORIZED, "{client_id:?}");
        assert_eq!(denied.headers[CONTENT_TYPE], "application/json");
        assert_eq!(denied.error(), "invalid client id");
    }
    let allowed = reply(score_request(&http, &sim, Some(VALID), Some("alpha"))).await;
    assert_eq!(allowed.status, StatusCode::OK);

    // Without an allow-list any id goes, but not an empty or missing one.
    sim.set_client_ids(None);
    let any = reply(score_request(&http, &sim, Some(VALID), Some("whoever"))).await;
    assert_eq!(any.status, StatusCode::OK);
    let missing = reply(score_request(&http, &sim, Some(VALID), None)).await;
    assert_eq!(missing.status, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn bad_cpfs_get_400_after_the_client_check() {
    let sim = start(unlimited()).await;
    let http = client();

    for bad in [
        "12345678900",
        "11111111111",
        "123",
        "",
        "016.587.390-60",
        "0165873906a",
        "016587390600",
        "01658739060&cpf=89336333089",
        "01658739060%26client_id%3Dx",
    ] {
        let refused = score(&http, &sim, bad).await;
        assert_eq!(refused.status, StatusCode::BAD_REQUEST, "cpf {bad:?}");
        assert_eq!(refused.error(), "invalid cpf");
    }
    let missing = reply(score_request(&http, &sim, None, Some("client-a"))).await;
    assert_eq!(missing.status, StatusCode::BAD_REQUEST);

    // The client id is checked first.
    let both_bad = reply(score_request(&http, &sim, Some("123"), None)).await;
    assert_eq!(both_bad.status, StatusCode::UNAUTHORIZED);

    // What arrived is recorded as decoded, so a test can see how the proxy encoded it.
    let arrivals = sim.stats().arrivals;
    assert_eq!(arrivals[8].cpf, "01658739060&client_id=x");
}

#[tokio::test]
async fn generated_cpfs_are_accepted() {
    let sim = start(unlimited()).await;
    let http = client();
    for cpf in cpf::valid_cpfs().step_by(7919).take(20) {
        let answered = score(&http, &sim, &cpf).await;
        assert_eq!(answered.status, StatusCode::OK, "cpf {cpf}");
        assert_eq!(answered.json()["cpf"], cpf.as_str());
    }
}

#[tokio::test]
async fn a_hung_call_never_answers_and_is_dropped_when_the_client_leaves() {
    let sim = start(SimulatorConfig {
        fault: Fault::Hang,
        ..unlimited()
    })
    .await;
    let impatient = reqwest::Client::builder()
        .no_proxy()
        .timeout(ms(300))
        .build()
        .expect("client builds");

    let started = Instant::now();
    let err = score_request(&impatient, &sim, Some(VALID), Some("client-a"))
        .send()
        .await
        .expect_err("a hung call is never answered");
    assert!(err.is_timeout(), "expected the client's timeout, got {err}");
    assert!(started.elapsed() >= ms(300));

    // The client gave up and closed its connection, so the pending answer is gone.
    tokio::time::timeout(PATIENCE, sim.wait_until_idle())
        .await
        .expect("the hung handler is dropped once its client disconnects");
    let stats = sim.stats();
    assert_eq!(stats.calls, 1);
    assert_eq!(stats.by_status, BTreeMap::from([(0, 1)]));
    assert_eq!(stats.in_flight, 0);
}

#[tokio::test]
async fn error_and_unavailable_faults_are_json_5xx() {
    let sim = start(SimulatorConfig {
        fault: Fault::Error,
        ..unlimited()
    })
    .await;
    let http = client();

    let error = score(&http, &sim, VALID).await;
    assert_eq!(error.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(error.json(), json!({"error": "internal error"}));

    sim.set_fault(Fault::Unavailable);
    let unavailable = score(&http, &sim, VALID).await;
    assert_eq!(unavailable.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(unavailable.headers[CONTENT_TYPE], "application/json");
    assert!(!unavailable.error().is_empty());

    // A broken upstream does not look at the request: faults come before validation.
    let bad_request = reply(score_request(&http, &sim, Some("123"), None)).await;
    assert_eq!(bad_request.status, StatusCode::SERVICE_UNAVAILABLE);

    sim.set_fault(Fault::None);
    assert_eq!(score(&http, &sim, VALID).await.status, StatusCode::OK);
    assert_eq!(
        sim.stats().by_status,
        BTreeMap::from([(200, 1), (500, 1), (503, 2)])
    );
}

#[tokio::test]
async fn the_garbage_fault_answers_200_with_a_body_that_is_not_json() {
    let sim = start(SimulatorConfig {
        fault: Fault::Garbage,
        ..unlimited()
    })
    .await;
    let garbage = score(&client(), &sim, VALID).await;
    assert_eq!(garbage.status, StatusCode::OK);
    assert!(
        garbage.headers[CONTENT_TYPE]
            .to_str()
            .expect("ASCII")
            .starts_with("text/html")
    );
    assert!(serde_json::from_slice::<Value>(&garbage.body).is_err());
    assert!(!garbage.body.is_empty());
}

#[tokio::test]
async fn the_reset_fault_breaks_the_body_midway() {
    let sim = start(SimulatorConfig {
        fault: Fault::Reset,
        ..unlimited()
    })
    .await;
    let response = score_request(&client(), &sim, Some(VALID), Some("client-a"))
        .send()
        .await
        .expect("the head arrives");
    assert_eq!(response.status(), StatusCode::OK);
    let err = response
        .bytes()
        .await
        .expect_err("the body must not complete");
    assert!(
        err.is_body() || err.is_decode(),
        "unexpected error kind: {err}"
    );

    // The connection is gone, but the simulator still serves new ones.
    sim.set_fault(Fault::None);
    assert_eq!(score(&client(), &sim, VALID).await.status, StatusCode::OK);
}

#[tokio::test]
async fn faults_never_replace_a_429() {
    let sim = start(SimulatorConfig {
        fault: Fault::Error,
        ..paced(ms(300), ms(400))
    })
    .await;
    let http = client();
    assert_eq!(
        score(&http, &sim, VALID).await.status,
        StatusCode::INTERNAL_SERVER_ERROR
    );
    assert_eq!(
        score(&http, &sim, VALID).await.status,
        StatusCode::TOO_MANY_REQUESTS
    );
}

#[tokio::test]
async fn latency_delays_every_answer() {
    let sim = start(SimulatorConfig {
        latency: ms(300),
        ..unlimited()
    })
    .await;
    let http = client();
    let started = Instant::now();
    assert_eq!(score(&http, &sim, VALID).await.status, StatusCode::OK);
    assert!(started.elapsed() >= ms(300));

    sim.set_latency(Duration::ZERO);
    assert_eq!(sim.config().latency, Duration::ZERO);
    assert_eq!(score(&http, &sim, VALID).await.status, StatusCode::OK);
}

#[tokio::test]
async fn fail_every_applies_the_fault_to_every_nth_call() {
    let sim = start(SimulatorConfig {
        fault: Fault::Error,
        fail_every: Some(3),
        ..unlimited()
    })
    .await;
    let http = client();
    let mut statuses = Vec::new();
    for _ in 0..7 {
        statuses.push(score(&http, &sim, VALID).await.status.as_u16());
    }
    assert_eq!(statuses, vec![200, 200, 500, 200, 200, 500, 200]);

    // Counting restarts with a reset, so soak tests get a predictable pattern.
    sim.reset();
    sim.set_fail_every(Some(2));
    let first = score(&http, &sim, VALID).await.status;
    let second = score(&http, &sim, VALID).await.status;
    assert_eq!(
        (first, second),
        (StatusCode::OK, StatusCode::INTERNAL_SERVER_ERROR)
    );
}

#[tokio::test]
async fn the_control_endpoints_work_over_http() {
    let sim = start(unlimited()).await;
    let http = client();
    let base = sim.base_url();

    let health = reply(http.get(format!("{base}/health"))).await;
    assert_eq!(health.status, StatusCode::OK);
    assert_eq!(health.json(), json!({"status": "ok"}));

    score(&http, &sim, VALID).await;
    let stats = reply(http.get(format!("{base}/__sim/stats"))).await;
    assert_eq!(stats.status, StatusCode::OK);
    let stats: SimStats = serde_json::from_slice(&stats.body).expect("stats parse");
    assert_eq!(stats.calls, 1);
    assert_eq!(stats.arrivals.len(), 1);
    assert_eq!(stats.by_status, BTreeMap::from([(200, 1)]));

    let summary = reply(http.get(format!("{base}/__sim/stats?arrivals=false"))).await;
    assert!(summary.json().get("arrivals").is_none());
    assert_eq!(summary.json()["calls"], 1);
    let summary: SimStats = serde_json::from_slice(&summary.body).expect("stats parse");
    assert_eq!(summary.calls, 1);
    assert!(summary.arrivals.is_empty());
    let bad_flag = reply(http.get(format!("{base}/__sim/stats?arrivals=maybe"))).await;
    assert_eq!(bad_flag.status, StatusCode::BAD_REQUEST);

    // A partial update changes only what it names and answers with the whole config.
    let put = reply(http.put(format!("{base}/__sim/config")).body(
        r#"{"fault": "unavailable", "retry_after": "http-date", "fail_every": 2,
            "min_interval_ms": 150, "penalty_ms": 300, "latency_ms": 5}"#,
    ))
    .await;
    assert_eq!(put.status, StatusCode::OK);
    let view: ConfigView = serde_json::from_slice(&put.body).expect("config parses");
    let expected = ConfigView {
        fault: Fault::Unavailable,
        latency_ms: 5,
        retry_after: RetryAfterMode::HttpDate,
        fail_every: Some(2),
        min_interval_ms: 150,
        penalty_ms: 300,
        client_ids: None,
        arrival_delay: ArrivalDelay::None,
        seed: 0,
    };
    assert_eq!(view, expected);
    let got = reply(http.get(format!("{base}/__sim/config"))).await;
    assert_eq!(
        serde_json::from_slice::<ConfigView>(&got.body).expect("config parses"),
        expected
    );
    assert_eq!(sim.config().min_interval, ms(150));

    let restore = reply(http.put(format!("{base}/__sim/config")).body(
        r#"{"fault": "none", "fail_every": null, "min_interval_ms": 0, "latency_ms": 0,
                      "client_ids": ["alpha", "beta"]}"#,
    ))
    .await;
    assert_eq!(restore.status, StatusCode::OK);
    let config = sim.config();
    assert_eq!(config.fault, Fault::None);
    assert_eq!(config.fail_every, None);
    assert_eq!(
        config.client_ids,
        Some(HashSet::from(["alpha".to_owned(), "beta".to_owned()]))
    );

    // Refused updates change nothing and say why, as JSON.
    for bad in [
        "not json",
        r#"{"fault": "melt"}"#,
        r#"{"faults": "hang"}"#,
        r#"{"fail_every": 0}"#,
        r#"{"latency_ms": -1}"#,
    ] {
        let refused = reply(http.put(format!("{base}/__sim/config")).body(bad)).await;
        assert_eq!(refused.status, StatusCode::BAD_REQUEST, "{bad}");
        assert!(!refused.error().is_empty());
    }
    assert_eq!(sim.config(), config);

    let reset = reply(http.post(format!("{base}/__sim/reset"))).await;
    assert_eq!(reset.status, StatusCode::NO_CONTENT);
    let after = sim.stats();
    assert_eq!((after.calls, after.arrivals.len()), (0, 0));
    assert!(after.by_status.is_empty());

    let unknown = reply(http.get(format!("{base}/nope"))).await;
    assert_eq!(unknown.status, StatusCode::NOT_FOUND);
    assert_eq!(unknown.error(), "not found");
    let wrong_method = reply(http.post(sim.url())).await;
    assert_eq!(wrong_method.status, StatusCode::METHOD_NOT_ALLOWED);
    assert!(!wrong_method.error().is_empty());
    // Neither counts as a call to the score API.
    assert_eq!(sim.calls(), 0);
}

#[tokio::test]
async fn reset_clears_the_penalty_and_keeps_request_ids_unique() {
    let sim = start(paced(ms(300), Duration::from_secs(30))).await;
    let http = client();
    score(&http, &sim, VALID).await;
    score(&http, &sim, VALID).await;
    assert!(sim.stats_summary().penalty_active);

    sim.reset();
    assert!(!sim.stats_summary().penalty_active);
    assert_eq!(sim.penalty_ends_at(), None);
    let fresh = score(&http, &sim, VALID).await;
    assert_eq!(fresh.status, StatusCode::OK);
    assert_eq!(fresh.json()["request_id"], 3);
    assert_eq!(sim.calls(), 1);
}

#[tokio::test]
async fn wait_for_calls_resolves_on_arrival() {
    let sim = start(SimulatorConfig {
        fault: Fault::Hang,
        ..unlimited()
    })
    .await;

    // Nothing has arrived, so this cannot resolve.
    assert!(
        tokio::time::timeout(ms(50), sim.wait_for_calls(1))
            .await
            .is_err()
    );
    assert!(
        tokio::time::timeout(ms(1), sim.wait_for_calls(0))
            .await
            .is_ok()
    );

    let waiter = {
        let sim = sim.sim().clone();
        tokio::spawn(async move { sim.wait_for_calls(3).await })
    };
    // Hung calls count as soon as they arrive, although they are never answered.
    let http = client();
    let mut pending = Vec::new();
    for _ in 0..3 {
        pending.push(tokio::spawn(
            score_request(&http, &sim, Some(VALID), Some("client-a")).send(),
        ));
    }
    tokio::time::timeout(PATIENCE, waiter)
        .await
        .expect("three calls arrive")
        .expect("waiter does not panic");
    assert_eq!(sim.calls(), 3);
    assert_eq!(sim.in_flight(), 3);
    for call in pending {
        call.abort();
    }
}

#[tokio::test]
async fn the_traceparent_and_caller_are_recorded() {
    let sim = start(unlimited()).await;
    let http = client();
    let traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    reply(
        score_request(&http, &sim, Some(VALID), Some("client-a"))
            .header("traceparent", traceparent),
    )
    .await;
    score(&http, &sim, OTHER_VALID).await;

    let arrivals = sim.stats().arrivals;
    assert_eq!(arrivals[0].traceparent.as_deref(), Some(traceparent));
    assert_eq!(arrivals[0].client_id, "client-a");
    assert_eq!(arrivals[0].cpf, VALID);
    assert_eq!(arrivals[0].seq, 1);
    assert_eq!(arrivals[1].traceparent, None);
    assert_eq!(arrivals[1].cpf, OTHER_VALID);
    assert!(arrivals[1].at >= arrivals[0].at);
}

#[tokio::test]
async fn shutdown_cuts_hung_calls_instead_of_waiting_for_them() {
    let sim = start(SimulatorConfig {
        fault: Fault::Hang,
        ..unlimited()
    })
    .await;
    let http = client();
    let hung = tokio::spawn(score_request(&http, &sim, Some(VALID), Some("client-a")).send());
    tokio::time::timeout(PATIENCE, sim.wait_for_calls(1))
        .await
        .expect("the call arrives");

    let url = sim.url();
    let probe = sim.sim().clone();
    tokio::time::timeout(PATIENCE, sim.shutdown())
        .await
        .expect("shutdown does not wait for the hung call")
        .expect("the server stops cleanly");
    let outcome = tokio::time::timeout(PATIENCE, hung)
        .await
        .expect("the hung client is released")
        .expect("client task does not panic");
    assert!(outcome.is_err(), "a cut call gets no answer");
    assert_eq!(probe.in_flight(), 0);
    assert!(
        client().get(url).send().await.is_err(),
        "nothing listens any more"
    );
}

#[tokio::test]
async fn serve_runs_on_a_given_listener_until_told_to_stop() {
    init_logs();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("binds");
    let addr = listener.local_addr().expect("has an address");
    let sim = Simulator::new(unlimited());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(serve(listener, sim.clone(), async move {
        let _ = stopped.await;
    }));

    let health = reply(client().get(format!("http://{addr}/health"))).await;
    assert_eq!(health.status, StatusCode::OK);
    let scored = reply(
        client()
            .get(format!("http://{addr}/api/score?cpf={VALID}"))
            .header("client-id", "x"),
    )
    .await;
    assert_eq!(scored.status, StatusCode::OK);
    assert_eq!(sim.calls(), 1);

    stop.send(()).expect("server is still running");
    tokio::time::timeout(PATIENCE, server)
        .await
        .expect("server stops")
        .expect("server task does not panic")
        .expect("server stops cleanly");
}

/// `SimulateArgs` is flattened into the real CLI; this stands in for it.
#[derive(Parser, Debug)]
struct Cli {
    #[command(flatten)]
    args: SimulateArgs,
}

#[test]
fn command_line_arguments_build_the_config() {
    let defaults = Cli::try_parse_from(["sim"]).expect("defaults parse").args;
    assert_eq!(defaults.listen, "127.0.0.1:9000".parse().expect("addr"));
    assert_eq!(defaults.into_config(), SimulatorConfig::default());

    let args = Cli::try_parse_from([
        "sim",
        "--listen",
        "127.0.0.1:0",
        "--min-interval",
        "250ms",
        "--penalty",
        "3s",
        "--latency",
        "1m 30s",
        "--fault",
        "reset",
        "--fail-every",
        "4",
        "--retry-after",
        "http-date",
        "--client-ids",
        "alpha,beta",
        "--arrival-delay",
        "uniform:0ms..30ms",
        "--seed",
        "42",
    ])
    .expect("arguments parse")
    .args;
    assert_eq!(
        args.into_config(),
        SimulatorConfig {
            min_interval: ms(250),
            penalty: Duration::from_secs(3),
            latency: Duration::from_secs(90),
            fault: Fault::Reset,
            fail_every: Some(4),
            retry_after: RetryAfterMode::HttpDate,
            client_ids: Some(HashSet::from(["alpha".to_owned(), "beta".to_owned()])),
            arrival_delay: ArrivalDelay::Uniform {
                min: ms(0),
                max: ms(30),
            },
            seed: 42,
        }
    );

    for bad in [
        &["sim", "--fail-every", "0"][..],
        &["sim", "--fault", "melt"],
        &["sim", "--retry-after", "minutes"],
        &["sim", "--penalty", "2"],
        &["sim", "--arrival-delay", "uniform:30ms..0ms"],
        &["sim", "--arrival-delay", "spikes:0ms..3ms,5%"],
    ] {
        assert!(Cli::try_parse_from(bad).is_err(), "{bad:?} must be refused");
    }
}
