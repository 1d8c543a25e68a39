//! The persistent cache tier: what it loaded at start, how big it is, what it wrote, what it
//! dropped or failed to do, and the files it moved aside.

use std::collections::HashMap;

use prometheus::{IntCounter, IntGauge};

use super::{Families, Metrics, per_pair, per_value};
use crate::store::{AsideReason, LoadResult, StoreErrorKind, StoreOp};

pub(super) struct StoreMetrics {
    enabled: IntGauge,
    load: HashMap<LoadResult, IntCounter>,
    writes: IntCounter,
    dropped: IntCounter,
    errors: HashMap<(StoreOp, StoreErrorKind), IntCounter>,
    moved_aside: HashMap<AsideReason, IntCounter>,
    size: IntGauge,
    rows: IntGauge,
}

impl StoreMetrics {
    pub(super) fn new(families: &Families) -> Self {
        StoreMetrics {
            enabled: families.gauge(
                "store_enabled",
                "1 when answers are kept in the persistent store (--data-dir), 0 when the proxy \
                 runs with its memory cache only (off, or the store could not be used).",
            ),
            load: per_value(&families.counter_vec(
                "store_load_entries_total",
                "Records read from the persistent store at start, by result: loaded into the \
                 memory cache, expired (past TTL and stale window), over_limit (beyond \
                 --cache-max-entries; the oldest), undecryptable (skipped).",
                &["result"],
            )),
            writes: families.counter(
                "store_writes_total",
                "Answers committed to the persistent store (counted once on disk).",
            ),
            dropped: families.counter(
                "store_dropped_total",
                "Answers not written to the persistent store because its writer's queue was \
                 full or the writer had stopped (the memory cache still has them).",
            ),
            errors: per_pair(&families.counter_vec(
                "store_errors_total",
                "Persistent store operations that failed, by operation and kind.",
                &["op", "kind"],
            )),
            moved_aside: per_value(&families.counter_vec(
                "store_moved_aside_total",
                "Store files moved aside at start because they could not be used (corrupt, \
                 written under another data key, or by another schema version); the proxy \
                 started with an empty cache.",
                &["reason"],
            )),
            size: families.gauge("store_size_bytes", "Size of the persistent store's file."),
            rows: families.gauge("store_rows", "Records in the persistent store."),
        }
    }
}

impl Metrics {
    pub(crate) fn store_enabled(&self, on: bool) {
        self.store.enabled.set(i64::from(on));
    }

    pub(crate) fn store_load(&self, result: LoadResult, n: u64) {
        self.store.load[&result].inc_by(n);
    }

    pub(crate) fn store_written(&self, n: u64) {
        self.store.writes.inc_by(n);
    }

    pub(crate) fn store_dropped(&self) {
        self.store.dropped.inc();
    }

    pub(crate) fn store_error(&self, op: StoreOp, kind: StoreErrorKind) {
        self.store.errors[&(op, kind)].inc();
    }

    pub(crate) fn store_moved_aside(&self, reason: AsideReason) {
        self.store.moved_aside[&reason].inc();
    }

    pub(crate) fn store_size(&self, bytes: u64, rows: u64) {
        self.store.size.set(bytes as i64);
        self.store.rows.set(rows as i64);
    }
}
