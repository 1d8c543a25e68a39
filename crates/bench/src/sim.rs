//! The upstream simulator (`score-sim`, a child process): configured and reset between runs
//! through its control endpoints, its record of arrivals read back, and its clock aligned
//! with the harness's so that an arrival can be compared with a client's give-up time.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use score_sim::SimStats;

use crate::client::{CLIENT_ID, next_cpfs, wait_ready};
use crate::now_s;
use crate::procs::{Proc, Workspace, free_port};

pub(crate) struct Sim {
    pub(crate) base: String,
    pub(crate) port: u16,
    pub(crate) client: reqwest::Client,
    /// Simulator clock minus harness clock ([`now_s`]), in seconds.
    offset: f64,
    /// Half the round trip of the probe that measured `offset`: its uncertainty.
    pub(crate) offset_error: f64,
    pub(crate) proc: Proc,
}

impl Sim {
    /// Starts `score-sim` on a free port, logging to `log` in the run's directory (one file
    /// per simulator: scenario 8 runs one per contender).
    pub(crate) async fn start(
        bin: &Path,
        ws: &Workspace,
        client: &reqwest::Client,
        log: &str,
    ) -> Result<Sim> {
        let port = free_port()?;
        let mut cmd = Command::new(bin);
        cmd.env_clear()
            .env("RUST_LOG", "off")
            .args(["--listen", &format!("127.0.0.1:{port}")]);
        let mut proc = Proc::spawn("the upstream simulator", cmd, ws.dir.join(log), false)?;
        let base = format!("http://127.0.0.1:{port}");
        wait_ready(client, &format!("{base}/health"), &mut proc).await?;
        let mut sim = Sim {
            base,
            port,
            client: client.clone(),
            offset: 0.0,
            offset_error: 0.0,
            proc,
        };
        sim.measure_offset().await?;
        Ok(sim)
    }

    /// Aligns the simulator's arrival clock with ours: five direct probe calls, keeping the
    /// one with the shortest round trip (its arrival is stamped between send and answer).
    async fn measure_offset(&mut self) -> Result<()> {
        self.configure(0, 0).await?;
        let mut best: Option<(f64, f64)> = None;
        for cpf in next_cpfs(5) {
            self.reset().await?;
            let t0 = now_s();
            let resp = self
                .client
                .get(format!("{}/api/score?cpf={cpf}", self.base))
                .header("client-id", CLIENT_ID)
                .send()
                .await?;
            ensure!(resp.status() == 200, "simulator probe: {}", resp.status());
            let t1 = now_s();
            let stats = self.stats().await?;
            let at = stats
                .arrivals
                .iter()
                .find(|a| a.cpf == cpf)
                .context("the probe's arrival is not in the simulator's record")?
                .at
                .as_secs_f64();
            let rtt = t1 - t0;
            if best.is_none_or(|(r, _)| rtt < r) {
                best = Some((rtt, at - (t0 + t1) / 2.0));
            }
        }
        let (rtt, offset) = best.context("no probe")?;
        self.offset = offset;
        self.offset_error = rtt / 2.0;
        self.reset().await
    }

    /// The strict contract on loopback: no network delay, whatever an earlier run set.
    pub(crate) async fn configure(&self, latency_ms: u64, min_interval_ms: u64) -> Result<()> {
        self.configure_network(latency_ms, min_interval_ms, "none", 0)
            .await
    }

    /// As [`Sim::configure`], with a one-way `arrival_delay` before the simulator counts an
    /// arrival (`score-sim`'s syntax: `uniform:0ms..30ms`, `spikes:0ms..3ms,5%,150ms`), drawn
    /// from `seed`. The sequence restarts from the seed at every [`Sim::reset`].
    pub(crate) async fn configure_network(
        &self,
        latency_ms: u64,
        min_interval_ms: u64,
        arrival_delay: &str,
        seed: u64,
    ) -> Result<()> {
        let body = serde_json::json!({
            "latency_ms": latency_ms,
            "min_interval_ms": min_interval_ms,
            "penalty_ms": 2000,
            "fault": "none",
            "arrival_delay": arrival_delay,
            "seed": seed,
        });
        let resp = self
            .client
            .put(format!("{}/__sim/config", self.base))
            .header("content-type", "application/json")
            .body(body.to_string())
            .send()
            .await?;
        ensure!(
            resp.status() == 200,
            "configuring the simulator: {}",
            resp.status()
        );
        Ok(())
    }

    pub(crate) async fn reset(&self) -> Result<()> {
        let resp = self
            .client
            .post(format!("{}/__sim/reset", self.base))
            .send()
            .await?;
        ensure!(
            resp.status().is_success(),
            "simulator reset: {}",
            resp.status()
        );
        Ok(())
    }

    pub(crate) async fn stats(&self) -> Result<SimStats> {
        let resp = self
            .client
            .get(format!("{}/__sim/stats", self.base))
            .send()
            .await?;
        ensure!(resp.status() == 200, "simulator stats: {}", resp.status());
        let body = resp.bytes().await?;
        serde_json::from_slice(&body).context("parsing /__sim/stats")
    }

    /// Arrivals since the last reset, without the list of them: cheap enough to poll while
    /// a burst runs (scenario 9 stops Redis after the first few calls).
    pub(crate) async fn calls(&self) -> Result<u64> {
        let resp = self
            .client
            .get(format!("{}/__sim/stats?arrivals=false", self.base))
            .send()
            .await?;
        ensure!(resp.status() == 200, "simulator stats: {}", resp.status());
        let body = resp.bytes().await?;
        let stats: SimStats = serde_json::from_slice(&body).context("parsing /__sim/stats")?;
        Ok(stats.calls)
    }

    /// An arrival's time on the harness clock.
    pub(crate) fn to_harness(&self, at: Duration) -> f64 {
        at.as_secs_f64() - self.offset
    }
}
