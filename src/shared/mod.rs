//! Several replicas, one upstream budget: the start schedule, the penalty, a second cache tier
//! and flight leases, shared through Redis; and a safe fallback when Redis is out of reach.
//!
//! - **Schedule** (`pacer.rs`). [`Shared`] implements [`Pacer`]: a Lua script books the next
//!   start slot in one hash (`<prefix>:pace`) using Redis's own clock (`TIME`), so replica
//!   clocks do not matter: the reply gives the slot on Redis's clock, and the replica puts it
//!   on its own through its best estimate of the offset between the two (`clock.rs`: the
//!   reading, from the health check's `TIME` or a booking, with the shortest round trip in the
//!   last 10 s: off by at most half of that round trip, a few hundredths of a millisecond on a
//!   quiet loopback, and the same for every slot, so a replica's own slots keep their spacing
//!   however slow a booking was; the guard must cover the rest). Slots are an interval apart
//!   across all replicas (`1/rate` plus the fleet's guard: the largest any replica learned in
//!   the last minute, reported in `<prefix>:guards` with each booking); capacity counts every replica's booked slots, so `queue-capacity` and
//!   deadlines keep their meaning fleet-wide. A slot booked for a lookup whose client then
//!   leaves stays booked: the replica gives it to its next lookup, or lets it pass unused. It
//!   cannot be handed back, because later slots were already booked behind it.
//! - **Penalty and hold** (`pause.rs`). A 429 seen by any replica is written to the same hash;
//!   every booking script starts after it, and every reply tells the replica how much of it
//!   is left. The same script publishes it on `<prefix>:penalty`, so that replicas holding
//!   slots already booked inside it give them up at their start gate instead of calling into
//!   it. A call that left late (it had to open a connection) is announced the same way, as a
//!   hold for an interval after it: one mechanism, "no start before T", with two reasons.
//! - **Cache** (`cache_tier.rs`). On a local miss, the flight looks in Redis
//!   (`<prefix>:cache:<tag>`, same TTL and stale window) before anything else; a fetched
//!   answer is written there for the others.
//! - **Coalescing** (`flights.rs`). Before booking, the flight takes a lease
//!   (`<prefix>:flight:<tag>`, `SET NX PX`). If another replica holds it, the flight waits for
//!   that replica's word on `<prefix>:done:<tag>` (pub/sub, `pubsub.rs`), then reads the
//!   shared cache; a lease whose replica is no longer alive (`<prefix>:alive:<id>`) is broken.
//! - **Bulk jobs** (`jobs.rs`). In shared mode a job lives in Redis, sealed, so any replica
//!   reads it, and one runs it under a lease that another takes over if it lapses.
//!
//! `<tag>` is a keyed hash of (client id, CPF) under `SCORE_PROXY_REDACTION_KEY`, which all
//! replicas share: Redis never sees a CPF or a client id as a key, and the key rules are the
//! local cache's (no client ever gets an answer fetched with another's id).
//!
//! **Redis trouble** (`connection.rs`). Every Redis operation has a short timeout. The first
//! failure switches the replica to fallback: a local pacer at `rate / expected-replicas`, no
//! shared cache, no cross-replica coalescing. A health check pings Redis every 500 ms and
//! returns to shared mode after two good pings. `/ready`, `/status`, the metrics and the log
//! say which mode is on. Fallback keeps the fleet's *average* rate within the budget but,
//! with no shared clock, cannot keep two replicas' calls an interval apart: the upstream may
//! penalise some of them (each replica then pauses on its own), which is why Redis trouble is
//! worth an alert.
//!
//! The Lua scripts live beside the code in `scripts/`, each with a header saying what its
//! KEYS and ARGV are. This file holds the handle ([`Shared`]), its settings and the names of
//! its Redis keys; each concern above is a file of its own that adds to `impl Shared`.
//!
//! [`Pacer`]: crate::lookup::pacing::Pacer

mod cache_tier;
mod clock;
mod connection;
mod division;
mod flights;
mod jobs;
pub(crate) mod ops;
mod pacer;
mod pause;
mod pubsub;

use std::collections::HashMap;
use std::sync::atomic::AtomicU32;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use redis::aio::ConnectionManager;
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;

use crate::lookup::pacing::{Guard, LocalPacer, PacingMode};
use crate::lookup::validation::LookupKey;
use crate::telemetry::metrics::{DivisionReport, Metrics};
use clock::RedisClock;
use division::{Division, Member};
use flights::Word;
use pause::Pauses;

pub(crate) use flights::{Resolution, Settled};
pub(crate) use jobs::Renewal;

/// Settings of shared mode.
#[derive(Clone, Debug)]
pub(crate) struct SharedConfig {
    pub(crate) url: String,
    pub(crate) prefix: String,
    /// Longest any Redis operation may take before the replica falls back.
    pub(crate) timeout: Duration,
    /// How many replicas share the budget when Redis is gone (the fallback rate divides by it).
    pub(crate) expected_replicas: u32,
    /// `1/rate`: slots are this plus the fleet's guard apart.
    pub(crate) base: Duration,
    /// `--replica-index`: this replica's place in fallback before Redis has leased one.
    pub(crate) replica_index: Option<u32>,
    pub(crate) cache_ttl: Duration,
    pub(crate) stale_for: Duration,
    /// How long a flight lease lives beyond the lookup's deadline (its call's timeout).
    pub(crate) upstream_timeout: Duration,
    /// The shared secret the cache and lease keys are hashed with.
    pub(crate) key_secret: String,
}

/// One replica's handle on shared mode: its connection, its mode, what it knows of the
/// fleet's pauses and of Redis's clock, and the flights waiting for another replica's word.
pub struct Shared {
    config: SharedConfig,
    client: redis::Client,
    conn: Mutex<Option<ConnectionManager>>,
    mode: watch::Sender<PacingMode>,
    /// Pacing while Redis is out of reach: time division on the last known Redis clock
    /// (`division.rs`), or, without a place, a local pacer at a share of the rate.
    division: Division,
    fallback: LocalPacer,
    /// The latest penalty and hold ends this replica knows of (its own, Redis's replies, and
    /// what the other replicas published).
    pauses: Pauses,
    /// Where Redis's clock stands against ours.
    clock: RedisClock,
    /// Flights waiting for another replica's word, by tag.
    listeners: Mutex<HashMap<String, Vec<oneshot::Sender<Word>>>>,
    good_pings: AtomicU32,
    replica_id: String,
    key: [u8; 32],
    metrics: Arc<Metrics>,
    /// This replica's learned guard: what it reports with each booking, and where the
    /// fleet's guard each booking returns is noted.
    guard: Arc<Guard>,
    /// Bookings go to Redis one at a time, in the order asked. When several replicas take
    /// a burst at once their bookings then interleave on the schedule instead of one
    /// replica's whole burst going first (in part: lookups that reach this replica a few
    /// milliseconds before the others' still book first), so if Redis is lost mid-burst the
    /// waiting lookups are more evenly spread over the places on the grid (a place with
    /// nothing left wastes its positions). It costs a burst one Redis round trip per lookup
    /// ahead of it in this replica, at admission only.
    booking_turn: tokio::sync::Mutex<()>,
    book: redis::Script,
    pause: redis::Script,
    release: redis::Script,
    steal: redis::Script,
    member: redis::Script,
    fence: redis::Script,
    job_admit: redis::Script,
    job_renew: redis::Script,
    /// Told when a job was announced ended on `<prefix>:jobs:news` (`jobs.rs`).
    job_news: tokio::sync::Notify,
}

impl Shared {
    /// Prepares shared mode (no connection yet: [`Shared::connect`], then [`Shared::start`]).
    pub(crate) fn new(
        config: SharedConfig,
        guard: Arc<Guard>,
        metrics: Arc<Metrics>,
    ) -> anyhow::Result<Arc<Shared>> {
        let client = redis::Client::open(config.url.as_str())?;
        // Fallback spaces by the guard's floor: with no shared schedule, a learned guard
        // would not keep two replicas' calls apart anyway (issue 17).
        let fallback =
            LocalPacer::new((config.base + guard.floor()) * config.expected_replicas.max(1));
        let mut id = [0u8; 8];
        getrandom::fill(&mut id).expect("the OS random source is available");
        let key = blake3::derive_key("score-proxy shared keys v1", config.key_secret.as_bytes());
        metrics.set_pacing_mode(PacingMode::Fallback);
        let division = Division::new(
            config.base,
            (guard.floor(), guard.ceiling()),
            connection::fallback_settle(config.timeout),
            config.replica_index.map(|index| Member {
                index,
                count: config.expected_replicas.max(1),
            }),
        );
        Ok(Arc::new(Shared {
            division,
            client,
            conn: Mutex::new(None),
            mode: watch::channel(PacingMode::Fallback).0,
            fallback,
            pauses: Pauses::default(),
            clock: RedisClock::default(),
            listeners: Mutex::new(HashMap::new()),
            good_pings: AtomicU32::new(0),
            replica_id: id.iter().map(|b| format!("{b:02x}")).collect(),
            key,
            metrics,
            guard,
            booking_turn: tokio::sync::Mutex::new(()),
            book: redis::Script::new(pacer::BOOK),
            pause: redis::Script::new(pause::PAUSE),
            release: redis::Script::new(flights::RELEASE),
            steal: redis::Script::new(flights::STEAL),
            member: redis::Script::new(connection::MEMBER),
            fence: redis::Script::new(connection::FENCE),
            job_admit: redis::Script::new(jobs::ADMIT),
            job_renew: redis::Script::new(jobs::RENEW),
            job_news: tokio::sync::Notify::new(),
            config,
        }))
    }

    /// Connects (bounded by the timeout) and enters shared mode if Redis answers; otherwise
    /// stays in fallback, and the health check keeps trying.
    pub(crate) async fn connect(&self) {
        if self.ensure_connection().await.is_some() && self.ping().await {
            self.renew_place().await;
            self.mark_alive().await;
            self.enter(PacingMode::Shared);
        }
    }

    /// Starts the health check and the pub/sub listener.
    pub(crate) fn start(self: &Arc<Self>) -> Vec<JoinHandle<()>> {
        vec![
            tokio::spawn(self.clone().health_loop()),
            tokio::spawn(self.clone().listen_loop()),
        ]
    }

    pub(crate) fn mode(&self) -> PacingMode {
        *self.mode.borrow()
    }

    /// Time division's state: this replica's place, the clock reading it would lay the
    /// grid with, and how long Redis has been gone.
    pub(crate) fn division_report(&self) -> DivisionReport {
        let now = tokio::time::Instant::now();
        DivisionReport {
            place: self.division.member().map(|m| (m.index, m.count)),
            clock: self.clock.offset(now),
            fallback_for: self.division.fallback_for(now),
        }
    }

    /// Watches the mode (shared or fallback).
    pub fn mode_changes(&self) -> watch::Receiver<PacingMode> {
        self.mode.subscribe()
    }

    /// The Redis name of a lookup: a keyed hash of both halves of the key.
    pub(crate) fn tag(&self, key: &LookupKey) -> String {
        let mut h = blake3::Hasher::new_keyed(&self.key);
        h.update(&key.cpf.as_u64().to_le_bytes());
        h.update(key.client_id.as_str().as_bytes());
        h.finalize().to_hex()[..32].to_owned()
    }

    // Every Redis key and channel shared mode uses, named in one place.

    fn cache_key(&self, tag: &str) -> String {
        format!("{}:cache:{tag}", self.config.prefix)
    }

    fn lease_key(&self, tag: &str) -> String {
        format!("{}:flight:{tag}", self.config.prefix)
    }

    fn done_channel(&self, tag: &str) -> String {
        format!("{}{tag}", self.done_prefix())
    }

    /// What every flight's `done` channel starts with (the listener subscribes to it all).
    fn done_prefix(&self) -> String {
        format!("{}:done:", self.config.prefix)
    }

    fn pace_key(&self) -> String {
        format!("{}:pace", self.config.prefix)
    }

    fn members_key(&self) -> String {
        format!("{}:members", self.config.prefix)
    }

    fn guards_key(&self) -> String {
        format!("{}:guards", self.config.prefix)
    }

    fn penalty_channel(&self) -> String {
        format!("{}:penalty", self.config.prefix)
    }

    /// What every replica's liveness key starts with (its id follows).
    fn alive_prefix(&self) -> String {
        format!("{}:alive:", self.config.prefix)
    }

    fn open_jobs_key(&self) -> String {
        format!("{}:jobs", self.config.prefix)
    }

    fn job_key(&self, job: &str) -> String {
        format!("{}:job:{job}", self.config.prefix)
    }

    fn job_results_key(&self, job: &str) -> String {
        format!("{}:job:{job}:results", self.config.prefix)
    }

    fn job_lease_key(&self, job: &str) -> String {
        format!("{}:job:{job}:lease", self.config.prefix)
    }

    fn job_news_channel(&self) -> String {
        format!("{}:jobs:news", self.config.prefix)
    }
}
