//! The pacer: the configured rate, the guard in force and why, how long the schedule makes
//! lookups wait, the upstream's penalties, start slots that went unused, and how this
//! replica paces (alone, shared or fallen back).

use std::collections::HashMap;
use std::time::Duration;

use prometheus::{Counter, Gauge, Histogram, IntCounter, IntGauge};
use strum::VariantArray;

use super::{Families, Metrics, MetricsConfig, per_value, queue};
use crate::lookup::pacing::{GuardReason, PacingMode, SlotUnused};

/// Booking a slot: a mutex locally, a Redis round trip in shared mode.
const BOOK_BUCKETS: &[f64] = &[
    0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
];

pub(super) struct PacingMetrics {
    permit_wait: Histogram,
    penalties: IntCounter,
    penalty_seconds: Counter,
    penalty_active: IntGauge,
    unused_slots: HashMap<SlotUnused, IntCounter>,
    book_duration: Histogram,
    /// One series per mode, 1 for the mode in force.
    mode: HashMap<PacingMode, IntGauge>,
    guard: Gauge,
    guard_max: Gauge,
    /// One series per reason, 1 for the reason in force.
    guard_reason: HashMap<GuardReason, IntGauge>,
}

impl PacingMetrics {
    pub(super) fn new(families: &Families, config: &MetricsConfig) -> Self {
        families
            .float_gauge(
                "pacing_rate_per_second",
                "Configured upstream call rate (the limit the upstream enforces).",
            )
            .set(config.rate_per_second);
        families
            .float_gauge(
                "pacing_interval_seconds",
                "Minimum spacing between upstream call starts (1/rate + guard).",
            )
            .set(config.interval.as_secs_f64());
        families
            .gauge(
                "expected_replicas",
                "Replicas expected to share the upstream's budget (--expected-replicas in \
                 shared mode, 1 alone); in fallback each paces at rate / expected_replicas.",
            )
            .set(i64::from(config.expected_replicas));
        PacingMetrics {
            permit_wait: families.histogram(
                "pacing_permit_wait_seconds",
                "How long the pacer's schedule makes an admitted lookup wait for its start \
                 (predicted at admission): the wait the upstream's rate imposes.",
                queue::WAIT_BUCKETS,
            ),
            penalties: families.counter(
                "pacing_penalties_total",
                "429 penalties received from the upstream (should stay at zero).",
            ),
            penalty_seconds: families.float_counter(
                "pacing_penalty_pause_seconds_total",
                "Time upstream calls were paused for penalties.",
            ),
            penalty_active: families.gauge(
                "pacing_penalty_active",
                "1 while upstream calls are paused for a penalty.",
            ),
            unused_slots: per_value(&families.counter_vec(
                "pacing_unused_slots_total",
                "Booked start slots that passed without a call, by reason: no_lookup \
                 (every waiting client left), breaker, saturated (max in-flight calls \
                 open), gate, late (reached too late to use safely), penalty (a 429 came \
                 while it waited to start), held (another replica's call left late, too \
                 close before it).",
                &["reason"],
            )),
            book_duration: families.histogram(
                "pacing_book_duration_seconds",
                "Time to book a start slot with the pacer (a Redis round trip in shared mode).",
                BOOK_BUCKETS,
            ),
            guard: families.float_gauge(
                "pacing_guard_seconds",
                "The guard in force: added to 1/rate between call starts, learned between \
                 --rate-guard and --rate-guard-max from the spread of the upstream's round \
                 trips and from penalties.",
            ),
            guard_max: families.float_gauge(
                "pacing_guard_max_seconds",
                "The guard's ceiling (--rate-guard-max); a guard that sits there means a \
                 network worse than the ceiling allows for.",
            ),
            guard_reason: {
                let family = families.gauge_vec(
                    "pacing_guard_reason",
                    "Why the guard is what it is, 1 for the reason in force: floor (nothing \
                     calls for more than --rate-guard), rtt_spread (the floor plus the spread \
                     of recent round trips), penalty (raised after a 429, decaying).",
                    &["reason"],
                );
                GuardReason::VARIANTS
                    .iter()
                    .map(|&r| (r, family.with_label_values(&[r.as_str()])))
                    .collect()
            },
            mode: per_value(&families.gauge_vec(
                "pacing_mode",
                "How this replica paces, 1 for the mode in force: local (no Redis \
                 configured), shared (one schedule in Redis), fallback (Redis out of reach: \
                 a local share of the rate).",
                &["mode"],
            )),
        }
    }
}

impl Metrics {
    pub(crate) fn permit_wait(&self, waited: Duration) {
        self.pacing.permit_wait.observe(waited.as_secs_f64());
    }

    pub(crate) fn penalty_received(&self) {
        self.pacing.penalties.inc();
    }

    pub(crate) fn penalty_paused(&self, paused: Duration) {
        self.pacing.penalty_seconds.inc_by(paused.as_secs_f64());
    }

    pub(crate) fn set_penalty_active(&self, active: bool) {
        self.pacing.penalty_active.set(i64::from(active));
    }

    pub(crate) fn unused_slot(&self, why: SlotUnused) {
        self.pacing.unused_slots[&why].inc();
    }

    pub(crate) fn pacing_booked(&self, took: Duration) {
        self.pacing.book_duration.observe(took.as_secs_f64());
    }

    /// The guard in force and why; the ceiling, which only changes at start-up.
    pub(crate) fn set_pacing_guard(&self, guard: Duration, reason: GuardReason, ceiling: Duration) {
        let pacing = &self.pacing;
        pacing.guard.set(guard.as_secs_f64());
        pacing.guard_max.set(ceiling.as_secs_f64());
        for (&r, gauge) in &pacing.guard_reason {
            gauge.set(i64::from(r == reason));
        }
    }

    /// The mode in force: its series reads 1, the others 0. Called on every change, and by
    /// the `/metrics` handler before rendering.
    pub(crate) fn set_pacing_mode(&self, mode: PacingMode) {
        for (&m, gauge) in &self.pacing.mode {
            gauge.set(i64::from(m == mode));
        }
    }
}
