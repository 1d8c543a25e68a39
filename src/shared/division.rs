//! Time division: how replicas keep their calls an interval apart while Redis is gone.
//!
//! While Redis is healthy each replica leases a place among the expected replicas
//! (`scripts/member.lua`, renewed with every health check) and keeps sampling Redis's clock.
//! When Redis is lost, every replica lays the same grid on Redis's clock as it last
//! estimated it: positions `period` apart from the epoch. Position `p` belongs to the replica
//! whose place is `p mod count`; a replica starts calls only at its own positions, so two
//! replicas' calls stay `period` apart give or take their clock errors.
//!
//! The period is `1/rate` plus the grid's guard: the fleet's guard as Redis last reported it
//! (with every booking and every health check, so every replica holds the same value) plus
//! [`GRID_MARGIN`] for the replicas' clock errors, rounded up to [`GRID_STEP`] and at most the
//! guard's ceiling (1.04 s at defaults). It is fixed for a fallback spell when the spell
//! starts, and computed from values every replica shares, because grids with different
//! periods would not line up at all: positions count from the epoch. A replica that never
//! heard from Redis takes the fleet's guard to be the floor.
//!
//! The positions widen when the margin may no longer hold: after a `429` met in fallback
//! (penalties are not shared without Redis, so the replica leaves room rather than
//! retrying into one), after [`WIDEN_AFTER`] without Redis, or when two replicas' clock
//! errors together (each taken as this replica's: half its best reading's round trip plus
//! the drift since, `clock.rs`) exceed what the grid's guard leaves above the guard in force
//! (at least half the floor, which is there for our own clock against the wire): with the
//! defaults' 30 ms that is about two and a half minutes of drift at the assumed 100 µs/s;
//! and when the guard learned in fallback grows past the grid's own.
//! A widened replica keeps only some of its own positions (see [`widening`]), never another
//! replica's, so replicas need not widen together: those that widened and those that did
//! not still never share a position, and once all have, no two used positions are adjacent.
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

/// Time without Redis after which the positions widen whatever the clock errors say: five
/// minutes of drift at the assumed 100 µs/s is 30 ms a replica, the whole of the grid's
/// margin for two replicas together. (With the default margin the error rule widens first,
/// after about two and a half minutes; this bounds a fleet with a larger guard as well.)
pub(super) const WIDEN_AFTER: Duration = Duration::from_secs(300);

/// What the grid's guard adds to the fleet's for the replicas' clock errors: two replicas'
/// error bounds of 15 ms each, that is a Redis round trip's half (well under a millisecond
/// on a LAN) plus 100 µs/s of drift for about 150 s, or two hosts whose system clocks agree
/// to within the 10 ms assumed of NTP (a replica started while Redis was down). Past that,
/// the replica widens.
pub(super) const GRID_MARGIN: Duration = Duration::from_millis(30);

/// The grid's guard is rounded up to a multiple of this, so that replicas holding slightly
/// different reports of the fleet's guard (one changed it a moment before Redis went) still
/// lay the same grid in most cases.
pub(super) const GRID_STEP: Duration = Duration::from_millis(10);

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
    /// The guard's ceiling: the grid's guard is at most this.
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
    /// The fleet's guard as Redis last reported it; `None` before the first report.
    fleet_guard: Option<Duration>,
    /// The grid's guard, fixed when this fallback spell began; `None` in shared mode.
    grid_guard: Option<Duration>,
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

    /// The spacing of grid positions: this spell's, or in shared mode the one a loss now
    /// would lay.
    pub(super) fn period(&self) -> Duration {
        self.period_of(&self.lock())
    }

    fn period_of(&self, state: &DivisionState) -> Duration {
        self.base
            + state
                .grid_guard
                .unwrap_or_else(|| self.grid_guard(state.fleet_guard))
    }

    /// The grid's guard for a fleet's guard (the floor when Redis never reported one): see
    /// the module docs. Every replica holding the same report computes the same.
    fn grid_guard(&self, fleet: Option<Duration>) -> Duration {
        let wanted = fleet.unwrap_or(self.floor).max(self.floor) + GRID_MARGIN;
        let step = GRID_STEP.as_micros().max(1);
        let stepped = Duration::from_micros((wanted.as_micros().div_ceil(step) * step) as u64);
        stepped.min(self.ceiling)
    }

    /// The fleet's guard as a booking or a health check just returned it from Redis.
    pub(super) fn note_fleet_guard(&self, fleet: Duration) {
        self.lock().fleet_guard = Some(fleet);
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
        state.grid_guard = Some(self.grid_guard(state.fleet_guard));
    }

    /// Redis is back.
    pub(super) fn leave(&self) {
        let mut state = self.lock();
        state.since = None;
        state.not_before = None;
        state.grid_guard = None;
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
        let grid_guard = state
            .grid_guard
            .unwrap_or_else(|| self.grid_guard(state.fleet_guard));
        let room = grid_guard.saturating_sub(guard).max(self.floor / 2);
        let count = member.count.max(1);
        // A guard learned in fallback above the grid's (the wire's jitter grew): no margin.
        if state.penalised || long || guard > grid_guard || error * 2 > room {
            widening(member.index, count)
        } else {
            (i64::from(count), i64::from(member.index))
        }
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
        Some(self.period_of(&state) * cycle as u32)
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
        let period = self.period_of(&state);
        let period_us = period.as_micros().max(1) as i64;
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
        let spacing = period * cycle as u32;
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

/// The widened cycle of place `index` among `count`: `(positions in one cycle, this place's
/// position in it)`. The cycle is `m` of the narrow ones, `m` the least number from 2 up that
/// does not divide `count`, and the place keeps its narrow positions `p = k·count + index`
/// whose `k` is `index` modulo `m`. So a widened replica calls only at its own narrow
/// positions (one in `m`): replicas widen each when their own reason says so, without
/// agreeing on the moment, and never meet. And two adjacent positions are never both used
/// once all have widened: positions `p` and `p + 1` of two places `i` and `i + 1` share their
/// `k`, which cannot be both `i` and `i + 1` modulo `m`; across a cycle's end (`i` the last
/// place, `i + 1` the first of the next `k`) that would need `m` to divide `count`.
fn widening(index: u32, count: u32) -> (i64, i64) {
    let m = (2..)
        .find(|m| !count.is_multiple_of(*m))
        .expect("some number does not divide count");
    let count = i64::from(count);
    let index = i64::from(index);
    (count * i64::from(m), index + (index % i64::from(m)) * count)
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
                    assert_eq!(slot - last, 3120 * MS);
                }
                last = Some(slot);
                slots.push(slot);
            }
        }
        slots.sort();
        // Any two slots of the fleet: the period (1 s, the floor, the margin: 1.04 s) less
        // the clocks' disagreement.
        for pair in slots.windows(2) {
            let gap = pair[1] - pair[0];
            assert!(gap >= 1037 * MS && gap <= 1043 * MS, "{gap:?}");
        }
        // The fleet uses every position: 15 slots in 15 periods.
        assert!(slots[14] - slots[0] < 1040 * MS * 15);
    }

    #[tokio::test(start_paused = true)]
    async fn a_penalty_a_long_outage_or_a_large_error_widen_the_positions() {
        let t0 = Instant::now();
        let c = clock(t0, 0);
        let d = replica(1, 3);
        d.enter(t0);
        let first = d.book(t0, far(t0), 100, 10 * MS, &c).unwrap().unwrap();
        let second = d.book(t0, far(t0), 100, 10 * MS, &c).unwrap().unwrap();
        assert_eq!(second - first, 3120 * MS);
        // A 429: nothing before it ends, and one position in two from then on.
        d.penalized(second + 2000 * MS);
        let third = d.book(t0, far(t0), 100, 10 * MS, &c).unwrap().unwrap();
        assert!(third >= second + 2000 * MS);
        let fourth = d.book(t0, far(t0), 100, 10 * MS, &c).unwrap().unwrap();
        assert_eq!(fourth - third, 6240 * MS);
        assert_eq!(d.own_spacing(t0, 10 * MS, MS), Some(6240 * MS));
        // Still its own positions of the narrow grid: place 1 of 3.
        let position = |slot: Instant| {
            let (us, _) = c.redis_time(slot);
            assert_eq!(us.rem_euclid(1_040_000), 0, "{slot:?} is on the grid");
            us.div_euclid(1_040_000)
        };
        assert_eq!(position(third).rem_euclid(3), 1);
        assert_eq!(position(fourth).rem_euclid(3), 1);

        // A new spell: narrow again, until the outage has lasted too long...
        let later = t0 + Duration::from_secs(60);
        d.enter(later);
        assert_eq!(d.own_spacing(later, 10 * MS, MS), Some(3120 * MS));
        let long = later + WIDEN_AFTER + MS;
        assert_eq!(d.own_spacing(long, 10 * MS, MS), Some(6240 * MS));
        // ...or two clock errors exceed what the grid's guard (40 ms) leaves above the guard
        // in force (30 ms here)...
        assert_eq!(d.own_spacing(later, 10 * MS, 15 * MS), Some(3120 * MS));
        assert_eq!(d.own_spacing(later, 10 * MS, 16 * MS), Some(6240 * MS));
        // ...which is at least half the floor, even with the guard at the grid's.
        assert_eq!(d.own_spacing(later, 40 * MS, 2 * MS), Some(3120 * MS));
        assert_eq!(d.own_spacing(later, 40 * MS, 3 * MS), Some(6240 * MS));
        // ...or when the guard learned since outgrows the grid's.
        assert_eq!(
            d.own_spacing(later, 41 * MS, Duration::ZERO),
            Some(6240 * MS)
        );
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

    #[tokio::test(start_paused = true)]
    async fn the_grid_is_the_fleets_guard_plus_the_margin_fixed_for_the_spell() {
        let t0 = Instant::now();
        let d = replica(0, 3);
        // Never heard from Redis: the floor (10 ms) plus the margin (30 ms).
        assert_eq!(d.period(), 1040 * MS);
        // The fleet's guard as Redis reported it, plus the margin, up to a 10 ms step:
        // replicas holding 12 ms and 20 ms lay the same grid.
        d.note_fleet_guard(12 * MS);
        assert_eq!(d.period(), 1050 * MS);
        d.note_fleet_guard(20 * MS);
        assert_eq!(d.period(), 1050 * MS);
        // Never below the floor's, never above the ceiling's.
        d.note_fleet_guard(MS);
        assert_eq!(d.period(), 1040 * MS);
        d.note_fleet_guard(80 * MS);
        assert_eq!(d.period(), 1100 * MS);
        // Fixed when the spell starts: a late report does not move the grid under the
        // replicas' feet; the next spell takes it.
        d.note_fleet_guard(10 * MS);
        d.enter(t0);
        let c = clock(t0, 0);
        let a = d.book(t0, far(t0), 100, 10 * MS, &c).unwrap().unwrap();
        d.note_fleet_guard(50 * MS);
        assert_eq!(d.period(), 1040 * MS);
        let b = d.book(t0, far(t0), 100, 10 * MS, &c).unwrap().unwrap();
        assert_eq!(b - a, 3120 * MS);
        d.leave();
        assert_eq!(d.period(), 1080 * MS);
        d.enter(t0);
        assert_eq!(d.own_spacing(t0, 50 * MS, MS), Some(3240 * MS));
    }

    /// Widening keeps a subset of a place's own positions, so replicas that widened and
    /// replicas that did not never share one; once all have, no two used positions touch.
    #[test]
    fn widened_places_keep_their_own_positions_and_leave_gaps() {
        for count in 1..=12u32 {
            let mut used = Vec::new();
            for index in 0..count {
                let (cycle, own) = widening(index, count);
                assert!(cycle >= 2 * i64::from(count));
                assert_eq!(cycle % i64::from(count), 0);
                assert_eq!(own.rem_euclid(i64::from(count)), i64::from(index));
                used.extend((0..4).map(|k| own + k * cycle));
            }
            used.sort();
            for pair in used.windows(2) {
                assert!(pair[1] - pair[0] >= 2, "count {count}: {used:?}");
            }
        }
        // Three places: one position in two.
        assert_eq!(widening(1, 3), (6, 4));
    }
}
