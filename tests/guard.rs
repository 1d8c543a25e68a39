//! The learned guard against a simulator across a "network": a seeded one-way delay, uniform
//! in 0..15 ms, before the simulator counts each arrival.
//!
//! A burst of distinct lookups is paced at 10 calls/s against the simulator's 100 ms rule.
//! With a guard fixed at 2 ms, two calls started 102 ms apart arrive closer than 100 ms
//! whenever the first one's delay exceeds the second one's by more than 2 ms, which the
//! seeded delays make happen many times in a burst of twenty. The learned guard starts at the
//! same 2 ms floor; it may be caught once before it has seen enough round trips (the penalty
//! raises it), and never after that.
//!
//! The delays are seeded, so which call is delayed by how much is the same on every run; real
//! time adds only scheduling noise, a millisecond or two, which moves the fixed guard's many
//! violations by a few at most and is far inside the learned guard's margin (the spread of
//! round trips, about 13 ms, on top of the floor).

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
async fn the_learned_guard_is_penalised_at_most_once_where_a_fixed_one_is_not_spared() {
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

    // The same burst with the guard fixed at the same 2 ms (floor = ceiling).
    let (fixed, stats) = burst(
        Setup::default()
            .arg("--rate-guard", "2ms")
            .arg("--rate-guard-max", "2ms"),
    )
    .await;
    assert!(
        stats.violations >= 2,
        "a fixed 2 ms guard was penalised {} times",
        stats.violations
    );
    let status = fixed.get("/status").await.json();
    assert_eq!(status["guard_reason"], "floor", "{status}");
}
