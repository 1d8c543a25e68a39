//! Every Prometheus metric score-proxy exports, declared in one module.
//!
//! Stages call small named methods (`metrics.cache_lookup(CacheResult::Hit)`); no other module
//! spells a metric name or a label value. Every label value comes from a small fixed set: the
//! derived name of a domain enum (`CacheResult`, `QueueRefusal`, `Route`, ...), an error's
//! `kind()`, a validation `reason`, or a status code: **no label ever holds a CPF or a client
//! id.**
//!
//! Label children are resolved once, at start-up, so recording on the hot path is an atomic
//! add with no lock and no allocation. The README's metrics table mirrors these files.
//!
//! [`Metrics`] owns the registry and one struct of families per stage; each stage's file
//! declares its families and the recording methods that stage calls:
//! - `http`: requests by route and code, their durations, those in flight;
//! - `connections`: per listener, open, refused and failed;
//! - `validation`, `cache`, `queue`, `pacing` (with the pacing mode), `upstream`, `breaker`;
//! - `shared`: shared mode's Redis operations, shared cache tier and cross-replica flights;
//! - `refresh`: background lookups (stale-while-revalidate, refresh-ahead, job items);
//! - `jobs`: bulk jobs by state, their items by result, the oldest open job's age and place
//!   in line;
//! - `store`: the persistent cache tier (loaded at start, size, writes, drops, errors);
//! - `logs`: log lines dropped because the log buffer was full.
//!
//! States (the breaker's, the pacing mode) are one series per state, 1 for the current one
//! (kube-state-metrics' convention), and the `/metrics` handler sets them from the live state
//! just before rendering, so that they are true at scrape time even on an idle proxy.
//! Histogram buckets are constants: a bucket that moved with the configuration would make
//! two replicas' (or two deploys') histograms impossible to add up.
//!
//! Besides the `score_proxy_` families, the registry holds the standard, unprefixed
//! `process_*` metrics (CPU, memory, file descriptors, start time) that every Prometheus
//! exporter offers, so that the usual dashboards and alerts find them under their usual names.

mod breaker;
mod cache;
mod connections;
mod http;
mod jobs;
mod logs;
mod pacing;
mod queue;
mod refresh;
mod shared;
mod store;
mod upstream;
mod validation;

use std::collections::HashMap;
use std::hash::Hash;
use std::time::Duration;

use prometheus::core::{Collector, MetricVec, MetricVecBuilder};
use prometheus::{
    Counter, Encoder, Gauge, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec,
    IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};
use strum::VariantArray;

pub(crate) use self::http::{
    CODE_CLIENT_CLOSED, OUTCOME_CLIENT_CLOSED, OUTCOME_ERROR, OUTCOME_NOT_FOUND, OUTCOME_OK,
};
pub(crate) use self::shared::DivisionReport;

const NAMESPACE: &str = "score_proxy";

/// Settings that the metrics report as gauges of configuration.
pub(crate) struct MetricsConfig {
    /// `false` skips per-request recording (HTTP, validation and cache families), the only
    /// recording on the cache-hit path. It exists to measure what telemetry costs.
    pub(crate) enabled: bool,
    pub(crate) rate_per_second: f64,
    pub(crate) interval: Duration,
    pub(crate) queue_capacity: usize,
    pub(crate) queue_timeout: Duration,
    /// `--expected-replicas` in shared mode; 1 for a proxy that paces alone.
    pub(crate) expected_replicas: u32,
}

pub struct Metrics {
    registry: Registry,
    enabled: bool,
    http: http::HttpMetrics,
    connections: connections::ConnectionMetrics,
    validation: validation::ValidationMetrics,
    cache: cache::CacheMetrics,
    queue: queue::QueueMetrics,
    pacing: pacing::PacingMetrics,
    upstream: upstream::UpstreamMetrics,
    breaker: breaker::BreakerMetrics,
    refresh: refresh::RefreshMetrics,
    jobs: jobs::JobMetrics,
    shared: shared::SharedMetrics,
    store: store::StoreMetrics,
    logs: logs::LogMetrics,
}

impl Metrics {
    pub(crate) fn new(config: &MetricsConfig) -> Self {
        let registry = Registry::new();
        let families = Families(&registry);

        let build_info = families.gauge_vec(
            "build_info",
            "Build metadata; the value is always 1.",
            &["version"],
        );
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        // The standard names (`process_cpu_seconds_total`, ...), with no namespace.
        #[cfg(target_os = "linux")]
        registry
            .register(Box::new(
                prometheus::process_collector::ProcessCollector::new(std::process::id() as i32, ""),
            ))
            .expect("process metrics register once");

        Metrics {
            enabled: config.enabled,
            http: http::HttpMetrics::new(&families),
            connections: connections::ConnectionMetrics::new(&families),
            validation: validation::ValidationMetrics::new(&families),
            cache: cache::CacheMetrics::new(&families),
            queue: queue::QueueMetrics::new(&families, config),
            pacing: pacing::PacingMetrics::new(&families, config),
            upstream: upstream::UpstreamMetrics::new(&families),
            breaker: breaker::BreakerMetrics::new(&families),
            refresh: refresh::RefreshMetrics::new(&families),
            jobs: jobs::JobMetrics::new(&families),
            shared: shared::SharedMetrics::new(&families),
            store: store::StoreMetrics::new(&families),
            logs: logs::LogMetrics::new(&families),
            registry,
        }
    }

    /// The text exposition format (version 0.0.4).
    pub fn render(&self) -> String {
        self.refresh_job_age();
        let mut out = Vec::with_capacity(16 * 1024);
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .expect("encoding to a Vec cannot fail");
        String::from_utf8(out).expect("the text format is UTF-8")
    }

    /// Whether per-request recording is on.
    pub(crate) fn enabled(&self) -> bool {
        self.enabled
    }
}

/// Declares metric families on the registry, each name under the `score_proxy_` prefix.
///
/// A failure here is a programming error (a malformed or duplicate name), which every test
/// that builds a [`Metrics`] would catch, so it panics.
struct Families<'a>(&'a Registry);

impl Families<'_> {
    fn register<C: Collector + Clone + 'static>(&self, collector: prometheus::Result<C>) -> C {
        let collector = collector.expect("a valid metric");
        self.0
            .register(Box::new(collector.clone()))
            .expect("metric names are unique");
        collector
    }

    fn counter(&self, name: &str, help: &str) -> IntCounter {
        self.register(IntCounter::with_opts(opts(name, help)))
    }

    /// A counter of fractional amounts (seconds).
    fn float_counter(&self, name: &str, help: &str) -> Counter {
        self.register(Counter::with_opts(opts(name, help)))
    }

    fn gauge(&self, name: &str, help: &str) -> IntGauge {
        self.register(IntGauge::with_opts(opts(name, help)))
    }

    fn float_gauge(&self, name: &str, help: &str) -> Gauge {
        self.register(Gauge::with_opts(opts(name, help)))
    }

    fn histogram(&self, name: &str, help: &str, buckets: &[f64]) -> Histogram {
        self.register(Histogram::with_opts(histogram_opts(name, help, buckets)))
    }

    fn counter_vec(&self, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
        self.register(IntCounterVec::new(opts(name, help), labels))
    }

    fn gauge_vec(&self, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
        self.register(IntGaugeVec::new(opts(name, help), labels))
    }

    fn histogram_vec(
        &self,
        name: &str,
        help: &str,
        buckets: &[f64],
        labels: &[&str],
    ) -> HistogramVec {
        self.register(HistogramVec::new(
            histogram_opts(name, help, buckets),
            labels,
        ))
    }
}

fn opts(name: &str, help: &str) -> Opts {
    Opts::new(name, help).namespace(NAMESPACE)
}

fn histogram_opts(name: &str, help: &str, buckets: &[f64]) -> HistogramOpts {
    HistogramOpts::new(name, help)
        .namespace(NAMESPACE)
        .buckets(buckets.to_vec())
}

/// A label enum: a fixed set of values, each spelled by its derived name.
trait Label: VariantArray + Copy + Eq + Hash + Into<&'static str> {}

impl<T: VariantArray + Copy + Eq + Hash + Into<&'static str>> Label for T {}

/// One child of a one-label `family` per value of `L`, resolved now so that recording finds
/// it without allocating or locking, and so that every series reads 0 before its first event.
fn per_value<L: Label, B: MetricVecBuilder>(family: &MetricVec<B>) -> HashMap<L, B::M> {
    L::VARIANTS
        .iter()
        .map(|&value| (value, family.with_label_values(&[value.into()])))
        .collect()
}

/// [`per_value`] for a family with two labels: one child per pair of values.
fn per_pair<A: Label, C: Label, B: MetricVecBuilder>(
    family: &MetricVec<B>,
) -> HashMap<(A, C), B::M> {
    A::VARIANTS
        .iter()
        .flat_map(|&a| C::VARIANTS.iter().map(move |&c| (a, c)))
        .map(|(a, c)| ((a, c), family.with_label_values(&[a.into(), c.into()])))
        .collect()
}

/// Increments a gauge now and decrements it when dropped, whatever path the code takes
/// (including a cancelled future).
pub(crate) struct GaugeGuard<'a>(&'a IntGauge);

impl<'a> GaugeGuard<'a> {
    pub(crate) fn new(gauge: &'a IntGauge) -> Self {
        gauge.inc();
        GaugeGuard(gauge)
    }
}

impl Drop for GaugeGuard<'_> {
    fn drop(&mut self) {
        self.0.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::route::Route;
    use crate::lookup::breaker::BreakerState;
    use crate::lookup::cache::CacheResult;
    use crate::lookup::pacing::PacingMode;
    use crate::lookup::upstream::UpstreamOutcome;

    fn metrics() -> Metrics {
        Metrics::new(&MetricsConfig {
            enabled: true,
            rate_per_second: 1.0,
            interval: Duration::from_millis(1010),
            queue_capacity: 20,
            queue_timeout: Duration::from_secs(120),
            expected_replicas: 1,
        })
    }

    #[test]
    fn names_follow_conventions() {
        let text = metrics().render();
        for line in text.lines().filter(|l| l.starts_with("# TYPE")) {
            let mut parts = line.split_whitespace().skip(2);
            let (name, kind) = (parts.next().unwrap(), parts.next().unwrap());
            assert!(
                name.starts_with("score_proxy_") || name.starts_with("process_"),
                "{name}"
            );
            assert!(!name.starts_with("score_proxy_process_"), "{name}");
            if kind == "counter" {
                assert!(name.ends_with("_total"), "{name}");
            }
        }
        assert!(text.contains("score_proxy_build_info{version=\""));
        assert!(text.contains("score_proxy_queue_capacity 20"));
        assert!(text.contains("score_proxy_queue_timeout_seconds 120"));
        assert!(text.contains("score_proxy_expected_replicas 1"));
        #[cfg(target_os = "linux")]
        assert!(text.contains("\nprocess_resident_memory_bytes "), "{text}");
    }

    #[test]
    fn route_discriminants_index_the_tables() {
        for (i, &route) in Route::VARIANTS.iter().enumerate() {
            assert_eq!(route as usize, i);
        }
    }

    /// The bucket boundaries of every histogram, by family.
    fn buckets(text: &str) -> Vec<String> {
        text.lines()
            .filter(|l| l.contains("_bucket{"))
            .map(|l| l.rsplit_once(' ').unwrap().0.to_owned())
            .collect()
    }

    #[test]
    fn buckets_do_not_move_with_the_configuration() {
        let other = Metrics::new(&MetricsConfig {
            enabled: true,
            rate_per_second: 4.0,
            interval: Duration::from_millis(260),
            queue_capacity: 500,
            queue_timeout: Duration::from_secs(3600),
            expected_replicas: 3,
        });
        assert_eq!(buckets(&metrics().render()), buckets(&other.render()));
        // Queue waits reach minutes; upstream calls, milliseconds to their timeout.
        let text = other.render();
        for series in [
            "score_proxy_queue_wait_seconds_bucket{le=\"300\"}",
            "score_proxy_pacing_permit_wait_seconds_bucket{le=\"300\"}",
            "score_proxy_upstream_call_duration_seconds_bucket{outcome=\"ok\",le=\"0.001\"}",
            "score_proxy_upstream_call_duration_seconds_bucket{outcome=\"ok\",le=\"30\"}",
        ] {
            assert!(text.contains(series), "{series} in {text}");
        }
    }

    #[test]
    fn states_are_one_series_each_with_the_current_one_at_1() {
        let m = metrics();
        m.set_breaker_state(BreakerState::HalfOpen);
        m.set_pacing_mode(PacingMode::Fallback);
        let text = m.render();
        for (series, value) in [
            ("score_proxy_breaker_state{state=\"closed\"}", 0),
            ("score_proxy_breaker_state{state=\"half_open\"}", 1),
            ("score_proxy_breaker_state{state=\"open\"}", 0),
            ("score_proxy_pacing_mode{mode=\"local\"}", 0),
            ("score_proxy_pacing_mode{mode=\"shared\"}", 0),
            ("score_proxy_pacing_mode{mode=\"fallback\"}", 1),
        ] {
            assert!(
                text.contains(&format!("{series} {value}\n")),
                "{series}: {text}"
            );
        }
    }

    #[test]
    fn a_stale_answer_is_not_a_second_lookup() {
        let m = metrics();
        m.cache_lookup(CacheResult::Miss);
        m.stale_answer();
        let text = m.render();
        assert!(text.contains("score_proxy_cache_lookups_total{result=\"miss\"} 1"));
        assert!(!text.contains("result=\"stale\""), "{text}");
        assert!(text.contains("score_proxy_cache_stale_answers_total 1"));
    }

    #[test]
    fn recording_moves_the_right_series() {
        let m = metrics();
        m.http_request(Route::Score, 200, "hit", Duration::from_micros(300));
        m.http_request(
            Route::Score,
            418,
            "invalid_request",
            Duration::from_micros(300),
        );
        m.cache_lookup(CacheResult::Coalesced);
        m.upstream_call(
            Some(429),
            UpstreamOutcome::Penalty,
            Duration::from_millis(3),
        );
        let text = m.render();
        assert!(
            text.contains("score_proxy_http_requests_total{code=\"200\",route=\"/proxy/score\"} 1")
        );
        assert!(
            text.contains("score_proxy_http_requests_total{code=\"418\",route=\"/proxy/score\"} 1")
        );
        assert!(text.contains("score_proxy_cache_lookups_total{result=\"coalesced\"} 1"));
        assert!(
            text.contains("score_proxy_upstream_calls_total{class=\"4xx\",outcome=\"penalty\"} 1")
        );
    }
}
