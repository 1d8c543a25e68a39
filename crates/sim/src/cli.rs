//! Arguments of `score-sim`, which runs the simulator on its own so
//! that scripts, benchmarks and the original Python proxy can be pointed at it.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::time::Duration;

use super::config::{Fault, RetryAfterMode, SimulatorConfig};
use super::delay::ArrivalDelay;

/// Every setting has a flag and an environment variable; durations take humantime
/// syntax (`1s`, `250ms`, `1m 30s`).
#[derive(Clone, Debug, PartialEq, Eq, clap::Args)]
pub struct SimulateArgs {
    /// Address to listen on.
    #[arg(long, env = "SIM_LISTEN", default_value = "127.0.0.1:9000")]
    pub listen: SocketAddr,

    /// An arrival sooner than this after the previous one gets 429 and a penalty
    /// (0s turns the rate rule off).
    #[arg(long, env = "SIM_MIN_INTERVAL", default_value = "1s", value_parser = humantime::parse_duration)]
    pub min_interval: Duration,

    /// How long a violation makes every later arrival fail with 429.
    #[arg(long, env = "SIM_PENALTY", default_value = "2s", value_parser = humantime::parse_duration)]
    pub penalty: Duration,

    /// Delay before every answer (a large one simulates a slow upstream).
    #[arg(long, env = "SIM_LATENCY", default_value = "0ms", value_parser = humantime::parse_duration)]
    pub latency: Duration,

    /// How the upstream misbehaves on calls that are not rate violations.
    #[arg(long, env = "SIM_FAULT", default_value = "none")]
    pub fault: Fault,

    /// Apply the fault only to every Nth call (default: every call).
    #[arg(long, env = "SIM_FAIL_EVERY", value_parser = clap::value_parser!(u32).range(1..))]
    pub fail_every: Option<u32>,

    /// Whether 429 answers carry a Retry-After header, and in which form.
    #[arg(long, env = "SIM_RETRY_AFTER", default_value = "none")]
    pub retry_after: RetryAfterMode,

    /// Comma-separated client ids to accept (default: any non-empty id).
    #[arg(long, env = "SIM_CLIENT_IDS", value_delimiter = ',')]
    pub client_ids: Vec<String>,

    /// One-way network delay before an arrival is counted (the rate rule judges the
    /// delayed arrival): `none`, `uniform:MIN..MAX` (e.g. `uniform:0ms..30ms`), or
    /// `spikes:MIN..MAX,PERCENT%,SPIKE` (uniform in the range, except that PERCENT of
    /// calls are delayed by SPIKE, e.g. `spikes:0ms..3ms,5%,150ms`).
    #[arg(long, env = "SIM_ARRIVAL_DELAY", default_value = "none")]
    pub arrival_delay: ArrivalDelay,

    /// Seed of the generator the delays are drawn from: the same seed, the same delays.
    #[arg(long, env = "SIM_SEED", default_value_t = 0)]
    pub seed: u64,
}

impl SimulateArgs {
    /// The simulator configuration these arguments describe. `listen` is not part of it:
    /// read it before calling this.
    pub fn into_config(self) -> SimulatorConfig {
        let ids: HashSet<String> = self
            .client_ids
            .into_iter()
            .map(|id| id.trim().to_owned())
            .filter(|id| !id.is_empty())
            .collect();
        SimulatorConfig {
            min_interval: self.min_interval,
            penalty: self.penalty,
            latency: self.latency,
            fault: self.fault,
            fail_every: self.fail_every,
            retry_after: self.retry_after,
            client_ids: (!ids.is_empty()).then_some(ids),
            arrival_delay: self.arrival_delay,
            seed: self.seed,
        }
    }
}
