//! One booked start slot per lookup that needs one (counted on the fake pacer), and a
//! penalty voiding the booked ones: the lookups behind it are planned again, or answered
//! with a 503 at once when no start before their deadline is left.

use super::*;
use crate::lookup::error::ProxyError;

#[tokio::test(start_paused = true)]
async fn one_start_slot_is_booked_per_lookup() {
    let h = harness(10, 60 * SEC, SEC);
    let _leaders: Vec<_> = (0..5).map(|n| h.lead("a", n)).collect();
    let _followers: Vec<_> = (0..3).map(|n| h.follow("a", n)).collect();
    assert_eq!(h.pacer.bookings(), 5, "followers book nothing");
    assert_eq!(h.scheduler.booked_slots(), 5);
    // The dispatcher asks for the deficit whenever it wakes: there is none.
    h.scheduler.replenish();
    h.scheduler.replenish();
    h.settle().await;
    assert_eq!(h.pacer.bookings(), 5);

    let starts = h.dispatch().await;
    assert_eq!(starts.len(), 5);
    assert_eq!(h.pacer.bookings(), 5, "no start slot booked twice");
    assert_eq!(h.scheduler.booked_slots(), 0, "and none left over");
}

#[tokio::test(start_paused = true)]
async fn a_booking_on_a_task_is_one_per_flight_too() {
    let h = harness(10, 60 * SEC, SEC);
    h.pacer.hold();
    let mut leader = h.lead("a", 0);
    let _followers = [h.follow("a", 0), h.follow("a", 0)];
    assert_eq!(h.booking(), 1);
    h.pacer.release();
    h.settle().await;
    assert_eq!(leader.queued().await, Some(0));
    assert_eq!(h.pacer.bookings(), 1);
    let starts = h.dispatch().await;
    assert_eq!(labels(&starts), ["a0"]);
}

#[tokio::test(start_paused = true)]
async fn a_start_slot_that_passed_unused_is_booked_again_once() {
    let h = harness(10, 60 * SEC, SEC);
    let _waiters = [h.lead("a", 0), h.lead("b", 0)];
    // The slot at 0 s passes without a call (say every in-flight permit was taken); the
    // dispatcher replenishes after each such slot and whenever it wakes.
    let (slot, taken) = h.scheduler.take_due_slots(Instant::now());
    assert_eq!((slot, taken), (Some(h.t0), 1));
    for _ in 0..3 {
        h.scheduler.replenish();
    }
    h.settle().await;
    assert_eq!(
        h.pacer.bookings(),
        3,
        "two lookups, one slot lost, one booked again"
    );
    let starts = h.dispatch().await;
    assert_eq!(offsets_ms(h.t0, &starts), [1000, 2000]);
    assert_eq!(h.scheduler.booked_slots(), 0);
}

/// Three lookups due by 4 s, slots at 0, 1 and 2 s; the first call is answered 429 with a
/// penalty to 2.5 s. The slots at 1 and 2 s are void; the penalised lookup goes first again,
/// at the pacer's next free start (3 s), the next at 4 s, just in time, and the third, which
/// no start before 4 s is left for, is answered 503 now, blaming the penalty.
#[tokio::test(start_paused = true)]
async fn a_penalty_voids_the_start_slots_inside_it_and_replans_the_rest() {
    let h = harness(10, 4 * SEC, SEC);
    let mut waiters = [h.lead("a", 0), h.lead("b", 0), h.lead("c", 0)];
    let first = h.start_next().await.unwrap();
    assert_eq!(label(&first.flight), "a0");

    let until = h.t0 + 2500 * MS;
    assert!(
        h.penalty(&first.flight, until).await,
        "a0 can still start in time"
    );
    assert_eq!(
        h.scheduler.booked_slots(),
        0,
        "the slots inside the penalty are void"
    );
    h.settle().await;

    let [a, b, c] = &mut waiters;
    assert_eq!(
        error_now(c),
        Some(ProxyError::UpstreamPenalty {
            retry_after: 2500 * MS
        })
    );
    assert_eq!(h.refusals("expired"), 1.0);
    let starts = h.dispatch().await;
    assert_eq!(
        labels(&starts),
        ["a0", "b0"],
        "the penalised lookup goes first"
    );
    assert_eq!(offsets_ms(h.t0, &starts), [3000, 4000]);
    assert!(answer_now(a).unwrap().is_ok());
    assert!(answer_now(b).unwrap().is_ok());
    assert_eq!(
        first.flight.attempts(),
        0,
        "attempts are the call task's to count"
    );
    // Three first bookings, then one for each lookup planned again, none to spare.
    assert_eq!(h.pacer.bookings(), 5);
    assert_eq!(h.scheduler.booked_slots(), 0);
}

#[tokio::test(start_paused = true)]
async fn a_penalty_longer_than_every_deadline_answers_everyone_at_once() {
    let h = harness(10, 4 * SEC, SEC);
    let mut waiters = [h.lead("a", 0), h.lead("b", 0)];
    let first = h.start_next().await.unwrap();
    let until = h.t0 + 10 * SEC;
    assert!(!h.penalty(&first.flight, until).await);
    h.settle().await;
    for waiter in &mut waiters {
        assert_eq!(
            error_now(waiter),
            Some(ProxyError::UpstreamPenalty {
                retry_after: 10 * SEC
            })
        );
    }
    assert_eq!(h.scheduler.queue_len(), 0);
    assert!(h.dispatch().await.is_empty());
    // While it lasts, a new lookup is refused at once, and told why.
    let mut late = h.lead("c", 0);
    assert_eq!(
        error_now(&mut late),
        Some(ProxyError::UpstreamPenalty {
            retry_after: 10 * SEC
        })
    );
}

#[tokio::test(start_paused = true)]
async fn no_start_slot_inside_a_penalty_is_used() {
    let h = harness(20, 60 * SEC, SEC);
    let _waiters: Vec<_> = (0..8)
        .map(|n| h.lead(["a", "b"][n as usize % 2], n))
        .collect();
    let first = h.start_next().await.unwrap();
    let until = h.t0 + 5300 * MS;
    h.penalty(&first.flight, until).await;
    let starts = h.dispatch().await;
    assert_eq!(
        starts.len(),
        8,
        "every lookup starts, the penalised one again"
    );
    assert!(starts.iter().all(|s| s.at >= until));
    // Eight first bookings, then one for each of the five start slots voided (1 to 5 s) and
    // one for the penalised lookup: 6 and 7 s are still good.
    assert_eq!(h.pacer.bookings(), 8 + 6);
    assert_eq!(offsets_ms(h.t0, &starts)[..2], [6000, 7000]);
}

/// Three lookups, slots at 0, 1 and 2 s, the third due by 3.5 s; the first call gets a 429
/// with a penalty to 1.5 s. Only the slot at 1 s is void. The penalised lookup and the second
/// can still be served (at 2 s, and at 3 s once booked again); the third, pushed to 4 s, is
/// answered now rather than at its deadline, and nothing is booked for it.
#[tokio::test(start_paused = true)]
async fn a_penalty_answers_at_once_whom_it_pushes_past_their_deadline() {
    let h = harness(10, 10 * SEC, SEC);
    let _x = h.lead("x", 0);
    let _a = h.lead("a", 0);
    let mut b = h.lead_within("b", 0, Some(3500 * MS));
    let first = h.start_next().await.unwrap();
    assert!(h.penalty(&first.flight, h.t0 + 1500 * MS).await);
    h.settle().await;
    assert_eq!(Instant::now(), h.t0);
    assert_eq!(
        error_now(&mut b),
        Some(ProxyError::UpstreamPenalty {
            retry_after: 1500 * MS
        })
    );
    let starts = h.dispatch().await;
    assert_eq!(labels(&starts), ["x0", "a0"]);
    assert_eq!(offsets_ms(h.t0, &starts), [2000, 3000]);
    // Three first bookings and one for the slot voided; none for the lookup answered.
    assert_eq!(h.pacer.bookings(), 4);
    assert_eq!(h.scheduler.booked_slots(), 0);
}

/// A slot passes unused and its top-up is slow to book; meanwhile a client leaves, so the
/// slots still booked cover everyone left. When the booking comes back too late for any
/// deadline, nobody is answered for it: every lookup still queued has its slot.
#[tokio::test(start_paused = true)]
async fn a_top_up_that_comes_back_too_late_answers_nobody_the_slots_still_serve() {
    let h = harness(10, 10 * SEC, SEC);
    let within = Some(2500 * MS);
    let mut a = h.lead_within("a", 0, within);
    let mut b = h.lead_within("b", 0, within);
    let c = h.lead_within("c", 0, within);
    let (slot, _) = h.scheduler.take_due_slots(Instant::now());
    assert_eq!(slot, Some(h.t0));
    h.pacer.hold();
    h.scheduler.replenish();
    h.pacer.waiting(1).await;
    drop(c);
    h.pacer.release();
    h.settle().await;
    assert!(answer_now(&mut b).is_none(), "b still has the slot at 2 s");
    let starts = h.dispatch().await;
    assert_eq!(labels(&starts), ["a0", "b0"]);
    assert_eq!(offsets_ms(h.t0, &starts), [1000, 2000]);
    assert!(answer_now(&mut a).unwrap().is_ok());
    assert_eq!(h.refusals("expired"), 0.0);
}
