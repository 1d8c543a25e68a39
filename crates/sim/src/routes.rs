//! The simulator's HTTP surface: the score endpoint as the real API has it, plus the
//! `/__sim/*` control endpoints for scripts and out-of-process tests.
//!
//! A score call goes through these steps, in this order:
//! 1. **arrival**: the clock is read first thing, before any parsing, because the real
//!    API judges the rate at arrival and any work before reading the clock would shift it;
//!    with a network delay configured, the arrival is that instant plus a drawn one-way
//!    delay, and the handler waits until then: the rate rule judges when the call would
//!    have reached an API across a network, not when it reached loopback;
//! 2. **judgement**: under the state lock, the arrival is counted, checked against the
//!    rate rule, given an outcome and recorded, all at once;
//! 3. **answer**: outside the lock, after the configured latency, the outcome becomes a
//!    response (or, for the `hang` fault, never does).

use std::collections::HashMap;
use std::io;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::Json;
use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Query, Request, State};
use axum::http::header::{CONTENT_TYPE, RETRY_AFTER};
use axum::http::{HeaderMap, HeaderValue, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use futures_util::{StreamExt, stream};
use serde_json::json;

use super::Simulator;
use super::config::{ConfigUpdate, ConfigView, Fault, RetryAfterMode, SimulatorConfig};
use super::cpf::{is_valid_cpf, score_for};
use super::record::{Admission, Arrival, MAX_RECORDED_ARRIVALS, truncated};

/// Where the score endpoint lives, as on the real API.
pub const SCORE_PATH: &str = "/api/score";

/// What the `garbage` fault answers: the kind of page a misconfigured gateway returns.
const GARBAGE_BODY: &str = "<html><body><h1>oops</h1></body></html>";

/// What the `reset` fault sends before breaking the connection: the start of a
/// plausible answer, so that a client that parses eagerly gets a truncated document.
const RESET_PREFIX: &[u8] = br#"{"cpf": "0165873"#;

/// How long the `reset` fault waits between its first bytes and the break, so that the
/// head and those bytes have certainly left before the connection is torn down.
const RESET_DELAY: Duration = Duration::from_millis(10);

pub(super) fn router(sim: Simulator) -> Router {
    Router::new()
        .route(SCORE_PATH, get(score))
        .route("/health", get(health))
        .route("/__sim/stats", get(stats))
        .route("/__sim/reset", post(reset))
        .route("/__sim/config", get(get_config).put(put_config))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(sim)
}

/// `GET /api/score`. The request is taken whole (no extractor that could reject it)
/// because every arrival counts, however malformed.
///
/// A call whose client goes away during its network delay is never counted: on a real
/// network it would still arrive, but the proxy only drops a started call when it gives up
/// on it, long after any delay configured here.
async fn score(State(sim): State<Simulator>, request: Request) -> Response {
    let received = Instant::now();
    let _in_flight = sim.in_flight_guard();
    let delay = sim.draw_arrival_delay();
    let arrival = received + delay;
    let call = Call::read(request.uri(), request.headers());
    if !delay.is_zero()
        && sim
            .unless_stopping(tokio::time::sleep_until(arrival.into()))
            .await
            .is_none()
    {
        return aborted();
    }
    let decision = judge(&sim, arrival, delay, call);
    tracing::debug!(
        seq = decision.seq,
        status = decision.outcome.status(),
        violation = matches!(decision.outcome, Outcome::TooManyRequests),
        "upstream simulator judged a score call"
    );
    answer(&sim, decision).await
}

/// What the simulator needs to know about a score request.
struct Call {
    /// The `client-id` header if present and readable as text.
    client_id: Option<String>,
    /// The `cpf` query parameter, if it was given exactly once.
    cpf: Option<String>,
    /// What is recorded: as received, lossily decoded and truncated.
    recorded_client_id: String,
    recorded_cpf: String,
    traceparent: Option<String>,
}

impl Call {
    fn read(uri: &Uri, headers: &HeaderMap) -> Self {
        let client_header = headers.get("client-id");
        let client_id = client_header
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let recorded_client_id = client_header
            .map(|v| truncated(&String::from_utf8_lossy(v.as_bytes())))
            .unwrap_or_default();

        // A query that does not even decode is treated as one without a cpf: it is the
        // caller's fault, so it gets 400 like any other bad cpf.
        let pairs = Query::<Vec<(String, String)>>::try_from_uri(uri)
            .map(|Query(pairs)| pairs)
            .unwrap_or_default();
        let mut cpfs = pairs
            .into_iter()
            .filter(|(k, _)| k == "cpf")
            .map(|(_, v)| v);
        let first = cpfs.next();
        // A repeated cpf is refused rather than guessed at: it is what an unencoded
        // value spliced into the URL looks like.
        let cpf = if cpfs.next().is_some() {
            None
        } else {
            first.clone()
        };
        let recorded_cpf = first.as_deref().map(truncated).unwrap_or_default();

        let traceparent = headers
            .get("traceparent")
            .map(|v| truncated(&String::from_utf8_lossy(v.as_bytes())));

        Self {
            client_id,
            cpf,
            recorded_client_id,
            recorded_cpf,
            traceparent,
        }
    }
}

/// What a score call gets, decided at arrival.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Outcome {
    TooManyRequests,
    Hang,
    InternalError,
    Unavailable,
    Garbage,
    Reset,
    InvalidClient,
    InvalidCpf,
    Score { cpf: String, score: u16 },
}

impl Outcome {
    /// The outcome a fault imposes, if it imposes one.
    fn of_fault(fault: Fault) -> Option<Self> {
        match fault {
            Fault::None => None,
            Fault::Hang => Some(Outcome::Hang),
            Fault::Error => Some(Outcome::InternalError),
            Fault::Unavailable => Some(Outcome::Unavailable),
            Fault::Garbage => Some(Outcome::Garbage),
            Fault::Reset => Some(Outcome::Reset),
        }
    }

    /// The status recorded for the outcome; `0` for an answer that is never sent.
    fn status(&self) -> u16 {
        match self {
            Outcome::TooManyRequests => 429,
            Outcome::Hang => 0,
            Outcome::InternalError => 500,
            Outcome::Unavailable => 503,
            Outcome::Garbage | Outcome::Reset | Outcome::Score { .. } => 200,
            Outcome::InvalidClient => 401,
            Outcome::InvalidCpf => 400,
        }
    }
}

/// The outcome of an admitted call. The rate rule comes first because the real API
/// counts and limits every call; then faults, which stand for a broken upstream that
/// no longer looks at the request; then the request's own validity.
fn decide(config: &SimulatorConfig, admission: Admission, call: &Call) -> Outcome {
    if admission.violation {
        return Outcome::TooManyRequests;
    }
    if config.fault_applies(admission.calls)
        && let Some(outcome) = Outcome::of_fault(config.fault)
    {
        return outcome;
    }
    if !call
        .client_id
        .as_deref()
        .is_some_and(|id| config.accepts_client(id))
    {
        return Outcome::InvalidClient;
    }
    match call.cpf.as_deref() {
        Some(cpf) if is_valid_cpf(cpf) => Outcome::Score {
            cpf: cpf.to_owned(),
            score: score_for(cpf),
        },
        _ => Outcome::InvalidCpf,
    }
}

/// Everything the answer step needs, copied out of the lock.
struct Decision {
    seq: u64,
    outcome: Outcome,
    latency: Duration,
    retry_after: RetryAfterMode,
    penalty: Duration,
}

/// Counts, judges and records one arrival in a single critical section. `arrival` is the
/// delayed instant, which the sleep before may have overshot by a timer tick: the rule
/// judges the exact instant, not the wake-up.
fn judge(sim: &Simulator, arrival: Instant, delay: Duration, call: Call) -> Decision {
    let mut state = sim.lock();
    let admission = state.admit(arrival);
    let outcome = decide(&state.config, admission, &call);
    let decision = Decision {
        seq: admission.seq,
        latency: state.config.latency,
        retry_after: state.config.retry_after,
        penalty: state.config.penalty,
        outcome,
    };
    state.record(
        Arrival {
            seq: admission.seq,
            at: sim.elapsed_at(arrival),
            delay,
            client_id: call.recorded_client_id,
            cpf: call.recorded_cpf,
            status: decision.outcome.status(),
            traceparent: call.traceparent,
            violation: admission.violation,
        },
        MAX_RECORDED_ARRIVALS,
    );
    // Under the lock, so that concurrent arrivals publish their counts in order.
    sim.inner.calls.send_replace(state.calls());
    decision
}

async fn answer(sim: &Simulator, decision: Decision) -> Response {
    if !decision.latency.is_zero()
        && sim
            .unless_stopping(tokio::time::sleep(decision.latency))
            .await
            .is_none()
    {
        return aborted();
    }
    match decision.outcome {
        Outcome::TooManyRequests => too_many_requests(sim, decision.penalty, decision.retry_after),
        Outcome::Hang => {
            // Awaiting forever means hyper drops this future when the client disconnects,
            // which is exactly what a test of client-side timeouts needs.
            sim.unless_stopping(std::future::pending::<()>()).await;
            aborted()
        }
        Outcome::InternalError => json_error(StatusCode::INTERNAL_SERVER_ERROR, "internal error"),
        Outcome::Unavailable => json_error(StatusCode::SERVICE_UNAVAILABLE, "service unavailable"),
        Outcome::Garbage => (
            StatusCode::OK,
            [(CONTENT_TYPE, "text/html; charset=utf-8")],
            GARBAGE_BODY,
        )
            .into_response(),
        Outcome::Reset => reset_midway(),
        Outcome::InvalidClient => json_error(StatusCode::UNAUTHORIZED, "invalid client id"),
        Outcome::InvalidCpf => json_error(StatusCode::BAD_REQUEST, "invalid cpf"),
        Outcome::Score { cpf, score } => Json(json!({
            "cpf": cpf,
            "score": score,
            "request_id": decision.seq,
        }))
        .into_response(),
    }
}

/// The `429`, worded as the real API words it. The number is in seconds and may be
/// fractional (`0.2`) when a test shortens the penalty; the original proxy misread it as
/// milliseconds, so the unit matters.
fn too_many_requests(sim: &Simulator, penalty: Duration, mode: RetryAfterMode) -> Response {
    let message = format!(
        "Too many requests. Penalty of {} seconds applied.",
        penalty.as_secs_f64()
    );
    let mut response = json_error(StatusCode::TOO_MANY_REQUESTS, &message);
    // Measured when answering, not at arrival: with latency configured, less is left.
    let remaining = sim.penalty_remaining().unwrap_or_default();
    let value = match mode {
        RetryAfterMode::None => None,
        RetryAfterMode::Seconds => Some(ceil_secs(remaining).to_string()),
        RetryAfterMode::HttpDate => {
            let end = SystemTime::now() + remaining;
            let since_epoch = end.duration_since(UNIX_EPOCH).unwrap_or_default();
            // HTTP dates have whole seconds; rounding down would invite an early retry.
            let rounded = UNIX_EPOCH + Duration::from_secs(ceil_secs(since_epoch));
            Some(httpdate::fmt_http_date(rounded))
        }
    };
    if let Some(value) = value.and_then(|v| HeaderValue::from_str(&v).ok()) {
        response.headers_mut().insert(RETRY_AFTER, value);
    }
    response
}

fn ceil_secs(d: Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

/// A `200` whose body breaks off: some bytes, a pause so they are sent, then an error,
/// on which hyper aborts the connection (the chunked body is never terminated).
fn reset_midway() -> Response {
    let body = stream::iter([Ok::<Bytes, io::Error>(Bytes::from_static(RESET_PREFIX))]).chain(
        stream::once(async {
            tokio::time::sleep(RESET_DELAY).await;
            Err(io::Error::new(
                io::ErrorKind::ConnectionReset,
                "simulated connection reset",
            ))
        }),
    );
    Response::builder()
        .status(StatusCode::OK)
        .header(CONTENT_TYPE, "application/json")
        .body(Body::from_stream(body))
        .unwrap_or_else(|_| aborted())
}

/// A response that is never sent: its body fails before the head is flushed, so hyper
/// closes the connection without a word. Used when shutdown cuts a pending answer.
fn aborted() -> Response {
    let body = stream::once(async {
        Err::<Bytes, io::Error>(io::Error::new(
            io::ErrorKind::ConnectionAborted,
            "simulator shutting down",
        ))
    });
    Response::new(Body::from_stream(body))
}

fn json_error(status: StatusCode, message: &str) -> Response {
    (status, Json(json!({ "error": message }))).into_response()
}

async fn health() -> Response {
    Json(json!({ "status": "ok" })).into_response()
}

/// `GET /__sim/stats[?arrivals=false]`; the list can hold 100 000 arrivals, which a
/// script polling the counters does not want every time.
async fn stats(State(sim): State<Simulator>, uri: Uri) -> Response {
    let query = Query::<HashMap<String, String>>::try_from_uri(&uri)
        .map(|Query(q)| q)
        .unwrap_or_default();
    let with_arrivals = match query.get("arrivals").map(String::as_str) {
        None | Some("true") | Some("1") => true,
        Some("false") | Some("0") => false,
        Some(_) => {
            return json_error(StatusCode::BAD_REQUEST, "arrivals must be true or false");
        }
    };
    if with_arrivals {
        return Json(sim.stats()).into_response();
    }
    // Omitted rather than sent empty, so that a script cannot mistake "not asked for"
    // for "nothing arrived"; `SimStats` reads it back as empty.
    let mut summary = json!(sim.stats_summary());
    if let Some(fields) = summary.as_object_mut() {
        fields.remove("arrivals");
    }
    Json(summary).into_response()
}

/// `POST /__sim/reset`.
async fn reset(State(sim): State<Simulator>) -> StatusCode {
    sim.reset();
    StatusCode::NO_CONTENT
}

/// `GET /__sim/config`: the configuration in force, in the shape `PUT` accepts.
async fn get_config(State(sim): State<Simulator>) -> Response {
    Json(ConfigView::from(&sim.config())).into_response()
}

/// `PUT /__sim/config`: a partial update; answers with the configuration now in force.
/// The body is parsed by hand so that a bad one gets a JSON error like everything else.
async fn put_config(State(sim): State<Simulator>, body: Bytes) -> Response {
    let update: ConfigUpdate = match serde_json::from_slice(&body) {
        Ok(update) => update,
        Err(err) => {
            return json_error(StatusCode::BAD_REQUEST, &format!("invalid config: {err}"));
        }
    };
    match sim.update_config(update) {
        Ok(view) => {
            tracing::debug!("upstream simulator reconfigured");
            Json(view).into_response()
        }
        Err(reason) => json_error(StatusCode::BAD_REQUEST, &reason),
    }
}

async fn not_found() -> Response {
    json_error(StatusCode::NOT_FOUND, "not found")
}

async fn method_not_allowed() -> Response {
    json_error(StatusCode::METHOD_NOT_ALLOWED, "method not allowed")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call(client_id: Option<&str>, cpf: Option<&str>) -> Call {
        Call {
            client_id: client_id.map(str::to_owned),
            cpf: cpf.map(str::to_owned),
            recorded_client_id: String::new(),
            recorded_cpf: String::new(),
            traceparent: None,
        }
    }

    fn admitted(violation: bool) -> Admission {
        Admission {
            seq: 7,
            calls: 1,
            violation,
        }
    }

    #[test]
    fn outcomes_are_decided_in_contract_order() {
        let config = SimulatorConfig::default();
        let good = call(Some("id"), Some("01658739060"));
        assert_eq!(
            decide(&config, admitted(true), &call(None, None)),
            Outcome::TooManyRequests
        );
        assert_eq!(
            decide(&config, admitted(false), &call(None, Some("123"))),
            Outcome::InvalidClient
        );
        assert_eq!(
            decide(&config, admitted(false), &call(Some("id"), Some("123"))),
            Outcome::InvalidCpf
        );
        assert_eq!(
            decide(&config, admitted(false), &good),
            Outcome::Score {
                cpf: "01658739060".to_owned(),
                score: score_for("01658739060"),
            }
        );
        let faulty = SimulatorConfig {
            fault: Fault::Unavailable,
            ..Default::default()
        };
        assert_eq!(
            decide(&faulty, admitted(false), &call(None, None)),
            Outcome::Unavailable
        );
        assert_eq!(
            decide(&faulty, admitted(true), &good),
            Outcome::TooManyRequests
        );
    }

    #[test]
    fn query_reading_is_strict() {
        let headers = HeaderMap::new();
        let read = |q: &str| Call::read(&q.parse::<Uri>().expect("uri"), &headers);
        assert_eq!(
            read("/api/score?cpf=01658739060").cpf.as_deref(),
            Some("01658739060")
        );
        let twice = read("/api/score?cpf=01658739060&cpf=89336333089");
        assert_eq!(twice.cpf, None);
        assert_eq!(twice.recorded_cpf, "01658739060");
        let spliced = read("/api/score?cpf=01658739060%26client_id%3Dx");
        assert_eq!(spliced.cpf.as_deref(), Some("01658739060&client_id=x"));
        assert_eq!(read("/api/score").cpf, None);
        assert_eq!(read("/api/score").client_id, None);
    }

    #[test]
    fn retry_after_seconds_round_up() {
        assert_eq!(ceil_secs(Duration::from_millis(1)), 1);
        assert_eq!(ceil_secs(Duration::from_secs(2)), 2);
        assert_eq!(ceil_secs(Duration::from_millis(2001)), 3);
        assert_eq!(ceil_secs(Duration::ZERO), 0);
    }
}
