//! Stage 2: answers that need no upstream call.
//!
//! A bounded, TTL-expiring map from [`LookupKey`] (client id + CPF) to the upstream's body.
//! Keying on the client id as well as the CPF is the fix for the original's cross-client leak:
//! an answer fetched with one client's id is never served to another.
//!
//! The hit path is synchronous and takes no lock that the queue or the dispatcher takes
//! (moka's reads are lock-free), and a hit costs one reference-count increment for the body.
//! The [`ScoreCache`] trait is the seam the scheduler sees. The persistent tier
//! (`crate::store`) plugs in behind the memory one through [`WriteThrough`]: every insert is
//! handed to it (a channel send that never waits), and on start it warms this cache with
//! what it kept ([`LocalCache::warm`], which writes nothing back). An entry expires when its
//! own fetch time says so, not a TTL after it was inserted: an answer loaded at start, or
//! taken from the shared tier, is as old as where it was fetched. Shared mode's Redis tier is not
//! behind this trait: it is asynchronous, so `crate::shared` consults it on the miss path,
//! after this cache and before a flight is led (a Redis round trip never sits on a hit).

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use moka::Expiry;
use moka::notification::RemovalCause;

use crate::lookup::validation::LookupKey;

/// One cached upstream answer.
#[derive(Clone, Debug)]
pub struct CachedScore {
    /// The upstream's JSON body, byte for byte.
    pub body: Bytes,
    /// When the upstream produced it (for `Age` and freshness).
    pub fetched_at: Instant,
}

/// What the cache knows about a key.
#[derive(Clone, Debug)]
pub enum CacheLookup {
    Fresh(CachedScore),
    /// Past its TTL by less than `--stale-while-revalidate`: answered at once while one
    /// background refresh fetches it again.
    Revalidate(CachedScore),
    /// Past its TTL but within the stale-if-error window: only for when the upstream fails.
    Stale(CachedScore),
    Miss,
}

/// Why an entry left the cache (the `cause` label of the eviction metric, spelled from the
/// variant's name).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, strum::IntoStaticStr, strum::VariantArray)]
#[strum(serialize_all = "snake_case")]
pub enum Eviction {
    Expired,
    Size,
    Replaced,
    Explicit,
}

/// The small interface the request path uses; see the module docs.
pub trait ScoreCache: Send + Sync + 'static {
    fn get(&self, key: &LookupKey) -> CacheLookup;
    fn insert(&self, key: LookupKey, value: CachedScore);
    /// Approximate number of entries (moka counts lazily).
    fn entry_count(&self) -> u64;
}

/// Where every inserted answer goes to outlive the process (the persistent store). Called on
/// the path that fills the cache, so it must never wait: it hands the answer on, or drops
/// and counts it.
pub(crate) trait WriteThrough: Send + Sync + 'static {
    fn write(&self, key: &LookupKey, value: &CachedScore);
}

#[derive(Clone, Debug)]
pub struct CacheConfig {
    pub ttl: Duration,
    /// How long past the TTL an answer is kept for stale-if-error; zero disables it.
    pub stale_for: Duration,
    pub max_entries: u64,
}

/// The in-process cache, on moka.
pub struct LocalCache {
    inner: moka::sync::Cache<LookupKey, CachedScore>,
    ttl: Duration,
    /// How long past the TTL an entry is still answered at once (and refreshed).
    revalidate_for: Duration,
    write_through: Option<Arc<dyn WriteThrough>>,
}

/// An entry lives until its TTL and stale window have passed since it was *fetched*.
struct UntilStaleEnds(Duration);

impl Expiry<LookupKey, CachedScore> for UntilStaleEnds {
    fn expire_after_create(
        &self,
        _key: &LookupKey,
        value: &CachedScore,
        _created_at: Instant,
    ) -> Option<Duration> {
        Some(self.0.saturating_sub(value.fetched_at.elapsed()))
    }

    fn expire_after_update(
        &self,
        _key: &LookupKey,
        value: &CachedScore,
        _updated_at: Instant,
        _until_expiry: Option<Duration>,
    ) -> Option<Duration> {
        Some(self.0.saturating_sub(value.fetched_at.elapsed()))
    }
}

impl LocalCache {
    /// `on_evict` is called for every removal (from moka's housekeeping, on whichever thread
    /// runs it), so it must be cheap: the metrics counter increment it is meant for is.
    pub fn new(config: &CacheConfig, on_evict: impl Fn(Eviction) + Send + Sync + 'static) -> Self {
        Self::revalidating(config, Duration::ZERO, on_evict)
    }

    /// [`LocalCache::new`] with a stale-while-revalidate window: an entry past its TTL by
    /// less than `revalidate_for` is [`CacheLookup::Revalidate`]. Entries are kept until the
    /// longer of the two stale windows has passed.
    pub(crate) fn revalidating(
        config: &CacheConfig,
        revalidate_for: Duration,
        on_evict: impl Fn(Eviction) + Send + Sync + 'static,
    ) -> Self {
        let on_evict = Arc::new(on_evict);
        let inner = moka::sync::Cache::builder()
            .max_capacity(config.max_entries)
            .expire_after(UntilStaleEnds(
                config.ttl + config.stale_for.max(revalidate_for),
            ))
            .eviction_listener(move |_key, _value, cause| {
                on_evict(match cause {
                    RemovalCause::Expired => Eviction::Expired,
                    RemovalCause::Size => Eviction::Size,
                    RemovalCause::Replaced => Eviction::Replaced,
                    RemovalCause::Explicit => Eviction::Explicit,
                })
            })
            .build();
        LocalCache {
            inner,
            ttl: config.ttl,
            revalidate_for,
            write_through: None,
        }
    }

    /// Hands every later insert to `tier` as well (the persistent store).
    pub(crate) fn with_write_through(mut self, tier: Arc<dyn WriteThrough>) -> Self {
        self.write_through = Some(tier);
        self
    }

    /// Puts an entry that a tier behind this one already holds (the persistent store's, at
    /// start) into memory, without writing it back.
    pub(crate) fn warm(&self, key: LookupKey, value: CachedScore) {
        self.inner.insert(key, value);
    }

    /// Runs moka's pending housekeeping now, so counts and evictions are up to date (tests
    /// and `/status` want exact numbers; the hit path never calls this).
    pub fn sync(&self) {
        self.inner.run_pending_tasks();
    }
}

impl ScoreCache for LocalCache {
    fn get(&self, key: &LookupKey) -> CacheLookup {
        match self.inner.get(key) {
            Some(v) => {
                let age = v.fetched_at.elapsed();
                if age < self.ttl {
                    CacheLookup::Fresh(v)
                } else if age < self.ttl + self.revalidate_for {
                    CacheLookup::Revalidate(v)
                } else {
                    CacheLookup::Stale(v)
                }
            }
            None => CacheLookup::Miss,
        }
    }

    fn insert(&self, key: LookupKey, value: CachedScore) {
        if let Some(tier) = &self.write_through {
            tier.write(&key, &value);
        }
        self.inner.insert(key, value);
    }

    fn entry_count(&self) -> u64 {
        self.inner.entry_count()
    }
}

/// How the cache stage resolved a lookup.
///
/// Both spellings come from the variant's name: snake case for the `result` and `outcome`
/// labels, upper case (through the derived twin [`XCache`]) for the `X-Cache` header.
#[derive(
    Clone,
    Copy,
    Debug,
    PartialEq,
    Eq,
    Hash,
    strum::IntoStaticStr,
    strum::VariantArray,
    strum::EnumDiscriminants,
)]
#[strum(serialize_all = "snake_case")]
#[strum_discriminants(
    name(XCache),
    derive(strum::IntoStaticStr),
    strum(serialize_all = "SCREAMING_SNAKE_CASE"),
    doc = "A [`CacheResult`] as the `X-Cache` header spells it."
)]
pub(crate) enum CacheResult {
    Hit,
    Miss,
    Coalesced,
    Stale,
}

impl CacheResult {
    pub(crate) fn as_str(self) -> &'static str {
        self.into()
    }

    /// The `X-Cache` header value.
    pub(crate) fn header(self) -> &'static str {
        XCache::from(self).into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lookup::validation::parse_lookup;
    use std::sync::atomic::{AtomicU64, Ordering};

    fn key(q: &str) -> LookupKey {
        parse_lookup(Some(q), None).unwrap()
    }

    fn score(body: &'static str) -> CachedScore {
        CachedScore {
            body: Bytes::from_static(body.as_bytes()),
            fetched_at: Instant::now(),
        }
    }

    #[test]
    fn keyed_by_client_and_cpf() {
        let cache = LocalCache::new(
            &CacheConfig {
                ttl: Duration::from_secs(60),
                stale_for: Duration::ZERO,
                max_entries: 10,
            },
            |_| {},
        );
        cache.insert(key("cpf=89336333089&client_id=a"), score("{\"score\":1}"));
        assert!(matches!(
            cache.get(&key("cpf=89336333089&client_id=a")),
            CacheLookup::Fresh(v) if v.body == "{\"score\":1}"
        ));
        assert!(matches!(
            cache.get(&key("cpf=89336333089&client_id=b")),
            CacheLookup::Miss
        ));
        assert!(matches!(
            cache.get(&key("cpf=01658739060&client_id=a")),
            CacheLookup::Miss
        ));
    }

    #[test]
    fn old_entries_are_stale_within_the_window() {
        let cache = LocalCache::new(
            &CacheConfig {
                ttl: Duration::from_secs(60),
                stale_for: Duration::from_secs(600),
                max_entries: 10,
            },
            |_| {},
        );
        let k = key("cpf=89336333089&client_id=a");
        let old = CachedScore {
            body: Bytes::from_static(b"{}"),
            fetched_at: Instant::now() - Duration::from_secs(120),
        };
        cache.insert(k.clone(), old);
        assert!(matches!(cache.get(&k), CacheLookup::Stale(_)));
    }

    #[test]
    fn an_entry_expires_by_its_fetch_time_and_inserts_write_through() {
        struct Recorder(std::sync::Mutex<Vec<LookupKey>>);
        impl WriteThrough for Recorder {
            fn write(&self, key: &LookupKey, _: &CachedScore) {
                self.0.lock().unwrap().push(key.clone());
            }
        }
        let recorder = Arc::new(Recorder(Default::default()));
        let cache = LocalCache::new(
            &CacheConfig {
                ttl: Duration::from_secs(60),
                stale_for: Duration::from_secs(60),
                max_entries: 10,
            },
            |_| {},
        )
        .with_write_through(recorder.clone());
        let (fresh, stale, gone) = (
            key("cpf=89336333089&client_id=a"),
            key("cpf=89336333089&client_id=b"),
            key("cpf=89336333089&client_id=c"),
        );
        let aged = |secs| CachedScore {
            body: Bytes::from_static(b"{}"),
            fetched_at: Instant::now() - Duration::from_secs(secs),
        };
        cache.warm(fresh.clone(), aged(30));
        cache.warm(stale.clone(), aged(90));
        // Fetched longer ago than TTL plus stale window: expired however recently inserted.
        cache.warm(gone.clone(), aged(130));
        assert!(matches!(cache.get(&fresh), CacheLookup::Fresh(_)));
        assert!(matches!(cache.get(&stale), CacheLookup::Stale(_)));
        assert!(matches!(cache.get(&gone), CacheLookup::Miss));
        assert!(
            recorder.0.lock().unwrap().is_empty(),
            "warming writes nothing back"
        );
        cache.insert(gone.clone(), score("{}"));
        assert_eq!(*recorder.0.lock().unwrap(), [gone]);
    }

    #[test]
    fn within_the_revalidation_window_an_entry_is_answered_and_refreshed() {
        let cache = LocalCache::revalidating(
            &CacheConfig {
                ttl: Duration::from_secs(60),
                stale_for: Duration::from_secs(30),
                max_entries: 10,
            },
            Duration::from_secs(120),
            |_| {},
        );
        let k = key("cpf=89336333089&client_id=a");
        let aged = |secs| CachedScore {
            body: Bytes::from_static(b"{}"),
            fetched_at: Instant::now() - Duration::from_secs(secs),
        };
        cache.warm(k.clone(), aged(30));
        assert!(matches!(cache.get(&k), CacheLookup::Fresh(_)));
        // Past the stale-if-error window, but kept for the longer revalidation window.
        cache.warm(k.clone(), aged(150));
        assert!(matches!(cache.get(&k), CacheLookup::Revalidate(_)));
        cache.warm(k.clone(), aged(181));
        assert!(matches!(cache.get(&k), CacheLookup::Miss));
    }

    #[test]
    fn bounded_in_entries_and_counts_evictions() {
        let evicted = Arc::new(AtomicU64::new(0));
        let counter = evicted.clone();
        let cache = LocalCache::new(
            &CacheConfig {
                ttl: Duration::from_secs(60),
                stale_for: Duration::ZERO,
                max_entries: 5,
            },
            move |cause| {
                if cause == Eviction::Size {
                    counter.fetch_add(1, Ordering::Relaxed);
                }
            },
        );
        for base in 1..=50u32 {
            let cpf = crate::lookup::validation::Cpf::from_base(base * 1000).unwrap();
            cache.insert(key(&format!("cpf={cpf}&client_id=a")), score("{}"));
            cache.sync();
        }
        cache.sync();
        assert!(cache.entry_count() <= 5, "{}", cache.entry_count());
        assert_eq!(evicted.load(Ordering::Relaxed) + cache.entry_count(), 50);
    }
}
