//! Background lookups: upstream calls no caller waits for (stale-while-revalidate's and
//! refresh-ahead's refreshes, and the items of bulk jobs), made only with budget no caller
//! needs.
//!
//! A background lookup asked for waits in the [`Lane`], outside the queue, most urgent first
//! (a stale answer already served, then a hot entry about to expire, then a job's item;
//! `jobs` keeps one item of its own waiting at a time, fair across client ids). At most one of them
//! at a time, the lane's head, is a [`Flight`] in the queue's background band: admitted
//! behind every caller's lookup, with a start slot booked like theirs, and moved back by
//! every caller's lookup admitted after it. So a caller never waits behind a refresh that has
//! not started, only, at worst, behind the one call already under way (one interval). When
//! the head starts, the next one is admitted.
//!
//! What keeps a refresh from costing what it must not:
//! - it is not fed while the circuit breaker is open (the lane is fed again when the breaker
//!   may half-open), and one queued when it opens is answered with the rest of the queue;
//! - its start slot is booked like any other, so never inside a known penalty, and a
//!   refresh that is itself penalised is not retried;
//! - a caller's lookup of the same key takes its place (and its start slot) before it
//!   starts ([`Scheduler::join`]), and joins its call once it has started;
//! - it is dropped before it becomes a flight if the entry was refreshed meanwhile.
//!
//! Each is a trace of its own: a refresh's root span is `cache.refresh`, a job item's is
//! `job.item` (linked to its job's submission, made when the runner asks for it); either is
//! its flight's origin, so the call's spans go under it. A job item's answer says whether
//! the cache gave it when its turn came ([`JobAnswer`]): no call was made for it.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use tokio::sync::oneshot;
use tokio::time::Instant;

use super::{Flight, FlightResult, Scheduler, Source, State, Waiter};
use crate::lookup::breaker::BreakerState;
use crate::lookup::cache::CacheLookup;
use crate::lookup::error::ProxyError;
use crate::lookup::validation::LookupKey;
use crate::telemetry::{self, FlightOrigin, JobItemInfo, SubmissionLink, TraceIds};

/// At most this many refreshes wait in the lane; more are dropped (and counted).
const LANE_CAPACITY: usize = 4096;

/// Why a background lookup was asked for (the `reason` label), most urgent first.
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
pub(crate) enum BackgroundReason {
    /// A stale answer was served (`--stale-while-revalidate`).
    Revalidate,
    /// A hot entry is about to expire (`--refresh-ahead`). Before a job's items: a job
    /// keeps an item waiting for as long as it runs (hours, for a large one), and callers of
    /// a hot key would miss at every TTL meanwhile; refresh-ahead asks for a few keys, each
    /// once per TTL.
    RefreshAhead,
    /// An item of a bulk job (`POST /jobs`).
    Job,
}

/// How a background lookup ended (the `outcome` label).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, strum::IntoStaticStr, strum::VariantArray)]
#[strum(serialize_all = "snake_case")]
pub(crate) enum BackgroundOutcome {
    /// The entry was fetched (by this lookup's call, or one it joined).
    Fetched,
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

/// A background lookup asked for and not yet a flight.
struct Pending {
    key: LookupKey,
    /// A refresh: when the version seen in the cache was fetched (a newer one means someone
    /// already refreshed it).
    seen: Option<std::time::Instant>,
    /// A job's item: where its answer goes (from the cache, a call it joins, or its own).
    item: Option<ItemCall>,
}

/// A job item the runner asks for: its key, and what its span says of it.
pub(crate) struct JobItem {
    pub(crate) key: LookupKey,
    /// The job's id (random, not personal), for the span.
    pub(crate) job_id: String,
    pub(crate) index: usize,
    /// The span of the request that submitted the job, which the item's span links to.
    pub(crate) link: Option<SubmissionLink>,
}

/// A job item's answer: the lookup's result, and whether the cache gave it when its turn
/// came (no call was made for it, and none joined).
#[derive(Debug)]
pub(crate) struct JobAnswer {
    pub(crate) result: FlightResult,
    pub(crate) from_cache: bool,
}

/// Where a job item's answer goes.
pub(crate) type Delivery = oneshot::Sender<JobAnswer>;

/// A job item in the lane: where its answer goes, and its span (`job.item`), which is the
/// origin of its own call's spans and ends once the answer is handed on.
struct ItemCall {
    deliver: Delivery,
    span: tracing::Span,
    ids: TraceIds,
}

impl ItemCall {
    /// Hands the answer on, with how it ended on the span (`ok` for a success, the error's
    /// kind otherwise).
    fn finish(self, result: FlightResult, from_cache: bool, ok: &'static str) {
        match &result {
            Ok(_) => telemetry::record_job_item(&self.span, ok, false),
            Err(e) => telemetry::record_job_item(&self.span, e.kind(), true),
        }
        let _ = self.deliver.send(JobAnswer { result, from_cache });
    }

    fn cancelled(&self) {
        telemetry::record_job_item(&self.span, "cancelled", false);
    }
}

/// The refreshes asked for, in order of urgency then arrival, and the one in the queue.
#[derive(Default)]
pub(super) struct Lane {
    pending: BTreeMap<(BackgroundReason, u64), Pending>,
    keys: HashSet<LookupKey>,
    next_seq: u64,
    /// The refresh admitted to the queue's background band, until it starts.
    head: Option<Arc<Flight>>,
    /// A task will feed the lane when the open breaker may half-open.
    wake_planned: bool,
}

impl Lane {
    /// Refreshes waiting, the head included.
    pub(super) fn len(&self) -> usize {
        self.pending.len() + usize::from(self.head.as_ref().is_some_and(|f| !f.has_started()))
    }

    /// Whether a refresh for `why` waits (the refresh-ahead task adds one at a time).
    pub(super) fn holds(&self, why: BackgroundReason) -> bool {
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

    fn push(&mut self, why: BackgroundReason, pending: Pending) {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.pending.insert((why, seq), pending);
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
        why: BackgroundReason,
        seen: Option<std::time::Instant>,
    ) {
        {
            let mut state = self.lock();
            if state.lane.keys.contains(key) || state.flights.contains_key(key) {
                return;
            }
            if state.lane.pending.len() >= LANE_CAPACITY {
                drop(state);
                self.metrics.refresh(why, BackgroundOutcome::Dropped);
                return;
            }
            state.lane.keys.insert(key.clone());
            state.lane.push(
                why,
                Pending {
                    key: key.clone(),
                    seen,
                    item: None,
                },
            );
            self.metrics.set_refreshes_waiting(state.lane.len());
        }
        self.feed_background();
    }

    /// Asks for a job item's lookup, answered through `deliver`: at once from the
    /// cache if it is fresh when its turn comes, by joining a lookup of the key already on
    /// its way, or by a call of its own in the background band. Errors are delivered too
    /// (the job decides what to retry); if the proxy closes first, `deliver` is dropped.
    /// The item's span starts here: it covers the wait in the lane and the queue too.
    pub(crate) fn job_lookup(self: &Arc<Self>, item: &JobItem, deliver: Delivery) {
        let (span, ids) = telemetry::job_item_span(&JobItemInfo {
            job_id: &item.job_id,
            index: item.index,
            client: &item.key.client_id,
            link: item.link,
        });
        let call = ItemCall { deliver, span, ids };
        self.push_job(item.key.clone(), call);
    }

    /// Puts a job item in the lane (asked for, or back after a caller's lookup took its place).
    fn push_job(self: &Arc<Self>, key: LookupKey, call: ItemCall) {
        {
            let mut state = self.lock();
            let pending = Pending {
                key,
                seen: None,
                item: Some(call),
            };
            state.lane.push(BackgroundReason::Job, pending);
            self.metrics.set_refreshes_waiting(state.lane.len());
        }
        self.feed_background();
    }

    /// Whether a job's item waits in the lane (not yet in the queue).
    pub(crate) fn job_waiting(&self) -> bool {
        self.lock()
            .lane
            .pending
            .keys()
            .any(|(why, _)| *why == BackgroundReason::Job)
    }

    /// How many lookups would start before a job item asked for now: callers' lookups
    /// waiting in the queue, the background lookup admitted to the queue and not started,
    /// and those waiting in the lane ahead of a job item (stale-while-revalidate's, and job
    /// items asked for earlier; refresh-ahead's come after it).
    pub(crate) fn lookups_before_job_item(&self) -> usize {
        let state = self.lock();
        let lane = &state.lane;
        let in_lane = lane
            .pending
            .range(..(BackgroundReason::RefreshAhead, 0))
            .count();
        let head = lane.head.as_ref().is_some_and(|f| !f.has_started());
        state.queue.interactive_len() + in_lane + usize::from(head)
    }

    /// The spacing between upstream calls now (for a job's estimate).
    pub(crate) fn interval(&self) -> std::time::Duration {
        self.pacer.interval()
    }

    /// Resolves when a background lookup leaves the lane for the queue or is answered (the
    /// job runner then queues its next item).
    pub(crate) fn lane_moved(&self) -> tokio::sync::futures::Notified<'_> {
        self.lane_moved.notified()
    }

    /// Whether a refresh for `why` is waiting or queued.
    pub(crate) fn refresh_waiting(&self, why: BackgroundReason) -> bool {
        self.lock().lane.holds(why)
    }

    /// Admits the next background lookup to the queue's background band, unless one is there
    /// already, the breaker is open, or the queue is closed. Called whenever that may have
    /// changed: a lookup asked for, started or ended, or an open breaker's cool-down over.
    pub(crate) fn feed_background(self: &Arc<Self>) {
        let now = Instant::now();
        let mut state = self.lock();
        // The head holds the band until it starts; one that left unstarted (its job was
        // cancelled while it booked, or it expired) no longer does.
        let head_waits = state.lane.head.as_ref().is_some_and(|f| {
            !f.has_started() && state.flights.get(&f.key).is_some_and(|g| Arc::ptr_eq(g, f))
        });
        if head_waits {
            return;
        }
        state.lane.head = None;
        if state.lane.pending.is_empty() || state.queue.is_closed() {
            self.metrics.set_refreshes_waiting(state.lane.len());
            return;
        }
        // Nothing is fed while the breaker is open; the lane is fed again when it may
        // half-open (a background lookup may then be the probe, as a lookup may).
        if self.breaker.state() == BreakerState::Open {
            if let Some(until) = self.breaker.open_until()
                && !state.lane.wake_planned
            {
                state.lane.wake_planned = true;
                let scheduler = self.clone();
                tokio::spawn(async move {
                    tokio::time::sleep_until(until).await;
                    scheduler.lock().lane.wake_planned = false;
                    scheduler.feed_background();
                });
            }
            self.metrics.set_refreshes_waiting(state.lane.len());
            return;
        }
        let mut superseded = Vec::new();
        let mut joined = Vec::new();
        let next = loop {
            let Some(((why, _), pending)) = state.lane.pending.pop_first() else {
                break None;
            };
            let Some(call) = pending.item else {
                state.lane.keys.remove(&pending.key);
                // Someone fetched it since, or is fetching it now: nothing left to do.
                if state.flights.contains_key(&pending.key)
                    || fetched_at(&self.cache.get(&pending.key)) != pending.seen
                {
                    superseded.push(why);
                    continue;
                }
                break Some((why, pending.key, None));
            };
            // A job's item: gone if its job was cancelled; else a fresh answer, or a lookup
            // already on its way, serves it.
            if call.deliver.is_closed() {
                call.cancelled();
                continue;
            }
            // Fetched since it was asked for (by a caller's lookup, say): no call for it.
            if let CacheLookup::Fresh(hit) = self.cache.get(&pending.key) {
                call.finish(Ok(hit), true, "from_cache");
                continue;
            }
            if let Some(flight) = state.flights.get(&pending.key) {
                flight.add_waiter();
                joined.push((Waiter::new(self.clone(), flight.clone()), call));
                continue;
            }
            break Some((why, pending.key, Some(call)));
        };
        for (mut waiter, call) in joined {
            tokio::spawn(async move {
                let result = waiter.wait().await;
                telemetry::link_item_to_call(&call.span, &waiter.flight().origin);
                call.finish(result, false, "coalesced");
            });
        }
        self.lane_moved.notify_waiters();
        let Some((why, key, item)) = next else {
            self.metrics.set_refreshes_waiting(state.lane.len());
            drop(state);
            for why in superseded {
                self.metrics.refresh(why, BackgroundOutcome::Superseded);
            }
            return;
        };
        let deadline = self.deadline_for(&state, now, None);
        // A job item's own call: its span is the flight's origin (the call's spans go under
        // it); a refresh gets a root span of its own.
        let origin = match &item {
            Some(call) => FlightOrigin::new(call.span.clone(), call.ids),
            None => refresh_origin(why),
        };
        let flight = Arc::new(Flight::new(key.clone(), deadline, now, origin).for_background(why));
        state.flights.insert(key, flight.clone());
        state.lane.head = Some(flight.clone());
        self.metrics.set_refreshes_waiting(state.lane.len());
        let waiter = Waiter::new(self.clone(), flight.clone());
        self.admit_new(state, &flight, now);
        for why in superseded {
            self.metrics.refresh(why, BackgroundOutcome::Superseded);
        }
        tokio::spawn(self.clone().follow_refresh(waiter, why, item));
    }

    /// Waits for a background lookup's answer, counts how it ended, hands a job item's
    /// answer on, and feeds the next one. A job item a caller's lookup superseded goes back
    /// to the lane, where it joins that lookup.
    async fn follow_refresh(
        self: Arc<Self>,
        mut waiter: Waiter,
        why: BackgroundReason,
        mut item: Option<ItemCall>,
    ) {
        // A job's item whose job was cancelled stops waiting: if its call has not started,
        // the flight leaves the queue with its last waiter and is never made.
        let result = match &mut item {
            Some(call) => tokio::select! {
                result = waiter.wait() => Some(result),
                () = call.deliver.closed() => None,
            },
            None => Some(waiter.wait().await),
        };
        let Some(result) = result else {
            if let Some(call) = &item {
                call.cancelled();
            }
            drop(waiter);
            self.metrics.refresh(why, BackgroundOutcome::Refused);
            self.lane_moved.notify_waiters();
            self.feed_background();
            return;
        };
        let superseded = waiter.flight().was_superseded();
        let outcome = match &result {
            _ if superseded => BackgroundOutcome::Superseded,
            Ok(_) => BackgroundOutcome::Fetched,
            Err(ProxyError::UpstreamPenalty { .. }) => BackgroundOutcome::Penalised,
            Err(ProxyError::DeadlineUnreachable { .. } | ProxyError::QueueFull { .. }) => {
                BackgroundOutcome::Expired
            }
            Err(ProxyError::CircuitOpen { .. } | ProxyError::ShuttingDown) => {
                BackgroundOutcome::Refused
            }
            Err(_) => BackgroundOutcome::Failed,
        };
        tracing::debug!(
            reason = <&str>::from(why),
            outcome = <&str>::from(outcome),
            "background refresh ended"
        );
        self.metrics.refresh(why, outcome);
        let key = waiter.flight().key.clone();
        // Shared mode: another replica's answer, from the shared cache or its own call.
        let source = waiter.flight().info().source;
        drop(waiter);
        match item {
            Some(call) if superseded => self.push_job(key, call),
            Some(call) => match source {
                Source::Upstream => call.finish(result, false, "fetched"),
                Source::SharedCache => call.finish(result, true, "from_cache"),
                Source::Replica => call.finish(result, false, "coalesced"),
            },
            None => {}
        }
        self.lane_moved.notify_waiters();
        self.feed_background();
    }
}

/// A refresh's telemetry: a root span of its own, `cache.refresh`, if the sampler samples a
/// new trace; its upstream call's span goes under it, and it ends when the flight does.
fn refresh_origin(why: BackgroundReason) -> FlightOrigin {
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
