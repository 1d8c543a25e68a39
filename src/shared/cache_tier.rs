//! The second cache tier: on a local miss a flight looks in Redis (`<prefix>:cache:<tag>`)
//! before anything else, and a replica that fetched an answer writes it there for the
//! others, with the local cache's TTL and stale window. An entry carries its fetch time, so
//! an answer is as fresh on every replica as where it was fetched; only fresh entries are
//! served from here (stale ones are left to each replica's own stale-if-error window).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;

use super::Shared;
use crate::lookup::cache::CachedScore;

impl Shared {
    /// The fresh shared entry for `tag`: `Some(None)` if there is none, `None` if Redis
    /// could not say (and the replica fell back).
    pub(super) async fn cache_get(&self, tag: &str) -> Option<Option<CachedScore>> {
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

    /// Writes an answer this replica fetched, to live as long as the local cache keeps it
    /// (TTL and stale window).
    pub(super) async fn cache_set(&self, tag: &str, score: &CachedScore) {
        let key = self.cache_key(tag);
        let value = encode_entry(score);
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
}
