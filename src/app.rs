//! The application: every stage wired together, and a lookup's path through them.
//!
//! [`App::lookup`] reads top to bottom as the pipeline: validation, cache, coalescing and
//! admission, then waiting while the dispatcher paces and makes the call.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{Semaphore, watch};
use tokio::time::Instant;
use tracing::Instrument;

use crate::config::Config;
use crate::jobs::{Jobs, JobsConfig};
use crate::lookup::breaker::Breaker;
use crate::lookup::cache::CacheResult;
use crate::lookup::cache::{CacheConfig, CacheLookup, CachedScore, LocalCache, ScoreCache};
use crate::lookup::dispatch::Dispatcher;
use crate::lookup::error::ProxyError;
use crate::lookup::pacing::{Guard, GuardReason, LocalPacer, Pacer, PacingMode, StartGate};
use crate::lookup::refresh_ahead::RefreshAhead;
use crate::lookup::scheduler::{BackgroundReason, FlightInfo, Joined, Scheduler, Source};
use crate::lookup::upstream::UpstreamClient;
use crate::lookup::validation::{self, ClientId};
use crate::shared::{Shared, SharedConfig};
use crate::shutdown::Lifecycle;
use crate::store::{Store, StoreConfig};
use crate::telemetry::metrics::{Metrics, MetricsConfig};
use crate::telemetry::redact;
use crate::telemetry::{self, FlightOrigin, HeadStages, RequestSpan, TraceIds};

/// A score, and how it was obtained.
#[derive(Debug)]
pub(crate) struct Answer {
    pub(crate) body: Bytes,
    pub(crate) cache: CacheResult,
    /// How old the answer is (for `Age`).
    pub(crate) age: Duration,
}

/// What one lookup went through, for its access log line and span attributes.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct LookupReport {
    pub(crate) cache: Option<CacheResult>,
    pub(crate) flight: FlightInfo,
}

pub struct App {
    pub(crate) config: Config,
    pub metrics: Arc<Metrics>,
    pub(crate) cache: Arc<LocalCache>,
    /// The persistent tier behind the cache, when `--data-dir` is set and usable.
    pub(crate) store: Option<Arc<Store>>,
    pub scheduler: Arc<Scheduler>,
    pub pacer: Arc<dyn Pacer>,
    /// Shared mode's Redis side, when `--redis-url` is set.
    pub shared: Option<Arc<Shared>>,
    pub breaker: Arc<Breaker>,
    pub(crate) dispatcher: Arc<Dispatcher>,
    /// Counts hits near expiry and asks for their refresh, when `--refresh-ahead` is set.
    pub(crate) refresh_ahead: Option<Arc<RefreshAhead>>,
    /// Bulk jobs (`/jobs`), their items looked up with budget no caller needs.
    pub(crate) jobs: Arc<Jobs>,
    lifecycle: watch::Sender<Lifecycle>,
    pub(crate) started_at: Instant,
}

impl App {
    /// Builds every stage from a validated configuration. Spawns nothing: see
    /// [`crate::http::server`] for the tasks.
    pub(crate) fn new(config: Config) -> anyhow::Result<Arc<App>> {
        if let Some(key) = &config.redaction_key {
            redact::set_key(key);
        }
        let interval = LocalPacer::interval_for(config.rate_per_second, config.rate_guard);
        let metrics = Arc::new(Metrics::new(&MetricsConfig {
            enabled: config.metrics_enabled,
            rate_per_second: config.rate_per_second,
            interval,
            queue_capacity: config.queue_capacity,
            queue_timeout: config.queue_timeout,
            expected_replicas: config.redis.as_ref().map_or(1, |r| r.expected_replicas),
        }));
        // The guard learns from this process's calls; in shared mode the fleet's largest
        // comes back with every booking (see `pacing::guard`).
        let base = LocalPacer::interval_for(config.rate_per_second, Duration::ZERO);
        let guard = Arc::new(Guard::new(config.rate_guard, config.rate_guard_max));
        metrics.set_pacing_guard(guard.floor(), GuardReason::Floor, guard.ceiling());
        // One process paces alone; replicas share a schedule (and a cache tier) in Redis.
        let shared = match &config.redis {
            None => None,
            Some(redis) => Some(Shared::new(
                SharedConfig {
                    url: redis.url.clone(),
                    prefix: redis.prefix.clone(),
                    timeout: redis.timeout,
                    expected_replicas: redis.expected_replicas,
                    base,
                    replica_index: redis.replica_index,
                    cache_ttl: config.cache_ttl,
                    stale_for: config.stale_if_error,
                    upstream_timeout: config.upstream_timeout,
                    key_secret: config.redaction_key.clone().unwrap_or_default(),
                },
                guard.clone(),
                metrics.clone(),
            )?),
        };
        let pacer: Arc<dyn Pacer> = match &shared {
            Some(shared) => shared.clone(),
            None => {
                metrics.set_pacing_mode(PacingMode::Local);
                Arc::new(LocalPacer::adaptive(base, guard.clone()))
            }
        };
        let breaker = {
            let metrics = metrics.clone();
            Arc::new(Breaker::new(
                config.breaker_failures,
                config.breaker_cooldown,
                move |state| metrics.breaker_transition(state),
            ))
        };
        // The persistent tier first: what it kept warms the memory cache before anything
        // is served, and every answer after that is written through to it.
        let (store, warm, kept_jobs) = match &config.persist {
            Some(persist) => {
                let started = Store::start(
                    StoreConfig {
                        dir: persist.dir.clone(),
                        key: persist.key.clone(),
                        ttl: config.cache_ttl,
                        // Kept as long as either stale window may still answer from it.
                        stale_for: config.stale_if_error.max(config.stale_while_revalidate),
                        max_entries: config.cache_max_entries,
                    },
                    metrics.clone(),
                );
                (started.store, started.entries, started.jobs)
            }
            None => {
                tracing::info!(
                    "persistent cache off (no --data-dir): a restart starts with an empty cache"
                );
                (None, Vec::new(), Vec::new())
            }
        };
        // A restart right after a call: the first start keeps its spacing from that call.
        if let Some((_, newest)) = warm.first()
            && shared.is_none()
        {
            let since = newest.fetched_at.elapsed();
            let interval = pacer.interval();
            if since < interval {
                pacer.start_after(Instant::now() + (interval - since));
            }
        }
        let cache = {
            let metrics = metrics.clone();
            let cache = LocalCache::revalidating(
                &CacheConfig {
                    ttl: config.cache_ttl,
                    stale_for: config.stale_if_error,
                    max_entries: config.cache_max_entries,
                },
                config.stale_while_revalidate,
                move |cause| metrics.cache_evicted(cause),
            );
            let cache = match &store {
                Some(store) => cache.with_write_through(store.clone()),
                None => cache,
            };
            // Oldest first, so the newest are the last in (and the first kept).
            for (key, score) in warm.into_iter().rev() {
                cache.warm(key, score);
            }
            Arc::new(cache)
        };
        let scheduler = Scheduler::new(
            config.queue_capacity,
            config.queue_timeout,
            pacer.clone(),
            shared.clone(),
            breaker.clone(),
            cache.clone(),
            metrics.clone(),
        );
        // One process: starts a whole interval apart, from the real departures. Shared
        // pacing: a start may be up to the late tolerance behind its slot, which the spacing
        // from this replica's own previous start gives back (see `StartGate::fleet`).
        let gate = Arc::new(match &shared {
            Some(_) => StartGate::fleet(base, guard.clone()),
            None => StartGate::adaptive(base, guard.clone()),
        });
        let upstream = Arc::new(UpstreamClient::new(
            config.upstream_url.clone(),
            config.upstream_timeout,
            on_connect(gate.clone(), pacer.clone(), metrics.clone()),
        )?);
        let dispatcher = Arc::new(Dispatcher {
            scheduler: scheduler.clone(),
            pacer: pacer.clone(),
            gate,
            breaker: breaker.clone(),
            upstream,
            metrics: metrics.clone(),
            in_flight: Arc::new(Semaphore::new(config.upstream_max_in_flight)),
            default_penalty: config.upstream_penalty,
            guard,
            breaker_cooldown: config.breaker_cooldown,
            recent: Arc::default(),
        });
        // In shared mode a refresh would be answered from the shared tier's copy of the
        // same entry (still fresh there too), so it would never reach the upstream.
        let jobs = Jobs::new(
            JobsConfig {
                max_items: config.job_max_items,
                per_client: config.jobs_per_client,
                retention: config.job_retention,
            },
            scheduler.clone(),
            cache.clone(),
            store.clone(),
            shared.clone(),
            metrics.clone(),
            kept_jobs,
        );
        let refresh_ahead = match (config.refresh_ahead.is_zero(), &shared) {
            (true, _) => None,
            (false, Some(_)) => {
                tracing::warn!(
                    "--refresh-ahead is not available in shared mode (the shared cache tier \
                     would answer the refresh with the entry it refreshes): it is off"
                );
                None
            }
            (false, None) => Some(Arc::new(RefreshAhead::new(
                config.cache_ttl,
                config.refresh_ahead,
            ))),
        };
        Ok(Arc::new(App {
            refresh_ahead,
            jobs,
            config,
            metrics,
            cache,
            store,
            scheduler,
            pacer,
            shared,
            breaker,
            dispatcher,
            lifecycle: watch::channel(Lifecycle::Running).0,
            started_at: Instant::now(),
        }))
    }

    pub(crate) fn default_client_id(&self) -> Option<&ClientId> {
        self.config.client_id.as_ref()
    }

    /// One `/proxy/score` lookup, from the raw query string to an answer or an error.
    ///
    /// `queue_timeout` is the raw `X-Queue-Timeout` header, if the client sent one: it can
    /// only shorten the configured queue timeout, for this lookup. `request` is the
    /// request's server span (none when it is not traced); it becomes a `tracing` span, and
    /// is entered, only around the fetch, where the stages that follow are its children: a
    /// hit never does either.
    pub(crate) async fn lookup(
        &self,
        raw_query: Option<&str>,
        queue_timeout: Option<&[u8]>,
        trace: &TraceIds,
        request: &RequestSpan,
        report: &mut LookupReport,
    ) -> Result<Answer, ProxyError> {
        // A traced lookup's first two stages are timed, not spanned: a hit is one span.
        let mut stages = HeadStages::start(trace);

        // 1. Validation: a bad CPF or client id is refused here and costs no upstream budget.
        let validated = {
            let rejected = |e: validation::QueryError| {
                self.metrics.validation_rejected(e.reason());
                ProxyError::InvalidQuery(e)
            };
            validation::parse_lookup(raw_query, self.default_client_id())
                .and_then(|key| {
                    let max_wait = queue_timeout
                        .map(validation::parse_queue_timeout)
                        .transpose()?;
                    Ok((key, max_wait))
                })
                .map_err(rejected)
        };
        if let Some(stages) = &mut stages {
            stages.validated();
        }
        let (key, max_wait) = match validated {
            Ok(v) => v,
            Err(e) => {
                if let Some(stages) = &stages {
                    stages.spans(request);
                }
                return Err(e);
            }
        };
        // Keyed-hash tags, never the values; computed only when a span records them.
        request.record_key(|| (redact::cpf(key.cpf), redact::client(&key.client_id)));

        // 2. Cache, keyed by client id and CPF: a hit never leaves this process.
        let cached = self.cache.get(&key);
        if let Some(stages) = &mut stages {
            stages.looked_up();
            match cached {
                CacheLookup::Fresh(_) | CacheLookup::Revalidate(_) => stages.hit(request),
                CacheLookup::Stale(_) | CacheLookup::Miss => stages.spans(request),
            }
        }
        let stale = match cached {
            CacheLookup::Fresh(hit) => {
                if let Some(ahead) = &self.refresh_ahead {
                    ahead.hit(&key, &hit);
                }
                return Ok(self.hit(hit, report));
            }
            // Stale-while-revalidate: answered now, fetched again in the background with
            // budget no caller needs (see `scheduler/background.rs`).
            CacheLookup::Revalidate(old) => {
                self.metrics.cache_lookup(CacheResult::Hit);
                self.metrics.revalidating_answer();
                self.scheduler.refresh_later(
                    &key,
                    BackgroundReason::Revalidate,
                    Some(old.fetched_at),
                );
                return Ok(self.answer(old, CacheResult::Stale, report));
            }
            CacheLookup::Stale(old) => Some(old),
            CacheLookup::Miss => None,
        };

        // 3-4. Fetch through the queue, the pacer and the upstream.
        let request_span = request.tracing_span();
        match self
            .fetch(&key, max_wait, trace, &request_span, report)
            .instrument(request_span.clone())
            .await
        {
            // Stale-if-error: an expired answer beats an error the caller can do nothing
            // about (the upstream failing or out of reach in time), never one that concerns
            // the caller (a rejected client id).
            Err(e) if e.stale_ok() && stale.is_some() => {
                let old = stale.expect("checked");
                self.metrics.stale_answer();
                request_span.record("score_proxy.stale_after", e.kind());
                Ok(self.answer(old, CacheResult::Stale, report))
            }
            other => other,
        }
    }

    /// Stages 3 and 4: coalescing, admission, and the wait for the dispatcher.
    async fn fetch(
        &self,
        key: &validation::LookupKey,
        max_wait: Option<Duration>,
        trace: &TraceIds,
        request_span: &tracing::Span,
        report: &mut LookupReport,
    ) -> Result<Answer, ProxyError> {
        // 3. Coalescing and admission: join an identical lookup already on its way, or
        //    queue a new one, or be refused at once (429 when full, 503 when it could not
        //    start before its deadline or the breaker is open). Never a wait that ends in
        //    nothing.
        let joined = self
            .scheduler
            .join(key, max_wait, || {
                FlightOrigin::new(request_span.clone(), *trace)
            })
            // Refused before joining anything (an open breaker, shutdown): still a miss, so
            // that every valid lookup is counted once.
            .inspect_err(|_| self.metrics.cache_lookup(CacheResult::Miss))?;

        // 4. Wait while the dispatcher paces and calls. If the client hangs up, axum drops
        //    this future, the waiter leaves, and an unstarted lookup leaves the queue.
        let (mut waiter, cache_result) = match joined {
            Joined::Cached(hit) => return Ok(self.hit(hit, report)),
            Joined::Leader(waiter) => (waiter, CacheResult::Miss),
            Joined::Follower(waiter) => (waiter, CacheResult::Coalesced),
        };
        self.metrics.cache_lookup(cache_result);
        report.cache = Some(cache_result);
        if cache_result == CacheResult::Miss {
            // The start slot was booked at admission (the `pacing.permit` span: under the
            // scheduler's lock in one process, on a task in shared mode); now wait in the
            // queue until the call starts.
            if let Some(position) = waiter.queued().await {
                waiter
                    .started()
                    .instrument(telemetry::stage_span(trace, || {
                        tracing::info_span!("queue.wait", score_proxy.queue.position = position)
                    }))
                    .await;
            }
        }

        let mut closed = self.lifecycle.subscribe();
        let wait_span = telemetry::stage_span(trace, || match cache_result {
            CacheResult::Coalesced => tracing::info_span!("coalesce.wait"),
            _ => tracing::info_span!("upstream.wait"),
        });
        let result = tokio::select! {
            result = waiter.wait().instrument(wait_span.clone()) => result,
            _ = closed.wait_for(|l| *l == Lifecycle::Closed) => Err(ProxyError::ShuttingDown),
        };
        if cache_result == CacheResult::Coalesced {
            telemetry::link_to_call(&wait_span, &waiter.flight().origin);
        }
        report.flight = waiter.flight().info();
        // In shared mode the answer may have come from another replica.
        let cache_result = match report.flight.source {
            Source::SharedCache if cache_result == CacheResult::Miss => CacheResult::Hit,
            Source::Replica if cache_result == CacheResult::Miss => CacheResult::Coalesced,
            _ => cache_result,
        };
        result.map(|score| self.answer(score, cache_result, report))
    }

    /// An answer from the local cache (counted as a hit).
    fn hit(&self, score: CachedScore, report: &mut LookupReport) -> Answer {
        self.metrics.cache_lookup(CacheResult::Hit);
        self.answer(score, CacheResult::Hit, report)
    }

    fn answer(&self, score: CachedScore, cache: CacheResult, report: &mut LookupReport) -> Answer {
        report.cache = Some(cache);
        Answer {
            age: score.fetched_at.elapsed(),
            body: score.body,
            cache,
        }
    }

    pub(crate) fn lifecycle(&self) -> Lifecycle {
        *self.lifecycle.borrow()
    }

    /// Shutdown has begun: admit only what can start within `grace`.
    pub(crate) fn begin_drain(&self, grace: Duration) {
        self.scheduler.begin_drain(Instant::now() + grace);
        self.lifecycle.send_replace(Lifecycle::Draining);
    }

    /// The grace period is over: answer everything still waiting with 503.
    pub(crate) fn close(&self) {
        self.scheduler.close();
        self.lifecycle.send_replace(Lifecycle::Closed);
        // Nothing more will be answered: the store commits what it has queued and stops.
        if let Some(store) = &self.store {
            store.close();
        }
    }

    /// Shared mode: a switch between the shared schedule and fallback voids every start
    /// slot booked under the other, and books again under the new one. Slots booked in
    /// Redis are not known to a replica's fallback grid, nor grid slots to Redis: keeping
    /// them would run two schedules at once (see `shared/division.rs`).
    pub(crate) async fn follow_pacing_mode(self: Arc<Self>) {
        let Some(shared) = &self.shared else {
            return;
        };
        let mut changes = shared.mode_changes();
        while changes.changed().await.is_ok() {
            let mode = *changes.borrow_and_update();
            let void = self.scheduler.booked_slots();
            self.scheduler
                .void_slots_before(Instant::now() + Duration::from_secs(86_400 * 365));
            self.scheduler.replenish();
            tracing::debug!(?mode, void, "pacing mode changed: start slots booked again");
        }
    }

    /// Upstream calls under way.
    pub(crate) fn processing(&self) -> i64 {
        self.metrics.upstream_in_flight().get()
    }
}

/// What a new upstream connection means for pacing. The call that opened it left when it
/// was ready, not when it started (a TLS handshake to the real API takes tens of
/// milliseconds, far more than the guard): the next start counts from the departure, and in
/// shared mode, if it left later than a slot may be used, the other replicas are held off
/// for an interval after it.
fn on_connect(
    gate: Arc<StartGate>,
    pacer: Arc<dyn Pacer>,
    metrics: Arc<Metrics>,
) -> crate::lookup::upstream::OnConnect {
    Arc::new(move |took, ready| {
        metrics.upstream_connect(took);
        let late = gate.note_departure(ready);
        tracing::debug!(
            took_ms = took.as_secs_f64() * 1e3,
            late_ms = late.as_secs_f64() * 1e3,
            "upstream connection opened"
        );
        if pacer
            .late_tolerance()
            .is_some_and(|tolerance| late > tolerance)
        {
            let pacer = pacer.clone();
            tokio::spawn(async move { pacer.hold(ready + pacer.interval()).await });
        }
    })
}
