//! The dispatcher: the one task that turns booked start slots into upstream calls.
//!
//! Its loop reads as the last stages of the pipeline: wait for the next booked start slot,
//! check that a call may start (the circuit breaker, an in-flight permit, the start gate),
//! take the next waiting lookup in fair order that someone still waits for, and launch its
//! call on a task of its own. Calls overlap: a slow upstream does not delay the next start,
//! up to `upstream-max-in-flight` calls (one in-flight permit each). A start slot that cannot
//! be used passes unused, and the scheduler books another for the lookups still waiting (each
//! top-up on a task of its own; admission itself books under the scheduler's lock in one
//! process, see `scheduler/admission.rs`).
//!
//! The call task handles what the upstream answered: a score goes to the cache and every
//! waiter, a 429 pauses all calls for the penalty and puts the lookup back at the front of
//! the queue while its deadline allows, anything else becomes an honest error.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tracing::Instrument;

use crate::lookup::breaker::{Breaker, BreakerState, CallVerdict};
use crate::lookup::cache::CachedScore;
use crate::lookup::pacing::SlotUnused;
use crate::lookup::pacing::{GateRefusal, Guard, Pacer, StartGate};
use crate::lookup::scheduler::{Flight, Scheduler};
use crate::lookup::upstream::UpstreamClient;
use crate::lookup::upstream::UpstreamOutcome;
use crate::telemetry;
use crate::telemetry::metrics::Metrics;
use crate::telemetry::recent_calls::RecentCalls;

pub(crate) struct Dispatcher {
    pub(crate) scheduler: Arc<Scheduler>,
    pub(crate) pacer: Arc<dyn Pacer>,
    pub(crate) gate: Arc<StartGate>,
    pub(crate) breaker: Arc<Breaker>,
    pub(crate) upstream: Arc<UpstreamClient>,
    pub(crate) metrics: Arc<Metrics>,
    /// The in-flight permits: one per call under way, `upstream-max-in-flight` in all.
    pub(crate) in_flight: Arc<Semaphore>,
    /// The penalty assumed when a 429 carries no usable `Retry-After`.
    pub(crate) default_penalty: Duration,
    /// The guard in force is added to every penalty, as to every interval (our clock and
    /// the upstream's differ); each answered call teaches it (see `pacing::guard`).
    pub(crate) guard: Arc<Guard>,
    pub(crate) breaker_cooldown: Duration,
    /// The last minute of calls and penalties, for the status page's timeline.
    pub(crate) recent: Arc<RecentCalls>,
}

impl Dispatcher {
    /// Runs until the task is aborted.
    pub(crate) async fn run(self: Arc<Self>) {
        loop {
            let Some(slot) = self.next_due_slot().await else {
                // Every due start slot came too late: book again for whoever still waits.
                self.scheduler.replenish();
                continue;
            };

            // The breaker: nothing starts while it is open, one probe while half-open.
            if !self.breaker.may_start(Instant::now()) {
                self.unused(SlotUnused::Breaker);
                continue;
            }
            // The concurrency bound: a slow or hung upstream holds calls open.
            let Ok(in_flight_permit) = self.in_flight.clone().try_acquire_owned() else {
                self.breaker.start_cancelled();
                self.unused(SlotUnused::Saturated);
                continue;
            };
            // The start gate: never closer than its spacing to the last real departure (an
            // interval; in shared mode less the late tolerance, see `App::new`), never inside
            // a penalty or another replica's hold (either can become known while the start
            // slot waits there), and in shared mode never later than the tolerance.
            // How far the gate's floor pushes this start slot, for the debug lines below only.
            let floor = if tracing::enabled!(tracing::Level::DEBUG) {
                self.gate.earliest(slot).saturating_duration_since(slot)
            } else {
                Duration::ZERO
            };
            let started = match self
                .gate
                .pass(
                    slot,
                    self.pacer.late_tolerance(),
                    || self.pacer.penalty_until(),
                    || self.pacer.hold_until(),
                )
                .await
            {
                Ok(started) => {
                    tracing::debug!(
                        floor_ms = floor.as_secs_f64() * 1e3,
                        behind_ms = started.saturating_duration_since(slot).as_secs_f64() * 1e3,
                        "slot used"
                    );
                    started
                }
                Err(refusal) => {
                    tracing::debug!(
                        ?refusal,
                        floor_ms = floor.as_secs_f64() * 1e3,
                        behind_ms =
                            Instant::now().saturating_duration_since(slot).as_secs_f64() * 1e3,
                        "slot refused at the start gate"
                    );
                    if refusal == GateRefusal::Rate {
                        tracing::error!("the start gate refused a booked slot; no call made");
                    }
                    self.breaker.start_cancelled();
                    self.unused(match refusal {
                        GateRefusal::Penalty => SlotUnused::Penalty,
                        GateRefusal::Rate => SlotUnused::Gate,
                        GateRefusal::Late => SlotUnused::Late,
                        GateRefusal::Held => SlotUnused::Held,
                    });
                    continue;
                }
            };
            // The last check: who is next, and does anyone still wait for it?
            let Some(flight) = self.scheduler.claim(started) else {
                self.breaker.start_cancelled();
                self.unused(SlotUnused::NoLookup);
                continue;
            };
            // Start slots that came too late on the way here are booked again for whoever
            // still waits. Not before the claim: until then the queue still counts the lookup
            // this start slot is for, and the deficit would book it a second one (in shared
            // mode, a start slot the whole fleet would lose).
            self.scheduler.replenish();
            if flight.background.is_none() {
                self.metrics
                    .queue_wait(started.saturating_duration_since(flight.admitted_at));
            } else {
                // The next background refresh takes the band this one just left.
                self.scheduler.feed_background();
            }
            tokio::spawn(self.clone().call(flight, in_flight_permit, started));
        }
    }

    /// What an answered call teaches the guard: its round trip, and whether it was clean
    /// or penalised. Calls the upstream did not answer (timeouts, broken connections,
    /// server errors, whose timing says more about the failure than the network) teach
    /// nothing. Returns whether the call was answered without a penalty (so it certainly
    /// arrived, and the next start need not wait for it: see `StartGate::call_ended`).
    fn learn(
        &self,
        outcome: UpstreamOutcome,
        started: Instant,
        finished: Instant,
        rtt: Duration,
    ) -> bool {
        let clean = match outcome {
            UpstreamOutcome::Ok
            | UpstreamOutcome::Unauthorized
            | UpstreamOutcome::RejectedInput => {
                self.guard.clean_call(rtt);
                true
            }
            UpstreamOutcome::Penalty => {
                if self.guard.penalised(started, finished, rtt) {
                    tracing::warn!(
                        guard_ms = self.guard.current().as_secs_f64() * 1e3,
                        "a correctly spaced call was penalised: raising the guard"
                    );
                }
                false
            }
            _ => return false,
        };
        let (guard, reason) = self.guard.snapshot();
        self.metrics
            .set_pacing_guard(guard, reason, self.guard.ceiling());
        clean
    }

    fn unused(&self, why: SlotUnused) {
        self.metrics.unused_slot(why);
        self.scheduler.replenish();
    }

    /// Waits for the earliest booked start slot to be due, answering on the way lookups whose
    /// deadline passes. Returns the start slot to use, or `None` when the due start slots came
    /// too late to be used (see `Scheduler::take_due_slots`).
    async fn next_due_slot(&self) -> Option<Instant> {
        loop {
            let changed = self.scheduler.changed();
            // Whatever woke us, waiting lookups without a start slot get one booked.
            self.scheduler.replenish();
            let now = Instant::now();
            match self.scheduler.next_slot() {
                Some(slot) if slot <= now => {
                    let (usable, taken) = self.scheduler.take_due_slots(now);
                    let late = taken - usize::from(usable.is_some());
                    for _ in 0..late {
                        self.metrics.unused_slot(SlotUnused::Late);
                    }
                    if late > 0 {
                        tracing::debug!(
                            late,
                            behind_ms = now.saturating_duration_since(slot).as_secs_f64() * 1e3,
                            "due slots reached too late"
                        );
                    }
                    return usable;
                }
                next => {
                    let deadline = self.scheduler.next_deadline();
                    tokio::select! {
                        () = sleep_until_opt(next, Duration::ZERO) => {}
                        () = changed => {}
                        () = sleep_until_opt(deadline, Duration::from_millis(1)) => {
                            self.scheduler.expire();
                        }
                    }
                }
            }
        }
    }

    async fn call(
        self: Arc<Self>,
        flight: Arc<Flight>,
        in_flight_permit: OwnedSemaphorePermit,
        started: Instant,
    ) {
        let completion = Completion::new(&self.scheduler, &flight);
        let attempt = flight.start_attempt();
        self.metrics.upstream_call_started();
        let in_flight_gauge =
            crate::telemetry::metrics::GaugeGuard::new(self.metrics.upstream_in_flight());
        let span = telemetry::upstream_span(&flight.origin, attempt, self.upstream.url());
        let traceparent = telemetry::traceparent_for(&span, &flight.origin.trace);
        let result = self
            .upstream
            .call(&flight.key, traceparent)
            .instrument(span.clone())
            .await;
        drop(in_flight_gauge);
        drop(in_flight_permit);
        let took = result.finished_at.saturating_duration_since(started);
        self.metrics
            .upstream_call(result.status, result.outcome, took);
        self.recent.call(started, took, result.outcome);
        telemetry::record_upstream_result(&span, result.status, result.outcome);
        flight.update_info(|info| {
            info.upstream_status = result.status;
            info.upstream_took = Some(took);
        });
        let answered = self.learn(result.outcome, started, result.finished_at, took);
        if let Some(next) = self.gate.call_ended(started, result.finished_at, answered) {
            self.pacer.settle(started, next);
        }

        let verdict = match result.outcome {
            UpstreamOutcome::Ok => CallVerdict::Success,
            UpstreamOutcome::Unauthorized
            | UpstreamOutcome::RejectedInput
            | UpstreamOutcome::Penalty => CallVerdict::Neutral,
            UpstreamOutcome::ServerError
            | UpstreamOutcome::UnexpectedStatus
            | UpstreamOutcome::BadBody
            | UpstreamOutcome::Timeout
            | UpstreamOutcome::ConnectError => CallVerdict::Failure,
        };
        if self.breaker.record(verdict, result.finished_at) == Some(BreakerState::Open) {
            tracing::warn!(
                cooldown_seconds = self.breaker_cooldown.as_secs_f64(),
                "circuit breaker open: the upstream keeps failing"
            );
            self.scheduler.fail_queued(self.breaker_cooldown);
        }

        match result.outcome {
            UpstreamOutcome::Ok => {
                let score = CachedScore {
                    body: result.body.unwrap_or_default(),
                    fetched_at: std::time::Instant::now(),
                };
                self.scheduler.finish(&flight, Ok(score));
            }
            UpstreamOutcome::Penalty => {
                let penalty = result.retry_after.unwrap_or(self.default_penalty);
                // Measured from when the 429 reached us, which is after the upstream started
                // counting: the pause can only err on the long side.
                let until = result.finished_at + penalty + self.guard.current();
                let paused_from = self
                    .pacer
                    .penalty_until()
                    .map_or(result.finished_at, |t| t.max(result.finished_at));
                self.pacer.penalize(until).await;
                self.recent.penalty(result.finished_at, until);
                self.scheduler.void_slots_before(until);
                self.metrics.penalty_received();
                self.metrics
                    .penalty_paused(until.saturating_duration_since(paused_from));
                tracing::warn!(
                    penalty_seconds = penalty.as_secs_f64(),
                    attempt,
                    "upstream penalty: pausing all upstream calls"
                );
                // Retry the same lookup after the penalty if it can still start in time;
                // then answer anyone else the pause pushed past their deadline.
                self.scheduler.retry(&flight);
                self.scheduler.replenish();
                self.scheduler.expire();
            }
            _ => self.scheduler.finish(&flight, Err(result.error())),
        }
        completion.answered();
    }
}

/// Sleeps until `at + after` (forever for `None`). Deadline sweeps wake a millisecond after
/// the deadline, so that the lookup is certainly past it when `expire` looks (with a paused
/// clock, "at" would never be "after").
async fn sleep_until_opt(at: Option<Instant>, after: Duration) {
    match at {
        Some(at) => tokio::time::sleep_until(at + after).await,
        None => std::future::pending().await,
    }
}

/// Answers the flight if its call task ends without doing so (a panic, the task aborted, or
/// the runtime shutting down), so no waiter is left hanging.
pub(crate) struct Completion<'a> {
    scheduler: &'a Scheduler,
    flight: &'a Arc<Flight>,
    done: bool,
}

impl<'a> Completion<'a> {
    pub(crate) fn new(scheduler: &'a Scheduler, flight: &'a Arc<Flight>) -> Self {
        Completion {
            scheduler,
            flight,
            done: false,
        }
    }

    /// The call task answered the flight (or put it back in the queue) itself.
    pub(crate) fn answered(mut self) {
        self.done = true;
    }
}

impl Drop for Completion<'_> {
    fn drop(&mut self) {
        if !self.done {
            self.scheduler.finish(
                self.flight,
                Err(crate::lookup::error::ProxyError::ShuttingDown),
            );
        }
    }
}
