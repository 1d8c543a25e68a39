//! Bulk jobs: how many are in each state, their items by outcome, and how far the oldest open
//! job is from its next call. The budget they spend is
//! `background_lookups_total{reason="job"}`.

use std::sync::atomic::{AtomicU64, Ordering};

use prometheus::{Gauge, IntCounter, IntGauge};

use super::{Families, Metrics};

pub(super) struct JobMetrics {
    /// Queued, running, done, cancelled (`JobState`'s order).
    by_state: [IntGauge; 4],
    items_ok: IntCounter,
    items_failed: IntCounter,
    oldest_position: IntGauge,
    oldest_age: Gauge,
    /// When the oldest open job was submitted (Unix ms; 0 when there is none): its age is
    /// computed at scrape time, so that it grows even while the runner does not move.
    oldest_created_ms: AtomicU64,
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
        let oldest_position = families.gauge(
            "job_oldest_position",
            "How many lookups start before the next item of the oldest open bulk job: \
             callers' lookups waiting in the queue, background lookups queued or waiting \
             ahead of it in the lane, and one item for each other client id whose job the \
             round-robin serves first. 0 when no job has an item left to ask for. Updated \
             when the job runner moves (an item asked for or answered, a job submitted or \
             cancelled), not at scrape time.",
        );
        let oldest_age = families.float_gauge(
            "job_oldest_age_seconds",
            "Seconds since the oldest open (queued or running) bulk job was submitted, at \
             scrape time; 0 when no job is open.",
        );
        JobMetrics {
            oldest_position,
            oldest_age,
            oldest_created_ms: AtomicU64::new(0),
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

    /// The oldest open job: when it was submitted (`None`: no job is open) and how many
    /// lookups start before its next item.
    pub(crate) fn set_job_oldest(&self, created_ms: Option<u64>, position: usize) {
        self.jobs
            .oldest_created_ms
            .store(created_ms.unwrap_or(0), Ordering::Relaxed);
        self.jobs.oldest_position.set(position as i64);
        self.refresh_job_age();
    }

    /// Sets the oldest job's age from the clock (just before a scrape renders).
    pub(super) fn refresh_job_age(&self) {
        let created = self.jobs.oldest_created_ms.load(Ordering::Relaxed);
        let age = if created == 0 {
            0.0
        } else {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64);
            now.saturating_sub(created) as f64 / 1000.0
        };
        self.jobs.oldest_age.set(age);
    }

    pub(crate) fn set_jobs(&self, by_state: [usize; 4]) {
        for (gauge, n) in self.jobs.by_state.iter().zip(by_state) {
            gauge.set(n as i64);
        }
    }
}
