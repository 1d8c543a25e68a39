//! The live status page: `GET /` for a browser, and the JSON feed it polls
//! (`GET /status/feed`).
//!
//! Many run score-proxy as one binary, or as `demo`, without Prometheus and Grafana; the
//! budget ticking at one call per second, the queue filling and draining and the penalties
//! are understood faster by looking than by reading JSON. The page is one HTML document with
//! its style sheet and a small script inlined (`status_page/`, embedded with `include_str!`:
//! no CDN, no font, no build step, nothing fetched but the feed), so it works offline and
//! behind any firewall. Clients that do not ask for HTML (the original's scripts, `curl`)
//! keep the JSON index of endpoints (see `probes.rs`).
//!
//! The feed is `/status` (the same body, under `status`) plus what a picture needs and
//! `/status` has no room for: the last minute of upstream calls and penalties
//! ([`RecentCalls`]), the calls per second actually made, the next start the gate allows,
//! the oldest wait in the queue, refusals by reason, and the cache's hit ratio. It reads
//! state the way `/status` does and takes no lock a cache hit takes. Nothing in it names a
//! person: instants, counts and outcome classes only.
//!
//! [`RecentCalls`]: crate::telemetry::recent_calls::RecentCalls

use std::sync::{Arc, LazyLock};
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use strum::VariantArray;
use tokio::time::Instant;

use super::{Status, current_status};
use crate::app::App;
use crate::lookup::cache::CacheResult;
use crate::lookup::queue::QueueRefusal;
use crate::telemetry::recent_calls::CallClass;

const HTML: &str = include_str!("status_page/index.html");
const CSS: &str = include_str!("status_page/style.css");
const JS: &str = include_str!("status_page/app.js");

/// The page as served: the HTML with its style sheet and script inlined, built once.
static PAGE: LazyLock<String> = LazyLock::new(|| {
    HTML.replacen("/*STYLE*/", CSS, 1)
        .replacen("/*SCRIPT*/", JS, 1)
});

/// How far back the timeline reaches.
const TIMELINE: Duration = Duration::from_secs(60);

/// The window the "calls per second" figure is measured over: long enough to hold ten
/// calls at the default rate, short enough to follow a penalty.
const RATE_WINDOW: Duration = Duration::from_secs(10);

/// Which listener serves the page: the links it offers differ.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Listener {
    Public,
    Admin,
}

/// Whether a request for `/` comes from a browser: it asks for HTML and not for JSON. No
/// `Accept`, `*/*` (curl) or `application/json` keep the JSON index.
pub(super) fn wants_html(headers: &HeaderMap) -> bool {
    let mut html = false;
    for value in headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
    {
        if value.contains("application/json") {
            return false;
        }
        html |= value.contains("text/html");
    }
    html
}

/// The page. Its content security policy allows nothing from elsewhere: the inlined style
/// and script, and requests to this origin (the feed).
pub(super) fn page() -> Response {
    (
        [
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/html; charset=utf-8"),
            ),
            (
                header::CONTENT_SECURITY_POLICY,
                HeaderValue::from_static(
                    "default-src 'none'; style-src 'unsafe-inline'; \
                     script-src 'unsafe-inline'; connect-src 'self'; img-src 'self' data:; \
                     base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
                ),
            ),
            (header::VARY, HeaderValue::from_static("Accept")),
            (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
        ],
        PAGE.as_str(),
    )
        .into_response()
}

/// The feed the page polls, as one JSON document.
#[derive(Serialize)]
pub(crate) struct Feed {
    /// Exactly what `/status` answers at the same moment.
    status: Status,
    budget: Budget,
    timeline: Timeline,
    upstream: Upstream,
    queue: QueueFeed,
    cache: CacheFeed,
    pacing: PacingFeed,
    links: Vec<Link>,
}

#[derive(Serialize)]
struct Budget {
    /// Calls this process started per second over the last `window_seconds`.
    calls_per_second: f64,
    window_seconds: f64,
    /// How long until the start gate allows the next call (0 if it would now): the
    /// spacing from the last start, a penalty, another replica's hold.
    next_start_in_seconds: f64,
}

#[derive(Serialize)]
struct Timeline {
    window_seconds: f64,
    /// One per upstream call that started within the window, oldest first.
    calls: Vec<Mark>,
    /// Penalties that ended within the window (or have not ended yet).
    penalties: Vec<PenaltySpan>,
}

#[derive(Serialize)]
struct Mark {
    /// How long ago the call started.
    ago_seconds: f64,
    duration_seconds: f64,
    outcome: CallClass,
    /// The upstream outcome within the class (`ok`, `penalty`, `timeout`, ...).
    detail: &'static str,
}

#[derive(Serialize)]
struct PenaltySpan {
    from_ago_seconds: f64,
    /// Negative while the penalty is still in force.
    until_ago_seconds: f64,
}

#[derive(Serialize)]
struct Upstream {
    /// Calls finished since start-up.
    calls_total: u64,
}

#[derive(Serialize)]
struct QueueFeed {
    /// How long the lookup queued longest has waited (`null` when the queue is empty).
    oldest_wait_seconds: Option<f64>,
    timeout_seconds: f64,
    /// Lookups the queue turned away or dropped unstarted since start-up, by reason.
    refusals: Refusals,
}

#[derive(Default, Serialize)]
struct Refusals {
    full: u64,
    deadline: u64,
    expired: u64,
    shutdown: u64,
    circuit_open: u64,
}

#[derive(Serialize)]
struct CacheFeed {
    hits: u64,
    misses: u64,
    coalesced: u64,
    /// Hits over every valid lookup so far (`null` before the first).
    hit_ratio: Option<f64>,
}

#[derive(Serialize)]
struct PacingFeed {
    mode: &'static str,
    /// Shared mode: how many replicas share the budget (`--expected-replicas`: the proxy
    /// leases places among that many, it does not count live ones); `null` alone.
    expected_replicas: Option<u32>,
}

#[derive(Serialize)]
struct Link {
    label: &'static str,
    href: &'static str,
}

pub(super) async fn feed(State(app): State<Arc<App>>) -> axum::Json<Feed> {
    axum::Json(build(&app, Listener::Public))
}

pub(super) async fn admin_feed(State(app): State<Arc<App>>) -> axum::Json<Feed> {
    axum::Json(build(&app, Listener::Admin))
}

fn build(app: &App, listener: Listener) -> Feed {
    let status = current_status(app);
    let now = Instant::now();
    let recent = app.dispatcher.recent.snapshot(now, TIMELINE);
    let ago = |t: Instant| signed_seconds(now, t);

    let window = RATE_WINDOW
        .min(app.started_at.elapsed())
        .max(Duration::from_secs(1));
    let in_window = recent
        .calls
        .iter()
        .filter(|c| now.saturating_duration_since(c.started) <= window)
        .count();
    let pacer = &app.pacer;
    let next_start = [
        Some(app.dispatcher.gate.earliest(now)),
        pacer.penalty_until(),
        pacer.hold_until(),
    ]
    .into_iter()
    .flatten()
    .max()
    .unwrap_or(now);

    let metrics = &app.metrics;
    let mut refusals = Refusals::default();
    for &reason in QueueRefusal::VARIANTS {
        let n = metrics.queue_refusals_so_far(reason);
        // Exhaustive: a new reason does not compile until the feed (and its schema) has it.
        *match reason {
            QueueRefusal::Full => &mut refusals.full,
            QueueRefusal::Deadline => &mut refusals.deadline,
            QueueRefusal::Expired => &mut refusals.expired,
            QueueRefusal::Shutdown => &mut refusals.shutdown,
            QueueRefusal::CircuitOpen => &mut refusals.circuit_open,
        } = n;
    }
    let (hits, misses, coalesced) = (
        metrics.cache_lookups_so_far(CacheResult::Hit),
        metrics.cache_lookups_so_far(CacheResult::Miss),
        metrics.cache_lookups_so_far(CacheResult::Coalesced),
    );
    let lookups = hits + misses + coalesced;

    Feed {
        budget: Budget {
            calls_per_second: in_window as f64 / window.as_secs_f64(),
            window_seconds: window.as_secs_f64(),
            next_start_in_seconds: next_start.saturating_duration_since(now).as_secs_f64(),
        },
        timeline: Timeline {
            window_seconds: TIMELINE.as_secs_f64(),
            calls: recent
                .calls
                .iter()
                .map(|c| Mark {
                    ago_seconds: ago(c.started),
                    duration_seconds: c.took.as_secs_f64(),
                    outcome: CallClass::of(c.outcome),
                    detail: c.outcome.as_str(),
                })
                .collect(),
            penalties: recent
                .penalties
                .iter()
                .map(|&(from, until)| PenaltySpan {
                    from_ago_seconds: ago(from),
                    until_ago_seconds: ago(until),
                })
                .collect(),
        },
        upstream: Upstream {
            calls_total: recent.total,
        },
        queue: QueueFeed {
            oldest_wait_seconds: app
                .scheduler
                .oldest_admitted()
                .map(|t| now.saturating_duration_since(t).as_secs_f64()),
            timeout_seconds: app.config.queue_timeout.as_secs_f64(),
            refusals,
        },
        cache: CacheFeed {
            hits,
            misses,
            coalesced,
            hit_ratio: (lookups > 0).then(|| hits as f64 / lookups as f64),
        },
        pacing: PacingFeed {
            mode: status.pacing_mode,
            expected_replicas: app.config.redis.as_ref().map(|r| r.expected_replicas),
        },
        links: links(app, listener),
        status,
    }
}

/// Seconds from `t` to `now`: positive in the past, negative in the future.
fn signed_seconds(now: Instant, t: Instant) -> f64 {
    if t <= now {
        (now - t).as_secs_f64()
    } else {
        -(t - now).as_secs_f64()
    }
}

/// What this listener serves besides the page, relative to it (the page may sit behind a
/// reverse proxy under a path of its own).
fn links(app: &App, listener: Listener) -> Vec<Link> {
    let metrics = Link {
        label: "Prometheus metrics",
        href: "metrics?format=prometheus",
    };
    let status = Link {
        label: "Status (JSON)",
        href: "status",
    };
    match listener {
        Listener::Admin => vec![
            Link {
                label: "Prometheus metrics",
                href: "metrics",
            },
            status,
        ],
        Listener::Public => {
            let mut links = Vec::with_capacity(3);
            if app.config.public_metrics {
                links.push(metrics);
            }
            links.push(status);
            links.push(Link {
                label: "OpenAPI description",
                href: "openapi.json",
            });
            links
        }
    }
}

#[cfg(test)]
mod tests {
    use axum::body::Body;
    use axum::http::{Request, StatusCode};
    use tower::ServiceExt;

    use super::*;

    fn app() -> Arc<App> {
        let cli = <crate::config::Cli as clap::Parser>::try_parse_from(["score-proxy"]).unwrap();
        App::new(cli.serve.validate(|_| None).expect("valid")).expect("the app builds")
    }

    async fn get(app: &Arc<App>, path: &str, accept: Option<&str>) -> Response {
        let mut request = Request::get(path);
        if let Some(accept) = accept {
            request = request.header(header::ACCEPT, accept);
        }
        crate::http::router(app.clone())
            .oneshot(request.body(Body::empty()).unwrap())
            .await
            .unwrap()
    }

    fn headers(accept: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for a in accept {
            h.append(header::ACCEPT, HeaderValue::from_str(a).unwrap());
        }
        h
    }

    #[test]
    fn only_browsers_get_html() {
        assert!(wants_html(&headers(&[
            "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"
        ])));
        assert!(!wants_html(&headers(&[])));
        assert!(!wants_html(&headers(&["*/*"])));
        assert!(!wants_html(&headers(&["application/json"])));
        assert!(!wants_html(&headers(&["text/html", "application/json"])));
    }

    #[test]
    fn the_page_is_whole_and_fetches_nothing_from_elsewhere() {
        // The SVG namespace is a name, not an address anything is fetched from.
        let page = PAGE.replace("\"http://www.w3.org/2000/svg\"", "");
        assert!(!page.contains("/*STYLE*/") && !page.contains("/*SCRIPT*/"));
        assert!(page.contains("status/feed"));
        for outside in [
            "http://", "https://", "//fonts.", "@import", "url(", "src=\"",
        ] {
            assert!(!page.contains(outside), "the page refers to {outside}");
        }
        // The weight the README states (HTML, CSS and script as served).
        assert!(PAGE.len() < 32 * 1024, "{} bytes", PAGE.len());
    }

    #[tokio::test]
    async fn a_browser_gets_the_page_and_curl_the_index() {
        let app = app();
        let page = get(&app, "/", Some("text/html,*/*;q=0.8")).await;
        assert_eq!(page.status(), StatusCode::OK);
        assert_eq!(
            page.headers()[header::CONTENT_TYPE],
            "text/html; charset=utf-8"
        );
        assert!(page.headers().contains_key(header::CONTENT_SECURITY_POLICY));
        let curl = get(&app, "/", Some("*/*")).await;
        assert_eq!(curl.headers()[header::CONTENT_TYPE], "application/json");
    }

    #[tokio::test]
    async fn the_feed_holds_status_and_the_timeline() {
        let app = app();
        let now = Instant::now();
        let recent = &app.dispatcher.recent;
        recent.call(
            now - Duration::from_secs(3),
            Duration::from_millis(20),
            crate::lookup::upstream::UpstreamOutcome::Ok,
        );
        recent.call(
            now - Duration::from_secs(2),
            Duration::from_millis(20),
            crate::lookup::upstream::UpstreamOutcome::Penalty,
        );
        recent.penalty(now - Duration::from_secs(2), now + Duration::from_secs(1));
        let response = get(&app, "/status/feed", None).await;
        assert_eq!(response.status(), StatusCode::OK);
        let body = axum::body::to_bytes(response.into_body(), 1 << 20)
            .await
            .unwrap();
        let feed: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(feed["status"]["rate_per_second"], 1.0);
        assert_eq!(feed["upstream"]["calls_total"], 2);
        let calls = feed["timeline"]["calls"].as_array().unwrap();
        assert_eq!(calls.len(), 2);
        assert_eq!(calls[0]["outcome"], "ok");
        assert_eq!(calls[1]["outcome"], "penalised");
        assert_eq!(calls[1]["detail"], "penalty");
        let penalty = &feed["timeline"]["penalties"][0];
        assert!(penalty["until_ago_seconds"].as_f64().unwrap() < 0.0);
        assert_eq!(feed["cache"]["hit_ratio"], serde_json::Value::Null);
        assert_eq!(
            feed["queue"]["oldest_wait_seconds"],
            serde_json::Value::Null
        );
        assert_eq!(feed["pacing"]["mode"], "local");
        assert_eq!(feed["links"][0]["href"], "metrics?format=prometheus");
    }
}
