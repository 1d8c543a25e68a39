//! The circuit breaker: when the upstream keeps failing, stop queueing lookups that cannot
//! succeed.
//!
//! After `threshold` consecutive failed calls (5xx, timeouts, connection failures, unreadable
//! bodies; not 401/400, which are the caller's, nor 429, which pacing handles) the breaker
//! opens: admission refuses lookups at once with `503 circuit_open` and a `Retry-After` until
//! the cool-down ends, and everything queued is answered the same way. Then it is half-open:
//! lookups queue again, but the dispatcher starts only one call, the probe, and waits for its
//! outcome: success closes the breaker, failure opens it for another cool-down.

use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// The breaker's state, as `/ready`, `/status` and the `score_proxy_breaker_state{state}`
/// series show it (spelled from the variant's name).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, strum::IntoStaticStr, strum::VariantArray)]
#[strum(serialize_all = "snake_case")]
pub(crate) enum BreakerState {
    Closed,
    HalfOpen,
    Open,
}

impl BreakerState {
    pub(crate) fn as_str(self) -> &'static str {
        self.into()
    }
}

/// How a call ended, as far as the breaker cares.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum CallVerdict {
    Success,
    Failure,
    /// Says nothing about the upstream's health (401, 400, 429).
    Neutral,
}

#[derive(Debug)]
enum Inner {
    Closed { failures: u32 },
    Open { until: Instant },
    HalfOpen { probing: bool },
}

pub struct Breaker {
    threshold: u32,
    on_transition: Box<dyn Fn(BreakerState) + Send + Sync>,
    cooldown: Duration,
    inner: Mutex<Inner>,
}

impl Breaker {
    /// `threshold == 0` disables the breaker (it never opens). `on_transition` is called,
    /// under the breaker's lock, with every new state (for metrics and logs: keep it cheap).
    pub(crate) fn new(
        threshold: u32,
        cooldown: Duration,
        on_transition: impl Fn(BreakerState) + Send + Sync + 'static,
    ) -> Self {
        Breaker {
            threshold,
            on_transition: Box::new(on_transition),
            cooldown,
            inner: Mutex::new(Inner::Closed { failures: 0 }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Moves an expired open state to half-open.
    fn settle(&self, inner: &mut Inner, now: Instant) {
        if let Inner::Open { until } = *inner
            && now >= until
        {
            *inner = Inner::HalfOpen { probing: false };
            (self.on_transition)(BreakerState::HalfOpen);
        }
    }

    pub(crate) fn state(&self) -> BreakerState {
        let mut inner = self.lock();
        self.settle(&mut inner, Instant::now());
        match *inner {
            Inner::Closed { .. } => BreakerState::Closed,
            Inner::Open { .. } => BreakerState::Open,
            Inner::HalfOpen { .. } => BreakerState::HalfOpen,
        }
    }

    /// Admission: `Err(retry_after)` while open.
    pub(crate) fn admit(&self, now: Instant) -> Result<(), Duration> {
        let mut inner = self.lock();
        self.settle(&mut inner, now);
        match *inner {
            Inner::Open { until } => Err(until - now),
            _ => Ok(()),
        }
    }

    /// The dispatcher asks before each start. In the half-open state only one call (the
    /// probe) may be under way; `false` means the start slot in hand passes unused (the
    /// dispatcher counts it as `breaker` and moves on to the next one).
    pub(crate) fn may_start(&self, now: Instant) -> bool {
        let mut inner = self.lock();
        self.settle(&mut inner, now);
        match &mut *inner {
            Inner::Closed { .. } => true,
            Inner::Open { .. } => false,
            Inner::HalfOpen { probing } if !*probing => {
                *probing = true;
                true
            }
            Inner::HalfOpen { .. } => false,
        }
    }

    /// A call granted by [`Breaker::may_start`] was not made after all (nobody waited).
    pub(crate) fn start_cancelled(&self) {
        if let Inner::HalfOpen { probing } = &mut *self.lock() {
            *probing = false;
        }
    }

    /// Records a call's outcome. Returns the new state if it changed.
    pub(crate) fn record(&self, verdict: CallVerdict, now: Instant) -> Option<BreakerState> {
        if self.threshold == 0 {
            return None;
        }
        let mut inner = self.lock();
        self.settle(&mut inner, now);
        let next = match (&mut *inner, verdict) {
            (Inner::Closed { failures }, CallVerdict::Failure) => {
                *failures += 1;
                (*failures >= self.threshold).then_some(Inner::Open {
                    until: now + self.cooldown,
                })
            }
            (Inner::Closed { failures }, CallVerdict::Success) => {
                *failures = 0;
                None
            }
            (Inner::HalfOpen { .. }, CallVerdict::Success) => Some(Inner::Closed { failures: 0 }),
            (Inner::HalfOpen { .. }, CallVerdict::Failure) => Some(Inner::Open {
                until: now + self.cooldown,
            }),
            (Inner::HalfOpen { probing }, CallVerdict::Neutral) => {
                // The probe told us nothing: let another call probe.
                *probing = false;
                None
            }
            // Late answers to calls started before the breaker opened change nothing.
            (Inner::Open { .. }, _) | (Inner::Closed { .. }, CallVerdict::Neutral) => None,
        }?;
        let state = match next {
            Inner::Closed { .. } => BreakerState::Closed,
            Inner::Open { .. } => BreakerState::Open,
            Inner::HalfOpen { .. } => BreakerState::HalfOpen,
        };
        *inner = next;
        (self.on_transition)(state);
        Some(state)
    }

    /// When an open breaker turns half-open, if it is open.
    pub fn open_until(&self) -> Option<Instant> {
        match *self.lock() {
            Inner::Open { until } => Some(until),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const COOL: Duration = Duration::from_secs(10);

    #[tokio::test(start_paused = true)]
    async fn opens_after_consecutive_failures_and_probes_once() {
        let b = Breaker::new(3, COOL, |_| {});
        let t0 = Instant::now();
        assert_eq!(b.record(CallVerdict::Failure, t0), None);
        assert_eq!(
            b.record(CallVerdict::Success, t0),
            None,
            "a success resets the count"
        );
        assert_eq!(b.record(CallVerdict::Failure, t0), None);
        assert_eq!(
            b.record(CallVerdict::Neutral, t0),
            None,
            "a 401 says nothing"
        );
        assert_eq!(b.record(CallVerdict::Failure, t0), None);
        assert_eq!(b.record(CallVerdict::Failure, t0), Some(BreakerState::Open));
        assert_eq!(b.admit(t0), Err(COOL));
        assert!(!b.may_start(t0));

        tokio::time::advance(COOL).await;
        let t1 = Instant::now();
        assert_eq!(b.admit(t1), Ok(()));
        assert_eq!(b.state(), BreakerState::HalfOpen);
        assert!(b.may_start(t1), "the probe");
        assert!(!b.may_start(t1), "only one probe at a time");
        assert_eq!(b.record(CallVerdict::Failure, t1), Some(BreakerState::Open));
        assert_eq!(b.admit(t1), Err(COOL));

        tokio::time::advance(COOL).await;
        let t2 = Instant::now();
        assert!(b.may_start(t2));
        b.start_cancelled();
        assert!(b.may_start(t2), "a cancelled probe frees the slot");
        assert_eq!(
            b.record(CallVerdict::Success, t2),
            Some(BreakerState::Closed)
        );
        assert!(b.may_start(t2) && b.may_start(t2));
    }

    #[test]
    fn zero_threshold_never_opens() {
        let b = Breaker::new(0, COOL, |_| {});
        let now = Instant::now();
        for _ in 0..100 {
            assert_eq!(b.record(CallVerdict::Failure, now), None);
        }
        assert_eq!(b.admit(now), Ok(()));
    }
}
