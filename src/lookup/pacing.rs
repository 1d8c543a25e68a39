//! Stage 4: when upstream calls may start.
//!
//! The upstream allows one call per `1/rate` for all callers together, counted by its own clock
//! at arrival, and punishes an early call with a penalty that every later call extends. So
//! call starts must be at least `interval = 1/rate + guard` apart (the guard absorbs jitter
//! between our start and the upstream's arrival), never inside a known penalty, and otherwise
//! as early as allowed, so the whole budget gets used.
//!
//! Pacing works by **reservation**. Each lookup admitted to the queue books a start slot
//! with a [`Pacer`]; slots are `interval` apart. The scheduler knows, at admission, the exact
//! instant each waiting lookup will start (its place in the fair order maps to the replica's
//! booked slots), so a lookup that could not start before its deadline is refused at once.
//! [`LocalPacer`] books slots in this process; the shared pacer (`crate::shared`) books them in
//! Redis, so that several replicas share one schedule.
//!
//! Every start then passes the [`StartGate`]: a floor (`last start + interval`, so a
//! dispatcher that woke late does not bunch two starts together) and the `leaky-bucket`
//! crate's token bucket (capacity 1, one token per interval) as an independent second check
//! that this process never starts calls faster than the rate, whatever the books say. The
//! bucket alone could not be the pacer: it refills on a fixed grid anchored at its creation
//! (`calculate_drain` in leaky-bucket 1.1), so a token banked late in one period and the next
//! taken early in the following one can be less than an interval apart; the floor is what
//! guarantees spacing, and the bucket never delays a start (it only ever refuses one, which
//! would be a bug and is counted).
//!
//! The guard itself is learned ([`guard`]): the pacer and the start gate read the guard in
//! force at each booking and each start, so `interval` is `1/rate` plus whatever the guard is
//! now. In shared mode that guard is the fleet's: the largest any replica learned lately.

mod guard;

pub(crate) use guard::{Guard, GuardReason};

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

pub(crate) type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Why a start could not be booked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BookError {
    /// `capacity` starts are already booked ahead; one frees up after `retry_after`.
    Full { retry_after: Duration },
    /// The earliest free start is after the lookup's deadline, by `by`.
    TooLate { by: Duration },
}

/// How the pacer is pacing (for `/ready`, `/status` and the `pacing_mode{mode}` series): the
/// name in snake case.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, strum::IntoStaticStr, strum::VariantArray)]
#[strum(serialize_all = "snake_case")]
pub enum PacingMode {
    /// One process, no shared schedule.
    Local,
    /// Several replicas, one schedule in Redis.
    Shared,
    /// Redis is out of reach: a safe local share of the rate.
    Fallback,
}

impl PacingMode {
    pub(crate) fn as_str(self) -> &'static str {
        self.into()
    }
}

/// The schedule of upstream call starts: the small interface a shared backend implements.
pub trait Pacer: Send + Sync + 'static {
    /// The spacing between starts (`1/rate + guard`).
    fn interval(&self) -> Duration;

    /// Books the next free start, if it is no later than `not_after` and fewer than
    /// `capacity` starts are booked ahead of it. The instant is in this process's clock.
    fn book(
        &self,
        not_after: Instant,
        capacity: usize,
    ) -> BoxFuture<'_, Result<Instant, BookError>>;

    /// Books at once, if this pacer can answer without waiting (a local one can); `None`
    /// means use [`Pacer::book`].
    fn book_at_once(
        &self,
        _not_after: Instant,
        _capacity: usize,
    ) -> Option<Result<Instant, BookError>> {
        None
    }

    /// The upstream penalised us: no start may be booked before `until`.
    fn penalize(&self, until: Instant) -> BoxFuture<'_, ()>;

    /// No start before `until`: this process starts right after the one before it called
    /// (the persistent store's newest answer says when), and its spacing could not be kept
    /// otherwise. A shared schedule spans restarts already.
    fn start_after(&self, _until: Instant) {}

    /// The end of the current penalty, as far as this process knows.
    fn penalty_until(&self) -> Option<Instant>;

    /// One of this process's calls left the upstream-bound connection late (it had to open
    /// a connection first): no start may be made before `until`, which is an interval
    /// after it. One process needs nothing here, its start gate already counts from the
    /// real departure; a shared schedule tells the other replicas, whose slots next to it
    /// were booked without knowing.
    fn hold(&self, _until: Instant) -> BoxFuture<'_, ()> {
        Box::pin(async {})
    }

    /// The end of the latest hold (see [`Pacer::hold`]) another replica announced.
    fn hold_until(&self) -> Option<Instant> {
        None
    }

    /// Causality (see `StartGate::call_ended`): every call this process started has
    /// arrived, the latest one started at `started`, so the next start may be as early as
    /// `next`. A pacer with nothing booked after `started` books its next slot from there;
    /// a shared schedule ignores it (other replicas' calls may be under way).
    fn settle(&self, _started: Instant, _next: Instant) {}

    /// How late a booked slot may still be used. `None`: any time (every slot is this
    /// process's, and the start gate keeps the spacing from the last real start). A shared
    /// schedule interleaves other replicas' slots, so a slot used late crowds the next one:
    /// there, a slot missed by more than this passes unused.
    fn late_tolerance(&self) -> Option<Duration> {
        None
    }

    fn mode(&self) -> PacingMode;
}

/// Slots booked in this process: a virtual-scheduling leaky bucket (GCRA), one slot per
/// interval, no burst.
pub(crate) struct LocalPacer {
    /// The whole interval for a fixed pacer, `1/rate` for one that reads `guard`.
    interval: Duration,
    /// The learned guard, added to `interval` at each booking.
    guard: Option<Arc<Guard>>,
    state: Mutex<LocalState>,
}

#[derive(Default)]
struct LocalState {
    /// The first instant not yet booked.
    next_free: Option<Instant>,
    /// The latest slot booked.
    last_booked: Option<Instant>,
    penalty_until: Option<Instant>,
}

impl LocalPacer {
    /// Slots a fixed `interval` apart (shared mode's fallback, tests).
    pub(crate) fn new(interval: Duration) -> Self {
        LocalPacer {
            interval,
            guard: None,
            state: Mutex::new(LocalState::default()),
        }
    }

    /// Slots `1/rate + the guard in force` apart, `base` being `1/rate`.
    pub(crate) fn adaptive(base: Duration, guard: Arc<Guard>) -> Self {
        LocalPacer {
            interval: base,
            guard: Some(guard),
            state: Mutex::new(LocalState::default()),
        }
    }

    fn current_interval(&self) -> Duration {
        self.interval + self.guard.as_ref().map_or(Duration::ZERO, |g| g.current())
    }

    /// The spacing for `rate` calls per second plus `guard`.
    pub(crate) fn interval_for(rate_per_second: f64, guard: Duration) -> Duration {
        Duration::from_secs_f64(1.0 / rate_per_second) + guard
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, LocalState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records a penalty: no slot is booked before `until` (slots booked inside it are void).
    pub(crate) fn penalize_now(&self, until: Instant) {
        let mut state = self.lock();
        state.penalty_until = state.penalty_until.max(Some(until));
        state.next_free = state.next_free.max(Some(until));
    }

    /// The booking rule, shared with the fallback of the shared pacer.
    pub(crate) fn book_now(
        &self,
        now: Instant,
        not_after: Instant,
        capacity: usize,
    ) -> Result<Instant, BookError> {
        let interval = self.current_interval();
        let mut state = self.lock();
        let start = [Some(now), state.next_free, state.penalty_until]
            .into_iter()
            .flatten()
            .max()
            .expect("now is always there");
        // Slots booked ahead of this one (a penalty's pause is not a booked slot).
        let from = state.penalty_until.map_or(now, |p| p.max(now));
        if ahead(start - from, interval) >= capacity as u64 {
            // A place frees as soon as fewer than `capacity` slots lie ahead.
            let retry_after = (start - from).saturating_sub(interval * capacity as u32);
            return Err(BookError::Full { retry_after });
        }
        if start > not_after {
            return Err(BookError::TooLate {
                by: start - not_after,
            });
        }
        state.next_free = Some(start + interval);
        state.last_booked = Some(start);
        Ok(start)
    }
}

/// How many slots are booked ahead when the next free one is `wait` away (a slot that starts
/// now is not ahead of anyone).
fn ahead(wait: Duration, interval: Duration) -> u64 {
    (wait.as_nanos() / interval.as_nanos().max(1)) as u64
}

impl Pacer for LocalPacer {
    fn start_after(&self, until: Instant) {
        let mut state = self.lock();
        state.next_free = Some(state.next_free.map_or(until, |n| n.max(until)));
    }

    fn interval(&self) -> Duration {
        self.current_interval()
    }

    fn book(
        &self,
        not_after: Instant,
        capacity: usize,
    ) -> BoxFuture<'_, Result<Instant, BookError>> {
        let result = self.book_now(Instant::now(), not_after, capacity);
        Box::pin(std::future::ready(result))
    }

    fn book_at_once(
        &self,
        not_after: Instant,
        capacity: usize,
    ) -> Option<Result<Instant, BookError>> {
        Some(self.book_now(Instant::now(), not_after, capacity))
    }

    fn penalize(&self, until: Instant) -> BoxFuture<'_, ()> {
        self.penalize_now(until);
        Box::pin(std::future::ready(()))
    }

    fn penalty_until(&self) -> Option<Instant> {
        self.lock().penalty_until.filter(|&t| t > Instant::now())
    }

    fn settle(&self, started: Instant, next: Instant) {
        let mut state = self.lock();
        // Only when no slot is booked after the call that came back: a booked one was
        // placed an interval after the slot before it, and stays where it is.
        if state.last_booked.is_none_or(|booked| booked <= started)
            && state.next_free.is_some_and(|free| free > next)
        {
            state.next_free = Some(next);
        }
    }

    fn mode(&self) -> PacingMode {
        PacingMode::Local
    }
}

/// How much of a start's lateness behind its slot (the timer's) the next start may give
/// back in one process; see [`StartGate::earliest`].
const TIMER_SLACK: Duration = Duration::from_millis(2);

/// How late after its slot a replica in shared pacing may still start a call when the
/// guard in force is `guard`. Other replicas' slots sit one interval away: a slot used
/// later than half the guard would eat into the margin that keeps their arrivals apart.
pub(crate) fn late_tolerance(guard: Duration) -> Duration {
    (guard / 2).max(Duration::from_millis(1))
}

/// The last check before a call starts; see the module docs.
pub(crate) struct StartGate {
    /// The whole spacing for a fixed gate, `1/rate` for one that reads `guard`.
    interval: Duration,
    /// The learned guard, added to `interval` at each start.
    guard: Option<Arc<Guard>>,
    /// Shared pacing: the spacing from this replica's own previous start gives back the late
    /// tolerance of the guard in force, and the causal rule does not apply (other replicas'
    /// calls are under way that this gate does not see).
    fleet: bool,
    bucket: leaky_bucket::RateLimiter,
    /// The last start, and how much of its lateness behind its slot the next start may give
    /// back: at most [`TIMER_SLACK`], in a learning gate of one process only (see
    /// [`StartGate::earliest`]).
    last_start: Mutex<Option<(Instant, Duration)>>,
    /// Causality: see [`StartGate::call_ended`].
    causal: Mutex<Causal>,
}

/// What the gate knows about calls under way, for the causal rule.
#[derive(Default)]
struct Causal {
    /// Calls started through the gate and not yet ended.
    open: usize,
    /// The latest start's call came back at this instant with no other call open: it has
    /// certainly arrived, and so has every call before it.
    settled: Option<(Instant, Instant)>,
    /// No start before this: an answered call took longer than the quickest recent round
    /// trips, so its arrival may have been that much late (see [`StartGate::call_ended`]).
    pushed: Option<Instant>,
}

impl StartGate {
    /// A gate whose spacing never moves (tests of the mechanism without a guard).
    #[cfg(test)]
    pub(crate) fn new(interval: Duration) -> Self {
        Self::build(interval, None, false, interval)
    }

    /// A gate whose spacing is `base` (`1/rate`) plus the guard in force. Its token bucket
    /// refills at `base` plus the guard's floor: the guard only ever adds to the spacing, so
    /// the bucket still never refuses a start the floor allows.
    pub(crate) fn adaptive(base: Duration, guard: Arc<Guard>) -> Self {
        let bucket_interval = base + guard.floor();
        Self::build(base, Some(guard), false, bucket_interval)
    }

    /// The gate of a replica in shared pacing: its own starts stay `base` plus the guard in
    /// force less that guard's [`late_tolerance`] apart. A start may be up to the tolerance
    /// behind its slot, so measuring from this replica's previous start gives that back;
    /// otherwise the timer's millisecond of lateness would carry from one of its slots to
    /// the next adjacent one and add up. (`g - late_tolerance(g)` grows with `g`, so the
    /// bucket, set at the floor, never refuses what the spacing allows.)
    pub(crate) fn fleet(base: Duration, guard: Arc<Guard>) -> Self {
        let floor = guard.floor();
        let bucket_interval = base + floor - late_tolerance(floor).min(floor);
        Self::build(base, Some(guard), true, bucket_interval)
    }

    fn build(
        interval: Duration,
        guard: Option<Arc<Guard>>,
        fleet: bool,
        bucket_interval: Duration,
    ) -> Self {
        StartGate {
            interval,
            guard,
            fleet,
            bucket: leaky_bucket::RateLimiter::builder()
                .max(1)
                .initial(1)
                .refill(1)
                .interval(bucket_interval)
                .build(),
            last_start: Mutex::new(None),
            causal: Mutex::new(Causal::default()),
        }
    }

    fn last_start(&self) -> Option<(Instant, Duration)> {
        *self.last_start.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn causal(&self) -> std::sync::MutexGuard<'_, Causal> {
        self.causal.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A call that started through this gate at `started` ended at `at`; `answered` if the
    /// upstream answered it (so it certainly arrived). Causality: when it was the latest
    /// start and no other call is open, every call so far has arrived by `at`, so the next
    /// start may count from `at` (plus `1/rate` and the guard's floor, which covers our
    /// clock, not the network) instead of from its start plus the whole learned guard.
    /// Returns that earliest next start when the rule applies and it is earlier than the
    /// usual floor; a learning gate only (a fixed one keeps its spacing).
    ///
    /// The same answer also bounds how late the call may have arrived, overlap or not: by
    /// no more than its round trip exceeded the quickest recent ones (the rest of a round
    /// trip is the same path and the same work). A one-off delay that the guard does not
    /// cover (a 150 ms spike against a guard learned from a quiet network, or one that has
    /// reached its ceiling) then pushes the next start by that excess, instead of letting
    /// it arrive less than an interval after this one.
    pub(crate) fn call_ended(
        &self,
        started: Instant,
        at: Instant,
        answered: bool,
    ) -> Option<Instant> {
        let last = self.last_start().map(|(at, _)| at);
        let mut causal = self.causal();
        causal.open = causal.open.saturating_sub(1);
        let guard = self.guard.as_ref()?;
        if !self.fleet && answered {
            // No excess, no news: the usual spacing (with the timer's slack) holds.
            let excess = guard.excess(at - started);
            if !excess.is_zero() {
                let pushed = started + self.interval + guard.floor() + excess;
                causal.pushed = causal.pushed.max(Some(pushed));
            }
        }
        if self.fleet || !answered || causal.open > 0 || last != Some(started) {
            return None;
        }
        let next = at + self.interval + guard.floor();
        if next >= started + self.spacing() {
            return None;
        }
        causal.settled = Some((started, next));
        Some(next)
    }

    fn spacing(&self) -> Duration {
        match &self.guard {
            None => self.interval,
            Some(guard) if self.fleet => {
                let g = guard.current();
                self.interval + g - late_tolerance(g).min(g)
            }
            Some(guard) => self.interval + guard.current(),
        }
    }

    /// The earliest instant a start is allowed: the slot, or later if the previous start
    /// was itself late (or the guard rose since the slot was booked).
    ///
    /// The timer wakes a start a millisecond or two behind its slot; measured from the late
    /// start, every spacing would carry that lateness to the next, and the budget would
    /// lose it call after call (a tenth of a percent at 1 call/s). A learning gate of one
    /// process gives back up to [`TIMER_SLACK`] of it: starts stay at least the spacing less
    /// that apart, which the guard's floor is there to absorb (our timer, not the network).
    pub(crate) fn earliest(&self, slot: Instant) -> Instant {
        let last = self.last_start();
        let (settled, pushed) = {
            let causal = self.causal();
            (causal.settled, causal.pushed)
        };
        let earliest = last.map_or(slot, |(l, credit)| {
            let floor = match settled {
                // The latest start's call came back with nothing else open (and it left
                // when it started: a late departure moves `last` past it).
                Some((started, next)) if started == l => next.min(l + self.spacing() - credit),
                _ => l + self.spacing() - credit,
            };
            slot.max(floor)
        });
        earliest.max(pushed.unwrap_or(earliest))
    }

    /// A call that started at the last recorded start actually left at `at` (it had to
    /// open a connection first): the next start counts from there. Returns by how much the
    /// departure was later than the recorded start.
    pub(crate) fn note_departure(&self, at: Instant) -> Duration {
        let mut last = self.last_start.lock().unwrap_or_else(|e| e.into_inner());
        let late = last.map_or(Duration::ZERO, |(l, _)| at.saturating_duration_since(l));
        if last.is_none_or(|(l, _)| at > l) {
            // A real departure: nothing of it is given back.
            *last = Some((at, Duration::ZERO));
        }
        late
    }

    /// Waits for [`StartGate::earliest`], then, if no penalty known by then covers the
    /// start (`penalty_until` is asked after the wait: a 429 can arrive during it), takes the
    /// bucket's token and records the start. A start that would fall inside a penalty or
    /// exceed the rate is never made; nor one inside another replica's hold (`hold_until`:
    /// its call left late, see [`Pacer::hold`]); nor, with a `late_tolerance` (shared
    /// pacing: other replicas hold the neighbouring slots), one that wakes up more than that
    /// after its slot, whether its timer fired late or an earlier late start of ours pushed
    /// it.
    pub(crate) async fn pass(
        &self,
        slot: Instant,
        late_tolerance: Option<Duration>,
        penalty_until: impl Fn() -> Option<Instant>,
        hold_until: impl Fn() -> Option<Instant>,
    ) -> Result<Instant, GateRefusal> {
        // The earliest start can move while this waits (an answer pushes it, the guard
        // rises): wait again until it holds still.
        loop {
            let earliest = self.earliest(slot);
            if Instant::now() >= earliest {
                break;
            }
            tokio::time::sleep_until(earliest).await;
        }
        let now = Instant::now();
        if penalty_until().is_some_and(|until| now < until) {
            return Err(GateRefusal::Penalty);
        }
        if hold_until().is_some_and(|until| now < until) {
            return Err(GateRefusal::Held);
        }
        if late_tolerance.is_some_and(|tolerance| now > slot + tolerance) {
            return Err(GateRefusal::Late);
        }
        if !self.bucket.try_acquire(1) {
            return Err(GateRefusal::Rate);
        }
        let credit = if self.guard.is_some() && !self.fleet {
            now.saturating_duration_since(slot).min(TIMER_SLACK)
        } else {
            Duration::ZERO
        };
        *self.last_start.lock().unwrap_or_else(|e| e.into_inner()) = Some((now, credit));
        let mut causal = self.causal();
        causal.open += 1;
        causal.settled = None;
        Ok(now)
    }
}

/// Why the start gate refused a slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum GateRefusal {
    /// A penalty became known while the slot waited at the gate.
    Penalty,
    /// It woke up too long after its slot to be used safely (shared pacing only).
    Late,
    /// Another replica's call left late, too close before it (shared pacing only).
    Held,
    /// The token bucket would have been exceeded (a bug if it ever happens).
    Rate,
}

/// Why a booked start slot passed without a call (the `reason` label: the name in snake case).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, strum::IntoStaticStr, strum::VariantArray)]
#[strum(serialize_all = "snake_case")]
pub(crate) enum SlotUnused {
    /// Every lookup waiting for it left (no call for nobody).
    NoLookup,
    /// The circuit breaker held calls back.
    Breaker,
    /// `upstream-max-in-flight` calls were open.
    Saturated,
    /// The start gate refused it (a bug if it ever happens).
    Gate,
    /// The dispatcher reached it too late to use it safely.
    Late,
    /// An upstream penalty became known while it waited to start.
    Penalty,
    /// Another replica's call left late, less than an interval before it.
    Held,
}

#[cfg(test)]
mod tests;
