//! Fairness across client ids: start-time fair queueing, so a client with one lookup waits
//! at most one round behind a client that queued many.

use super::*;

#[tokio::test(start_paused = true)]
async fn a_burst_from_one_client_does_not_starve_another() {
    let h = harness(20, 60 * SEC, SEC);
    let _burst: Vec<_> = (0..5).map(|n| h.lead("burst", n)).collect();
    let mut single = h.lead("single", 0);
    assert_eq!(
        single.queued().await,
        Some(1),
        "right after the burst's first"
    );
    let starts = h.dispatch().await;
    assert_eq!(
        labels(&starts),
        ["burst0", "single0", "burst1", "burst2", "burst3", "burst4"]
    );
    assert_eq!(offsets_ms(h.t0, &starts), [0, 1000, 2000, 3000, 4000, 5000]);
}

#[tokio::test(start_paused = true)]
async fn clients_take_turns_and_a_latecomer_joins_the_next_round() {
    let h = harness(20, 60 * SEC, SEC);
    let mut waiters = Vec::new();
    for (client, count) in [("a", 3), ("b", 2), ("c", 1)] {
        waiters.extend((0..count).map(|n| h.lead(client, n)));
    }
    let first = h.start_next().await.unwrap();
    h.scheduler.finish(&first.flight, Ok(score()));
    // d arrives during the first round and is served in the second, after that round's
    // earlier arrivals: one round behind, however many the others queued.
    waiters.push(h.lead("d", 0));
    let rest = h.dispatch().await;
    assert_eq!(label(&first.flight), "a0");
    assert_eq!(labels(&rest), ["b0", "c0", "a1", "b1", "d0", "a2"]);
}
