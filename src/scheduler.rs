//! Coalescing and admission: the state shared by lookups that missed the cache and the
//! dispatcher that runs them.
//!
//! A [`Flight`] is one distinct lookup on its way to the upstream. Identical concurrent
//! lookups join the same flight (one queue place, one upstream call, one answer for all).
//! The flights map and the [`FairQueue`] live under **one** mutex, so "is anybody still
//! waiting for this lookup?" and "start this lookup" can never race: a lookup whose last
//! client hung up leaves the queue in the same critical section that drops its last waiter,
//! and the dispatcher only ever starts lookups it pops from that queue. That is how no
//! upstream call is ever made for a lookup nobody waits for.
//!
//! The lock is never held across an `.await`, and the cache-hit path never takes it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::{Notify, watch};
use tokio::time::Instant;

use crate::breaker::Breaker;
use crate::cache::{CacheLookup, CachedScore, ScoreCache};
use crate::error::ProxyError;
use crate::metrics::{Metrics, QueueRefusal};
use crate::pacing::Limiter;
use crate::queue::{FairQueue, JobId, Refusal, Schedule};
use crate::validation::LookupKey;

/// The answer a flight delivers to every lookup that joined it.
pub type FlightResult = Result<CachedScore, ProxyError>;

/// Where a flight is, as its waiters see it.
#[derive(Clone, Debug)]
pub enum FlightState {
    /// Queued, or waiting for the pacer.
    Waiting,
    /// Its upstream call has started.
    Started,
    Done(FlightResult),
}

/// What happened to a flight, for the access log and span attributes of every waiter.
#[derive(Clone, Copy, Debug, Default)]
pub struct FlightInfo {
    pub queue_wait: Option<Duration>,
    pub upstream_status: Option<u16>,
    pub upstream_took: Option<Duration>,
}

const NO_JOB: u64 = u64::MAX;

/// One distinct lookup on its way to the upstream.
pub struct Flight {
    pub key: LookupKey,
    /// The latest instant its upstream call may start.
    pub deadline: Instant,
    pub admitted_at: Instant,
    /// Its place in the queue while it waits (`NO_JOB` once started). Only changed under the
    /// scheduler lock.
    job: AtomicU64,
    /// Lookups waiting for it. Only changed under the scheduler lock.
    waiters: AtomicUsize,
    /// Upstream attempts so far (more than one after a penalty).
    attempts: AtomicU64,
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

    fn mark_started(&self, queue_wait: Duration) {
        self.update_info(|i| i.queue_wait = Some(queue_wait));
        self.state.send_if_modified(|state| {
            if matches!(state, FlightState::Waiting) {
                *state = FlightState::Started;
                true
            } else {
                false
            }
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
    Leader(Waiter, usize),
    /// An identical lookup was already queued or in flight (`X-Cache: COALESCED`).
    Follower(Waiter),
    /// The answer reached the cache between our miss and the lock.
    Cached(CachedScore),
}

struct State {
    flights: HashMap<LookupKey, Arc<Flight>>,
    queue: FairQueue<Arc<Flight>>,
    /// Popped from the queue, waiting for the pacer to grant its start.
    pending: Option<Arc<Flight>>,
    /// Set when shutdown starts: new lookups must be able to start before this.
    draining_until: Option<Instant>,
}

pub struct Scheduler {
    state: Mutex<State>,
    work: Notify,
    /// The queue's depth, for whoever wants to await a change (tests, `/status` streams).
    depth: watch::Sender<usize>,
    limiter: Arc<dyn Limiter>,
    breaker: Arc<Breaker>,
    cache: Arc<dyn ScoreCache>,
    metrics: Arc<Metrics>,
    queue_timeout: Duration,
}

impl Scheduler {
    pub fn new(
        queue_capacity: usize,
        queue_timeout: Duration,
        limiter: Arc<dyn Limiter>,
        breaker: Arc<Breaker>,
        cache: Arc<dyn ScoreCache>,
        metrics: Arc<Metrics>,
    ) -> Arc<Self> {
        Arc::new(Scheduler {
            state: Mutex::new(State {
                flights: HashMap::new(),
                queue: FairQueue::new(queue_capacity),
                pending: None,
                draining_until: None,
            }),
            work: Notify::new(),
            depth: watch::channel(0).0,
            limiter,
            breaker,
            cache,
            metrics,
            queue_timeout,
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding this lock would be a bug in this module; the state is still
        // consistent at every statement boundary, so carrying on is better than poisoning
        // every later lookup.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Where the pacer stands for the queue: the pending lookup, if any, takes the next
    /// start, so the head of the queue gets the one after.
    fn schedule(&self, state: &State, now: Instant) -> Schedule {
        let interval = self.limiter.interval();
        let mut first_start = self.limiter.next_start().max(now);
        if state.pending.is_some() {
            first_start += interval;
        }
        Schedule {
            now,
            first_start,
            interval,
        }
    }

    /// Joins the flight for `key`, or starts one and queues it, or refuses at once.
    pub fn join(
        self: &Arc<Self>,
        key: &LookupKey,
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
        let mut deadline = now + self.queue_timeout;
        if let Some(until) = state.draining_until {
            deadline = deadline.min(until);
        }
        let (tx, _) = watch::channel(FlightState::Waiting);
        let flight = Arc::new(Flight {
            key: key.clone(),
            deadline,
            admitted_at: now,
            job: AtomicU64::new(NO_JOB),
            waiters: AtomicUsize::new(1),
            attempts: AtomicU64::new(0),
            state: tx,
            info: Mutex::new(FlightInfo::default()),
            origin: origin(),
        });
        let schedule = self.schedule(&state, now);
        match state
            .queue
            .admit(&key.client_id, deadline, flight.clone(), &schedule)
        {
            Ok((job, position)) => {
                flight.job.store(job.raw(), Ordering::Relaxed);
                state.flights.insert(key.clone(), flight.clone());
                self.metrics.queue_admitted();
                self.set_depth(state.queue.len());
                drop(state);
                self.work.notify_one();
                Ok(Joined::Leader(Waiter::new(self.clone(), flight), position))
            }
            Err((refusal, _)) => {
                let draining = state.draining_until.is_some();
                drop(state);
                Err(self.refused(refusal, draining))
            }
        }
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
        // Nobody waits any more. If it is queued, it leaves the queue now and never starts.
        // If it is pending, `claim` will see it has no waiters. If it started, it stays
        // registered: a new lookup for the same key joins the call already paid for.
        if let Some(job) = flight.job()
            && state.queue.remove(job).is_some()
        {
            flight.job.store(NO_JOB, Ordering::Relaxed);
            unregister(&mut state, flight);
            self.metrics.queue_abandoned();
            self.set_depth(state.queue.len());
        }
    }

    /// Resolves once at least one lookup is queued.
    pub async fn wait_for_work(&self) {
        loop {
            let notified = self.work.notified();
            if !self.lock().queue.is_empty() {
                return;
            }
            notified.await;
        }
    }

    /// Takes the next lookup in fair order off the queue; it waits for the pacer as the
    /// *pending* lookup until [`Scheduler::claim`]. Every queued flight has a waiter (see
    /// [`Scheduler::leave`]).
    pub fn pop_next(&self) -> Option<Arc<Flight>> {
        let mut state = self.lock();
        debug_assert!(state.pending.is_none(), "one pending lookup at a time");
        let (_, flight) = state.queue.pop()?;
        flight.job.store(NO_JOB, Ordering::Relaxed);
        state.pending = Some(flight.clone());
        self.set_depth(state.queue.len());
        Some(flight)
    }

    /// The pacer has granted a start at `now`: hands back the lookup to start with it.
    ///
    /// This is the last check before the upstream call, made under the lock that clients
    /// leaving also take: the pending lookup is started only if someone still waits for it
    /// and its deadline has not passed; otherwise the next queued lookup gets the slot.
    /// `None` means nobody wanted it (the slot goes unused, and no call is made).
    pub fn claim(&self, now: Instant) -> Option<Arc<Flight>> {
        let mut state = self.lock();
        let mut candidate = state.pending.take();
        let mut late = Vec::new();
        let chosen = loop {
            let Some(flight) = candidate else { break None };
            if flight.waiters.load(Ordering::Relaxed) == 0 {
                unregister(&mut state, &flight);
                self.metrics.queue_abandoned();
            } else if now > flight.deadline {
                unregister(&mut state, &flight);
                late.push(flight);
            } else {
                flight.mark_started(now.saturating_duration_since(flight.admitted_at));
                break Some(flight);
            }
            candidate = state.queue.pop().map(|(_, f)| {
                f.job.store(NO_JOB, Ordering::Relaxed);
                f
            });
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
        match self.limiter.penalty_until() {
            Some(until) => ProxyError::UpstreamPenalty {
                retry_after: until.saturating_duration_since(now).max(by),
            },
            None => ProxyError::DeadlineUnreachable { retry_after: by },
        }
    }

    /// Delivers a flight's answer. A score goes into the cache *before* the flight is
    /// unregistered, so a lookup arriving in between finds one or the other.
    pub fn finish(&self, flight: &Arc<Flight>, result: FlightResult) {
        if let Ok(score) = &result {
            self.cache.insert(flight.key.clone(), score.clone());
        }
        unregister(&mut self.lock(), flight);
        flight.complete(result);
    }

    /// Puts a penalised flight back at the front of the queue if it can still start before
    /// its deadline and someone still waits for it; otherwise answers it.
    pub fn retry(&self, flight: &Arc<Flight>) -> bool {
        let now = Instant::now();
        let mut state = self.lock();
        if flight.waiters.load(Ordering::Relaxed) == 0 {
            unregister(&mut state, flight);
            return false;
        }
        let schedule = self.schedule(&state, now);
        match state.queue.requeue_front(
            &flight.key.client_id,
            flight.deadline,
            flight.clone(),
            &schedule,
        ) {
            Ok(job) => {
                flight.job.store(job.raw(), Ordering::Relaxed);
                flight.state.send_replace(FlightState::Waiting);
                self.set_depth(state.queue.len());
                drop(state);
                self.metrics.upstream_retry();
                self.work.notify_one();
                true
            }
            Err((refusal, _)) => {
                unregister(&mut state, flight);
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
        let schedule = self.schedule(&state, now);
        let doomed = state.queue.expire(&schedule);
        if doomed.is_empty() {
            return;
        }
        for (flight, _) in &doomed {
            flight.job.store(NO_JOB, Ordering::Relaxed);
            unregister(&mut state, flight);
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

    /// The circuit breaker opened: answer everything queued (and the lookup waiting for the
    /// pacer) at once, since none of it can succeed before the cool-down ends.
    pub fn fail_queued(&self, retry_after: Duration) {
        let mut state = self.lock();
        let mut failed = Vec::new();
        while let Some((_, flight)) = state.queue.pop() {
            failed.push(flight);
        }
        failed.extend(state.pending.take());
        for flight in &failed {
            flight.job.store(NO_JOB, Ordering::Relaxed);
            unregister(&mut state, flight);
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
        let mut left = state.queue.close();
        left.extend(state.pending.take());
        for flight in &left {
            unregister(&mut state, flight);
        }
        self.set_depth(0);
        drop(state);
        for flight in left {
            self.metrics.queue_refused(QueueRefusal::Shutdown);
            flight.complete(Err(ProxyError::ShuttingDown));
        }
    }

    /// Whether a lookup is waiting for the pacer right now.
    pub fn has_pending(&self) -> bool {
        self.lock().pending.is_some()
    }

    pub fn queue_len(&self) -> usize {
        self.lock().queue.len()
    }

    pub fn queue_capacity(&self) -> usize {
        self.lock().queue.capacity()
    }

    pub fn is_draining(&self) -> bool {
        self.lock().draining_until.is_some()
    }
}

fn unregister(state: &mut State, flight: &Arc<Flight>) {
    if state
        .flights
        .get(&flight.key)
        .is_some_and(|f| Arc::ptr_eq(f, flight))
    {
        state.flights.remove(&flight.key);
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

    /// Resolves when the flight's upstream call starts (or it is answered without one).
    pub async fn started(&mut self) {
        let _ = self
            .rx
            .wait_for(|s| !matches!(s, FlightState::Waiting))
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
