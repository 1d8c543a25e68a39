//! "No start before T", for the whole fleet: one mechanism with two reasons. A **penalty**
//! (the upstream answered 429) and a **hold** (one of this replica's calls left late, as it
//! had to open a connection, so no start may follow it within an interval) are both written
//! to the schedule hash by one script (`scripts/pause.lua`), which every later booking
//! starts after, and published on `<prefix>:penalty`, so that the replicas holding slots
//! already booked inside the pause give them up at their start gate instead of calling into
//! it.
//!
//! The two reasons differ only where they must: a penalty is also kept as such in Redis (the
//! longest wins, and every booking's reply says how much of it is left) and reaches the
//! fallback pacer, so that it outlives a switch to fallback; a hold only moves the next free
//! start. Each keeps its own `op` label (`penalize`, `hold`) and its own end, read by the
//! start gate through [`Pacer::penalty_until`](crate::lookup::pacing::Pacer::penalty_until)
//! and [`Pacer::hold_until`](crate::lookup::pacing::Pacer::hold_until).

use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

use super::Shared;
use crate::lookup::pacing::PacingMode;

/// Records a pause in the schedule hash and publishes it (KEYS and ARGV in its header).
pub(super) const PAUSE: &str = include_str!("scripts/pause.lua");

/// Why every start is kept off until some time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Pause {
    /// The upstream penalised a call (a 429).
    Penalty,
    /// A call left late, so the next start must wait an interval after it.
    Hold,
}

impl Pause {
    /// The Redis operation, as metrics label it.
    fn op(self) -> &'static str {
        match self {
            Pause::Penalty => "penalize",
            Pause::Hold => "hold",
        }
    }

    /// The reason as the script takes it (its ARGV[2]).
    fn script_arg(self) -> &'static str {
        match self {
            Pause::Penalty => "penalty",
            Pause::Hold => "hold",
        }
    }

    /// Reads a message published on `<prefix>:penalty`: a hold is `hold:<µs>`, a penalty
    /// just `<µs>` (what is left of it from Redis's now). `None` for a pause already over,
    /// or a message that is not one.
    pub(super) fn parse(payload: &str) -> Option<(Pause, Duration)> {
        let (pause, left) = match payload.strip_prefix("hold:") {
            Some(left) => (Pause::Hold, left),
            None => (Pause::Penalty, payload),
        };
        let left = left.parse::<f64>().ok().filter(|&left| left > 0.0)?;
        Some((pause, Duration::from_micros(left.min(1e12) as u64)))
    }
}

/// The latest end of each kind of pause this replica knows of: its own, Redis's replies,
/// and what the other replicas published. The longest of each kind wins.
#[derive(Debug, Default)]
pub(super) struct Pauses {
    penalty: Mutex<Option<Instant>>,
    hold: Mutex<Option<Instant>>,
}

impl Pauses {
    fn end(&self, pause: Pause) -> &Mutex<Option<Instant>> {
        match pause {
            Pause::Penalty => &self.penalty,
            Pause::Hold => &self.hold,
        }
    }

    /// Moves the known end of `pause` to `until` if that is later.
    fn extend_to(&self, pause: Pause, until: Instant) {
        let mut end = self.end(pause).lock().unwrap_or_else(|e| e.into_inner());
        if end.is_none_or(|old| until > old) {
            *end = Some(until);
        }
    }

    /// The known end of `pause`, if it is still ahead.
    pub(super) fn running(&self, pause: Pause) -> Option<Instant> {
        let now = Instant::now();
        (*self.end(pause).lock().unwrap_or_else(|e| e.into_inner())).filter(|&t| t > now)
    }
}

impl Shared {
    /// Keeps every start of the fleet off until `until`: notes it here, and in shared mode
    /// writes it to Redis and tells the other replicas. (In fallback the other replicas
    /// cannot be told; a penalty still reaches the fallback pacer.)
    pub(super) async fn pause(&self, pause: Pause, until: Instant) {
        self.note_pause(pause, until);
        if pause == Pause::Penalty && self.mode() == PacingMode::Fallback {
            // No other replica hears of it: leave room on the grid instead.
            self.division.penalized(until);
        }
        if self.mode() == PacingMode::Shared {
            let key = self.pace_key();
            let channel = self.penalty_channel();
            let left = until.saturating_duration_since(Instant::now()).as_micros() as u64;
            let script = &self.pause;
            self.op(pause.op(), |mut c| async move {
                script
                    .key(&key)
                    .key(&channel)
                    .arg(left)
                    .arg(pause.script_arg())
                    .invoke_async::<i64>(&mut c)
                    .await
            })
            .await;
        }
    }

    /// Notes a pause this replica learned of (its own, a booking's reply, another
    /// replica's message). A penalty also reaches the fallback pacer, so that a switch to
    /// fallback does not forget it.
    pub(super) fn note_pause(&self, pause: Pause, until: Instant) {
        self.pauses.extend_to(pause, until);
        if pause == Pause::Penalty {
            self.fallback.penalize_now(until);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn published_pauses_are_read_back_with_their_reason() {
        assert_eq!(
            Pause::parse("hold:1500"),
            Some((Pause::Hold, Duration::from_micros(1500)))
        );
        assert_eq!(
            Pause::parse("2500000"),
            Some((
                Pause::Penalty,
                Duration::from_secs(2) + Duration::from_millis(500)
            ))
        );
        // Over already, or not a pause at all.
        assert_eq!(Pause::parse("0"), None);
        assert_eq!(Pause::parse("hold:-5"), None);
        assert_eq!(Pause::parse("hold:"), None);
        assert_eq!(Pause::parse("soon"), None);
        // Absurd lengths are capped, not overflowed.
        assert_eq!(
            Pause::parse("1e300"),
            Some((Pause::Penalty, Duration::from_micros(1_000_000_000_000)))
        );
    }

    #[test]
    fn the_longest_pause_of_each_kind_wins() {
        let pauses = Pauses::default();
        let t0 = Instant::now() + Duration::from_secs(60);
        assert_eq!(pauses.running(Pause::Penalty), None);
        pauses.extend_to(Pause::Penalty, t0 + Duration::from_secs(3));
        pauses.extend_to(Pause::Penalty, t0 + Duration::from_secs(1));
        pauses.extend_to(Pause::Hold, t0);
        assert_eq!(
            pauses.running(Pause::Penalty),
            Some(t0 + Duration::from_secs(3))
        );
        assert_eq!(pauses.running(Pause::Hold), Some(t0));
        // One that is over is not running.
        let over = Pauses::default();
        over.extend_to(Pause::Hold, Instant::now());
        assert_eq!(over.running(Pause::Hold), None);
    }
}
