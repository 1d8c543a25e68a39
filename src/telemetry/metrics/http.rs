//! HTTP requests: how many, by route and status code; how long, by route and outcome; how
//! many are being handled.

use std::collections::HashMap;
use std::time::Duration;

use prometheus::{Histogram, HistogramVec, IntCounter, IntCounterVec, IntGauge};
use strum::VariantArray;

use super::{Families, Metrics, per_value};
use crate::http::route::Route;
use crate::lookup::cache::CacheResult;
use crate::lookup::error::ProxyError;

/// Status codes the proxy answers with, pre-registered so their series exist from the start.
const KNOWN_CODES: [u16; 15] = [
    200, 400, 401, 404, 405, 408, 413, 414, 429, 431, 499, 500, 502, 503, 504,
];

/// The code recorded for a request whose client hung up before the answer (nginx's 499).
pub(crate) const CODE_CLIENT_CLOSED: u16 = 499;

/// The `outcome` of a request to a route other than lookups, and of any request whose client
/// hung up first (a lookup's outcome is otherwise its cache result or its error's kind).
#[derive(Clone, Copy, strum::IntoStaticStr, strum::VariantArray)]
#[strum(serialize_all = "snake_case", const_into_str)]
enum RouteOutcome {
    Ok,
    Error,
    NotFound,
    ClientClosed,
}

pub(crate) const OUTCOME_OK: &str = RouteOutcome::Ok.into_str();
pub(crate) const OUTCOME_ERROR: &str = RouteOutcome::Error.into_str();
pub(crate) const OUTCOME_NOT_FOUND: &str = RouteOutcome::NotFound.into_str();
pub(crate) const OUTCOME_CLIENT_CLOSED: &str = RouteOutcome::ClientClosed.into_str();

/// Every `outcome` a route can record, pre-registered per route.
fn outcomes(route: Route) -> Vec<&'static str> {
    use RouteOutcome as O;
    let label = |o: &RouteOutcome| -> &'static str { (*o).into() };
    match route {
        Route::Score => (CacheResult::VARIANTS.iter().map(|&c| c.into()))
            .chain(ProxyError::KINDS)
            .chain(O::VARIANTS.iter().map(label))
            .collect(),
        Route::Unmatched => [O::NotFound, O::ClientClosed].iter().map(label).collect(),
        _ => [O::Ok, O::Error, O::ClientClosed]
            .iter()
            .map(label)
            .collect(),
    }
}

/// Buckets for HTTP request durations: cache hits are sub-millisecond, queued lookups take
/// tens of seconds by default and minutes under a long `--queue-timeout`.
const HTTP_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0,
    30.0, 45.0, 60.0, 120.0, 300.0,
];

pub(super) struct HttpMetrics {
    /// Indexed by route, then by the code's place in `KNOWN_CODES` (no hashing per request).
    requests: Vec<Vec<IntCounter>>,
    /// For a code outside `KNOWN_CODES`, whose series is created on first use.
    requests_vec: IntCounterVec,
    /// Indexed by route; each route's outcomes, found by comparing the static strings.
    durations: Vec<Vec<(&'static str, Histogram)>>,
    /// For an outcome a route is not expected to record.
    durations_vec: HistogramVec,
    in_flight: HashMap<Route, IntGauge>,
}

impl HttpMetrics {
    pub(super) fn new(families: &Families) -> Self {
        let requests_vec = families.counter_vec(
            "http_requests_total",
            "HTTP requests answered, by route and status code.",
            &["route", "code"],
        );
        let requests = Route::VARIANTS
            .iter()
            .map(|route| {
                KNOWN_CODES
                    .iter()
                    .map(|code| {
                        requests_vec.with_label_values(&[route.as_str(), &code.to_string()])
                    })
                    .collect()
            })
            .collect();
        let durations_vec = families.histogram_vec(
            "http_request_duration_seconds",
            "Time from request received to response produced, by route and outcome.",
            HTTP_BUCKETS,
            &["route", "outcome"],
        );
        let durations = Route::VARIANTS
            .iter()
            .map(|&route| {
                outcomes(route)
                    .into_iter()
                    .map(|o| (o, durations_vec.with_label_values(&[route.as_str(), o])))
                    .collect()
            })
            .collect();
        let in_flight = per_value(&families.gauge_vec(
            "http_requests_in_flight",
            "HTTP requests being handled, by route.",
            &["route"],
        ));
        HttpMetrics {
            requests,
            requests_vec,
            durations,
            durations_vec,
            in_flight,
        }
    }
}

impl Metrics {
    pub(crate) fn http_request(
        &self,
        route: Route,
        code: u16,
        outcome: &'static str,
        elapsed: Duration,
    ) {
        if !self.enabled {
            return;
        }
        let http = &self.http;
        let r = route as usize;
        match KNOWN_CODES.iter().position(|&c| c == code) {
            Some(i) => http.requests[r][i].inc(),
            None => http
                .requests_vec
                .with_label_values(&[route.as_str(), &code.to_string()])
                .inc(),
        }
        let secs = elapsed.as_secs_f64();
        match http.durations[r].iter().find(|(o, _)| *o == outcome) {
            Some((_, h)) => h.observe(secs),
            None => http
                .durations_vec
                .with_label_values(&[route.as_str(), outcome])
                .observe(secs),
        }
    }

    pub(crate) fn http_in_flight(&self, route: Route) -> &IntGauge {
        &self.http.in_flight[&route]
    }
}
