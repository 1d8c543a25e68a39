//! [`ServeArgs::validate`]: every setting through its parser, then the checks that involve
//! two settings, with **all** problems collected before anything is decided.
//!
//! A deploy that fails should say everything that is wrong, not one thing per attempt. So
//! each setting goes through [`Problems::take`], which records a failure and hands back
//! `None` in its place; the cross-field checks then run on whatever did parse; and
//! [`Config`] is assembled once, at the end, only when nothing was recorded.

use std::time::Duration;

use clap::Args;

use super::parse::{self, optional};
use super::{Config, ConfigProblem, PersistSettings, RedisSettings, ServeArgs};
use crate::telemetry::OtelSettings;

impl ServeArgs {
    /// Converts and checks every setting; `env` reads the environment (for `CLIENT_ID` and
    /// the `OTEL_*` variables), injectable for tests.
    pub fn validate(
        &self,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Config, Vec<ConfigProblem>> {
        let mut p = Problems::default();

        // Where the proxy listens and what it calls.
        let listen = p.take("listen", parse::address(&self.listen));
        let upstream_url = p.take("upstream_url", parse::upstream_url(&self.upstream_url));

        // Pacing and the queue in front of it.
        let rate_per_second = p.take(
            "rate_per_second",
            parse::rate_per_second(&self.rate_per_second),
        );
        let rate_guard = p.take(
            "rate_guard",
            parse::duration(&self.rate_guard, ZERO..=secs(10)),
        );
        let rate_guard_max = p.take(
            "rate_guard_max",
            parse::duration(&self.rate_guard_max, ZERO..=secs(10)),
        );
        if let (Some(floor), Some(ceiling)) = (rate_guard, rate_guard_max)
            && ceiling < floor
        {
            p.add(
                "rate_guard_max",
                "must be at least --rate-guard (the guard's floor); set them equal for a \
                 fixed guard",
            );
        }
        let queue_capacity = p.take(
            "queue_capacity",
            parse::whole(&self.queue_capacity, 1..=100_000),
        );
        let queue_timeout = p.take(
            "queue_timeout",
            parse::duration(&self.queue_timeout, ms(1)..=secs(3600)),
        );

        // The cache.
        let cache_ttl = p.take(
            "cache_ttl",
            parse::duration(&self.cache_ttl, ZERO..=days(30)),
        );
        let cache_max_entries = p.take(
            "cache_max_entries",
            parse::whole(&self.cache_max_entries, 0..=100_000_000),
        );

        // The upstream call.
        let upstream_timeout = p.take(
            "upstream_timeout",
            parse::duration(&self.upstream_timeout, ms(1)..=secs(600)),
        );
        let upstream_max_in_flight = p.take(
            "upstream_max_in_flight",
            parse::whole(&self.upstream_max_in_flight, 1..=10_000),
        );
        let upstream_penalty = p.take(
            "upstream_penalty",
            parse::duration(&self.upstream_penalty, ZERO..=secs(600)),
        );
        // The original read `CLIENT_ID`; it is still honoured, after the proxy's own name.
        let client_id = p.take_as(
            "--client-id (SCORE_PROXY_CLIENT_ID or CLIENT_ID)",
            optional(
                self.client_id
                    .clone()
                    .or_else(|| env("CLIENT_ID"))
                    .as_deref(),
                parse::client_id,
            ),
        );

        // Failure handling and the listeners' limits.
        let shutdown_grace = p.take(
            "shutdown_grace",
            parse::duration(&self.shutdown_grace, ZERO..=secs(3600)),
        );
        let stale_if_error = p.take(
            "stale_if_error",
            parse::duration(&self.stale_if_error, ZERO..=days(30)),
        );
        let stale_while_revalidate = p.take(
            "stale_while_revalidate",
            parse::duration(&self.stale_while_revalidate, ZERO..=days(30)),
        );
        let job_max_items = p.take(
            "job_max_items",
            parse::whole(&self.job_max_items, 1..=100_000),
        );
        let jobs_per_client = p.take(
            "jobs_per_client",
            parse::whole(&self.jobs_per_client, 1..=1_000),
        );
        let job_retention = p.take(
            "job_retention",
            parse::duration(&self.job_retention, secs(1)..=days(365)),
        );
        let refresh_ahead = p.take(
            "refresh_ahead",
            parse::duration(&self.refresh_ahead, ZERO..=days(30)),
        );
        let breaker_failures = p.take(
            "breaker_failures",
            parse::whole(&self.breaker_failures, 0..=1_000_000),
        );
        let breaker_cooldown = p.take(
            "breaker_cooldown",
            parse::duration(&self.breaker_cooldown, ms(1)..=secs(3600)),
        );
        let max_connections = p.take(
            "max_connections",
            parse::whole(&self.max_connections, 1..=1_000_000),
        );
        let header_read_timeout = p.take(
            "header_read_timeout",
            parse::duration(&self.header_read_timeout, ms(1)..=secs(3600)),
        );
        let admin_listen = p.take(
            "admin_listen",
            optional(self.admin_listen.as_deref(), parse::address),
        );

        // Shared mode. Its settings are checked even when it is off, so a typo is found
        // before the day Redis is switched on.
        let redis_timeout = p.take(
            "redis_timeout",
            parse::duration(&self.redis_timeout, ms(1)..=secs(10)),
        );
        let expected_replicas = p.take(
            "expected_replicas",
            parse::whole(&self.expected_replicas, 1..=1000),
        );
        let replica_index = p.take(
            "replica_index",
            optional(self.replica_index.as_deref(), |raw| {
                parse::whole::<u32>(raw, 0..=999)
            }),
        );
        if let (Some(Some(index)), Some(expected)) = (replica_index, expected_replicas)
            && index >= expected
        {
            p.add(
                "replica_index",
                &format!(
                    "{index} is not below --expected-replicas ({expected}): places are 0 to {}",
                    expected - 1
                ),
            );
        }
        let redis_prefix = p.take("redis_prefix", parse::redis_prefix(&self.redis_prefix));
        let redis_url = p.take(
            "redis_url",
            optional(self.redis_url.as_deref().map(str::trim), parse::redis_url),
        );
        let redaction_key = self.redaction_key.clone().filter(|k| !k.is_empty());
        if matches!(redis_url, Some(Some(_))) && redaction_key.is_none() {
            p.add(
                "redaction_key",
                "shared mode (--redis-url) needs the same redaction key on every \
                 replica: Redis keys are hashed with it",
            );
        }

        // The persistent cache. The key is checked even when persistence is off.
        let data_dir = p.take(
            "data_dir",
            optional(self.data_dir.as_deref().map(str::trim), parse::data_dir),
        );
        let no_persist = p.take("no_persist", parse::boolean(&self.no_persist));
        let data_key = p.take(
            "data_key",
            optional(self.data_key.as_deref().map(str::trim), parse::data_key),
        );

        // Telemetry.
        let public_metrics = p.take("public_metrics", parse::boolean(&self.public_metrics));
        let metrics_enabled = p.take("metrics", parse::boolean(&self.metrics));
        let log_format = p.take("log_format", parse::log_format(&self.log_format));
        let otel = p.take_as("OpenTelemetry (OTEL_*)", OtelSettings::from_env(&env));

        // The listeners together.
        if let (Some(listen), Some(Some(admin))) = (listen, admin_listen)
            && listen == admin
            && listen.port() != 0
        {
            p.add("admin_listen", "must differ from --listen");
        }
        if public_metrics == Some(false) && admin_listen == Some(None) {
            p.add(
                "public_metrics",
                "false needs --admin-listen, or /metrics would be served nowhere",
            );
        }

        // Every `?` below is on a value `take` returned: `None` only where a problem was
        // recorded, so a config with no problems is always assembled.
        let config = (|| {
            Some(Config {
                listen: listen?,
                upstream_url: upstream_url?,
                rate_per_second: rate_per_second?,
                rate_guard: rate_guard?,
                rate_guard_max: rate_guard_max?,
                queue_capacity: queue_capacity?,
                queue_timeout: queue_timeout?,
                cache_ttl: cache_ttl?,
                cache_max_entries: cache_max_entries?,
                upstream_timeout: upstream_timeout?,
                upstream_max_in_flight: upstream_max_in_flight?,
                upstream_penalty: upstream_penalty?,
                client_id: client_id?,
                shutdown_grace: shutdown_grace?,
                stale_if_error: stale_if_error?,
                stale_while_revalidate: stale_while_revalidate?,
                // A window longer than the TTL would refresh an entry as soon as it is hit.
                refresh_ahead: refresh_ahead?.min(cache_ttl?),
                job_max_items: job_max_items?,
                jobs_per_client: jobs_per_client?,
                job_retention: job_retention?,
                breaker_failures: breaker_failures?,
                breaker_cooldown: breaker_cooldown?,
                max_connections: max_connections?,
                header_read_timeout: header_read_timeout?,
                admin_listen: admin_listen?,
                redis: match redis_url? {
                    None => None,
                    Some(url) => Some(RedisSettings {
                        url,
                        timeout: redis_timeout?,
                        prefix: redis_prefix?,
                        expected_replicas: expected_replicas?,
                        replica_index: replica_index?,
                    }),
                },
                public_metrics: public_metrics?,
                metrics_enabled: metrics_enabled?,
                log_format: log_format?,
                redaction_key,
                otel: otel?,
                persist: match (data_dir?, no_persist?) {
                    (Some(dir), false) => Some(PersistSettings {
                        dir,
                        key: data_key?,
                    }),
                    _ => None,
                },
            })
        })();
        p.finish(config)
    }
}

const ZERO: Duration = Duration::ZERO;

const fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

const fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

const fn days(n: u64) -> Duration {
    Duration::from_secs(n * 86_400)
}

/// Every problem found so far, in the order the settings were checked.
#[derive(Default)]
pub(super) struct Problems(Vec<ConfigProblem>);

impl Problems {
    /// The value, or `None` with the problem recorded against the [`ServeArgs`] field `id`.
    pub(super) fn take<T>(&mut self, id: &str, result: parse::Parsed<T>) -> Option<T> {
        self.take_as(setting(id), result)
    }

    /// As [`Problems::take`], for a setting that is not one [`ServeArgs`] field (a fallback
    /// variable, or a family of variables read elsewhere).
    pub(super) fn take_as<T>(
        &mut self,
        setting: impl Into<String>,
        result: parse::Parsed<T>,
    ) -> Option<T> {
        result
            .map_err(|problem| {
                self.0.push(ConfigProblem {
                    setting: setting.into(),
                    problem,
                })
            })
            .ok()
    }

    /// Records a problem that no single parser could see (two settings that disagree).
    pub(super) fn add(&mut self, id: &str, problem: &str) {
        self.0.push(ConfigProblem {
            setting: setting(id),
            problem: problem.to_owned(),
        });
    }

    /// The value when nothing was recorded, else every problem.
    pub(super) fn finish<T>(self, value: Option<T>) -> Result<T, Vec<ConfigProblem>> {
        debug_assert!(
            value.is_some() || !self.0.is_empty(),
            "a setting went missing without a problem recorded"
        );
        match value {
            Some(value) if self.0.is_empty() => Ok(value),
            _ => Err(self.0),
        }
    }
}

/// `--flag (ENV_VAR)` for the [`ServeArgs`] field `id`, read from clap's own definition of
/// the arguments, so a problem always names the flag and the variable the operator can set
/// (and a renamed flag cannot leave a stale name in the messages).
fn setting(id: &str) -> String {
    let args = ServeArgs::augment_args(clap::Command::new("score-proxy"));
    let arg = args.get_arguments().find(|arg| arg.get_id() == id);
    debug_assert!(arg.is_some(), "ServeArgs has no field {id}");
    match arg.and_then(|arg| Some((arg.get_long()?, arg.get_env()?))) {
        Some((flag, env)) => format!("--{flag} ({})", env.to_string_lossy()),
        None => id.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::tests::args;

    #[test]
    fn a_setting_is_named_by_its_flag_and_variable() {
        assert_eq!(setting("listen"), "--listen (SCORE_PROXY_LISTEN)");
        assert_eq!(
            setting("rate_per_second"),
            "--rate (SCORE_PROXY_RATE_PER_SECOND)"
        );
        assert_eq!(setting("metrics"), "--metrics (SCORE_PROXY_METRICS)");
    }

    #[test]
    fn problems_collect_in_order_and_finish_only_when_empty() {
        let mut p = Problems::default();
        assert_eq!(p.take("listen", Ok::<_, String>(1)), Some(1));
        assert_eq!(p.take::<u8>("rate_guard", Err("first".into())), None);
        p.add("admin_listen", "second");
        let problems = p.finish(Some(())).unwrap_err();
        assert_eq!(
            problems.iter().map(ToString::to_string).collect::<Vec<_>>(),
            [
                "--rate-guard (SCORE_PROXY_RATE_GUARD): first",
                "--admin-listen (SCORE_PROXY_ADMIN_LISTEN): second",
            ]
        );
        assert_eq!(Problems::default().finish(Some(7)), Ok(7));
    }

    /// Every setting wrong at once: each one is reported, each under its own flag and
    /// variable, in the order they are checked, and the cross-field checks on top.
    #[test]
    fn every_setting_wrong_at_once_lists_them_all() {
        let problems = args(&[
            "--listen=nowhere",
            "--upstream-url=ftp://x/y",
            "--rate=0",
            "--rate-guard=11s",
            "--rate-guard-max=soon",
            "--queue-capacity=lots",
            "--queue-timeout=0s",
            "--cache-ttl=5",
            "--cache-max-entries=-1",
            "--upstream-timeout=1h",
            "--upstream-max-in-flight=0",
            "--upstream-penalty=later",
            "--client-id=tab\there",
            "--shutdown-grace=2h",
            "--stale-if-error=31days",
            "--breaker-failures=many",
            "--breaker-cooldown=0ms",
            "--max-connections=0",
            "--header-read-timeout=10",
            "--admin-listen=admin",
            "--redis-timeout=1m",
            "--expected-replicas=0",
            "--replica-index=first",
            "--redis-prefix=has space",
            "--redis-url=http://not-redis",
            "--public-metrics=perhaps",
            "--metrics=sometimes",
            "--log-format=xml",
        ])
        .validate(|k| (k == "OTEL_EXPORTER_OTLP_PROTOCOL").then(|| "grpc".to_owned()))
        .unwrap_err();
        let settings: Vec<_> = problems.iter().map(|p| p.setting.as_str()).collect();
        assert_eq!(
            settings,
            [
                "--listen (SCORE_PROXY_LISTEN)",
                "--upstream-url (SCORE_PROXY_UPSTREAM_URL)",
                "--rate (SCORE_PROXY_RATE_PER_SECOND)",
                "--rate-guard (SCORE_PROXY_RATE_GUARD)",
                "--rate-guard-max (SCORE_PROXY_RATE_GUARD_MAX)",
                "--queue-capacity (SCORE_PROXY_QUEUE_CAPACITY)",
                "--queue-timeout (SCORE_PROXY_QUEUE_TIMEOUT)",
                "--cache-ttl (SCORE_PROXY_CACHE_TTL)",
                "--cache-max-entries (SCORE_PROXY_CACHE_MAX_ENTRIES)",
                "--upstream-timeout (SCORE_PROXY_UPSTREAM_TIMEOUT)",
                "--upstream-max-in-flight (SCORE_PROXY_UPSTREAM_MAX_IN_FLIGHT)",
                "--upstream-penalty (SCORE_PROXY_UPSTREAM_PENALTY)",
                "--client-id (SCORE_PROXY_CLIENT_ID or CLIENT_ID)",
                "--shutdown-grace (SCORE_PROXY_SHUTDOWN_GRACE)",
                "--stale-if-error (SCORE_PROXY_STALE_IF_ERROR)",
                "--breaker-failures (SCORE_PROXY_BREAKER_FAILURES)",
                "--breaker-cooldown (SCORE_PROXY_BREAKER_COOLDOWN)",
                "--max-connections (SCORE_PROXY_MAX_CONNECTIONS)",
                "--header-read-timeout (SCORE_PROXY_HEADER_READ_TIMEOUT)",
                "--admin-listen (SCORE_PROXY_ADMIN_LISTEN)",
                "--redis-timeout (SCORE_PROXY_REDIS_TIMEOUT)",
                "--expected-replicas (SCORE_PROXY_EXPECTED_REPLICAS)",
                "--replica-index (SCORE_PROXY_REPLICA_INDEX)",
                "--redis-prefix (SCORE_PROXY_REDIS_PREFIX)",
                "--redis-url (SCORE_PROXY_REDIS_URL)",
                "--public-metrics (SCORE_PROXY_PUBLIC_METRICS)",
                "--metrics (SCORE_PROXY_METRICS)",
                "--log-format (SCORE_PROXY_LOG_FORMAT)",
                "OpenTelemetry (OTEL_*)",
            ]
        );
    }

    #[test]
    fn settings_that_disagree_are_listed_with_the_rest() {
        let problems = args(&[
            "--listen=127.0.0.1:9000",
            "--admin-listen=127.0.0.1:9000",
            "--redis-url=redis://127.0.0.1:6379",
            "--rate=none",
            "--rate-guard=50ms",
            "--rate-guard-max=20ms",
        ])
        .validate(|_| None)
        .unwrap_err();
        let lines: Vec<_> = problems.iter().map(ToString::to_string).collect();
        assert_eq!(
            lines,
            [
                "--rate (SCORE_PROXY_RATE_PER_SECOND): 'none' is not a number",
                "--rate-guard-max (SCORE_PROXY_RATE_GUARD_MAX): must be at least --rate-guard \
                 (the guard's floor); set them equal for a fixed guard",
                "--redaction-key (SCORE_PROXY_REDACTION_KEY): shared mode (--redis-url) needs \
                 the same redaction key on every replica: Redis keys are hashed with it",
                "--admin-listen (SCORE_PROXY_ADMIN_LISTEN): must differ from --listen",
            ]
        );
        // Port 0 picks a fresh port for each listener, so the same address is fine.
        assert!(
            args(&["--listen=127.0.0.1:0", "--admin-listen=127.0.0.1:0"])
                .validate(|_| None)
                .is_ok()
        );
    }

    #[test]
    fn shared_mode_is_assembled_from_its_settings() {
        let c = args(&[
            "--redis-url= redis://127.0.0.1:6379 ",
            "--redaction-key=secret",
            "--redis-prefix=fleet-a",
            "--expected-replicas=2",
            "--replica-index=1",
            "--redis-timeout=250ms",
        ])
        .validate(|_| None)
        .unwrap();
        let redis = c.redis.unwrap();
        assert_eq!(redis.replica_index, Some(1));
        // A place must be one of the expected replicas'.
        let problems = args(&["--expected-replicas=2", "--replica-index=2"])
            .validate(|_| None)
            .unwrap_err();
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(
            problems[0].to_string().starts_with("--replica-index"),
            "{problems:?}"
        );
        assert_eq!(redis.url, "redis://127.0.0.1:6379");
        assert_eq!(redis.prefix, "fleet-a");
        assert_eq!(redis.expected_replicas, 2);
        assert_eq!(redis.timeout, ms(250));
        assert_eq!(c.redaction_key.as_deref(), Some("secret"));
        // Empty means unset, for templates that always pass the variable.
        let c = args(&["--redis-url=", "--redaction-key=", "--admin-listen="])
            .validate(|_| None)
            .unwrap();
        assert!(c.redis.is_none() && c.redaction_key.is_none() && c.admin_listen.is_none());
    }
}
