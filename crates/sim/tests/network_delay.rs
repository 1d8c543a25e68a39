//! The simulator's network delay: a one-way delay, drawn from a seeded generator, before
//! the rate rule counts a call's arrival.
//!
//! The delays are seeded, so which delay each call gets is fixed; what real time adds is
//! only the scheduler's noise on top, and every margin here is wide enough (tens to
//! hundreds of milliseconds) that a loaded machine only widens it, as in `simulator.rs`.

use std::time::{Duration, Instant};

use score_sim::{ArrivalDelay, SimStats, Simulator, SimulatorConfig, SimulatorHandle};

const VALID: &str = "01658739060";
const OTHER_VALID: &str = "89336333089";

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// No rate rule, so calls need no spacing; only the delay is under test.
fn delayed(delay: ArrivalDelay, seed: u64) -> SimulatorConfig {
    SimulatorConfig {
        min_interval: Duration::ZERO,
        arrival_delay: delay,
        seed,
        ..Default::default()
    }
}

async fn start(config: SimulatorConfig) -> SimulatorHandle {
    Simulator::spawn(config).await.expect("simulator starts")
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(10))
        .build()
        .expect("client builds")
}

/// One score call; returns its status.
async fn score(http: &reqwest::Client, sim: &SimulatorHandle, cpf: &str) -> u16 {
    http.get(format!("{}?cpf={cpf}", sim.url()))
        .header("client-id", "client-a")
        .send()
        .await
        .expect("request is answered")
        .status()
        .as_u16()
}

/// The delays the simulator drew for `n` calls made one after the other.
async fn delays_of_calls(sim: &SimulatorHandle, n: usize) -> Vec<Duration> {
    let http = client();
    for _ in 0..n {
        assert_eq!(score(&http, sim, VALID).await, 200);
    }
    sim.stats().arrivals.iter().map(|a| a.delay).collect()
}

#[tokio::test]
async fn delays_are_applied_and_bounded() {
    let uniform = ArrivalDelay::Uniform {
        min: ms(20),
        max: ms(40),
    };
    let sim = start(delayed(uniform, 7)).await;
    let http = client();
    for _ in 0..8 {
        let sent = Instant::now();
        assert_eq!(score(&http, &sim, VALID).await, 200);
        // The answer cannot come back before the call has arrived.
        assert!(sent.elapsed() >= ms(20), "answered in {:?}", sent.elapsed());
    }
    let delays: Vec<Duration> = sim.stats().arrivals.iter().map(|a| a.delay).collect();
    assert_eq!(delays.len(), 8);
    assert!(
        delays.iter().all(|d| (ms(20)..=ms(40)).contains(d)),
        "{delays:?}"
    );
    assert!(
        delays.windows(2).any(|w| w[0] != w[1]),
        "drawn, not fixed: {delays:?}"
    );

    // Spikes: every delay is either in the small range or the spike itself.
    sim.reset();
    sim.set_arrival_delay("spikes:0ms..2ms,50%,60ms".parse().expect("valid delay"));
    let delays = delays_of_calls(&sim, 10).await;
    assert!(
        delays.iter().all(|d| *d <= ms(2) || *d == ms(60)),
        "{delays:?}"
    );
    assert!(delays.contains(&ms(60)), "half the calls spike: {delays:?}");

    // Without a delay configured, nothing is drawn.
    sim.reset();
    sim.set_arrival_delay(ArrivalDelay::None);
    assert!(delays_of_calls(&sim, 2).await.iter().all(|d| d.is_zero()));
}

#[tokio::test]
async fn the_same_seed_gives_the_same_delays() {
    let uniform = ArrivalDelay::Uniform {
        min: ms(0),
        max: ms(10),
    };
    let first = start(delayed(uniform, 42)).await;
    let second = start(delayed(uniform, 42)).await;
    let other = start(delayed(uniform, 43)).await;
    let expected = delays_of_calls(&first, 6).await;
    assert_eq!(delays_of_calls(&second, 6).await, expected);
    assert_ne!(delays_of_calls(&other, 6).await, expected);

    // A reset replays the sequence from the seed; so does a seed sent to /__sim/config,
    // even the seed in force.
    first.reset();
    assert_eq!(delays_of_calls(&first, 6).await, expected);
    let http = client();
    let put = http
        .put(format!("{}/__sim/config", other.base_url()))
        .body(r#"{"seed": 42, "arrival_delay": "uniform:0ms..10ms"}"#)
        .send()
        .await
        .expect("config is answered");
    assert_eq!(put.status(), 200);
    let view: serde_json::Value = put.json().await.expect("config is JSON");
    assert_eq!(view["arrival_delay"], "uniform:0s..10ms");
    assert_eq!(view["seed"], 42);
    other.reset();
    assert_eq!(delays_of_calls(&other, 6).await, expected);

    let refused = http
        .put(format!("{}/__sim/config", other.base_url()))
        .body(r#"{"arrival_delay": "uniform:10ms..0ms"}"#)
        .send()
        .await
        .expect("config is answered");
    assert_eq!(refused.status(), 400);
    assert_eq!(other.config().arrival_delay, uniform);
}

/// Two calls sent well over the interval apart, whose delays bring them within it, break
/// the rate rule; two sent back to back, whose delays set them apart, do not. Either way
/// the record shows the arrivals as the rule saw them.
#[tokio::test]
async fn a_delayed_arrival_is_what_the_rate_rule_judges() {
    let interval = ms(300);
    let sim = start(SimulatorConfig {
        min_interval: interval,
        penalty: ms(600),
        arrival_delay: "uniform:700ms..700ms".parse().expect("valid delay"),
        ..Default::default()
    })
    .await;
    let http = client();

    // A leaves first and is held 700 ms on the way; B leaves 450 ms later (more than the
    // interval after A) and arrives at once, so 250 ms before A: A is too soon.
    let sent_a = Instant::now();
    let a = tokio::spawn({
        let http = http.clone();
        let url = format!("{}?cpf={VALID}", sim.url());
        async move {
            let response = http.get(url).header("client-id", "client-a").send().await;
            response.expect("A is answered").status().as_u16()
        }
    });
    sim.wait_for_in_flight(1).await;
    sim.set_arrival_delay(ArrivalDelay::None);
    tokio::time::sleep_until((sent_a + ms(450)).into()).await;
    assert!(sent_a.elapsed() >= interval);
    assert_eq!(score(&http, &sim, OTHER_VALID).await, 200);
    assert_eq!(a.await.expect("A's task"), 429);

    let SimStats { arrivals, .. } = sim.stats();
    let (b, a) = (&arrivals[0], &arrivals[1]);
    assert_eq!((b.cpf.as_str(), b.violation), (OTHER_VALID, false));
    assert_eq!((a.cpf.as_str(), a.violation), (VALID, true));
    assert_eq!((a.delay, b.delay), (ms(700), Duration::ZERO));
    assert!(a.at - b.at < interval, "judged {:?} apart", a.at - b.at);

    // Back to back, but the second is held 2 intervals: both are fine.
    sim.reset();
    assert_eq!(score(&http, &sim, VALID).await, 200);
    sim.set_arrival_delay("uniform:600ms..600ms".parse().expect("valid delay"));
    assert_eq!(score(&http, &sim, OTHER_VALID).await, 200);
    let stats = sim.stats();
    assert_eq!(stats.violations, 0);
    let gap = stats.arrivals[1].at - stats.arrivals[0].at;
    assert!(gap >= ms(600), "judged {gap:?} apart");
    assert!(stats.min_gap_seconds.expect("two arrivals") >= 0.6);
}
