//! The rate rule's judge and the record of everything that arrived.
//!
//! Both live in one [`State`] behind one mutex so that judging an arrival and recording it
//! happen in the same critical section: a test that reads the stats never sees a call
//! counted but not yet judged. The lock is only ever held for plain bookkeeping, never
//! across an `.await`.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::config::SimulatorConfig;
use super::delay::SplitMix64;

/// How many arrivals are kept for inspection. Beyond this only the counters grow, so a
/// long soak run cannot exhaust memory; [`SimStats::arrivals_dropped`] says how many
/// were not kept.
pub const MAX_RECORDED_ARRIVALS: usize = 100_000;

/// The longest `client_id` and `cpf` kept per arrival. They are recorded as received so
/// that tests can check what the proxy sent (e.g. that a CPF was URL-encoded), but a
/// hostile caller must not be able to grow the record without bound.
pub const MAX_RECORDED_FIELD_LEN: usize = 256;

/// One call as the simulator saw it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Arrival {
    /// Unique over the simulator's life (not reset by [`reset`](super::Simulator::reset)),
    /// and the `request_id` of a `200`, so a test can tell a fresh answer from a cached one.
    pub seq: u64,
    /// When the rate rule counted the call, since the simulator was created: when the
    /// handler started plus [`delay`](Self::delay).
    pub at: Duration,
    /// The one-way network delay drawn for this call (zero unless
    /// [`SimulatorConfig::arrival_delay`] is set): the call reached the handler `delay`
    /// before `at`.
    #[serde(default)]
    pub delay: Duration,
    /// The `client-id` header as received (lossily decoded, truncated); empty if absent.
    pub client_id: String,
    /// The `cpf` query parameter as decoded (truncated); empty if absent.
    pub cpf: String,
    /// The status decided at arrival. `0` means no answer is ever sent (the `hang` fault).
    /// The client may have gone away before a decided status was actually sent.
    pub status: u16,
    /// The incoming W3C `traceparent` header, to check that the proxy propagates traces.
    pub traceparent: Option<String>,
    /// Whether the arrival broke the rate rule (and so got `429`).
    pub violation: bool,
}

/// A snapshot of what the simulator has seen since it was created or last reset.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct SimStats {
    /// Every arrival, whatever its outcome; this is what the rate rule counts.
    pub calls: u64,
    /// Arrivals that broke the rate rule.
    pub violations: u64,
    /// Arrivals by decided status (`0` for hung calls). JSON keys are strings.
    pub by_status: BTreeMap<u16, u64>,
    /// The smallest gap between two consecutive arrivals, the number a pacing test asserts
    /// on; `None` until there have been two arrivals.
    pub min_gap_seconds: Option<f64>,
    /// The first [`MAX_RECORDED_ARRIVALS`] arrivals (empty when asked for without them;
    /// `/__sim/stats?arrivals=false` leaves the field out).
    #[serde(default)]
    pub arrivals: Vec<Arrival>,
    /// Arrivals not kept in `arrivals` because the list was full.
    pub arrivals_dropped: u64,
    /// Whether a penalty is running now, i.e. the next arrival would get `429`.
    pub penalty_active: bool,
    /// Score requests currently being handled (including hung ones). It drops when a
    /// client gives up, which is how a test sees that a proxy really abandoned a call.
    #[serde(default)]
    pub in_flight: u64,
}

/// The rate rule's verdict on one arrival.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Admission {
    pub seq: u64,
    /// Arrivals since the last reset, this one included (what `fail_every` counts).
    pub calls: u64,
    pub violation: bool,
}

/// Mutable state: the configuration in force, the rate rule's clock and the recordings.
#[derive(Debug)]
pub(crate) struct State {
    pub config: SimulatorConfig,
    /// Draws arrival delays; seeded from `config.seed` at creation, reset and re-seeding.
    rng: SplitMix64,
    last_arrival: Option<Instant>,
    penalty_until: Option<Instant>,
    last_seq: u64,
    calls: u64,
    violations: u64,
    by_status: BTreeMap<u16, u64>,
    min_gap: Option<Duration>,
    arrivals: Vec<Arrival>,
    arrivals_dropped: u64,
}

impl State {
    pub fn new(config: SimulatorConfig) -> Self {
        Self {
            rng: SplitMix64::new(config.seed),
            config,
            last_arrival: None,
            penalty_until: None,
            last_seq: 0,
            calls: 0,
            violations: 0,
            by_status: BTreeMap::new(),
            min_gap: None,
            arrivals: Vec::new(),
            arrivals_dropped: 0,
        }
    }

    /// Counts an arrival and judges it against the rate rule, starting or extending the
    /// penalty if it breaks it.
    ///
    /// Two handlers may take their `Instant`s in one order and reach the lock in the other;
    /// the gap is then taken as the absolute difference and the clock never moves back,
    /// so such a pair is judged as what it was: two arrivals very close together.
    pub fn admit(&mut self, at: Instant) -> Admission {
        self.last_seq += 1;
        self.calls += 1;

        let gap = self.last_arrival.map(|last| abs_diff(at, last));
        let too_soon = gap.is_some_and(|gap| gap < self.config.min_interval);
        let penalised = self.penalty_until.is_some_and(|until| at < until);
        let violation = too_soon || penalised;

        if let Some(gap) = gap {
            self.min_gap = Some(self.min_gap.map_or(gap, |min| min.min(gap)));
        }
        self.last_arrival = Some(self.last_arrival.map_or(at, |last| last.max(at)));
        if violation {
            self.violations += 1;
            let until = at + self.config.penalty;
            self.penalty_until = Some(self.penalty_until.map_or(until, |old| old.max(until)));
        }
        Admission {
            seq: self.last_seq,
            calls: self.calls,
            violation,
        }
    }

    /// The network delay of the next call to reach the handler.
    pub fn draw_delay(&mut self) -> Duration {
        self.config.arrival_delay.draw(&mut self.rng)
    }

    /// Restarts the delays' sequence from `config.seed`.
    pub fn reseed(&mut self) {
        self.rng = SplitMix64::new(self.config.seed);
    }

    /// Keeps the arrival (while there is room) and counts its status.
    pub fn record(&mut self, arrival: Arrival, cap: usize) {
        *self.by_status.entry(arrival.status).or_default() += 1;
        if self.arrivals.len() < cap {
            self.arrivals.push(arrival);
        } else {
            self.arrivals_dropped += 1;
        }
    }

    /// How long the penalty still runs at `now`, if it does.
    pub fn penalty_remaining(&self, now: Instant) -> Option<Duration> {
        self.penalty_until
            .and_then(|until| until.checked_duration_since(now))
            .filter(|left| !left.is_zero())
    }

    /// When the latest penalty ends (or ended), if there has been one since the last reset.
    pub fn penalty_until(&self) -> Option<Instant> {
        self.penalty_until
    }

    pub fn calls(&self) -> u64 {
        self.calls
    }

    pub fn stats(&self, now: Instant, with_arrivals: bool, in_flight: u64) -> SimStats {
        SimStats {
            calls: self.calls,
            violations: self.violations,
            by_status: self.by_status.clone(),
            min_gap_seconds: self.min_gap.map(|gap| gap.as_secs_f64()),
            arrivals: if with_arrivals {
                self.arrivals.clone()
            } else {
                Vec::new()
            },
            arrivals_dropped: self.arrivals_dropped,
            penalty_active: self.penalty_remaining(now).is_some(),
            in_flight,
        }
    }

    /// Forgets every recording and the rate rule's clock (the last arrival and the
    /// penalty), so that the next call is judged as if it were the first, and restarts
    /// the delays from the seed. Keeps the configuration and the sequence numbers, which
    /// must stay unique.
    pub fn reset(&mut self) {
        *self = Self {
            last_seq: self.last_seq,
            ..Self::new(self.config.clone())
        };
    }
}

fn abs_diff(a: Instant, b: Instant) -> Duration {
    if a >= b { a - b } else { b - a }
}

/// Cuts `s` to at most [`MAX_RECORDED_FIELD_LEN`] bytes, on a character boundary.
pub(crate) fn truncated(s: &str) -> String {
    if s.len() <= MAX_RECORDED_FIELD_LEN {
        return s.to_owned();
    }
    let mut end = MAX_RECORDED_FIELD_LEN;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn state() -> (State, Instant) {
        let config = SimulatorConfig {
            min_interval: ms(1000),
            penalty: ms(2000),
            ..Default::default()
        };
        (State::new(config), Instant::now())
    }

    #[test]
    fn rate_rule_on_a_virtual_clock() {
        let (mut s, t0) = state();
        assert!(!s.admit(t0).violation);
        // 999 ms later: too soon, penalty until 2999.
        assert!(s.admit(t0 + ms(999)).violation);
        // Well spaced from the previous one but inside the penalty; extends it to 4500.
        assert!(s.admit(t0 + ms(2500)).violation);
        // Past the first penalty's end but inside the extended one.
        assert!(s.admit(t0 + ms(4000)).violation);
        assert_eq!(s.penalty_remaining(t0 + ms(4000)), Some(ms(2000)));
        // Past the extended penalty (4000 + 2000) and more than 1 s after the last.
        let a = s.admit(t0 + ms(6000));
        assert!(!a.violation);
        assert_eq!((a.seq, a.calls), (5, 5));
        assert_eq!(s.violations, 3);
        assert_eq!(s.min_gap, Some(ms(999)));
        // Exactly the interval is not too soon.
        assert!(!s.admit(t0 + ms(7000)).violation);
    }

    #[test]
    fn out_of_order_instants_do_not_move_the_clock_back() {
        let (mut s, t0) = state();
        s.admit(t0 + ms(10));
        assert!(s.admit(t0).violation);
        assert_eq!(s.min_gap, Some(ms(10)));
        assert_eq!(s.last_arrival, Some(t0 + ms(10)));
        assert_eq!(s.penalty_until, Some(t0 + ms(2000)));
    }

    #[test]
    fn zero_interval_disables_the_rule() {
        let (mut s, t0) = state();
        s.config.min_interval = Duration::ZERO;
        assert!((0..10).all(|_| !s.admit(t0).violation));
    }

    #[test]
    fn recording_is_capped_but_counted() {
        let (mut s, t0) = state();
        for n in 0..5u16 {
            let a = s.admit(t0);
            let arrival = Arrival {
                seq: a.seq,
                at: Duration::ZERO,
                delay: Duration::ZERO,
                client_id: String::new(),
                cpf: String::new(),
                status: 200 + n % 2,
                traceparent: None,
                violation: a.violation,
            };
            s.record(arrival, 3);
        }
        let stats = s.stats(t0, true, 0);
        assert_eq!(stats.arrivals.len(), 3);
        assert_eq!(stats.arrivals_dropped, 2);
        assert_eq!(stats.by_status, BTreeMap::from([(200, 3), (201, 2)]));
        assert!(s.stats(t0, false, 0).arrivals.is_empty());
    }

    #[test]
    fn reset_keeps_sequence_numbers_and_config() {
        let (mut s, t0) = state();
        s.admit(t0);
        s.admit(t0);
        s.reset();
        assert!(s.penalty_remaining(t0).is_none());
        let a = s.admit(t0);
        assert_eq!((a.seq, a.calls, a.violation), (3, 1, false));
        assert_eq!(s.config.min_interval, ms(1000));
    }

    #[test]
    fn truncation_respects_char_boundaries() {
        let long = "é".repeat(MAX_RECORDED_FIELD_LEN);
        let cut = truncated(&long);
        assert!(cut.len() <= MAX_RECORDED_FIELD_LEN);
        assert!(cut.chars().all(|c| c == 'é'));
        assert_eq!(truncated("short"), "short");
    }
}
