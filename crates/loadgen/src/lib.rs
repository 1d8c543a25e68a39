//! The load generator: traffic that makes every panel of the observability stack show
//! something, and a deterministic tour of every outcome for the end-to-end check.
//!
//! Two modes:
//! - **continuous** (`docker compose up`): a steady, seeded mix of repeated CPFs (cache
//!   hits), new ones (misses that spend upstream budget), identical concurrent lookups
//!   (coalesced), bad inputs (`400`), an id the upstream rejects (`401`), impatient clients
//!   that hang up while queued (abandoned), and periodic bursts of distinct lookups larger
//!   than the queue (refusals). With `--sim-url` and `--chaos-every` it also makes the
//!   simulator fail for a few seconds now and then. It runs for `--duration`, or until
//!   SIGINT/SIGTERM, and returns what it counted.
//! - **once** (`score-proxy loadgen --mode once`): drives each outcome at least once, in a
//!   fixed order, each within `--step-timeout`, and reports any it could not provoke in
//!   [`LoadgenReport::missing`]. Outcomes that need the upstream to misbehave (5xx, garbage,
//!   timeout, penalty) need `--sim-url`, and one (an unused pacer slot) can only
//!   be seen on the proxy's `/metrics`; without them they are listed in
//!   [`LoadgenReport::skipped`].
//!
//! Sizes come from the proxy itself (`/status` gives the queue's capacity and the pacing
//! interval), so the same command works against the fast settings of the tests and the
//! real 1 call/s of the compose stack.
//!
//! **Several targets** (`--target a,b,c`, e.g. the replicas of a fleet): requests go to them
//! in turn (round-robin), bursts are scaled by the number of targets so that each one still
//! sees more than its queue holds, a lookup repeated to provoke a hit or an unused slot goes
//! to the same target as the lookup it repeats, and the proxies' counters are summed over
//! every target. The targets are expected to share one upstream (the one `--sim-url`
//! controls): one fleet behind one budget, or proxies that each have their own.
//!
//! Like everything else here, it never logs a CPF or a client id: progress lines carry
//! counts only, and the report is keyed by status code and outcome name.
//!
//! Modules: `args` (flags and variables), `generator` (the HTTP side: targets in turn,
//! answers classified and counted, the proxy's `/status`), `mix` (the CPFs and inputs the
//! traffic is made of, and its seeded randomness), `continuous` and `once` (the two modes),
//! `metrics` (the proxies' counters, read from `/metrics`), `sim` (the simulator's control
//! endpoint) and `report` (what a run counted).
#![forbid(unsafe_code)]

mod args;
mod continuous;
mod generator;
mod metrics;
mod mix;
mod once;
mod report;
mod sim;

use std::time::Duration;

use anyhow::bail;
use tokio::time::Instant;

pub use args::{LoadgenArgs, LoadgenMode};
pub use report::LoadgenReport;

use generator::Generator;

/// Runs the generator as `args.mode` says and returns what it counted.
pub async fn run(args: LoadgenArgs) -> anyhow::Result<LoadgenReport> {
    if args.target.is_empty() {
        bail!("--target: at least one proxy URL is needed");
    }
    if args.client_ids.iter().all(|c| c.trim().is_empty()) {
        bail!("--client-ids: at least one client id is needed");
    }
    if !(args.rate.is_finite() && args.rate > 0.0 && args.rate <= 10_000.0) {
        bail!("--rate: must be more than 0 and at most 10000 per second");
    }
    let generator = Generator::new(&args)?;
    let started = Instant::now();
    generator.wait_until_up(Duration::from_secs(30)).await?;
    let (missing, skipped) = match args.mode {
        LoadgenMode::Once => generator.once(&args).await?,
        LoadgenMode::Continuous => {
            generator.continuous(&args).await?;
            (Vec::new(), Vec::new())
        }
    };
    let tally = generator
        .tally
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    Ok(LoadgenReport {
        mode: args.mode.as_str(),
        elapsed_seconds: started.elapsed().as_secs_f64(),
        requests: tally.requests,
        by_status: tally.by_status,
        by_target: tally.by_target,
        by_outcome: tally.by_outcome,
        hung_up: tally.hung_up,
        transport_errors: tally.transport_errors,
        missing,
        skipped,
    })
}
