//! The local cache: how it resolved each lookup, the stale answers it served, how full it is,
//! and why entries left.

use std::collections::HashMap;

use prometheus::{IntCounter, IntGauge};
use strum::VariantArray;

use super::{Families, Metrics, per_value};
use crate::lookup::cache::{CacheResult, Eviction};

pub(super) struct CacheMetrics {
    /// Every `CacheResult` but `Stale`: a stale answer is what a lookup already counted as a
    /// miss (or coalesced) ended with, not a way of resolving it.
    lookups: HashMap<CacheResult, IntCounter>,
    stale_answers: IntCounter,
    entries: IntGauge,
    evictions: HashMap<Eviction, IntCounter>,
    revalidating_answers: IntCounter,
}

impl CacheMetrics {
    pub(super) fn new(families: &Families) -> Self {
        let lookups = families.counter_vec(
            "cache_lookups_total",
            "Valid lookups, each counted once, by how the cache resolved them: hit, miss \
             (started a lookup of its own, which the queue or an open breaker may still \
             refuse), coalesced (shared another lookup's call).",
            &["result"],
        );
        CacheMetrics {
            lookups: CacheResult::VARIANTS
                .iter()
                .filter(|&&r| r != CacheResult::Stale)
                .map(|&r| (r, lookups.with_label_values(&[r.as_str()])))
                .collect(),
            stale_answers: families.counter(
                "cache_stale_answers_total",
                "Expired answers served (--stale-if-error) because the upstream failed or \
                 could not be reached in time; each lookup is also counted once in \
                 cache_lookups_total.",
            ),
            entries: families.gauge("cache_entries", "Entries in the cache."),
            evictions: per_value(&families.counter_vec(
                "cache_evictions_total",
                "Entries removed from the cache, by cause.",
                &["cause"],
            )),
            revalidating_answers: families.counter(
                "cache_revalidating_answers_total",
                "Expired answers served at once (--stale-while-revalidate, X-Cache: STALE) while \
                 a background refresh fetches them again; each lookup is also counted once as \
                 a hit in cache_lookups_total.",
            ),
        }
    }
}

impl Metrics {
    /// How the cache resolved a valid lookup: once per lookup, `Hit`, `Miss` or `Coalesced`
    /// (a stale answer is [`Metrics::stale_answer`]).
    pub(crate) fn cache_lookup(&self, result: CacheResult) {
        if !self.enabled {
            return;
        }
        debug_assert!(result != CacheResult::Stale, "stale answers have a counter");
        if let Some(c) = self.cache.lookups.get(&result) {
            c.inc();
        }
    }

    /// A lookup already counted by [`Metrics::cache_lookup`] was answered with an expired entry.
    pub(crate) fn stale_answer(&self) {
        if !self.enabled {
            return;
        }
        self.cache.stale_answers.inc();
    }

    pub(crate) fn cache_evicted(&self, cause: Eviction) {
        self.cache.evictions[&cause].inc();
    }

    /// A lookup already counted as a hit was answered with an entry being revalidated.
    pub(crate) fn revalidating_answer(&self) {
        self.cache.revalidating_answers.inc();
    }

    pub(crate) fn set_cache_entries(&self, n: u64) {
        self.cache.entries.set(n as i64);
    }

    /// Lookups the cache resolved as `result` so far (the status page's hit ratio).
    pub(crate) fn cache_lookups_so_far(&self, result: CacheResult) -> u64 {
        self.cache.lookups.get(&result).map_or(0, IntCounter::get)
    }
}
