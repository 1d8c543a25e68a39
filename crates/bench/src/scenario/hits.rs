//! Scenario 3: cache hits under `wrk`, the proxy and nginx in alternating rounds on warm key
//! sets; throughput, latency percentiles and server CPU per request, with no upstream call
//! during the measurement (checked).

use std::fmt::Write as _;
use std::time::Instant;

use anyhow::{Result, ensure};

use crate::client::{lookup_path, next_cpfs, warm};
use crate::report::table;
use crate::stats::{median, mib, ms, ratio};
use crate::suite::{Suite, Telemetry};
use crate::wrk::{FAST_PROXY, Hits, run_wrk, write_keys};

pub(crate) async fn run(suite: &mut Suite) -> Result<()> {
    println!("== 3. cache hits");
    // A fast, lenient upstream for the warm-up only: the measured phase makes no call at all
    // (checked below), so the pacing settings are inert there.
    suite.sim.configure(0, 0).await?;
    let mut rows = Vec::new();
    let mut live_rss = Vec::new();
    for keys in suite.plan.hit_keysets.clone() {
        let cpfs = next_cpfs(keys);
        let paths: Vec<String> = cpfs.iter().map(|c| lookup_path(c)).collect();
        let keys_file = write_keys(&suite.ws, &format!("keys-{keys}.txt"), &paths)?;

        suite.sim.reset().await?;
        let proxy = suite
            .start_proxy("score-proxy", &FAST_PROXY, Telemetry::Metrics)
            .await?;
        let nginx = suite.start_nginx("nginx", "1000r/s", 1000).await?;
        let mut contenders = [(proxy, Hits::new()), (nginx, Hits::new())];
        for (running, _) in &contenders {
            let rss_before = running.proc.rss();
            let t = Instant::now();
            let calls_before = suite.sim.stats().await?.calls;
            warm(&suite.client, &running.base, &paths, 16).await?;
            let calls = suite.sim.stats().await?.calls - calls_before;
            ensure!(
                calls == keys as u64,
                "{}: warming {keys} keys made {calls} upstream calls",
                running.label
            );
            println!(
                "  {}: warmed {keys} keys in {:.1} s",
                running.label,
                t.elapsed().as_secs_f64()
            );
            if keys >= 1000 && running.label == "score-proxy" {
                // Not the memory target (that is scenario 6), a sanity check on the live
                // process: what 10 000 entries fetched through HTTP cost it.
                let grown = running.proc.rss().saturating_sub(rss_before);
                live_rss.push((keys, grown));
            }
        }
        let calls_before = suite.sim.stats().await?.calls;
        for round in 0..suite.plan.rounds {
            for (running, hits) in contenders.iter_mut() {
                let r = run_wrk(&suite.plan, &running.base, &keys_file, &running.proc)?;
                ensure!(
                    r.errors() == 0,
                    "{} under wrk ({keys} keys, round {}): {} errors or non-2xx answers: {r:?}",
                    running.label,
                    round + 1,
                    r.errors()
                );
                println!(
                    "  {} keys={keys} round {}: {:.0} req/s p50 {} p99 {} p99.9 {}, {:.1} us CPU/req",
                    running.label,
                    round + 1,
                    r.rps(),
                    ms(r.p50_us as f64 / 1e6),
                    ms(r.p99_us as f64 / 1e6),
                    ms(r.p999_us as f64 / 1e6),
                    r.cpu_us
                );
                hits.add(&r);
            }
        }
        let calls = suite.sim.stats().await?.calls - calls_before;
        ensure!(
            calls == 0,
            "{calls} upstream calls during the cache-hit measurement: not all were hits"
        );
        let (proxy_hits, nginx_hits) = (&contenders[0].1, &contenders[1].1);
        let (p_rps, n_rps) = (median(&proxy_hits.rps), median(&nginx_hits.rps));
        let (p_p99, n_p99) = (median(&proxy_hits.p99), median(&nginx_hits.p99));
        suite.report.target(
            format!("cache hits, {keys} keys: throughput at least 1.0x nginx"),
            format!("{p_rps:.0} vs {n_rps:.0} req/s = {}", ratio(p_rps, n_rps)),
            p_rps >= n_rps,
        );
        suite.report.target(
            format!("cache hits, {keys} keys: p99 no worse than nginx"),
            format!("{} vs {}", ms(p_p99), ms(n_p99)),
            p_p99 <= n_p99,
        );
        for (running, h) in &contenders {
            rows.push(vec![
                keys.to_string(),
                running.label.clone(),
                h.rps
                    .iter()
                    .map(|r| format!("{r:.0}"))
                    .collect::<Vec<_>>()
                    .join(" / "),
                format!("{:.0}", median(&h.rps)),
                ms(median(&h.p50)),
                ms(median(&h.p99)),
                ms(median(&h.p999)),
                format!("{:.1} us", median(&h.cpu_us)),
            ]);
        }
        rows.push(vec![
            keys.to_string(),
            "**proxy / nginx**".into(),
            String::new(),
            format!("**{}**", ratio(p_rps, n_rps)),
            ratio(median(&proxy_hits.p50), median(&nginx_hits.p50)),
            ratio(p_p99, n_p99),
            ratio(median(&proxy_hits.p999), median(&nginx_hits.p999)),
            ratio(median(&proxy_hits.cpu_us), median(&nginx_hits.cpu_us)),
        ]);
    }
    let mut body = format!(
        "`wrk {} -s bench/wrk.lua` against each, {} alternating round(s) (proxy, nginx, proxy, \
         nginx ...), all answers 200 and no upstream call during the measurement (checked). \
         The script rotates over the key set (each wrk thread from its own offset). All figures \
         are medians over the rounds (wrk's per-round percentiles for latencies).\n\n\
         How each was warmed: the simulator's rate rule off (`min_interval 0`), the proxy started \
         with `{}` and nginx's inner server with `rate=1000r/s burst=1000` \
         (`bench/nginx-1000r-per-s.generated.conf`); the harness then looked each key up once, 16 \
         at a time. Pacing settings only matter for misses, and there are none once warm. The \
         proxy runs with metrics on and the access log off (`RUST_LOG=off`), nginx with \
         `access_log off` and `worker_processes auto`; the proxy uses tokio's default runtime (a \
         worker per core). Both share the 2 cores with wrk. *Server CPU per request* is the \
         user + system time the server's processes used during the run (from `/proc/PID/stat`) \
         divided by the requests served: less sensitive to other load on the machine than \
         throughput.\n\n{}",
        suite.plan.wrk_args(),
        suite.plan.rounds,
        FAST_PROXY.join(" "),
        table(
            &[
                "keys",
                "contender",
                "req/s per round",
                "req/s (median)",
                "p50",
                "p99",
                "p99.9",
                "server CPU per request"
            ],
            &rows
        )
    );
    for (keys, grown) in live_rss {
        let _ = write!(
            body,
            "\nThe live proxy's resident memory grew by {} while it fetched and cached {keys} \
             entries over HTTP ({:.0} bytes per entry, all included: connection buffers, \
             allocator slack; scenario 6 measures the cache itself).\n",
            mib(grown),
            grown as f64 / keys as f64
        );
    }
    suite.report.section("3. Cache hits", body);
    Ok(())
}
