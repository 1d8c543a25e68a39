//! The connection to Redis and what happens when it fails: every operation runs with a short
//! timeout and is counted; the first failure switches the replica to fallback (time division
//! on the last known Redis clock, `division.rs`; no shared cache, no cross-replica
//! coalescing); a health check pings Redis every 500 ms (its `TIME`, which also samples
//! Redis's clock), renews this replica's place for time division, and returns to shared mode
//! after two good pings, behind a fence that keeps the shared schedule clear of the replicas
//! still on their grid (each stays on its grid until a position before the fence, so the
//! fleet does not idle through it).

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use tokio::time::Instant;
use tracing::Instrument;

use super::Shared;
use super::division::Member;
use super::ops::RedisOutcome;
use crate::lookup::pacing::PacingMode;

/// Leases a place for time division (KEYS, ARGV and the reply in its header).
pub(super) const MEMBER: &str = include_str!("scripts/member.lua");
/// Puts the shared schedule's next slot after a fence (see its header).
pub(super) const FENCE: &str = include_str!("scripts/fence.lua");

/// How often the health check runs.
const HEALTH_EVERY: Duration = Duration::from_millis(500);

/// How long a place is leased: six health checks, so that a replica that is gone frees its
/// place within seconds but a slow check or two does not lose it.
const PLACE_LEASE: Duration = Duration::from_secs(3);

/// The fence a replica back from fallback puts before the shared schedule, for grid
/// positions `period` apart: the others notice Redis's return within a health check of it
/// (two, with a slow ping), and may call at a grid position until they do; the first shared
/// slot must come a position after that.
fn rejoin_fence(period: Duration) -> Duration {
    HEALTH_EVERY * 2 + period
}

/// How much earlier than a position before the fence a replica back from fallback leaves
/// its grid. Grid slots due after the switch are booked again on the shared schedule; this
/// covers a dispatcher that takes the last grid slot a little late.
const REJOIN_MARGIN: Duration = Duration::from_millis(20);

/// How long a replica entering fallback waits before its first grid slot: every other
/// replica notices the loss within a health check plus a Redis timeout (its next ping
/// fails), and gives up the shared slots it had booked, which the grid does not know of.
pub(super) fn fallback_settle(redis_timeout: Duration) -> Duration {
    HEALTH_EVERY + redis_timeout + Duration::from_millis(100)
}

impl Shared {
    /// Switches to `mode`, saying so (metric, log) only when it is a change.
    pub(super) fn enter(&self, mode: PacingMode) {
        let changed = self
            .mode
            .send_if_modified(|m| std::mem::replace(m, mode) != mode);
        if changed {
            self.metrics.set_pacing_mode(mode);
            match mode {
                PacingMode::Fallback => {
                    self.metrics.shared_fallback();
                    self.division.enter(Instant::now());
                    match self.division.member() {
                        Some(Member { index, count }) => tracing::warn!(
                            place = index,
                            places = count,
                            period_ms = self.division.period().as_secs_f64() * 1e3,
                            "Redis out of reach: time division on Redis's last known clock \
                             (this replica calls only at its own places), no shared cache"
                        ),
                        None => tracing::warn!(
                            rate_share = 1.0 / f64::from(self.config.expected_replicas.max(1)),
                            "Redis out of reach and no place held (set --replica-index): \
                             pacing alone at a share of the rate, no shared cache"
                        ),
                    }
                }
                _ => {
                    self.division.leave();
                    tracing::info!("Redis reachable: back to the shared schedule and cache");
                }
            }
        }
    }

    /// Redis failed us: fallback, and the count of good pings towards recovery starts over.
    fn trouble(&self) {
        self.good_pings.store(0, Ordering::Relaxed);
        self.enter(PacingMode::Fallback);
    }

    /// The connection, opened (bounded by the timeout) if there is none yet.
    pub(super) async fn ensure_connection(&self) -> Option<ConnectionManager> {
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
    pub(super) async fn op<T, F, Fut>(&self, op: &'static str, f: F) -> Option<T>
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
    pub(super) async fn ping(&self) -> bool {
        let sent = Instant::now();
        let time = self
            .op("ping", |mut c| async move {
                redis::cmd("TIME").query_async::<(u64, u64)>(&mut c).await
            })
            .await;
        let Some((secs, micros)) = time else {
            return false;
        };
        self.clock
            .sample(sent, Instant::now(), (secs * 1_000_000 + micros) as i64);
        true
    }

    /// Leases (or renews) this replica's place for time division, and reads the fleet's
    /// guard its grid would be laid with; keeps the last of both when Redis does not answer.
    pub(super) async fn renew_place(&self) {
        let key = self.members_key();
        let guards = self.guards_key();
        let id = self.replica_id.as_str();
        let count = self.config.expected_replicas.max(1);
        let preferred = self
            .division
            .member()
            .map(|m| m.index)
            .or(self.config.replica_index)
            .map_or(-1, i64::from);
        let script = &self.member;
        let sent = Instant::now();
        let reply = self
            .op("member", |mut c| async move {
                script
                    .key(&key)
                    .key(&guards)
                    .arg(id)
                    .arg(count)
                    .arg(PLACE_LEASE.as_micros() as u64)
                    .arg(preferred)
                    .arg(super::pacer::GUARD_HORIZON.as_micros() as u64)
                    .invoke_async::<(i64, i64, i64)>(&mut c)
                    .await
            })
            .await;
        let Some((place, now_us, fleet_guard)) = reply else {
            return;
        };
        self.clock.sample(sent, Instant::now(), now_us);
        // The fleet's guard as every replica reads it now: the grids agree even with a
        // replica that has not booked lately.
        self.division
            .note_fleet_guard(Duration::from_micros(fleet_guard.max(0) as u64));
        match u32::try_from(place) {
            Ok(index) => self.division.set_member(Member { index, count }),
            Err(_) => tracing::warn!(
                places = count,
                "every place is held by another replica: more replicas run than \
                 --expected-replicas says; without Redis this one would pace at a share"
            ),
        }
    }

    /// Back from fallback: no shared slot before the fence (see [`rejoin_fence`]); returns
    /// the fence on our clock, `None` if Redis failed us again.
    async fn fence(&self) -> Option<Instant> {
        let key = self.pace_key();
        let script = &self.fence;
        let sent = Instant::now();
        let (now_us, fence_us) = self
            .op("fence", |mut c| async move {
                script
                    .key(&key)
                    .arg(rejoin_fence(self.division.period()).as_micros() as u64)
                    .invoke_async::<(i64, i64)>(&mut c)
                    .await
            })
            .await?;
        self.clock.sample(sent, Instant::now(), now_us);
        Some(self.clock.local_time_or_system(fence_us))
    }

    /// Back to the shared schedule once Redis has answered twice. Until a grid position
    /// before the fence the replica stays on its grid, as the replicas that have not noticed
    /// Redis's return yet do: the fleet keeps calling through the fence, its last grid call
    /// is a position before the first shared slot, and only one schedule is ever in use.
    async fn rejoin(&self) {
        let Some(fence) = self.fence().await else {
            return;
        };
        let switch = fence
            .checked_sub(self.division.period() + REJOIN_MARGIN)
            .unwrap_or_else(Instant::now);
        if switch > Instant::now() {
            tracing::debug!(
                in_ms = (switch - Instant::now()).as_secs_f64() * 1e3,
                "Redis is back: on the grid until a position before the fence"
            );
            tokio::time::sleep_until(switch).await;
            // Redis may have gone again meanwhile: ask once more before switching.
            if !self.ping().await {
                return;
            }
        }
        self.enter(PacingMode::Shared);
    }

    /// Every 500 ms: reconnects if need be, pings, renews this replica's place, and returns
    /// to shared mode after two good pings in a row, behind the fence.
    pub(super) async fn health_loop(self: Arc<Self>) {
        let mut tick = tokio::time::interval(HEALTH_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if self.ensure_connection().await.is_none() {
                self.trouble();
                continue;
            }
            if self.ping().await {
                self.renew_place().await;
                self.mark_alive().await;
                let good = self.good_pings.fetch_add(1, Ordering::Relaxed) + 1;
                if good >= 2 && self.mode() == PacingMode::Fallback {
                    self.rejoin().await;
                }
            }
        }
    }
}
