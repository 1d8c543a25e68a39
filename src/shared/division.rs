//! Time division: how replicas keep their calls an interval apart while Redis is gone.
//!
//! While Redis is healthy each replica leases a place among the expected replicas
//! (`scripts/member.lua`, renewed with every health check) and keeps sampling Redis's clock.
//! When Redis is lost, every replica lays the same grid on Redis's clock as it last
//! estimated it: positions `period` apart from the epoch, `period` being `1/rate` plus the
//! guard's ceiling (the same on every replica, so the grids agree without talking). Position
//! `p` belongs to the replica whose place is `p mod count`; a replica starts calls only at its
//! own positions, so two replicas' calls stay `period` apart give or take their clock errors,
//! which the ceiling's margin covers.
//!
//! The positions widen (each replica takes one position in two, so that an empty one lies
//! between any two used) when the margin may no longer hold: after a `429` met in fallback
//! (penalties are not shared without Redis, so the replica leaves room rather than
//! retrying into one), after [`WIDEN_AFTER`] without Redis (the clocks have drifted since
//! the last reading), or when two replicas' clock errors together exceed what the ceiling
//! leaves above the guard in force (at least half the floor, which is there for our own
//! clock against the wire).
//!
//! A replica entering fallback starts on the grid only after `settle` (a health check and a
//! Redis timeout): by then every replica has noticed the loss and given up the slots it had
//! booked in the shared schedule, which the grid does not know of. A replica without a place
//! (it started while Redis was down, with no `--replica-index`) cannot use the grid and
//! paces at `rate / expected-replicas` instead, as it says in its log and `/status`.

use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

use crate::lookup::pacing::BookError;

/// Time without Redis after which the positions widen: ten minutes of drift at the assumed
/// 100 µs/s is 60 ms, most of a 100 ms ceiling's margin for two replicas together.
pub(super) const WIDEN_AFTER: Duration = Duration::from_secs(300);

/// A replica's place in the fleet: `index` among `count`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Member {
    pub(crate) index: u32,
    pub(crate) count: u32,
}

/// The fallback schedule's state; see the module docs.
pub(super) struct Division {
    /// `1/rate`.
    base: Duration,
    /// The guard's floor.
    floor: Duration,
    /// The guard's ceiling: grid positions are `base + ceiling` apart.
    ceiling: Duration,
    /// How long after entering fallback the grid starts.
    settle: Duration,
    state: Mutex<DivisionState>,
}

#[derive(Default)]
struct DivisionState {
    member: Option<Member>,
    /// When this fallback spell began; `None` in shared mode.
    since: Option<Instant>,
    /// No grid slot before this (the settle after entering fallback).
    not_before: Option<Instant>,
    /// The first grid position not yet booked.
    next_position: i64,
    penalty_until: Option<Instant>,
    /// A `429` was met in this fallback spell.
    penalised: bool,
}

/// How the grid is read at one booking: Redis's time at our instant (µs since the epoch)
/// with its error bound, and our instant for a time on Redis's clock.
pub(super) trait GridClock {
    fn redis_time(&self, at: Instant) -> (i64, Duration);
    fn local_time(&self, redis_us: i64) -> Instant;
}

impl Division {
    pub(super) fn new(
        base: Duration,
        (floor, ceiling): (Duration, Duration),
        settle: Duration,
        member: Option<Member>,
    ) -> Self {
        Division {
            base,
            floor,
            ceiling,
            settle,
            state: Mutex::new(DivisionState {
                member,
                ..DivisionState::default()
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, DivisionState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The spacing of grid positions.
    pub(super) fn period(&self) -> Duration {
        self.base + self.ceiling
    }

    pub(super) fn member(&self) -> Option<Member> {
        self.lock().member
    }

    /// The place Redis leased this replica (kept when Redis is lost).
    pub(super) fn set_member(&self, member: Member) {
        self.lock().member = Some(member);
    }

    /// Redis was lost at `now`: the grid starts after the settle.
    pub(super) fn enter(&self, now: Instant) {
        let mut state = self.lock();
        state.since = Some(now);
        state.not_before = Some(now + self.settle);
        state.next_position = 0;
        state.penalised = false;
    }

    /// Redis is back.
    pub(super) fn leave(&self) {
        let mut state = self.lock();
        state.since = None;
        state.not_before = None;
    }

    /// How long this fallback spell has lasted; `None` in shared mode.
    pub(super) fn fallback_for(&self, now: Instant) -> Option<Duration> {
        self.lock()
            .since
            .map(|since| now.saturating_duration_since(since))
    }

    /// A `429` in fallback: no slot before `until`, and the positions widen.
    pub(super) fn penalized(&self, until: Instant) {
        let mut state = self.lock();
        state.penalty_until = state.penalty_until.max(Some(until));
        state.penalised = true;
    }

    /// The positions in one cycle and which of them is this replica's, with the guard in
    /// force and this replica's clock error (taken as the other replicas' too).
    fn cycle(
        &self,
        state: &DivisionState,
        member: Member,
        now: Instant,
        guard: Duration,
        error: Duration,
    ) -> (i64, i64) {
        let long = state
            .since
            .is_some_and(|since| now.saturating_duration_since(since) > WIDEN_AFTER);
        let room = self.ceiling.saturating_sub(guard).max(self.floor / 2);
        let widen = if state.penalised || long || error * 2 > room {
            2
        } else {
            1
        };
        (
            i64::from(member.count.max(1)) * widen,
            i64::from(member.index) * widen,
        )
    }

    /// The spacing between this replica's own slots now (for admission's predictions and
    /// `Retry-After`); `None` without a place.
    pub(super) fn own_spacing(
        &self,
        now: Instant,
        guard: Duration,
        error: Duration,
    ) -> Option<Duration> {
        let state = self.lock();
        let member = state.member?;
        let (cycle, _) = self.cycle(&state, member, now, guard, error);
        Some(self.period() * cycle as u32)
    }

    /// Books this replica's next grid position at or after `now`; `None` without a place
    /// (the caller paces at a share of the rate instead). `guard` is the guard in force.
    pub(super) fn book(
        &self,
        now: Instant,
        not_after: Instant,
        capacity: usize,
        guard: Duration,
        clock: &impl GridClock,
    ) -> Option<Result<Instant, BookError>> {
        let mut state = self.lock();
        let member = state.member?;
        let (redis_now, error) = clock.redis_time(now);
        let (cycle, own) = self.cycle(&state, member, now, guard, error);
        let period_us = self.period().as_micros().max(1) as i64;
        // Waiting starts after any penalty and the settle; slots from there are "ahead".
        let from = [Some(now), state.not_before, state.penalty_until]
            .into_iter()
            .flatten()
            .max()
            .expect("now is always there");
        let from_us = redis_now + from.saturating_duration_since(now).as_micros() as i64;
        let first = from_us.div_euclid(period_us) + i64::from(from_us.rem_euclid(period_us) > 0);
        let mut position = first.max(state.next_position);
        position += (own - position.rem_euclid(cycle)).rem_euclid(cycle);
        let slot = clock.local_time(position * period_us).max(now);
        let spacing = self.period() * cycle as u32;
        let ahead =
            (slot.saturating_duration_since(from).as_nanos() / spacing.as_nanos().max(1)) as usize;
        if ahead >= capacity {
            let retry_after = slot
                .saturating_duration_since(from)
                .saturating_sub(spacing * capacity as u32);
            return Some(Err(BookError::Full { retry_after }));
        }
        if slot > not_after {
            return Some(Err(BookError::TooLate {
                by: slot - not_after,
            }));
        }
        state.next_position = position + 1;
        Some(Ok(slot))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    /// A replica's view of Redis's clock: Redis's `origin_us` was our `t0`, read `skew_us`
    /// off, with `error` as the bound it claims.
    struct FakeClock {
        t0: Instant,
        origin_us: i64,
        skew_us: i64,
        error: Duration,
    }

    impl GridClock for FakeClock {
        fn redis_time(&self, at: Instant) -> (i64, Duration) {
            let us = self.origin_us + (at - self.t0).as_micros() as i64 + self.skew_us;
            (us, self.error)
        }
        fn local_time(&self, redis_us: i64) -> Instant {
            self.t0 + Duration::from_micros((redis_us - self.origin_us - self.skew_us) as u64)
        }
    }

    fn far(now: Instant) -> Instant {
        now + Duration::from_secs(3600)
    }

    /// Redis's time at the test's start: an awkward phase of the grid.
    const ORIGIN_US: i64 = 1_764_000_000_123_457;

    fn replica(index: u32, count: u32) -> Division {
        Division::new(
            1000 * MS,
            (10 * MS, 100 * MS),
            700 * MS,
            Some(Member { index, count }),
        )
    }

    fn clock(t0: Instant, skew_us: i64) -> FakeClock {
        FakeClock {
            t0,
            origin_us: ORIGIN_US,
            skew_us,
            error: MS,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn three_replicas_take_turns_on_one_grid_without_talking() {
        let t0 = Instant::now();
        // Clocks read 3 ms apart at worst.
        let replicas = [
            (replica(0, 3), clock(t0, 0)),
            (replica(1, 3), clock(t0, 2000)),
            (replica(2, 3), clock(t0, -1000)),
        ];
        let mut slots = Vec::new();
        for (division, clock) in &replicas {
            division.enter(t0);
            let mut last = None;
            for _ in 0..5 {
                let slot = division
                    .book(t0, far(t0), 100, 10 * MS, clock)
                    .unwrap()
                    .unwrap();
                // Nothing before the settle; each replica's own slots a cycle apart.
                assert!(slot >= t0 + 700 * MS);
                if let Some(last) = last {
                    assert_eq!(slot - last, 3300 * MS);
                }
                last = Some(slot);
                slots.push(slot);
            }
        }
        slots.sort();
        // Any two slots of the fleet: the period less the clocks' disagreement.
        for pair in slots.windows(2) {
            let gap = pair[1] - pair[0];
            assert!(gap >= 1097 * MS && gap <= 1103 * MS, "{gap:?}");
        }
        // The fleet uses every position: 15 slots in 15 periods.
        assert!(slots[14] - slots[0] < 1100 * MS * 15);
    }

    #[tokio::test(start_paused = true)]
    async fn a_penalty_a_long_outage_or_a_large_error_widen_the_positions() {
        let t0 = Instant::now();
        let c = clock(t0, 0);
        let d = replica(1, 3);
        d.enter(t0);
        let first = d.book(t0, far(t0), 100, 10 * MS, &c).unwrap().unwrap();
        let second = d.book(t0, far(t0), 100, 10 * MS, &c).unwrap().unwrap();
        assert_eq!(second - first, 3300 * MS);
        // A 429: nothing before it ends, and one position in two from then on.
        d.penalized(second + 2000 * MS);
        let third = d.book(t0, far(t0), 100, 10 * MS, &c).unwrap().unwrap();
        assert!(third >= second + 2000 * MS);
        let fourth = d.book(t0, far(t0), 100, 10 * MS, &c).unwrap().unwrap();
        assert_eq!(fourth - third, 6600 * MS);
        assert_eq!(d.own_spacing(t0, 10 * MS, MS), Some(6600 * MS));

        // A new spell: narrow again, until the outage has lasted too long...
        let later = t0 + Duration::from_secs(60);
        d.enter(later);
        assert_eq!(d.own_spacing(later, 10 * MS, MS), Some(3300 * MS));
        let long = later + WIDEN_AFTER + MS;
        assert_eq!(d.own_spacing(long, 10 * MS, MS), Some(6600 * MS));
        // ...or two clock errors exceed what the ceiling leaves above the guard...
        assert_eq!(d.own_spacing(later, 60 * MS, 19 * MS), Some(3300 * MS));
        assert_eq!(d.own_spacing(later, 60 * MS, 21 * MS), Some(6600 * MS));
        // ...which is at least half the floor, even with the guard at its ceiling.
        assert_eq!(d.own_spacing(later, 100 * MS, 2 * MS), Some(3300 * MS));
        assert_eq!(d.own_spacing(later, 100 * MS, 3 * MS), Some(6600 * MS));
    }

    #[tokio::test(start_paused = true)]
    async fn capacity_deadline_and_no_place_are_honest() {
        let t0 = Instant::now();
        let c = clock(t0, 0);
        let d = replica(0, 2);
        d.enter(t0);
        // Two slots booked ahead: the third is refused with the wait until a place frees.
        let a = d.book(t0, far(t0), 2, 10 * MS, &c).unwrap().unwrap();
        d.book(t0, far(t0), 2, 10 * MS, &c).unwrap().unwrap();
        match d.book(t0, far(t0), 2, 10 * MS, &c).unwrap() {
            Err(BookError::Full { retry_after }) => {
                assert!(retry_after <= a - t0, "{retry_after:?}");
            }
            other => panic!("{other:?}"),
        }
        // A deadline before the next own slot.
        assert!(matches!(
            d.book(t0, t0 + 100 * MS, 100, 10 * MS, &c).unwrap(),
            Err(BookError::TooLate { .. })
        ));
        // Without a place there is no grid to use.
        let placeless = Division::new(1000 * MS, (10 * MS, 100 * MS), 700 * MS, None);
        placeless.enter(t0);
        assert!(placeless.book(t0, far(t0), 10, 10 * MS, &c).is_none());
    }
}
