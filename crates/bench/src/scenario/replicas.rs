//! Scenario 7: three proxies sharing one budget through a `redis-server` started here,
//! against one process with the same flags: bursts spread over the fleet (violations,
//! pace, wall time), Redis's round trips, and one key asked on every replica at once
//! (cross-replica coalescing).

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Result, bail, ensure};
use score_test_support::prom::Scrape;

use crate::client::{Sample, fire_spread, next_cpfs};
use crate::flush;
use crate::procs::{Redis, redis_ping_rtts};
use crate::report::table;
use crate::scenario::replica_burst::{replica_burst, wait_shared};
use crate::scrape::{bucket_quantile, scrape};
use crate::stats::{fmt_statuses, ms, percentile, ratio, secs, show_errors, statuses};
use crate::suite::{Running, Suite, Telemetry};

/// The pacing guard of every proxy in the replicas scenario: the proxy's default, as in
/// scenario 1 (the real contract, 1 call/s), two orders of magnitude above Redis's loopback
/// round trip (measured and reported by the scenario).
const REPLICA_GUARD: &str = "10ms";

pub(crate) async fn run(suite: &mut Suite) -> Result<()> {
    println!("== 7. three replicas, one budget");
    let redis = Redis::start(&suite.ws).await?;
    let rtts = redis_ping_rtts(redis.port, 200).await?;
    let (rtt_p50, rtt_p99) = (percentile(&rtts, 50.0), percentile(&rtts, 99.0));
    println!(
        "  redis-server on port {}: PING round trip p50 {} p99 {}",
        redis.port,
        ms(rtt_p50),
        ms(rtt_p99)
    );
    let rate = 1.0;
    let guard = humantime::parse_duration(REPLICA_GUARD)?.as_secs_f64();
    let (rate_s, redis_url) = (format!("{rate}"), redis.url());
    let paced = ["--rate", rate_s.as_str(), "--rate-guard", REPLICA_GUARD];
    let mut shared = paced.to_vec();
    shared.extend([
        "--redis-url",
        redis_url.as_str(),
        "--redaction-key",
        "bench",
        "--expected-replicas",
        "3",
    ]);
    let mut fleet = Vec::new();
    for i in 0..3 {
        let label = ["replica 1", "replica 2", "replica 3"][i];
        let mut r = suite
            .start_proxy(label, &shared, Telemetry::Metrics)
            .await?;
        wait_shared(&suite.client, &mut r).await?;
        fleet.push(r);
    }

    let mut rows = Vec::new();
    let mut versus = Vec::new();
    for (n, latency_ms) in suite.plan.replica_bursts.clone() {
        let what = format!("burst N={n}, upstream {latency_ms} ms");
        print!("  3 replicas {what} ... ");
        flush();
        let refs: Vec<&Running> = fleet.iter().collect();
        let three = replica_burst(suite, &refs, n, latency_ms, rate, guard).await?;
        println!(
            "{} in {}, {} calls, {} violations, pace {:.3}/s, unused slots {}",
            fmt_statuses(&three.statuses),
            secs(three.wall_ok),
            three.calls,
            three.violations,
            three.pace,
            three.unused_text()
        );
        print!("  1 process {what} ... ");
        flush();
        let single = suite
            .start_proxy("one process", &paced, Telemetry::Metrics)
            .await?;
        let one = replica_burst(suite, &[&single], n, latency_ms, rate, guard).await?;
        drop(single);
        println!(
            "{} in {}, {} calls, {} violations, pace {:.3}/s, unused slots {}",
            fmt_statuses(&one.statuses),
            secs(one.wall_ok),
            one.calls,
            one.violations,
            one.pace,
            one.unused_text()
        );
        for (label, r) in [("3 replicas", &three), ("1 process", &one)] {
            show_errors(label, &r.samples);
            // Deterministic: a score or an honest refusal, never anything else.
            ensure!(
                r.samples
                    .iter()
                    .all(|s| matches!(s.status(), Some(200) | Some(429) | Some(503))),
                "{label} {what}: unexpected answers {}",
                fmt_statuses(&r.statuses)
            );
        }
        suite.report.target(
            format!(
                "3 replicas, {what}: 0 violations, one upstream call per key served, only 200 \
                 or 429 with Retry-After"
            ),
            format!(
                "{} violations, {} calls for {} distinct keys called and {} served, {}",
                three.violations,
                three.calls,
                three.distinct_called,
                three.served,
                fmt_statuses(&three.statuses)
            ),
            three.clean(),
        );
        suite.report.target(
            format!(
                "3 replicas, {what}: {} served within (S-1)(1/rate+guard)+latency+50ms",
                three.served
            ),
            format!("{} (bound {})", secs(three.wall_ok), secs(three.bound)),
            three.wall_ok <= three.bound,
        );
        if latency_ms >= 500 {
            suite.report.target(
                format!("3 replicas, {what}: upstream pace at least 0.98 x rate"),
                format!("{:.3} calls/s", three.pace),
                three.pace >= 0.98 * rate,
            );
        }
        for (label, r, count) in [("3 replicas", &three, 3), ("1 process", &one, 1)] {
            rows.push(vec![
                label.to_owned(),
                n.to_string(),
                format!("{latency_ms} ms"),
                fmt_statuses(&r.statuses),
                if count > 1 {
                    r.per_proxy(count)
                } else {
                    "".into()
                },
                secs(r.wall_ok),
                secs(r.ideal),
                ratio(r.wall_ok, r.ideal),
                format!("{} / {}", r.calls, r.distinct_called),
                r.violations.to_string(),
                r.min_gap.map_or("n/a".into(), |g| format!("{g:.4} s")),
                format!("{:.3}/s", r.pace),
                format!("{:.1}%", 100.0 * r.pace / rate),
                r.drops.to_string(),
                r.unused_text(),
            ]);
        }
        versus.push(vec![
            n.to_string(),
            format!("{latency_ms} ms"),
            format!("{:.1}%", 100.0 * three.pace / rate),
            format!("{:.1}%", 100.0 * one.pace / rate),
            format!("**{}**", ratio(three.pace, one.pace)),
            ratio(three.wall_ok, one.wall_ok),
        ]);
    }

    // Cross-replica coalescing: one new key asked on every replica at once, behind a slow
    // upstream so that every lookup arrives while the first call is out.
    let k = suite.plan.coalesce_per_replica;
    let coalesce_latency_ms = 500;
    suite.sim.configure(coalesce_latency_ms, 1000).await?;
    suite.sim.reset().await?;
    let bases: Vec<String> = fleet.iter().map(|r| r.base.clone()).collect();
    let flights =
        |m: &Scrape, role: &str| m.sum("score_proxy_shared_flights_total", &[("role", role)]);
    let mut before = Vec::new();
    for b in &bases {
        let m = scrape(&suite.client, b).await?;
        before.push((flights(&m, "leader"), flights(&m, "follower")));
    }
    let cpfs = vec![next_cpfs(1).remove(0); 3 * k];
    print!("  one key on 3 replicas x{} ... ", 3 * k);
    flush();
    let (launched, samples, drops) = fire_spread(&bases, &cpfs, Duration::from_secs(30)).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    let stats = suite.sim.stats().await?;
    let (mut leaders, mut followers) = (0.0, 0.0);
    let mut book_sum = 0.0;
    let mut book_count = 0.0;
    let mut fallbacks = 0.0;
    let mut modes = Vec::new();
    let mut scrapes = Vec::new();
    for (b, (l0, f0)) in bases.iter().zip(before) {
        let m = scrape(&suite.client, b).await?;
        leaders += flights(&m, "leader") - l0;
        followers += flights(&m, "follower") - f0;
        book_sum += m.sum(
            "score_proxy_redis_operation_duration_seconds_sum",
            &[("op", "book")],
        );
        book_count += m.sum(
            "score_proxy_redis_operation_duration_seconds_count",
            &[("op", "book")],
        );
        fallbacks += m.sum("score_proxy_shared_fallbacks_total", &[]);
        modes.push(m.sum("score_proxy_pacing_mode", &[("mode", "shared")]));
        scrapes.push(m);
    }
    let book_p99 = bucket_quantile(
        &scrapes,
        "score_proxy_redis_operation_duration_seconds_bucket",
        &[("op", "book")],
        0.99,
    );
    let st = statuses(&samples);
    show_errors("3 replicas, one key", &samples);
    let wall = samples.iter().map(|s| s.end).fold(launched, f64::max) - launched;
    let lat: Vec<f64> = samples.iter().map(Sample::latency).collect();
    let mut kinds: BTreeMap<String, usize> = BTreeMap::new();
    for s in &samples {
        *kinds
            .entry(s.x_cache.clone().unwrap_or_else(|| "none".into()))
            .or_default() += 1;
    }
    let kinds_text = kinds
        .iter()
        .map(|(k, v)| format!("{v}x{k}"))
        .collect::<Vec<_>>()
        .join(" ");
    println!(
        "{} ({kinds_text}) in {}, {} upstream calls, {leaders} leader / {followers} follower \
         flights",
        fmt_statuses(&st),
        secs(wall),
        stats.calls
    );
    ensure!(
        st.get("200") == Some(&(3 * k)),
        "3 replicas, one key: expected {}x200, got {}",
        3 * k,
        fmt_statuses(&st)
    );
    suite.report.target(
        format!(
            "3 replicas, one key on all three at once x{}: 1 upstream call",
            3 * k
        ),
        format!("{} calls ({kinds_text})", stats.calls),
        stats.calls == 1,
    );
    ensure!(
        fallbacks == 0.0 && modes.iter().all(|&m| m == 1.0),
        "a replica left shared mode during the scenario ({fallbacks} fallbacks, pacing modes \
         {modes:?}): the bursts did not test shared pacing"
    );
    drop(fleet);
    let mut redis = redis;
    if let Some(status) = redis.proc.exited() {
        bail!(
            "redis-server exited ({status}) during the scenario; its log:\n{}",
            redis.proc.log_tail()
        );
    }
    drop(redis);

    let mean_book = if book_count > 0.0 {
        book_sum / book_count
    } else {
        f64::NAN
    };
    let body = format!(
        "Three proxy processes in shared mode (`--redis-url redis://127.0.0.1:PORT \
         --redaction-key bench --expected-replicas 3 --rate {rate} --rate-guard {REPLICA_GUARD}`, \
         metrics on, access log off) in front of the one strict simulator of scenario 1 (1 call/s \
         for everyone, 2 s penalty), sharing a `redis-server --port PORT --bind 127.0.0.1 \
         --save '' --appendonly no` started by the harness; and, in the same run, one process \
         with the same flags but no Redis (single-process pacing). Each burst is N distinct \
         lookups sent at once, each on its own connection, lookup i to replica i mod 3 (round \
         robin); both take the proxy's default queue of 20 (fleet-wide in shared mode) and \
         refuse the rest at once with 429.\n\n\
         **Why the real contract and the default 10 ms guard.** The guard must cover the \
         error of each replica's estimate of Redis's clock (half its quickest recent round \
         trip: the health check reads Redis's `TIME` every 500 ms, and every booking's reply \
         carries Redis's time too) plus each replica's own timer and scheduling jitter. Redis's \
         PING round trip on this loopback: p50 {}, p99 {} (200 PINGs); the replicas' own `book` \
         round trip (the Lua script, from their `score_proxy_redis_operation_duration_seconds`, \
         during the bursts, when every lookup of the burst talks to Redis at once): mean {} \
         over {book_count:.0} booking requests, 99 % at most {} (histogram bucket). A slot is \
         placed with the quiet round trip's error, not a busy booking's; 10 ms covers that with \
         room for timer and scheduling jitter (the *min gap* column shows what was left). At 1 \
         call/s \
         a larger guard costs budget (25 ms: 1/1.025 = 97.6 % of the rate, below the 0.98 \
         target), and scaling the rate up to make the burst shorter would make any guard a \
         larger share of the interval: the real contract keeps the comparison with one process \
         exact.\n\n\
         *Answers (per replica)* is what each replica answered, how many upstream calls it \
         made (its `score_proxy_upstream_calls_total`) and how many booking requests Redis \
         answered (slots booked, and requests refused at the fleet's capacity). *Unused slots* are booked slots that passed without a call \
         (`score_proxy_pacing_unused_slots_total`, all proxies, by reason: `late` is a slot a \
         replica reached more than half the guard after its time, given up rather than risk \
         the neighbouring replica's slot). *Calls / keys* is upstream calls \
         against distinct CPFs that reached the upstream (equal: no key fetched twice). *Min \
         gap* is the smallest interval between two upstream arrivals on the simulator's clock \
         (at least 1 s, or a violation). *Pace* and *budget use* are the upstream's arrivals per \
         second over the run, and that against the configured rate. *Wall*, *ideal* and *listen \
         drops* as in scenario 1.\n\n{}\n\
         **3 replicas against 1 process**, same run, same flags:\n\n{}\n\
         **Cross-replica coalescing.** One new key, {k} lookups of it sent to each of the three \
         replicas at once ({} in all), the upstream answering in {coalesce_latency_ms} ms: \
         {} upstream call(s); answers {} (X-Cache: {kinds_text}) in {}, latency p50 {} p99 {}; \
         flights {leaders:.0} leader / {followers:.0} follower (`score_proxy_shared_flights_total`: \
         a follower is a replica that waited on another's call); {drops} listen drops. No \
         replica fell back from shared mode during the scenario \
         (`score_proxy_shared_fallbacks_total` 0 on all three).\n",
        ms(rtt_p50),
        ms(rtt_p99),
        ms(mean_book),
        ms(book_p99),
        table(
            &[
                "pacing",
                "N",
                "upstream latency",
                "answers",
                "answers (per replica)",
                "wall (200s)",
                "ideal",
                "wall/ideal",
                "calls / keys",
                "violations",
                "min gap",
                "pace",
                "budget use",
                "listen drops",
                "unused slots",
            ],
            &rows
        ),
        table(
            &[
                "N",
                "upstream latency",
                "budget use, 3 replicas",
                "budget use, 1 process",
                "3 replicas vs 1 process",
                "wall, 3 replicas vs 1 process",
            ],
            &versus
        ),
        3 * k,
        stats.calls,
        fmt_statuses(&st),
        secs(wall),
        ms(percentile(&lat, 50.0)),
        ms(percentile(&lat, 99.0)),
    );
    suite.report.section("7. Three replicas, one budget", body);
    Ok(())
}
