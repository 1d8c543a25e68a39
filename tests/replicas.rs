//! Three replicas, one upstream budget, through a real Redis (Debian's `redis-server`, started
//! here on a loopback port; `scripts/install-deps.sh` installs it). One simulator plays the
//! upstream and judges every arrival by its own clock, whichever replica sent it.
//!
//! Size: one harness (three replicas on one Redis) and every scenario that needs it, shared
//! schedule and time division without Redis alike; a second file would copy the harness.

mod common;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use common::redis::Redis;
use common::{Reply, cpf};
use score_proxy::app::App;
use score_proxy::http::server::Server;
use score_proxy::lookup::pacing::PacingMode;
use score_sim::{Simulator, SimulatorConfig, SimulatorHandle};
use tokio::sync::oneshot;

struct Replica {
    addr: std::net::SocketAddr,
    app: Arc<App>,
    _stop: oneshot::Sender<()>,
}

struct Fleet {
    replicas: Vec<Replica>,
    sim: SimulatorHandle,
    client: reqwest::Client,
}

const CAPACITY: usize = 6;

async fn fleet(redis_url: &str, sim: SimulatorConfig) -> Fleet {
    fleet_with(redis_url, sim, |_| Vec::new()).await
}

/// Three replicas, each with the flags `own(i)` returns on top of the shared ones.
async fn fleet_with(
    redis_url: &str,
    sim: SimulatorConfig,
    own: impl Fn(usize) -> Vec<String>,
) -> Fleet {
    common::init_test_log();
    let sim = Simulator::spawn(sim).await.unwrap();
    let mut replicas = Vec::new();
    for i in 0..3 {
        let config = common::config(
            &sim.url(),
            &[
                "--redis-url".into(),
                redis_url.into(),
                "--redaction-key".into(),
                "shared-test-secret".into(),
                "--queue-capacity".into(),
                CAPACITY.to_string(),
                "--expected-replicas".into(),
                "3".into(),
                "--redis-timeout".into(),
                "200ms".into(),
            ]
            .into_iter()
            .chain(own(i))
            .collect::<Vec<String>>(),
        );
        let server = Server::bind(config).await.unwrap();
        let addr = server.local_addr();
        let app = server.app();
        let (stop, stopped) = oneshot::channel::<()>();
        tokio::spawn(server.run(async {
            let _ = stopped.await;
        }));
        replicas.push(Replica {
            addr,
            app,
            _stop: stop,
        });
    }
    Fleet {
        replicas,
        sim,
        client: reqwest::Client::builder()
            .timeout(Duration::from_secs(60))
            .build()
            .unwrap(),
    }
}

impl Fleet {
    fn lookup(&self, replica: usize, cpf: &str) -> tokio::task::JoinHandle<Reply> {
        let url = format!(
            "http://{}/proxy/score?cpf={cpf}&client_id=000",
            self.replicas[replica % 3].addr
        );
        let client = self.client.clone();
        tokio::spawn(async move {
            let r = client.get(url).send().await.expect("answered, never hung");
            Reply {
                status: r.status().as_u16(),
                headers: r.headers().clone(),
                body: r.text().await.unwrap(),
            }
        })
    }

    async fn all_in(&self, mode: PacingMode) {
        for r in &self.replicas {
            let shared = r.app.shared.as_ref().expect("shared mode configured");
            let mut changes = shared.mode_changes();
            tokio::time::timeout(Duration::from_secs(20), changes.wait_for(|m| *m == mode))
                .await
                .unwrap_or_else(|_| panic!("replica never reached {mode:?}"))
                .unwrap();
        }
    }

    async fn ready(&self, replica: usize) -> serde_json::Value {
        serde_json::from_str(&self.text(replica, "/ready").await).unwrap()
    }

    /// One series summed over the fleet's metrics.
    fn metric_sum(&self, series: &str) -> f64 {
        self.replicas
            .iter()
            .map(|r| common::metric_value(&r.app.metrics.render(), series))
            .sum()
    }

    /// The body of `path` on one replica.
    async fn text(&self, replica: usize, path: &str) -> String {
        let url = format!("http://{}{path}", self.replicas[replica].addr);
        let r = self.client.get(url).send().await.unwrap();
        r.text().await.unwrap()
    }
}

fn sim_config() -> SimulatorConfig {
    SimulatorConfig {
        min_interval: common::SIM_INTERVAL,
        penalty: Duration::from_millis(300),
        ..SimulatorConfig::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_share_one_budget_one_cache_and_one_flight_per_key() {
    let redis = Redis::start();
    let f = fleet(&redis.url(), sim_config()).await;
    f.all_in(PacingMode::Shared).await;
    assert_eq!(f.ready(0).await["pacing"], "shared");

    // A burst of distinct lookups spread over the replicas, as many as the shared queue
    // holds: one call each, no two arrivals closer than the upstream allows.
    let keys: Vec<String> = (0..CAPACITY as u32).map(cpf).collect();
    let burst: Vec<_> = keys
        .iter()
        .enumerate()
        .map(|(i, k)| f.lookup(i, k))
        .collect();
    for b in burst {
        let r = b.await.unwrap();
        assert_eq!(r.status, 200, "{}", r.body);
    }
    let stats = f.sim.stats();
    assert_eq!(stats.violations, 0, "{stats:#?}");
    assert_eq!(
        stats.calls as usize,
        keys.len(),
        "one call per distinct key"
    );
    // And one booked start per call: a slot booked in Redis and never used would be lost
    // to the whole fleet. The one excuse is a slot the replica reached too late to use
    // safely (a starved CPU: it is counted, and booked again), never a slot left behind.
    let booked = f.metric_sum("score_proxy_redis_operations_total{op=\"book\",outcome=\"ok\"}");
    let late = f.metric_sum("score_proxy_pacing_unused_slots_total{reason=\"late\"}");
    assert_eq!(
        (booked - late) as usize,
        keys.len(),
        "one booking per call ({booked} booked, {late} reached too late)"
    );

    // Every key is a hit on every other replica, from the shared cache.
    for (i, k) in keys.iter().enumerate() {
        let r = f.lookup(i + 1, k).await.unwrap();
        assert_eq!(r.status, 200);
        assert_eq!(r.x_cache(), "HIT", "key {i} on another replica");
    }
    assert_eq!(
        f.sim.calls() as usize,
        keys.len(),
        "no new call for shared hits"
    );

    // The same new key asked on all three replicas at once, several times each, while the
    // upstream is slow: one upstream call in all.
    f.sim.set_latency(Duration::from_millis(600));
    let same = cpf(500);
    let twins: Vec<_> = (0..9).map(|i| f.lookup(i, &same)).collect();
    let mut kinds = Vec::new();
    for t in twins {
        let r = t.await.unwrap();
        assert_eq!(r.status, 200, "{}", r.body);
        kinds.push(r.x_cache().to_owned());
    }
    f.sim.set_latency(Duration::ZERO);
    assert_eq!(f.sim.calls() as usize, keys.len() + 1, "{kinds:?}");
    assert_eq!(
        kinds.iter().filter(|k| *k == "MISS").count(),
        1,
        "{kinds:?}"
    );
    let followers: f64 = {
        let mut total = 0.0;
        for r in &f.replicas {
            let m = r.app.metrics.render();
            total +=
                common::metric_value(&m, "score_proxy_shared_flights_total{role=\"follower\"}");
        }
        total
    };
    assert!(
        followers >= 1.0,
        "another replica waited on the leader's call"
    );

    // At capacity the fleet refuses like one process: 429 with Retry-After, at once.
    let many: Vec<_> = (1000..1000 + 3 * CAPACITY as u32)
        .map(|n| f.lookup(n as usize, &cpf(n)))
        .collect();
    let mut ok = 0;
    let mut full = 0;
    for m in many {
        let r = m.await.unwrap();
        match r.status {
            200 => ok += 1,
            429 => {
                full += 1;
                assert_eq!(r.json()["error"], "queue_full");
                assert!(r.retry_after().unwrap() >= 1);
            }
            other => panic!("{other}: {}", r.body),
        }
    }
    assert!(full >= CAPACITY, "ok {ok}, full {full}");
    assert!(ok >= CAPACITY, "ok {ok}, full {full}");
    let stats = f.sim.stats();
    assert_eq!(stats.violations, 0, "{stats:#?}");
    let distinct: HashSet<_> = stats.arrivals.iter().map(|a| a.cpf.clone()).collect();
    assert_eq!(
        distinct.len(),
        stats.arrivals.len(),
        "no key was fetched twice"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_redis_falls_back_to_a_share_of_the_rate_and_recovers() {
    let port = common::free_port();
    let redis = Redis::start_on(port);
    let f = fleet(&redis.url(), sim_config()).await;
    f.all_in(PacingMode::Shared).await;

    // Redis dies in the middle of a burst.
    let first: Vec<_> = (0..6).map(|i| f.lookup(i, &cpf(i as u32))).collect();
    f.sim.wait_for_calls(2).await;
    drop(redis);
    f.all_in(PacingMode::Fallback).await;
    let fell_back_at = f.sim.elapsed();
    for r in first {
        let r = r.await.unwrap();
        assert!(
            matches!(r.status, 200 | 429 | 503),
            "{}: {}",
            r.status,
            r.body
        );
    }
    assert_eq!(f.ready(1).await["pacing"], "fallback");

    // Nothing hangs, and together the replicas stay within the rate: each paces at a third.
    let during: Vec<_> = (100..112).map(|i| f.lookup(i, &cpf(i as u32))).collect();
    for r in during {
        let r = tokio::time::timeout(Duration::from_secs(45), r)
            .await
            .expect("answered in bounded time")
            .unwrap();
        assert!(
            matches!(r.status, 200 | 429 | 503),
            "{}: {}",
            r.status,
            r.body
        );
    }
    let stats = f.sim.stats();
    let fallback_calls: Vec<_> = stats
        .arrivals
        .iter()
        .filter(|a| a.at >= fell_back_at)
        .collect();
    if let (Some(first), Some(last)) = (fallback_calls.first(), fallback_calls.last()) {
        let window = (last.at - first.at).as_secs_f64();
        // At most one call per interval (140 ms) for the fleet, plus one per replica for the
        // phase at which each started.
        let allowed = window / 0.14 + 3.0;
        assert!(
            fallback_calls.len() as f64 <= allowed,
            "{} calls in {window:.2}s",
            fallback_calls.len()
        );
    }

    // Redis comes back: every replica returns to the shared schedule.
    let redis = Redis::start_on(port);
    f.all_in(PacingMode::Shared).await;
    assert_eq!(f.ready(2).await["pacing"], "shared");
    let recovered_at = f.sim.elapsed();
    let after: Vec<_> = (200..206).map(|i| f.lookup(i, &cpf(i as u32))).collect();
    for r in after {
        assert_eq!(r.await.unwrap().status, 200);
    }
    let stats = f.sim.stats();
    let after: Vec<_> = stats
        .arrivals
        .iter()
        .filter(|a| a.at >= recovered_at)
        .collect();
    assert_eq!(after.len(), 6);
    assert!(
        after.iter().all(|a| !a.violation),
        "shared pacing holds again: {after:#?}"
    );
    for pair in after.windows(2) {
        assert!(pair[1].at - pair[0].at >= common::SIM_INTERVAL);
    }
    let fallbacks: f64 = f.metric_sum("score_proxy_shared_fallbacks_total");
    assert!(fallbacks >= 3.0, "each replica counted its fallback");
    drop(redis);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_penalty_seen_by_one_replica_stops_the_calls_the_others_had_booked() {
    let redis = Redis::start();
    // The upstream starts stricter than the fleet's pace (400 ms against 140 ms), so the
    // second call of a burst is penalised; its penalty lasts a second.
    let f = fleet(
        &redis.url(),
        SimulatorConfig {
            min_interval: Duration::from_millis(400),
            penalty: Duration::from_secs(1),
            ..SimulatorConfig::default()
        },
    )
    .await;
    f.all_in(PacingMode::Shared).await;

    // Six lookups over the three replicas: each replica books its slots (140 ms apart,
    // fleet-wide) at once, before any call is made.
    let burst: Vec<_> = (0..CAPACITY as u32)
        .map(|i| f.lookup(i as usize, &cpf(3000 + i)))
        .collect();
    f.sim.wait_for_calls(2).await;
    // From now on the upstream asks only what the fleet paces for.
    f.sim.set_min_interval(common::SIM_INTERVAL);
    for b in burst {
        let r = b.await.unwrap();
        assert_eq!(r.status, 200, "retried after the penalty: {}", r.body);
    }

    // Only the provoked call was penalised: the slots the other replicas held inside the
    // penalty were given up, not sent into it (each would have been a violation).
    let stats = f.sim.stats();
    assert_eq!(stats.violations, 1, "{stats:#?}");
    assert_eq!(stats.by_status.get(&429), Some(&1), "{stats:#?}");
    let penalised = stats.arrivals.iter().find(|a| a.violation).unwrap().at;
    assert!(
        stats
            .arrivals
            .iter()
            .filter(|a| a.at > penalised)
            .all(|a| a.at >= penalised + Duration::from_secs(1)),
        "no arrival inside the penalty: {stats:#?}"
    );
    let given_up: f64 = f.metric_sum("score_proxy_pacing_unused_slots_total{reason=\"penalty\"}");
    assert!(given_up >= 1.0, "slots inside the penalty were given up");
    drop(redis);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_that_left_late_holds_the_other_replicas_off() {
    let redis = Redis::start();
    let f = fleet(&redis.url(), sim_config()).await;
    f.all_in(PacingMode::Shared).await;

    // A burst over the three replicas; right after the first call arrives (the next slot is
    // 140 ms away), replica 0 announces that a call of its left late and holds every start
    // off for 600 ms, as it does when a call had to open a connection first.
    let burst: Vec<_> = (0..CAPACITY as u32)
        .map(|i| f.lookup(i as usize, &cpf(4000 + i)))
        .collect();
    f.sim.wait_for_calls(1).await;
    let held_from = f.sim.elapsed();
    let hold = Duration::from_millis(600);
    f.replicas[0]
        .app
        .pacer
        .hold(tokio::time::Instant::now() + hold)
        .await;
    for b in burst {
        let r = b.await.unwrap();
        assert_eq!(r.status, 200, "{}", r.body);
    }

    // Nothing arrived during the hold: the slots inside it were given up and booked again.
    let stats = f.sim.stats();
    assert_eq!(stats.violations, 0, "{stats:#?}");
    assert_eq!(stats.calls as usize, CAPACITY, "{stats:#?}");
    assert!(
        stats
            .arrivals
            .iter()
            .all(|a| a.at <= held_from || a.at >= held_from + hold),
        "an arrival inside the hold: {stats:#?}"
    );
    let held: f64 = f.metric_sum("score_proxy_pacing_unused_slots_total{reason=\"held\"}");
    assert!(
        held >= 1.0,
        "the other replicas gave up their slots inside the hold"
    );
    drop(redis);
}

/// The fleet shares one upstream, so it shares one guard: the largest any replica learned.
/// Replica 0 runs with a 60 ms guard (standing in for one that learned it from a penalty or
/// from the spread of its round trips), the two others with 2 ms. Once replica 0 has booked,
/// the others' calls are spaced by 60 ms too, and say why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guard_learned_by_one_replica_spaces_the_whole_fleet() {
    let redis = Redis::start();
    let guard = |i: usize| if i == 0 { "60ms" } else { "2ms" };
    let f = fleet_with(&redis.url(), sim_config(), |i| {
        vec!["--rate-guard".into(), guard(i).into()]
    })
    .await;
    f.all_in(PacingMode::Shared).await;

    let first = f.lookup(0, &cpf(0)).await.unwrap();
    assert_eq!(first.status, 200, "{}", first.body);
    // Then a burst on the two replicas with the small guard only.
    let burst: Vec<_> = (1..=6u32)
        .map(|n| f.lookup(1 + n as usize % 2, &cpf(n)))
        .collect();
    for b in burst {
        let r = b.await.unwrap();
        assert_eq!(r.status, 200, "{}", r.body);
    }
    let stats = f.sim.stats();
    assert_eq!(stats.violations, 0, "{stats:#?}");
    let mut ats: Vec<Duration> = stats.arrivals.iter().map(|a| a.at).collect();
    ats.sort();
    // Slots 100 ms + 60 ms apart on Redis's clock; a start may be up to half the guard
    // (30 ms) behind its slot, and loopback adds a millisecond or two. With their own 2 ms
    // guard the two replicas would space their calls about 102 ms apart.
    let closest = ats.windows(2).map(|w| w[1] - w[0]).min().unwrap();
    assert!(
        closest >= Duration::from_millis(120),
        "closest arrivals {closest:?} apart: {ats:?}"
    );
    for r in &f.replicas[1..] {
        let m = r.app.metrics.render();
        assert_eq!(
            common::metric_value(&m, "score_proxy_pacing_guard_seconds"),
            0.060
        );
        assert_eq!(
            common::metric_value(&m, "score_proxy_pacing_guard_reason{reason=\"fleet\"}"),
            1.0
        );
    }
}

/// Time division needs grid positions well above the simulator's interval but not so far
/// that the test measures nothing: the guard fixed at 40 ms (floor and ceiling), so
/// positions are 140 ms apart and each replica's own slots 420 ms apart; a queue of 12 per
/// replica holds the 10 lookups each gets.
fn divided(i: usize, index: bool) -> Vec<String> {
    let mut args: Vec<String> = ["--rate-guard-max", "40ms", "--queue-capacity", "12"]
        .map(String::from)
        .to_vec();
    if index {
        args.extend(["--replica-index".into(), i.to_string()]);
    }
    args
}

const PERIOD: Duration = Duration::from_millis(140);

/// Sends `n` distinct lookups (from `first`) spread over the replicas, and checks every
/// answer is a score or an honest refusal.
async fn spread_burst(f: &Fleet, first: u32, n: u32) -> usize {
    let lookups: Vec<_> = (first..first + n)
        .map(|k| f.lookup(k as usize, &cpf(k)))
        .collect();
    let mut ok = 0;
    for r in lookups {
        let r = r.await.unwrap();
        match r.status {
            200 => ok += 1,
            429 | 503 => assert!(r.retry_after().is_some(), "{}", r.body),
            other => panic!("{other}: {}", r.body),
        }
    }
    ok
}

/// The fleet's arrivals since `since` (simulator time): how many were penalised, the closest
/// two, and the fleet's rate over them against the grid's (one call per period).
fn judged(f: &Fleet, since: Duration) -> (u64, Duration, f64) {
    let stats = f.sim.stats();
    let ats: Vec<_> = stats.arrivals.iter().filter(|a| a.at >= since).collect();
    let penalised = ats.iter().filter(|a| a.violation).count() as u64;
    let closest = ats
        .windows(2)
        .map(|w| w[1].at - w[0].at)
        .min()
        .unwrap_or(Duration::MAX);
    let use_of_grid = match (ats.first(), ats.last()) {
        (Some(a), Some(b)) if ats.len() > 1 => {
            (ats.len() - 1) as f64 / (b.at - a.at).as_secs_f64() * PERIOD.as_secs_f64()
        }
        _ => 0.0,
    };
    (penalised, closest, use_of_grid)
}

/// A burst of 30 distinct lookups over the three replicas while Redis is gone: all
/// answered, none penalised, and the grid used.
async fn takes_turns_on_the_grid(f: &Fleet) {
    let since = f.sim.elapsed();
    assert_eq!(spread_burst(f, 0, 30).await, 30);
    let (penalised, closest, use_of_grid) = judged(f, since);
    assert_eq!(penalised, 0);
    // Positions 140 ms apart, a start up to the late tolerance (20 ms) behind its slot,
    // a millisecond or two of loopback: never under the upstream's 100 ms.
    assert!(closest >= common::SIM_INTERVAL, "closest {closest:?}");
    assert!(
        use_of_grid >= 0.9,
        "the fleet used {use_of_grid:.2} of the grid"
    );
}

/// Redis is gone before a burst of 30 distinct lookups over three replicas: each keeps the
/// place it leased and calls only at its own positions of one grid on Redis's last known
/// clock, so the fleet's calls stay a period apart without talking and the upstream never
/// penalises them. Then Redis comes back in the middle of a second burst, and goes again in
/// the middle of a third: no switch runs two schedules at once.
///
/// Timing noise: the replicas share this host's clock and sample Redis's over loopback (a
/// round trip well under a millisecond), so the grid's error is the timer's, and a start may
/// be up to the late tolerance (20 ms) behind its slot: 22 ms at worst against the 40 ms
/// between the grid's period and the upstream's interval.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_redis_the_replicas_take_turns_on_one_grid() {
    let port = common::free_port();
    let redis = Redis::start_on(port);
    let f = fleet_with(&redis.url(), sim_config(), |i| divided(i, false)).await;
    f.all_in(PacingMode::Shared).await;
    drop(redis);
    f.all_in(PacingMode::Fallback).await;
    // Each kept the place it leased: three distinct places of three, as /status says too.
    let mut places = Vec::new();
    for i in 0..f.replicas.len() {
        let status: serde_json::Value = serde_json::from_str(&f.text(i, "/status").await).unwrap();
        assert!(status["fallback_seconds"].as_f64().is_some(), "{status}");
        let place = status["replica_place"].as_u64().expect("a place");
        // The gauges are set at scrape time: scrape.
        let m = f.text(i, "/metrics?format=prometheus").await;
        assert_eq!(
            common::metric_value(&m, "score_proxy_shared_place"),
            place as f64,
            "replica {i}"
        );
        assert_eq!(common::metric_value(&m, "score_proxy_shared_places"), 3.0);
        places.push(place);
    }
    places.sort();
    assert_eq!(places, [0, 1, 2]);

    takes_turns_on_the_grid(&f).await;

    // Redis returns while a burst waits: the replicas leave their grids behind a fence.
    let since = f.sim.elapsed();
    let burst = {
        let lookups: Vec<_> = (100..130u32)
            .map(|k| f.lookup(k as usize, &cpf(k)))
            .collect();
        f.sim.wait_for_calls(f.sim.calls() + 5).await;
        let redis = Redis::start_on(port);
        f.all_in(PacingMode::Shared).await;
        (lookups, redis)
    };
    let (lookups, redis) = burst;
    for r in lookups {
        let r = r.await.unwrap();
        assert!(matches!(r.status, 200 | 429 | 503), "{}", r.body);
    }
    // And it goes again in the middle of the next one.
    let next: Vec<_> = (200..230u32)
        .map(|k| f.lookup(k as usize, &cpf(k)))
        .collect();
    f.sim.wait_for_calls(f.sim.calls() + 5).await;
    drop(redis);
    for r in next {
        let r = r.await.unwrap();
        assert!(matches!(r.status, 200 | 429 | 503), "{}", r.body);
    }
    let (penalised, closest, _) = judged(&f, since);
    assert!(penalised <= 1, "{penalised} penalised");
    assert!(
        closest >= common::SIM_INTERVAL,
        "closest arrivals {closest:?} apart"
    );
}

/// Without Redis a penalty is not shared: a replica that meets a `429` widens its own places
/// to one position in two rather than call into the upstream's spacing again. Here the
/// upstream's interval (200 ms) grows past the grid's period (140 ms), so calls a position
/// apart are penalised; every replica that met one now calls a cycle of six positions apart
/// (its `interval_seconds` doubles, as admission and `Retry-After` use it), one that did not
/// keeps its cycle of three, and with the upstream back to its interval the next burst meets
/// no penalty.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_penalised_without_redis_widens_its_own_places() {
    let redis = Redis::start();
    let f = fleet_with(&redis.url(), sim_config(), |i| divided(i, false)).await;
    f.all_in(PacingMode::Shared).await;
    drop(redis);
    f.all_in(PacingMode::Fallback).await;
    let interval = |status: &serde_json::Value| status["interval_seconds"].as_f64().unwrap();
    let cycle = PERIOD.as_secs_f64() * 3.0;
    for i in 0..3 {
        let status: serde_json::Value = serde_json::from_str(&f.text(i, "/status").await).unwrap();
        assert!((interval(&status) - cycle).abs() < 1e-6, "{status}");
    }

    f.sim.set_min_interval(Duration::from_millis(200));
    spread_burst(&f, 0, 9).await;
    let mut widened = 0;
    for i in 0..3 {
        let status: serde_json::Value = serde_json::from_str(&f.text(i, "/status").await).unwrap();
        let m = f.text(i, "/metrics?format=prometheus").await;
        let penalties = common::metric_value(&m, "score_proxy_pacing_penalties_total");
        let expected = if penalties > 0.0 {
            widened += 1;
            cycle * 2.0
        } else {
            cycle
        };
        assert!(
            (interval(&status) - expected).abs() < 1e-6,
            "replica {i}, {penalties} penalties: {status}"
        );
    }
    assert!(widened >= 1, "no replica met a penalty");

    f.sim.set_min_interval(common::SIM_INTERVAL);
    let since = f.sim.elapsed();
    assert_eq!(spread_burst(&f, 100, 12).await, 12);
    let (penalised, closest, _) = judged(&f, since);
    assert_eq!(penalised, 0);
    assert!(closest >= common::SIM_INTERVAL, "closest {closest:?}");
}

/// Replicas that start while Redis is down have no leased place: with `--replica-index`
/// they take turns on the grid from the start (on their system clocks, which agree here).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_started_without_redis_take_turns_by_their_index() {
    let nowhere = format!("redis://127.0.0.1:{}", common::free_port());
    let f = fleet_with(&nowhere, sim_config(), |i| divided(i, true)).await;
    assert_eq!(f.ready(0).await["pacing"], "fallback");
    takes_turns_on_the_grid(&f).await;
}
