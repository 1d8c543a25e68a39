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
//! The guard itself is learned ([`guard`]): in one process both the pacer and the start gate
//! read the guard in force at each booking and each start, so `interval` is `1/rate` plus
//! whatever the guard is now.

mod guard;

pub(crate) use guard::{Guard, GuardReason};

use std::future::Future;
use std::sync::Arc;
use std::pin::Pin;
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

/// How the pacer is pacing (for `/ready`, `/status` and metrics): the name in snake case, the
/// `pacing_mode` gauge's value is the discriminant.
#[derive(Clone, Copy, Debug, PartialEq, Eq, strum::IntoStaticStr)]
#[strum(serialize_all = "snake_case")]
pub enum PacingMode {
    /// One process, no shared schedule.
    Local = 0,
    /// Several replicas, one schedule in Redis.
    Shared = 1,
    /// Redis is out of reach: a safe local share of the rate.
    Fallback = 2,
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
        Ok(start)
    }
}

/// How many slots are booked ahead when the next free one is `wait` away (a slot that starts
/// now is not ahead of anyone).
fn ahead(wait: Duration, interval: Duration) -> u64 {
    (wait.as_nanos() / interval.as_nanos().max(1)) as u64
}

impl Pacer for LocalPacer {
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

    fn mode(&self) -> PacingMode {
        PacingMode::Local
    }
}

/// The last check before a call starts; see the module docs.
pub(crate) struct StartGate {
    /// The whole spacing for a fixed gate, `1/rate` for one that reads `guard`.
    interval: Duration,
    /// The learned guard, added to `interval` at each start.
    guard: Option<Arc<Guard>>,
    bucket: leaky_bucket::RateLimiter,
    last_start: Mutex<Option<Instant>>,
}

impl StartGate {
    pub(crate) fn new(interval: Duration) -> Self {
        Self::build(interval, None, interval)
    }

    /// A gate whose spacing is `base` (`1/rate`) plus the guard in force. Its token bucket
    /// refills at `base` plus the guard's floor: the guard only ever adds to the spacing, so
    /// the bucket still never refuses a start the floor allows.
    pub(crate) fn adaptive(base: Duration, guard: Arc<Guard>) -> Self {
        let bucket_interval = base + guard.floor();
        Self::build(base, Some(guard), bucket_interval)
    }

    fn build(interval: Duration, guard: Option<Arc<Guard>>, bucket_interval: Duration) -> Self {
        StartGate {
            interval,
            guard,
            bucket: leaky_bucket::RateLimiter::builder()
                .max(1)
                .initial(1)
                .refill(1)
                .interval(bucket_interval)
                .build(),
            last_start: Mutex::new(None),
        }
    }

    fn spacing(&self) -> Duration {
        self.interval + self.guard.as_ref().map_or(Duration::ZERO, |g| g.current())
    }

    /// The earliest instant a start is allowed: the slot, or later if the previous start
    /// was itself late (or the guard rose since the slot was booked).
    pub(crate) fn earliest(&self, slot: Instant) -> Instant {
        let last = *self.last_start.lock().unwrap_or_else(|e| e.into_inner());
        last.map_or(slot, |l| slot.max(l + self.spacing()))
    }

    /// A call that started at the last recorded start actually left at `at` (it had to
    /// open a connection first): the next start counts from there. Returns by how much the
    /// departure was later than the recorded start.
    pub(crate) fn note_departure(&self, at: Instant) -> Duration {
        let mut last = self.last_start.lock().unwrap_or_else(|e| e.into_inner());
        let late = last.map_or(Duration::ZERO, |l| at.saturating_duration_since(l));
        if last.is_none_or(|l| at > l) {
            *last = Some(at);
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
        tokio::time::sleep_until(self.earliest(slot)).await;
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
        *self.last_start.lock().unwrap_or_else(|e| e.into_inner()) = Some(now);
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
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn far() -> Instant {
        Instant::now() + Duration::from_secs(3600)
    }

    #[tokio::test(start_paused = true)]
    async fn bookings_are_an_interval_apart_and_never_in_the_past() {
        let pacer = LocalPacer::new(1010 * MS);
        let t0 = Instant::now();
        let a = pacer.book(far(), 100).await.unwrap();
        let b = pacer.book(far(), 100).await.unwrap();
        let c = pacer.book(far(), 100).await.unwrap();
        assert_eq!((a, b, c), (t0, t0 + 1010 * MS, t0 + 2020 * MS));
        tokio::time::advance(Duration::from_secs(10)).await;
        let d = pacer.book(far(), 100).await.unwrap();
        assert_eq!(
            d,
            Instant::now(),
            "after an idle spell the next start is now"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn capacity_and_deadline_are_enforced_at_booking() {
        let pacer = LocalPacer::new(100 * MS);
        let t0 = Instant::now();
        for _ in 0..3 {
            pacer.book(far(), 3).await.unwrap();
        }
        // Three booked (at 0, 100, 200 ms): the next would have three ahead of it; a place
        // frees the moment the first slot is under way.
        assert_eq!(
            pacer.book(far(), 3).await,
            Err(BookError::Full {
                retry_after: Duration::ZERO
            })
        );
        tokio::time::advance(MS).await;
        assert_eq!(pacer.book(far(), 3).await, Ok(t0 + 300 * MS));
        assert_eq!(
            pacer.book(t0 + 350 * MS, 10).await,
            Err(BookError::TooLate { by: 50 * MS })
        );
        assert_eq!(pacer.book(t0 + 400 * MS, 10).await, Ok(t0 + 400 * MS));
    }

    #[tokio::test(start_paused = true)]
    async fn a_penalty_that_arrives_while_a_slot_waits_at_the_gate_voids_it() {
        let gate = std::sync::Arc::new(StartGate::new(1000 * MS));
        let pacer = std::sync::Arc::new(LocalPacer::new(1000 * MS));
        let t0 = Instant::now();
        gate.pass(t0, None, || pacer.penalty_until(), || None)
            .await
            .unwrap();
        // The next slot was taken slightly early... (a spare from before) so it waits at the
        // gate for the floor, one interval after the first start.
        let waiting = {
            let (gate, pacer) = (gate.clone(), pacer.clone());
            tokio::spawn(async move {
                gate.pass(t0 + 10 * MS, None, || pacer.penalty_until(), || None)
                    .await
            })
        };
        // ...and meanwhile the first call's 429 arrives.
        tokio::time::advance(100 * MS).await;
        pacer.penalize_now(Instant::now() + Duration::from_secs(2));
        assert_eq!(waiting.await.unwrap(), Err(GateRefusal::Penalty));
        // After the penalty, starts go through again.
        tokio::time::advance(Duration::from_secs(2)).await;
        assert!(
            gate.pass(Instant::now(), None, || pacer.penalty_until(), || None)
                .await
                .is_ok()
        );
    }

    #[tokio::test(start_paused = true)]
    async fn with_a_late_tolerance_the_gate_refuses_a_slot_it_reaches_too_late() {
        let gate = StartGate::new(1000 * MS);
        let t0 = Instant::now();
        // Within the tolerance: used, and recorded as the start.
        tokio::time::advance(4 * MS).await;
        assert_eq!(
            gate.pass(t0, Some(5 * MS), || None, || None).await,
            Ok(t0 + 4 * MS)
        );
        // The next slot is pushed by that late start (the floor: an interval after it) past
        // a 2 ms tolerance: another replica's slot may be an interval after ours, so it is
        // given up rather than used.
        assert_eq!(
            gate.pass(t0 + 1000 * MS, Some(2 * MS), || None, || None)
                .await,
            Err(GateRefusal::Late)
        );
        assert_eq!(Instant::now(), t0 + 1004 * MS);
        // A slot reached 6 ms late (a stalled timer) is refused too...
        tokio::time::advance(1002 * MS).await;
        assert_eq!(
            gate.pass(t0 + 2000 * MS, Some(5 * MS), || None, || None)
                .await,
            Err(GateRefusal::Late)
        );
        // ...but without a tolerance (one process) lateness is harmless: the floor keeps the
        // spacing from the real start, so it is used.
        assert_eq!(
            gate.pass(t0 + 2000 * MS, None, || None, || None).await,
            Ok(t0 + 2006 * MS)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_late_departure_pushes_the_next_start_and_a_hold_refuses_a_slot() {
        let gate = StartGate::new(1000 * MS);
        let t0 = Instant::now();
        gate.pass(t0, None, || None, || None).await.unwrap();
        // The call had to open a connection: it left 120 ms after its start...
        assert_eq!(gate.note_departure(t0 + 120 * MS), 120 * MS);
        // ...so the next start waits for an interval after the departure, not the start.
        let next = gate
            .pass(t0 + 1000 * MS, None, || None, || None)
            .await
            .unwrap();
        assert_eq!(next, t0 + 1120 * MS);
        // A departure older than the last start changes nothing.
        assert_eq!(gate.note_departure(t0 + 500 * MS), Duration::ZERO);
        assert_eq!(gate.earliest(t0 + 2000 * MS), t0 + 2120 * MS);

        // Another replica's late call holds starts until an interval after it left.
        let hold = Instant::now() + 3000 * MS;
        assert_eq!(
            gate.pass(t0 + 2120 * MS, Some(5 * MS), || None, || Some(hold))
                .await,
            Err(GateRefusal::Held)
        );
        assert_eq!(Instant::now(), t0 + 2120 * MS);
    }

    #[tokio::test(start_paused = true)]
    async fn no_booking_inside_a_penalty() {
        let pacer = LocalPacer::new(1000 * MS);
        let t0 = Instant::now();
        pacer.book(far(), 10).await.unwrap();
        pacer.penalize(t0 + 3000 * MS).await;
        pacer.penalize(t0 + 1000 * MS).await;
        assert_eq!(pacer.penalty_until(), Some(t0 + 3000 * MS));
        assert_eq!(pacer.book(far(), 10).await, Ok(t0 + 3000 * MS));
    }

    #[tokio::test(start_paused = true)]
    async fn the_gate_keeps_starts_an_interval_apart_even_when_a_start_was_late() {
        let gate = StartGate::new(1010 * MS);
        let t0 = Instant::now();
        let first = gate.pass(t0, None, || None, || None).await.unwrap();
        // The dispatcher woke 30 ms late for the next slot...
        tokio::time::advance(1040 * MS).await;
        let second = gate
            .pass(t0 + 1010 * MS, None, || None, || None)
            .await
            .unwrap();
        assert_eq!(second - first, 1040 * MS);
        // ...so the slot after it is pushed to keep the spacing from the real start.
        let third = gate
            .pass(t0 + 2020 * MS, None, || None, || None)
            .await
            .unwrap();
        assert_eq!(third - second, 1010 * MS);
        // Idle spells at awkward phases of leaky-bucket's refill grid never let two starts
        // bunch up, and the bucket never refuses a start the floor allows.
        let mut last = third;
        for idle in [0, 1500, 0, 2700, 10, 999, 0, 5050, 0] {
            tokio::time::advance(idle * MS).await;
            let next = gate
                .pass(Instant::now(), None, || None, || None)
                .await
                .expect("the bucket agrees");
            assert!(next - last >= 1010 * MS, "{:?}", next - last);
            last = next;
        }
    }
}
