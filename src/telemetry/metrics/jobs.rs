//! Bulk jobs: how many are in each state, and their items by outcome. The budget they spend
//! is `background_lookups_total{reason="job"}`.

use prometheus::{IntCounter, IntGauge};

use super::{Families, Metrics};

pub(super) struct JobMetrics {
    /// Queued, running, done, cancelled (`JobState`'s order).
    by_state: [IntGauge; 4],
    items_ok: IntCounter,
    items_failed: IntCounter,
}

impl JobMetrics {
    pub(super) fn new(families: &Families) -> Self {
        let states = families.gauge_vec(
            "jobs",
            "Bulk jobs held (within their retention), by state: queued, running, done, \
             cancelled.",
            &["state"],
        );
        let items = families.counter_vec(
            "job_items_total",
            "Bulk job items answered, by result: ok (a score), failed (the line holds the \
             error; invalid CPFs are counted at submission, not here).",
            &["result"],
        );
        JobMetrics {
            by_state: ["queued", "running", "done", "cancelled"]
                .map(|s| states.with_label_values(&[s])),
            items_ok: items.with_label_values(&["ok"]),
            items_failed: items.with_label_values(&["failed"]),
        }
    }
}

impl Metrics {
    /// `n` items answered by an upstream call (or a call they joined).
    pub(crate) fn job_items(&self, ok: bool, n: u64) {
        if ok {
            self.jobs.items_ok.inc_by(n);
        } else {
            self.jobs.items_failed.inc_by(n);
        }
    }

    pub(crate) fn set_jobs(&self, by_state: [usize; 4]) {
        for (gauge, n) in self.jobs.by_state.iter().zip(by_state) {
            gauge.set(n as i64);
        }
    }
}
