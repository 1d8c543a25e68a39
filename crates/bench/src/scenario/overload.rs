//! Scenario 4: many clients at once, each giving up after a short timeout: how fast refusals
//! come (client-side and in the proxy's own histogram), peak memory, server CPU per client,
//! and whether any call reaches the upstream after its client has gone (a wasted call).

use std::collections::HashMap;

use anyhow::{Result, ensure};

use crate::client::{Outcome, Sample, fire, next_cpfs};
use crate::report::table;
use crate::scrape::{bucket_quantile, handled_within, scrape};
use crate::stats::{fmt_statuses, mib, ms, percentile, secs, show_errors, statuses};
use crate::suite::{Rival, Suite, paced_contenders};
use crate::{flush, now_s};

pub(crate) async fn run(suite: &mut Suite) -> Result<()> {
    println!("== 4. overload");
    let n = suite.plan.overload_clients;
    let timeout = suite.plan.overload_timeout;
    let mut rows = Vec::new();
    let mut server_note = String::new();
    for c in paced_contenders() {
        suite.sim.configure(0, 1000).await?;
        suite.sim.reset().await?;
        let running = suite.start(&c).await?;
        let cpfs = next_cpfs(n);
        print!("  {} {n} clients ... ", c.label);
        flush();
        let cpu_before = running.proc.cpu_seconds_fine();
        let (launched, samples, drops) = fire(&running.base, &cpfs, timeout).await;
        let finished = now_s();
        // The server's CPU time for the whole burst (accepting, parsing, answering, closing),
        // per client.
        let cpu_per_client = (running.proc.cpu_seconds_fine() - cpu_before) / n as f64;
        // Watch what still reaches the upstream after every client has gone.
        tokio::time::sleep(suite.plan.overload_watch).await;
        let stats = suite.sim.stats().await?;
        let peak_rss = running.proc.peak_rss();
        let server_side = match c.rival {
            Rival::Proxy => {
                let own = scrape(&suite.client, &running.base).await?;
                Some((handled_within(&own, "0.01"), own))
            }
            Rival::Nginx { .. } => None,
        };
        drop(running);

        let st = statuses(&samples);
        show_errors(c.label, &samples);
        let refused: Vec<&Sample> = samples
            .iter()
            .filter(|s| matches!(s.status(), Some(429) | Some(503)))
            .collect();
        let refusals: Vec<f64> = refused.iter().map(|s| s.after_connect()).collect();
        let refusals_total: Vec<f64> = refused.iter().map(|s| s.latency()).collect();
        let p99_total = percentile(&refusals_total, 99.0);
        // A call is wasted when it reaches the upstream after its (only) client has given
        // up or was refused. The clocks are aligned to within `offset_error`, so only calls
        // later than that margin count.
        let ended: HashMap<&str, (f64, bool)> = samples
            .iter()
            .map(|s| (s.cpf.as_str(), (s.end, s.status() == Some(200))))
            .collect();
        let margin = suite.sim.offset_error + 0.001;
        let mut wasted_after_timeout = 0;
        let mut wasted_after_refusal = 0;
        for a in &stats.arrivals {
            if let Some(&(end, ok)) = ended.get(a.cpf.as_str())
                && !ok
                && suite.sim.to_harness(a.at) > end + margin
            {
                let timed_out = samples
                    .iter()
                    .any(|s| s.cpf == a.cpf && matches!(s.outcome, Outcome::Timeout));
                if timed_out {
                    wasted_after_timeout += 1;
                } else {
                    wasted_after_refusal += 1;
                }
            }
        }
        let wasted = wasted_after_timeout + wasted_after_refusal;
        let p99 = percentile(&refusals, 99.0);
        println!(
            "{} in {}, refusal p99 {} ({} with connecting), {} calls ({} wasted), {} violations, peak RSS {}, {drops} listen drops",
            fmt_statuses(&st),
            secs(finished - launched),
            ms(p99),
            ms(p99_total),
            stats.calls,
            wasted,
            stats.violations,
            mib(peak_rss)
        );
        if matches!(c.rival, Rival::Proxy) {
            ensure!(
                samples.iter().all(|s| matches!(
                    s.outcome,
                    Outcome::Status(200)
                        | Outcome::Status(429)
                        | Outcome::Status(503)
                        | Outcome::Timeout
                )),
                "score-proxy overload: unexpected answers {}",
                fmt_statuses(&st)
            );
            // The proxy's own view: its request-duration histogram, refusals only
            // (outcome queue_full), from the request parsed to the response handed to hyper.
            let mut own = String::new();
            if let Some(((within, all), own_scrape)) = &server_side {
                let refusals_label = [("route", "/proxy/score"), ("outcome", "queue_full")];
                let count = own_scrape.sum(
                    "score_proxy_http_request_duration_seconds_count",
                    &refusals_label,
                );
                let quantile = |q: f64| {
                    bucket_quantile(
                        std::slice::from_ref(own_scrape),
                        "score_proxy_http_request_duration_seconds_bucket",
                        &refusals_label,
                        q,
                    )
                };
                let (own_p50, own_p99) = (quantile(0.5), quantile(0.99));
                own = format!(
                    "; the proxy's own histogram: refusal p99 at most {}",
                    ms(own_p99)
                );
                println!(
                    "  score-proxy's own histogram: {within} of {all} lookups handled within \
                     10 ms; {count:.0} refusals (queue_full), p50 at most {}, p99 at most {}",
                    ms(own_p50),
                    ms(own_p99)
                );
                server_note = format!(
                    "\n\nThe proxy's own `score_proxy_http_request_duration_seconds` histogram \
                     (from the request parsed to the response handed to hyper: admission to \
                     refusal, without the time the request waited for a core, in the kernel or \
                     in hyper) puts {within} of its {all} lookups in this run at 10 ms or less; \
                     of its {count:.0} refusals (`outcome=\"queue_full\"`) half took at most {} \
                     and 99 % at most {} (upper bounds: the histogram's bucket edges).",
                    ms(own_p50),
                    ms(own_p99)
                );
            }
            suite.report.target(
                format!("overload x{n}: refusal p99 under 10 ms (request sent to answer)"),
                format!(
                    "{} ({} counting the connection set-up{own})",
                    ms(p99),
                    ms(p99_total)
                ),
                p99 < 0.010,
            );
            suite.report.target(
                format!("overload x{n}: peak RSS under 100 MB"),
                mib(peak_rss),
                peak_rss < 100_000_000,
            );
            suite.report.target(
                format!("overload x{n}: 0 violations, 0 wasted calls"),
                format!("{} violations, {wasted} wasted", stats.violations),
                stats.violations == 0 && wasted == 0,
            );
        }
        rows.push(vec![
            c.label.to_owned(),
            fmt_statuses(&st),
            refusals.len().to_string(),
            ms(percentile(&refusals, 50.0)),
            ms(p99),
            ms(refusals.iter().cloned().fold(f64::NAN, f64::max)),
            ms(p99_total),
            mib(peak_rss),
            stats.calls.to_string(),
            stats.violations.to_string(),
            format!("{wasted} ({wasted_after_timeout} after timeout, {wasted_after_refusal} after refusal)"),
            drops.to_string(),
            format!("{:.0} us", cpu_per_client * 1e6),
        ]);
    }
    let body = format!(
        "{n} clients at once, each asking a distinct CPF on its own connection and giving up \
         after {} s; then the upstream is watched for {} s more. *Refusals* are answers 429 or \
         503; their latency is measured from the moment the request was written on an \
         established connection to the end of the answer (the server's part), and also from \
         the first connection attempt (*with connecting*: {n} handshakes at once through the \
         kernel's accept queue, on 2 cores shared with the {n}-task client). *Server CPU per \
         client* is the user + system time the server's processes used from the launch to the \
         last answer or timeout, divided by the clients: accepting, parsing, answering and \
         closing; times {n} and over 2 cores, about how long the burst keeps the server busy. \
         *Peak RSS* is \
         VmHWM (for nginx summed over the master and its workers, cache manager and loader). \
         A *wasted* call is one that reached the upstream after its only client had timed out \
         or been refused: the simulator's arrival times are put on the harness's clock with a \
         probe (uncertainty ±{:.2} ms, and only calls later than that count). *Listen drops* \
         as in scenario 1.\n\n{}{server_note}\n",
        timeout.as_secs_f64(),
        suite.plan.overload_watch.as_secs(),
        suite.sim.offset_error * 1e3,
        table(
            &[
                "contender",
                "answers",
                "refusals",
                "refusal p50",
                "refusal p99",
                "refusal max",
                "refusal p99 with connecting",
                "peak RSS",
                "upstream calls",
                "violations",
                "wasted calls",
                "listen drops",
                "server CPU per client",
            ],
            &rows
        )
    );
    suite.report.section("4. Overload", body);
    Ok(())
}
