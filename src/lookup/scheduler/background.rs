//! Background refreshes: upstream calls no caller waits for (stale-while-revalidate, and
//! refresh-ahead with idle budget), made only with budget no caller needs.
//!
//! A refresh asked for waits in the [`Lane`], outside the queue, most urgent first
//! (a stale answer already served before a fresh one about to expire). At most one of them
//! at a time, the lane's head, is a [`Flight`] in the queue's background band: admitted
//! behind every caller's lookup, with a start slot booked like theirs, and moved back by
//! every caller's lookup admitted after it. So a caller never waits behind a refresh that has
//! not started, only, at worst, behind the one call already under way (one interval). When
//! the head starts, the next one is admitted.
//!
//! What keeps a refresh from costing what it must not:
//! - it is not fed while the circuit breaker is open, and one queued when it opens is
//!   answered with the rest of the queue;
//! - its start slot is booked like any other, so never inside a known penalty, and a
//!   refresh that is itself penalised is not retried;
//! - a caller's lookup of the same key takes its place (and its start slot) before it
//!   starts ([`Scheduler::join`]), and joins its call once it has started;
//! - it is dropped before it becomes a flight if the entry was refreshed meanwhile.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use tokio::time::Instant;

use super::{Flight, Scheduler, State, Waiter};
use crate::lookup::breaker::BreakerState;
use crate::lookup::cache::CacheLookup;
use crate::lookup::error::ProxyError;
use crate::lookup::validation::LookupKey;
use crate::telemetry::{self, FlightOrigin};

/// At most this many refreshes wait in the lane; more are dropped (and counted).
const LANE_CAPACITY: usize = 4096;

/// Why a refresh was asked for (the `reason` label), most urgent first.
#[derive(
    Clone,
    Copy,
    Debug,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    strum::IntoStaticStr,
    strum::VariantArray,
)]
#[strum(serialize_all = "snake_case")]
pub(crate) enum Refresh {
    /// A stale answer was served (`--stale-while-revalidate`).
    Revalidate,
    /// A hot entry is about to expire (`--refresh-ahead`).
    RefreshAhead,
}

/// How a refresh ended (the `outcome` label).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, strum::IntoStaticStr, strum::VariantArray)]
#[strum(serialize_all = "snake_case")]
pub(crate) enum RefreshOutcome {
    /// The entry was fetched again (by this refresh's call, or one it joined).
    Refreshed,
    /// The call failed (a server error, a timeout, a rejected input...).
    Failed,
    /// A penalty stopped it (its own `429`, or one that outlasted its deadline): not retried.
    Penalised,
    /// A caller's lookup of the key took its place, or had already refreshed the entry.
    Superseded,
    /// Callers kept the budget busy until its deadline passed.
    Expired,
    /// The breaker opened or the proxy shut down first.
    Refused,
    /// The lane was full.
    Dropped,
}

/// A refresh asked for and not yet a flight.
struct Pending {
    key: LookupKey,
    /// When the version seen in the cache was fetched: a newer one means someone already
    /// refreshed it.
    seen: Option<std::time::Instant>,
}

/// The refreshes asked for, in order of urgency then arrival, and the one in the queue.
#[derive(Default)]
pub(super) struct Lane {
    pending: BTreeMap<(Refresh, u64), Pending>,
    keys: HashSet<LookupKey>,
    next_seq: u64,
    /// The refresh admitted to the queue's background band, until it starts.
    head: Option<Arc<Flight>>,
}

impl Lane {
    /// Refreshes waiting, the head included.
    pub(super) fn len(&self) -> usize {
        self.pending.len() + usize::from(self.head.as_ref().is_some_and(|f| !f.has_started()))
    }

    /// Whether a refresh for `why` waits (the refresh-ahead task adds one at a time).
    pub(super) fn holds(&self, why: Refresh) -> bool {
        self.pending.keys().any(|(r, _)| *r == why)
            || self
                .head
                .as_ref()
                .is_some_and(|f| !f.has_started() && f.background == Some(why))
    }

    pub(super) fn clear(&mut self) {
        self.pending.clear();
        self.keys.clear();
    }
}

/// When the cached version of an entry was fetched, if there is one.
fn fetched_at(found: &CacheLookup) -> Option<std::time::Instant> {
    match found {
        CacheLookup::Fresh(v) | CacheLookup::Revalidate(v) | CacheLookup::Stale(v) => {
            Some(v.fetched_at)
        }
        CacheLookup::Miss => None,
    }
}

impl Scheduler {
    /// Asks for a background refresh of `key`, whose cached version was fetched at `seen`.
    /// Nothing happens if one is already asked for or a lookup of the key is on its way.
    pub(crate) fn refresh_later(
        self: &Arc<Self>,
        key: &LookupKey,
        why: Refresh,
        seen: Option<std::time::Instant>,
    ) {
        {
            let mut state = self.lock();
            if state.lane.keys.contains(key) || state.flights.contains_key(key) {
                return;
            }
            if state.lane.pending.len() >= LANE_CAPACITY {
                drop(state);
                self.metrics.refresh(why, RefreshOutcome::Dropped);
                return;
            }
            let seq = state.lane.next_seq;
            state.lane.next_seq += 1;
            state.lane.keys.insert(key.clone());
            state.lane.pending.insert(
                (why, seq),
                Pending {
                    key: key.clone(),
                    seen,
                },
            );
            self.metrics.set_refreshes_waiting(state.lane.len());
        }
        self.feed_background();
    }

    /// Whether a refresh for `why` is waiting or queued.
    pub(crate) fn refresh_waiting(&self, why: Refresh) -> bool {
        self.lock().lane.holds(why)
    }

    /// Admits the next refresh to the queue's background band, unless one is there already,
    /// the breaker is not closed, or the queue is closed. Called whenever that may have
    /// changed: a refresh asked for, started or ended.
    pub(crate) fn feed_background(self: &Arc<Self>) {
        let now = Instant::now();
        let mut state = self.lock();
        if state.lane.head.as_ref().is_some_and(|f| !f.has_started()) {
            return;
        }
        state.lane.head = None;
        if state.lane.pending.is_empty()
            || state.queue.is_closed()
            || self.breaker.state() != BreakerState::Closed
        {
            self.metrics.set_refreshes_waiting(state.lane.len());
            return;
        }
        let mut superseded = Vec::new();
        let next = loop {
            let Some(((why, _), pending)) = state.lane.pending.pop_first() else {
                break None;
            };
            state.lane.keys.remove(&pending.key);
            // Someone fetched it since, or is fetching it now: nothing left to do.
            if state.flights.contains_key(&pending.key)
                || fetched_at(&self.cache.get(&pending.key)) != pending.seen
            {
                superseded.push(why);
                continue;
            }
            break Some((why, pending.key));
        };
        let Some((why, key)) = next else {
            self.metrics.set_refreshes_waiting(state.lane.len());
            drop(state);
            for why in superseded {
                self.metrics.refresh(why, RefreshOutcome::Superseded);
            }
            return;
        };
        let deadline = self.deadline_for(&state, now, None);
        let origin = refresh_origin(why);
        let flight = Arc::new(Flight::new(key.clone(), deadline, now, origin).for_background(why));
        state.flights.insert(key, flight.clone());
        state.lane.head = Some(flight.clone());
        self.metrics.set_refreshes_waiting(state.lane.len());
        let waiter = Waiter::new(self.clone(), flight.clone());
        self.admit_new(state, &flight, now);
        for why in superseded {
            self.metrics.refresh(why, RefreshOutcome::Superseded);
        }
        tokio::spawn(self.clone().follow_refresh(waiter, why));
    }

    /// Waits for a refresh's answer, counts how it ended, and feeds the next one.
    async fn follow_refresh(self: Arc<Self>, mut waiter: Waiter, why: Refresh) {
        let result = waiter.wait().await;
        let outcome = match result {
            _ if waiter.flight().was_superseded() => RefreshOutcome::Superseded,
            Ok(_) => RefreshOutcome::Refreshed,
            Err(ProxyError::UpstreamPenalty { .. }) => RefreshOutcome::Penalised,
            Err(ProxyError::DeadlineUnreachable { .. } | ProxyError::QueueFull { .. }) => {
                RefreshOutcome::Expired
            }
            Err(ProxyError::CircuitOpen { .. } | ProxyError::ShuttingDown) => {
                RefreshOutcome::Refused
            }
            Err(_) => RefreshOutcome::Failed,
        };
        tracing::debug!(
            reason = <&str>::from(why),
            outcome = <&str>::from(outcome),
            "background refresh ended"
        );
        self.metrics.refresh(why, outcome);
        drop(waiter);
        self.feed_background();
    }
}

/// A refresh's telemetry: a root span of its own, `cache.refresh`, if the sampler samples a
/// new trace; its upstream call's span goes under it, and it ends when the flight does.
fn refresh_origin(why: Refresh) -> FlightOrigin {
    let sampled = telemetry::sampled_root("cache.refresh", || {
        tracing::info_span!(
            parent: None,
            "cache.refresh",
            otel.kind = "internal",
            score_proxy.refresh.reason = <&str>::from(why),
        )
    });
    match sampled {
        Some((span, ids)) => FlightOrigin::new(span, ids),
        None => FlightOrigin::new(tracing::Span::none(), telemetry::fresh_ids()),
    }
}

impl State {
    /// A caller's lookup of `key` arrived while a background refresh of it waits in the
    /// queue: the refresh leaves (its start slot stays, as a spare the caller's flight
    /// takes) and is returned, to be told it was superseded. `None` if there is no such
    /// refresh (none, or one already started, whose call the caller joins). The caller
    /// unregisters it.
    pub(super) fn unseat_refresh(&mut self, key: &LookupKey) -> Option<Arc<Flight>> {
        let flight = self.flights.get(key)?;
        if !flight.is_background_only() {
            return None;
        }
        let job = flight.job()?;
        let flight = self.queue.remove(job)?;
        flight.clear_job();
        Some(flight)
    }
}
