//! The last minute or so of this process's upstream calls and penalties, for the status
//! page's timeline (`GET /status/feed`).
//!
//! Prometheus counters say how many calls there were, not when: a person watching the
//! budget wants to see one mark per call, a second apart, and the gap a penalty leaves. This
//! is a small ring, bounded both in entries and in age, written once per upstream call (at
//! most the configured rate, a few per second) by the call task and read once per poll by
//! the feed. Its one mutex is never taken on the cache-hit path, never held across an
//! `.await`, and held only to push or copy a few hundred small records. Nothing in it names
//! a person: an instant, a duration and an outcome per call.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;

use crate::lookup::upstream::UpstreamOutcome;

/// How far back the ring keeps calls; the page shows the last minute.
pub(crate) const KEEP_FOR: Duration = Duration::from_secs(90);

/// Most calls the ring holds, whatever the rate (at 10 calls/s, 90 s is 900 calls).
pub(crate) const MAX_CALLS: usize = 1024;

/// Most penalty spans kept: each one pauses every call for seconds, so a minute holds few.
const MAX_PENALTIES: usize = 64;

/// One upstream call: when it started, how long it took, and what it came to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct CallMark {
    pub(crate) started: Instant,
    pub(crate) took: Duration,
    pub(crate) outcome: UpstreamOutcome,
}

/// The outcome of a call as the page colours it: three classes, each with its own label.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum CallClass {
    /// The upstream answered a score.
    Ok,
    /// The upstream answered 429: the call cost a penalty.
    Penalised,
    /// Anything else: refused input or credentials, a server error, a timeout, a broken
    /// connection, a body that is not a score.
    Error,
}

impl CallClass {
    pub(crate) fn of(outcome: UpstreamOutcome) -> CallClass {
        match outcome {
            UpstreamOutcome::Ok => CallClass::Ok,
            UpstreamOutcome::Penalty => CallClass::Penalised,
            _ => CallClass::Error,
        }
    }
}

/// The ring of recent calls and penalties, and the count of every call since start-up.
#[derive(Default)]
pub(crate) struct RecentCalls {
    inner: Mutex<Inner>,
    /// Every call that finished since start-up (not bounded by the ring).
    total: AtomicU64,
}

#[derive(Default)]
struct Inner {
    calls: VecDeque<CallMark>,
    /// `(from, until)`: when the 429 arrived, and when calls may start again.
    penalties: VecDeque<(Instant, Instant)>,
}

/// A copy of the ring, taken at `now`.
#[derive(Clone, Debug, Default)]
pub(crate) struct RecentSnapshot {
    pub(crate) calls: Vec<CallMark>,
    pub(crate) penalties: Vec<(Instant, Instant)>,
    pub(crate) total: u64,
}

impl RecentCalls {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding this lock can only have happened between two plain pushes:
        // the ring is still a valid ring.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// One upstream call finished.
    pub(crate) fn call(&self, started: Instant, took: Duration, outcome: UpstreamOutcome) {
        self.total.fetch_add(1, Ordering::Relaxed);
        let mut inner = self.lock();
        let Inner { calls, .. } = &mut *inner;
        while calls.len() >= MAX_CALLS
            || calls
                .front()
                .is_some_and(|c| started.saturating_duration_since(c.started) > KEEP_FOR)
        {
            calls.pop_front();
        }
        calls.push_back(CallMark {
            started,
            took,
            outcome,
        });
    }

    /// A 429 arrived at `from`: no call starts before `until`.
    pub(crate) fn penalty(&self, from: Instant, until: Instant) {
        let mut inner = self.lock();
        let penalties = &mut inner.penalties;
        while penalties.len() >= MAX_PENALTIES
            || penalties
                .front()
                .is_some_and(|&(_, end)| from.saturating_duration_since(end) > KEEP_FOR)
        {
            penalties.pop_front();
        }
        penalties.push_back((from, until));
    }

    /// Every call finished since start-up.
    pub(crate) fn total(&self) -> u64 {
        self.total.load(Ordering::Relaxed)
    }

    /// The calls that started, and the penalties that ended, within `window` before `now`.
    pub(crate) fn snapshot(&self, now: Instant, window: Duration) -> RecentSnapshot {
        let since = now.checked_sub(window);
        let after = |t: Instant| since.is_none_or(|s| t >= s);
        // The total first: a call recorded between the two reads is then in the ring but
        // not the total, never the other way round (the page's count never runs ahead of
        // its marks).
        let total = self.total();
        let inner = self.lock();
        RecentSnapshot {
            calls: inner
                .calls
                .iter()
                .filter(|c| after(c.started))
                .copied()
                .collect(),
            penalties: inner
                .penalties
                .iter()
                .filter(|&&(_, until)| after(until))
                .copied()
                .collect(),
            total,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(base: Instant, ms: u64) -> Instant {
        base + Duration::from_millis(ms)
    }

    #[test]
    fn keeps_the_recent_window_and_counts_everything() {
        let base = Instant::now();
        let ring = RecentCalls::default();
        for i in 0..200 {
            ring.call(
                at(base, i * 1000),
                Duration::from_millis(20),
                UpstreamOutcome::Ok,
            );
        }
        assert_eq!(ring.total(), 200);
        let now = at(base, 199_500);
        let snap = ring.snapshot(now, Duration::from_secs(60));
        // Starts at 140 s .. 199 s: sixty calls in the last minute.
        assert_eq!(snap.calls.len(), 60);
        assert_eq!(snap.calls[0].started, at(base, 140_000));
        assert_eq!(snap.total, 200);
        // The ring itself holds no more than its age bound.
        assert!(ring.lock().calls.len() <= 91);
    }

    #[test]
    fn is_bounded_in_entries_whatever_the_rate() {
        let base = Instant::now();
        let ring = RecentCalls::default();
        for i in 0..5000 {
            ring.call(at(base, i), Duration::ZERO, UpstreamOutcome::Timeout);
        }
        assert_eq!(ring.lock().calls.len(), MAX_CALLS);
        assert_eq!(ring.total(), 5000);
        for i in 0..500 {
            ring.penalty(at(base, i), at(base, i + 2000));
        }
        assert_eq!(ring.lock().penalties.len(), MAX_PENALTIES);
    }

    #[test]
    fn penalties_are_kept_while_they_end_inside_the_window() {
        let base = Instant::now();
        let ring = RecentCalls::default();
        ring.penalty(at(base, 0), at(base, 2_000));
        ring.penalty(at(base, 100_000), at(base, 102_000));
        let snap = ring.snapshot(at(base, 101_000), Duration::from_secs(60));
        assert_eq!(snap.penalties, vec![(at(base, 100_000), at(base, 102_000))]);
    }

    #[test]
    fn outcomes_fall_in_three_labelled_classes() {
        assert_eq!(CallClass::of(UpstreamOutcome::Ok), CallClass::Ok);
        assert_eq!(
            CallClass::of(UpstreamOutcome::Penalty),
            CallClass::Penalised
        );
        for o in [
            UpstreamOutcome::Timeout,
            UpstreamOutcome::ServerError,
            UpstreamOutcome::Unauthorized,
            UpstreamOutcome::ConnectError,
        ] {
            assert_eq!(CallClass::of(o), CallClass::Error);
        }
    }
}
