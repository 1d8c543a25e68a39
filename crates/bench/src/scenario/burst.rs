//! Scenario 1: bursts of distinct lookups against the strict simulator; the proxy and nginx
//! take the same 1 + 20 and refuse the rest. Measures how long the served ones take against
//! the ideal paced schedule, the upstream's pace, violations and listen-queue drops.

use std::time::Duration;

use anyhow::{Result, ensure};

use crate::client::{Sample, fire, next_cpfs};
use crate::flush;
use crate::report::table;
use crate::stats::{fmt_statuses, ratio, secs, show_errors, statuses};
use crate::suite::{Rival, Suite, paced_contenders};

/// The proxy's defaults that the targets are stated against (see `src/config.rs`).
const PROXY_RATE_GUARD: Duration = Duration::from_millis(10);

pub(crate) async fn run(suite: &mut Suite) -> Result<()> {
    println!("== 1. burst of distinct lookups");
    let mut rows = Vec::new();
    let bursts = suite.plan.bursts.clone();
    for (n, latency_ms) in bursts {
        for c in paced_contenders() {
            suite.sim.configure(latency_ms, 1000).await?;
            suite.sim.reset().await?;
            let running = suite.start(&c).await?;
            let cpfs = next_cpfs(n);
            print!("  {} N={n} latency={latency_ms}ms ... ", c.label);
            flush();
            let (launched, samples, drops) =
                fire(&running.base, &cpfs, Duration::from_secs(120)).await;
            // Every answer is in, so every call has arrived; let a last answer be recorded.
            tokio::time::sleep(Duration::from_millis(50)).await;
            let stats = suite.sim.stats().await?;
            drop(running);

            let st = statuses(&samples);
            show_errors(c.label, &samples);
            let ok: Vec<&Sample> = samples.iter().filter(|s| s.status() == Some(200)).collect();
            let served = ok.len();
            let wall_all = samples.iter().map(|s| s.end).fold(launched, f64::max) - launched;
            let wall_ok = ok.iter().map(|s| s.end).fold(launched, f64::max) - launched;
            let latency = latency_ms as f64 / 1000.0;
            let ideal = served.saturating_sub(1) as f64 / c.rate + latency;
            let bound = served.saturating_sub(1) as f64
                * (1.0 / c.rate + PROXY_RATE_GUARD.as_secs_f64())
                + latency
                + 0.050;
            let ats: Vec<f64> = stats.arrivals.iter().map(|a| a.at.as_secs_f64()).collect();
            let achieved = if ats.len() >= 2 {
                let span = ats.iter().cloned().fold(f64::MIN, f64::max)
                    - ats.iter().cloned().fold(f64::MAX, f64::min);
                (ats.len() - 1) as f64 / span
            } else {
                f64::NAN
            };
            println!(
                "{} in {}, {} calls, {} violations, {drops} listen drops",
                fmt_statuses(&st),
                secs(wall_all),
                stats.calls,
                stats.violations
            );
            let honest = samples
                .iter()
                .all(|s| matches!(s.status(), Some(200) | Some(429)));
            if matches!(c.rival, Rival::Proxy) {
                // Deterministic: the proxy answers with a score or an honest refusal, and never
                // something else (a 5xx here is a bug, not noise).
                ensure!(
                    samples
                        .iter()
                        .all(|s| matches!(s.status(), Some(200) | Some(429) | Some(503))),
                    "score-proxy burst N={n}: unexpected answers {}",
                    fmt_statuses(&st)
                );
                let what = format!("burst N={n}, upstream {latency_ms} ms");
                suite.report.target(
                    format!("{what}: 0 violations, only 200 or 429"),
                    format!("{} violations, {}", stats.violations, fmt_statuses(&st)),
                    stats.violations == 0 && honest,
                );
                suite.report.target(
                    format!("{what}: {served} served within (S-1)(1/rate+guard)+latency+50ms"),
                    format!("{} (bound {})", secs(wall_ok), secs(bound)),
                    wall_ok <= bound,
                );
                if latency_ms >= 500 {
                    suite.report.target(
                        format!("{what}: upstream pace at least 0.98 x rate"),
                        format!("{achieved:.3} calls/s"),
                        achieved >= 0.98 * c.rate,
                    );
                }
            }
            rows.push(vec![
                c.label.to_owned(),
                n.to_string(),
                format!("{latency_ms} ms"),
                fmt_statuses(&st),
                secs(wall_ok),
                secs(ideal),
                ratio(wall_ok, ideal),
                secs(wall_all),
                stats.calls.to_string(),
                stats.violations.to_string(),
                if achieved.is_nan() {
                    "n/a".into()
                } else {
                    format!("{achieved:.3}/s")
                },
                drops.to_string(),
            ]);
        }
    }
    let body = format!(
        "N distinct lookups sent at once, each on its own connection, against the strict \
         simulator (1 call/s for everyone, 2 s penalty). The proxy runs with its defaults \
         (queue of 20, 10 ms guard), nginx with `burst=20`: both take 1 + 20 lookups and refuse \
         the rest at once with 429. S = lookups answered 200. *Wall (200s)* is launch to the \
         last 200; *ideal* is (S-1)/rate + latency; *wall (all)* includes every answer (the \
         upstream's own 429s that nginx passes through). *Pace* is the upstream's arrivals per \
         second over the run. *Listen drops* are connection attempts the kernel dropped because \
         the server's listen backlog was full (`TcpExt ListenOverflows`, machine-wide): each \
         costs its client a 1 s SYN retransmission.\n\n{}",
        table(
            &[
                "contender",
                "N",
                "upstream latency",
                "answers",
                "wall (200s)",
                "ideal",
                "wall/ideal",
                "wall (all)",
                "upstream calls",
                "violations",
                "pace",
                "listen drops",
            ],
            &rows
        )
    );
    suite.report.section("1. Burst of distinct lookups", body);
    Ok(())
}
