//! The command line of `score-loadgen` (and of `score-proxy loadgen`): every setting has a
//! flag and a `LOADGEN_*` variable.

use std::time::Duration;

use url::Url;

/// How the generator drives the proxy.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum LoadgenMode {
    /// A realistic mix, until `--duration` or a signal.
    Continuous,
    /// Every outcome at least once, then a report.
    Once,
}

impl LoadgenMode {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            LoadgenMode::Continuous => "continuous",
            LoadgenMode::Once => "once",
        }
    }
}

/// Arguments of `score-proxy loadgen`. Every setting has a flag and a `LOADGEN_*` variable.
#[derive(clap::Args, Debug, Clone)]
pub struct LoadgenArgs {
    /// Base URL of the proxy; several, comma-separated (e.g. the replicas of a fleet), get
    /// the requests in turn.
    #[arg(
        long,
        env = "LOADGEN_TARGET",
        value_delimiter = ',',
        default_value = "http://127.0.0.1:8000"
    )]
    pub target: Vec<Url>,
    /// Client ids the upstream accepts, comma-separated; lookups are spread over them.
    #[arg(
        long,
        env = "LOADGEN_CLIENT_IDS",
        value_delimiter = ',',
        default_value = "000,001,002,003"
    )]
    pub client_ids: Vec<String>,
    /// A client id the upstream rejects (provokes `401`).
    #[arg(long, env = "LOADGEN_BAD_CLIENT_ID", default_value = "unknown-client")]
    pub bad_client_id: String,
    /// How long to run (default: until stopped; `once` ignores it).
    #[arg(long, env = "LOADGEN_DURATION", value_parser = humantime::parse_duration)]
    pub duration: Option<Duration>,
    /// `continuous` (a realistic mix) or `once` (every outcome once, then a report).
    #[arg(long, env = "LOADGEN_MODE", value_enum, default_value_t = LoadgenMode::Continuous)]
    pub mode: LoadgenMode,
    /// Base URL of the upstream simulator, whose `/__sim/config` makes it fail on purpose.
    /// Leave unset in front of the real API.
    #[arg(long, env = "LOADGEN_SIM_URL")]
    pub sim_url: Option<Url>,
    /// Continuous mode: lookups per second of the steady mix (bursts come on top).
    #[arg(long, env = "LOADGEN_RATE", default_value_t = 3.0)]
    pub rate: f64,
    /// Continuous mode: how often a burst of distinct lookups larger than the queue arrives.
    #[arg(long, env = "LOADGEN_BURST_EVERY", default_value = "60s", value_parser = humantime::parse_duration)]
    pub burst_every: Duration,
    /// Continuous mode with --sim-url: how often the simulator fails for a few seconds
    /// (error, garbage, hang in turn); 0s never.
    #[arg(long, env = "LOADGEN_CHAOS_EVERY", default_value = "0s", value_parser = humantime::parse_duration)]
    pub chaos_every: Duration,
    /// Seed of the mix: the same seed sends the same sequence of choices.
    #[arg(long, env = "LOADGEN_SEED", default_value_t = 1)]
    pub seed: u64,
    /// How long a patient client waits for an answer.
    #[arg(long, env = "LOADGEN_REQUEST_TIMEOUT", default_value = "60s", value_parser = humantime::parse_duration)]
    pub request_timeout: Duration,
    /// Once mode: how long each outcome may take to appear.
    #[arg(long, env = "LOADGEN_STEP_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration)]
    pub step_timeout: Duration,
    /// Most requests open at once.
    #[arg(long, env = "LOADGEN_MAX_IN_FLIGHT", default_value_t = 256)]
    pub max_in_flight: usize,
}
