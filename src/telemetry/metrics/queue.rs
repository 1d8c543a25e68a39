//! The queue where lookups wait for upstream budget: its depth and capacity, who got in, how
//! long they waited, and who was turned away or gave up.

use std::collections::HashMap;
use std::time::Duration;

use prometheus::{Histogram, IntCounter, IntGauge};

use super::{Families, Metrics, MetricsConfig, per_value};
use crate::lookup::queue::QueueRefusal;

/// Waits for a start: a queue position costs about one second at the default rate, and
/// `--queue-timeout` may be up to an hour, so the buckets run from 10 ms to ten minutes. Fixed,
/// not derived from the timeout: replicas and deploys with different settings still add up
/// (the timeout itself is the `queue_timeout_seconds` gauge).
pub(super) const WAIT_BUCKETS: &[f64] = &[
    0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0, 20.0, 30.0, 45.0, 60.0, 90.0,
    120.0, 180.0, 240.0, 300.0, 600.0,
];

pub(super) struct QueueMetrics {
    depth: IntGauge,
    admissions: IntCounter,
    wait: Histogram,
    refusals: HashMap<QueueRefusal, IntCounter>,
    abandoned: IntCounter,
}

impl QueueMetrics {
    pub(super) fn new(families: &Families, config: &MetricsConfig) -> Self {
        let capacity = families.gauge(
            "queue_capacity",
            "Most distinct lookups that may wait (queue-capacity).",
        );
        capacity.set(config.queue_capacity as i64);
        families
            .float_gauge(
                "queue_timeout_seconds",
                "Longest a lookup may wait for its upstream call to start (queue-timeout).",
            )
            .set(config.queue_timeout.as_secs_f64());
        QueueMetrics {
            depth: families.gauge(
                "queue_depth",
                "Distinct lookups waiting for upstream budget.",
            ),
            admissions: families.counter(
                "queue_admissions_total",
                "Lookups let into the queue (each later starts, is abandoned, or expires).",
            ),
            wait: families.histogram(
                "queue_wait_seconds",
                "Time a lookup waited in the queue before its upstream call started.",
                WAIT_BUCKETS,
            ),
            refusals: per_value(&families.counter_vec(
                "queue_refusals_total",
                "Lookups the queue turned away or dropped unstarted, by reason.",
                &["reason"],
            )),
            abandoned: families.counter(
                "queue_abandoned_total",
                "Queued lookups removed because every client waiting for them hung up; \
                 none of them cost an upstream call.",
            ),
        }
    }
}

impl Metrics {
    pub(crate) fn set_queue_depth(&self, depth: usize) {
        self.queue.depth.set(depth as i64);
    }

    pub(crate) fn queue_admitted(&self) {
        self.queue.admissions.inc();
    }

    pub(crate) fn queue_wait(&self, waited: Duration) {
        self.queue.wait.observe(waited.as_secs_f64());
    }

    pub(crate) fn queue_refused(&self, reason: QueueRefusal) {
        self.queue.refusals[&reason].inc();
    }

    pub(crate) fn queue_abandoned(&self) {
        self.queue.abandoned.inc();
    }

    /// Lookups refused for `reason` so far (the status page's refusals).
    pub(crate) fn queue_refusals_so_far(&self, reason: QueueRefusal) -> u64 {
        self.queue.refusals[&reason].get()
    }
}
