//! Shared mode (Redis): each operation's outcome and round trip, fallbacks to pacing alone,
//! the shared cache tier and the flights coordinated across replicas.

use std::collections::HashMap;
use std::time::Duration;

use prometheus::{Gauge, Histogram, IntCounter, IntGauge};
use strum::VariantArray;

use super::{Families, Metrics};
use crate::shared::ops::{RedisOp, RedisOutcome};

/// A Redis round trip: sub-millisecond on a local network, a timeout well before a second.
const REDIS_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
];

pub(super) struct SharedMetrics {
    fallbacks: IntCounter,
    /// Keyed by the operation's name, which is what shared mode hands over.
    redis_ops: HashMap<(&'static str, RedisOutcome), IntCounter>,
    redis_duration: HashMap<&'static str, Histogram>,
    cache_hits: IntCounter,
    cache_misses: IntCounter,
    leaders: IntCounter,
    followers: IntCounter,
    place: IntGauge,
    places: IntGauge,
    clock_offset: Gauge,
    clock_reading_age: Gauge,
    fallback_for: Gauge,
}

/// What shared mode says of time division at a scrape (see `shared/division.rs`).
pub(crate) struct DivisionReport {
    /// This replica's place and how many there are; `None` before one was leased.
    pub(crate) place: Option<(u32, u32)>,
    /// Redis's clock minus this host's at the best reading, and that reading's age.
    pub(crate) clock: Option<(f64, Duration)>,
    /// How long the current fallback spell has lasted; `None` in shared mode.
    pub(crate) fallback_for: Option<Duration>,
}

impl SharedMetrics {
    pub(super) fn new(families: &Families) -> Self {
        let ops = families.counter_vec(
            "redis_operations_total",
            "Redis operations in shared mode, by operation and outcome.",
            &["op", "outcome"],
        );
        let durations = families.histogram_vec(
            "redis_operation_duration_seconds",
            "Redis round trips in shared mode, by operation.",
            REDIS_BUCKETS,
            &["op"],
        );
        let op_names = || {
            RedisOp::VARIANTS
                .iter()
                .map(|&op| -> &'static str { op.into() })
        };
        let cache = families.counter_vec(
            "shared_cache_lookups_total",
            "Lookups of the shared (Redis) cache tier after a local miss, by result.",
            &["result"],
        );
        let flights = families.counter_vec(
            "shared_flights_total",
            "Lookups coordinated across replicas: leader (this replica calls for all) or \
             follower (another replica's call is shared).",
            &["role"],
        );
        SharedMetrics {
            fallbacks: families.counter(
                "shared_fallbacks_total",
                "Times this replica lost Redis and fell back to pacing alone.",
            ),
            redis_ops: op_names()
                .flat_map(|op| RedisOutcome::VARIANTS.iter().map(move |&o| (op, o)))
                .map(|(op, o)| ((op, o), ops.with_label_values(&[op, o.into()])))
                .collect(),
            redis_duration: op_names()
                .map(|op| (op, durations.with_label_values(&[op])))
                .collect(),
            cache_hits: cache.with_label_values(&["hit"]),
            cache_misses: cache.with_label_values(&["miss"]),
            leaders: flights.with_label_values(&["leader"]),
            followers: flights.with_label_values(&["follower"]),
            place: families.gauge(
                "shared_place",
                "This replica's place for time division while Redis is gone (leased while it \
                 is healthy, or --replica-index); -1: none, so fallback paces at a share.",
            ),
            places: families.gauge(
                "shared_places",
                "How many places time division has (--expected-replicas).",
            ),
            clock_offset: families.float_gauge(
                "shared_clock_offset_seconds",
                "Redis's clock minus this host's, at the best recent reading: what places \
                 the fleet's schedule and the fallback grid on this replica's clock.",
            ),
            clock_reading_age: families.float_gauge(
                "shared_clock_reading_age_seconds",
                "Age of that reading: without Redis it grows, and so does the error the \
                 fallback grid allows for (100 µs per second of drift).",
            ),
            fallback_for: families.float_gauge(
                "shared_fallback_seconds",
                "How long the current fallback spell has lasted; 0 in shared mode.",
            ),
        }
    }
}

impl Metrics {
    pub(crate) fn shared_fallback(&self) {
        self.shared.fallbacks.inc();
    }

    /// Time division's state, set at each scrape.
    pub(crate) fn set_division(&self, report: &DivisionReport) {
        let shared = &self.shared;
        let (place, places) = report
            .place
            .map_or((-1, 0), |(p, n)| (i64::from(p), i64::from(n)));
        shared.place.set(place);
        shared.places.set(places);
        let (offset, age) = report.clock.unwrap_or((0.0, Duration::ZERO));
        shared.clock_offset.set(offset);
        shared.clock_reading_age.set(age.as_secs_f64());
        shared
            .fallback_for
            .set(report.fallback_for.unwrap_or_default().as_secs_f64());
    }

    pub(crate) fn redis_op(&self, op: &'static str, outcome: RedisOutcome, took: Duration) {
        if let Some(c) = self.shared.redis_ops.get(&(op, outcome)) {
            c.inc();
        }
        if outcome != RedisOutcome::Unavailable
            && let Some(h) = self.shared.redis_duration.get(op)
        {
            h.observe(took.as_secs_f64());
        }
    }

    pub(crate) fn shared_cache_lookup(&self, hit: bool) {
        let shared = &self.shared;
        if hit {
            &shared.cache_hits
        } else {
            &shared.cache_misses
        }
        .inc();
    }

    pub(crate) fn shared_flight(&self, leader: bool) {
        let shared = &self.shared;
        if leader {
            &shared.leaders
        } else {
            &shared.followers
        }
        .inc();
    }
}
