//! Cross-replica coalescing: one upstream call per lookup for the whole fleet. Before
//! booking, a flight takes a lease on its lookup (`<prefix>:flight:<tag>`, `SET NX PX`, long
//! enough to outlive its deadline and its call). A replica that finds the lease taken waits
//! for the leader's word on `<prefix>:done:<tag>` (pub/sub: answered, failed with an error,
//! or gone), then reads the shared cache; it also looks again every second, in case a word
//! was lost (a pub/sub reconnect) or the lease lapsed. A leader that died mid-flight would
//! keep its lease for the lookup's whole deadline, so each replica also keeps a liveness key
//! (`<prefix>:alive:<replica id>`, a few seconds, renewed at each health check), and a
//! follower looking again breaks a lease whose holder's key is gone. The leader writes the
//! answer to the cache *before* it gives up the lease and publishes its word.

use std::time::Duration;

use tokio::sync::oneshot;
use tokio::time::Instant;

use super::Shared;
use crate::lookup::cache::CachedScore;
use crate::lookup::error::ProxyError;
use crate::lookup::pacing::PacingMode;
use crate::lookup::validation::LookupKey;

/// Gives up a lease if this replica still holds it (KEYS and ARGV in its header).
pub(super) const RELEASE: &str = include_str!("scripts/release.lua");
/// Breaks a lease whose holder is no longer alive (KEYS and ARGV in its header).
pub(super) const STEAL: &str = include_str!("scripts/steal.lua");
/// How long a replica counts as alive after its last health check: a few checks, so that
/// one slow check does not make it look dead.
const ALIVE_FOR: Duration = Duration::from_secs(3);

/// What another replica said about a flight it led.
#[derive(Clone, Debug)]
pub(super) enum Word {
    /// The answer is in the shared cache.
    Ok,
    /// It failed with this error (the same for everyone).
    Failed(ProxyError),
    /// It was given up without an answer (its clients left, or it was refused): try again.
    Gone,
}

/// How a flight was settled before this replica booked anything.
pub(crate) enum Resolution {
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
pub(crate) enum Settled {
    Answered(CachedScore),
    Failed(ProxyError),
    Gone,
}

impl Shared {
    /// Settles a flight before any booking: from the shared cache, from another replica's
    /// call, or by taking the lease to lead it. Waits at most until `wait_until`.
    pub(crate) async fn resolve(&self, key: &LookupKey, deadline: Instant) -> Resolution {
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
            if counted_follower {
                // Looking again: a leader that died holds its lease until it lapses.
                if self.break_dead_lease(&tag).await {
                    continue;
                }
            } else {
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

    /// Tells the other replicas how a flight this replica led ended, and gives up its lease.
    pub(crate) async fn settle(&self, key: &LookupKey, outcome: Settled) {
        let tag = self.tag(key);
        let channel = self.done_channel(&tag);
        let word = match outcome {
            Settled::Answered(score) => {
                self.cache_set(&tag, &score).await;
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

    /// Says this replica is alive, for [`STEAL`] (at each health check).
    pub(super) async fn mark_alive(&self) {
        let key = format!("{}{}", self.alive_prefix(), self.replica_id);
        let ms = ALIVE_FOR.as_millis() as u64;
        self.op("alive", |mut c| async move {
            redis::cmd("SET")
                .arg(&key)
                .arg(1)
                .arg("PX")
                .arg(ms)
                .query_async::<()>(&mut c)
                .await
        })
        .await;
    }

    /// Breaks the lease on `tag` if its holder is no longer alive; whether it did.
    async fn break_dead_lease(&self, tag: &str) -> bool {
        let lease = self.lease_key(tag);
        let alive = self.alive_prefix();
        let steal = &self.steal;
        let broken = self
            .op("lease", |mut c| async move {
                steal
                    .key(&lease)
                    .arg(&alive)
                    .invoke_async::<i64>(&mut c)
                    .await
            })
            .await;
        if broken == Some(1) {
            tracing::info!("a flight lease held by a replica no longer alive was broken");
        }
        broken == Some(1)
    }

    /// Deletes this replica's lease on `tag` (if it still holds it).
    async fn give_up_lease(&self, tag: &str) {
        self.release_lease("release", self.lease_key(tag)).await;
    }

    /// Deletes the lease `key` if this replica still holds it ([`RELEASE`]): a flight's, or
    /// a bulk job's (`jobs.rs`).
    pub(super) async fn release_lease(&self, op: &'static str, key: String) {
        let id = self.replica_id.clone();
        let release = &self.release;
        self.op(op, |mut c| async move {
            release.key(&key).arg(&id).invoke_async::<i64>(&mut c).await
        })
        .await;
    }

    /// Hands a leader's word (a message on its flight's `done` channel) to every flight of
    /// this replica waiting on it.
    pub(super) fn deliver(&self, tag: &str, payload: &str) {
        let word = parse_word(payload);
        let waiting = self
            .listeners
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(tag);
        for tx in waiting.into_iter().flatten() {
            let _ = tx.send(word.clone());
        }
    }

    /// Registers a flight waiting for the word on `tag` (and forgets the ones that left).
    fn listen(&self, tag: &str) -> oneshot::Receiver<Word> {
        let (tx, rx) = oneshot::channel();
        let mut listeners = self.listeners.lock().unwrap_or_else(|e| e.into_inner());
        let list = listeners.entry(tag.to_owned()).or_default();
        list.retain(|tx| !tx.is_closed());
        list.push(tx);
        rx
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

#[cfg(test)]
mod tests {
    use super::*;

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
