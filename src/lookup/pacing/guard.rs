//! The guard in force: how much more than `1/rate` apart call starts are, learned from what
//! the proxy observes instead of guessed once.
//!
//! The upstream counts arrivals on its own clock. Two calls started `1/rate + guard` apart
//! arrive closer than `1/rate` when the first one's one-way delay exceeds the second one's
//! by more than the guard; on loopback that difference is a timer tick, across the Internet
//! it is tens of milliseconds and changes with the network. A fixed guard costs budget when
//! too high and penalties when too low, so the guard follows two observations:
//!
//! - **the spread of round trips**: a call's round trip contains its one-way delay, so the
//!   spread of recent round trips (a high quantile minus a low one, over a window, so that
//!   one slow connection set-up does not count) bounds how much one arrival can lag another.
//!   The guard is the floor plus that spread: the floor keeps absorbing what it always did
//!   (our timer, our start against the wire), the spread what the network adds;
//! - **penalties**: a `429` for a call this process believed correctly spaced means the
//!   guard was too small for a reason the round trips did not show. It doubles the guard in
//!   force, once per penalty (calls started before the raise are already accounted for),
//!   and the raise decays slowly, by a fraction per clean call, as the calls stay clean.
//!
//! In shared mode the replicas share one upstream, so they share one guard: each replica
//! learns its own as above and reports it with every booking; the booking script keeps the
//! reports of the last minute and spaces the fleet's slots by the largest, which it returns
//! (`shared/scripts/book.lua`). A replica adopts that fleet guard ([`Guard::note_fleet`]) for
//! its own spacing and start gate, but keeps reporting what it learned itself, so the fleet's
//! guard falls again when the replica that raised it sees its raise decay.
//!
//! One-off delays that the spread does not cover (a spike in one call in twenty) are the
//! start gate's: an answered call's round trip less the quickest recent ones bounds how late
//! it arrived, and the next start waits that much more (`StartGate::call_ended`).
//!
//! The result is clamped between `--rate-guard` (the floor) and `--rate-guard-max` (the
//! ceiling). With no spread and no penalty it stays at the floor: it never grows without a
//! cause. The pacer books slots with the guard in force at booking; the start gate keeps
//! every start the current interval after the last one, so a raise takes effect at the next
//! start even for slots booked before it.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// Round trips kept: about half a minute at 1 call/s, recent enough to follow a network
/// that changes, long enough for the quantiles to mean something.
const WINDOW: usize = 32;

/// The quantiles whose difference is the spread (nearest rank). With fewer than 20 round
/// trips in the window they are the extremes: conservative while little is known.
const LOW_QUANTILE: f64 = 0.05;
const HIGH_QUANTILE: f64 = 0.95;

/// Round trips to know before their quickest is trusted as the network's (see
/// [`Guard::excess`]).
const WARM_UP: usize = 8;

/// Each clean call takes this fraction off the penalty raise: it halves in about 22 calls.
const DECAY_PER_CLEAN_CALL: f64 = 1.0 / 32.0;

/// Spread below this is our own timer's and scheduler's noise, which the floor is there for
/// (loopback round trips differ by a few tenths of a millisecond): the guard does not grow
/// for it.
const SPREAD_NOISE: Duration = Duration::from_millis(1);

/// Why the guard in force is what it is (the `reason` label: the name in snake case).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, strum::IntoStaticStr, strum::VariantArray)]
#[strum(serialize_all = "snake_case")]
pub(crate) enum GuardReason {
    /// Nothing observed calls for more than `--rate-guard`.
    Floor,
    /// The floor plus the spread of recent round trips.
    RttSpread,
    /// Raised after a penalty, and not yet decayed below the round-trip bound.
    Penalty,
    /// Shared mode: another replica learned a larger guard, and the fleet spaces by it.
    Fleet,
}

impl GuardReason {
    pub(crate) fn as_str(self) -> &'static str {
        self.into()
    }
}

/// The learned guard; see the module docs. Cheap to read (a mutex held for a few
/// instructions, never across an `.await`).
pub(crate) struct Guard {
    floor: Duration,
    ceiling: Duration,
    state: Mutex<GuardState>,
}

struct GuardState {
    /// The latest round trips, oldest first.
    rtts: VecDeque<Duration>,
    /// What the last penalty raised the guard to, decaying with each clean call.
    raised: Duration,
    /// When the last raise happened: a 429 for a call started before it is a consequence
    /// of the penalty already counted, not a new sign.
    last_raise: Option<Instant>,
    /// What this process learned itself (what it reports to the fleet).
    own: Duration,
    /// The largest guard the fleet's replicas reported lately (shared mode; zero alone).
    fleet: Duration,
    in_force: Duration,
    reason: GuardReason,
}

impl Guard {
    /// A guard that learns between `floor` and `ceiling` (a ceiling under the floor is taken
    /// as the floor: a fixed guard).
    pub(crate) fn new(floor: Duration, ceiling: Duration) -> Self {
        Guard {
            floor,
            ceiling: ceiling.max(floor),
            state: Mutex::new(GuardState {
                rtts: VecDeque::with_capacity(WINDOW),
                raised: Duration::ZERO,
                last_raise: None,
                own: floor,
                fleet: Duration::ZERO,
                in_force: floor,
                reason: GuardReason::Floor,
            }),
        }
    }

    /// A guard that never moves (`--rate-guard-max` equal to `--rate-guard`).
    #[cfg(test)]
    pub(crate) fn fixed(guard: Duration) -> Self {
        Self::new(guard, guard)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, GuardState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The guard in force.
    pub(crate) fn current(&self) -> Duration {
        self.lock().in_force
    }

    /// The guard in force and why.
    pub(crate) fn snapshot(&self) -> (Duration, GuardReason) {
        let state = self.lock();
        (state.in_force, state.reason)
    }

    /// How much later than the quickest recent round trips (the window's low quantile) a
    /// call that took `rtt` may have arrived, beyond the noise the floor is there for. While
    /// fewer than [`WARM_UP`] round trips are known, the quickest of them may be far above
    /// the network's quickest, so the whole round trip counts.
    pub(crate) fn excess(&self, rtt: Duration) -> Duration {
        let state = self.lock();
        let quickest = if state.rtts.len() < WARM_UP {
            Duration::ZERO
        } else {
            quantile(&state.rtts, LOW_QUANTILE).unwrap_or_default()
        };
        rtt.saturating_sub(quickest).saturating_sub(SPREAD_NOISE)
    }

    /// What this process learned by itself, whatever the fleet's guard: what a replica
    /// reports with its bookings.
    pub(crate) fn own(&self) -> Duration {
        self.lock().own
    }

    /// Shared mode: the fleet's guard as the latest booking returned it (the largest guard
    /// any replica reported lately, this one's included). Taken as a lower bound.
    pub(crate) fn note_fleet(&self, fleet: Duration) {
        let mut state = self.lock();
        state.fleet = fleet;
        self.settle(&mut state);
    }

    pub(crate) fn floor(&self) -> Duration {
        self.floor
    }

    pub(crate) fn ceiling(&self) -> Duration {
        self.ceiling
    }

    /// A call the upstream answered without a penalty took `rtt` from its start to its
    /// answer: one more round trip for the spread, and one clean call for the decay.
    pub(crate) fn clean_call(&self, rtt: Duration) {
        let mut state = self.lock();
        push_rtt(&mut state.rtts, rtt);
        state.raised = state.raised.mul_f64(1.0 - DECAY_PER_CLEAN_CALL);
        self.settle(&mut state);
    }

    /// A call started at `started` was answered `429` at `now`, after `rtt`. Raises the
    /// guard (doubling the guard in force) unless the call started before the last raise.
    /// Returns whether it raised.
    pub(crate) fn penalised(&self, started: Instant, now: Instant, rtt: Duration) -> bool {
        let mut state = self.lock();
        push_rtt(&mut state.rtts, rtt);
        let new_sign = state.last_raise.is_none_or(|raise| started > raise);
        if new_sign {
            let base = state.in_force.max(self.floor).max(Duration::from_millis(1));
            state.raised = (base * 2).min(self.ceiling);
            state.last_raise = Some(now);
        }
        self.settle(&mut state);
        new_sign
    }

    /// Recomputes the guard in force from the observations.
    fn settle(&self, state: &mut GuardState) {
        let by_rtt = self.floor + spread(&state.rtts).saturating_sub(SPREAD_NOISE);
        let (own, own_reason) = if state.raised > by_rtt {
            (state.raised, GuardReason::Penalty)
        } else if by_rtt > self.floor {
            (by_rtt, GuardReason::RttSpread)
        } else {
            (self.floor, GuardReason::Floor)
        };
        state.own = own.clamp(self.floor, self.ceiling);
        let (wanted, reason) = if state.fleet > state.own {
            (state.fleet, GuardReason::Fleet)
        } else {
            (state.own, own_reason)
        };
        state.in_force = wanted.clamp(self.floor, self.ceiling);
        // A guard pinned at the floor is the floor's doing whatever asked for less.
        state.reason = if state.in_force == self.floor {
            GuardReason::Floor
        } else {
            reason
        };
    }
}

fn push_rtt(rtts: &mut VecDeque<Duration>, rtt: Duration) {
    if rtts.len() == WINDOW {
        rtts.pop_front();
    }
    rtts.push_back(rtt);
}

/// The high quantile minus the low one (nearest rank); zero with fewer than two.
fn spread(rtts: &VecDeque<Duration>) -> Duration {
    if rtts.len() < 2 {
        return Duration::ZERO;
    }
    let high = quantile(rtts, HIGH_QUANTILE).unwrap_or_default();
    high.saturating_sub(quantile(rtts, LOW_QUANTILE).unwrap_or_default())
}

/// The `q` quantile of the window (nearest rank); `None` when it is empty.
fn quantile(rtts: &VecDeque<Duration>, q: f64) -> Option<Duration> {
    let mut sorted: Vec<Duration> = rtts.iter().copied().collect();
    sorted.sort_unstable();
    let last = sorted.len().checked_sub(1)?;
    Some(sorted[(last as f64 * q).round() as usize])
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[tokio::test(start_paused = true)]
    async fn with_no_spread_it_stays_at_the_floor() {
        let guard = Guard::new(10 * MS, 100 * MS);
        assert_eq!(guard.snapshot(), (10 * MS, GuardReason::Floor));
        for _ in 0..100 {
            guard.clean_call(3 * MS);
        }
        assert_eq!(guard.snapshot(), (10 * MS, GuardReason::Floor));
    }

    #[tokio::test(start_paused = true)]
    async fn it_follows_the_spread_of_round_trips_robustly() {
        let guard = Guard::new(10 * MS, 100 * MS);
        // Round trips from 5 to 35 ms: 30 ms of spread on top of the floor.
        for i in 0..WINDOW as u32 {
            guard.clean_call((5 + i * 30 / (WINDOW as u32 - 1)) * MS);
        }
        let (g, reason) = guard.snapshot();
        assert_eq!(reason, GuardReason::RttSpread);
        assert!((35 * MS..=40 * MS).contains(&g), "{g:?}");
        // One slow round trip (a connection set-up) does not move it much...
        guard.clean_call(500 * MS);
        assert!(guard.current() <= 41 * MS, "{:?}", guard.current());
        // ...and once the network is quiet again the window forgets the spread.
        for _ in 0..WINDOW {
            guard.clean_call(5 * MS);
        }
        assert_eq!(guard.snapshot(), (10 * MS, GuardReason::Floor));
    }

    #[tokio::test(start_paused = true)]
    async fn a_penalty_raises_it_and_clean_calls_let_it_decay() {
        let guard = Guard::new(10 * MS, 100 * MS);
        let t0 = Instant::now();
        tokio::time::advance(MS).await;
        assert!(guard.penalised(t0, Instant::now(), 2 * MS));
        assert_eq!(guard.snapshot(), (20 * MS, GuardReason::Penalty));
        // A 429 for a call started before the raise is the same penalty: no second raise.
        assert!(!guard.penalised(t0, Instant::now(), 2 * MS));
        assert_eq!(guard.current(), 20 * MS);
        // A call started after it that is penalised again raises again.
        tokio::time::advance(MS).await;
        let later = Instant::now();
        tokio::time::advance(MS).await;
        assert!(guard.penalised(later, Instant::now(), 2 * MS));
        assert_eq!(guard.current(), 40 * MS);

        // Clean calls: it decays, slowly, and never under the floor.
        let mut previous = guard.current();
        for _ in 0..10 {
            guard.clean_call(2 * MS);
            let now = guard.current();
            assert!(now < previous, "{now:?} after {previous:?}");
            previous = now;
        }
        assert!(previous > 25 * MS, "slow decay: {previous:?}");
        for _ in 0..200 {
            guard.clean_call(2 * MS);
        }
        assert_eq!(guard.snapshot(), (10 * MS, GuardReason::Floor));
    }

    #[tokio::test(start_paused = true)]
    async fn it_never_leaves_floor_and_ceiling() {
        let guard = Guard::new(10 * MS, 100 * MS);
        for _ in 0..10 {
            tokio::time::advance(MS).await;
            let started = Instant::now();
            tokio::time::advance(MS).await;
            guard.penalised(started, Instant::now(), MS);
            assert!(guard.current() <= 100 * MS);
        }
        assert_eq!(guard.snapshot(), (100 * MS, GuardReason::Penalty));
        // A spread far above the ceiling is clamped too.
        for i in 0..WINDOW as u32 {
            guard.clean_call(i * 50 * MS);
        }
        assert_eq!(guard.current(), 100 * MS);
        for _ in 0..1000 {
            guard.clean_call(MS);
            assert!(guard.current() >= 10 * MS);
        }
        assert_eq!(guard.current(), 10 * MS);

        // A fixed guard never moves.
        let fixed = Guard::fixed(25 * MS);
        let started = Instant::now();
        tokio::time::advance(MS).await;
        fixed.penalised(started, Instant::now(), MS);
        fixed.clean_call(500 * MS);
        fixed.clean_call(MS);
        assert_eq!(fixed.snapshot(), (25 * MS, GuardReason::Floor));
    }

    #[tokio::test(start_paused = true)]
    async fn the_fleets_guard_is_a_lower_bound_that_is_never_reported_back() {
        let guard = Guard::new(10 * MS, 100 * MS);
        guard.note_fleet(40 * MS);
        assert_eq!(guard.snapshot(), (40 * MS, GuardReason::Fleet));
        // What this replica reports stays what it learned itself, so the fleet's guard can
        // fall once the replica that raised it decays.
        assert_eq!(guard.own(), 10 * MS);
        // A penalty raises from the guard in force, the fleet's included.
        let started = Instant::now();
        tokio::time::advance(MS).await;
        assert!(guard.penalised(started, Instant::now(), MS));
        assert_eq!(guard.snapshot(), (80 * MS, GuardReason::Penalty));
        assert_eq!(guard.own(), 80 * MS);
        // The fleet's guard is clamped like the rest, and gone when the fleet reports less.
        guard.note_fleet(500 * MS);
        assert_eq!(guard.snapshot(), (100 * MS, GuardReason::Fleet));
        guard.note_fleet(10 * MS);
        assert_eq!(guard.snapshot(), (80 * MS, GuardReason::Penalty));
    }

    #[tokio::test(start_paused = true)]
    async fn the_excess_counts_the_whole_round_trip_until_the_quickest_is_known() {
        let guard = Guard::new(10 * MS, 100 * MS);
        guard.clean_call(20 * MS);
        // One round trip known: 20 ms may be the network's quickest or a slow one.
        assert_eq!(guard.excess(25 * MS), 24 * MS);
        for _ in 0..WARM_UP {
            guard.clean_call(3 * MS);
        }
        assert_eq!(guard.excess(25 * MS), 21 * MS);
        assert_eq!(guard.excess(3 * MS), Duration::ZERO);
    }
}
