//! Shared mode (Redis): each operation's outcome and round trip, fallbacks to pacing alone,
//! the shared cache tier and the flights coordinated across replicas.

use std::collections::HashMap;
use std::time::Duration;

use prometheus::{Histogram, IntCounter};
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
        }
    }
}

impl Metrics {
    pub(crate) fn shared_fallback(&self) {
        self.shared.fallbacks.inc();
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
