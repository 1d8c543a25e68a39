//! Coalescing: a [`Flight`] is one distinct lookup on its way to the upstream, and every
//! lookup for the same key while it is on its way waits for it instead of making a call of
//! its own.
//!
//! The lookup that creates a flight is its leader (`X-Cache: MISS`); those that join it are
//! followers (`X-Cache: COALESCED`). Each holds a [`Waiter`]: one queue place, one upstream
//! call and one answer serve them all, and a follower shares the leader's deadline whatever
//! it asked for (it can always leave by hanging up). Dropping a waiter withdraws its
//! interest; when the last one goes, an unstarted flight leaves the queue in the same
//! critical section, so its start slot is never used for it.
//!
//! A flight is answered exactly once ([`Flight::complete`]: the first answer wins), and its
//! score enters the cache before the flight leaves the map, so that a lookup arriving in
//! between finds one or the other.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

use super::background::BackgroundReason;
use super::{Scheduler, State};
use crate::lookup::cache::CachedScore;
use crate::lookup::error::ProxyError;
use crate::lookup::queue::JobId;
use crate::lookup::validation::LookupKey;
use crate::shared::Settled;

/// The answer a flight delivers to every lookup that joined it.
pub(crate) type FlightResult = Result<CachedScore, ProxyError>;

/// Where a flight is, as its waiters see it.
#[derive(Clone, Debug)]
pub(crate) enum FlightState {
    /// Booking its start slot.
    Admitting,
    /// In the queue, having entered at this position (0 = next).
    Queued {
        position: usize,
    },
    /// Its upstream call has started.
    Started,
    Done(FlightResult),
}

/// Where a flight's answer came from.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) enum Source {
    /// This replica's upstream call (or its refusal).
    #[default]
    Upstream,
    /// The shared cache tier (another replica's earlier call).
    SharedCache,
    /// Another replica's call for the same lookup, shared.
    Replica,
}

/// What happened to a flight, for the access log and span attributes of every waiter.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct FlightInfo {
    pub(crate) queue_wait: Option<Duration>,
    pub(crate) upstream_status: Option<u16>,
    pub(crate) upstream_took: Option<Duration>,
    pub(crate) source: Source,
}

/// The value of [`Flight::job`] while the flight is not in the queue.
const NO_JOB: u64 = u64::MAX;

/// One distinct lookup on its way to the upstream.
pub(crate) struct Flight {
    pub(crate) key: LookupKey,
    /// The latest instant its upstream call may start.
    pub(crate) deadline: Instant,
    pub(crate) admitted_at: Instant,
    /// Its place in the queue while it waits (`NO_JOB` otherwise). Only changed under the
    /// scheduler lock.
    job: AtomicU64,
    /// Lookups waiting for it. Only changed under the scheduler lock.
    waiters: AtomicUsize,
    /// Upstream attempts so far (more than one after a penalty).
    attempts: AtomicU64,
    /// Holds the shared lease (shared mode): this replica calls for every replica.
    lease: AtomicBool,
    state: watch::Sender<FlightState>,
    info: Mutex<FlightInfo>,
    /// Telemetry attached by the leader (its span's context, for links); opaque here.
    pub(crate) origin: crate::telemetry::FlightOrigin,
    /// Set for a background refresh: led by no caller, it waits behind every caller's
    /// lookup (see `background.rs`).
    pub(crate) background: Option<BackgroundReason>,
    /// A caller's lookup took its place before it started (see [`Scheduler::join`]).
    superseded: AtomicBool,
}

impl Flight {
    /// A new flight with its leader as the one waiter, admitting.
    pub(super) fn new(
        key: LookupKey,
        deadline: Instant,
        admitted_at: Instant,
        origin: crate::telemetry::FlightOrigin,
    ) -> Flight {
        Flight {
            key,
            deadline,
            admitted_at,
            job: AtomicU64::new(NO_JOB),
            waiters: AtomicUsize::new(1),
            attempts: AtomicU64::new(0),
            lease: AtomicBool::new(false),
            state: watch::channel(FlightState::Admitting).0,
            info: Mutex::new(FlightInfo::default()),
            origin,
            background: None,
            superseded: AtomicBool::new(false),
        }
    }

    /// A background refresh, its one waiter being the task that records how it ended.
    pub(super) fn for_background(mut self, why: BackgroundReason) -> Flight {
        self.background = Some(why);
        self
    }

    /// A background refresh no caller has joined: it stays in the background band, is not
    /// retried after a penalty, and gives its place to a caller's lookup of the same key.
    pub(super) fn is_background_only(&self) -> bool {
        self.background.is_some() && self.waiters() <= 1
    }

    /// Whether it has left the queue for good (started, or answered).
    pub(super) fn has_started(&self) -> bool {
        matches!(
            *self.state.borrow(),
            FlightState::Started | FlightState::Done(_)
        )
    }

    /// A caller's lookup of the same key replaced it before it started: its waiter is told
    /// so, and the caller's flight makes the call.
    pub(super) fn supersede(&self) {
        self.superseded.store(true, Ordering::Relaxed);
        self.complete(Err(ProxyError::ShuttingDown));
    }

    pub(super) fn was_superseded(&self) -> bool {
        self.superseded.load(Ordering::Relaxed)
    }

    pub(super) fn job(&self) -> Option<JobId> {
        let raw = self.job.load(Ordering::Relaxed);
        (raw != NO_JOB).then(|| JobId::from_raw(raw))
    }

    /// Records its place in the queue. Under the scheduler lock only.
    pub(super) fn set_job(&self, job: JobId) {
        self.job.store(job.raw(), Ordering::Relaxed);
    }

    /// It left the queue (started, answered, or gone). Under the scheduler lock only.
    pub(super) fn clear_job(&self) {
        self.job.store(NO_JOB, Ordering::Relaxed);
    }

    /// How many lookups still wait for it; 0 means nobody, and no call may start for it.
    pub(super) fn waiters(&self) -> usize {
        self.waiters.load(Ordering::Relaxed)
    }

    /// A follower joined. Under the scheduler lock only.
    pub(super) fn add_waiter(&self) {
        self.waiters.fetch_add(1, Ordering::Relaxed);
    }

    /// A waiter left; returns how many remain. Under the scheduler lock only.
    fn remove_waiter(&self) -> usize {
        self.waiters.fetch_sub(1, Ordering::Relaxed) - 1
    }

    /// This replica leads the lookup for every replica (shared mode).
    pub(super) fn hold_lease(&self) {
        self.lease.store(true, Ordering::Relaxed);
    }

    pub(super) fn is_done(&self) -> bool {
        matches!(*self.state.borrow(), FlightState::Done(_))
    }

    /// Resolves once the flight has its answer.
    pub(super) async fn done(&self) {
        let mut state = self.state.subscribe();
        let _ = state.wait_for(|s| matches!(s, FlightState::Done(_))).await;
    }

    pub(super) fn is_admitting(&self) -> bool {
        matches!(*self.state.borrow(), FlightState::Admitting)
    }

    /// Delivers the answer to every waiter. The first answer wins; later ones are ignored.
    pub(super) fn complete(&self, result: FlightResult) {
        self.state.send_if_modified(|state| {
            if matches!(state, FlightState::Done(_)) {
                return false;
            }
            *state = FlightState::Done(result);
            true
        });
    }

    pub(super) fn set_state(&self, next: FlightState) {
        self.state.send_if_modified(|state| {
            if matches!(state, FlightState::Done(_)) {
                return false;
            }
            *state = next;
            true
        });
    }

    pub(crate) fn info(&self) -> FlightInfo {
        *self.info.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn update_info(&self, f: impl FnOnce(&mut FlightInfo)) {
        f(&mut self.info.lock().unwrap_or_else(|e| e.into_inner()));
    }

    #[cfg(test)]
    pub(crate) fn attempts(&self) -> u64 {
        self.attempts.load(Ordering::Relaxed)
    }

    /// Records the start of an upstream attempt and returns its number (1 for the first).
    pub(crate) fn start_attempt(&self) -> u64 {
        self.attempts.fetch_add(1, Ordering::Relaxed) + 1
    }
}

/// How a lookup that missed the cache was placed.
pub(crate) enum Joined {
    /// It created the flight: its call will be made for it (`X-Cache: MISS`).
    Leader(Waiter),
    /// An identical lookup was already on its way (`X-Cache: COALESCED`).
    Follower(Waiter),
    /// The answer reached the cache between our miss and the lock.
    Cached(CachedScore),
}

impl Scheduler {
    /// Delivers a flight's answer. A score goes into the cache *before* the flight is
    /// unregistered, so a lookup arriving in between finds one or the other. A flight led for
    /// every replica tells the others.
    pub(crate) fn finish(&self, flight: &Arc<Flight>, result: FlightResult) {
        if let Ok(score) = &result {
            self.cache.insert(flight.key.clone(), score.clone());
        }
        self.settle_lease(
            flight,
            match &result {
                Ok(score) => Settled::Answered(score.clone()),
                Err(e) => Settled::Failed(e.clone()),
            },
        );
        self.unregister(&mut self.lock(), flight);
        flight.complete(result);
    }

    /// Gives up a flight's shared lease, if it holds one, telling the other replicas how it
    /// ended (in the background: Redis is not on the answer's path).
    fn settle_lease(&self, flight: &Arc<Flight>, outcome: Settled) {
        if flight.lease.swap(false, Ordering::Relaxed)
            && let Some(shared) = &self.shared
        {
            let shared = shared.clone();
            let key = flight.key.clone();
            tokio::spawn(async move { shared.settle(&key, outcome).await });
        }
    }

    /// Takes a flight out of the map (if it is still the registered one). A lease still held
    /// here means the flight ended without an answer: the other replicas try again.
    pub(super) fn unregister(&self, state: &mut State, flight: &Arc<Flight>) {
        if state
            .flights
            .get(&flight.key)
            .is_some_and(|f| Arc::ptr_eq(f, flight))
        {
            state.flights.remove(&flight.key);
        }
        self.settle_lease(flight, Settled::Gone);
    }

    /// A waiter is gone (answered, or its client hung up).
    fn leave(&self, flight: &Arc<Flight>) {
        let mut state = self.lock();
        let left = flight.remove_waiter();
        if left > 0 || flight.is_done() {
            return;
        }
        // Nobody waits any more. If it is queued, it leaves the queue now and never starts
        // (its start slot stays booked as a spare). If it is still booking, the booking finds
        // it abandoned. If it started, it stays registered: a new lookup for the same key
        // joins the call already paid for.
        if let Some(job) = flight.job()
            && state.queue.remove(job).is_some()
        {
            flight.clear_job();
            self.unregister(&mut state, flight);
            self.metrics.queue_abandoned();
            self.set_depth(state.queue.interactive_len());
        }
    }
}

/// One lookup's interest in a flight. Dropping it (the client hung up, so axum dropped the
/// handler) withdraws that interest; the last one out takes an unstarted flight off the queue.
pub(crate) struct Waiter {
    scheduler: Arc<Scheduler>,
    flight: Arc<Flight>,
    rx: watch::Receiver<FlightState>,
}

impl Waiter {
    pub(super) fn new(scheduler: Arc<Scheduler>, flight: Arc<Flight>) -> Self {
        let rx = flight.state.subscribe();
        Waiter {
            scheduler,
            flight,
            rx,
        }
    }

    pub(crate) fn flight(&self) -> &Arc<Flight> {
        &self.flight
    }

    /// Resolves when the flight is in the queue (with the position it entered at), or
    /// `None` if it went past that stage (started, answered, or refused).
    pub(crate) async fn queued(&mut self) -> Option<usize> {
        let state = self
            .rx
            .wait_for(|s| !matches!(s, FlightState::Admitting))
            .await
            .ok()?;
        match *state {
            FlightState::Queued { position } => Some(position),
            _ => None,
        }
    }

    /// Resolves when the flight's upstream call starts (or it is answered without one).
    pub(crate) async fn started(&mut self) {
        let _ = self
            .rx
            .wait_for(|s| matches!(s, FlightState::Started | FlightState::Done(_)))
            .await;
    }

    /// Waits for the flight's answer.
    pub(crate) async fn wait(&mut self) -> FlightResult {
        match self
            .rx
            .wait_for(|s| matches!(s, FlightState::Done(_)))
            .await
        {
            Ok(state) => match &*state {
                FlightState::Done(result) => result.clone(),
                _ => Err(ProxyError::ShuttingDown),
            },
            // The sender lives in the flight, which we hold: this cannot happen, but if it
            // did, the honest answer is that the proxy could not finish the lookup.
            Err(_) => Err(ProxyError::ShuttingDown),
        }
    }
}

impl Drop for Waiter {
    fn drop(&mut self) {
        self.scheduler.leave(&self.flight);
    }
}
