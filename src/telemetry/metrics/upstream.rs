//! Upstream calls: how many started (what spends the upstream's budget), how they ended (by
//! status class and outcome), how long they and their connections took, how many are under
//! way, and the retries after a penalty.

use std::collections::HashMap;
use std::time::Duration;

use prometheus::{Histogram, IntCounter, IntCounterVec, IntGauge};
use strum::VariantArray;

use super::{Families, Metrics, per_value};
use crate::lookup::upstream::UpstreamOutcome;

/// Status code class of an upstream answer (`none` when there was no answer).
pub(crate) fn status_class(status: Option<u16>) -> &'static str {
    match status {
        Some(200..=299) => "2xx",
        Some(300..=399) => "3xx",
        Some(400..=499) => "4xx",
        Some(500..=599) => "5xx",
        Some(_) => "other",
        None => "none",
    }
}

/// The status class an outcome usually comes with: its `(class, outcome)` series is
/// pre-registered so that it reads 0 rather than being absent. Any other pair (an unexpected
/// 3xx, say) is created on first use.
fn usual_class(outcome: UpstreamOutcome) -> &'static str {
    use UpstreamOutcome as O;
    match outcome {
        O::Ok | O::BadBody => "2xx",
        O::Unauthorized | O::RejectedInput | O::Penalty | O::UnexpectedStatus => "4xx",
        O::ServerError => "5xx",
        O::Timeout | O::ConnectError => "none",
    }
}

/// An upstream call: a millisecond on a local network to the 10 s default timeout and
/// beyond (a timed-out call lands in the bucket above its timeout).
const UPSTREAM_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0,
];

/// Opening a connection: DNS, TCP and TLS.
const CONNECT_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
];

pub(super) struct UpstreamMetrics {
    starts: IntCounter,
    calls: HashMap<(&'static str, UpstreamOutcome), IntCounter>,
    calls_vec: IntCounterVec,
    duration: HashMap<UpstreamOutcome, Histogram>,
    connect: Histogram,
    in_flight: IntGauge,
    retries: IntCounter,
}

impl UpstreamMetrics {
    pub(super) fn new(families: &Families) -> Self {
        let calls_vec = families.counter_vec(
            "upstream_calls_total",
            "Upstream calls ended, by status code class and outcome.",
            &["class", "outcome"],
        );
        let calls = UpstreamOutcome::VARIANTS
            .iter()
            .map(|&o| {
                let class = usual_class(o);
                (
                    (class, o),
                    calls_vec.with_label_values(&[class, o.as_str()]),
                )
            })
            .collect();
        UpstreamMetrics {
            starts: families.counter(
                "upstream_call_starts_total",
                "Upstream calls started, retries included, counted the moment each starts: \
                 the upstream's budget spent (upstream_calls_total counts them when they end).",
            ),
            calls,
            calls_vec,
            duration: per_value(&families.histogram_vec(
                "upstream_call_duration_seconds",
                "Upstream call duration, from start to the end of the body, by outcome.",
                UPSTREAM_BUCKETS,
                &["outcome"],
            )),
            connect: families.histogram(
                "upstream_connect_duration_seconds",
                "Time to open a new connection to the upstream (DNS, TCP, TLS); the call leaves \
                 that much after its start, and the next start is pushed by it.",
                CONNECT_BUCKETS,
            ),
            in_flight: families.gauge("upstream_calls_in_flight", "Upstream calls under way."),
            retries: families.counter(
                "upstream_retries_total",
                "Lookups put back in the queue to retry after an upstream penalty.",
            ),
        }
    }
}

impl Metrics {
    /// An upstream call (a first attempt or a retry) starts now.
    pub(crate) fn upstream_call_started(&self) {
        self.upstream.starts.inc();
    }

    /// A new connection to the upstream, opened in `took`.
    pub(crate) fn upstream_connect(&self, took: Duration) {
        self.upstream.connect.observe(took.as_secs_f64());
    }

    pub(crate) fn upstream_call(
        &self,
        status: Option<u16>,
        outcome: UpstreamOutcome,
        took: Duration,
    ) {
        let upstream = &self.upstream;
        let class = status_class(status);
        match upstream.calls.get(&(class, outcome)) {
            Some(c) => c.inc(),
            None => upstream
                .calls_vec
                .with_label_values(&[class, outcome.as_str()])
                .inc(),
        }
        upstream.duration[&outcome].observe(took.as_secs_f64());
    }

    pub(crate) fn upstream_in_flight(&self) -> &IntGauge {
        &self.upstream.in_flight
    }

    pub(crate) fn upstream_retry(&self) {
        self.upstream.retries.inc();
    }
}
