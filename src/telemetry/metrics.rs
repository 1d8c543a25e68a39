//! Every Prometheus metric score-proxy exports, declared in one place.
//!
//! Stages call small named methods (`metrics.cache_lookup(CacheResult::Hit)`); no other module
//! spells a metric name or a label value. Every label comes from a small fixed set defined
//! here or in `error.rs`/`validation.rs`: **no label ever holds a CPF or a client id.**
//!
//! Label children are resolved once, at start-up, so recording on the hot path is an atomic
//! add with no lock and no allocation. The README's metrics table mirrors this file.

use std::collections::HashMap;
use std::time::Duration;

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::http::connection::{ConnectionError, ConnectionRefusal, Listener};
use crate::http::route::Route;
use crate::lookup::cache::{CacheResult, Eviction};
use crate::lookup::error::ProxyError;
use crate::lookup::pacing::SlotUnused;
use crate::lookup::queue::QueueRefusal;
use crate::lookup::upstream::UpstreamOutcome;
use crate::lookup::validation::QueryError;
use crate::shared::ops::{REDIS_OPS, RedisOutcome};

const NAMESPACE: &str = "score_proxy";

/// Status code class of an upstream answer (`none` when there was no answer).
pub fn status_class(status: Option<u16>) -> &'static str {
    match status {
        Some(200..=299) => "2xx",
        Some(300..=399) => "3xx",
        Some(400..=499) => "4xx",
        Some(500..=599) => "5xx",
        Some(_) => "other",
        None => "none",
    }
}

/// Status codes the proxy answers with, pre-registered so their series exist from the start.
const KNOWN_CODES: [u16; 15] = [
    200, 400, 401, 404, 405, 408, 413, 414, 429, 431, 499, 500, 502, 503, 504,
];

/// The code recorded for a request whose client hung up before the answer (nginx's 499).
pub const CODE_CLIENT_CLOSED: u16 = 499;

/// Outcomes of non-lookup routes.
pub const OUTCOME_OK: &str = "ok";
pub const OUTCOME_ERROR: &str = "error";
pub const OUTCOME_NOT_FOUND: &str = "not_found";
pub const OUTCOME_CLIENT_CLOSED: &str = "client_closed";

fn outcomes() -> Vec<&'static str> {
    let mut all: Vec<&'static str> = CacheResult::ALL.iter().map(|c| c.as_str()).collect();
    all.extend(ProxyError::KINDS);
    all.extend([
        OUTCOME_OK,
        OUTCOME_ERROR,
        OUTCOME_NOT_FOUND,
        OUTCOME_CLIENT_CLOSED,
    ]);
    all
}

/// Buckets for HTTP request durations: cache hits are sub-millisecond, queued lookups take
/// tens of seconds.
const HTTP_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0,
    30.0, 45.0, 60.0,
];
/// Queue waits: a position costs about one second at the default rate.
const QUEUE_BUCKETS: &[f64] = &[
    0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0, 20.0, 25.0, 30.0, 45.0, 60.0,
    90.0,
];
const UPSTREAM_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0,
];

/// Settings that shape the metrics (gauges of configuration, bucket ranges).
pub struct MetricsConfig {
    /// `false` skips per-request recording (HTTP, validation and cache families), the only
    /// recording on the cache-hit path. It exists to measure what telemetry costs.
    pub enabled: bool,
    pub rate_per_second: f64,
    pub interval: Duration,
    pub queue_capacity: usize,
    pub queue_timeout: Duration,
}

pub struct Metrics {
    registry: Registry,
    enabled: bool,

    /// Indexed by route, then by the code's place in `KNOWN_CODES` (no hashing per request).
    http_requests: Vec<Vec<IntCounter>>,
    http_requests_vec: IntCounterVec,
    /// Indexed by route; each route's outcomes, found by comparing the static strings.
    http_duration: Vec<Vec<(&'static str, Histogram)>>,
    http_duration_vec: HistogramVec,
    http_in_flight: HashMap<Route, IntGauge>,

    validation_rejections: HashMap<&'static str, IntCounter>,

    cache_lookups: HashMap<CacheResult, IntCounter>,
    cache_entries: IntGauge,
    cache_evictions: HashMap<&'static str, IntCounter>,

    queue_depth: IntGauge,
    queue_admissions: IntCounter,
    queue_wait: Histogram,
    queue_refusals: HashMap<QueueRefusal, IntCounter>,
    queue_abandoned: IntCounter,

    permit_wait: Histogram,
    penalties: IntCounter,
    penalty_seconds: prometheus::Counter,
    penalty_active: IntGauge,
    unused_slots: HashMap<SlotUnused, IntCounter>,
    book_duration: Histogram,

    upstream_calls: HashMap<(&'static str, UpstreamOutcome), IntCounter>,
    upstream_calls_vec: IntCounterVec,
    upstream_duration: HashMap<UpstreamOutcome, Histogram>,
    upstream_in_flight: IntGauge,
    upstream_retries: IntCounter,
    upstream_connect: Histogram,

    breaker_state: IntGauge,
    breaker_transitions: HashMap<&'static str, IntCounter>,

    pacing_mode: IntGauge,
    shared_fallbacks: IntCounter,
    redis_ops: HashMap<(&'static str, RedisOutcome), IntCounter>,
    redis_duration: HashMap<&'static str, Histogram>,
    shared_cache: HashMap<bool, IntCounter>,
    shared_flights: HashMap<bool, IntCounter>,

    connections_open: HashMap<Listener, IntGauge>,
    connections_refused: HashMap<(Listener, ConnectionRefusal), IntCounter>,
    connection_errors: HashMap<(Listener, ConnectionError), IntCounter>,
}

fn opts(name: &str, help: &str) -> Opts {
    Opts::new(name, help).namespace(NAMESPACE)
}

fn hopts(name: &str, help: &str, buckets: &[f64]) -> HistogramOpts {
    HistogramOpts::new(name, help)
        .namespace(NAMESPACE)
        .buckets(buckets.to_vec())
}

/// Registers a collector; a failure here is a programming error (duplicate name).
fn reg<C: prometheus::core::Collector + Clone + 'static>(registry: &Registry, c: C) -> C {
    registry
        .register(Box::new(c.clone()))
        .expect("metric names are unique");
    c
}

impl Metrics {
    pub fn new(config: &MetricsConfig) -> Self {
        let registry = Registry::new();

        let build_info = reg(
            &registry,
            IntGaugeVec::new(
                opts("build_info", "Build metadata; the value is always 1."),
                &["version"],
            )
            .expect("valid"),
        );
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);

        #[cfg(target_os = "linux")]
        registry
            .register(Box::new(
                prometheus::process_collector::ProcessCollector::new(
                    std::process::id() as i32,
                    NAMESPACE,
                ),
            ))
            .expect("process metrics register once");

        // HTTP
        let http_requests_vec = reg(
            &registry,
            IntCounterVec::new(
                opts(
                    "http_requests_total",
                    "HTTP requests answered, by route and status code.",
                ),
                &["route", "code"],
            )
            .expect("valid"),
        );
        let http_requests = Route::ALL
            .into_iter()
            .map(|route| {
                KNOWN_CODES
                    .into_iter()
                    .map(|code| {
                        http_requests_vec.with_label_values(&[route.as_str(), &code.to_string()])
                    })
                    .collect()
            })
            .collect();
        let http_duration_vec = reg(
            &registry,
            HistogramVec::new(
                hopts(
                    "http_request_duration_seconds",
                    "Time from request received to response produced, by route and outcome.",
                    HTTP_BUCKETS,
                ),
                &["route", "outcome"],
            )
            .expect("valid"),
        );
        let http_duration = Route::ALL
            .into_iter()
            .map(|route| {
                let route_outcomes: Vec<&'static str> = match route {
                    Route::Score => outcomes(),
                    Route::Unmatched => vec![OUTCOME_NOT_FOUND, OUTCOME_CLIENT_CLOSED],
                    _ => vec![OUTCOME_OK, OUTCOME_ERROR, OUTCOME_CLIENT_CLOSED],
                };
                route_outcomes
                    .into_iter()
                    .map(|o| (o, http_duration_vec.with_label_values(&[route.as_str(), o])))
                    .collect()
            })
            .collect();
        let in_flight_vec = reg(
            &registry,
            IntGaugeVec::new(
                opts(
                    "http_requests_in_flight",
                    "HTTP requests being handled, by route.",
                ),
                &["route"],
            )
            .expect("valid"),
        );
        let http_in_flight = Route::ALL
            .into_iter()
            .map(|r| (r, in_flight_vec.with_label_values(&[r.as_str()])))
            .collect();

        // Validation
        let rejections_vec = reg(
            &registry,
            IntCounterVec::new(
                opts(
                    "validation_rejections_total",
                    "Lookups refused with 400 before reaching the cache, by reason.",
                ),
                &["reason"],
            )
            .expect("valid"),
        );
        let validation_rejections = QueryError::REASONS
            .into_iter()
            .map(|r| (r, rejections_vec.with_label_values(&[r])))
            .collect();

        // Cache
        let lookups_vec = reg(
            &registry,
            IntCounterVec::new(
                opts(
                    "cache_lookups_total",
                    "Valid lookups by how the cache resolved them: hit, miss (led an upstream \
                     call), coalesced (shared another lookup's call), stale (served expired on error).",
                ),
                &["result"],
            )
            .expect("valid"),
        );
        let cache_lookups = CacheResult::ALL
            .into_iter()
            .map(|c| (c, lookups_vec.with_label_values(&[c.as_str()])))
            .collect();
        let cache_entries = reg(
            &registry,
            IntGauge::with_opts(opts("cache_entries", "Entries in the cache.")).expect("valid"),
        );
        let evictions_vec = reg(
            &registry,
            IntCounterVec::new(
                opts(
                    "cache_evictions_total",
                    "Entries removed from the cache, by cause.",
                ),
                &["cause"],
            )
            .expect("valid"),
        );
        let cache_evictions = Eviction::ALL
            .into_iter()
            .map(|e| (e.as_str(), evictions_vec.with_label_values(&[e.as_str()])))
            .collect();

        // Queue
        let queue_depth = reg(
            &registry,
            IntGauge::with_opts(opts(
                "queue_depth",
                "Distinct lookups waiting for upstream budget.",
            ))
            .expect("valid"),
        );
        let queue_capacity = reg(
            &registry,
            IntGauge::with_opts(opts(
                "queue_capacity",
                "Most distinct lookups that may wait (queue-capacity).",
            ))
            .expect("valid"),
        );
        queue_capacity.set(config.queue_capacity as i64);
        let queue_admissions = reg(
            &registry,
            IntCounter::with_opts(opts(
                "queue_admissions_total",
                "Lookups let into the queue (each later starts, is abandoned, or expires).",
            ))
            .expect("valid"),
        );
        let timeout = config.queue_timeout.as_secs_f64();
        let mut queue_buckets = QUEUE_BUCKETS.to_vec();
        for edge in [timeout, timeout * 2.0] {
            if edge > *queue_buckets.last().expect("non-empty") {
                queue_buckets.push(edge);
            }
        }
        let queue_wait = reg(
            &registry,
            Histogram::with_opts(hopts(
                "queue_wait_seconds",
                "Time a lookup waited in the queue before its upstream call started.",
                &queue_buckets,
            ))
            .expect("valid"),
        );
        let refusals_vec = reg(
            &registry,
            IntCounterVec::new(
                opts(
                    "queue_refusals_total",
                    "Lookups the queue turned away or dropped unstarted, by reason.",
                ),
                &["reason"],
            )
            .expect("valid"),
        );
        let queue_refusals = QueueRefusal::ALL
            .into_iter()
            .map(|r| (r, refusals_vec.with_label_values(&[r.as_str()])))
            .collect();
        let queue_abandoned = reg(
            &registry,
            IntCounter::with_opts(opts(
                "queue_abandoned_total",
                "Queued lookups removed because every client waiting for them hung up; \
                 none of them cost an upstream call.",
            ))
            .expect("valid"),
        );

        // Pacing
        let rate = reg(
            &registry,
            prometheus::Gauge::with_opts(opts(
                "pacing_rate_per_second",
                "Configured upstream call rate (the limit the upstream enforces).",
            ))
            .expect("valid"),
        );
        rate.set(config.rate_per_second);
        let interval = reg(
            &registry,
            prometheus::Gauge::with_opts(opts(
                "pacing_interval_seconds",
                "Minimum spacing between upstream call starts (1/rate + guard).",
            ))
            .expect("valid"),
        );
        interval.set(config.interval.as_secs_f64());
        let permit_wait = reg(
            &registry,
            Histogram::with_opts(hopts(
                "pacing_permit_wait_seconds",
                "How long the pacer's schedule makes an admitted lookup wait for its start \
                 (predicted at admission): the wait the upstream's rate imposes.",
                &queue_buckets,
            ))
            .expect("valid"),
        );
        let penalties = reg(
            &registry,
            IntCounter::with_opts(opts(
                "pacing_penalties_total",
                "429 penalties received from the upstream (should stay at zero).",
            ))
            .expect("valid"),
        );
        let penalty_seconds = reg(
            &registry,
            prometheus::Counter::with_opts(opts(
                "pacing_penalty_pause_seconds_total",
                "Time upstream calls were paused for penalties.",
            ))
            .expect("valid"),
        );
        let penalty_active = reg(
            &registry,
            IntGauge::with_opts(opts(
                "pacing_penalty_active",
                "1 while upstream calls are paused for a penalty.",
            ))
            .expect("valid"),
        );
        let unused_vec = reg(
            &registry,
            IntCounterVec::new(
                opts(
                    "pacing_unused_slots_total",
                    "Booked start slots that passed without a call, by reason: no_lookup \
                     (every waiting client left), breaker, saturated (max in-flight calls \
                     open), gate, late (reached too late to use safely), penalty (a 429 came \
                     while it waited to start), held (another replica's call left late, too \
                     close before it).",
                ),
                &["reason"],
            )
            .expect("valid"),
        );
        let unused_slots = SlotUnused::ALL
            .into_iter()
            .map(|r| (r, unused_vec.with_label_values(&[r.as_str()])))
            .collect();
        let book_duration = reg(
            &registry,
            Histogram::with_opts(hopts(
                "pacing_book_duration_seconds",
                "Time to book a start slot with the pacer (a Redis round trip in shared mode).",
                &[
                    0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                ],
            ))
            .expect("valid"),
        );

        // Upstream
        let calls_vec = reg(
            &registry,
            IntCounterVec::new(
                opts(
                    "upstream_calls_total",
                    "Upstream calls made, by status code class and outcome.",
                ),
                &["class", "outcome"],
            )
            .expect("valid"),
        );
        // Pre-register the combinations that can occur, so they read 0 rather than being
        // absent; anything else is created on first use.
        use UpstreamOutcome as O;
        let possible = [
            ("2xx", O::Ok),
            ("2xx", O::BadBody),
            ("4xx", O::Unauthorized),
            ("4xx", O::RejectedInput),
            ("4xx", O::Penalty),
            ("4xx", O::UnexpectedStatus),
            ("5xx", O::ServerError),
            ("none", O::Timeout),
            ("none", O::ConnectError),
        ];
        let upstream_calls = possible
            .into_iter()
            .map(|(class, o)| {
                (
                    (class, o),
                    calls_vec.with_label_values(&[class, o.as_str()]),
                )
            })
            .collect();
        let duration_vec = reg(
            &registry,
            HistogramVec::new(
                hopts(
                    "upstream_call_duration_seconds",
                    "Upstream call duration, from start to the end of the body, by outcome.",
                    UPSTREAM_BUCKETS,
                ),
                &["outcome"],
            )
            .expect("valid"),
        );
        let upstream_duration = UpstreamOutcome::ALL
            .into_iter()
            .map(|o| (o, duration_vec.with_label_values(&[o.as_str()])))
            .collect();
        let upstream_connect = reg(
            &registry,
            Histogram::with_opts(hopts(
                "upstream_connect_duration_seconds",
                "Time to open a new connection to the upstream (DNS, TCP, TLS); the call leaves \
                 that much after its start, and the next start is pushed by it.",
                &[
                    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                ],
            ))
            .expect("valid"),
        );
        let upstream_in_flight = reg(
            &registry,
            IntGauge::with_opts(opts(
                "upstream_calls_in_flight",
                "Upstream calls under way.",
            ))
            .expect("valid"),
        );
        let upstream_retries = reg(
            &registry,
            IntCounter::with_opts(opts(
                "upstream_retries_total",
                "Lookups put back in the queue to retry after an upstream penalty.",
            ))
            .expect("valid"),
        );

        // Circuit breaker
        let breaker_state = reg(
            &registry,
            IntGauge::with_opts(opts(
                "breaker_state",
                "Circuit breaker state: 0 closed, 1 half-open (one probe call), 2 open \
                 (lookups refused).",
            ))
            .expect("valid"),
        );
        let transitions_vec = reg(
            &registry,
            IntCounterVec::new(
                opts(
                    "breaker_transitions_total",
                    "Circuit breaker state changes, by the state entered.",
                ),
                &["to"],
            )
            .expect("valid"),
        );
        let breaker_transitions = ["closed", "half_open", "open"]
            .into_iter()
            .map(|to| (to, transitions_vec.with_label_values(&[to])))
            .collect();

        // Shared mode (Redis)
        let pacing_mode = reg(
            &registry,
            IntGauge::with_opts(opts(
                "pacing_mode",
                "How this replica paces: 0 local (no Redis configured), 1 shared (one schedule \
                 in Redis), 2 fallback (Redis out of reach: a local share of the rate).",
            ))
            .expect("valid"),
        );
        let shared_fallbacks = reg(
            &registry,
            IntCounter::with_opts(opts(
                "shared_fallbacks_total",
                "Times this replica lost Redis and fell back to pacing alone.",
            ))
            .expect("valid"),
        );
        let ops_vec = reg(
            &registry,
            IntCounterVec::new(
                opts(
                    "redis_operations_total",
                    "Redis operations in shared mode, by operation and outcome.",
                ),
                &["op", "outcome"],
            )
            .expect("valid"),
        );
        let mut redis_ops = HashMap::new();
        for op in REDIS_OPS {
            for outcome in RedisOutcome::ALL {
                redis_ops.insert(
                    (op, outcome),
                    ops_vec.with_label_values(&[op, outcome.as_str()]),
                );
            }
        }
        let redis_duration_vec = reg(
            &registry,
            HistogramVec::new(
                hopts(
                    "redis_operation_duration_seconds",
                    "Redis round trips in shared mode, by operation.",
                    &[
                        0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
                    ],
                ),
                &["op"],
            )
            .expect("valid"),
        );
        let redis_duration = REDIS_OPS
            .into_iter()
            .map(|op| (op, redis_duration_vec.with_label_values(&[op])))
            .collect();
        let shared_cache_vec = reg(
            &registry,
            IntCounterVec::new(
                opts(
                    "shared_cache_lookups_total",
                    "Lookups of the shared (Redis) cache tier after a local miss, by result.",
                ),
                &["result"],
            )
            .expect("valid"),
        );
        let shared_cache = [(true, "hit"), (false, "miss")]
            .into_iter()
            .map(|(hit, name)| (hit, shared_cache_vec.with_label_values(&[name])))
            .collect();
        let shared_flights_vec = reg(
            &registry,
            IntCounterVec::new(
                opts(
                    "shared_flights_total",
                    "Lookups coordinated across replicas: leader (this replica calls for all) or \
                     follower (another replica's call is shared).",
                ),
                &["role"],
            )
            .expect("valid"),
        );
        let shared_flights = [(true, "leader"), (false, "follower")]
            .into_iter()
            .map(|(leader, name)| (leader, shared_flights_vec.with_label_values(&[name])))
            .collect();

        // Connections
        let open_vec = reg(
            &registry,
            IntGaugeVec::new(
                opts(
                    "http_connections_open",
                    "Client connections open, by listener.",
                ),
                &["listener"],
            )
            .expect("valid"),
        );
        let connections_open = Listener::ALL
            .into_iter()
            .map(|l| (l, open_vec.with_label_values(&[l.as_str()])))
            .collect();
        let refused_vec = reg(
            &registry,
            IntCounterVec::new(
                opts(
                    "http_connections_refused_total",
                    "Connections answered 503 and closed before any request was read, by \
                     listener and reason (limit: max-connections reached; shutdown).",
                ),
                &["listener", "reason"],
            )
            .expect("valid"),
        );
        let mut connections_refused = HashMap::new();
        for l in Listener::ALL {
            for (r, name) in [
                (ConnectionRefusal::Limit, "limit"),
                (ConnectionRefusal::Shutdown, "shutdown"),
            ] {
                connections_refused
                    .insert((l, r), refused_vec.with_label_values(&[l.as_str(), name]));
            }
        }
        let errors_vec = reg(
            &registry,
            IntCounterVec::new(
                opts(
                    "http_connection_errors_total",
                    "Connections that ended in an error, by listener and kind (header_timeout \
                     counts slow or idle clients cut off by header-read-timeout).",
                ),
                &["listener", "kind"],
            )
            .expect("valid"),
        );
        let mut connection_errors = HashMap::new();
        for l in Listener::ALL {
            for k in ConnectionError::ALL {
                connection_errors.insert(
                    (l, k),
                    errors_vec.with_label_values(&[l.as_str(), k.as_str()]),
                );
            }
        }

        Metrics {
            registry,
            enabled: config.enabled,
            http_requests,
            http_requests_vec,
            http_duration,
            http_duration_vec,
            http_in_flight,
            validation_rejections,
            cache_lookups,
            cache_entries,
            cache_evictions,
            queue_depth,
            queue_admissions,
            queue_wait,
            queue_refusals,
            queue_abandoned,
            permit_wait,
            penalties,
            penalty_seconds,
            penalty_active,
            unused_slots,
            book_duration,
            upstream_calls,
            upstream_calls_vec: calls_vec,
            upstream_duration,
            upstream_in_flight,
            upstream_retries,
            upstream_connect,
            breaker_state,
            breaker_transitions,
            pacing_mode,
            shared_fallbacks,
            redis_ops,
            redis_duration,
            shared_cache,
            shared_flights,
            connections_open,
            connections_refused,
            connection_errors,
        }
    }

    /// The text exposition format (version 0.0.4).
    pub fn render(&self) -> String {
        let mut out = Vec::with_capacity(16 * 1024);
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .expect("encoding to a Vec cannot fail");
        String::from_utf8(out).expect("the text format is UTF-8")
    }

    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    // HTTP

    /// Whether per-request recording is on.
    pub fn enabled(&self) -> bool {
        self.enabled
    }

    pub fn http_request(&self, route: Route, code: u16, outcome: &'static str, elapsed: Duration) {
        if !self.enabled {
            return;
        }
        let r = route as usize;
        match KNOWN_CODES.iter().position(|&c| c == code) {
            Some(i) => self.http_requests[r][i].inc(),
            None => self
                .http_requests_vec
                .with_label_values(&[route.as_str(), &code.to_string()])
                .inc(),
        }
        let secs = elapsed.as_secs_f64();
        match self.http_duration[r].iter().find(|(o, _)| *o == outcome) {
            Some((_, h)) => h.observe(secs),
            None => self
                .http_duration_vec
                .with_label_values(&[route.as_str(), outcome])
                .observe(secs),
        }
    }

    pub fn http_in_flight(&self, route: Route) -> &IntGauge {
        &self.http_in_flight[&route]
    }

    // Validation

    pub fn validation_rejected(&self, reason: &'static str) {
        if !self.enabled {
            return;
        }
        if let Some(c) = self.validation_rejections.get(reason) {
            c.inc();
        }
    }

    // Cache

    pub fn cache_lookup(&self, result: CacheResult) {
        if !self.enabled {
            return;
        }
        self.cache_lookups[&result].inc();
    }

    pub fn cache_evicted(&self, cause: Eviction) {
        self.cache_evictions[cause.as_str()].inc();
    }

    pub fn set_cache_entries(&self, n: u64) {
        self.cache_entries.set(n as i64);
    }

    // Queue

    pub fn set_queue_depth(&self, depth: usize) {
        self.queue_depth.set(depth as i64);
    }

    pub fn queue_admitted(&self) {
        self.queue_admissions.inc();
    }

    pub fn queue_wait(&self, waited: Duration) {
        self.queue_wait.observe(waited.as_secs_f64());
    }

    pub fn queue_refused(&self, reason: QueueRefusal) {
        self.queue_refusals[&reason].inc();
    }

    pub fn queue_abandoned(&self) {
        self.queue_abandoned.inc();
    }

    // Pacing

    pub fn permit_wait(&self, waited: Duration) {
        self.permit_wait.observe(waited.as_secs_f64());
    }

    pub fn penalty_received(&self) {
        self.penalties.inc();
    }

    pub fn penalty_paused(&self, paused: Duration) {
        self.penalty_seconds.inc_by(paused.as_secs_f64());
    }

    pub fn set_penalty_active(&self, active: bool) {
        self.penalty_active.set(i64::from(active));
    }

    pub fn unused_slot(&self, why: SlotUnused) {
        self.unused_slots[&why].inc();
    }

    pub fn pacing_booked(&self, took: Duration) {
        self.book_duration.observe(took.as_secs_f64());
    }

    // Upstream

    /// A new connection to the upstream, opened in `took`.
    pub fn upstream_connect(&self, took: Duration) {
        self.upstream_connect.observe(took.as_secs_f64());
    }

    pub fn upstream_call(&self, status: Option<u16>, outcome: UpstreamOutcome, took: Duration) {
        let class = status_class(status);
        match self.upstream_calls.get(&(class, outcome)) {
            Some(c) => c.inc(),
            None => self
                .upstream_calls_vec
                .with_label_values(&[class, outcome.as_str()])
                .inc(),
        }
        self.upstream_duration[&outcome].observe(took.as_secs_f64());
    }

    pub fn upstream_in_flight(&self) -> &IntGauge {
        &self.upstream_in_flight
    }

    pub fn upstream_retry(&self) {
        self.upstream_retries.inc();
    }

    // Circuit breaker

    pub fn breaker_transition(&self, state: crate::lookup::breaker::BreakerState) {
        self.breaker_state.set(state.level());
        self.breaker_transitions[state.as_str()].inc();
    }

    // Shared mode

    pub fn set_pacing_mode(&self, mode: crate::lookup::pacing::PacingMode) {
        use crate::lookup::pacing::PacingMode;
        self.pacing_mode.set(match mode {
            PacingMode::Local => 0,
            PacingMode::Shared => 1,
            PacingMode::Fallback => 2,
        });
    }

    pub fn shared_fallback(&self) {
        self.shared_fallbacks.inc();
    }

    pub fn redis_op(&self, op: &'static str, outcome: RedisOutcome, took: Duration) {
        if let Some(c) = self.redis_ops.get(&(op, outcome)) {
            c.inc();
        }
        if outcome != RedisOutcome::Unavailable
            && let Some(h) = self.redis_duration.get(op)
        {
            h.observe(took.as_secs_f64());
        }
    }

    pub fn shared_cache_lookup(&self, hit: bool) {
        self.shared_cache[&hit].inc();
    }

    pub fn shared_flight(&self, leader: bool) {
        self.shared_flights[&leader].inc();
    }

    // Connections

    pub fn connections_open(&self, listener: Listener) -> &IntGauge {
        &self.connections_open[&listener]
    }

    pub fn connection_refused(&self, listener: Listener, reason: ConnectionRefusal) {
        self.connections_refused[&(listener, reason)].inc();
    }

    pub fn connection_error(&self, listener: Listener, kind: ConnectionError) {
        self.connection_errors[&(listener, kind)].inc();
    }
}

/// Increments a gauge now and decrements it when dropped, whatever path the code takes
/// (including a cancelled future).
pub struct GaugeGuard<'a>(&'a IntGauge);

impl<'a> GaugeGuard<'a> {
    pub fn new(gauge: &'a IntGauge) -> Self {
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

    fn metrics() -> Metrics {
        Metrics::new(&MetricsConfig {
            enabled: true,
            rate_per_second: 1.0,
            interval: Duration::from_millis(1010),
            queue_capacity: 20,
            queue_timeout: Duration::from_secs(120),
        })
    }

    #[test]
    fn names_follow_conventions() {
        let text = metrics().render();
        for line in text.lines().filter(|l| l.starts_with("# TYPE")) {
            let mut parts = line.split_whitespace().skip(2);
            let (name, kind) = (parts.next().unwrap(), parts.next().unwrap());
            assert!(name.starts_with("score_proxy_"), "{name}");
            if kind == "counter" {
                assert!(name.ends_with("_total"), "{name}");
            }
        }
        assert!(text.contains("score_proxy_build_info{version=\""));
        assert!(text.contains("score_proxy_queue_capacity 20"));
    }

    #[test]
    fn route_discriminants_index_the_tables() {
        for (i, route) in Route::ALL.into_iter().enumerate() {
            assert_eq!(route as usize, i);
        }
    }

    #[test]
    fn queue_buckets_reach_past_the_queue_timeout() {
        let text = metrics().render();
        assert!(
            text.contains("score_proxy_queue_wait_seconds_bucket{le=\"240\"}"),
            "{text}"
        );
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
