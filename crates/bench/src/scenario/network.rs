//! Scenario 8: pacing across a network (issue 16). The strict simulator (1 call/s for
//! everyone, a 2 s penalty that every arrival during it extends) counts each call's arrival
//! after a seeded one-way delay, as the real API, across the Internet, counts what reaches
//! it and not what left the caller. Three networks: uniform delays in 0..30 ms, mostly
//! 0..3 ms with a 150 ms spike for 5 % of the calls, and none (loopback, where the guard
//! must not grow without a cause).
//!
//! The contenders are the proxy with its defaults (the learned guard), the proxy with its
//! guard fixed at the 10 ms floor (`--rate-guard-max` equal to `--rate-guard`, what it was
//! before issue 16), and nginx at `59r/m`. They run **at the same time, each against its
//! own simulator** configured with the same delays and seed: one after the other they would
//! take three times as long (the steady stream alone is three minutes), and with their own
//! simulators no contender's calls count against another's budget. With the same seed each
//! simulator draws the same sequence of delays, the n-th call to reach it getting the n-th
//! delay, so the contenders cross the same network. Each case starts fresh contenders, so
//! the learned guard starts at its floor every time.
//!
//! Measured per case and contender: a burst of distinct lookups sent at once (answers,
//! upstream calls, penalised calls, budget use, wall time) and, across the 0..30 ms network,
//! a steady stream: a few clients in a closed loop, each sending a new distinct lookup as
//! soon as its last one is answered, so the pacer always has work waiting.

use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use futures_util::future::join_all;
use score_sim::SimStats;

use crate::client::{Sample, fire, lookup, next_cpfs};
use crate::now_s;
use crate::report::table;
use crate::sim::Sim;
use crate::stats::{fmt_statuses, secs, show_errors, statuses};
use crate::suite::{Contender, NginxSpec, Rival, Running, Suite, Telemetry, paced_contenders};

/// The upstream's contract: one call per second for everyone, as the real API.
const MIN_INTERVAL_MS: u64 = 1000;
/// Calls per second the upstream allows: budget use is measured against it for every
/// contender, nginx's `59r/m` included (what it leaves unused is budget lost).
const UPSTREAM_RATE: f64 = 1.0;

/// Every proxy here takes a whole burst (the default queue of 20 would refuse most of it):
/// room for 200 lookups, each allowed to wait 5 minutes for its call to start.
const PROXY_QUEUE: [&str; 4] = ["--queue-capacity", "200", "--queue-timeout", "300s"];
/// The guard before issue 16: the default floor, and a ceiling equal to it.
const FIXED_GUARD: [&str; 4] = ["--rate-guard", "10ms", "--rate-guard-max", "10ms"];
/// nginx's `limit_req` queue, likewise large enough for the largest burst, and its read
/// timeouts raised so that a request at the back of that queue (100 s at `59r/m`) is not
/// cut off by the template's 60 s.
const NGINX_BURST: u32 = 200;
const NGINX_READ_TIMEOUT_S: u32 = 300;

/// How long a client waits for one answer of a burst: beyond any queue above.
const BURST_TIMEOUT: Duration = Duration::from_secs(400);
/// How long a client of the steady stream waits for one answer.
const STEADY_TIMEOUT: Duration = Duration::from_secs(120);
/// A steady client that got something other than a score waits this long before its next
/// lookup, so that a contender answering errors at once is not hammered in a tight loop.
const STEADY_PAUSE_AFTER_ERROR: Duration = Duration::from_millis(100);
/// The steady stream's learning time: penalties in it are reported, not held against
/// the target.
const STEADY_LEARNING_S: f64 = 60.0;

/// The three networks of issue 16.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Net {
    Uniform30,
    Spikes,
    Loopback,
}

impl Net {
    fn describe(self) -> &'static str {
        match self {
            Net::Uniform30 => "J = 30 ms: uniform 0-30 ms",
            Net::Spikes => "spikes: 95 % 0-3 ms, 5 % 150 ms",
            Net::Loopback => "J = 0 (loopback)",
        }
    }

    /// In `score-sim`'s syntax (`--arrival-delay`, `/__sim/config`).
    fn delay(self) -> &'static str {
        match self {
            Net::Uniform30 => "uniform:0ms..30ms",
            Net::Spikes => "spikes:0ms..3ms,5%,150ms",
            Net::Loopback => "none",
        }
    }

    /// Fixed, so that a run can be repeated against the same delays.
    fn seed(self) -> u64 {
        match self {
            Net::Uniform30 => 1630,
            Net::Spikes => 1650,
            Net::Loopback => 1600,
        }
    }
}

/// The steady stream's seed (the 0..30 ms network, another sequence than the burst's).
const STEADY_SEED: u64 = 1631;

enum Entrant {
    Proxy {
        label: &'static str,
        flags: &'static [&'static str],
        /// The defaults, which the targets are stated for.
        learned: bool,
    },
    Nginx(Contender),
}

impl Entrant {
    fn label(&self) -> &'static str {
        match self {
            Entrant::Proxy { label, .. } => label,
            Entrant::Nginx(c) => c.label,
        }
    }

    fn is_proxy(&self) -> bool {
        matches!(self, Entrant::Proxy { .. })
    }

    fn learned(&self) -> bool {
        matches!(self, Entrant::Proxy { learned: true, .. })
    }
}

fn entrants(quick: bool) -> Result<Vec<Entrant>> {
    let mut all = vec![Entrant::Proxy {
        label: "score-proxy (learned guard)",
        flags: &[],
        learned: true,
    }];
    if quick {
        return Ok(all);
    }
    all.push(Entrant::Proxy {
        label: "score-proxy (fixed 10 ms guard)",
        flags: &FIXED_GUARD,
        learned: false,
    });
    let nginx = paced_contenders()
        .into_iter()
        .find(|c| matches!(c.rival, Rival::Nginx { rate: "59r/m", .. }))
        .context("scenario 1's contenders no longer include nginx at 59r/m")?;
    all.push(Entrant::Nginx(nginx));
    Ok(all)
}

async fn start(suite: &mut Suite, e: &Entrant, sim: &Sim) -> Result<Running> {
    match e {
        Entrant::Proxy { label, flags, .. } => {
            let mut args = PROXY_QUEUE.to_vec();
            args.extend_from_slice(flags);
            suite
                .start_proxy_to(label, &args, Telemetry::Metrics, sim.port)
                .await
        }
        Entrant::Nginx(c) => {
            let Rival::Nginx { rate, .. } = c.rival else {
                bail!("{} is not nginx", c.label);
            };
            let spec = NginxSpec {
                rate,
                burst: NGINX_BURST,
                sim_port: sim.port,
                read_timeout_s: Some(NGINX_READ_TIMEOUT_S),
                variant: Some("network"),
            };
            suite.start_nginx_with(c.label, &spec).await
        }
    }
}

/// What one contender's run did, as the client and the upstream saw it.
struct Measured {
    samples: Vec<Sample>,
    wall: f64,
    stats: SimStats,
    /// The proxy's guard in force at the end, and why (from `/status`).
    guard: Option<String>,
}

impl Measured {
    fn budget_use(&self) -> f64 {
        let ats: Vec<f64> = self
            .stats
            .arrivals
            .iter()
            .map(|a| a.at.as_secs_f64())
            .collect();
        budget_use(&ats)
    }

    /// The part of [`Measured::budget_use`] that the upstream did not penalise: budget use
    /// times the share of arrivals that were not violations. A contender penalised on every
    /// call uses the whole budget and gets nothing for it; this column shows that.
    fn clean_use(&self) -> f64 {
        let calls = self.stats.calls.max(1) as f64;
        self.budget_use() * (calls - self.stats.violations as f64) / calls
    }

    /// Penalised calls that arrived within [`STEADY_LEARNING_S`] of the first arrival, and
    /// after.
    fn penalised_split(&self) -> (usize, usize) {
        let first = self
            .stats
            .arrivals
            .iter()
            .map(|a| a.at.as_secs_f64())
            .fold(f64::INFINITY, f64::min);
        let (early, late): (Vec<_>, Vec<_>) = self
            .stats
            .arrivals
            .iter()
            .filter(|a| a.violation)
            .partition(|a| a.at.as_secs_f64() < first + STEADY_LEARNING_S);
        (early.len(), late.len())
    }
}

/// (Arrivals − 1) over the span from the first to the last, against the upstream's rate:
/// 100 % is one call every second for the whole run. Penalised calls count (they arrived;
/// the penalty they cost shows as a longer span).
fn budget_use(ats: &[f64]) -> f64 {
    if ats.len() < 2 {
        return f64::NAN;
    }
    let first = ats.iter().copied().fold(f64::INFINITY, f64::min);
    let last = ats.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    (ats.len() - 1) as f64 / (last - first) / UPSTREAM_RATE
}

fn percent(x: f64) -> String {
    if x.is_nan() {
        "n/a".into()
    } else {
        format!("{:.1} %", x * 100.0)
    }
}

/// The proxy's guard in force and its reason, as `/status` shows them.
async fn guard(client: &reqwest::Client, running: &Running) -> Option<String> {
    let body = client
        .get(format!("{}/status", running.base))
        .timeout(Duration::from_secs(5))
        .send()
        .await
        .ok()?
        .bytes()
        .await
        .ok()?;
    let status: serde_json::Value = serde_json::from_slice(&body).ok()?;
    let seconds = status["guard_seconds"].as_f64()?;
    let reason = status["guard_reason"].as_str().unwrap_or("?");
    Some(format!("{:.1} ms ({reason})", seconds * 1e3))
}

/// What load a case puts on every contender.
#[derive(Clone, Copy)]
enum Load {
    /// Distinct lookups sent at once.
    Burst(usize),
    /// `clients` clients, each sending a new distinct lookup as soon as its last one is
    /// answered, for `duration`; the lookups still out when it ends are waited for.
    Steady { clients: usize, duration: Duration },
}

async fn measure(
    client: &reqwest::Client,
    e: &Entrant,
    running: &Running,
    sim: &Sim,
    load: Load,
) -> Result<Measured> {
    let (started, samples) = match load {
        Load::Burst(n) => {
            let (launched, samples, _drops) =
                fire(&running.base, &next_cpfs(n), BURST_TIMEOUT).await;
            (launched, samples)
        }
        Load::Steady { clients, duration } => {
            let started = now_s();
            let until = started + duration.as_secs_f64();
            let loops = (0..clients).map(|_| async {
                let mut mine = Vec::new();
                while now_s() < until {
                    let cpf = next_cpfs(1).remove(0);
                    let s = lookup(&running.base, &cpf, STEADY_TIMEOUT).await;
                    let failed = s.status() != Some(200);
                    mine.push(s);
                    if failed {
                        tokio::time::sleep(STEADY_PAUSE_AFTER_ERROR).await;
                    }
                }
                mine
            });
            (started, join_all(loops).await.concat())
        }
    };
    let wall = samples.iter().map(|s| s.end).fold(started, f64::max) - started;
    // Every answer is in, so every call has arrived; let a last answer be recorded.
    tokio::time::sleep(Duration::from_millis(50)).await;
    let stats = sim.stats().await?;
    let guard = if e.is_proxy() {
        guard(client, running).await
    } else {
        None
    };
    Ok(Measured {
        samples,
        wall,
        stats,
        guard,
    })
}

/// Deterministic whatever the timing: a proxy with room in its queue for every lookup
/// answers each one with its score (a penalty costs time, never the answer).
fn check_answers(e: &Entrant, what: &str, m: &Measured) -> Result<()> {
    show_errors(e.label(), &m.samples);
    if e.is_proxy() {
        ensure!(
            m.samples.iter().all(|s| s.status() == Some(200)),
            "{} {what}: not every lookup answered with its score: {}",
            e.label(),
            fmt_statuses(&statuses(&m.samples))
        );
    }
    Ok(())
}

/// One case: fresh contenders, each against its own simulator with the same network and
/// seed, all loaded at once.
async fn run_case(
    suite: &mut Suite,
    entrants: &[Entrant],
    sims: &[Sim],
    net: Net,
    seed: u64,
    load: Load,
) -> Result<Vec<Measured>> {
    let mut running = Vec::new();
    for (e, sim) in entrants.iter().zip(sims) {
        sim.configure_network(0, MIN_INTERVAL_MS, net.delay(), seed)
            .await?;
        sim.reset().await?;
        running.push(start(suite, e, sim).await?);
    }
    let client = suite.client.clone();
    let runs = entrants
        .iter()
        .zip(&running)
        .zip(sims)
        .map(|((e, r), sim)| measure(&client, e, r, sim, load));
    join_all(runs).await.into_iter().collect()
}

fn check_sims(sims: &mut [Sim]) -> Result<()> {
    for sim in sims {
        if let Some(status) = sim.proc.exited() {
            bail!(
                "a simulator of scenario 8 exited ({status}); its log:\n{}",
                sim.proc.log_tail()
            );
        }
    }
    Ok(())
}

pub(crate) async fn run(suite: &mut Suite) -> Result<()> {
    println!("== 8. network delay");
    let quick = suite.plan.quick;
    let entrants = entrants(quick)?;
    let mut sims = Vec::new();
    for _ in &entrants {
        sims.push(suite.start_sim().await?);
    }
    let nets: &[Net] = if quick {
        &[Net::Uniform30]
    } else {
        &[Net::Uniform30, Net::Spikes, Net::Loopback]
    };
    let mut rows = Vec::new();
    for &net in nets {
        let n = if net == Net::Spikes {
            suite.plan.network_spikes_burst
        } else {
            suite.plan.network_burst
        };
        println!(
            "  {} (--arrival-delay {}, seed {}): burst of {n}, {} contender(s) at once ...",
            net.describe(),
            net.delay(),
            net.seed(),
            entrants.len()
        );
        let load = Load::Burst(n);
        let results = run_case(suite, &entrants, &sims, net, net.seed(), load).await?;
        check_sims(&mut sims)?;
        for (e, m) in entrants.iter().zip(&results) {
            check_answers(e, &format!("{} burst of {n}", net.describe()), m)?;
            if e.learned() && !quick {
                burst_targets(suite, net, n, m);
            }
            rows.push(burst_row(net, n, e, m));
        }
        if net == Net::Uniform30
            && let Some(duration) = suite.plan.network_steady
        {
            let clients = suite.plan.network_steady_clients;
            println!(
                "  {} (seed {STEADY_SEED}): steady stream for {} s, {clients} clients each \
                 sending a new lookup when the last is answered ...",
                net.describe(),
                duration.as_secs()
            );
            let load = Load::Steady { clients, duration };
            let results = run_case(suite, &entrants, &sims, net, STEADY_SEED, load).await?;
            check_sims(&mut sims)?;
            for (e, m) in entrants.iter().zip(&results) {
                check_answers(e, "steady stream", m)?;
                let (early, late) = m.penalised_split();
                if e.learned() {
                    suite.report.target(
                        format!(
                            "network J=30 ms: steady stream for {} s, 0 penalised calls \
                             after the first minute",
                            duration.as_secs()
                        ),
                        format!(
                            "{late} after, {early} in the first minute, of {} calls",
                            m.stats.calls
                        ),
                        late == 0,
                    );
                }
                rows.push(steady_row(
                    &format!("steady {} s, {clients} clients", duration.as_secs()),
                    e,
                    m,
                ));
            }
        }
    }
    drop(sims);
    suite.report.section("8. Network delay", report_body(&rows));
    Ok(())
}

/// Prints a burst's result and returns its row of the report's table.
fn burst_row(net: Net, n: usize, e: &Entrant, m: &Measured) -> Vec<String> {
    let (calls, penalised) = (m.stats.calls, m.stats.violations);
    let per_100 = 100.0 * penalised as f64 / calls.max(1) as f64;
    let guard = m.guard.as_deref().unwrap_or("n/a");
    println!(
        "    {}: {} in {}, {calls} upstream calls, {penalised} penalised ({per_100:.1} per \
         100), budget use {} (unpenalised {}), guard at the end {guard}",
        e.label(),
        fmt_statuses(&statuses(&m.samples)),
        secs(m.wall),
        percent(m.budget_use()),
        percent(m.clean_use()),
    );
    vec![
        format!("{} (seed {})", net.describe(), net.seed()),
        format!("burst of {n}"),
        e.label().to_owned(),
        fmt_statuses(&statuses(&m.samples)),
        calls.to_string(),
        if net == Net::Spikes {
            format!("{penalised} ({per_100:.1} per 100 calls)")
        } else {
            penalised.to_string()
        },
        percent(m.budget_use()),
        percent(m.clean_use()),
        secs(m.wall),
        guard.to_owned(),
    ]
}

/// Prints a steady stream's result and returns its row of the report's table.
fn steady_row(run: &str, e: &Entrant, m: &Measured) -> Vec<String> {
    let (early, late) = m.penalised_split();
    let guard = m.guard.as_deref().unwrap_or("n/a");
    println!(
        "    {}: {} in {}, {} upstream calls, penalised {early} in the first minute and \
         {late} after, budget use {} (unpenalised {}), guard at the end {guard}",
        e.label(),
        fmt_statuses(&statuses(&m.samples)),
        secs(m.wall),
        m.stats.calls,
        percent(m.budget_use()),
        percent(m.clean_use()),
    );
    vec![
        format!("{} (seed {STEADY_SEED})", Net::Uniform30.describe()),
        run.to_owned(),
        e.label().to_owned(),
        fmt_statuses(&statuses(&m.samples)),
        m.stats.calls.to_string(),
        format!("{early} in the 1st min, {late} after"),
        percent(m.budget_use()),
        percent(m.clean_use()),
        secs(m.wall),
        guard.to_owned(),
    ]
}

fn report_body(rows: &[Vec<String>]) -> String {
    format!(
        "The strict simulator (1 call/s for everyone, 2 s penalty that every arrival during it \
         extends) counts each call's arrival after a seeded one-way delay \
         (`score-sim --arrival-delay`, set through `/__sim/config`): issue 16's networks. \
         Every contender runs at the same time as the others, each against its own simulator \
         with the same delays and seed (the n-th call to reach a simulator gets the n-th \
         delay), and each case starts fresh contenders, so the learned guard starts at its \
         10 ms floor. The proxies run with `{}`, so that a whole burst waits; *fixed 10 ms \
         guard* adds `{}` (the proxy before issue 16). nginx is scenario 1's `59r/m` with \
         `burst={NGINX_BURST}` and its two `proxy_read_timeout`s raised to \
         {NGINX_READ_TIMEOUT_S} s (a request at the back of its queue waits longer than the \
         template's 60 s). *Penalised* calls are the simulator's violations (an arrival less \
         than 1 s after the one before, or during a penalty). *Budget use* is (arrivals - 1) \
         over the span from the first arrival to the last, against the upstream's 1 call/s; \
         penalised calls count as arrivals, and *unpenalised use* is the part of it the \
         upstream did not penalise (budget use times the share of clean arrivals). *Wall* is \
         launch to the last answer (for a steady stream, its length plus the last lookups' \
         answers). The steady stream: each client sends a new distinct lookup as soon as its \
         last one is answered, so the pacer always has work; the first minute is the guard's \
         learning time. *Guard at the end* is the proxy's guard in force after the run, and \
         why (`/status`).\n\n{}",
        PROXY_QUEUE.join(" "),
        FIXED_GUARD.join(" "),
        table(
            &[
                "network (seed)",
                "run",
                "contender",
                "answers",
                "upstream calls",
                "penalised",
                "budget use",
                "unpenalised use",
                "wall",
                "guard at the end",
            ],
            rows
        )
    )
}

/// Issue 16's targets for the learned guard's bursts.
fn burst_targets(suite: &mut Suite, net: Net, n: usize, m: &Measured) {
    let (calls, penalised, used) = (m.stats.calls, m.stats.violations, m.budget_use());
    match net {
        Net::Uniform30 => {
            suite.report.target(
                format!("network J=30 ms: burst of {n}, at most 1 penalised call"),
                format!("{penalised} of {calls} calls"),
                penalised <= 1,
            );
            suite.report.target(
                format!("network J=30 ms: burst of {n}, budget use at least 96 %"),
                percent(used),
                used >= 0.96,
            );
        }
        Net::Spikes => {
            let per_100 = 100.0 * penalised as f64 / calls.max(1) as f64;
            suite.report.target(
                "network spikes (5 % at 150 ms): at most 2 penalised calls per 100",
                format!("{penalised} of {calls} calls ({per_100:.1} per 100)"),
                calls >= 100 && per_100 <= 2.0,
            );
        }
        Net::Loopback => {
            suite.report.target(
                format!("network J=0: burst of {n}, budget use at least 98.9 %"),
                percent(used),
                used >= 0.989,
            );
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn budget_use_counts_gaps_over_the_span() {
        assert_eq!(super::budget_use(&[2.0, 0.0, 1.0, 4.0]), 0.75);
        assert!(super::budget_use(&[1.0]).is_nan());
    }
}
