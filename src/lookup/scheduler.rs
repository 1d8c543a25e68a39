//! Coalescing, admission and the booked schedule: the state shared by lookups that missed the
//! cache and the dispatcher that runs them.
//!
//! A [`Flight`] is one distinct lookup on its way to the upstream. Identical concurrent
//! lookups join the same flight (one queue place, one upstream call, one answer for all).
//!
//! Admitting a flight means booking a start slot with the [`Pacer`] (on a task of its own, so
//! that the leader hanging up does not strand the followers) and placing the flight in the
//! [`FairQueue`] at a position whose slot meets its deadline, without pushing anyone past
//! theirs. The slots booked for this process are kept here, earliest first; at each slot the
//! dispatcher starts whichever waiting flight is next in fair order.
//!
//! The flights map, the queue and the slots live under **one** mutex, so "is anybody still
//! waiting for this lookup?" and "start this lookup" can never race: a lookup whose last
//! client hung up leaves the queue in the same critical section that drops its last waiter,
//! and the dispatcher only starts flights it takes from that queue. That is how no upstream
//! call is ever made for a lookup nobody waits for. A slot whose lookup left stays booked as
//! a spare: the next lookup admitted takes it, or it passes unused.
//!
//! The lock is never held across an `.await`, and the cache-hit path never takes it.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::{Notify, watch};
use tokio::time::Instant;
use tracing::Instrument;

use crate::lookup::breaker::Breaker;
use crate::lookup::cache::{CacheLookup, CachedScore, ScoreCache};
use crate::lookup::error::ProxyError;
use crate::lookup::pacing::SlotUnused;
use crate::lookup::pacing::{BookError, Pacer};
use crate::lookup::queue::QueueRefusal;
use crate::lookup::queue::{FairQueue, JobId, Refusal, Schedule};
use crate::lookup::validation::LookupKey;
use crate::shared::{Resolution, Settled, Shared};
use crate::telemetry::metrics::Metrics;

/// The answer a flight delivers to every lookup that joined it.
pub type FlightResult = Result<CachedScore, ProxyError>;

/// Where a flight is, as its waiters see it.
#[derive(Clone, Debug)]
pub enum FlightState {
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
pub enum Source {
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
pub struct FlightInfo {
    pub queue_wait: Option<Duration>,
    pub upstream_status: Option<u16>,
    pub upstream_took: Option<Duration>,
    pub source: Source,
}

const NO_JOB: u64 = u64::MAX;

/// One distinct lookup on its way to the upstream.
pub struct Flight {
    pub key: LookupKey,
    /// The latest instant its upstream call may start.
    pub deadline: Instant,
    pub admitted_at: Instant,
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
    pub origin: crate::telemetry::FlightOrigin,
}

impl Flight {
    fn job(&self) -> Option<JobId> {
        let raw = self.job.load(Ordering::Relaxed);
        (raw != NO_JOB).then(|| JobId::from_raw(raw))
    }

    fn is_done(&self) -> bool {
        matches!(*self.state.borrow(), FlightState::Done(_))
    }

    /// Delivers the answer to every waiter. The first answer wins; later ones are ignored.
    fn complete(&self, result: FlightResult) {
        self.state.send_if_modified(|state| {
            if matches!(state, FlightState::Done(_)) {
                return false;
            }
            *state = FlightState::Done(result);
            true
        });
    }

    fn set_state(&self, next: FlightState) {
        self.state.send_if_modified(|state| {
            if matches!(state, FlightState::Done(_)) {
                return false;
            }
            *state = next;
            true
        });
    }

    pub fn info(&self) -> FlightInfo {
        *self.info.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn update_info(&self, f: impl FnOnce(&mut FlightInfo)) {
        f(&mut self.info.lock().unwrap_or_else(|e| e.into_inner()));
    }

    pub fn attempts(&self) -> u64 {
        self.attempts.load(Ordering::Relaxed)
    }

    /// Records the start of an upstream attempt and returns its number (1 for the first).
    pub fn start_attempt(&self) -> u64 {
        self.attempts.fetch_add(1, Ordering::Relaxed) + 1
    }
}

/// How a lookup that missed the cache was placed.
pub enum Joined {
    /// It created the flight: its call will be made for it (`X-Cache: MISS`).
    Leader(Waiter),
    /// An identical lookup was already on its way (`X-Cache: COALESCED`).
    Follower(Waiter),
    /// The answer reached the cache between our miss and the lock.
    Cached(CachedScore),
}

struct State {
    flights: HashMap<LookupKey, Arc<Flight>>,
    queue: FairQueue<Arc<Flight>>,
    /// Starts booked for this process and not used yet, earliest first.
    slots: VecDeque<Instant>,
    /// Bookings under way: each will add one slot.
    booking: usize,
    /// Set when shutdown starts: new lookups must be able to start before this.
    draining_until: Option<Instant>,
}

impl State {
    /// The schedule admission sees: the booked slots, and beyond them one per interval from
    /// `earliest` (the end of a penalty, or now).
    fn schedule(&self, earliest: Instant, interval: Duration) -> Schedule {
        Schedule {
            now: earliest,
            slots: self
                .slots
                .iter()
                .copied()
                .filter(|&s| s >= earliest)
                .collect(),
            interval,
        }
    }

    /// Drops slots too far in the past to be used (see [`Pacer::late_tolerance`]); returns
    /// how many, and whether anyone was waiting (so the metrics can say why they went unused).
    fn prune(&mut self, now: Instant, tolerance: Option<Duration>) -> (usize, bool) {
        let Some(tolerance) = tolerance else {
            return (0, false);
        };
        let stale = self.slots.partition_point(|&s| s + tolerance < now);
        self.slots.drain(..stale);
        (stale, !self.queue.is_empty())
    }

    /// Slots the queue is short of, counting bookings already under way.
    fn deficit(&self) -> usize {
        self.queue
            .len()
            .saturating_sub(self.slots.len() + self.booking)
    }

    fn insert_slot(&mut self, slot: Instant) {
        let at = self.slots.partition_point(|&s| s <= slot);
        self.slots.insert(at, slot);
    }
}

pub struct Scheduler {
    state: Mutex<State>,
    /// Wakes the dispatcher: the queue or the slots changed.
    changed: Notify,
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
    pub fn new(
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
                slots: VecDeque::new(),
                booking: 0,
                draining_until: None,
            }),
            changed: Notify::new(),
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
    pub fn join(
        self: &Arc<Self>,
        key: &LookupKey,
        max_wait: Option<Duration>,
        origin: impl FnOnce() -> crate::telemetry::FlightOrigin,
    ) -> Result<Joined, ProxyError> {
        let now = Instant::now();
        let mut state = self.lock();
        if let Some(flight) = state.flights.get(key) {
            flight.waiters.fetch_add(1, Ordering::Relaxed);
            return Ok(Joined::Follower(Waiter::new(self.clone(), flight.clone())));
        }
        // A flight for this key may have finished between our cache miss and this lock; it
        // fills the cache before it unregisters, so looking again here closes the gap.
        if let CacheLookup::Fresh(hit) = self.cache.get(key) {
            return Ok(Joined::Cached(hit));
        }
        // A failing upstream: refuse now rather than queue what cannot succeed.
        if let Err(retry_after) = self.breaker.admit(now) {
            drop(state);
            self.metrics.queue_refused(QueueRefusal::CircuitOpen);
            return Err(ProxyError::CircuitOpen { retry_after });
        }
        if state.queue.is_closed() {
            drop(state);
            self.metrics.queue_refused(QueueRefusal::Shutdown);
            return Err(ProxyError::ShuttingDown);
        }

        let mut deadline = now + max_wait.map_or(self.queue_timeout, |w| w.min(self.queue_timeout));
        if let Some(until) = state.draining_until {
            deadline = deadline.min(until);
        }
        let (tx, _) = watch::channel(FlightState::Admitting);
        let flight = Arc::new(Flight {
            key: key.clone(),
            deadline,
            admitted_at: now,
            job: AtomicU64::new(NO_JOB),
            waiters: AtomicUsize::new(1),
            attempts: AtomicU64::new(0),
            lease: AtomicBool::new(false),
            state: tx,
            info: Mutex::new(FlightInfo::default()),
            origin: origin(),
        });
        state.flights.insert(key.clone(), flight.clone());
        let waiter = Waiter::new(self.clone(), flight.clone());

        if self.shared.is_none() {
            // One process: admission is settled here and now, under this lock, with a spare
            // slot (its lookup left) or one booked on the spot.
            let refused = if state.slots.len() > state.queue.len() {
                self.place(&mut state, &flight, now)
            } else {
                let permit = tracing::info_span!(
                    parent: &flight.origin.span,
                    "pacing.permit",
                    score_proxy.pacing.slot_in_seconds = tracing::field::Empty,
                );
                let booked =
                    permit.in_scope(|| self.pacer.book_at_once(deadline, self.queue_capacity));
                if let Some(Ok(slot)) = &booked {
                    permit.record(
                        "score_proxy.pacing.slot_in_seconds",
                        slot.saturating_duration_since(now).as_secs_f64(),
                    );
                }
                drop(permit);
                match booked {
                    Some(Ok(slot)) => {
                        state.insert_slot(slot);
                        self.place(&mut state, &flight, now)
                    }
                    Some(Err(e)) => {
                        self.unregister(&mut state, &flight);
                        let draining = state.draining_until.is_some();
                        Some(self.book_refusal(e, draining, now))
                    }
                    None => {
                        state.booking += 1;
                        drop(state);
                        self.spawn_admission(flight);
                        return Ok(Joined::Leader(waiter));
                    }
                }
            };
            drop(state);
            if let Some(error) = refused {
                flight.complete(Err(error));
            }
            self.changed.notify_one();
        } else {
            state.booking += 1;
            drop(state);
            self.spawn_admission(flight);
        }
        Ok(Joined::Leader(waiter))
    }

    fn spawn_admission(self: &Arc<Self>, flight: Arc<Flight>) {
        let span = tracing::info_span!(parent: &flight.origin.span, "pacing.permit");
        tokio::spawn(self.clone().admit(flight).instrument(span));
    }

    /// The refusal for a booking the pacer turned down.
    fn book_refusal(&self, e: BookError, draining: bool, now: Instant) -> ProxyError {
        match e {
            BookError::Full { retry_after } => {
                self.refused(Refusal::Full { retry_after }, draining)
            }
            // A running penalty is what pushed the start out: say so.
            BookError::TooLate { by } if !draining && self.pacer.penalty_until().is_some() => {
                self.metrics.queue_refused(QueueRefusal::Deadline);
                self.missed_deadline(now, by)
            }
            BookError::TooLate { by } => {
                self.refused(Refusal::Deadline { retry_after: by }, draining)
            }
        }
    }

    /// Books a slot for `flight` and places it in the queue (or refuses it). In shared mode,
    /// first settles it from another replica if one has the answer or is fetching it.
    async fn admit(self: Arc<Self>, flight: Arc<Flight>) {
        if let Some(shared) = &self.shared {
            let settled = match shared.resolve(&flight.key, flight.deadline).await {
                Resolution::Cached(score) => Some((Source::SharedCache, Ok(score))),
                Resolution::Remote(result) => Some((Source::Replica, result)),
                Resolution::Lead => {
                    flight.lease.store(true, Ordering::Relaxed);
                    None
                }
                Resolution::Local => None,
            };
            if let Some((source, result)) = settled {
                self.lock().booking -= 1;
                flight.update_info(|i| i.source = source);
                self.finish(&flight, result);
                self.changed.notify_one();
                return;
            }
            // A spare slot (its lookup left) serves without booking another, if it is
            // still usable.
            let mut state = self.lock();
            self.prune(&mut state, Instant::now());
            if state.slots.len() > state.queue.len() {
                state.booking -= 1;
                let refused = if flight.waiters.load(Ordering::Relaxed) == 0 {
                    self.unregister(&mut state, &flight);
                    None
                } else {
                    self.place(&mut state, &flight, Instant::now())
                };
                drop(state);
                if let Some(error) = refused {
                    flight.complete(Err(error));
                }
                self.changed.notify_one();
                return;
            }
        }
        let asked = Instant::now();
        let booked = self.pacer.book(flight.deadline, self.queue_capacity).await;
        let now = Instant::now();
        self.metrics.pacing_booked(now - asked);
        let mut state = self.lock();
        state.booking -= 1;
        let refused = match booked {
            Ok(slot) => {
                state.insert_slot(slot);
                if flight.waiters.load(Ordering::Relaxed) == 0 {
                    // Everyone left while the slot was booked: it stays as a spare.
                    self.unregister(&mut state, &flight);
                    self.metrics.queue_abandoned();
                    None
                } else {
                    self.place(&mut state, &flight, now)
                }
            }
            Err(e) => {
                self.unregister(&mut state, &flight);
                let draining = state.draining_until.is_some();
                Some(self.book_refusal(e, draining, now))
            }
        };
        drop(state);
        if let Some(error) = refused {
            flight.complete(Err(error));
        }
        self.changed.notify_one();
    }

    /// Puts an admitted flight in the queue, at the fair position its slot allows. Returns
    /// the refusal to answer it with if there is none.
    fn place(&self, state: &mut State, flight: &Arc<Flight>, now: Instant) -> Option<ProxyError> {
        self.prune(state, now);
        let schedule = state.schedule(self.earliest(now), self.pacer.interval());
        match state.queue.admit(
            &flight.key.client_id,
            flight.deadline,
            flight.clone(),
            &schedule,
        ) {
            Ok((job, position)) => {
                flight.job.store(job.raw(), Ordering::Relaxed);
                flight.set_state(FlightState::Queued { position });
                self.metrics.queue_admitted();
                self.metrics
                    .permit_wait(schedule.start_at(position).saturating_duration_since(now));
                self.set_depth(state.queue.len());
                None
            }
            Err((refusal, _)) => {
                self.unregister(state, flight);
                let draining = state.draining_until.is_some();
                Some(self.refused(refusal, draining))
            }
        }
    }

    /// Drops stale slots, counting each as a slot that passed unused.
    fn prune(&self, state: &mut State, now: Instant) {
        let (pruned, waiting) = state.prune(now, self.pacer.late_tolerance());
        let why = if waiting {
            SlotUnused::Late
        } else {
            SlotUnused::NoLookup
        };
        for _ in 0..pruned {
            self.metrics.unused_slot(why);
        }
        if pruned > 0 {
            tracing::debug!(pruned, ?why, "stale slots dropped");
        }
    }

    /// The earliest a start can be: now, or the end of a running penalty.
    fn earliest(&self, now: Instant) -> Instant {
        self.pacer.penalty_until().map_or(now, |p| p.max(now))
    }

    fn refused(&self, refusal: Refusal, draining: bool) -> ProxyError {
        match refusal {
            Refusal::Full { retry_after } => {
                self.metrics.queue_refused(QueueRefusal::Full);
                ProxyError::QueueFull { retry_after }
            }
            Refusal::Deadline { .. } | Refusal::Closed if draining => {
                self.metrics.queue_refused(QueueRefusal::Shutdown);
                ProxyError::ShuttingDown
            }
            Refusal::Deadline { retry_after } => {
                self.metrics.queue_refused(QueueRefusal::Deadline);
                ProxyError::DeadlineUnreachable { retry_after }
            }
            Refusal::Closed => {
                self.metrics.queue_refused(QueueRefusal::Shutdown);
                ProxyError::ShuttingDown
            }
        }
    }

    /// A waiter is gone (answered, or its client hung up).
    fn leave(&self, flight: &Arc<Flight>) {
        let mut state = self.lock();
        let left = flight.waiters.fetch_sub(1, Ordering::Relaxed) - 1;
        if left > 0 || flight.is_done() {
            return;
        }
        // Nobody waits any more. If it is queued, it leaves the queue now and never starts
        // (its slot stays booked as a spare). If it is still booking, the booking finds it
        // abandoned. If it started, it stays registered: a new lookup for the same key joins
        // the call already paid for.
        if let Some(job) = flight.job()
            && state.queue.remove(job).is_some()
        {
            flight.job.store(NO_JOB, Ordering::Relaxed);
            self.unregister(&mut state, flight);
            self.metrics.queue_abandoned();
            self.set_depth(state.queue.len());
        }
    }

    /// A future that resolves when the queue or the slots change.
    pub fn changed(&self) -> tokio::sync::futures::Notified<'_> {
        self.changed.notified()
    }

    /// The earliest booked slot, if anyone waits for one.
    pub fn next_slot(&self) -> Option<Instant> {
        let state = self.lock();
        if state.queue.is_empty() {
            None
        } else {
            state.slots.front().copied()
        }
    }

    /// Takes the slots that are due at `now`. Returns the one to use, if one is recent
    /// enough (a dispatcher that woke late can use only one; a slot used later than the
    /// pacer's tolerance could crowd the next slot, which may be another replica's), and how
    /// many were taken in all.
    pub fn take_due_slots(&self, now: Instant) -> (Option<Instant>, usize) {
        let mut state = self.lock();
        let due = state.slots.partition_point(|&s| s <= now);
        let usable = state.slots.drain(..due).next_back().filter(|&slot| {
            self.pacer
                .late_tolerance()
                .is_none_or(|tolerance| now <= slot + tolerance)
        });
        (usable, due)
    }

    /// Books the slots the queue is short of (after slots passed unused while lookups
    /// waited, or a penalty voided them), each on a task of its own.
    pub fn replenish(self: &Arc<Self>) {
        let deficit = {
            let mut state = self.lock();
            let deficit = state.deficit();
            state.booking += deficit;
            deficit
        };
        for _ in 0..deficit {
            tokio::spawn(self.clone().top_up());
        }
    }

    /// Books one more slot for lookups already admitted, then answers anyone the new
    /// schedule leaves past their deadline.
    async fn top_up(self: Arc<Self>) {
        let not_after = self.lock().queue.latest_deadline();
        let booked = match not_after {
            // Admitted lookups already hold their place: no capacity limit for them.
            Some(not_after) => Some(self.pacer.book(not_after, usize::MAX).await),
            None => None,
        };
        let now = Instant::now();
        let mut state = self.lock();
        state.booking -= 1;
        let unserved = match booked {
            Some(Ok(slot)) => {
                state.insert_slot(slot);
                None
            }
            // No slot before the latest deadline: the last lookup in the queue (the one
            // this slot was for) cannot be served in time; say so now.
            Some(Err(BookError::TooLate { by })) => {
                state.queue.pop_last().map(|(_, flight)| (flight, by))
            }
            Some(Err(BookError::Full { .. })) | None => None,
        };
        if let Some((flight, _)) = &unserved {
            flight.job.store(NO_JOB, Ordering::Relaxed);
            self.unregister(&mut state, flight);
            self.set_depth(state.queue.len());
        }
        drop(state);
        if let Some((flight, by)) = unserved {
            self.metrics.queue_refused(QueueRefusal::Expired);
            flight.complete(Err(self.missed_deadline(now, by)));
        }
        self.expire();
        self.changed.notify_one();
    }

    /// The start at `now` is granted: hands back the flight to start with it.
    ///
    /// This is the last check before the upstream call, made under the lock that clients
    /// leaving also take: the next flight in fair order that someone still waits for and
    /// whose deadline has not passed. `None` means nobody wants it (no call is made).
    pub fn claim(&self, now: Instant) -> Option<Arc<Flight>> {
        let mut state = self.lock();
        let mut late = Vec::new();
        let chosen = loop {
            let Some((_, flight)) = state.queue.pop() else {
                break None;
            };
            flight.job.store(NO_JOB, Ordering::Relaxed);
            if flight.waiters.load(Ordering::Relaxed) == 0 {
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
        self.set_depth(state.queue.len());
        drop(state);
        for flight in late {
            self.metrics.queue_refused(QueueRefusal::Expired);
            flight.complete(Err(self.missed_deadline(now, Duration::ZERO)));
        }
        chosen
    }

    /// The refusal for a lookup that missed its start deadline: blame the penalty if one is
    /// running (that is what moved the schedule), else the queue.
    fn missed_deadline(&self, now: Instant, by: Duration) -> ProxyError {
        match self.pacer.penalty_until() {
            Some(until) => ProxyError::UpstreamPenalty {
                retry_after: until.saturating_duration_since(now).max(by),
            },
            None => ProxyError::DeadlineUnreachable { retry_after: by },
        }
    }

    /// Delivers a flight's answer. A score goes into the cache *before* the flight is
    /// unregistered, so a lookup arriving in between finds one or the other. A flight led for
    /// every replica tells the others.
    pub fn finish(&self, flight: &Arc<Flight>, result: FlightResult) {
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
    fn unregister(&self, state: &mut State, flight: &Arc<Flight>) {
        if state
            .flights
            .get(&flight.key)
            .is_some_and(|f| Arc::ptr_eq(f, flight))
        {
            state.flights.remove(&flight.key);
        }
        self.settle_lease(flight, Settled::Gone);
    }

    /// An upstream penalty: the slots booked inside it are void.
    pub fn void_slots_before(&self, until: Instant) {
        let mut state = self.lock();
        let void = state.slots.partition_point(|&s| s < until);
        state.slots.drain(..void);
        drop(state);
        self.changed.notify_one();
    }

    /// Puts a penalised flight back at the front of the queue if it can still start before
    /// its deadline and someone still waits for it; otherwise answers it.
    pub fn retry(&self, flight: &Arc<Flight>) -> bool {
        let now = Instant::now();
        let mut state = self.lock();
        if flight.waiters.load(Ordering::Relaxed) == 0 {
            self.unregister(&mut state, flight);
            return false;
        }
        let schedule = state.schedule(self.earliest(now), self.pacer.interval());
        match state.queue.requeue_front(
            &flight.key.client_id,
            flight.deadline,
            flight.clone(),
            &schedule,
        ) {
            Ok(job) => {
                flight.job.store(job.raw(), Ordering::Relaxed);
                flight.set_state(FlightState::Queued { position: 0 });
                self.set_depth(state.queue.len());
                drop(state);
                self.metrics.upstream_retry();
                self.changed.notify_one();
                true
            }
            Err((refusal, _)) => {
                self.unregister(&mut state, flight);
                drop(state);
                let by = match refusal {
                    Refusal::Deadline { retry_after } => retry_after,
                    _ => Duration::ZERO,
                };
                self.metrics.queue_refused(QueueRefusal::Expired);
                flight.complete(Err(self.missed_deadline(now, by)));
                false
            }
        }
    }

    /// Answers every queued lookup that can no longer start before its deadline.
    pub fn expire(&self) {
        let now = Instant::now();
        let mut state = self.lock();
        self.prune(&mut state, now);
        let schedule = state.schedule(self.earliest(now), self.pacer.interval());
        let doomed = state.queue.expire(&schedule);
        if doomed.is_empty() {
            return;
        }
        for (flight, _) in &doomed {
            flight.job.store(NO_JOB, Ordering::Relaxed);
            self.unregister(&mut state, flight);
        }
        self.set_depth(state.queue.len());
        drop(state);
        for (flight, refusal) in doomed {
            self.metrics.queue_refused(QueueRefusal::Expired);
            let by = match refusal {
                Refusal::Deadline { retry_after } | Refusal::Full { retry_after } => retry_after,
                Refusal::Closed => Duration::ZERO,
            };
            flight.complete(Err(self.missed_deadline(now, by)));
        }
    }

    /// The circuit breaker opened: answer everything queued at once, since none of it can
    /// succeed before the cool-down ends.
    pub fn fail_queued(&self, retry_after: Duration) {
        let mut state = self.lock();
        let mut failed = Vec::new();
        while let Some((_, flight)) = state.queue.pop() {
            failed.push(flight);
        }
        for flight in &failed {
            flight.job.store(NO_JOB, Ordering::Relaxed);
            self.unregister(&mut state, flight);
        }
        self.set_depth(state.queue.len());
        drop(state);
        for flight in failed {
            self.metrics.queue_refused(QueueRefusal::CircuitOpen);
            flight.complete(Err(ProxyError::CircuitOpen { retry_after }));
        }
    }

    /// The earliest deadline among queued lookups (when the next expiry sweep is due).
    pub fn next_deadline(&self) -> Option<Instant> {
        self.lock().queue.next_deadline()
    }

    /// Shutdown has begun: from now on a lookup is admitted only if it can start by `until`.
    pub fn begin_drain(&self, until: Instant) {
        self.lock().draining_until = Some(until);
    }

    /// The grace period is over: refuse everything still queued and anything new.
    pub fn close(&self) {
        let mut state = self.lock();
        let left = state.queue.close();
        for flight in &left {
            self.unregister(&mut state, flight);
        }
        // Flights still booking their slot are answered too.
        let admitting: Vec<_> = state
            .flights
            .values()
            .filter(|f| matches!(*f.state.borrow(), FlightState::Admitting))
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

    pub fn queue_len(&self) -> usize {
        self.lock().queue.len()
    }

    pub fn queue_capacity(&self) -> usize {
        self.queue_capacity
    }

    /// Slots booked and not used yet.
    pub fn booked_slots(&self) -> usize {
        self.lock().slots.len()
    }

    pub fn is_draining(&self) -> bool {
        self.lock().draining_until.is_some()
    }
}

/// One lookup's interest in a flight. Dropping it (the client hung up, so axum dropped the
/// handler) withdraws that interest; the last one out takes an unstarted flight off the queue.
pub struct Waiter {
    scheduler: Arc<Scheduler>,
    flight: Arc<Flight>,
    rx: watch::Receiver<FlightState>,
}

impl Waiter {
    fn new(scheduler: Arc<Scheduler>, flight: Arc<Flight>) -> Self {
        let rx = flight.state.subscribe();
        Waiter {
            scheduler,
            flight,
            rx,
        }
    }

    pub fn flight(&self) -> &Arc<Flight> {
        &self.flight
    }

    /// Resolves when the flight is in the queue (with the position it entered at), or
    /// `None` if it went past that stage (started, answered, or refused).
    pub async fn queued(&mut self) -> Option<usize> {
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
    pub async fn started(&mut self) {
        let _ = self
            .rx
            .wait_for(|s| matches!(s, FlightState::Started | FlightState::Done(_)))
            .await;
    }

    /// Waits for the flight's answer.
    pub async fn wait(&mut self) -> FlightResult {
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
