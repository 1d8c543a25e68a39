//! The dispatcher: the one task that turns queued lookups into upstream calls.
//!
//! Its loop is the pacing pipeline, in order: wait for a queued lookup, take a concurrency
//! slot, pop the next lookup in fair order, wait for the pacer, claim the start (the last
//! chance to notice that nobody waits any more), and launch the call on its own task. Calls
//! overlap: a slow upstream does not delay the next start, up to `max_in_flight` calls.
//!
//! The call task handles what the upstream answered: a score goes to the cache and every
//! waiter, a 429 pauses all calls for the penalty and puts the lookup back at the front of
//! the queue while its deadline allows, anything else becomes an honest error.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tracing::Instrument;

use crate::breaker::{Breaker, BreakerState, CallVerdict};
use crate::cache::CachedScore;
use crate::metrics::{Metrics, UpstreamOutcome};
use crate::pacing::Limiter;
use crate::scheduler::{Flight, Scheduler};
use crate::telemetry;
use crate::upstream::UpstreamClient;

pub struct Dispatcher {
    pub scheduler: Arc<Scheduler>,
    pub limiter: Arc<dyn Limiter>,
    pub breaker: Arc<Breaker>,
    pub upstream: Arc<UpstreamClient>,
    pub metrics: Arc<Metrics>,
    pub in_flight: Arc<Semaphore>,
    /// The penalty assumed when a 429 carries no usable `Retry-After`.
    pub default_penalty: Duration,
    /// Added to every penalty, as to every interval: our clock and the upstream's differ.
    pub guard: Duration,
    pub breaker_cooldown: Duration,
}

impl Dispatcher {
    /// Runs until the task is aborted.
    pub async fn run(self: Arc<Self>) {
        loop {
            self.scheduler.wait_for_work().await;

            // A concurrency slot first, so that the start the pacer grants is used at once.
            let slot = self
                .sweeping(self.in_flight.clone().acquire_owned())
                .await
                .expect("the semaphore is never closed");

            // The breaker: nothing starts while it is open, one probe while half-open.
            self.sweeping(self.breaker_allows()).await;

            let Some(next) = self.scheduler.pop_next() else {
                self.breaker.start_cancelled();
                continue;
            };

            let waiting_since = Instant::now();
            let permit_span = telemetry::permit_span(&next);
            let started = self
                .sweeping(self.limiter.acquire())
                .instrument(permit_span)
                .await;
            self.metrics.permit_wait(started - waiting_since);

            let Some(flight) = self.scheduler.claim(started) else {
                self.metrics.unused_slot();
                self.breaker.start_cancelled();
                continue;
            };
            self.metrics
                .queue_wait(started.saturating_duration_since(flight.admitted_at));
            tokio::spawn(self.clone().call(flight, slot, started));
        }
    }

    /// Resolves once the breaker lets a call start (at once while it is closed).
    async fn breaker_allows(&self) {
        loop {
            let mut changed = self.breaker.changed();
            if self.breaker.may_start(Instant::now()) {
                return;
            }
            let reopen = self.breaker.open_until();
            tokio::select! {
                _ = changed.changed() => {}
                () = sleep_until_opt(reopen) => {}
            }
        }
    }

    /// Awaits `fut` while answering, at their deadlines, queued lookups that can no longer
    /// start in time (calls that take longer than predicted can push them out).
    async fn sweeping<F: Future>(&self, fut: F) -> F::Output {
        tokio::pin!(fut);
        loop {
            let next = self.scheduler.next_deadline();
            tokio::select! {
                biased;
                out = &mut fut => return out,
                () = sleep_until_opt(next) => self.scheduler.expire(),
            }
        }
    }

    async fn call(
        self: Arc<Self>,
        flight: Arc<Flight>,
        slot: OwnedSemaphorePermit,
        started: Instant,
    ) {
        let mut completion = Completion {
            scheduler: &self.scheduler,
            flight: &flight,
            done: false,
        };
        let attempt = flight.start_attempt();
        let in_flight = crate::metrics::GaugeGuard::new(self.metrics.upstream_in_flight());
        let span = telemetry::upstream_span(&flight, attempt, self.upstream.url());
        let traceparent = telemetry::traceparent_for(&span, &flight.origin.trace);
        let result = self
            .upstream
            .call(&flight.key, traceparent)
            .instrument(span.clone())
            .await;
        drop(in_flight);
        drop(slot);
        let took = result.finished_at.saturating_duration_since(started);
        self.metrics
            .upstream_call(result.status, result.outcome, took);
        telemetry::record_upstream_result(&span, result.status, result.outcome);
        flight.update_info(|info| {
            info.upstream_status = result.status;
            info.upstream_took = Some(took);
        });

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
                let until = result.finished_at + penalty + self.guard;
                let paused_from = self
                    .limiter
                    .penalty_until()
                    .map_or(result.finished_at, |t| t.max(result.finished_at));
                self.limiter.penalize(until);
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
                self.scheduler.expire();
            }
            _ => self.scheduler.finish(&flight, Err(result.error())),
        }
        completion.done = true;
    }
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        // A millisecond late, so that the lookup is certainly past its deadline when
        // `expire` looks (with a paused clock, "at" would never be "after").
        Some(at) => tokio::time::sleep_until(at + Duration::from_millis(1)).await,
        None => std::future::pending().await,
    }
}

/// Answers the flight if its call task ends without doing so (a panic, or the runtime
/// shutting down), so no waiter is left hanging.
struct Completion<'a> {
    scheduler: &'a Scheduler,
    flight: &'a Arc<Flight>,
    done: bool,
}

impl Drop for Completion<'_> {
    fn drop(&mut self) {
        if !self.done {
            self.scheduler
                .finish(self.flight, Err(crate::error::ProxyError::ShuttingDown));
        }
    }
}
