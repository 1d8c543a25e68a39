//! Unit tests for the scheduler's invariants, at the API the request path and the dispatcher
//! use, with a fake [`Pacer`] and tokio's paused clock: deterministic, and milliseconds each.
//!
//! This file holds the harness: [`FakePacer`] (books start slots an interval apart, counts
//! its bookings, and can be made to book only on a task, and slowly, as a shared pacer does),
//! a map for a cache, and [`Harness::dispatch`], which plays the dispatcher's part at the
//! scheduler's API (no upstream: a started call is answered at once). The tests are grouped
//! by invariant:
//!
//! - `no_call_for_nobody.rs`: no start is claimed for a lookup nobody waits for;
//! - `admission.rs`: admission is a promise (every admitted lookup can start before its
//!   deadline at the booked start slots; one that cannot is refused at once), and every
//!   admitted lookup gets an answer;
//! - `slots.rs`: one booked start slot per lookup that needs one, and what a penalty does to
//!   the booked ones;
//! - `fairness.rs`: start-time fair queueing across client ids.

mod admission;
mod fairness;
mod no_call_for_nobody;
mod slots;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use futures_util::FutureExt;
use opentelemetry::trace::{SpanId, TraceId};
use tokio::sync::watch;
use tokio::time::Instant;

use super::flights::FlightResult;
use super::{Flight, Joined, Scheduler, Waiter};
use crate::lookup::breaker::Breaker;
use crate::lookup::cache::{CacheLookup, CachedScore, ScoreCache};
use crate::lookup::pacing::{BookError, BoxFuture, Pacer, PacingMode};
use crate::lookup::validation::{ClientId, Cpf, LookupKey};
use crate::telemetry::metrics::{Metrics, MetricsConfig};
use crate::telemetry::{FlightOrigin, TraceIds};

const MS: Duration = Duration::from_millis(1);
const SEC: Duration = Duration::from_secs(1);

/// CPFs are built from `CPF_BASE + n`, so that a lookup reads back as its client and `n`.
const CPF_BASE: u32 = 100_000_000;

/// A pacer with one process's booking rule (the next free start an interval after the last,
/// never inside a penalty, at most `capacity` ahead, never after `not_after`), whose bookings
/// the tests can count and slow down.
struct FakePacer {
    interval: Duration,
    /// Answers in `book_at_once`, as one process's pacer does; when false, only in `book`, on
    /// the scheduler's admission task, as a shared pacer does.
    at_once: AtomicBool,
    /// While true, `book` waits (a slow Redis).
    held: watch::Sender<bool>,
    book: Mutex<Book>,
}

#[derive(Default)]
struct Book {
    next_free: Option<Instant>,
    penalty_until: Option<Instant>,
    /// Every start slot booked, in booking order.
    booked: Vec<Instant>,
}

impl FakePacer {
    fn new(interval: Duration) -> Self {
        FakePacer {
            interval,
            at_once: AtomicBool::new(true),
            held: watch::channel(false).0,
            book: Mutex::new(Book::default()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Book> {
        self.book.lock().unwrap()
    }

    fn book_now(&self, not_after: Instant, capacity: usize) -> Result<Instant, BookError> {
        let now = Instant::now();
        let mut book = self.lock();
        let from = book.penalty_until.map_or(now, |p| p.max(now));
        let start = book.next_free.map_or(from, |f| f.max(from));
        let ahead = (start - from).as_nanos() / self.interval.as_nanos();
        if ahead >= capacity as u128 {
            let retry_after = (start - from).saturating_sub(self.interval * capacity as u32);
            return Err(BookError::Full { retry_after });
        }
        if start > not_after {
            return Err(BookError::TooLate {
                by: start - not_after,
            });
        }
        book.next_free = Some(start + self.interval);
        book.booked.push(start);
        Ok(start)
    }

    /// Start slots booked so far.
    fn bookings(&self) -> usize {
        self.lock().booked.len()
    }

    /// From now on, book only on a task (as a shared pacer does), and slowly: bookings wait
    /// until [`FakePacer::release`].
    fn hold(&self) {
        self.at_once.store(false, Ordering::Relaxed);
        self.held.send_replace(true);
    }

    fn release(&self) {
        self.held.send_replace(false);
    }

    /// Resolves once `count` bookings wait in [`Pacer::book`] for [`FakePacer::release`].
    async fn waiting(&self, count: usize) {
        for _ in 0..1000 {
            if self.held.receiver_count() == count {
                return;
            }
            tokio::task::yield_now().await;
        }
        panic!("{} bookings wait, not {count}", self.held.receiver_count());
    }
}

impl Pacer for FakePacer {
    fn interval(&self) -> Duration {
        self.interval
    }

    fn book(
        &self,
        not_after: Instant,
        capacity: usize,
    ) -> BoxFuture<'_, Result<Instant, BookError>> {
        let mut held = self.held.subscribe();
        Box::pin(async move {
            let _ = held.wait_for(|held| !held).await;
            self.book_now(not_after, capacity)
        })
    }

    fn book_at_once(
        &self,
        not_after: Instant,
        capacity: usize,
    ) -> Option<Result<Instant, BookError>> {
        self.at_once
            .load(Ordering::Relaxed)
            .then(|| self.book_now(not_after, capacity))
    }

    fn penalize(&self, until: Instant) -> BoxFuture<'_, ()> {
        let mut book = self.lock();
        book.penalty_until = book.penalty_until.max(Some(until));
        book.next_free = book.next_free.max(Some(until));
        Box::pin(std::future::ready(()))
    }

    fn penalty_until(&self) -> Option<Instant> {
        self.lock().penalty_until.filter(|&t| t > Instant::now())
    }

    fn mode(&self) -> PacingMode {
        PacingMode::Local
    }
}

/// The cache, as a map: what a finished flight put there is fresh forever.
#[derive(Default)]
struct MapCache(Mutex<HashMap<LookupKey, CachedScore>>);

impl ScoreCache for MapCache {
    fn get(&self, key: &LookupKey) -> CacheLookup {
        match self.0.lock().unwrap().get(key) {
            Some(score) => CacheLookup::Fresh(score.clone()),
            None => CacheLookup::Miss,
        }
    }

    fn insert(&self, key: LookupKey, value: CachedScore) {
        self.0.lock().unwrap().insert(key, value);
    }

    fn entry_count(&self) -> u64 {
        self.0.lock().unwrap().len() as u64
    }
}

fn key(client: &str, n: u32) -> LookupKey {
    LookupKey {
        client_id: ClientId::parse(client).unwrap(),
        cpf: Cpf::from_base(CPF_BASE + n).unwrap(),
    }
}

/// A lookup as the tests name it: its client id and `n` (`"a3"`).
fn label(flight: &Flight) -> String {
    let n = flight.key.cpf.as_u64() / 100 - u64::from(CPF_BASE);
    format!("{}{n}", flight.key.client_id.as_str())
}

fn score() -> CachedScore {
    CachedScore {
        body: Bytes::from_static(br#"{"score":700}"#),
        fetched_at: std::time::Instant::now(),
    }
}

/// The waiter's answer if it has one now, without letting time pass.
fn answer_now(waiter: &mut Waiter) -> Option<FlightResult> {
    waiter.wait().now_or_never()
}

/// One start the dispatcher stand-in made: when, and for which lookup.
struct Start {
    at: Instant,
    flight: Arc<Flight>,
}

struct Harness {
    scheduler: Arc<Scheduler>,
    pacer: Arc<FakePacer>,
    breaker: Arc<Breaker>,
    metrics: Arc<Metrics>,
    t0: Instant,
}

/// A scheduler for `capacity` lookups waiting at most `timeout`, starts `interval` apart.
fn harness(capacity: usize, timeout: Duration, interval: Duration) -> Harness {
    let pacer = Arc::new(FakePacer::new(interval));
    let breaker = Arc::new(Breaker::new(1, 30 * SEC, |_| {}));
    let metrics = Arc::new(Metrics::new(&MetricsConfig {
        enabled: true,
        rate_per_second: 1.0 / interval.as_secs_f64(),
        interval,
        queue_capacity: capacity,
        queue_timeout: timeout,
        expected_replicas: 1,
    }));
    let scheduler = Scheduler::new(
        capacity,
        timeout,
        pacer.clone(),
        None,
        breaker.clone(),
        Arc::new(MapCache::default()),
        metrics.clone(),
    );
    Harness {
        scheduler,
        pacer,
        breaker,
        metrics,
        t0: Instant::now(),
    }
}

impl Harness {
    fn join(&self, client: &str, n: u32, max_wait: Option<Duration>) -> Joined {
        let origin = || {
            FlightOrigin::new(
                tracing::Span::none(),
                TraceIds {
                    trace_id: TraceId::INVALID,
                    span_id: SpanId::INVALID,
                    sampled: false,
                },
            )
        };
        self.scheduler
            .join(&key(client, n), max_wait, origin)
            .expect("not refused before admission")
    }

    /// A new lookup, which must create its flight.
    fn lead(&self, client: &str, n: u32) -> Waiter {
        self.lead_within(client, n, None)
    }

    fn lead_within(&self, client: &str, n: u32, max_wait: Option<Duration>) -> Waiter {
        match self.join(client, n, max_wait) {
            Joined::Leader(waiter) => waiter,
            _ => panic!("{client}{n} should lead a flight of its own"),
        }
    }

    /// An identical lookup, which must join the flight on its way.
    fn follow(&self, client: &str, n: u32) -> Waiter {
        match self.join(client, n, None) {
            Joined::Follower(waiter) => waiter,
            _ => panic!("{client}{n} should join the flight on its way"),
        }
    }

    /// The value of one series of the scheduler's metrics.
    fn metric(&self, series: &str) -> f64 {
        self.scrape().metric(series)
    }

    fn refusals(&self, reason: &str) -> f64 {
        self.scrape().refusals(reason)
    }

    /// The metrics as a scrape sees them (rendering takes milliseconds: once per look).
    fn scrape(&self) -> Scrape {
        Scrape(self.metrics.render())
    }

    /// Bookings under way (on admission or top-up tasks).
    fn booking(&self) -> usize {
        self.scheduler.lock().slots.booking
    }

    /// Lets the admission and top-up tasks finish their bookings.
    async fn settle(&self) {
        for _ in 0..1000 {
            if self.booking() == 0 {
                return;
            }
            tokio::task::yield_now().await;
        }
        panic!("{} bookings never finished", self.booking());
    }

    /// Plays the dispatcher's part at the scheduler's API until nobody waits: books what the
    /// queue is short of, sweeps deadlines, waits for each start slot, claims the next lookup
    /// with it and answers it with a score at once. Returns the starts, in order.
    async fn dispatch(&self) -> Vec<Start> {
        let mut starts = Vec::new();
        while let Some(start) = self.start_next().await {
            self.scheduler.finish(&start.flight, Ok(score()));
            starts.push(start);
        }
        starts
    }

    /// The dispatcher's loop up to one start: `None` once nobody waits for one.
    async fn start_next(&self) -> Option<Start> {
        let s = &self.scheduler;
        loop {
            s.replenish();
            self.settle().await;
            let next_slot = s.next_slot();
            let next_sweep = s.next_deadline().map(|d| d + MS);
            let wake = next_slot.into_iter().chain(next_sweep).min()?;
            tokio::time::sleep_until(wake).await;
            let now = Instant::now();
            if next_slot.is_some_and(|slot| slot <= now)
                && let (Some(at), _) = s.take_due_slots(now)
                && let Some(flight) = s.claim(at)
            {
                return Some(Start { at, flight });
            }
            if next_sweep.is_some_and(|sweep| sweep <= now) {
                s.expire();
            }
        }
    }

    /// What a 429 makes the dispatcher do, in its order: pause, void the start slots inside
    /// the pause, retry the lookup whose call was penalised, book again, answer whoever the
    /// pause pushed past their deadline.
    async fn penalty(&self, penalised: &Arc<Flight>, until: Instant) -> bool {
        self.pacer.penalize(until).await;
        self.scheduler.void_slots_before(until);
        let retried = self.scheduler.retry(penalised);
        self.scheduler.replenish();
        self.scheduler.expire();
        retried
    }
}

/// The text of one scrape of the metrics.
struct Scrape(String);

impl Scrape {
    fn metric(&self, series: &str) -> f64 {
        score_test_support::prom::value(&self.0, series)
    }

    fn refusals(&self, reason: &str) -> f64 {
        self.metric(&format!(
            "score_proxy_queue_refusals_total{{reason=\"{reason}\"}}"
        ))
    }
}

fn labels(starts: &[Start]) -> Vec<String> {
    starts.iter().map(|s| label(&s.flight)).collect()
}

/// Start instants as offsets from `t0`, in milliseconds.
fn offsets_ms(t0: Instant, starts: &[Start]) -> Vec<u128> {
    starts.iter().map(|s| (s.at - t0).as_millis()).collect()
}

/// The error the waiter was answered with, if it has an answer now (a score fails the test).
fn error_now(waiter: &mut Waiter) -> Option<crate::lookup::error::ProxyError> {
    answer_now(waiter).map(|answer| match answer {
        Ok(_) => panic!("answered with a score, not an error"),
        Err(e) => e,
    })
}
