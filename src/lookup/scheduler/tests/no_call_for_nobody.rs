//! No upstream call for a lookup nobody waits for: the dispatcher claims no start for it,
//! whatever stage its last client hung up at, and its start slot serves the next lookup.

use super::*;

#[tokio::test(start_paused = true)]
async fn a_queued_lookup_whose_client_hung_up_is_never_started() {
    let h = harness(10, 10 * SEC, SEC);
    let gone = h.lead("a", 1);
    let _b = h.lead("b", 2);
    assert_eq!(h.scheduler.queue_len(), 2);

    drop(gone);
    // It left the queue at once, in the same critical section as its last waiter; its start
    // slot stays booked as a spare.
    assert_eq!(h.scheduler.queue_len(), 1);
    assert_eq!(h.scheduler.booked_slots(), 2);
    assert_eq!(h.metric("score_proxy_queue_abandoned_total"), 1.0);

    let starts = h.dispatch().await;
    assert_eq!(labels(&starts), ["b2"], "no start for the lookup that left");
    assert_eq!(
        offsets_ms(h.t0, &starts),
        [0],
        "b moved up to the first start slot"
    );

    // The spare serves the next lookup, without a booking of its own.
    let _c = h.lead("c", 3);
    assert_eq!(h.pacer.bookings(), 2);
    let starts = h.dispatch().await;
    assert_eq!(labels(&starts), ["c3"]);
    assert_eq!(offsets_ms(h.t0, &starts), [1000]);
}

#[tokio::test(start_paused = true)]
async fn a_lookup_abandoned_while_its_start_slot_is_booked_is_never_started() {
    let h = harness(10, 10 * SEC, SEC);
    h.pacer.hold();
    let gone = h.lead("a", 1);
    assert!(gone.flight().is_admitting());
    drop(gone);

    h.pacer.release();
    h.settle().await;
    // The booking found it abandoned: not queued, not registered, its slot a spare.
    assert_eq!(h.scheduler.queue_len(), 0);
    assert_eq!(h.scheduler.booked_slots(), 1);
    assert_eq!(h.metric("score_proxy_queue_abandoned_total"), 1.0);
    assert_eq!(h.scheduler.claim(Instant::now()).map(|f| label(&f)), None);
    let _again = h.lead("a", 1);
}

#[tokio::test(start_paused = true)]
async fn a_follower_keeps_the_flight_its_leader_left() {
    let h = harness(10, 10 * SEC, SEC);
    let leader = h.lead("a", 1);
    let mut follower = h.follow("a", 1);
    drop(leader);
    assert_eq!(h.scheduler.queue_len(), 1, "someone still waits for it");

    let starts = h.dispatch().await;
    assert_eq!(labels(&starts), ["a1"]);
    assert!(answer_now(&mut follower).unwrap().is_ok());
    assert_eq!(h.pacer.bookings(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_lookup_whose_call_started_is_joined_not_called_again() {
    let h = harness(10, 10 * SEC, SEC);
    let leader = h.lead("a", 1);
    let started = h.start_next().await.unwrap();
    // Its client hangs up after the call started: the call is paid for, and stays
    // registered, so an identical lookup joins it instead of making another.
    drop(leader);
    let mut late = h.follow("a", 1);
    assert_eq!(h.pacer.bookings(), 1);
    assert!(answer_now(&mut late).is_none());

    h.scheduler.finish(&started.flight, Ok(score()));
    assert!(answer_now(&mut late).unwrap().is_ok());
    // Once answered, the next identical lookup finds the cache.
    assert!(matches!(h.join("a", 1, None), Joined::Cached(_)));
}

#[tokio::test(start_paused = true)]
async fn nobody_waiting_means_no_start_at_the_slot() {
    let h = harness(10, 10 * SEC, SEC);
    let a = h.lead("a", 1);
    let b = h.lead("b", 2);
    tokio::time::sleep_until(h.t0 + SEC).await;
    drop((a, b));
    // The dispatcher reaches the slot after every client left: it claims nothing.
    let (slot, _) = h.scheduler.take_due_slots(Instant::now());
    assert!(slot.is_some());
    assert!(h.scheduler.claim(slot.unwrap()).is_none());
    assert_eq!(h.metric("score_proxy_queue_abandoned_total"), 2.0);
}

#[tokio::test(start_paused = true)]
async fn a_penalised_lookup_whose_client_left_is_not_tried_again() {
    let h = harness(10, 10 * SEC, SEC);
    let leader = h.lead("a", 1);
    let _other = h.lead("b", 1);
    let first = h.start_next().await.unwrap();
    // The client hangs up while the call is out; the call comes back 429.
    drop(leader);
    assert!(!h.penalty(&first.flight, h.t0 + 1500 * MS).await);
    let starts = h.dispatch().await;
    assert_eq!(labels(&starts), ["b1"], "no second call for a1");
    // Nothing left of it: the next lookup for it leads a new flight.
    let _again = h.lead("a", 1);
}
