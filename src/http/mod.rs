//! The HTTP surface: routes, the per-request observation layer, and the handlers.
//!
//! Every request passes [`observe`], which decides whether it is traced and opens its server
//! span if so (continuing an incoming `traceparent`), counts and times the request, puts the
//! trace id on the response and writes the one access-log line. Handlers only produce responses; only `error.rs` decides
//! what a failure looks like.

pub(crate) mod connection;
mod jobs;
mod probes;
pub(crate) mod route;
pub mod server;
mod status_page;

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{MatchedPath, RawQuery, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde::Serialize;
use tokio::time::Instant;
use tracing::Instrument;

use crate::app::{Answer, App, LookupReport};
use crate::lookup::breaker::BreakerState;
use crate::lookup::cache::CacheResult;
use crate::lookup::cache::ScoreCache;
use crate::lookup::pacing::PacingMode;
use crate::lookup::validation;
use crate::shutdown::Lifecycle;
use crate::telemetry;
use crate::telemetry::metrics;
use probes::{admin_index, health, index, lifecycle_name, ready};
use route::Route;

/// The public router (port 8000): the index of endpoints (the status page for a browser), the
/// lookup, health, status and the page's feed, and `/metrics` unless `--public-metrics false`.
pub(crate) fn router(app: Arc<App>) -> Router {
    let mut router = Router::new()
        .route("/", get(index))
        .route("/proxy/score", get(score))
        .route("/health", get(health))
        .route("/ready", get(ready))
        .route("/status", get(status))
        .route("/status/feed", get(status_page::feed))
        .route("/jobs", axum::routing::post(jobs::submit))
        .route("/jobs/{id}", get(jobs::status).delete(jobs::cancel))
        .route("/jobs/{id}/results", get(jobs::results))
        .route("/openapi.json", get(openapi));
    if app.config.public_metrics {
        router = router.route("/metrics", get(metrics_negotiated));
    }
    finish(router, app)
}

/// The admin router (`--admin-listen`): operators' endpoints only (the status page too),
/// `/metrics` always in the Prometheus format.
pub(crate) fn admin_router(app: Arc<App>) -> Router {
    let router = Router::new()
        .route("/", get(admin_index))
        .route("/status/feed", get(status_page::admin_feed))
        .route("/health", get(health))
        .route("/ready", get(ready))
        .route("/status", get(status))
        .route("/metrics", get(metrics_prometheus));
    finish(router, app)
}

fn finish(router: Router<Arc<App>>, app: Arc<App>) -> Router {
    router
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn_with_state(app.clone(), observe))
        .with_state(app)
}

/// What a handler tells [`observe`] about the request: one response extension (the outcome
/// label, and for lookups what the lookup went through).
#[derive(Clone, Copy, Debug)]
struct Outcome {
    kind: &'static str,
    report: LookupReport,
}

impl Outcome {
    fn of(kind: &'static str) -> Outcome {
        Outcome {
            kind,
            report: LookupReport::default(),
        }
    }
}

tokio::task_local! {
    /// The request's trace ids, for the handler (cheaper than a request extension).
    static TRACE: telemetry::TraceIds;
}

/// The axum middleware: every route but the lookup's fast path goes through here.
async fn observe(State(app): State<Arc<App>>, request: Request, next: Next) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or(Route::Unmatched, |m| Route::from_path(m.as_str()));
    observed(&app, route, false, request, |request, ids, span| {
        TRACE
            .scope(ids, next.run(request))
            .instrument(span.tracing_span())
    })
    .await
}

/// `GET /proxy/score`, served straight from the connection (see `server.rs`): the same
/// observation as every other route, without the router's per-request boxing and
/// extensions, which cost a third of a cache hit.
pub(crate) async fn score_direct<B>(app: Arc<App>, request: http::Request<B>) -> Response {
    let app_ref = &app;
    observed(
        app_ref,
        Route::Score,
        true,
        request,
        |request, ids, span| async move {
            let queue_timeout = request
                .headers()
                .get(validation::QUEUE_TIMEOUT_HEADER)
                .map(HeaderValue::as_bytes);
            score_response(app_ref, request.uri().query(), queue_timeout, &ids, &span).await
        },
    )
    .await
}

/// Whether a request is a lookup the fast path serves.
pub(crate) fn is_lookup<B>(request: &http::Request<B>) -> bool {
    request.method() == http::Method::GET && request.uri().path() == Route::Score.as_str()
}

/// What happens around every request: the sampling decision and the server span
/// (continuing an incoming `traceparent`; none if the request is not traced), the size limits, the in-flight gauge, the trace-id response headers, the
/// request counters and timings, and the access-log line, also when the client hangs up
/// first.
async fn observed<B, F, Fut>(
    app: &Arc<App>,
    route: Route,
    direct: bool,
    request: http::Request<B>,
    handler: F,
) -> Response
where
    F: FnOnce(http::Request<B>, telemetry::TraceIds, telemetry::RequestSpan) -> Fut,
    Fut: std::future::Future<Output = Response>,
{
    let started = Instant::now();
    let _in_flight = app
        .metrics
        .enabled()
        .then(|| metrics::GaugeGuard::new(app.metrics.http_in_flight(route)));
    let (span, ids) = telemetry::server_span(
        route,
        request.method(),
        request.uri().path(),
        request.headers(),
        direct,
    );

    // If the client hangs up first, axum drops this future: the guard still records the
    // request (as 499, nginx's "client closed request"), so it is not silently lost.
    let mut unanswered = Unanswered {
        app,
        route,
        started,
        ids,
        answered: false,
    };
    let mut response = match oversized(&request) {
        Some(refusal) => refusal,
        // Not entered here: the handler enters it around the stages that have children of
        // their own. A hit never does (entering and leaving a span costs more than a hit).
        None => handler(request, ids, span.clone()).await,
    };
    unanswered.answered = true;

    let status = response.status();
    let (outcome, report) = match response.extensions().get::<Outcome>() {
        Some(o) => (o.kind, o.report),
        None if route == Route::Unmatched => (metrics::OUTCOME_NOT_FOUND, LookupReport::default()),
        None if status.is_success() => (metrics::OUTCOME_OK, LookupReport::default()),
        None => (metrics::OUTCOME_ERROR, LookupReport::default()),
    };

    telemetry::record_response(
        &span,
        status.as_u16(),
        outcome,
        report.cache.map(CacheResult::as_str),
    );

    let headers = response.headers_mut();
    if let Ok(v) = HeaderValue::from_bytes(&ids.traceparent_bytes()) {
        headers.insert(TRACEPARENT, v);
    }
    if let Ok(v) = HeaderValue::from_bytes(&ids.trace_id_bytes()) {
        headers.insert(X_TRACE_ID, v);
    }
    record(app, route, status.as_u16(), outcome, started, &ids, &report);
    response
}

/// Longest request target accepted (path and query); beyond it, `414`. A lookup's is under
/// 200 bytes.
pub(crate) const MAX_URI_BYTES: usize = 8 * 1024;

/// Most header bytes accepted (names and values); beyond it, `431`. (hyper itself refuses
/// heads over `server::MAX_HEADER_BYTES`.)
pub(crate) const MAX_HEADER_BYTES: usize = 16 * 1024;

/// Refuses a request whose target or headers are too large, before any handler runs.
fn oversized<B>(request: &http::Request<B>) -> Option<Response> {
    let uri_len = request
        .uri()
        .path_and_query()
        .map_or(0, |pq| pq.as_str().len());
    let header_len: usize = request
        .headers()
        .iter()
        .map(|(k, v)| k.as_str().len() + v.len())
        .sum();
    let (status, kind, message) = if uri_len > MAX_URI_BYTES {
        (
            StatusCode::URI_TOO_LONG,
            "uri_too_long",
            "the request target is longer than 8 KiB",
        )
    } else if header_len > MAX_HEADER_BYTES {
        (
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            "headers_too_large",
            "the request headers are larger than 16 KiB",
        )
    } else {
        return None;
    };
    let mut response = (
        status,
        axum::Json(ErrorBody {
            error: kind,
            message,
        }),
    )
        .into_response();
    response.extensions_mut().insert(Outcome::of(kind));
    Some(response)
}

struct Unanswered<'a> {
    app: &'a App,
    route: Route,
    started: Instant,
    ids: telemetry::TraceIds,
    answered: bool,
}

impl Drop for Unanswered<'_> {
    fn drop(&mut self) {
        if !self.answered {
            record(
                self.app,
                self.route,
                metrics::CODE_CLIENT_CLOSED,
                metrics::OUTCOME_CLIENT_CLOSED,
                self.started,
                &self.ids,
                &LookupReport::default(),
            );
        }
    }
}

/// Counts and times one request and writes its access-log line: one line per request,
/// with nothing that identifies a person.
fn record(
    app: &App,
    route: Route,
    status: u16,
    outcome: &'static str,
    started: Instant,
    ids: &telemetry::TraceIds,
    report: &LookupReport,
) {
    let elapsed = started.elapsed();
    app.metrics.http_request(route, status, outcome, elapsed);
    // Polled (scrapes, probes, an open status page): counted, not logged line by line.
    if !matches!(route, Route::Metrics | Route::Health | Route::StatusFeed) {
        tracing::info!(
            target: "score_proxy::access",
            trace_id = %ids.trace_id_hex(),
            route = route.as_str(),
            status,
            outcome,
            cache = report.cache.map(CacheResult::as_str),
            queue_wait_ms = report.flight.queue_wait.map(millis),
            upstream_status = report.flight.upstream_status,
            upstream_ms = report.flight.upstream_took.map(millis),
            duration_ms = millis(elapsed),
            "request"
        );
    }
}

fn millis(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

const TRACEPARENT: header::HeaderName = header::HeaderName::from_static("traceparent");
const X_TRACE_ID: header::HeaderName = header::HeaderName::from_static("x-trace-id");
const X_CACHE: header::HeaderName = header::HeaderName::from_static("x-cache");

/// The router's handler for the lookup (HEAD, and requests the fast path does not take).
async fn score(
    State(app): State<Arc<App>>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Response {
    let ids = TRACE
        .try_with(|ids| *ids)
        .unwrap_or_else(|_| telemetry::fresh_ids());
    let queue_timeout = headers
        .get(validation::QUEUE_TIMEOUT_HEADER)
        .map(HeaderValue::as_bytes);
    score_response(
        &app,
        query.as_deref(),
        queue_timeout,
        &ids,
        &telemetry::RequestSpan::from(tracing::Span::current()),
    )
    .await
}

async fn score_response(
    app: &App,
    query: Option<&str>,
    queue_timeout: Option<&[u8]>,
    ids: &telemetry::TraceIds,
    span: &telemetry::RequestSpan,
) -> Response {
    let mut report = LookupReport::default();
    let (mut response, kind) = match app
        .lookup(query, queue_timeout, ids, span, &mut report)
        .await
    {
        Ok(answer) => {
            let kind = answer.cache.as_str();
            (answer_response(answer), kind)
        }
        Err(e) => {
            let kind = e.kind();
            (e.into_response(), kind)
        }
    };
    response.extensions_mut().insert(Outcome { kind, report });
    response
}

fn answer_response(answer: Answer) -> Response {
    let mut response = Response::new(axum::body::Body::from(answer.body));
    let headers = response.headers_mut();
    // Room for every header this response will carry, so the map never grows.
    headers.reserve(8);
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    // Personal data: no shared cache downstream should keep it.
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(X_CACHE, HeaderValue::from_static(answer.cache.header()));
    if matches!(answer.cache, CacheResult::Hit | CacheResult::Stale) {
        headers.insert(header::AGE, HeaderValue::from(answer.age.as_secs()));
    }
    if answer.cache == CacheResult::Stale {
        // RFC 7234's warn-code 110; deprecated by RFC 9111 but still what tools recognise.
        headers.insert(
            header::WARNING,
            HeaderValue::from_static("110 score-proxy \"Response is Stale\""),
        );
    }
    response
}

/// `/status` (and the original's JSON `/metrics`): the original's four fields first, then
/// more that help.
#[derive(Serialize)]
pub(crate) struct Status {
    pub(crate) queue_size: usize,
    pub(crate) cache_size: u64,
    pub(crate) processing: i64,
    pub(crate) system_status: &'static str,
    pub(crate) queue_capacity: usize,
    pub(crate) booked_slots: usize,
    pub(crate) pacing_mode: &'static str,
    pub(crate) rate_per_second: f64,
    pub(crate) interval_seconds: f64,
    /// The guard in force (part of `interval_seconds`), and why: `floor`, `rtt_spread`,
    /// `penalty` or `fleet`.
    pub(crate) guard_seconds: f64,
    pub(crate) guard_reason: &'static str,
    /// Shared mode: this replica's place for time division while Redis is gone (`null`
    /// alone, or before one was leased: fallback then paces at a share of the rate).
    pub(crate) replica_place: Option<u32>,
    /// Shared mode in fallback: how long Redis has been gone (`null` otherwise).
    pub(crate) fallback_seconds: Option<f64>,
    pub(crate) penalty_active: bool,
    pub(crate) penalty_remaining_seconds: f64,
    pub(crate) breaker: &'static str,
    pub(crate) lifecycle: &'static str,
    pub(crate) uptime_seconds: f64,
    pub(crate) version: &'static str,
}

fn current_status(app: &App) -> Status {
    app.cache.sync();
    let queue_size = app.scheduler.queue_len();
    let queue_capacity = app.scheduler.queue_capacity();
    let penalty = app.pacer.penalty_until();
    let lifecycle = app.lifecycle();
    let breaker = app.breaker.state();
    let (guard, guard_reason) = app.dispatcher.guard.snapshot();
    let division = app.shared.as_ref().map(|s| s.division_report());
    let system_status = if lifecycle != Lifecycle::Running {
        "draining"
    } else if breaker != BreakerState::Closed || app.pacer.mode() == PacingMode::Fallback {
        "degraded"
    } else if penalty.is_some() {
        "penalized"
    } else if queue_size * 5 >= queue_capacity * 4 {
        "busy"
    } else {
        "healthy"
    };
    Status {
        queue_size,
        cache_size: app.cache.entry_count(),
        processing: app.processing(),
        system_status,
        queue_capacity,
        booked_slots: app.scheduler.booked_slots(),
        pacing_mode: app.pacer.mode().as_str(),
        rate_per_second: app.config.rate_per_second,
        interval_seconds: app.pacer.interval().as_secs_f64(),
        guard_seconds: guard.as_secs_f64(),
        guard_reason: guard_reason.as_str(),
        replica_place: division
            .as_ref()
            .and_then(|d| d.place)
            .map(|(place, _)| place),
        fallback_seconds: division
            .as_ref()
            .and_then(|d| d.fallback_for)
            .map(|d| d.as_secs_f64()),
        penalty_active: penalty.is_some(),
        penalty_remaining_seconds: penalty.map_or(0.0, |t| {
            t.saturating_duration_since(Instant::now()).as_secs_f64()
        }),
        breaker: breaker.as_str(),
        lifecycle: lifecycle_name(lifecycle),
        uptime_seconds: app.started_at.elapsed().as_secs_f64(),
        version: env!("CARGO_PKG_VERSION"),
    }
}

async fn status(State(app): State<Arc<App>>) -> axum::Json<Status> {
    axum::Json(current_status(&app))
}

/// `/metrics` on the public listener: Prometheus text for anyone who asks for it (Prometheus
/// always does, in `Accept`), the original proxy's JSON for everyone else, so the scripts
/// written against the original keep working. `?format=prometheus|json` overrides.
async fn metrics_negotiated(
    State(app): State<Arc<App>>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Response {
    if wants_prometheus(query.as_deref(), &headers) {
        metrics_prometheus(State(app)).await
    } else {
        axum::Json(current_status(&app)).into_response()
    }
}

fn wants_prometheus(query: Option<&str>, headers: &HeaderMap) -> bool {
    match query {
        Some(q) if q.split('&').any(|p| p == "format=prometheus") => return true,
        Some(q) if q.split('&').any(|p| p == "format=json") => return false,
        _ => {}
    }
    headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.contains("text/plain") || v.contains("openmetrics"))
}

/// The Prometheus text. Gauges of state are set from the live state first, so that what a
/// scrape reads is true now, not as of the last lookup: an open breaker whose cool-down has
/// passed reads `half_open` on an idle proxy (asking the breaker settles it), a penalty that
/// has run out reads 0.
async fn metrics_prometheus(State(app): State<Arc<App>>) -> Response {
    app.cache.sync();
    app.metrics.set_cache_entries(app.cache.entry_count());
    app.metrics
        .set_penalty_active(app.pacer.penalty_until().is_some());
    app.metrics.set_breaker_state(app.breaker.state());
    app.metrics.set_pacing_mode(app.pacer.mode());
    if let Some(shared) = &app.shared {
        app.metrics.set_division(&shared.division_report());
    }
    app.metrics
        .set_log_lines_dropped(telemetry::lines_dropped());
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
        )],
        app.metrics.render(),
    )
        .into_response()
}

/// The OpenAPI 3 description of the public API.
async fn openapi() -> Response {
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        include_str!("openapi.json"),
    )
        .into_response()
}

#[derive(Serialize)]
struct ErrorBody {
    error: &'static str,
    message: &'static str,
}

async fn not_found() -> Response {
    (
        StatusCode::NOT_FOUND,
        axum::Json(ErrorBody {
            error: "not_found",
            message: "no such endpoint; lookups are GET /proxy/score?cpf=...&client_id=...",
        }),
    )
        .into_response()
}

async fn method_not_allowed() -> Response {
    let mut response = (
        StatusCode::METHOD_NOT_ALLOWED,
        axum::Json(ErrorBody {
            error: "method_not_allowed",
            message: "only GET (and HEAD) are supported",
        }),
    )
        .into_response();
    response
        .headers_mut()
        .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
    response
}
