//! The connection to Redis and what happens when it fails: every operation runs with a short
//! timeout and is counted; the first failure switches the replica to fallback (a local pacer
//! at a share of the rate, no shared cache, no cross-replica coalescing); a health check
//! pings Redis every 500 ms (its `TIME`, which also samples Redis's clock) and returns to
//! shared mode after two good pings.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use tokio::time::Instant;
use tracing::Instrument;

use super::Shared;
use super::ops::RedisOutcome;
use crate::lookup::pacing::PacingMode;

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
                    tracing::warn!(
                        rate_share = 1.0 / f64::from(self.config.expected_replicas.max(1)),
                        "Redis out of reach: pacing alone at a share of the rate, no shared cache"
                    );
                }
                _ => tracing::info!("Redis reachable: back to the shared schedule and cache"),
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

    /// Every 500 ms: reconnects if need be, pings, and returns to shared mode after two
    /// good pings in a row.
    pub(super) async fn health_loop(self: Arc<Self>) {
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
}
