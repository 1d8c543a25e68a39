//! Admission: a new lookup is let in only if it can start before its deadline at the booked
//! start slots without pushing anyone already admitted past theirs, and refused at once
//! otherwise. Admission is a promise; this file also keeps it when the schedule moves.
//!
//! A new flight's deadline is the queue timeout from now, or the client's own
//! `X-Queue-Timeout` when that is shorter, and never later than the end of the grace period
//! once shutdown has begun. Admitting it means booking its start slot (or taking a spare, see
//! `slots.rs`) and placing it in the [`FairQueue`] at the fair position whose slot meets its
//! deadline ([`FairQueue::admit`] holds the rule). In one process that all happens under the
//! scheduler's lock, before [`Scheduler::join`] returns; in shared mode the booking asks
//! Redis, so it runs on a task of its own (the leader hanging up must not strand the
//! followers) and the flight waits in [`FlightState::Admitting`] meanwhile.
//!
//! When the schedule moves after admission (a penalty, a call that started late), the
//! lookups that can no longer make their deadline are answered at once ([`Scheduler::expire`])
//! rather than left to wait for a start that will not come.
//!
//! [`FairQueue`]: crate::lookup::queue::FairQueue
//! [`FairQueue::admit`]: crate::lookup::queue::FairQueue::admit

use std::sync::{Arc, MutexGuard};
use std::time::Duration;

use tokio::time::Instant;
use tracing::Instrument;

use super::{Flight, FlightState, Scheduler, Source, State};
use crate::lookup::error::ProxyError;
use crate::lookup::pacing::BookError;
use crate::lookup::queue::{QueueRefusal, Refusal, Schedule};
use crate::shared::Resolution;

impl State {
    /// The schedule admission sees: the booked start slots, and beyond them one per interval
    /// from `earliest` (the end of a penalty, or now).
    pub(super) fn schedule(&self, earliest: Instant, interval: Duration) -> Schedule {
        Schedule {
            now: earliest,
            slots: self.slots.at_or_after(earliest),
            interval,
        }
    }
}

impl Scheduler {
    /// The refusals a new lookup gets before anything is booked for it: a failing upstream
    /// (refuse now rather than queue what cannot succeed), or a closed queue (shutdown).
    pub(super) fn refuse_at_once(
        &self,
        state: &State,
        now: Instant,
    ) -> Option<(QueueRefusal, ProxyError)> {
        if let Err(retry_after) = self.breaker.admit(now) {
            return Some((
                QueueRefusal::CircuitOpen,
                ProxyError::CircuitOpen { retry_after },
            ));
        }
        if state.queue.is_closed() {
            return Some((QueueRefusal::Shutdown, ProxyError::ShuttingDown));
        }
        None
    }

    /// A new flight's deadline: the queue timeout, or the client's shorter `max_wait`, and
    /// while draining no later than the end of the grace period.
    pub(super) fn deadline_for(
        &self,
        state: &State,
        now: Instant,
        max_wait: Option<Duration>,
    ) -> Instant {
        let deadline = now + max_wait.map_or(self.queue_timeout, |w| w.min(self.queue_timeout));
        match state.draining_until {
            Some(until) => deadline.min(until),
            None => deadline,
        }
    }

    /// Admits a flight just registered by [`Scheduler::join`]: queued or refused before this
    /// returns in one process, admitting on a task of its own in shared mode.
    pub(super) fn admit_new(
        self: &Arc<Self>,
        mut state: MutexGuard<'_, State>,
        flight: &Arc<Flight>,
        now: Instant,
    ) {
        if self.shared.is_some() {
            state.slots.booking += 1;
            drop(state);
            self.spawn_admission(flight.clone());
            return;
        }
        // One process: admission is settled here and now, under this lock, with a spare
        // start slot (its lookup left) or one booked on the spot.
        let refused = if state.slots.has_spare(state.queue.len()) {
            self.place(&mut state, flight, now)
        } else {
            match self.book_at_once(flight, now) {
                Some(Ok(slot)) => {
                    state.slots.insert(slot);
                    self.place(&mut state, flight, now)
                }
                Some(Err(e)) => {
                    self.unregister(&mut state, flight);
                    let draining = state.draining_until.is_some();
                    Some(self.book_refusal(e, draining, now))
                }
                // A pacer that cannot answer at once: book on a task, as in shared mode.
                None => {
                    state.slots.booking += 1;
                    drop(state);
                    self.spawn_admission(flight.clone());
                    return;
                }
            }
        };
        drop(state);
        if let Some(error) = refused {
            flight.complete(Err(error));
        }
        self.changed.notify_one();
    }

    /// A background lookup that left while it was admitted (its job cancelled) or was
    /// refused frees the background band: the next one is fed.
    fn refeed_after_admission(self: &Arc<Self>, flight: &Flight) {
        if flight.is_background_only() && !flight.has_started() {
            self.feed_background();
        }
    }

    fn spawn_admission(self: &Arc<Self>, flight: Arc<Flight>) {
        let span = if flight.origin.traced() {
            tracing::info_span!(parent: &flight.origin.span, "pacing.permit")
        } else {
            tracing::Span::none()
        };
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

    /// Books a start slot for `flight` and places it in the queue (or refuses it), on a task
    /// of its own. In shared mode, first settles it from another replica if one has the
    /// answer or is fetching it.
    async fn admit(self: Arc<Self>, flight: Arc<Flight>) {
        if let Some(shared) = &self.shared {
            let settled = match shared.resolve(&flight.key, flight.deadline).await {
                Resolution::Cached(score) => Some((Source::SharedCache, Ok(score))),
                Resolution::Remote(result) => Some((Source::Replica, result)),
                Resolution::Lead => {
                    flight.hold_lease();
                    None
                }
                Resolution::Local => None,
            };
            if let Some((source, result)) = settled {
                self.lock().slots.booking -= 1;
                flight.update_info(|i| i.source = source);
                self.finish(&flight, result);
                self.changed.notify_one();
                return;
            }
            // A spare start slot (its lookup left) serves without booking another, if it is
            // still usable.
            let mut state = self.lock();
            self.prune(&mut state, Instant::now());
            if state.slots.has_spare(state.queue.len()) {
                state.slots.booking -= 1;
                let refused = if flight.waiters() == 0 {
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
                self.refeed_after_admission(&flight);
                return;
            }
        }
        let asked = Instant::now();
        let booked = self.pacer.book(flight.deadline, self.queue_capacity).await;
        let now = Instant::now();
        self.metrics.pacing_booked(now - asked);
        let mut state = self.lock();
        state.slots.booking -= 1;
        let refused = match booked {
            Ok(slot) => {
                state.slots.insert(slot);
                if flight.is_done() {
                    // Answered while the slot was booked (shutdown closed the queue): it
                    // stays as a spare, and the answer already given stands.
                    self.unregister(&mut state, &flight);
                    None
                } else if flight.waiters() == 0 {
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
        self.refeed_after_admission(&flight);
    }

    /// Puts an admitted flight in the queue, at the fair position its start slot allows.
    /// Returns the refusal to answer it with if there is none.
    fn place(&self, state: &mut State, flight: &Arc<Flight>, now: Instant) -> Option<ProxyError> {
        self.prune(state, now);
        let schedule = state.schedule(self.earliest(now), self.pacer.interval());
        // A refresh no caller joined waits behind every caller's lookup.
        let background = flight.is_background_only();
        let (client, deadline) = (&flight.key.client_id, flight.deadline);
        let admitted = if background {
            state
                .queue
                .admit_background(client, deadline, flight.clone(), &schedule)
        } else {
            state
                .queue
                .admit(client, deadline, flight.clone(), &schedule)
        };
        match admitted {
            Ok((job, position)) => {
                flight.set_job(job);
                flight.set_state(FlightState::Queued { position });
                if !background {
                    self.metrics.queue_admitted();
                    self.metrics
                        .permit_wait(schedule.start_at(position).saturating_duration_since(now));
                    self.set_depth(state.queue.interactive_len());
                }
                None
            }
            Err((refusal, _)) => {
                self.unregister(state, flight);
                let draining = state.draining_until.is_some();
                Some(self.refused(refusal, draining))
            }
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

    /// The refusal for a lookup that missed its start deadline: blame the penalty if one is
    /// running (that is what moved the schedule), else the queue.
    pub(super) fn missed_deadline(&self, now: Instant, by: Duration) -> ProxyError {
        match self.pacer.penalty_until() {
            Some(until) => ProxyError::UpstreamPenalty {
                retry_after: until.saturating_duration_since(now).max(by),
            },
            None => ProxyError::DeadlineUnreachable { retry_after: by },
        }
    }

    /// Puts a penalised flight back at the front of the queue if it can still start before
    /// its deadline and a caller still waits for it; otherwise answers it. A background
    /// refresh no caller joined is not retried: the penalty is answer enough.
    pub(crate) fn retry(&self, flight: &Arc<Flight>) -> bool {
        let now = Instant::now();
        let mut state = self.lock();
        if flight.waiters() == 0 {
            self.unregister(&mut state, flight);
            return false;
        }
        if flight.is_background_only() {
            self.unregister(&mut state, flight);
            drop(state);
            flight.complete(Err(self.missed_deadline(now, Duration::ZERO)));
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
                flight.set_job(job);
                flight.set_state(FlightState::Queued { position: 0 });
                self.set_depth(state.queue.interactive_len());
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
    pub(crate) fn expire(&self) {
        let now = Instant::now();
        let mut state = self.lock();
        self.prune(&mut state, now);
        let schedule = state.schedule(self.earliest(now), self.pacer.interval());
        let doomed = state.queue.expire(&schedule);
        if doomed.is_empty() {
            return;
        }
        for (flight, _) in &doomed {
            flight.clear_job();
            self.unregister(&mut state, flight);
        }
        self.set_depth(state.queue.interactive_len());
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
    pub(crate) fn fail_queued(&self, retry_after: Duration) {
        let mut state = self.lock();
        let mut failed = Vec::new();
        while let Some((_, flight)) = state.queue.pop() {
            failed.push(flight);
        }
        for flight in &failed {
            flight.clear_job();
            self.unregister(&mut state, flight);
        }
        self.set_depth(state.queue.interactive_len());
        drop(state);
        for flight in failed {
            self.metrics.queue_refused(QueueRefusal::CircuitOpen);
            flight.complete(Err(ProxyError::CircuitOpen { retry_after }));
        }
    }
}
