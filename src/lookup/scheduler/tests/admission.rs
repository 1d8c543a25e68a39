//! Admission is a promise (every admitted lookup can start before its deadline at the booked
//! start slots, and one that cannot is refused at once), and every admitted lookup gets an
//! answer: its call's result, its expiry, shutdown, or a 503 when its call task dies.

use super::*;
use crate::lookup::breaker::CallVerdict;
use crate::lookup::dispatch::Completion;
use crate::lookup::error::ProxyError;

#[tokio::test(start_paused = true)]
async fn what_the_start_slots_cannot_serve_in_time_is_refused_at_once() {
    let h = harness(10, 3500 * MS, SEC);
    let mut admitted: Vec<_> = (0..4).map(|n| h.lead("a", n)).collect();
    // The fifth would start at 4 s, past its 3.5 s deadline: refused now, not at 3.5 s.
    let mut fifth = h.lead("a", 4);
    assert_eq!(
        error_now(&mut fifth),
        Some(ProxyError::DeadlineUnreachable {
            retry_after: 500 * MS
        })
    );
    // So is a client's own shorter timeout that the next free start slot misses.
    let mut hurried = h.lead_within("b", 0, Some(2 * SEC));
    assert_eq!(
        error_now(&mut hurried),
        Some(ProxyError::DeadlineUnreachable {
            retry_after: 2 * SEC
        })
    );
    assert_eq!(Instant::now(), h.t0, "refusals take no time");
    assert_eq!(h.refusals("deadline"), 2.0);

    // Every admitted lookup starts at its booked slot, before its deadline, and is answered.
    let starts = h.dispatch().await;
    assert_eq!(offsets_ms(h.t0, &starts), [0, 1000, 2000, 3000]);
    assert!(starts.iter().all(|s| s.at <= s.flight.deadline));
    for waiter in &mut admitted {
        assert!(answer_now(waiter).unwrap().is_ok());
    }
    assert_eq!(h.refusals("expired"), 0.0);
    assert_eq!(h.pacer.bookings(), 4, "a refused booking books nothing");
}

#[tokio::test(start_paused = true)]
async fn a_full_queue_refuses_at_once() {
    let h = harness(2, 60 * SEC, SEC);
    let _held = [h.lead("a", 0), h.lead("b", 0)];
    let mut third = h.lead("c", 0);
    assert!(matches!(
        error_now(&mut third),
        Some(ProxyError::QueueFull { .. })
    ));
    assert_eq!(h.refusals("full"), 1.0);
    assert_eq!(h.scheduler.queue_len(), 2);
}

#[tokio::test(start_paused = true)]
async fn a_newcomer_never_pushes_an_admitted_lookup_past_its_deadline() {
    let h = harness(10, 10 * SEC, SEC);
    let _tight: Vec<_> = (0..3)
        .map(|n| h.lead_within("a", n, Some(2 * SEC)))
        .collect();
    // b's fair place is second, which would push a2 to 3 s, past its 2 s deadline: b goes
    // to the back, where it still makes its own.
    let _b = h.lead("b", 0);
    let starts = h.dispatch().await;
    assert_eq!(labels(&starts), ["a0", "a1", "a2", "b0"]);
    assert!(starts.iter().all(|s| s.at <= s.flight.deadline));
    assert_eq!(h.refusals("expired"), 0.0);
}

/// A small deterministic generator, so that the load below is the same on every run.
struct XorShift(u64);

impl XorShift {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

/// What happens to one lookup in the load below.
struct Arrival {
    at: Instant,
    client: &'static str,
    n: u32,
    max_wait: Option<Duration>,
    /// When its client hangs up, if it does.
    hangs_up: Option<Instant>,
}

/// Random arrivals (some identical, some in a hurry, some hanging up), over a queue too small
/// and a rate too low for them all. Whatever the mix: a refusal comes at once or not at all,
/// every admitted lookup starts before its deadline unless all its clients left first (then
/// it never starts), everyone still there is answered, and every start slot booked is used
/// by a start or was the slot of a lookup that left. Both ways of booking: under the lock
/// (one process) and on a task (as in shared mode).
#[tokio::test(start_paused = true)]
async fn under_random_load_every_promise_is_kept() {
    for (seed, on_a_task) in (1..=20u64).flat_map(|seed| [(seed, false), (seed, true)]) {
        let h = harness(6, 5 * SEC, SEC);
        h.pacer.at_once.store(!on_a_task, Ordering::Relaxed);
        let run = format!(
            "seed {seed}{}",
            if on_a_task { ", booking on a task" } else { "" }
        );
        let mut rng = XorShift(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15));
        let mut arrivals: Vec<Arrival> = (0..50)
            .map(|_| {
                let at = h.t0 + MS * rng.below(25_000) as u32;
                Arrival {
                    at,
                    client: ["a", "b", "c", "d"][rng.below(4) as usize],
                    n: rng.below(12) as u32,
                    max_wait: (rng.below(3) == 0).then(|| MS * (200 + rng.below(6000) as u32)),
                    hangs_up: (rng.below(4) == 0).then(|| at + MS * rng.below(4000) as u32),
                }
            })
            .collect();
        arrivals.sort_by_key(|a| a.at);

        let mut waiting: Vec<Waiting> = Vec::new();
        let mut starts: Vec<Start> = Vec::new();
        let s = &h.scheduler;
        let mut next = 0;
        loop {
            s.replenish();
            h.settle().await;
            let hang_up = waiting
                .iter()
                .filter(|w| w.waiter.is_some())
                .filter_map(|w| w.hangs_up)
                .min();
            let wake = [
                arrivals.get(next).map(|a| a.at),
                hang_up,
                s.next_slot(),
                s.next_deadline().map(|d| d + MS),
            ]
            .into_iter()
            .flatten()
            .min();
            let Some(wake) = wake else { break };
            tokio::time::sleep_until(wake).await;
            let now = Instant::now();
            for w in &mut waiting {
                if w.hangs_up.is_some_and(|t| t <= now) {
                    w.waiter = None;
                }
            }
            while let Some(a) = arrivals.get(next).filter(|a| a.at <= now) {
                next += 1;
                let waiter = match h.join(a.client, a.n, a.max_wait) {
                    Joined::Leader(w) | Joined::Follower(w) => w,
                    Joined::Cached(_) => continue,
                };
                waiting.push(Waiting {
                    flight: waiter.flight().clone(),
                    waiter: Some(waiter),
                    arrived: now,
                    refused: false,
                    hangs_up: a.hangs_up,
                });
            }
            // A refusal comes at once or never: once the bookings of this instant are done,
            // only the call's answer may end the wait (checked at the end).
            h.settle().await;
            for w in waiting.iter_mut().filter(|w| w.arrived == now) {
                let Some(waiter) = &mut w.waiter else {
                    continue;
                };
                w.refused = match answer_now(waiter) {
                    None => false,
                    Some(Err(
                        ProxyError::DeadlineUnreachable { .. } | ProxyError::QueueFull { .. },
                    )) => true,
                    Some(other) => panic!("{run}: answered {other:?} on arrival"),
                };
            }
            if s.next_slot().is_some_and(|slot| slot <= now)
                && let (Some(at), _) = s.take_due_slots(now)
                && let Some(flight) = s.claim(at)
            {
                let wanted = waiting.iter().any(|w| {
                    w.waiter
                        .as_ref()
                        .is_some_and(|w| Arc::ptr_eq(w.flight(), &flight))
                });
                assert!(wanted, "{run}: a start for a lookup nobody waits for");
                assert!(at <= flight.deadline, "{run}: started past its deadline");
                s.finish(&flight, Ok(score()));
                starts.push(Start { at, flight });
            }
            if s.next_deadline().is_some_and(|d| d + MS <= now) {
                s.expire();
            }
        }

        // Everyone still there has an answer: a score, or the refusal they got at once.
        for (i, w) in waiting.iter_mut().enumerate() {
            if let Some(waiter) = &mut w.waiter {
                let answer = answer_now(waiter);
                assert!(answer.is_some(), "{run}: lookup {i} left hanging");
                assert_eq!(answer.unwrap().is_err(), w.refused, "{run}: lookup {i}");
            }
        }
        // An admitted lookup that did not start was abandoned by all its clients, not
        // answered past its deadline.
        let mut abandoned: Vec<&Arc<Flight>> = waiting
            .iter()
            .filter(|w| !w.refused)
            .map(|w| &w.flight)
            .filter(|f| !starts.iter().any(|s| Arc::ptr_eq(&s.flight, f)))
            .collect();
        abandoned.sort_by_key(|f| Arc::as_ptr(f));
        abandoned.dedup_by_key(|f| Arc::as_ptr(f));
        for flight in &abandoned {
            assert!(!flight.is_done(), "{run}: {} expired", label(flight));
        }
        // One booked start slot per lookup that needed one: each was used, or belonged to a
        // lookup whose clients all left before it started.
        let unused = h.pacer.bookings() - starts.len();
        assert!(
            unused <= abandoned.len(),
            "{run}: {unused} start slots unused, {} lookups abandoned",
            abandoned.len()
        );
        // The load did what it is for: some starts, some refusals.
        assert!(!starts.is_empty(), "{run}");
        assert!(waiting.iter().any(|w| w.refused), "{run}");
    }
}

/// One lookup of the load above, as its client sees it.
struct Waiting {
    flight: Arc<Flight>,
    /// `None` once its client hung up.
    waiter: Option<Waiter>,
    arrived: Instant,
    /// Refused on arrival.
    refused: bool,
    hangs_up: Option<Instant>,
}

#[tokio::test(start_paused = true)]
async fn leader_and_followers_get_the_same_answer() {
    let h = harness(10, 10 * SEC, SEC);
    let mut leader = h.lead("a", 1);
    let mut followers = [h.follow("a", 1), h.follow("a", 1)];
    let _other = h.lead("b", 1);
    let first = h.start_next().await.unwrap();
    assert_eq!(label(&first.flight), "a1");
    h.scheduler
        .finish(&first.flight, Err(ProxyError::UpstreamTimeout));
    for waiter in std::iter::once(&mut leader).chain(&mut followers) {
        assert_eq!(error_now(waiter), Some(ProxyError::UpstreamTimeout));
    }
    // An error is not cached: the next identical lookup leads a new flight.
    let _again = h.lead("a", 1);
}

#[tokio::test(start_paused = true)]
async fn a_lookup_the_schedule_leaves_behind_is_answered_at_once() {
    let h = harness(10, 10 * SEC, SEC);
    let mut first = h.lead_within("a", 0, Some(1200 * MS));
    let mut second = h.lead_within("b", 0, Some(1200 * MS));
    // The slot at 0 s passes unused (say every in-flight permit was taken): the one booked
    // again is at 2 s, too late for the 1.2 s deadlines, so one of the two is answered now,
    // not at its deadline.
    let (slot, _) = h.scheduler.take_due_slots(Instant::now());
    assert_eq!(slot, Some(h.t0));
    h.scheduler.replenish();
    h.settle().await;
    assert_eq!(Instant::now(), h.t0);
    assert_eq!(
        error_now(&mut second),
        Some(ProxyError::DeadlineUnreachable {
            retry_after: 800 * MS
        })
    );
    assert_eq!(h.refusals("expired"), 1.0);
    // The other keeps its promise, at the slot still booked.
    let starts = h.dispatch().await;
    assert_eq!(offsets_ms(h.t0, &starts), [1000]);
    assert!(answer_now(&mut first).unwrap().is_ok());
}

#[tokio::test(start_paused = true)]
async fn shutdown_answers_queued_and_admitting_lookups() {
    let h = harness(10, 10 * SEC, SEC);
    let mut queued = h.lead("a", 0);
    h.pacer.hold();
    let mut admitting = h.lead("b", 0);
    assert!(admitting.flight().is_admitting());

    h.scheduler.close();
    assert_eq!(error_now(&mut queued), Some(ProxyError::ShuttingDown));
    assert_eq!(error_now(&mut admitting), Some(ProxyError::ShuttingDown));
    assert_eq!(h.scheduler.queue_len(), 0);
    assert!(matches!(
        h.scheduler.join(&key("c", 0), None, || unreachable!()),
        Err(ProxyError::ShuttingDown)
    ));
    // The booking that was under way ends without queueing anything.
    h.pacer.release();
    h.settle().await;
    assert_eq!(h.scheduler.queue_len(), 0);
    assert!(h.scheduler.claim(Instant::now()).is_none());
    assert_eq!(h.refusals("shutdown"), 3.0);
}

#[tokio::test(start_paused = true)]
async fn while_draining_only_what_can_start_in_the_grace_period_is_admitted() {
    let h = harness(10, 10 * SEC, SEC);
    h.scheduler.begin_drain(h.t0 + 1500 * MS);
    let _first = h.lead("a", 0);
    let _second = h.lead("b", 0);
    let mut third = h.lead("c", 0);
    assert_eq!(error_now(&mut third), Some(ProxyError::ShuttingDown));
    let starts = h.dispatch().await;
    assert_eq!(offsets_ms(h.t0, &starts), [0, 1000]);
}

#[tokio::test(start_paused = true)]
async fn an_open_breaker_refuses_new_lookups_and_answers_the_queued_ones() {
    let h = harness(10, 60 * SEC, SEC);
    let mut queued: Vec<_> = (0..3).map(|n| h.lead("a", n)).collect();
    h.breaker.record(CallVerdict::Failure, Instant::now());
    h.scheduler.fail_queued(30 * SEC);
    for waiter in &mut queued {
        assert_eq!(
            error_now(waiter),
            Some(ProxyError::CircuitOpen {
                retry_after: 30 * SEC
            })
        );
    }
    assert!(matches!(
        h.scheduler.join(&key("b", 0), None, || unreachable!()),
        Err(ProxyError::CircuitOpen { .. })
    ));
    assert_eq!(h.refusals("circuit_open"), 4.0);
}

/// How the call task below ends.
enum Fate {
    /// Never: it is aborted (as the runtime shutting down would).
    Aborted,
    Panics,
    /// It answers the flight itself.
    Answers,
}

/// A call task as the dispatcher spawns it, holding the guard that answers the flight if the
/// task ends without doing so. Returns once the guard is in place.
async fn call_task(
    scheduler: Arc<Scheduler>,
    flight: Arc<Flight>,
    fate: Fate,
) -> tokio::task::JoinHandle<()> {
    let (armed, is_armed) = tokio::sync::oneshot::channel();
    let task = tokio::spawn(async move {
        let completion = Completion::new(&scheduler, &flight);
        let _ = armed.send(());
        match fate {
            Fate::Aborted => std::future::pending::<()>().await,
            Fate::Panics => panic!("the call task panics (as this test intends)"),
            Fate::Answers => {
                scheduler.finish(&flight, Ok(score()));
                completion.answered();
            }
        }
    });
    is_armed.await.unwrap();
    task
}

#[tokio::test(start_paused = true)]
async fn a_call_task_that_dies_answers_its_lookup() {
    let h = harness(10, 60 * SEC, SEC);
    let mut waiters = [h.lead("a", 0), h.lead("b", 0), h.lead("c", 0)];
    for fate in [Fate::Aborted, Fate::Panics, Fate::Answers] {
        let start = h.start_next().await.unwrap();
        let task = call_task(h.scheduler.clone(), start.flight, fate).await;
        task.abort();
        let _ = task.await;
    }
    let [aborted, panicked, answered] = &mut waiters;
    assert_eq!(error_now(aborted), Some(ProxyError::ShuttingDown));
    assert_eq!(error_now(panicked), Some(ProxyError::ShuttingDown));
    assert!(
        answer_now(answered).unwrap().is_ok(),
        "the first answer wins"
    );
}
