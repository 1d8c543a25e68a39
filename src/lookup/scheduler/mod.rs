//! Stage 3's core: coalescing, admission and the booked start slots, the state shared by
//! lookups that missed the cache and the dispatcher that runs them.
//!
//! The proxy's main invariants live here:
//!
//! - **No upstream call for a lookup nobody waits for.** The flights map, the fair queue and
//!   the start slots live under **one** mutex ([`Scheduler`]'s), so "is anybody still waiting
//!   for this lookup?" and "start this lookup" can never race: a lookup whose last client hung
//!   up leaves the queue in the same critical section that drops its last waiter, and the
//!   dispatcher only starts flights it takes from that queue ([`Scheduler::claim`]).
//! - **Admission is a promise.** A lookup is admitted only if it can start before its
//!   deadline at the booked start slots, without pushing anyone admitted before past theirs;
//!   otherwise it is refused at once. When the schedule moves anyway (a penalty), those it
//!   leaves behind are answered at once.
//! - **Every admitted lookup gets an answer**: the call's result, its expiry, shutdown, or,
//!   if its call task dies, a 503.
//! - **One booked start slot per lookup that needs one**, so that in shared mode no replica
//!   spends the fleet's budget on slots nobody uses.
//! - **Fair order across client ids** (start-time fair queueing, in [`FairQueue`]).
//!
//! The lock is never held across an `.await`, and the cache-hit path never takes it.
//!
//! The files, by concern:
//! - this one: the [`Scheduler`], its one lock, and the calls the request path and the
//!   dispatcher make;
//! - `flights.rs`: coalescing ([`Flight`], [`Waiter`], leader and followers, answers);
//! - `admission.rs`: the admission rule, deadlines, refusals, and keeping the promise when
//!   the schedule moves;
//! - `slots.rs`: the booked start slots (booking, spares, top-ups, a penalty voiding them).
//! - `tests/`: the invariants above as unit tests, with a fake pacer and a paused clock.
//!
//! [`FairQueue`]: crate::lookup::queue::FairQueue

mod admission;
mod background;
mod flights;
mod slots;
#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::{Notify, watch};
use tokio::time::Instant;

use self::background::Lane;
pub(crate) use self::background::{BackgroundOutcome, BackgroundReason, JobAnswer, JobItem};
pub(crate) use self::flights::{
    Flight, FlightInfo, FlightResult, FlightState, Joined, Source, Waiter,
};
use self::slots::StartSlots;
use crate::lookup::breaker::Breaker;
use crate::lookup::cache::{CacheLookup, ScoreCache};
use crate::lookup::error::ProxyError;
use crate::lookup::pacing::Pacer;
use crate::lookup::queue::{FairQueue, QueueRefusal};
use crate::lookup::validation::LookupKey;
use crate::shared::Shared;
use crate::telemetry::metrics::Metrics;

/// Everything under the scheduler's one lock.
struct State {
    flights: HashMap<LookupKey, Arc<Flight>>,
    queue: FairQueue<Arc<Flight>>,
    /// Start slots booked for this process and not used yet, and bookings under way.
    slots: StartSlots,
    /// Set when shutdown starts: new lookups must be able to start before this.
    draining_until: Option<Instant>,
    /// Background refreshes asked for (see `background.rs`).
    lane: Lane,
}

pub struct Scheduler {
    state: Mutex<State>,
    /// Wakes the dispatcher: the queue or the start slots changed.
    changed: Notify,
    /// Wakes the job runner: a background lookup left the lane or ended.
    lane_moved: Notify,
    /// The queue's depth, for whoever wants to await a change (tests, `/status` streams).
    depth: watch::Sender<usize>,
    pacer: Arc<dyn Pacer>,
    /// Shared mode: the cache tier and leases other replicas see.
    shared: Option<Arc<Shared>>,
    breaker: Arc<Breaker>,
    cache: Arc<dyn ScoreCache>,
    metrics: Arc<Metrics>,
    queue_capacity: usize,
    queue_timeout: Duration,
}

impl Scheduler {
    pub(crate) fn new(
        queue_capacity: usize,
        queue_timeout: Duration,
        pacer: Arc<dyn Pacer>,
        shared: Option<Arc<Shared>>,
        breaker: Arc<Breaker>,
        cache: Arc<dyn ScoreCache>,
        metrics: Arc<Metrics>,
    ) -> Arc<Self> {
        Arc::new(Scheduler {
            state: Mutex::new(State {
                flights: HashMap::new(),
                queue: FairQueue::new(queue_capacity),
                slots: StartSlots::default(),
                draining_until: None,
                lane: Lane::default(),
            }),
            changed: Notify::new(),
            lane_moved: Notify::new(),
            depth: watch::channel(0).0,
            pacer,
            shared,
            breaker,
            cache,
            metrics,
            queue_capacity,
            queue_timeout,
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding this lock would be a bug in this module; the state is still
        // consistent at every statement boundary, so carrying on is better than poisoning
        // every later lookup.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Publishes the depth of callers' lookups (background refreshes are counted apart).
    fn set_depth(&self, depth: usize) {
        self.metrics.set_queue_depth(depth);
        self.depth
            .send_if_modified(|d| std::mem::replace(d, depth) != depth);
    }

    /// Watches the queue's depth.
    pub fn depth(&self) -> watch::Receiver<usize> {
        self.depth.subscribe()
    }

    /// Joins the flight for `key`, or creates one and starts admitting it, or refuses at
    /// once (circuit open, shutting down). A new flight's deadline is the queue timeout from
    /// now, or `max_wait` (the client's own `X-Queue-Timeout`) when that is shorter. A
    /// follower shares the flight and its deadline whatever it asked: it can always leave by
    /// hanging up.
    pub(crate) fn join(
        self: &Arc<Self>,
        key: &LookupKey,
        max_wait: Option<Duration>,
        origin: impl FnOnce() -> crate::telemetry::FlightOrigin,
    ) -> Result<Joined, ProxyError> {
        let now = Instant::now();
        let mut state = self.lock();
        // A background refresh of this key that has not started gives its place (and its
        // start slot) to this lookup, which a caller waits for.
        if let Some(refresh) = state.unseat_refresh(key) {
            self.unregister(&mut state, &refresh);
            self.set_depth(state.queue.interactive_len());
            refresh.supersede();
        }
        if let Some(flight) = state.flights.get(key) {
            flight.add_waiter();
            return Ok(Joined::Follower(Waiter::new(self.clone(), flight.clone())));
        }
        // A flight for this key may have finished between our cache miss and this lock; it
        // fills the cache before it unregisters, so looking again here closes the gap.
        if let CacheLookup::Fresh(hit) = self.cache.get(key) {
            return Ok(Joined::Cached(hit));
        }
        if let Some((why, error)) = self.refuse_at_once(&state, now) {
            drop(state);
            self.metrics.queue_refused(why);
            return Err(error);
        }
        let deadline = self.deadline_for(&state, now, max_wait);
        let flight = Arc::new(Flight::new(key.clone(), deadline, now, origin()));
        state.flights.insert(key.clone(), flight.clone());
        let waiter = Waiter::new(self.clone(), flight.clone());
        self.admit_new(state, &flight, now);
        Ok(Joined::Leader(waiter))
    }

    /// A future that resolves when the queue or the start slots change.
    pub(crate) fn changed(&self) -> tokio::sync::futures::Notified<'_> {
        self.changed.notified()
    }

    /// The start at `now` is granted: hands back the flight to start with it.
    ///
    /// This is the last check before the upstream call, made under the lock that clients
    /// leaving also take: the next flight in fair order that someone still waits for and
    /// whose deadline has not passed. `None` means nobody wants it (no call is made).
    pub(crate) fn claim(&self, now: Instant) -> Option<Arc<Flight>> {
        let mut state = self.lock();
        let mut late = Vec::new();
        let chosen = loop {
            let Some((_, flight)) = state.queue.pop() else {
                break None;
            };
            flight.clear_job();
            if flight.waiters() == 0 {
                self.unregister(&mut state, &flight);
                self.metrics.queue_abandoned();
            } else if now > flight.deadline {
                self.unregister(&mut state, &flight);
                late.push(flight);
            } else {
                flight.update_info(|i| {
                    i.queue_wait = Some(now.saturating_duration_since(flight.admitted_at));
                });
                flight.set_state(FlightState::Started);
                break Some(flight);
            }
        };
        self.set_depth(state.queue.interactive_len());
        drop(state);
        for flight in late {
            self.metrics.queue_refused(QueueRefusal::Expired);
            flight.complete(Err(self.missed_deadline(now, Duration::ZERO)));
        }
        chosen
    }

    /// The earliest deadline among queued lookups (when the next expiry sweep is due).
    pub(crate) fn next_deadline(&self) -> Option<Instant> {
        self.lock().queue.next_deadline()
    }

    /// Resolves once every upstream call under way now has ended. The drain waits for them
    /// (within its grace): a background lookup (a refresh, a job's item) holds no connection
    /// open, so without this its call would be cut off and its answer, budget already spent,
    /// lost; a job would then call again for the item after the restart.
    pub(crate) async fn calls_under_way_done(&self) {
        let under_way: Vec<Arc<Flight>> = self
            .lock()
            .flights
            .values()
            .filter(|f| f.has_started() && !f.is_done())
            .cloned()
            .collect();
        for flight in under_way {
            flight.done().await;
        }
    }

    /// Shutdown has begun: from now on a lookup is admitted only if it can start by `until`.
    pub(crate) fn begin_drain(&self, until: Instant) {
        self.lock().draining_until = Some(until);
    }

    /// The grace period is over: refuse everything still queued and anything new.
    pub(crate) fn close(&self) {
        let mut state = self.lock();
        let left = state.queue.close();
        state.lane.clear();
        for flight in &left {
            self.unregister(&mut state, flight);
        }
        // Flights still booking their start slot are answered too.
        let admitting: Vec<_> = state
            .flights
            .values()
            .filter(|f| f.is_admitting())
            .cloned()
            .collect();
        for flight in &admitting {
            self.unregister(&mut state, flight);
        }
        self.set_depth(0);
        drop(state);
        for flight in left.into_iter().chain(admitting) {
            self.metrics.queue_refused(QueueRefusal::Shutdown);
            flight.complete(Err(ProxyError::ShuttingDown));
        }
        self.changed.notify_one();
    }

    /// Callers' lookups waiting (background refreshes not counted).
    pub(crate) fn queue_len(&self) -> usize {
        self.lock().queue.interactive_len()
    }

    pub(crate) fn queue_capacity(&self) -> usize {
        self.queue_capacity
    }

    /// When the queued lookup that has waited longest was admitted (the status page's
    /// oldest wait against the queue timeout); `None` when the queue is empty.
    pub(crate) fn oldest_admitted(&self) -> Option<Instant> {
        self.lock()
            .queue
            .jobs()
            .filter(|f| f.background.is_none())
            .map(|f| f.admitted_at)
            .min()
    }
}
