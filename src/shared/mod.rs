//! Several replicas, one upstream budget: the start schedule, the penalty, a second cache tier
//! and flight leases, shared through Redis; and a safe fallback when Redis is out of reach.
//!
//! - **Schedule.** [`Shared`] implements [`Pacer`]: a Lua script books the next start slot in
//!   one hash (`<prefix>:pace`) using Redis's own clock (`TIME`), so replica clocks do not
//!   matter: the reply gives the slot on Redis's clock, and the replica puts it on its own
//!   through its best estimate of the offset between the two (the reading, from the health
//!   check's `TIME` or a booking, with the shortest round trip in the last 10 s: off by at
//!   most half of that round trip, a few hundredths of a millisecond on a quiet loopback,
//!   and the same for every slot, so a replica's own slots keep their spacing however slow
//!   a booking was; the guard must cover the rest). Slots are `interval` apart
//!   across all replicas; capacity counts every replica's booked slots, so `queue-capacity`
//!   and deadlines keep their meaning fleet-wide. A slot booked for a lookup whose client
//!   then leaves stays booked: the replica gives it to its next lookup, or lets it pass
//!   unused. It cannot be handed back, because later slots were already booked behind it.
//! - **Penalty.** A 429 seen by any replica is written to the same hash; every booking
//!   script starts after it, and every reply tells the replica how much of it is left. The
//!   same script publishes it on `<prefix>:penalty`, so that replicas holding slots already
//!   booked inside it give them up at their start gate instead of calling into it. A call
//!   that left late (it had to open a connection) is announced the same way, as a hold for
//!   an interval after it.
//! - **Cache.** On a local miss, the flight looks in Redis (`<prefix>:cache:<tag>`, same TTL
//!   and stale window) before anything else; a fetched answer is written there for the
//!   others.
//! - **Coalescing.** Before booking, the flight takes a lease (`<prefix>:flight:<tag>`, `SET
//!   NX PX`). If another replica holds it, the flight waits for that replica's word on
//!   `<prefix>:done:<tag>` (pub/sub), then reads the shared cache.
//!
//! `<tag>` is a keyed hash of (client id, CPF) under `SCORE_PROXY_REDACTION_KEY`, which all
//! replicas share: Redis never sees a CPF or a client id as a key, and the key rules are the
//! local cache's (no client ever gets an answer fetched with another's id).
//!
//! **Redis trouble.** Every Redis operation has a short timeout. The first failure switches
//! the replica to fallback: a local pacer at `rate / expected-replicas`, no shared cache, no
//! cross-replica coalescing. A health check pings Redis every 500 ms and returns to shared
//! mode after two good pings. `/ready`, `/status`, the metrics and the log say which mode is
//! on. Fallback keeps the fleet's *average* rate within the budget but, with no shared clock,
//! cannot keep two replicas' calls an interval apart: the upstream may penalise some of them
//! (each replica then pauses on its own), which is why Redis trouble is worth an alert.

pub mod ops;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use futures_util::StreamExt;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::Instrument;

use crate::lookup::cache::CachedScore;
use crate::lookup::error::ProxyError;
use crate::lookup::pacing::{BookError, BoxFuture, LocalPacer, Pacer, PacingMode};
use crate::lookup::validation::LookupKey;
use crate::telemetry::metrics::Metrics;
use ops::RedisOutcome;

/// Settings of shared mode.
#[derive(Clone, Debug)]
pub struct SharedConfig {
    pub url: String,
    pub prefix: String,
    /// Longest any Redis operation may take before the replica falls back.
    pub timeout: Duration,
    /// How many replicas share the budget when Redis is gone (the fallback rate divides by it).
    pub expected_replicas: u32,
    pub interval: Duration,
    pub guard: Duration,
    pub cache_ttl: Duration,
    pub stale_for: Duration,
    /// How long a flight lease lives beyond the lookup's deadline (its call's timeout).
    pub upstream_timeout: Duration,
    /// The shared secret the cache and lease keys are hashed with.
    pub key_secret: String,
}

/// Books the next start at least ARGV[4] µs ahead (time for the replica to be waiting for
/// it, rather than racing it). The answer, in µs relative to Redis's clock:
/// `[code, value, penalty_left, now]` (`now` absolute, for the replica's clock estimate).
/// code 0: booked, value = wait until the slot; 1: full, value = wait until a place frees;
/// 2: too late, value = by how much.
const BOOK: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local next_free = tonumber(redis.call('HGET', KEYS[1], 'next') or '0')
local penalty = tonumber(redis.call('HGET', KEYS[1], 'penalty') or '0')
local interval = tonumber(ARGV[1])
local max_wait = tonumber(ARGV[2])
local capacity = tonumber(ARGV[3])
local lead = tonumber(ARGV[4])
local from = math.max(now, penalty)
local start = math.max(from, next_free, now + lead)
local penalty_left = math.max(0, penalty - now)
if math.floor((start - from) / interval) >= capacity then
  return {1, math.max(0, start - from - capacity * interval), penalty_left, now}
end
if start - now > max_wait then
  return {2, start - now - max_wait, penalty_left, now}
end
redis.call('HSET', KEYS[1], 'next', start + interval)
redis.call('PEXPIRE', KEYS[1], 86400000)
return {0, start - now, penalty_left, now}
"#;

/// Records a penalty lasting ARGV[1] µs from Redis's now (the longest penalty wins), and
/// publishes what is left of it, in µs, on KEYS[2] for the replicas holding slots inside it.
const PENALIZE: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local until_ = now + tonumber(ARGV[1])
local penalty = tonumber(redis.call('HGET', KEYS[1], 'penalty') or '0')
if until_ > penalty then
  redis.call('HSET', KEYS[1], 'penalty', until_)
  penalty = until_
end
local next_free = tonumber(redis.call('HGET', KEYS[1], 'next') or '0')
if until_ > next_free then
  redis.call('HSET', KEYS[1], 'next', until_)
end
redis.call('PEXPIRE', KEYS[1], 86400000)
redis.call('PUBLISH', KEYS[2], string.format('%d', penalty - now))
return 1
"#;

/// Holds every start off until ARGV[1] µs from Redis's now (one of this replica's calls left
/// late: it had to open a connection), and tells the replicas holding slots inside the hold
/// on KEYS[2].
const HOLD: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local until_ = now + tonumber(ARGV[1])
local next_free = tonumber(redis.call('HGET', KEYS[1], 'next') or '0')
if until_ > next_free then
  redis.call('HSET', KEYS[1], 'next', until_)
end
redis.call('PEXPIRE', KEYS[1], 86400000)
redis.call('PUBLISH', KEYS[2], 'hold:' .. string.format('%d', tonumber(ARGV[1])))
return 1
"#;

/// Deletes a lease only if this replica still holds it.
const RELEASE: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"#;

/// One reading of Redis's clock (`TIME`, or the `now` a booking returns) against ours:
/// Redis's time `redis_us` (µs since the epoch) was our `local`, the middle of a round trip
/// of `rtt`, give or take half of it. The sample with the shortest round trip wins, so a
/// booking made while Redis or this process is busy is placed with the offset measured
/// when both were quiet.
#[derive(Clone, Copy, Debug)]
struct ClockSample {
    rtt: Duration,
    local: Instant,
    redis_us: i64,
}

/// How long a clock sample may be preferred to a newer one with a longer round trip.
const CLOCK_SAMPLE_MAX_AGE: Duration = Duration::from_secs(10);

/// What another replica said about a flight it led.
#[derive(Clone, Debug)]
enum Word {
    /// The answer is in the shared cache.
    Ok,
    /// It failed with this error (the same for everyone).
    Failed(ProxyError),
    /// It was given up without an answer (its clients left, or it was refused): try again.
    Gone,
}

/// How a flight was settled before this replica booked anything.
pub enum Resolution {
    /// Another replica's answer was in the shared cache.
    Cached(CachedScore),
    /// Another replica led the same lookup; this is its outcome.
    Remote(Result<CachedScore, ProxyError>),
    /// This replica holds the lease: it books, calls, and tells the others.
    Lead,
    /// Shared mode is off (fallback): proceed as a single process would.
    Local,
}

/// How a led flight ended, for the replicas waiting on it.
pub enum Settled {
    Answered(CachedScore),
    Failed(ProxyError),
    Gone,
}

pub struct Shared {
    config: SharedConfig,
    client: redis::Client,
    conn: Mutex<Option<ConnectionManager>>,
    mode: watch::Sender<PacingMode>,
    /// Pacing while Redis is out of reach.
    fallback: LocalPacer,
    /// The latest penalty end this replica knows of (its own 429s, and Redis's replies).
    penalty: Mutex<Option<Instant>>,
    /// The latest hold (a replica's call that left late) this replica knows of.
    hold: Mutex<Option<Instant>>,
    /// Where Redis's clock stands against ours (see [`ClockSample`]).
    clock: Mutex<Option<ClockSample>>,
    /// Flights waiting for another replica's word, by tag.
    listeners: Mutex<HashMap<String, Vec<oneshot::Sender<Word>>>>,
    good_pings: AtomicU32,
    replica_id: String,
    key: [u8; 32],
    metrics: Arc<Metrics>,
    book: redis::Script,
    penalize: redis::Script,
    hold_script: redis::Script,
    release: redis::Script,
}

impl Shared {
    /// Prepares shared mode (no connection yet: [`Shared::connect`], then [`Shared::start`]).
    pub fn new(config: SharedConfig, metrics: Arc<Metrics>) -> anyhow::Result<Arc<Shared>> {
        let client = redis::Client::open(config.url.as_str())?;
        let fallback = LocalPacer::new(config.interval * config.expected_replicas.max(1));
        let mut id = [0u8; 8];
        getrandom::fill(&mut id).expect("the OS random source is available");
        let key = blake3::derive_key("score-proxy shared keys v1", config.key_secret.as_bytes());
        metrics.set_pacing_mode(PacingMode::Fallback);
        Ok(Arc::new(Shared {
            client,
            conn: Mutex::new(None),
            mode: watch::channel(PacingMode::Fallback).0,
            fallback,
            penalty: Mutex::new(None),
            hold: Mutex::new(None),
            clock: Mutex::new(None),
            listeners: Mutex::new(HashMap::new()),
            good_pings: AtomicU32::new(0),
            replica_id: id.iter().map(|b| format!("{b:02x}")).collect(),
            key,
            metrics,
            book: redis::Script::new(BOOK),
            penalize: redis::Script::new(PENALIZE),
            hold_script: redis::Script::new(HOLD),
            release: redis::Script::new(RELEASE),
            config,
        }))
    }

    /// Connects (bounded by the timeout) and enters shared mode if Redis answers; otherwise
    /// stays in fallback, and the health check keeps trying.
    pub async fn connect(&self) {
        if self.ensure_connection().await.is_some() && self.ping().await {
            self.enter(PacingMode::Shared);
        }
    }

    /// Starts the health check and the pub/sub listener.
    pub fn start(self: &Arc<Self>) -> Vec<JoinHandle<()>> {
        vec![
            tokio::spawn(self.clone().health_loop()),
            tokio::spawn(self.clone().listen_loop()),
        ]
    }

    pub fn mode(&self) -> PacingMode {
        *self.mode.borrow()
    }

    /// Watches the mode (shared or fallback).
    pub fn mode_changes(&self) -> watch::Receiver<PacingMode> {
        self.mode.subscribe()
    }

    fn enter(&self, mode: PacingMode) {
        let changed = self
            .mode
            .send_if_modified(|m| std::mem::replace(m, mode) != mode);
        if changed {
            self.metrics.set_pacing_mode(mode);
            match mode {
                PacingMode::Fallback => {
                    self.metrics.shared_fallback();
                    tracing::warn!(
                        rate_share = 1.0 / f64::from(self.config.expected_replicas.max(1)),
                        "Redis out of reach: pacing alone at a share of the rate, no shared cache"
                    );
                }
                _ => tracing::info!("Redis reachable: back to the shared schedule and cache"),
            }
        }
    }

    fn trouble(&self) {
        self.good_pings.store(0, Ordering::Relaxed);
        self.enter(PacingMode::Fallback);
    }

    async fn ensure_connection(&self) -> Option<ConnectionManager> {
        if let Some(c) = self.conn.lock().unwrap_or_else(|e| e.into_inner()).clone() {
            return Some(c);
        }
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(self.config.timeout))
            .set_response_timeout(Some(self.config.timeout))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_millis(500));
        let connected = tokio::time::timeout(
            self.config.timeout * 3,
            ConnectionManager::new_with_config(self.client.clone(), config),
        )
        .await;
        match connected {
            Ok(Ok(c)) => {
                *self.conn.lock().unwrap_or_else(|e| e.into_inner()) = Some(c.clone());
                Some(c)
            }
            _ => None,
        }
    }

    /// Runs one Redis operation with the timeout, counting and timing it; any failure
    /// switches to fallback.
    async fn op<T, F, Fut>(&self, op: &'static str, f: F) -> Option<T>
    where
        F: FnOnce(ConnectionManager) -> Fut,
        Fut: std::future::Future<Output = redis::RedisResult<T>>,
    {
        let conn = self.conn.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let Some(conn) = conn else {
            self.metrics
                .redis_op(op, RedisOutcome::Unavailable, Duration::ZERO);
            self.trouble();
            return None;
        };
        let span = tracing::info_span!(
            "redis",
            otel.name = op,
            otel.kind = "client",
            db.system = "redis",
            db.operation.name = op,
        );
        let started = Instant::now();
        let result = tokio::time::timeout(self.config.timeout, f(conn))
            .instrument(span)
            .await;
        let took = started.elapsed();
        match result {
            Ok(Ok(value)) => {
                self.metrics.redis_op(op, RedisOutcome::Ok, took);
                Some(value)
            }
            Ok(Err(e)) => {
                self.metrics.redis_op(op, RedisOutcome::Error, took);
                tracing::debug!(op, error = %e, "Redis operation failed");
                self.trouble();
                None
            }
            Err(_) => {
                self.metrics.redis_op(op, RedisOutcome::Timeout, took);
                self.trouble();
                None
            }
        }
    }

    /// Redis's `TIME`: a liveness check, and a sample of its clock against ours (quiet
    /// round trips every 500 ms keep the estimate tight).
    async fn ping(&self) -> bool {
        let sent = Instant::now();
        let time = self
            .op("ping", |mut c| async move {
                redis::cmd("TIME").query_async::<(u64, u64)>(&mut c).await
            })
            .await;
        let Some((secs, micros)) = time else {
            return false;
        };
        self.clock_sample(sent, Instant::now(), (secs * 1_000_000 + micros) as i64);
        true
    }

    /// Keeps the sample with the shortest round trip, replacing it when a new one is as
    /// short or the kept one is older than [`CLOCK_SAMPLE_MAX_AGE`] (clocks drift).
    fn clock_sample(&self, sent: Instant, received: Instant, redis_us: i64) {
        let sample = ClockSample {
            rtt: received - sent,
            local: sent + (received - sent) / 2,
            redis_us,
        };
        let mut clock = self.clock.lock().unwrap_or_else(|e| e.into_inner());
        let keep_old = clock.is_some_and(|old| {
            old.rtt < sample.rtt && received.duration_since(old.local) < CLOCK_SAMPLE_MAX_AGE
        });
        if !keep_old {
            *clock = Some(sample);
        }
    }

    /// Our instant for a time on Redis's clock, from the best clock sample; `None` without
    /// one.
    fn local_time(&self, redis_us: i64) -> Option<Instant> {
        let sample = (*self.clock.lock().unwrap_or_else(|e| e.into_inner()))?;
        let delta = redis_us - sample.redis_us;
        Some(if delta >= 0 {
            sample.local + Duration::from_micros(delta as u64)
        } else {
            sample.local - Duration::from_micros(delta.unsigned_abs())
        })
    }

    async fn health_loop(self: Arc<Self>) {
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if self.ensure_connection().await.is_none() {
                self.trouble();
                continue;
            }
            if self.ping().await {
                let good = self.good_pings.fetch_add(1, Ordering::Relaxed) + 1;
                if good >= 2 {
                    self.enter(PacingMode::Shared);
                }
            }
        }
    }

    /// Routes `<prefix>:done:<tag>` messages to the flights waiting on them, and notes the
    /// penalties published on `<prefix>:penalty`; reconnects whenever the subscription
    /// drops.
    async fn listen_loop(self: Arc<Self>) {
        let pattern = format!("{}:done:*", self.config.prefix);
        let prefix = format!("{}:done:", self.config.prefix);
        let penalty_channel = self.penalty_channel();
        loop {
            let subscribed = tokio::time::timeout(self.config.timeout * 3, async {
                let mut pubsub = self.client.get_async_pubsub().await?;
                pubsub.psubscribe(&pattern).await?;
                pubsub.subscribe(&penalty_channel).await?;
                Ok::<_, redis::RedisError>(pubsub)
            })
            .await;
            if let Ok(Ok(pubsub)) = subscribed {
                let mut messages = pubsub.into_on_message();
                while let Some(msg) = messages.next().await {
                    let channel = msg.get_channel_name();
                    let payload: String = msg.get_payload().unwrap_or_default();
                    if channel == penalty_channel {
                        // What is left of it from Redis's now; counted from its arrival
                        // here, it errs long by the message's trip.
                        let (hold, left) = match payload.strip_prefix("hold:") {
                            Some(left) => (true, left),
                            None => (false, payload.as_str()),
                        };
                        if let Ok(left) = left.parse::<f64>()
                            && left > 0.0
                        {
                            let until =
                                Instant::now() + Duration::from_micros(left.min(1e12) as u64);
                            if hold {
                                self.note_hold(until);
                            } else {
                                self.note_penalty(until);
                            }
                        }
                    } else if let Some(tag) = channel.strip_prefix(&prefix) {
                        self.deliver(tag, parse_word(&payload));
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    fn deliver(&self, tag: &str, word: Word) {
        let waiting = self
            .listeners
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(tag);
        for tx in waiting.into_iter().flatten() {
            let _ = tx.send(word.clone());
        }
    }

    fn listen(&self, tag: &str) -> oneshot::Receiver<Word> {
        let (tx, rx) = oneshot::channel();
        let mut listeners = self.listeners.lock().unwrap_or_else(|e| e.into_inner());
        let list = listeners.entry(tag.to_owned()).or_default();
        list.retain(|tx| !tx.is_closed());
        list.push(tx);
        rx
    }

    /// The Redis name of a lookup: a keyed hash of both halves of the key.
    pub fn tag(&self, key: &LookupKey) -> String {
        let mut h = blake3::Hasher::new_keyed(&self.key);
        h.update(&key.cpf.as_u64().to_le_bytes());
        h.update(key.client_id.as_str().as_bytes());
        h.finalize().to_hex()[..32].to_owned()
    }

    fn cache_key(&self, tag: &str) -> String {
        format!("{}:cache:{tag}", self.config.prefix)
    }

    fn lease_key(&self, tag: &str) -> String {
        format!("{}:flight:{tag}", self.config.prefix)
    }

    fn pace_key(&self) -> String {
        format!("{}:pace", self.config.prefix)
    }

    fn penalty_channel(&self) -> String {
        format!("{}:penalty", self.config.prefix)
    }

    /// Settles a flight before any booking: from the shared cache, from another replica's
    /// call, or by taking the lease to lead it. Waits at most until `wait_until`.
    pub async fn resolve(&self, key: &LookupKey, deadline: Instant) -> Resolution {
        let tag = self.tag(key);
        let lease_for = deadline.saturating_duration_since(Instant::now())
            + self.config.upstream_timeout
            + Duration::from_secs(1);
        let wait_until = deadline + self.config.upstream_timeout;
        let mut counted_follower = false;
        loop {
            if self.mode() != PacingMode::Shared {
                return Resolution::Local;
            }
            // Listen first, so that a word sent between the checks below is not missed.
            let word = self.listen(&tag);
            match self.cache_get(&tag).await {
                Some(Some(score)) => {
                    self.metrics.shared_cache_lookup(true);
                    return Resolution::Cached(score);
                }
                Some(None) => self.metrics.shared_cache_lookup(false),
                None => return Resolution::Local,
            }
            let key = self.lease_key(&tag);
            let id = self.replica_id.clone();
            let ms = lease_for.as_millis().max(1) as u64;
            let taken = self
                .op("lease", |mut c| async move {
                    redis::cmd("SET")
                        .arg(&key)
                        .arg(&id)
                        .arg("NX")
                        .arg("PX")
                        .arg(ms)
                        .query_async::<Option<String>>(&mut c)
                        .await
                })
                .await;
            match taken {
                None => return Resolution::Local,
                Some(Some(_)) => {
                    // The previous leader writes the cache *before* giving up the lease, so
                    // a lease free now may mean an answer arrived since our first look.
                    if let Some(Some(score)) = self.cache_get(&tag).await {
                        self.give_up_lease(&tag).await;
                        self.metrics.shared_cache_lookup(true);
                        return Resolution::Cached(score);
                    }
                    self.metrics.shared_flight(true);
                    return Resolution::Lead;
                }
                Some(None) => {}
            }
            if !counted_follower {
                self.metrics.shared_flight(false);
                counted_follower = true;
            }
            // Another replica leads: its word, or a periodic look in case a word was lost
            // (a pub/sub reconnect) or its lease lapsed (it died).
            let waited = tokio::select! {
                word = word => word.ok(),
                () = tokio::time::sleep(Duration::from_secs(1)) => None,
                () = tokio::time::sleep_until(wait_until) => {
                    return Resolution::Remote(Err(ProxyError::DeadlineUnreachable {
                        retry_after: Duration::from_secs(1),
                    }));
                }
            };
            if let Some(Word::Failed(e)) = waited {
                return Resolution::Remote(Err(e));
            }
            // Ok (the answer is in the cache), Gone, or a timeout: look again.
        }
    }

    async fn cache_get(&self, tag: &str) -> Option<Option<CachedScore>> {
        let key = self.cache_key(tag);
        let raw = self
            .op("cache_get", |mut c| async move {
                redis::cmd("GET")
                    .arg(&key)
                    .query_async::<Option<Vec<u8>>>(&mut c)
                    .await
            })
            .await?;
        Some(raw.and_then(|bytes| decode_entry(&bytes, self.config.cache_ttl)))
    }

    /// Tells the other replicas how a flight this replica led ended, and gives up its lease.
    pub async fn settle(&self, key: &LookupKey, outcome: Settled) {
        let tag = self.tag(key);
        let channel = format!("{}:done:{tag}", self.config.prefix);
        let word = match outcome {
            Settled::Answered(score) => {
                let key = self.cache_key(&tag);
                let value = encode_entry(&score);
                let ms = (self.config.cache_ttl + self.config.stale_for)
                    .as_millis()
                    .max(1) as u64;
                self.op("cache_set", |mut c| async move {
                    redis::cmd("SET")
                        .arg(&key)
                        .arg(value)
                        .arg("PX")
                        .arg(ms)
                        .query_async::<()>(&mut c)
                        .await
                })
                .await;
                "ok".to_owned()
            }
            Settled::Failed(e) => format!(
                "err:{}:{}",
                e.kind(),
                e.retry_after().map_or(0, |s| s * 1000)
            ),
            Settled::Gone => "gone".to_owned(),
        };
        self.give_up_lease(&tag).await;
        self.op("publish", |mut c| async move {
            redis::cmd("PUBLISH")
                .arg(&channel)
                .arg(word)
                .query_async::<i64>(&mut c)
                .await
        })
        .await;
    }

    /// Deletes this replica's lease on `tag` (if it still holds it).
    async fn give_up_lease(&self, tag: &str) {
        let lease = self.lease_key(tag);
        let id = self.replica_id.clone();
        let release = &self.release;
        self.op("release", |mut c| async move {
            release
                .key(&lease)
                .arg(&id)
                .invoke_async::<i64>(&mut c)
                .await
        })
        .await;
    }

    fn note_hold(&self, until: Instant) {
        extend_to(&self.hold, until);
    }

    fn note_penalty(&self, until: Instant) {
        extend_to(&self.penalty, until);
        self.fallback.penalize_now(until);
    }
}

/// A known end (a penalty's, a hold's), if it is still ahead.
fn running(end: &Mutex<Option<Instant>>) -> Option<Instant> {
    let now = Instant::now();
    (*end.lock().unwrap_or_else(|e| e.into_inner())).filter(|&t| t > now)
}

/// Moves a known end (a penalty's, a hold's) to `until` if that is later: the longest wins.
fn extend_to(end: &Mutex<Option<Instant>>, until: Instant) {
    let mut end = end.lock().unwrap_or_else(|e| e.into_inner());
    if end.is_none_or(|old| until > old) {
        *end = Some(until);
    }
}

impl Pacer for Shared {
    fn interval(&self) -> Duration {
        self.config.interval
    }

    fn book(
        &self,
        not_after: Instant,
        capacity: usize,
    ) -> BoxFuture<'_, Result<Instant, BookError>> {
        Box::pin(async move {
            if self.mode() == PacingMode::Shared {
                let key = self.pace_key();
                let interval = self.config.interval.as_micros() as u64;
                let max_wait = not_after
                    .saturating_duration_since(Instant::now())
                    .as_micros() as u64;
                let capacity = capacity.min(u32::MAX as usize) as u64;
                let lead = self.late_tolerance().unwrap_or_default().as_micros() as u64;
                let book = &self.book;
                let sent = Instant::now();
                let reply = self
                    .op("book", |mut c| async move {
                        book.key(&key)
                            .arg(interval)
                            .arg(max_wait)
                            .arg(capacity)
                            .arg(lead)
                            .invoke_async::<(i64, i64, i64, i64)>(&mut c)
                            .await
                    })
                    .await;
                if let Some((code, value, penalty_left, now_us)) = reply {
                    let received = Instant::now();
                    self.clock_sample(sent, received, now_us);
                    // The slot on our clock, through the best clock sample: every slot of
                    // this replica is translated with the same offset, so two slots Redis
                    // placed an interval apart stay an interval apart here, however slow
                    // each booking's round trip was. (Without a sample: Redis's "now" was
                    // some time between sending and receiving; the middle is off by at most
                    // half the round trip either way.)
                    let us = |v: i64| Duration::from_micros(v.max(0) as u64);
                    let slot = self
                        .local_time(now_us + value.max(0))
                        .unwrap_or_else(|| sent + (received - sent) / 2 + us(value));
                    if penalty_left > 0 {
                        // A penalty errs long: count it from the reply.
                        self.note_penalty(received + us(penalty_left));
                    }
                    return match code {
                        0 => Ok(slot),
                        1 => Err(BookError::Full {
                            retry_after: us(value),
                        }),
                        _ => Err(BookError::TooLate { by: us(value) }),
                    };
                }
            }
            self.fallback.book_now(Instant::now(), not_after, capacity)
        })
    }

    fn penalize(&self, until: Instant) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            self.note_penalty(until);
            if self.mode() == PacingMode::Shared {
                let key = self.pace_key();
                let left = until.saturating_duration_since(Instant::now()).as_micros() as u64;
                let channel = self.penalty_channel();
                let penalize = &self.penalize;
                self.op("penalize", |mut c| async move {
                    penalize
                        .key(&key)
                        .key(&channel)
                        .arg(left)
                        .invoke_async::<i64>(&mut c)
                        .await
                })
                .await;
            }
        })
    }

    fn hold(&self, until: Instant) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            self.note_hold(until);
            if self.mode() == PacingMode::Shared {
                let key = self.pace_key();
                let channel = self.penalty_channel();
                let left = until.saturating_duration_since(Instant::now()).as_micros() as u64;
                let hold = &self.hold_script;
                self.op("hold", |mut c| async move {
                    hold.key(&key)
                        .key(&channel)
                        .arg(left)
                        .invoke_async::<i64>(&mut c)
                        .await
                })
                .await;
            }
        })
    }

    fn hold_until(&self) -> Option<Instant> {
        running(&self.hold)
    }

    fn penalty_until(&self) -> Option<Instant> {
        running(&self.penalty)
    }

    fn late_tolerance(&self) -> Option<Duration> {
        // Other replicas' slots sit one interval away: a slot used later than half the guard
        // would eat into the margin that keeps their arrivals apart.
        Some((self.config.guard / 2).max(Duration::from_millis(1)))
    }

    fn mode(&self) -> PacingMode {
        Shared::mode(self)
    }
}

fn parse_word(payload: &str) -> Word {
    match payload {
        "ok" => Word::Ok,
        "gone" => Word::Gone,
        other => match other.strip_prefix("err:").and_then(|r| r.split_once(':')) {
            Some((kind, ms)) => {
                let retry_after = Duration::from_millis(ms.parse().unwrap_or(0));
                ProxyError::from_kind(kind, retry_after).map_or(Word::Gone, Word::Failed)
            }
            None => Word::Gone,
        },
    }
}

/// A cache entry in Redis: the fetch time (Unix ms), a newline, the body.
fn encode_entry(score: &CachedScore) -> Vec<u8> {
    let age = score.fetched_at.elapsed();
    let fetched_ms = SystemTime::now()
        .checked_sub(age)
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_millis());
    let mut out = format!("{fetched_ms}\n").into_bytes();
    out.extend_from_slice(&score.body);
    out
}

/// Decodes an entry; `None` if malformed or no longer fresh (stale entries are left to the
/// replica's own stale-if-error window).
fn decode_entry(raw: &[u8], ttl: Duration) -> Option<CachedScore> {
    let split = raw.iter().position(|&b| b == b'\n')?;
    let fetched_ms: u64 = std::str::from_utf8(&raw[..split]).ok()?.parse().ok()?;
    let now_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .ok()?
        .as_millis() as u64;
    let age = Duration::from_millis(now_ms.saturating_sub(fetched_ms));
    if age >= ttl {
        return None;
    }
    Some(CachedScore {
        body: Bytes::copy_from_slice(&raw[split + 1..]),
        fetched_at: std::time::Instant::now().checked_sub(age)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_round_trip_and_expire() {
        let score = CachedScore {
            body: Bytes::from_static(br#"{"score":700}"#),
            fetched_at: std::time::Instant::now(),
        };
        let raw = encode_entry(&score);
        let back = decode_entry(&raw, Duration::from_secs(60)).unwrap();
        assert_eq!(back.body, score.body);
        assert!(back.fetched_at.elapsed() < Duration::from_secs(1));
        assert!(decode_entry(&raw, Duration::ZERO).is_none());
        assert!(decode_entry(b"garbage", Duration::from_secs(60)).is_none());
    }

    #[test]
    fn words() {
        assert!(matches!(parse_word("ok"), Word::Ok));
        assert!(matches!(parse_word("gone"), Word::Gone));
        assert!(matches!(
            parse_word("err:upstream_unauthorized:0"),
            Word::Failed(ProxyError::UpstreamUnauthorized)
        ));
        assert!(matches!(
            parse_word("err:queue_full:3000"),
            Word::Failed(ProxyError::QueueFull { retry_after }) if retry_after == Duration::from_secs(3)
        ));
        assert!(matches!(parse_word("err:nonsense:1"), Word::Gone));
        assert!(matches!(parse_word("???"), Word::Gone));
    }
}
