//! The operators' small endpoints: `GET /` (what the service is and its endpoints, or the
//! status page for a browser), liveness (`/health`) and readiness (`/ready`). None of them
//! waits behind the queue or takes a lock a lookup holds.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use crate::app::App;
use crate::http::route::Route;
use crate::http::status_page;
use crate::shutdown::Lifecycle;

#[derive(Serialize)]
struct Health {
    status: &'static str,
}

/// Liveness, answered as the original did (`{"status":"healthy"}`, which its users' scripts
/// look for), at once whatever the queue holds (it reads the lifecycle, no shared lock).
/// Once shutdown has begun, `503 {"status":"draining"}`: the process is on its way out, as
/// the `503` that new connections get during the drain says too.
pub(super) async fn health(State(app): State<Arc<App>>) -> Response {
    match app.lifecycle() {
        Lifecycle::Running => axum::Json(Health { status: "healthy" }).into_response(),
        Lifecycle::Draining | Lifecycle::Closed => (
            StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(Health { status: "draining" }),
        )
            .into_response(),
    }
}

#[derive(Serialize)]
struct Index {
    service: &'static str,
    version: &'static str,
    /// Path to what it answers, as the original's `GET /` listed them.
    endpoints: BTreeMap<&'static str, &'static str>,
}

/// `GET /`: for a browser (`Accept: text/html`), the live status page; for everyone else
/// (the original's scripts, `curl`), what the service is and its endpoints, as the
/// original's `GET /` answered; only those this listener serves.
pub(super) async fn index(State(app): State<Arc<App>>, headers: HeaderMap) -> Response {
    if status_page::wants_html(&headers) {
        return status_page::page();
    }
    let mut endpoints = BTreeMap::from([
        (
            Route::Score.as_str(),
            "GET ?cpf=&client_id= : the upstream's score (cached, coalesced, paced)",
        ),
        (Route::Health.as_str(), HEALTH),
        (Route::Ready.as_str(), READY),
        (Route::Status.as_str(), STATUS),
        (Route::StatusFeed.as_str(), STATUS_FEED),
        (
            Route::OpenApi.as_str(),
            "GET: the OpenAPI description of these endpoints",
        ),
        (
            Route::Jobs.as_str(),
            "POST: a bulk job of CPFs, answered with budget no lookup needs",
        ),
        (
            Route::Job.as_str(),
            "GET ?client_id= : a bulk job's progress; DELETE: cancel it",
        ),
        (
            Route::JobResults.as_str(),
            "GET ?client_id=&format= : its results, NDJSON or CSV, streamed as they come",
        ),
    ]);
    if app.config.public_metrics {
        endpoints.insert(
            Route::Metrics.as_str(),
            "GET: Prometheus text (Accept: text/plain or ?format=prometheus), else the /status JSON",
        );
    }
    index_json(endpoints)
}

/// `GET /` on the admin listener: the status page for a browser, else its endpoints.
pub(super) async fn admin_index(headers: HeaderMap) -> Response {
    if status_page::wants_html(&headers) {
        return status_page::page();
    }
    index_json(BTreeMap::from([
        (Route::Health.as_str(), HEALTH),
        (Route::Ready.as_str(), READY),
        (Route::Status.as_str(), STATUS),
        (Route::StatusFeed.as_str(), STATUS_FEED),
        (Route::Metrics.as_str(), "GET: Prometheus text"),
    ]))
}

const HEALTH: &str = "GET: liveness, {\"status\":\"healthy\"}";
const READY: &str = "GET: readiness, 503 once shutdown has begun";
const STATUS: &str = "GET: queue, cache, pacing, penalty and breaker state (JSON)";
const STATUS_FEED: &str =
    "GET: /status plus the last minute of upstream calls, as the status page polls it (JSON)";

fn index_json(endpoints: BTreeMap<&'static str, &'static str>) -> Response {
    let mut response = axum::Json(Index {
        service: "score-proxy",
        version: env!("CARGO_PKG_VERSION"),
        endpoints,
    })
    .into_response();
    response
        .headers_mut()
        .insert(header::VARY, HeaderValue::from_static("Accept"));
    response
}

#[derive(Serialize)]
struct Readiness {
    status: &'static str,
    lifecycle: &'static str,
    penalty_active: bool,
    breaker: &'static str,
    /// `local`, `shared` (one schedule in Redis) or `fallback` (Redis out of reach).
    pacing: &'static str,
}

/// Readiness: 503 once shutdown has begun, so load balancers stop sending new lookups.
/// An open circuit breaker is reported but does not make the proxy unready: cached answers
/// are still served, and every replica shares the same failing upstream anyway.
pub(super) async fn ready(State(app): State<Arc<App>>) -> Response {
    let lifecycle = app.lifecycle();
    let body = Readiness {
        status: if lifecycle == Lifecycle::Running {
            "ready"
        } else {
            "not_ready"
        },
        lifecycle: lifecycle_name(lifecycle),
        penalty_active: app.pacer.penalty_until().is_some(),
        breaker: app.breaker.state().as_str(),
        pacing: app.pacer.mode().as_str(),
    };
    let code = if lifecycle == Lifecycle::Running {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, axum::Json(body)).into_response()
}

pub(super) fn lifecycle_name(l: Lifecycle) -> &'static str {
    match l {
        Lifecycle::Running => "running",
        Lifecycle::Draining => "draining",
        Lifecycle::Closed => "closed",
    }
}

#[cfg(test)]
mod tests {
    use axum::body::Body;
    use axum::http::Request;
    use tower::ServiceExt;

    use super::*;

    /// An app built from the defaults, as `main` builds it; nothing is spawned or bound.
    fn app() -> Arc<App> {
        let cli = <crate::config::Cli as clap::Parser>::try_parse_from(["score-proxy"]).unwrap();
        let config = cli
            .serve
            .validate(|_| None)
            .expect("the defaults are valid");
        App::new(config).expect("the app builds")
    }

    async fn get(app: &Arc<App>, path: &str) -> (StatusCode, serde_json::Value) {
        let response = crate::http::router(app.clone())
            .oneshot(Request::get(path).body(Body::empty()).unwrap())
            .await
            .unwrap();
        let status = response.status();
        let body = axum::body::to_bytes(response.into_body(), 64 * 1024)
            .await
            .unwrap();
        (status, serde_json::from_slice(&body).unwrap())
    }

    /// The original's scripts look for `"status":"healthy"`; once shutdown has begun, the
    /// answer is no longer healthy, in its status code as in its body.
    #[tokio::test]
    async fn health_is_healthy_while_running_and_draining_after() {
        let app = app();
        let (code, body) = get(&app, "/health").await;
        assert_eq!(code, StatusCode::OK);
        assert_eq!(body, serde_json::json!({"status": "healthy"}));

        app.begin_drain(std::time::Duration::from_secs(5));
        let (code, body) = get(&app, "/health").await;
        assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(body, serde_json::json!({"status": "draining"}));

        app.close();
        let (code, body) = get(&app, "/health").await;
        assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(body["status"], "draining");
    }

    #[tokio::test]
    async fn the_index_lists_the_endpoints_this_listener_serves() {
        let app = app();
        let (code, body) = get(&app, "/").await;
        assert_eq!(code, StatusCode::OK);
        assert_eq!(body["service"], "score-proxy");
        let endpoints = body["endpoints"].as_object().unwrap();
        for path in ["/proxy/score", "/health", "/ready", "/status", "/metrics"] {
            assert!(endpoints.contains_key(path), "{path}: {body}");
        }
        assert!(!endpoints.contains_key("/"));
    }
}
