//! The learned guard against a simulator across a "network": a seeded one-way delay before
//! the simulator counts each arrival.
//!
//! A burst of distinct lookups is paced at 10 calls/s against the simulator's 100 ms rule.
//! With starts 1/rate + 2 ms apart, two calls arrive closer than 100 ms whenever the first
//! one's delay exceeds the second one's by more than 2 ms, which the seeded delays (uniform
//! in 0..15 ms) make happen many times in a burst of twenty. The learned guard starts at the
//! same 2 ms floor; it may be caught once before it has seen enough round trips (the penalty
//! raises it), and never after that. Spikes the guard cannot cover at all (30 ms against a
//! 10 ms ceiling) are handled by the answers: a call whose round trip exceeds the quickest
//! pushes the next start by that much.
//!
//! The delays are seeded, so which call is delayed by how much is the same on every run; real
//! time adds only scheduling noise, a millisecond or two, far inside the learned guard's
//! margin (the spread of round trips, about 13 ms, on top of the floor).

mod common;

use common::{Setup, cpf, spawn};
use score_sim::{ArrivalDelay, SimStats};
use std::time::Duration;

const BURST: u32 = 20;
const SEED: u64 = 16;

/// The simulator's penalty is 300 ms; the proxy waits as long after a 429, so that the
/// fixed guard's penalties do not make the test slow.
fn across_a_network(setup: Setup) -> Setup {
    setup.arg("--upstream-penalty", "300ms").sim(|s| {
        s.arrival_delay = ArrivalDelay::Uniform {
            min: Duration::ZERO,
            max: Duration::from_millis(15),
        };
        s.seed = SEED;
    })
}

/// Sends the burst, checks every lookup got its score, and returns what the simulator saw.
async fn burst(setup: Setup) -> (common::TestApp, SimStats) {
    let t = spawn(across_a_network(setup)).await;
    let lookups: Vec<_> = (0..BURST).map(|i| t.spawn_lookup(&cpf(i), "000")).collect();
    for lookup in lookups {
        let r = lookup.await.expect("lookup task");
        assert_eq!(r.status, 200, "{}", r.body);
    }
    let stats = t.sim.stats();
    (t, stats)
}

#[tokio::test]
async fn the_learned_guard_is_penalised_at_most_once_on_delays_a_fixed_guard_cannot_cover() {
    let (t, stats) = burst(Setup::default().arg("--rate-guard", "2ms")).await;
    assert!(
        stats.violations <= 1,
        "{} penalised calls: {:#?}",
        stats.violations,
        stats.arrivals
    );
    // After the first penalty (if there was one), every arrival the simulator judged is at
    // least its interval after the one before.
    let mut arrivals = stats.arrivals.clone();
    arrivals.sort_by_key(|a| a.at);
    let after = arrivals
        .iter()
        .position(|a| a.violation)
        .map_or(0, |first| first + 1);
    let min_interval = t.sim.config().min_interval;
    for pair in arrivals[after..].windows(2) {
        assert!(
            pair[1].at - pair[0].at >= min_interval,
            "arrivals {:?} apart after the first penalty",
            pair[1].at - pair[0].at
        );
    }
    // The guard moved off the floor, and says why.
    let status = t.get("/status").await.json();
    let guard = status["guard_seconds"].as_f64().expect("guard_seconds");
    assert!(guard > 0.002 && guard <= 0.1, "{status}");
    assert_ne!(status["guard_reason"], "floor", "{status}");
    let text = t.metrics().await;
    assert_eq!(
        common::metric_value(&text, "score_proxy_pacing_guard_seconds"),
        guard
    );
    assert_eq!(
        common::metric_value(&text, "score_proxy_pacing_guard_max_seconds"),
        0.1
    );

    // The delays are hard for a 2 ms guard: many consecutive calls' delays differ by more
    // than that, each a penalty for starts 1/rate + 2 ms apart. (Since an answered call
    // bounds its own lateness, a gate fixed at 2 ms is spared most of them too, so the
    // seed's delays are the baseline here, not a second burst.)
    let hard = arrivals
        .windows(2)
        .filter(|w| w[0].delay > w[1].delay + Duration::from_millis(2))
        .count();
    assert!(hard >= 5, "only {hard} hard pairs in the seeded delays");
}

/// Spikes the guard cannot cover: one call in ten is delayed 30 ms on its way, against a
/// guard whose ceiling is 10 ms. An answered call bounds its own lateness (its round trip
/// less the quickest), so the start after a spiked call waits that much more, and no
/// arrival comes less than an interval after a spiked one.
///
/// Timing noise: the starts after a spike keep 1/rate plus the 5 ms floor from the spiked
/// arrival as its round trip shows it; loopback and the simulator's timer add a millisecond
/// or two to either side, well inside the floor.
#[tokio::test]
async fn a_spike_the_guard_cannot_cover_pushes_the_next_start_instead() {
    let setup = Setup::default()
        .arg("--rate-guard", "5ms")
        .arg("--rate-guard-max", "10ms")
        .arg("--queue-capacity", "40")
        .arg("--upstream-penalty", "300ms")
        .sim(|s| {
            s.arrival_delay = ArrivalDelay::Spikes {
                min: Duration::ZERO,
                max: Duration::from_millis(1),
                spike_ppm: 100_000,
                spike: Duration::from_millis(30),
            };
            s.seed = SEED;
        });
    let t = spawn(setup).await;
    let lookups: Vec<_> = (0..30).map(|i| t.spawn_lookup(&cpf(i), "000")).collect();
    for lookup in lookups {
        let r = lookup.await.expect("lookup task");
        assert_eq!(r.status, 200, "{}", r.body);
    }
    let stats = t.sim.stats();
    let mut arrivals = stats.arrivals.clone();
    arrivals.sort_by_key(|a| a.at);
    let spiked_then_another = arrivals
        .windows(2)
        .filter(|w| w[0].delay >= Duration::from_millis(30))
        .count();
    assert!(
        spiked_then_another >= 2,
        "the seed gives spikes followed by another call: {spiked_then_another}"
    );
    assert_eq!(stats.violations, 0, "{:#?}", stats.arrivals);
    let guard = t.get("/status").await.json()["guard_seconds"]
        .as_f64()
        .unwrap();
    assert!(guard <= 0.010, "the guard stays under its ceiling: {guard}");
}
