//! The replicas scenario's building blocks: waiting for a proxy to pace through Redis, and one
//! burst of distinct lookups spread over a fleet (or sent to one process), with what the
//! upstream saw and what each proxy's own counters say.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};

use crate::client::{Sample, fire_spread, next_cpfs};
use crate::scrape::{bookings, scrape, unused_slots};
use crate::stats::{fmt_statuses, statuses};
use crate::suite::{Running, Suite};

/// Waits until the proxy at `base` says it paces through Redis (`/ready`: `"pacing":
/// "shared"`).
pub(crate) async fn wait_shared(client: &reqwest::Client, running: &mut Running) -> Result<()> {
    let until = Instant::now() + Duration::from_secs(20);
    let mut last = String::new();
    loop {
        if let Some(status) = running.proc.exited() {
            bail!(
                "{} exited ({status}); its log:\n{}",
                running.label,
                running.proc.log_tail()
            );
        }
        if let Ok(resp) = client
            .get(format!("{}/ready", running.base))
            .timeout(Duration::from_millis(500))
            .send()
            .await
        {
            last = resp.text().await.unwrap_or_default();
            if serde_json::from_str::<serde_json::Value>(&last)
                .is_ok_and(|v| v["pacing"] == "shared")
            {
                return Ok(());
            }
        }
        if Instant::now() > until {
            bail!(
                "{} is not in shared pacing mode after 20 s (/ready: {last}); its log:\n{}",
                running.label,
                running.proc.log_tail()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// What one burst through one or three proxies did.
pub(crate) struct BurstResult {
    pub(crate) samples: Vec<Sample>,
    pub(crate) statuses: BTreeMap<String, usize>,
    pub(crate) served: usize,
    /// 429s that carried a Retry-After.
    honest_429: usize,
    pub(crate) wall_ok: f64,
    pub(crate) ideal: f64,
    pub(crate) bound: f64,
    pub(crate) calls: u64,
    pub(crate) distinct_called: usize,
    pub(crate) violations: u64,
    /// Upstream arrivals per second over the run, and the smallest gap between two.
    pub(crate) pace: f64,
    pub(crate) min_gap: Option<f64>,
    pub(crate) drops: u64,
    /// Upstream calls each proxy made and the Redis bookings it got (from its own metrics).
    calls_by_proxy: Vec<(f64, f64)>,
    /// Booked slots that passed without a call, by reason, summed over the proxies.
    unused: BTreeMap<String, f64>,
}

impl BurstResult {
    pub(crate) fn unused_text(&self) -> String {
        if self.unused.is_empty() {
            return "0".into();
        }
        self.unused
            .iter()
            .map(|(reason, n)| format!("{n:.0} {reason}"))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

impl BurstResult {
    pub(crate) fn clean(&self) -> bool {
        self.violations == 0
            && self.served + self.honest_429 == self.samples.len()
            && self.calls == self.served as u64
            && self.distinct_called == self.served
    }

    pub(crate) fn per_proxy(&self, n: usize) -> String {
        (0..n)
            .map(|i| {
                let mine: Vec<Sample> = self
                    .samples
                    .iter()
                    .filter(|s| s.target == i)
                    .cloned()
                    .collect();
                let (calls, books) = self
                    .calls_by_proxy
                    .get(i)
                    .copied()
                    .unwrap_or((f64::NAN, f64::NAN));
                format!(
                    "{} ({calls:.0} calls, {books:.0} booking requests)",
                    fmt_statuses(&statuses(&mine))
                )
            })
            .collect::<Vec<_>>()
            .join(" / ")
    }
}

pub(crate) async fn replica_burst(
    suite: &mut Suite,
    proxies: &[&Running],
    n: usize,
    latency_ms: u64,
    rate: f64,
    guard: f64,
) -> Result<BurstResult> {
    suite.sim.configure(latency_ms, 1000).await?;
    suite.sim.reset().await?;
    let bases: Vec<String> = proxies.iter().map(|p| p.base.clone()).collect();
    let mut calls_before = Vec::new();
    for b in &bases {
        let m = scrape(&suite.client, b).await?;
        calls_before.push((
            m.sum("score_proxy_upstream_calls_total", &[]),
            bookings(&m),
            unused_slots(&m),
        ));
    }
    let cpfs = next_cpfs(n);
    let (launched, samples, drops) = fire_spread(&bases, &cpfs, Duration::from_secs(120)).await;
    // Every answer is in, so every call has arrived; let a last answer be recorded.
    tokio::time::sleep(Duration::from_millis(50)).await;
    let stats = suite.sim.stats().await?;
    let mut calls_by_proxy = Vec::new();
    let mut unused: BTreeMap<String, f64> = BTreeMap::new();
    for (b, (calls0, books0, unused0)) in bases.iter().zip(calls_before) {
        let m = scrape(&suite.client, b).await?;
        calls_by_proxy.push((
            m.sum("score_proxy_upstream_calls_total", &[]) - calls0,
            bookings(&m) - books0,
        ));
        for (reason, n) in unused_slots(&m) {
            let d = n - unused0.get(&reason).copied().unwrap_or(0.0);
            if d > 0.0 {
                *unused.entry(reason).or_default() += d;
            }
        }
    }
    let st = statuses(&samples);
    let ok: Vec<&Sample> = samples.iter().filter(|s| s.status() == Some(200)).collect();
    let served = ok.len();
    let honest_429 = samples
        .iter()
        .filter(|s| s.status() == Some(429) && s.retry_after.is_some())
        .count();
    let wall_ok = ok.iter().map(|s| s.end).fold(launched, f64::max) - launched;
    let latency = latency_ms as f64 / 1000.0;
    let ideal = served.saturating_sub(1) as f64 / rate + latency;
    let bound = served.saturating_sub(1) as f64 * (1.0 / rate + guard) + latency + 0.050;
    let ats: Vec<f64> = stats.arrivals.iter().map(|a| a.at.as_secs_f64()).collect();
    let pace = if ats.len() >= 2 {
        let span = ats.iter().cloned().fold(f64::MIN, f64::max)
            - ats.iter().cloned().fold(f64::MAX, f64::min);
        (ats.len() - 1) as f64 / span
    } else {
        f64::NAN
    };
    let distinct_called = stats
        .arrivals
        .iter()
        .map(|a| a.cpf.as_str())
        .collect::<std::collections::HashSet<_>>()
        .len();
    Ok(BurstResult {
        statuses: st,
        served,
        honest_429,
        wall_ok,
        ideal,
        bound,
        calls: stats.calls,
        distinct_called,
        violations: stats.violations,
        pace,
        min_gap: stats.min_gap_seconds,
        drops,
        calls_by_proxy,
        unused,
        samples,
    })
}
