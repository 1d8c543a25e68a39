//! The pacer's and the start gate's rules on a paused clock.

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

/// Raises a 10..100 ms guard to 80 ms with three penalties, each for a call started
/// after the last raise.
async fn raised_guard() -> Arc<Guard> {
    let guard = Arc::new(Guard::new(10 * MS, 100 * MS));
    for _ in 0..3 {
        tokio::time::advance(MS).await;
        let started = Instant::now();
        tokio::time::advance(MS).await;
        guard.penalised(started, Instant::now(), MS);
    }
    assert_eq!(guard.current(), 80 * MS);
    guard
}

#[tokio::test(start_paused = true)]
async fn the_learned_guard_spaces_bookings_and_starts() {
    let guard = raised_guard().await;
    let pacer = LocalPacer::adaptive(1000 * MS, guard.clone());
    let gate = StartGate::adaptive(1000 * MS, guard.clone());
    let t0 = Instant::now();
    assert_eq!(pacer.interval(), 1080 * MS);
    assert_eq!(pacer.book(far(), 10).await, Ok(t0));
    assert_eq!(pacer.book(far(), 10).await, Ok(t0 + 1080 * MS));
    // A slot booked before the guard rose is pushed by the gate to the new spacing.
    let first = gate.pass(t0, None, || None, || None).await.unwrap();
    tokio::time::advance(MS).await;
    let started = Instant::now();
    tokio::time::advance(MS).await;
    guard.penalised(started, Instant::now(), MS);
    assert_eq!(guard.current(), 100 * MS);
    let second = gate
        .pass(t0 + 1080 * MS, None, || None, || None)
        .await
        .unwrap();
    assert_eq!(second - first, 1100 * MS);
}

#[tokio::test(start_paused = true)]
async fn a_call_that_came_back_lets_the_next_start_count_from_its_answer() {
    let guard = raised_guard().await;
    let pacer = LocalPacer::adaptive(1000 * MS, guard.clone());
    let gate = StartGate::adaptive(1000 * MS, guard.clone());
    let t0 = Instant::now();
    let slot = pacer.book(far(), 10).await.unwrap();
    let first = gate.pass(slot, None, || None, || None).await.unwrap();
    // Its answer is back after 5 ms, nothing else open: it has arrived by then, so the
    // next call may start 1/rate (plus the floor) after the answer, not after the start
    // plus the whole 80 ms guard. Its arrival is then at least 1010 ms after the first's.
    tokio::time::advance(5 * MS).await;
    let next = gate.call_ended(first, Instant::now(), true);
    assert_eq!(next, Some(t0 + 1015 * MS));
    pacer.settle(first, t0 + 1015 * MS);
    let slot = pacer.book(far(), 10).await.unwrap();
    assert_eq!(slot, t0 + 1015 * MS);
    let second = gate.pass(slot, None, || None, || None).await.unwrap();
    assert_eq!(second, t0 + 1015 * MS);

    // Overlapping calls: a third starts before the second is back; the second coming
    // back says nothing about the third, and an unanswered call says nothing at all.
    let slot = pacer.book(far(), 10).await.unwrap();
    assert_eq!(slot, second + 1080 * MS);
    let third = gate.pass(slot, None, || None, || None).await.unwrap();
    assert_eq!(gate.call_ended(second, Instant::now(), true), None);
    assert_eq!(gate.call_ended(third, Instant::now(), false), None);
    assert_eq!(gate.earliest(third), third + 1080 * MS);
    // A slot booked after the one in hand is not moved by an answer.
    let booked = pacer.book(far(), 10).await.unwrap();
    pacer.settle(first, t0);
    assert_eq!(pacer.book(far(), 10).await, Ok(booked + 1080 * MS));
    // A fixed gate keeps its spacing whatever comes back.
    let fixed = StartGate::new(1010 * MS);
    let start = fixed
        .pass(Instant::now(), None, || None, || None)
        .await
        .unwrap();
    assert_eq!(fixed.call_ended(start, start, true), None);
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

#[tokio::test(start_paused = true)]
async fn a_replicas_gate_follows_the_fleets_guard_less_the_late_tolerance() {
    let guard = std::sync::Arc::new(Guard::new(10 * MS, 100 * MS));
    let gate = StartGate::fleet(1000 * MS, guard.clone());
    let first = gate
        .pass(Instant::now(), None, || None, || None)
        .await
        .unwrap();
    // At the floor: 1/rate plus the 10 ms guard less its 5 ms late tolerance.
    assert_eq!(gate.earliest(first), first + 1005 * MS);
    // Another replica learned 60 ms: this replica's own starts follow at once.
    guard.note_fleet(60 * MS);
    assert_eq!(gate.earliest(first), first + 1030 * MS);
    let second = gate.pass(first, None, || None, || None).await.unwrap();
    assert_eq!(second - first, 1030 * MS);
    // The causal rule is one process's: other replicas' calls may be under way.
    assert_eq!(gate.call_ended(second, second + 2 * MS, true), None);
    // Back at the floor, the bucket (set at the floor) still never refuses a start.
    guard.note_fleet(Duration::ZERO);
    let mut last = second;
    for idle in [0, 7, 1500, 0, 999, 3] {
        tokio::time::advance(idle * MS).await;
        let next = gate
            .pass(Instant::now(), None, || None, || None)
            .await
            .expect("the bucket agrees");
        assert!(next - last >= 1005 * MS, "{:?}", next - last);
        last = next;
    }
}

#[tokio::test(start_paused = true)]
async fn an_answer_slower_than_the_quickest_pushes_the_next_start_by_the_excess() {
    let guard = std::sync::Arc::new(Guard::new(10 * MS, 100 * MS));
    for _ in 0..20 {
        guard.clean_call(3 * MS);
    }
    let gate = StartGate::adaptive(1000 * MS, guard.clone());
    let first = gate
        .pass(Instant::now(), None, || None, || None)
        .await
        .unwrap();
    // It comes back after 154 ms: 151 ms more than the quickest round trips, 150 beyond
    // the noise the floor absorbs. Its arrival may have been that late, so the next start
    // keeps 1/rate plus the floor from there, not from its start plus the 10 ms guard.
    assert_eq!(gate.call_ended(first, first + 154 * MS, true), None);
    assert_eq!(gate.earliest(first), first + 1160 * MS);
    // An ordinary answer pushes nothing beyond the usual spacing.
    let quiet = StartGate::adaptive(1000 * MS, guard.clone());
    let start = quiet
        .pass(Instant::now(), None, || None, || None)
        .await
        .unwrap();
    quiet.call_ended(start, start + 4 * MS, true);
    assert!(quiet.earliest(start) <= start + 1010 * MS);
    // An unanswered call says nothing about its arrival.
    let lost = StartGate::adaptive(1000 * MS, guard);
    let start = lost
        .pass(Instant::now(), None, || None, || None)
        .await
        .unwrap();
    lost.call_ended(start, start + 900 * MS, false);
    assert_eq!(lost.earliest(start), start + 1010 * MS);
}

#[tokio::test(start_paused = true)]
async fn a_start_the_timer_woke_late_gives_back_up_to_the_slack() {
    let guard = std::sync::Arc::new(Guard::new(10 * MS, 100 * MS));
    let gate = StartGate::adaptive(1000 * MS, guard);
    let t0 = Instant::now();
    // Woken 1.5 ms behind its slot: the next slot keeps its place on the grid.
    tokio::time::advance(MS + MS / 2).await;
    let first = gate.pass(t0, None, || None, || None).await.unwrap();
    assert_eq!(gate.earliest(t0 + 1010 * MS), t0 + 1010 * MS);
    // Woken 5 ms behind: only 2 ms of it is the timer's to give back.
    let slot = t0 + 1010 * MS;
    tokio::time::advance(1010 * MS - (first - t0) + 5 * MS).await;
    let second = gate.pass(slot, None, || None, || None).await.unwrap();
    assert_eq!(second, slot + 5 * MS);
    assert_eq!(gate.earliest(slot + 1010 * MS), second + 1008 * MS);
    // A real departure later than the start gives nothing back.
    gate.note_departure(second + 3 * MS);
    assert_eq!(gate.earliest(slot + 1010 * MS), second + 1013 * MS);
}
