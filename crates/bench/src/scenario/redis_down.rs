//! Scenario 9: replicas, Redis down (issue 17). Three proxies in shared mode
//! (`--expected-replicas 3`) in front of the strict simulator of scenario 1 (1 call/s for
//! everyone, a 2 s penalty), with a `redis-server` started here that the scenario stops
//! (SIGKILL, as a crash) and starts again on the same port. While Redis is gone each replica
//! calls only at its own positions of one grid laid on Redis's last known clock (time
//! division, `src/shared/division.rs`); a replica without a place paces at `rate /
//! expected-replicas`, the fallback before issue 17, which case (d) measures as the baseline.
//!
//! Cases, each with fresh replicas (and a fresh Redis where there is one), the simulator
//! reset before the first lookup:
//! - (a) Redis stopped once every replica is in shared mode with a leased place, and every
//!   one has noticed; then a burst of distinct lookups spread over the three;
//! - (b) Redis stopped in the middle of a burst (after the first few calls arrived), and
//!   started again in the middle of the next burst;
//! - (c) replicas started while Redis is down, each with `--replica-index`; then the burst;
//! - (d) the same without `--replica-index` (no place): the baseline, without targets;
//! - (e) case (a) across scenario 8's 0..30 ms network (each arrival counted after a seeded
//!   delay): the grid's margin above the fleet's guard must hold against the spread too.
//!
//! Measured per case: answers by status (and how many were neither a score nor an honest
//! `429`/`503` with `Retry-After`), upstream calls (by replica, from the CPFs each was sent),
//! penalised calls, the closest two arrivals, the fleet's budget use while lookups wait
//! ((arrivals − 1) over their span, against the rate) and wall time; and the arrivals around
//! each penalty and around each switch of case (b), so a miss can be read. `--quick` runs
//! case (a) with a small burst and checks the answers only. The record of a case and what it
//! says are in `redis_down_record`.

use std::time::{Duration, Instant};

use anyhow::{Result, bail, ensure};
use tokio::task::JoinHandle;

use crate::client::{Sample, fire_spread, next_cpfs};
use crate::procs::{Redis, free_port};
use crate::report::table;
use crate::scenario::redis_down_record::{Burst, Measured, REPLICAS};
use crate::stats::{fmt_statuses, secs, show_errors, statuses};
use crate::suite::{Running, Suite, Telemetry};
use crate::{flush, now_s};

const MIN_INTERVAL_MS: u64 = 1000;
/// Room for every lookup of a burst: in shared mode the capacity counts the whole fleet's
/// booked slots, so 30 holds a burst of 30 (10 per replica) there; in fallback each replica
/// counts its own, and holds its 10 too. A lookup may wait a minute for its call to start.
const QUEUE: [&str; 4] = ["--queue-capacity", "30", "--queue-timeout", "60s"];
/// Case (b) stops and restarts Redis once this many calls of the burst have arrived.
const SWITCH_AFTER: u64 = 5;
/// How long a client waits for its answer: beyond the queue timeout and a call.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(120);
/// How long the replicas get to reach a state (shared with a place, fallback).
const STATE_TIMEOUT: Duration = Duration::from_secs(20);
/// The targets of issue 17.
const MAX_PENALISED: u64 = 1;
const MIN_USE: f64 = 0.90;
/// Case (e)'s network, as scenario 8's first (`score-sim`'s syntax) and its seed.
const NETWORK_DELAY: &str = "uniform:0ms..30ms";
const NETWORK_SEED: u64 = 1630;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Case {
    Stopped,
    Switches,
    Indexed,
    Baseline,
    Network,
}

impl Case {
    fn key(self) -> &'static str {
        match self {
            Case::Stopped => "a",
            Case::Switches => "b",
            Case::Indexed => "c",
            Case::Baseline => "d",
            Case::Network => "e",
        }
    }

    fn describe(self) -> &'static str {
        match self {
            Case::Stopped => "Redis stopped before the burst",
            Case::Switches => {
                "Redis stopped in the middle of a burst, restarted in the middle of the next"
            }
            Case::Indexed => "replicas started while Redis is down, --replica-index 0/1/2",
            Case::Baseline => {
                "baseline: replicas started while Redis is down, no place (rate / 3 each)"
            }
            Case::Network => "Redis stopped before the burst, arrivals delayed 0-30 ms",
        }
    }

    /// Whether the replicas start while Redis is down.
    fn born_without_redis(self) -> bool {
        matches!(self, Case::Indexed | Case::Baseline)
    }
}

pub(crate) async fn run(suite: &mut Suite) -> Result<()> {
    println!("== 9. three replicas, Redis down");
    let n = suite.plan.redis_down_burst;
    let quick = suite.plan.quick;
    let cases: &[Case] = if quick {
        &[Case::Stopped]
    } else {
        &[
            Case::Stopped,
            Case::Switches,
            Case::Indexed,
            Case::Baseline,
            Case::Network,
        ]
    };
    let mut rows = Vec::new();
    let mut notes = Vec::new();
    for &case in cases {
        print!("  ({}) {} ... ", case.key(), case.describe());
        flush();
        let m = run_case(suite, case, n).await?;
        let all: Vec<Sample> = m.samples().cloned().collect();
        let st = statuses(&all);
        let closest = m.closest();
        let use_all = m.budget_use(None);
        println!(
            "{} ({} not honest), {} calls, {} penalised, closest {}, budget use {:.1} %, {}",
            fmt_statuses(&st),
            m.not_honest(),
            m.stats.calls,
            m.stats.violations,
            closest.map_or("n/a".into(), |g| format!("{g:.4} s")),
            100.0 * use_all,
            secs(m.wall())
        );
        show_errors(&format!("({})", case.key()), &all);
        for line in m.around_penalties() {
            println!("    around a penalty: {line}");
        }
        for line in m.switch_gaps().into_iter().chain(m.sequences()) {
            println!("    {line}");
        }
        if quick {
            // The smoke test's one check, deterministic: scores or honest refusals.
            ensure!(
                m.not_honest() == 0,
                "({}) {}: answers {} include {} that are neither a score nor an honest \
                 refusal with Retry-After",
                case.key(),
                case.describe(),
                fmt_statuses(&st),
                m.not_honest()
            );
        } else if case != Case::Baseline {
            record_targets(suite, case, &m, n);
        }
        rows.push(row(case, &m, n));
        let penalties = m.around_penalties();
        if !penalties.is_empty() {
            notes.push(format!(
                "({}) arrivals around the first penalties: {}",
                case.key(),
                penalties.join("; ")
            ));
        }
        for line in m.switch_gaps().into_iter().chain(m.sequences()) {
            notes.push(format!("({}) {line}", case.key()));
        }
    }
    suite.report.section(
        "9. Three replicas, Redis down",
        body(n, quick, &rows, &notes),
    );
    Ok(())
}

fn record_targets(suite: &mut Suite, case: Case, m: &Measured, n: usize) {
    let what = format!("9{}, {} ({n} lookups", case.key(), case.describe());
    let what = if m.bursts.len() > 1 {
        format!("{what} x{})", m.bursts.len())
    } else {
        format!("{what})")
    };
    suite.report.target(
        format!("{what}: at most {MAX_PENALISED} penalised call"),
        format!(
            "{} penalised of {} calls, closest arrivals {}",
            m.stats.violations,
            m.stats.calls,
            m.closest().map_or("n/a".into(), |g| format!("{g:.3} s"))
        ),
        m.stats.violations <= MAX_PENALISED,
    );
    let all: Vec<Sample> = m.samples().cloned().collect();
    suite.report.target(
        format!("{what}: every lookup 200 or an honest 429/503 with Retry-After"),
        format!(
            "{}, {} not honest",
            fmt_statuses(&statuses(&all)),
            m.not_honest()
        ),
        m.not_honest() == 0,
    );
    let use_all = m.budget_use(None);
    suite.report.target(
        format!(
            "{what}: budget use at least {:.0} % while lookups wait",
            100.0 * MIN_USE
        ),
        format!("{:.1} %", 100.0 * use_all),
        use_all >= MIN_USE,
    );
}

fn row(case: Case, m: &Measured, n: usize) -> Vec<String> {
    let all: Vec<Sample> = m.samples().cloned().collect();
    let pct = |x: f64| {
        if x.is_nan() {
            "n/a".to_owned()
        } else {
            format!("{:.1} %", 100.0 * x)
        }
    };
    let (budget, wall) = if m.bursts.len() > 1 {
        let per: Vec<String> = (0..m.bursts.len())
            .map(|b| pct(m.budget_use(Some(b))))
            .collect();
        let walls: Vec<String> = m
            .bursts
            .iter()
            .map(|b| format!("{:.1}", b.wall()))
            .collect();
        (
            format!("{} (bursts: {})", pct(m.budget_use(None)), per.join(", ")),
            format!("{} ({} s)", secs(m.wall()), walls.join(" + ")),
        )
    } else {
        (pct(m.budget_use(None)), secs(m.wall()))
    };
    vec![
        format!("({}) {}", case.key(), case.describe()),
        if m.bursts.len() > 1 {
            format!("{} x{n}", m.bursts.len())
        } else {
            n.to_string()
        },
        m.before.clone(),
        fmt_statuses(&statuses(&all)),
        m.not_honest().to_string(),
        format!("{} ({})", m.stats.calls, m.calls_by_replica()),
        m.stats.violations.to_string(),
        m.closest().map_or("n/a".into(), |g| format!("{g:.4} s")),
        budget,
        wall,
    ]
}

/// Starts the three replicas in shared mode against `redis_url`, with their places given
/// (`--replica-index`) when `indexed`.
async fn start_fleet(suite: &Suite, redis_url: &str, indexed: bool) -> Result<Vec<Running>> {
    let mut fleet = Vec::new();
    for i in 0..REPLICAS {
        let index = i.to_string();
        let mut args = vec![
            "--redis-url",
            redis_url,
            "--redaction-key",
            "bench",
            "--expected-replicas",
            "3",
        ];
        args.extend(QUEUE);
        if indexed {
            args.extend(["--replica-index", index.as_str()]);
        }
        let label = format!("replica {}", i + 1);
        fleet.push(suite.start_proxy(&label, &args, Telemetry::Metrics).await?);
    }
    Ok(fleet)
}

/// Every replica's `/status`, once each says what `ok` wants (within [`STATE_TIMEOUT`]).
async fn wait_fleet(
    client: &reqwest::Client,
    fleet: &mut [Running],
    what: &str,
    ok: impl Fn(usize, &serde_json::Value) -> bool,
) -> Result<Vec<serde_json::Value>> {
    let until = Instant::now() + STATE_TIMEOUT;
    loop {
        let mut all = Vec::new();
        for r in fleet.iter_mut() {
            if let Some(status) = r.proc.exited() {
                bail!(
                    "{} exited ({status}); its log:\n{}",
                    r.label,
                    r.proc.log_tail()
                );
            }
            let status = client
                .get(format!("{}/status", r.base))
                .timeout(Duration::from_millis(500))
                .send()
                .await;
            let value = match status {
                Ok(resp) => {
                    let body = resp.bytes().await.unwrap_or_default();
                    serde_json::from_slice(&body).unwrap_or_default()
                }
                Err(_) => serde_json::Value::Null,
            };
            all.push(value);
        }
        if all.iter().enumerate().all(|(i, v)| ok(i, v)) {
            return Ok(all);
        }
        if Instant::now() > until {
            let seen: Vec<String> = all
                .iter()
                .map(|v| format!("{} place {}", v["pacing_mode"], v["replica_place"]))
                .collect();
            bail!(
                "the replicas are not {what} after {} s (/status: {})",
                STATE_TIMEOUT.as_secs(),
                seen.join("; ")
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn mode_is(v: &serde_json::Value, mode: &str) -> bool {
    v["pacing_mode"] == mode
}

/// What `/status` said of each replica before the first lookup: its place and mode.
fn describe_fleet(statuses: &[serde_json::Value]) -> String {
    statuses
        .iter()
        .map(|v| {
            let place = v["replica_place"]
                .as_u64()
                .map_or("none".into(), |p| p.to_string());
            format!("{place} ({})", v["pacing_mode"].as_str().unwrap_or("?"))
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// Sends `n` new distinct lookups spread over the fleet, in the background.
fn launch(fleet: &[Running], n: usize) -> JoinHandle<(f64, Vec<Sample>, u64)> {
    let bases: Vec<String> = fleet.iter().map(|r| r.base.clone()).collect();
    let cpfs = next_cpfs(n);
    tokio::spawn(async move { fire_spread(&bases, &cpfs, CLIENT_TIMEOUT).await })
}

async fn collect(handle: JoinHandle<(f64, Vec<Sample>, u64)>) -> Result<Burst> {
    let (launched, samples, _drops) = handle.await?;
    Ok(Burst { launched, samples })
}

/// Waits until the simulator has seen `calls` arrivals since its reset.
async fn wait_calls(suite: &Suite, calls: u64) -> Result<()> {
    let until = Instant::now() + Duration::from_secs(60);
    loop {
        let seen = suite.sim.calls().await?;
        if seen >= calls {
            return Ok(());
        }
        if Instant::now() > until {
            bail!("the simulator saw {seen} calls, not {calls}, within 60 s");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn run_case(suite: &mut Suite, case: Case, n: usize) -> Result<Measured> {
    if case == Case::Network {
        suite
            .sim
            .configure_network(0, MIN_INTERVAL_MS, NETWORK_DELAY, NETWORK_SEED)
            .await?;
    } else {
        suite.sim.configure(0, MIN_INTERVAL_MS).await?;
    }
    let client = suite.client.clone();
    let mut events = Vec::new();
    let mut bursts = Vec::new();
    let (before, mut fleet) = if case.born_without_redis() {
        // Nothing listens on this port: every replica starts in fallback.
        let nowhere = format!("redis://127.0.0.1:{}", free_port()?);
        let indexed = case == Case::Indexed;
        let mut fleet = start_fleet(suite, &nowhere, indexed).await?;
        let st = wait_fleet(&client, &mut fleet, "in fallback", |i, v| {
            mode_is(v, "fallback")
                && if indexed {
                    v["replica_place"].as_u64() == Some(i as u64)
                } else {
                    v["replica_place"].is_null()
                }
        })
        .await?;
        suite.sim.reset().await?;
        bursts.push(collect(launch(&fleet, n)).await?);
        (describe_fleet(&st), fleet)
    } else {
        let redis = Redis::start(&suite.ws).await?;
        let (port, url) = (redis.port, redis.url());
        let mut fleet = start_fleet(suite, &url, false).await?;
        let st = wait_fleet(
            &client,
            &mut fleet,
            "in shared mode with a place",
            |_, v| mode_is(v, "shared") && v["replica_place"].is_u64(),
        )
        .await?;
        let mut places: Vec<u64> = st
            .iter()
            .filter_map(|v| v["replica_place"].as_u64())
            .collect();
        places.sort_unstable();
        ensure!(
            places == [0, 1, 2],
            "the replicas leased places {places:?}, not 0, 1 and 2"
        );
        if matches!(case, Case::Stopped | Case::Network) {
            drop(redis);
            let st = wait_fleet(&client, &mut fleet, "in fallback", |_, v| {
                mode_is(v, "fallback")
            })
            .await?;
            suite.sim.reset().await?;
            bursts.push(collect(launch(&fleet, n)).await?);
            (describe_fleet(&st), fleet)
        } else {
            suite.sim.reset().await?;
            let first = launch(&fleet, n);
            wait_calls(suite, SWITCH_AFTER).await?;
            drop(redis);
            events.push(("stopped", now_s()));
            bursts.push(collect(first).await?);
            let second = launch(&fleet, n);
            let calls = suite.sim.calls().await?;
            wait_calls(suite, calls + SWITCH_AFTER).await?;
            let redis = Redis::start_on(&suite.ws, port).await?;
            events.push(("restarted", now_s()));
            bursts.push(collect(second).await?);
            // Recovery: every replica back on the shared schedule.
            wait_fleet(&client, &mut fleet, "back in shared mode", |_, v| {
                mode_is(v, "shared")
            })
            .await?;
            drop(redis);
            (describe_fleet(&st), fleet)
        }
    };
    // Every answer is in, so every call has arrived; let a last answer be recorded.
    tokio::time::sleep(Duration::from_millis(50)).await;
    let stats = suite.sim.stats().await?;
    for r in &mut fleet {
        if let Some(status) = r.proc.exited() {
            bail!(
                "{} exited ({status}); its log:\n{}",
                r.label,
                r.proc.log_tail()
            );
        }
    }
    drop(fleet);
    Ok(Measured::new(before, bursts, stats, events, &suite.sim))
}

fn body(n: usize, quick: bool, rows: &[Vec<String>], notes: &[String]) -> String {
    let notes = if notes.is_empty() {
        String::new()
    } else {
        format!(
            "\n{}\n",
            notes
                .iter()
                .map(|l| format!("- {l}"))
                .collect::<Vec<_>>()
                .join("\n")
        )
    };
    format!(
        "Three proxy processes in shared mode (`--redis-url redis://127.0.0.1:PORT \
         --redaction-key bench --expected-replicas 3 {}`, defaults otherwise: rate 1/s, guard \
         floor 10 ms and ceiling 100 ms, Redis timeout 100 ms; metrics on, access log off) in \
         front of the strict simulator of scenario 1 (1 call/s for everyone, 2 s penalty). \
         Redis is a `redis-server` started here; *stopped* means killed (SIGKILL, as a \
         crash), *restarted* a new one on the same port. Each case starts fresh replicas; \
         a burst is {n} distinct lookups sent at once, lookup i to replica i mod 3 (so {} \
         each). While Redis is gone a replica with a place calls only at its own positions of \
         one grid on Redis's last known clock, positions `1/rate` plus the fleet's guard as \
         Redis last reported it plus a 30 ms margin (10 ms steps, at most the ceiling) = \
         1.04 s apart, so the fleet's best is 1/1.04 = 96.2 % of the budget; case (e) is \
         case (a) with each arrival counted after a seeded 0-30 ms delay (scenario 8's \
         first network), to show the margin holds against a spread; a replica without a place \
         paces at `rate / 3` on its own clock (3.03 s between its calls), the fallback before \
         issue 17: case (d), the baseline, has no targets.{}\n\n\
         *Before* is each replica's place and mode (`/status` `replica_place`, \
         `pacing_mode`) just before the first lookup. *Not honest* counts answers that are \
         neither `200` nor a `429`/`503` with `Retry-After` (timeouts and transport errors \
         included). *Calls* is the upstream's arrivals, and by replica (r1 / r2 / r3, from \
         the CPFs each was sent). *Penalised* is what the simulator counted as too soon. \
         *Closest arrivals* is the smallest gap between two (under 1 s is a penalty). \
         *Budget use* is (arrivals − 1) over the span from the first to the last, against the \
         rate, penalised arrivals included; in case (b) over both bursts (back to back, so \
         lookups wait the whole time) and per burst. The loss costs a settle (a health check \
         plus the Redis timeout, about 0.7 s, before the first grid slot); on Redis's return \
         the replicas stay on their grid until a position before the fence (two health checks \
         plus a position after the first one back), so the return costs about one position. \
         A place's positions are its own: those of a replica with nothing waiting pass unused, \
         so the fleet reaches the grid's best only while every replica has lookups waiting (in \
         case (b), how evenly the shared schedule served the three before the loss decides \
         how even their queues are after it). *Wall* is from the first lookup sent to the last \
         answer. The notes list the arrivals around the first penalties (each with the gap \
         since the one before and the replica that made it) and, in case (b), around each \
         switch, and which replica made each call of each burst.\n\n{}{notes}",
        QUEUE.join(" "),
        n / REPLICAS,
        if quick {
            " This quick run has case (a) only and checks the answers, not the targets."
        } else {
            ""
        },
        table(
            &[
                "case",
                "lookups",
                "before (place, mode)",
                "answers",
                "not honest",
                "calls (r1 / r2 / r3)",
                "penalised",
                "closest arrivals",
                "budget use",
                "wall",
            ],
            rows
        ),
    )
}
