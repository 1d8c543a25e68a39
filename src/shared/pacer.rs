//! The fleet's start schedule: [`Shared`] as a [`Pacer`]. A booking is one script on Redis
//! (`scripts/book.lua`) that takes the next free slot on Redis's own clock, `1/rate` plus the
//! fleet's guard after the last one booked by any replica and after any penalty; the replica
//! puts the slot on its own clock through its best clock sample. Each booking reports the
//! guard this replica learned and returns the fleet's (the largest reported in the last
//! minute), which the replica adopts. In fallback, time division's grid (`division.rs`) books
//! instead, or without a place a local pacer at a share of the rate. Penalties and holds are the pause mechanism's (`pause.rs`).

use std::time::Duration;

use tokio::time::Instant;

use super::Shared;
use super::division::GridClock;
use super::pause::Pause;
use crate::lookup::pacing::{BookError, BoxFuture, Pacer, PacingMode, late_tolerance};

/// Books the next start slot (KEYS, ARGV and the reply in its header).
pub(super) const BOOK: &str = include_str!("scripts/book.lua");

/// How long a replica's report of its guard counts towards the fleet's: a replica that
/// stopped booking (idle, or gone) stops holding the others' spacing up after this.
pub(super) const GUARD_HORIZON: Duration = Duration::from_secs(60);

impl Pacer for Shared {
    fn interval(&self) -> Duration {
        match self.mode() {
            PacingMode::Fallback => self.fallback_spacing(),
            _ => self.config.base + self.guard.current(),
        }
    }

    fn book(
        &self,
        not_after: Instant,
        capacity: usize,
    ) -> BoxFuture<'_, Result<Instant, BookError>> {
        Box::pin(async move {
            // One booking at a time (see `Shared::booking_turn`).
            let _turn = self.booking_turn.lock().await;
            if self.mode() == PacingMode::Shared {
                let key = self.pace_key();
                let guards = self.guards_key();
                let base = self.config.base.as_micros() as u64;
                let own = self.guard.own().as_micros() as u64;
                let id = self.replica_id.as_str();
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
                            .key(&guards)
                            .arg(base)
                            .arg(max_wait)
                            .arg(capacity)
                            .arg(lead)
                            .arg(own)
                            .arg(id)
                            .arg(GUARD_HORIZON.as_micros() as u64)
                            .invoke_async::<(i64, i64, i64, i64, i64)>(&mut c)
                            .await
                    })
                    .await;
                if let Some((code, value, penalty_left, now_us, fleet_guard)) = reply {
                    let received = Instant::now();
                    self.clock.sample(sent, received, now_us);
                    self.adopt_fleet_guard(Duration::from_micros(fleet_guard.max(0) as u64));
                    // The slot on our clock, through the best clock sample: every slot of
                    // this replica is translated with the same offset, so two slots Redis
                    // placed an interval apart stay an interval apart here, however slow
                    // each booking's round trip was. (Without a sample: Redis's "now" was
                    // some time between sending and receiving; the middle is off by at most
                    // half the round trip either way.)
                    let us = |v: i64| Duration::from_micros(v.max(0) as u64);
                    let slot = self
                        .clock
                        .local_time(now_us + value.max(0))
                        .unwrap_or_else(|| sent + (received - sent) / 2 + us(value));
                    if penalty_left > 0 {
                        // A penalty errs long: count it from the reply.
                        self.note_pause(Pause::Penalty, received + us(penalty_left));
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
            let now = Instant::now();
            let grid = Grid(&self.clock);
            self.division
                .book(now, not_after, capacity, self.guard.current(), &grid)
                .unwrap_or_else(|| self.fallback.book_now(now, not_after, capacity))
        })
    }

    fn penalize(&self, until: Instant) -> BoxFuture<'_, ()> {
        Box::pin(self.pause(Pause::Penalty, until))
    }

    fn hold(&self, until: Instant) -> BoxFuture<'_, ()> {
        Box::pin(self.pause(Pause::Hold, until))
    }

    fn hold_until(&self) -> Option<Instant> {
        self.pauses.running(Pause::Hold)
    }

    fn penalty_until(&self) -> Option<Instant> {
        self.pauses.running(Pause::Penalty)
    }

    fn late_tolerance(&self) -> Option<Duration> {
        Some(late_tolerance(self.guard.current()))
    }

    fn mode(&self) -> PacingMode {
        Shared::mode(self)
    }
}

/// Redis's clock as this replica last estimated it, for the fallback grid.
struct Grid<'a>(&'a super::clock::RedisClock);

impl GridClock for Grid<'_> {
    fn redis_time(&self, at: Instant) -> (i64, Duration) {
        self.0.redis_time(at)
    }
    fn local_time(&self, redis_us: i64) -> Instant {
        self.0.local_time_or_system(redis_us)
    }
}

impl Shared {
    /// In fallback, the spacing of this replica's own slots: its places on the grid, or
    /// the share of the rate without one.
    fn fallback_spacing(&self) -> Duration {
        let now = Instant::now();
        let (_, error) = self.clock.redis_time(now);
        self.division
            .own_spacing(now, self.guard.current(), error)
            .unwrap_or_else(|| self.fallback.interval())
    }

    /// The fleet's guard, as the latest booking returned it, becomes a lower bound of this
    /// replica's (the metrics follow at once: the dispatcher updates them only when a call
    /// ends), and what time division would lay its grid with (`division.rs`).
    fn adopt_fleet_guard(&self, fleet: Duration) {
        self.division.note_fleet_guard(fleet);
        self.guard.note_fleet(fleet);
        let (guard, reason) = self.guard.snapshot();
        self.metrics
            .set_pacing_guard(guard, reason, self.guard.ceiling());
    }
}
