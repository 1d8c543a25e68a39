//! Command line, environment, and the checks that run before any port is bound.
//!
//! Every setting is a flag and an environment variable with a default ([`defaults`] holds
//! them all). clap collects the proxy's settings as text, so that a bad value is not the end
//! of the reading; [`ServeArgs::validate`] then converts every one and reports **all**
//! problems at once (a deploy that fails should say everything that is wrong, not one thing
//! per attempt). `main` exits with status 2 on any of them.
//!
//! - this file: the command line ([`Cli`], [`ServeArgs`]) and what validation yields
//!   ([`Config`], [`ConfigProblem`]);
//! - `parse`: one small parser per kind of value (address, URL, rate, count, duration, ...),
//!   each returning a typed value or a message that quotes the text;
//! - `checks`: [`ServeArgs::validate`], which runs every setting through its parser, adds the
//!   checks that involve two settings, and builds the [`Config`] once nothing is wrong.

use std::net::SocketAddr;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use url::Url;

use crate::lookup::validation::ClientId;
use crate::store::DataKey;
use crate::telemetry::{LogFormat, OtelSettings};

mod checks;
mod parse;

/// The defaults, in one place (the README's table repeats them).
pub(crate) mod defaults {
    pub(crate) const LISTEN: &str = "0.0.0.0:8000";
    pub(crate) const UPSTREAM_URL: &str = "https://score.hsborges.dev/api/score";
    pub(crate) const RATE: &str = "1";
    pub(crate) const RATE_GUARD: &str = "10ms";
    pub(crate) const RATE_GUARD_MAX: &str = "100ms";
    pub(crate) const QUEUE_CAPACITY: &str = "20";
    pub(crate) const QUEUE_TIMEOUT: &str = "30s";
    pub(crate) const CACHE_TTL: &str = "300s";
    pub(crate) const CACHE_MAX_ENTRIES: &str = "100000";
    pub(crate) const UPSTREAM_TIMEOUT: &str = "10s";
    pub(crate) const UPSTREAM_MAX_IN_FLIGHT: &str = "16";
    pub(crate) const UPSTREAM_PENALTY: &str = "2s";
    pub(crate) const SHUTDOWN_GRACE: &str = "10s";
    pub(crate) const STALE_IF_ERROR: &str = "0s";
    pub(crate) const STALE_WHILE_REVALIDATE: &str = "0s";
    pub(crate) const REFRESH_AHEAD: &str = "0s";
    pub(crate) const JOB_MAX_ITEMS: &str = "10000";
    pub(crate) const JOBS_PER_CLIENT: &str = "3";
    pub(crate) const JOB_RETENTION: &str = "24h";
    pub(crate) const BREAKER_FAILURES: &str = "5";
    pub(crate) const BREAKER_COOLDOWN: &str = "30s";
    pub(crate) const MAX_CONNECTIONS: &str = "10000";
    pub(crate) const HEADER_READ_TIMEOUT: &str = "10s";
    pub(crate) const REDIS_TIMEOUT: &str = "100ms";
    pub(crate) const REDIS_PREFIX: &str = "score-proxy";
    pub(crate) const EXPECTED_REPLICAS: &str = "3";
    pub(crate) const PUBLIC_METRICS: &str = "true";
    pub(crate) const METRICS: &str = "true";
    pub(crate) const LOG_FORMAT: &str = "text";
    pub(crate) const HEALTHCHECK_URL: &str = "http://127.0.0.1:8000/health";
    pub(crate) const HEALTHCHECK_TIMEOUT: &str = "2s";
    pub(crate) const DEMO_UPSTREAM_LATENCY: &str = "150ms";
}

#[derive(Parser, Debug)]
#[command(
    name = "score-proxy",
    version,
    about = "A paced, cached, coalescing proxy in front of a rate-limited credit-score API",
    args_conflicts_with_subcommands = true,
    args_override_self = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    /// Settings of the proxy (when no subcommand is given, `serve` is implied).
    #[command(flatten)]
    pub serve: ServeArgs,
}

// Parsed once at start-up: the size of the largest variant costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the proxy (the default).
    Serve(ServeArgs),
    /// Run the proxy on :8000 against an in-process simulator: a working proxy offline.
    #[cfg(feature = "demo")]
    Demo(DemoArgs),
    /// Exit 0 if the proxy's /health answers 200 (for container health checks: the image
    /// has no curl).
    Healthcheck(HealthcheckArgs),
    /// Submit a file of CPFs as a bulk job to a running proxy, show its progress, and write
    /// its results as they come (Ctrl-C leaves the job running: resume with --resume).
    Batch(BatchArgs),
}

#[derive(Args, Debug, Clone)]
pub struct BatchArgs {
    /// The file of CPFs, one per line (`-` for standard input); not with --resume.
    #[arg(required_unless_present = "resume", conflicts_with = "resume")]
    pub file: Option<std::path::PathBuf>,
    /// The proxy's base URL.
    #[arg(long, default_value = "http://127.0.0.1:8000")]
    pub proxy: String,
    /// The client id the job runs under (and that can read it).
    #[arg(long, env = "SCORE_PROXY_BATCH_CLIENT_ID")]
    pub client_id: String,
    /// Where to write the results (standard output if absent).
    #[arg(long)]
    pub out: Option<std::path::PathBuf>,
    /// `csv` or `ndjson`; by default csv for an --out ending in .csv, else ndjson.
    #[arg(long, value_parser = ["csv", "ndjson"])]
    pub format: Option<String>,
    /// Follow a job submitted before (its id), instead of submitting a file.
    #[arg(long)]
    pub resume: Option<String>,
}

#[derive(Args, Debug, Clone)]
pub struct HealthcheckArgs {
    /// The URL to probe.
    #[arg(
        long,
        env = "SCORE_PROXY_HEALTHCHECK_URL",
        default_value = defaults::HEALTHCHECK_URL
    )]
    pub url: String,
    /// How long to wait for the answer.
    #[arg(
        long,
        default_value = defaults::HEALTHCHECK_TIMEOUT,
        value_parser = humantime::parse_duration
    )]
    pub timeout: Duration,
}

#[derive(Args, Debug, Clone)]
pub struct DemoArgs {
    /// Simulated upstream latency.
    #[arg(
        long,
        default_value = defaults::DEMO_UPSTREAM_LATENCY,
        value_parser = humantime::parse_duration
    )]
    pub upstream_latency: Duration,
    /// Proxy settings (the upstream URL is replaced by the simulator's).
    #[command(flatten)]
    pub serve: ServeArgs,
}

/// Every setting of the proxy, as given (validated by [`ServeArgs::validate`]).
#[derive(Args, Debug, Clone)]
pub struct ServeArgs {
    /// Address to listen on.
    #[arg(long, env = "SCORE_PROXY_LISTEN", default_value = defaults::LISTEN)]
    pub(crate) listen: String,
    /// The score API's address.
    #[arg(long, env = "SCORE_PROXY_UPSTREAM_URL", default_value = defaults::UPSTREAM_URL)]
    pub(crate) upstream_url: String,
    /// Upstream calls per second allowed, for all callers together.
    #[arg(long = "rate", env = "SCORE_PROXY_RATE_PER_SECOND", default_value = defaults::RATE)]
    pub(crate) rate_per_second: String,
    /// Added to 1/rate between call starts, to absorb clock and network jitter: the
    /// floor of the guard, which rises above it with the spread of the upstream's round
    /// trips and after a penalty.
    #[arg(long, env = "SCORE_PROXY_RATE_GUARD", default_value = defaults::RATE_GUARD)]
    pub(crate) rate_guard: String,
    /// The ceiling of the learned guard (equal to --rate-guard: a fixed guard).
    #[arg(long, env = "SCORE_PROXY_RATE_GUARD_MAX", default_value = defaults::RATE_GUARD_MAX)]
    pub(crate) rate_guard_max: String,
    /// Most distinct lookups that may wait for upstream budget.
    #[arg(long, env = "SCORE_PROXY_QUEUE_CAPACITY", default_value = defaults::QUEUE_CAPACITY)]
    pub(crate) queue_capacity: String,
    /// Longest a lookup may wait for its upstream call to start.
    #[arg(long, env = "SCORE_PROXY_QUEUE_TIMEOUT", default_value = defaults::QUEUE_TIMEOUT)]
    pub(crate) queue_timeout: String,
    /// How long a score is served from the cache.
    #[arg(long, env = "SCORE_PROXY_CACHE_TTL", default_value = defaults::CACHE_TTL)]
    pub(crate) cache_ttl: String,
    /// Most entries the cache holds.
    #[arg(long, env = "SCORE_PROXY_CACHE_MAX_ENTRIES", default_value = defaults::CACHE_MAX_ENTRIES)]
    pub(crate) cache_max_entries: String,
    /// Longest an upstream call may take, body included.
    #[arg(long, env = "SCORE_PROXY_UPSTREAM_TIMEOUT", default_value = defaults::UPSTREAM_TIMEOUT)]
    pub(crate) upstream_timeout: String,
    /// Most upstream calls open at once (calls overlap when the upstream is slow).
    #[arg(long, env = "SCORE_PROXY_UPSTREAM_MAX_IN_FLIGHT", default_value = defaults::UPSTREAM_MAX_IN_FLIGHT)]
    pub(crate) upstream_max_in_flight: String,
    /// Penalty assumed after a 429 without a usable Retry-After.
    #[arg(long, env = "SCORE_PROXY_UPSTREAM_PENALTY", default_value = defaults::UPSTREAM_PENALTY)]
    pub(crate) upstream_penalty: String,
    /// Client id used when a lookup gives none (SCORE_PROXY_CLIENT_ID, else CLIENT_ID).
    #[arg(long, env = "SCORE_PROXY_CLIENT_ID")]
    pub(crate) client_id: Option<String>,
    /// How long past the TTL an answer may still be served when the upstream fails
    /// (X-Cache: STALE); 0s turns stale-if-error off.
    #[arg(long, env = "SCORE_PROXY_STALE_IF_ERROR", default_value = defaults::STALE_IF_ERROR)]
    pub(crate) stale_if_error: String,
    /// How long past the TTL an answer is still served at once (X-Cache: STALE) while one
    /// background refresh fetches it again; 0s turns stale-while-revalidate off.
    #[arg(long, env = "SCORE_PROXY_STALE_WHILE_REVALIDATE", default_value = defaults::STALE_WHILE_REVALIDATE)]
    pub(crate) stale_while_revalidate: String,
    /// Refresh-ahead: when no caller needs the budget, refetch the most-hit entries that
    /// are within this long of their TTL, so hot keys stop missing at the boundary; 0s
    /// turns it off.
    #[arg(long, env = "SCORE_PROXY_REFRESH_AHEAD", default_value = defaults::REFRESH_AHEAD)]
    pub(crate) refresh_ahead: String,
    /// Most CPFs in one bulk job (`POST /jobs`).
    #[arg(long, env = "SCORE_PROXY_JOB_MAX_ITEMS", default_value = defaults::JOB_MAX_ITEMS)]
    pub(crate) job_max_items: String,
    /// Most bulk jobs one client id may have queued or running at once.
    #[arg(long, env = "SCORE_PROXY_JOBS_PER_CLIENT", default_value = defaults::JOBS_PER_CLIENT)]
    pub(crate) jobs_per_client: String,
    /// How long a finished or cancelled job and its results stay readable.
    #[arg(long, env = "SCORE_PROXY_JOB_RETENTION", default_value = defaults::JOB_RETENTION)]
    pub(crate) job_retention: String,
    /// Consecutive upstream failures that open the circuit breaker (0 disables it).
    #[arg(long, env = "SCORE_PROXY_BREAKER_FAILURES", default_value = defaults::BREAKER_FAILURES)]
    pub(crate) breaker_failures: String,
    /// How long an open circuit breaker refuses lookups before letting one probe through.
    #[arg(long, env = "SCORE_PROXY_BREAKER_COOLDOWN", default_value = defaults::BREAKER_COOLDOWN)]
    pub(crate) breaker_cooldown: String,
    /// Most client connections open at once on the main listener; beyond it, new connections
    /// get a 503 and are closed.
    #[arg(long, env = "SCORE_PROXY_MAX_CONNECTIONS", default_value = defaults::MAX_CONNECTIONS)]
    pub(crate) max_connections: String,
    /// Longest a client may take to send a request head (slow clients, idle keep-alive).
    #[arg(long, env = "SCORE_PROXY_HEADER_READ_TIMEOUT", default_value = defaults::HEADER_READ_TIMEOUT)]
    pub(crate) header_read_timeout: String,
    /// Redis shared by several replicas (schedule, penalty, cache, coalescing); unset: this
    /// process paces alone.
    #[arg(long, env = "SCORE_PROXY_REDIS_URL")]
    pub(crate) redis_url: Option<String>,
    /// Longest a Redis operation may take before the replica falls back to pacing alone.
    #[arg(long, env = "SCORE_PROXY_REDIS_TIMEOUT", default_value = defaults::REDIS_TIMEOUT)]
    pub(crate) redis_timeout: String,
    /// Prefix of every Redis key (several fleets can share one Redis).
    #[arg(long, env = "SCORE_PROXY_REDIS_PREFIX", default_value = defaults::REDIS_PREFIX)]
    pub(crate) redis_prefix: String,
    /// Replicas sharing the budget: without Redis each paces at rate / this.
    #[arg(long, env = "SCORE_PROXY_EXPECTED_REPLICAS", default_value = defaults::EXPECTED_REPLICAS)]
    pub(crate) expected_replicas: String,
    /// This replica's place among the expected replicas (0 to expected - 1: a StatefulSet
    /// ordinal, a compose service number), for a replica that starts while Redis is down;
    /// with Redis, replicas lease their places and this is only a preference.
    #[arg(long, env = "SCORE_PROXY_REPLICA_INDEX")]
    pub(crate) replica_index: Option<String>,
    /// On SIGTERM/Ctrl-C, how long queued and running lookups get to finish.
    #[arg(long, env = "SCORE_PROXY_SHUTDOWN_GRACE", default_value = defaults::SHUTDOWN_GRACE)]
    pub(crate) shutdown_grace: String,
    /// A second listener for /metrics, /health, /ready and /status (operators only).
    #[arg(long, env = "SCORE_PROXY_ADMIN_LISTEN")]
    pub(crate) admin_listen: Option<String>,
    /// Serve /metrics on the main listener too (set false when an admin listener serves it).
    #[arg(long, env = "SCORE_PROXY_PUBLIC_METRICS", default_value = defaults::PUBLIC_METRICS)]
    pub(crate) public_metrics: String,
    /// Record per-request metrics (false only to measure what telemetry costs).
    #[arg(long, env = "SCORE_PROXY_METRICS", default_value = defaults::METRICS)]
    pub(crate) metrics: String,
    /// Log line format: text or json.
    #[arg(long, env = "SCORE_PROXY_LOG_FORMAT", default_value = defaults::LOG_FORMAT)]
    pub(crate) log_format: String,
    /// Secret for the keyed hash that stands in for CPFs and client ids in logs and spans
    /// (random per process when unset).
    #[arg(long, env = "SCORE_PROXY_REDACTION_KEY", hide_env_values = true)]
    pub(crate) redaction_key: Option<String>,
    /// Directory of the persistent cache (cached answers survive restarts); unset or empty:
    /// memory only (`demo` defaults to a per-user directory).
    #[arg(long, env = "SCORE_PROXY_DATA_DIR")]
    pub(crate) data_dir: Option<String>,
    /// Turns the persistent cache off even when a data directory is set.
    #[arg(
        long,
        env = "SCORE_PROXY_NO_PERSIST",
        default_value = "false",
        num_args = 0..=1,
        default_missing_value = "true"
    )]
    pub(crate) no_persist: String,
    /// Key sealing the persistent cache (32 bytes, as 64 hex digits or base64); unset: one
    /// is generated on first start and kept in the data directory (store.key, mode 0600).
    #[arg(long, env = "SCORE_PROXY_DATA_KEY", hide_env_values = true)]
    pub(crate) data_key: Option<String>,
}

impl ServeArgs {
    /// `demo`'s default data directory, when none is given: the per-user state directory
    /// (`$XDG_STATE_HOME/score-proxy`, else `~/.local/state/score-proxy`), else one in the
    /// temporary directory. A demo's cache then survives its restarts, as a real one does.
    pub fn with_demo_data_dir(mut self, env: impl Fn(&str) -> Option<String>) -> Self {
        if self.data_dir.is_none() {
            let base = env("XDG_STATE_HOME")
                .filter(|d| !d.is_empty())
                .map(std::path::PathBuf::from)
                .or_else(|| {
                    env("HOME")
                        .filter(|d| !d.is_empty())
                        .map(|home| std::path::Path::new(&home).join(".local/state"))
                })
                .unwrap_or_else(std::env::temp_dir);
            self.data_dir = Some(base.join("score-proxy").to_string_lossy().into_owned());
        }
        self
    }
}

/// A validated configuration.
#[derive(Clone, Debug)]
pub struct Config {
    pub(crate) listen: SocketAddr,
    pub upstream_url: Url,
    pub(crate) rate_per_second: f64,
    /// The guard's floor (`--rate-guard`).
    pub(crate) rate_guard: Duration,
    /// The guard's ceiling (`--rate-guard-max`), never below the floor.
    pub(crate) rate_guard_max: Duration,
    pub(crate) queue_capacity: usize,
    pub(crate) queue_timeout: Duration,
    pub(crate) cache_ttl: Duration,
    pub(crate) cache_max_entries: u64,
    pub(crate) upstream_timeout: Duration,
    pub(crate) upstream_max_in_flight: usize,
    pub(crate) upstream_penalty: Duration,
    pub(crate) client_id: Option<ClientId>,
    pub(crate) shutdown_grace: Duration,
    pub(crate) stale_if_error: Duration,
    pub(crate) stale_while_revalidate: Duration,
    /// The refresh-ahead window (zero: off), never longer than the TTL.
    pub(crate) refresh_ahead: Duration,
    pub(crate) job_max_items: usize,
    pub(crate) jobs_per_client: usize,
    pub(crate) job_retention: Duration,
    pub(crate) breaker_failures: u32,
    pub(crate) breaker_cooldown: Duration,
    pub(crate) max_connections: usize,
    pub(crate) header_read_timeout: Duration,
    pub(crate) admin_listen: Option<SocketAddr>,
    pub(crate) redis: Option<RedisSettings>,
    pub(crate) public_metrics: bool,
    pub(crate) metrics_enabled: bool,
    pub log_format: LogFormat,
    pub(crate) redaction_key: Option<String>,
    pub otel: OtelSettings,
    /// The persistent cache tier, when on.
    pub(crate) persist: Option<PersistSettings>,
}

/// The persistent cache's settings (present when `--data-dir` is set and not turned off).
#[derive(Clone, Debug)]
pub(crate) struct PersistSettings {
    pub(crate) dir: std::path::PathBuf,
    /// `--data-key`; `None`: the generated key in the data directory.
    pub(crate) key: Option<DataKey>,
}

/// Shared mode's settings (present when `--redis-url` is).
#[derive(Clone, Debug)]
pub(crate) struct RedisSettings {
    pub(crate) url: String,
    pub(crate) timeout: Duration,
    pub(crate) prefix: String,
    pub(crate) expected_replicas: u32,
    pub(crate) replica_index: Option<u32>,
}

/// One thing wrong with the configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigProblem {
    /// Where the operator sets it: `--flag (ENV_VAR)`, or the variables read for it when
    /// it is not one flag (`OpenTelemetry (OTEL_*)`).
    pub(crate) setting: String,
    pub(crate) problem: String,
}

impl std::fmt::Display for ConfigProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.setting, self.problem)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The proxy's settings as clap parses them from `extra` (the config tests' one way in).
    pub(super) fn args(extra: &[&str]) -> ServeArgs {
        let mut argv = vec!["score-proxy"];
        argv.extend_from_slice(extra);
        Cli::try_parse_from(argv).unwrap().serve
    }

    fn no_env(_: &str) -> Option<String> {
        None
    }

    #[test]
    fn defaults_are_valid() {
        let c = args(&[]).validate(no_env).unwrap();
        assert_eq!(c.listen.to_string(), "0.0.0.0:8000");
        assert_eq!(
            c.upstream_url.as_str(),
            "https://score.hsborges.dev/api/score"
        );
        assert_eq!(c.rate_per_second, 1.0);
        assert_eq!(c.rate_guard, Duration::from_millis(10));
        assert_eq!(c.rate_guard_max, Duration::from_millis(100));
        assert_eq!(c.queue_capacity, 20);
        assert_eq!(c.queue_timeout, Duration::from_secs(30));
        assert_eq!(c.cache_ttl, Duration::from_secs(300));
        assert_eq!(c.cache_max_entries, 100_000);
        assert_eq!(c.upstream_timeout, Duration::from_secs(10));
        assert!(c.client_id.is_none());
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let problems = args(&[
            "--listen",
            "nowhere",
            "--rate",
            "abc",
            "--rate-guard",
            "10",
            "--queue-capacity",
            "0",
            "--queue-timeout",
            "soon",
            "--upstream-url",
            "ftp://x/y",
            "--client-id",
            "tab\there",
        ])
        .validate(no_env)
        .unwrap_err();
        let settings: Vec<_> = problems.iter().map(|p| p.setting.as_str()).collect();
        assert_eq!(
            settings,
            [
                "--listen (SCORE_PROXY_LISTEN)",
                "--upstream-url (SCORE_PROXY_UPSTREAM_URL)",
                "--rate (SCORE_PROXY_RATE_PER_SECOND)",
                "--rate-guard (SCORE_PROXY_RATE_GUARD)",
                "--queue-capacity (SCORE_PROXY_QUEUE_CAPACITY)",
                "--queue-timeout (SCORE_PROXY_QUEUE_TIMEOUT)",
                "--client-id (SCORE_PROXY_CLIENT_ID or CLIENT_ID)",
            ]
        );
        assert!(problems[3].problem.contains("needs a unit"));
    }

    #[test]
    fn client_id_falls_back_to_the_originals_variable() {
        let c = args(&[])
            .validate(|k| (k == "CLIENT_ID").then(|| "000".to_owned()))
            .unwrap();
        assert_eq!(c.client_id.unwrap().as_str(), "000");
        let c = args(&["--client-id", "explicit"])
            .validate(|k| (k == "CLIENT_ID").then(|| "000".to_owned()))
            .unwrap();
        assert_eq!(c.client_id.unwrap().as_str(), "explicit");
    }

    #[test]
    fn the_persistent_cache_is_off_unless_a_directory_is_given() {
        assert!(args(&[]).validate(no_env).unwrap().persist.is_none());
        let dir = std::env::temp_dir().join("score-proxy-config-test");
        let dir = dir.to_str().unwrap();
        let key = "ab".repeat(32);
        let c = args(&["--data-dir", dir, "--data-key", &key])
            .validate(no_env)
            .unwrap();
        let persist = c.persist.unwrap();
        assert_eq!(persist.dir, std::path::Path::new(dir));
        assert_eq!(persist.key.unwrap().0, [0xab; 32]);
        // Empty, or --no-persist (alone or with a value), turns it off.
        assert!(
            args(&["--data-dir", ""])
                .validate(no_env)
                .unwrap()
                .persist
                .is_none()
        );
        for off in [&["--no-persist"][..], &["--no-persist", "true"]] {
            let mut argv = vec!["--data-dir", dir];
            argv.extend_from_slice(off);
            assert!(args(&argv).validate(no_env).unwrap().persist.is_none());
        }
        // A bad key is reported (without quoting it) even with persistence off; a file is
        // not a directory.
        let problems = args(&["--data-key", "sekrit", "--data-dir", "/proc/self/status"])
            .validate(no_env)
            .unwrap_err();
        let lines: Vec<_> = problems.iter().map(ToString::to_string).collect();
        assert_eq!(lines.len(), 2, "{lines:?}");
        assert!(lines[0].starts_with("--data-dir (SCORE_PROXY_DATA_DIR): '/proc/self/status' exists and is not a directory"), "{lines:?}");
        assert!(
            lines[1].starts_with("--data-key (SCORE_PROXY_DATA_KEY): the key is "),
            "{lines:?}"
        );
        assert!(!lines[1].contains("sekrit"));
    }

    #[test]
    fn the_demo_keeps_its_cache_in_the_users_state_directory() {
        let env = |vars: &'static [(&'static str, &'static str)]| {
            move |k: &str| {
                vars.iter()
                    .find(|(n, _)| *n == k)
                    .map(|(_, v)| v.to_string())
            }
        };
        let dir = |a: ServeArgs| a.data_dir.unwrap();
        assert_eq!(
            dir(args(&[]).with_demo_data_dir(env(&[("XDG_STATE_HOME", "/s"), ("HOME", "/h")]))),
            "/s/score-proxy"
        );
        assert_eq!(
            dir(args(&[]).with_demo_data_dir(env(&[("HOME", "/h")]))),
            "/h/.local/state/score-proxy"
        );
        assert!(dir(args(&[]).with_demo_data_dir(env(&[]))).ends_with("score-proxy"));
        // Given (even empty, which turns it off), it is kept.
        assert_eq!(
            dir(args(&["--data-dir", ""]).with_demo_data_dir(env(&[("HOME", "/h")]))),
            ""
        );
    }

    #[test]
    fn metrics_must_be_served_somewhere() {
        assert!(
            args(&["--public-metrics", "false"])
                .validate(no_env)
                .is_err()
        );
        let c = args(&[
            "--public-metrics",
            "false",
            "--admin-listen",
            "127.0.0.1:9100",
        ])
        .validate(no_env)
        .unwrap();
        assert!(!c.public_metrics);
    }
}
