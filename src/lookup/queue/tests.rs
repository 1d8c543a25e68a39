//! The fair queue's rules, one test each: order, fairness, admission, expiry, background.

use super::*;

fn client(s: &str) -> ClientId {
    ClientId::parse(s).unwrap()
}

/// Plenty of evenly spaced slots from now.
fn schedule(interval_ms: u64) -> Schedule {
    let now = Instant::now();
    Schedule::uniform(now, now, Duration::from_millis(interval_ms), 100)
}

fn far(s: &Schedule) -> Instant {
    s.now + Duration::from_secs(3600)
}

fn drain<T>(q: &mut FairQueue<T>) -> Vec<T> {
    std::iter::from_fn(|| q.pop().map(|(_, j)| j)).collect()
}

#[test]
fn bounded_with_retry_after_until_the_head_starts() {
    let now = Instant::now();
    let s = Schedule::uniform(
        now,
        now + Duration::from_millis(700),
        Duration::from_millis(1000),
        10,
    );
    let mut q = FairQueue::new(2);
    assert!(q.admit(&client("a"), far(&s), 1, &s).is_ok());
    assert!(q.admit(&client("b"), far(&s), 2, &s).is_ok());
    let (refusal, job) = q.admit(&client("c"), far(&s), 3, &s).unwrap_err();
    assert_eq!(job, 3);
    assert_eq!(
        refusal,
        Refusal::Full {
            retry_after: Duration::from_millis(700)
        }
    );
}

#[test]
fn one_clients_burst_does_not_starve_another() {
    let s = schedule(1000);
    let mut q = FairQueue::new(100);
    for i in 0..10 {
        q.admit(&client("burst"), far(&s), format!("burst{i}"), &s)
            .unwrap();
    }
    let (_, pos) = q
        .admit(&client("single"), far(&s), "single".into(), &s)
        .unwrap();
    assert_eq!(
        pos, 1,
        "the single lookup goes right after the burst's first"
    );
    let order = drain(&mut q);
    assert_eq!(order[0], "burst0");
    assert_eq!(order[1], "single");
    assert_eq!(order[2], "burst1");
}

#[test]
fn round_robin_across_three_clients() {
    let s = schedule(1000);
    let mut q = FairQueue::new(100);
    for i in 0..3 {
        q.admit(&client("a"), far(&s), format!("a{i}"), &s).unwrap();
    }
    for i in 0..2 {
        q.admit(&client("b"), far(&s), format!("b{i}"), &s).unwrap();
    }
    q.admit(&client("c"), far(&s), "c0".into(), &s).unwrap();
    let first = q.pop().unwrap().1;
    assert_eq!(first, "a0");
    // Arrivals after some progress join the current round, not the front.
    q.admit(&client("d"), far(&s), "d0".into(), &s).unwrap();
    // d arrives during round 1 and is served in round 2, after the round's earlier
    // arrivals: one round behind, however many lookups the others queued.
    let rest = drain(&mut q);
    assert_eq!(rest, ["b0", "c0", "a1", "b1", "d0", "a2"]);
}

#[test]
fn refuses_at_admission_what_cannot_start_in_time() {
    let s = schedule(1000);
    let mut q = FairQueue::new(100);
    let deadline = s.now + Duration::from_millis(2500);
    for i in 0..3 {
        q.admit(&client("a"), deadline, i, &s).unwrap();
    }
    // Position 3 would start at 3 s, past the 2.5 s deadline: refused, not queued.
    let (refusal, _) = q.admit(&client("a"), deadline, 3, &s).unwrap_err();
    assert_eq!(
        refusal,
        Refusal::Deadline {
            retry_after: Duration::from_millis(500)
        }
    );
    assert_eq!(q.len(), 3);
}

#[test]
fn never_breaks_an_admitted_jobs_promise() {
    let s = schedule(1000);
    let mut q = FairQueue::new(100);
    let tight = s.now + Duration::from_millis(2000);
    for i in 0..3 {
        q.admit(&client("a"), tight, format!("a{i}"), &s).unwrap();
    }
    // b's fair place is position 1, which would push a2 to 3 s, past its deadline:
    // b goes to the back instead, where it still makes its own (later) deadline.
    let (_, pos) = q.admit(&client("b"), far(&s), "b0".into(), &s).unwrap();
    assert_eq!(pos, 3);
    assert_eq!(drain(&mut q), ["a0", "a1", "a2", "b0"]);
}

#[test]
fn removal_and_requeue() {
    let s = schedule(1000);
    let mut q = FairQueue::new(3);
    let (a, _) = q.admit(&client("a"), far(&s), "a", &s).unwrap();
    let (b, _) = q.admit(&client("b"), far(&s), "b", &s).unwrap();
    assert_eq!(q.remove(a), Some("a"));
    assert_eq!(q.remove(a), None);
    let (popped, job) = q.pop().unwrap();
    assert_eq!((popped, job), (b, "b"));
    assert_eq!(q.remove(b), None, "a started job cannot be removed");
    q.admit(&client("c"), far(&s), "c", &s).unwrap();
    q.requeue_front(&client("b"), far(&s), "b-retry", &s)
        .unwrap();
    assert_eq!(drain(&mut q), ["b-retry", "c"]);
}

#[test]
fn expire_fails_only_those_pushed_past_their_deadline() {
    let s = schedule(1000);
    let mut q = FairQueue::new(10);
    let soon = s.now + Duration::from_millis(1500);
    q.admit(&client("a"), far(&s), "a0", &s).unwrap();
    q.admit(&client("b"), soon, "b0", &s).unwrap();
    q.admit(&client("c"), far(&s), "c0", &s).unwrap();
    // A 2 s penalty moves everything out by 2 s: b0 can no longer make it.
    let later = Schedule::uniform(s.now, s.now + Duration::from_secs(2), s.interval, 3);
    let expired = q.expire(&later);
    assert_eq!(expired.len(), 1);
    assert_eq!(expired[0].0, "b0");
    assert_eq!(
        expired[0].1,
        Refusal::Deadline {
            retry_after: Duration::from_millis(1500)
        }
    );
    assert_eq!(drain(&mut q), ["a0", "c0"]);
}

#[test]
fn pop_last_takes_the_job_that_would_start_last() {
    let s = schedule(1000);
    let mut q = FairQueue::new(10);
    q.admit(&client("a"), far(&s), "a0", &s).unwrap();
    q.admit(&client("a"), far(&s), "a1", &s).unwrap();
    q.admit(&client("b"), far(&s), "b0", &s).unwrap();
    assert_eq!(q.pop_last().map(|(_, j)| j), Some("a1"));
    assert_eq!(drain(&mut q), ["a0", "b0"]);
    assert_eq!(q.pop_last(), None);
}

#[test]
fn uneven_slots_are_honoured_exactly() {
    // Slots booked in a shared schedule: other replicas' calls sit in between.
    let now = Instant::now();
    let ms = Duration::from_millis;
    let s = Schedule {
        now,
        slots: vec![now + ms(100), now + ms(1900)],
        interval: ms(500),
    };
    let mut q = FairQueue::new(10);
    q.admit(&client("a"), now + ms(200), "a0", &s).unwrap();
    // Position 1 starts at 1.9 s: refused for a 1.5 s deadline, though 1 × interval
    // would have said 0.5 s.
    let (refusal, _) = q.admit(&client("a"), now + ms(1500), "a1", &s).unwrap_err();
    assert_eq!(
        refusal,
        Refusal::Deadline {
            retry_after: ms(400)
        }
    );
    // Beyond the booked slots, the interval extrapolates.
    assert_eq!(s.start_at(3), now + ms(2900));
}

#[test]
fn background_work_waits_behind_every_caller_and_takes_no_place() {
    let s = schedule(1000);
    let mut q = FairQueue::new(2);
    let soon = s.now + Duration::from_millis(500);
    // A refresh queued first, with a deadline a caller could push it past.
    let (_, pos) = q
        .admit_background(&client("a"), soon, "refresh", &s)
        .unwrap();
    assert_eq!(pos, 0);
    assert_eq!(
        (q.len(), q.interactive_len(), q.background_len()),
        (1, 0, 1)
    );
    // Callers arriving later go ahead of it, and it does not count against capacity.
    let (_, pos) = q.admit(&client("b"), far(&s), "b0", &s).unwrap();
    assert_eq!(
        pos, 0,
        "a caller never waits behind unstarted background work"
    );
    q.admit(&client("c"), far(&s), "c0", &s).unwrap();
    assert!(matches!(
        q.admit(&client("d"), far(&s), "d0", &s),
        Err((Refusal::Full { .. }, _))
    ));
    // The refresh, now pushed to position 2 (2 s), is past its deadline: it expires,
    // the callers do not.
    let expired = q.expire(&s);
    assert_eq!(expired.len(), 1);
    assert_eq!(expired[0].0, "refresh");
    assert_eq!(q.background_len(), 0);
    assert_eq!(drain(&mut q), ["b0", "c0"]);
}

#[test]
fn background_work_is_admitted_at_the_back_only_if_it_can_start_in_time() {
    let s = schedule(1000);
    let mut q = FairQueue::new(10);
    q.admit(&client("a"), far(&s), "a0", &s).unwrap();
    q.admit(&client("a"), far(&s), "a1", &s).unwrap();
    let tight = s.now + Duration::from_millis(1500);
    let (refusal, _) = q
        .admit_background(&client("b"), tight, "refresh", &s)
        .unwrap_err();
    assert_eq!(
        refusal,
        Refusal::Deadline {
            retry_after: Duration::from_millis(500)
        }
    );
    let (id, pos) = q
        .admit_background(&client("b"), far(&s), "refresh", &s)
        .unwrap();
    assert_eq!(pos, 2);
    assert_eq!(q.remove(id), Some("refresh"));
    assert_eq!(q.background_len(), 0);
    assert_eq!(drain(&mut q), ["a0", "a1"]);
}

#[test]
fn close_returns_everything_and_refuses_more() {
    let s = schedule(1000);
    let mut q = FairQueue::new(10);
    q.admit(&client("a"), far(&s), 1, &s).unwrap();
    q.admit(&client("b"), far(&s), 2, &s).unwrap();
    let mut left = q.close();
    left.sort();
    assert_eq!(left, [1, 2]);
    assert_eq!(
        q.admit(&client("a"), far(&s), 3, &s).unwrap_err().0,
        Refusal::Closed
    );
    assert!(q.is_empty());
}
