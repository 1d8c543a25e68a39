//! Refresh-ahead: spend budget nobody needs on the entries most likely to be asked again,
//! before they expire, so that a hot key stops missing at its TTL boundary.
//!
//! The hit path only counts: a fresh hit on an entry within the window of its TTL bumps that
//! entry's count, if the candidates' lock is free (a contended lock skips the count rather
//! than make a hit wait; the counts are a ranking, not a ledger). Hits earlier in an entry's
//! life cost one clock read. Once per interval, and as soon as an entry enters its window,
//! [`RefreshAhead::run`] asks for one background refresh (see `scheduler/background.rs`) of
//! the candidate with the most hits, the closest to expiry among equals, unless one it asked
//! for is still waiting: the background lane, not this task, decides when budget is free.

use std::cmp::Reverse;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::lookup::cache::{CacheLookup, CachedScore, ScoreCache};
use crate::lookup::scheduler::{BackgroundReason, Scheduler};
use crate::lookup::validation::LookupKey;

/// At most this many entries are tracked; hits on others are not counted until some leave.
const MAX_CANDIDATES: usize = 10_000;

/// An entry hit within its refresh window.
struct Candidate {
    hits: u32,
    /// Which version of the entry was hit: a refreshed entry starts its count again.
    fetched_at: std::time::Instant,
}

pub(crate) struct RefreshAhead {
    ttl: Duration,
    window: Duration,
    candidates: Mutex<HashMap<LookupKey, Candidate>>,
    /// An entry entered its window: the refresh task need not wait for its next tick.
    found: tokio::sync::Notify,
}

impl RefreshAhead {
    /// Refreshes entries hit within `window` of `ttl`.
    pub(crate) fn new(ttl: Duration, window: Duration) -> Self {
        RefreshAhead {
            ttl,
            window,
            candidates: Mutex::new(HashMap::new()),
            found: tokio::sync::Notify::new(),
        }
    }

    /// A fresh hit on `key`: counted if the entry is within the window.
    pub(crate) fn hit(&self, key: &LookupKey, score: &CachedScore) {
        if score.fetched_at.elapsed() + self.window < self.ttl {
            return;
        }
        let Ok(mut candidates) = self.candidates.try_lock() else {
            return;
        };
        let full = candidates.len() >= MAX_CANDIDATES;
        match candidates.get_mut(key) {
            Some(c) if c.fetched_at == score.fetched_at => c.hits = c.hits.saturating_add(1),
            Some(c) => {
                *c = Candidate {
                    hits: 1,
                    fetched_at: score.fetched_at,
                };
                self.found.notify_one();
            }
            None if !full => {
                candidates.insert(
                    key.clone(),
                    Candidate {
                        hits: 1,
                        fetched_at: score.fetched_at,
                    },
                );
                self.found.notify_one();
            }
            None => {}
        }
    }

    /// Takes the candidate to refresh next, with the version it was hit in. Candidates whose
    /// version the cache no longer holds fresh (refreshed, expired, evicted) are forgotten.
    fn next(&self, cache: &dyn ScoreCache) -> Option<(LookupKey, std::time::Instant)> {
        let mut candidates = self.candidates.lock().unwrap_or_else(|e| e.into_inner());
        candidates.retain(|key, c| {
            matches!(cache.get(key), CacheLookup::Fresh(v) if v.fetched_at == c.fetched_at)
        });
        let best = candidates
            .iter()
            .max_by_key(|(_, c)| (c.hits, Reverse(c.fetched_at)))
            .map(|(key, _)| key.clone())?;
        let c = candidates.remove(&best)?;
        Some((best, c.fetched_at))
    }

    /// Asks for one refresh per `every` (the pacing interval) while there are candidates and
    /// the last one asked for is no longer waiting. Runs until aborted.
    pub(crate) async fn run(
        self: Arc<Self>,
        scheduler: Arc<Scheduler>,
        cache: Arc<dyn ScoreCache>,
        every: Duration,
    ) {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                () = self.found.notified() => {}
            }
            if scheduler.refresh_waiting(BackgroundReason::RefreshAhead) {
                continue;
            }
            if let Some((key, seen)) = self.next(cache.as_ref()) {
                scheduler.refresh_later(&key, BackgroundReason::RefreshAhead, Some(seen));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lookup::cache::{CacheConfig, LocalCache};
    use crate::lookup::validation::parse_lookup;
    use bytes::Bytes;

    fn key(cpf: &str) -> LookupKey {
        parse_lookup(Some(&format!("cpf={cpf}&client_id=a")), None).unwrap()
    }

    fn fetched(ago: Duration) -> CachedScore {
        CachedScore {
            body: Bytes::from_static(b"{\"score\":1}"),
            fetched_at: std::time::Instant::now() - ago,
        }
    }

    #[test]
    fn ranks_by_hits_in_the_window_then_by_closeness_to_expiry() {
        let ttl = Duration::from_secs(100);
        let cache = LocalCache::new(
            &CacheConfig {
                ttl,
                stale_for: Duration::ZERO,
                max_entries: 100,
            },
            |_| {},
        );
        let ahead = RefreshAhead::new(ttl, Duration::from_secs(10));
        let (early, hot, warm, older) = (
            key("89336333089"),
            key("01658739060"),
            key("52998224725"),
            key("11144477735"),
        );
        let scores = [
            (&early, fetched(Duration::from_secs(50))),
            (&hot, fetched(Duration::from_secs(92))),
            (&warm, fetched(Duration::from_secs(91))),
            (&older, fetched(Duration::from_secs(95))),
        ];
        for (k, s) in &scores {
            cache.insert((*k).clone(), s.clone());
        }
        // Hits outside the window do not count; three on `hot`, one each on the others.
        for (k, s) in &scores {
            ahead.hit(k, s);
        }
        ahead.hit(&hot, &scores[1].1);
        ahead.hit(&hot, &scores[1].1);
        assert_eq!(ahead.next(&cache).map(|(k, _)| k), Some(hot.clone()));
        // Equal hits: the one closest to expiry first.
        assert_eq!(ahead.next(&cache).map(|(k, _)| k), Some(older.clone()));
        // A candidate refreshed meanwhile is forgotten.
        cache.insert(warm.clone(), fetched(Duration::ZERO));
        assert_eq!(ahead.next(&cache), None);
    }
}
