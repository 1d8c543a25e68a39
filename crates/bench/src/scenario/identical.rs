//! Scenario 2: one key asked by many clients at once on a cold cache: how many upstream
//! calls each contender makes (coalescing) and what the waiters' latency is.

use std::time::Duration;

use anyhow::{Result, ensure};

use crate::client::{Sample, fire, next_cpfs};
use crate::flush;
use crate::report::table;
use crate::stats::{fmt_statuses, ms, percentile, secs, show_errors, statuses};
use crate::suite::{Rival, Suite, paced_contenders};

pub(crate) async fn run(suite: &mut Suite) -> Result<()> {
    println!("== 2. identical burst");
    let n = suite.plan.identical;
    let mut rows = Vec::new();
    for c in paced_contenders() {
        suite.sim.configure(0, 1000).await?;
        suite.sim.reset().await?;
        let running = suite.start(&c).await?;
        let cpf = next_cpfs(1).remove(0);
        let cpfs = vec![cpf; n];
        print!("  {} x{n} ... ", c.label);
        flush();
        let (launched, samples, drops) = fire(&running.base, &cpfs, Duration::from_secs(60)).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        let stats = suite.sim.stats().await?;
        drop(running);
        let st = statuses(&samples);
        show_errors(c.label, &samples);
        let wall = samples.iter().map(|s| s.end).fold(launched, f64::max) - launched;
        let lat: Vec<f64> = samples.iter().map(Sample::latency).collect();
        println!(
            "{} in {}, {} upstream calls, {drops} listen drops",
            fmt_statuses(&st),
            secs(wall),
            stats.calls
        );
        if matches!(c.rival, Rival::Proxy) {
            ensure!(
                st.get("200") == Some(&n),
                "score-proxy identical burst: expected {n}x200, got {}",
                fmt_statuses(&st)
            );
            suite.report.target(
                format!("identical burst x{n}: 1 upstream call"),
                format!("{} calls", stats.calls),
                stats.calls == 1,
            );
        }
        rows.push(vec![
            c.label.to_owned(),
            fmt_statuses(&st),
            stats.calls.to_string(),
            secs(wall),
            ms(percentile(&lat, 50.0)),
            ms(percentile(&lat, 99.0)),
            drops.to_string(),
        ]);
    }
    let body = format!(
        "{n} concurrent lookups of one key (same client id and CPF), cold cache, each on its own \
         connection. nginx coalesces with `proxy_cache_lock on`, whose waiters poll the cache \
         every 500 ms. *Listen drops* as in scenario 1.\n\n{}",
        table(
            &[
                "contender",
                "answers",
                "upstream calls",
                "wall",
                "latency p50",
                "latency p99",
                "listen drops"
            ],
            &rows
        )
    );
    suite.report.section("2. Identical burst", body);
    Ok(())
}
