//! Cache-hit load from `wrk` with `bench/wrk.lua` (scenarios 3 and 5): one run and its
//! summary, the server's CPU time per request, and the rounds' figures.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, ensure};

use crate::procs::{Proc, Workspace, on_path};
use crate::{Plan, manifest_dir};

#[derive(Clone, Debug, serde::Deserialize)]
pub(crate) struct WrkResult {
    pub(crate) requests: u64,
    duration_us: u64,
    errors_connect: u64,
    errors_read: u64,
    errors_write: u64,
    errors_status: u64,
    errors_timeout: u64,
    pub(crate) p50_us: u64,
    pub(crate) p99_us: u64,
    pub(crate) p999_us: u64,
    /// Server-side CPU time per request (filled in by [`run_wrk`], not by wrk).
    #[serde(default)]
    pub(crate) cpu_us: f64,
}

impl WrkResult {
    pub(crate) fn rps(&self) -> f64 {
        self.requests as f64 / (self.duration_us as f64 / 1e6)
    }
    pub(crate) fn errors(&self) -> u64 {
        self.errors_connect
            + self.errors_read
            + self.errors_write
            + self.errors_status
            + self.errors_timeout
    }
}

/// One wrk run; also measures the CPU time that `server` (and its children) spent on it.
pub(crate) fn run_wrk(
    plan: &Plan,
    base: &str,
    keys_file: &Path,
    server: &Proc,
) -> Result<WrkResult> {
    let cpu_before = server.cpu_seconds();
    let wrk = on_path("wrk").context("wrk is not installed (apt-get install -y wrk)")?;
    let script = manifest_dir().join("bench/wrk.lua");
    let out = Command::new(wrk)
        .env("BENCH_KEYS", keys_file)
        .arg(format!("-t{}", plan.wrk_threads))
        .arg(format!("-c{}", plan.wrk_connections))
        .arg(format!("-d{}s", plan.wrk_seconds))
        .arg("-s")
        .arg(&script)
        .arg(base)
        .output()
        .context("running wrk")?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.success(),
        "wrk failed: {}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let line = stdout
        .lines()
        .rev()
        .find(|l| l.starts_with('{'))
        .with_context(|| format!("no summary line in wrk's output:\n{stdout}"))?;
    let mut result: WrkResult =
        serde_json::from_str(line).with_context(|| format!("parsing wrk's summary {line}"))?;
    result.cpu_us = (server.cpu_seconds() - cpu_before) * 1e6 / result.requests.max(1) as f64;
    Ok(result)
}

pub(crate) struct Hits {
    /// Requests served over all rounds.
    pub(crate) requests: u64,
    pub(crate) rps: Vec<f64>,
    pub(crate) p50: Vec<f64>,
    pub(crate) p99: Vec<f64>,
    pub(crate) p999: Vec<f64>,
    pub(crate) cpu_us: Vec<f64>,
}

impl Hits {
    pub(crate) fn new() -> Self {
        Hits {
            requests: 0,
            rps: vec![],
            p50: vec![],
            p99: vec![],
            p999: vec![],
            cpu_us: vec![],
        }
    }
    pub(crate) fn add(&mut self, r: &WrkResult) {
        self.requests += r.requests;
        self.cpu_us.push(r.cpu_us);
        self.rps.push(r.rps());
        self.p50.push(r.p50_us as f64 / 1e6);
        self.p99.push(r.p99_us as f64 / 1e6);
        self.p999.push(r.p999_us as f64 / 1e6);
    }
}

pub(crate) fn write_keys(ws: &Workspace, name: &str, paths: &[String]) -> Result<PathBuf> {
    let p = ws.dir.join(name);
    fs::write(&p, paths.join("\n") + "\n")?;
    Ok(p)
}

/// The flags of every proxy instance that is warmed through a fast upstream.
pub(crate) const FAST_PROXY: [&str; 6] = [
    "--rate",
    "1000",
    "--rate-guard",
    "0ms",
    "--queue-capacity",
    "1000",
];
