//! The fleet's start schedule: [`Shared`] as a [`Pacer`]. A booking is one script on Redis
//! (`scripts/book.lua`) that takes the next free slot on Redis's own clock, an interval after
//! the last one booked by any replica and after any penalty; the replica puts the slot on its
//! own clock through its best clock sample. In fallback, a local pacer at a share of the
//! rate books instead. Penalties and holds are the pause mechanism's (`pause.rs`).

use std::time::Duration;

use tokio::time::Instant;

use super::Shared;
use super::pause::Pause;
use crate::lookup::pacing::{BookError, BoxFuture, Pacer, PacingMode};

/// Books the next start slot (KEYS, ARGV and the reply in its header).
pub(super) const BOOK: &str = include_str!("scripts/book.lua");

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
                    self.clock.sample(sent, received, now_us);
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
            self.fallback.book_now(Instant::now(), not_after, capacity)
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
        // Other replicas' slots sit one interval away: a slot used later than half the guard
        // would eat into the margin that keeps their arrivals apart.
        Some((self.config.guard / 2).max(Duration::from_millis(1)))
    }

    fn mode(&self) -> PacingMode {
        Shared::mode(self)
    }
}
