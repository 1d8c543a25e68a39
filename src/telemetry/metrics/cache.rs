//! The local cache: how it resolved each lookup, how full it is, and why entries left.

use std::collections::HashMap;

use prometheus::{IntCounter, IntGauge};

use super::{Families, Metrics, per_value};
use crate::lookup::cache::{CacheResult, Eviction};

pub(super) struct CacheMetrics {
    lookups: HashMap<CacheResult, IntCounter>,
    entries: IntGauge,
    evictions: HashMap<Eviction, IntCounter>,
}

impl CacheMetrics {
    pub(super) fn new(families: &Families) -> Self {
        CacheMetrics {
            lookups: per_value(&families.counter_vec(
                "cache_lookups_total",
                "Valid lookups by how the cache resolved them: hit, miss (led an upstream \
                 call), coalesced (shared another lookup's call), stale (served expired on error).",
                &["result"],
            )),
            entries: families.gauge("cache_entries", "Entries in the cache."),
            evictions: per_value(&families.counter_vec(
                "cache_evictions_total",
                "Entries removed from the cache, by cause.",
                &["cause"],
            )),
        }
    }
}

impl Metrics {
    pub(crate) fn cache_lookup(&self, result: CacheResult) {
        if !self.enabled {
            return;
        }
        self.cache.lookups[&result].inc();
    }

    pub(crate) fn cache_evicted(&self, cause: Eviction) {
        self.cache.evictions[&cause].inc();
    }

    pub(crate) fn set_cache_entries(&self, n: u64) {
        self.cache.entries.set(n as i64);
    }
}
