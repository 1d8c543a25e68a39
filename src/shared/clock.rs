//! Where Redis's clock stands against ours. Slots are booked on Redis's clock (`TIME`, in
//! the booking script), so every replica can read the one schedule the same way; each
//! replica then puts a slot on its own clock through the best reading it has of the offset
//! between the two. Readings come from the health check's `TIME` (a quiet round trip every
//! 500 ms) and from every booking's reply.

use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// How long a clock sample may be preferred to a newer one with a longer round trip.
const CLOCK_SAMPLE_MAX_AGE: Duration = Duration::from_secs(10);

/// How fast two clocks may drift apart once readings stop (Redis lost): 100 µs a second,
/// the tolerance of a common crystal oscillator with nothing correcting it. Generous for a
/// host that keeps NTP running; this is the drift the fallback schedule's error bound adds
/// per second since the last reading.
const DRIFT_PER_SECOND: f64 = 100e-6;

/// The error assumed of this host's system clock against Redis's (and so against the other
/// replicas') when no reading of Redis's clock exists yet: a replica started while Redis is
/// down. Hosts kept by NTP agree to a few milliseconds; this is what the README asks for.
pub(super) const SYSTEM_CLOCK_ERROR: Duration = Duration::from_millis(10);

/// One reading of Redis's clock (`TIME`, or the `now` a booking returns) against ours:
/// Redis's time `redis_us` (µs since the epoch) was our `local`, the middle of a round trip
/// of `rtt`, give or take half of it. The sample with the shortest round trip wins, so a
/// booking made while Redis or this process is busy is placed with the offset measured
/// when both were quiet.
#[derive(Clone, Copy, Debug)]
struct ClockSample {
    rtt: Duration,
    local: Instant,
    redis_us: i64,
}

/// The best clock sample so far (see [`ClockSample`]); none before the first reading.
#[derive(Debug, Default)]
pub(super) struct RedisClock {
    best: Mutex<Option<ClockSample>>,
}

impl RedisClock {
    /// Keeps the sample with the shortest round trip, replacing it when a new one is as
    /// short or the kept one is older than [`CLOCK_SAMPLE_MAX_AGE`] (clocks drift).
    pub(super) fn sample(&self, sent: Instant, received: Instant, redis_us: i64) {
        let sample = ClockSample {
            rtt: received - sent,
            local: sent + (received - sent) / 2,
            redis_us,
        };
        let mut best = self.best.lock().unwrap_or_else(|e| e.into_inner());
        let keep_old = best.is_some_and(|old| {
            old.rtt < sample.rtt && received.duration_since(old.local) < CLOCK_SAMPLE_MAX_AGE
        });
        if !keep_old {
            *best = Some(sample);
        }
    }

    /// Redis's time at our instant `at`, in µs since the epoch, and how far off that may be
    /// (half the sample's round trip plus the drift since it). Without a reading, this
    /// host's system clock stands in for Redis's, with [`SYSTEM_CLOCK_ERROR`].
    pub(super) fn redis_time(&self, at: Instant) -> (i64, Duration) {
        let best = *self.best.lock().unwrap_or_else(|e| e.into_inner());
        match best {
            Some(sample) => {
                let us = if at >= sample.local {
                    sample.redis_us + (at - sample.local).as_micros() as i64
                } else {
                    sample.redis_us - (sample.local - at).as_micros() as i64
                };
                let age = at.saturating_duration_since(sample.local);
                (us, sample.rtt / 2 + age.mul_f64(DRIFT_PER_SECOND))
            }
            None => (system_time_us(at), SYSTEM_CLOCK_ERROR),
        }
    }

    /// Our instant for a time on Redis's clock: through the best sample, or, without one,
    /// through this host's system clock (see [`RedisClock::redis_time`]).
    pub(super) fn local_time_or_system(&self, redis_us: i64) -> Instant {
        self.local_time(redis_us).unwrap_or_else(|| {
            let now = Instant::now();
            let delta = redis_us - system_time_us(now);
            if delta >= 0 {
                now + Duration::from_micros(delta as u64)
            } else {
                now.checked_sub(Duration::from_micros(delta.unsigned_abs()))
                    .unwrap_or(now)
            }
        })
    }

    /// The best reading's offset (Redis's clock minus this host's system clock, seconds)
    /// and its age at `now`; `None` before the first reading.
    pub(super) fn offset(&self, now: Instant) -> Option<(f64, Duration)> {
        let sample = (*self.best.lock().unwrap_or_else(|e| e.into_inner()))?;
        let offset_us = sample.redis_us - system_time_us(sample.local);
        Some((
            offset_us as f64 / 1e6,
            now.saturating_duration_since(sample.local),
        ))
    }

    /// Our instant for a time on Redis's clock, from the best clock sample; `None` without
    /// one.
    pub(super) fn local_time(&self, redis_us: i64) -> Option<Instant> {
        let sample = (*self.best.lock().unwrap_or_else(|e| e.into_inner()))?;
        let delta = redis_us - sample.redis_us;
        Some(if delta >= 0 {
            sample.local + Duration::from_micros(delta as u64)
        } else {
            sample.local - Duration::from_micros(delta.unsigned_abs())
        })
    }
}

/// This host's system time at our instant `at`, µs since the epoch.
fn system_time_us(at: Instant) -> i64 {
    let now = Instant::now();
    let since_epoch = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_micros() as i64;
    if at >= now {
        since_epoch + (at - now).as_micros() as i64
    } else {
        since_epoch - (now - at).as_micros() as i64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn the_quietest_recent_reading_places_redis_times() {
        let clock = RedisClock::default();
        assert_eq!(clock.local_time(0), None);

        // A 2 ms round trip: Redis's 1_000_000 µs was our t0 + 1 ms.
        let t0 = Instant::now();
        clock.sample(t0, t0 + 2 * MS, 1_000_000);
        assert_eq!(clock.local_time(1_000_000), Some(t0 + MS));
        assert_eq!(clock.local_time(1_005_000), Some(t0 + 6 * MS));
        assert_eq!(clock.local_time(999_500), Some(t0 + MS / 2));

        // A slower reading soon after does not replace it, however different it says.
        clock.sample(t0 + 100 * MS, t0 + 150 * MS, 9_000_000);
        assert_eq!(clock.local_time(1_000_000), Some(t0 + MS));

        // An as-quiet one does.
        clock.sample(t0 + 200 * MS, t0 + 202 * MS, 2_000_000);
        assert_eq!(clock.local_time(2_000_000), Some(t0 + 201 * MS));

        // Once the kept one is old, a slower one replaces it (clocks drift).
        let late = t0 + CLOCK_SAMPLE_MAX_AGE + 300 * MS;
        clock.sample(late, late + 20 * MS, 5_000_000);
        assert_eq!(clock.local_time(5_000_000), Some(late + 10 * MS));
    }

    #[test]
    fn redis_time_carries_the_readings_error_and_drift() {
        let clock = RedisClock::default();
        let t0 = Instant::now();
        // No reading: the system clock, with the error assumed of it.
        assert_eq!(clock.redis_time(t0).1, SYSTEM_CLOCK_ERROR);
        clock.sample(t0, t0 + 2 * MS, 1_000_000);
        assert_eq!(clock.redis_time(t0 + MS), (1_000_000, MS));
        // Ten seconds later: half the round trip plus 100 µs a second of drift.
        let later = t0 + MS + Duration::from_secs(10);
        let (us, error) = clock.redis_time(later);
        assert_eq!(us, 11_000_000);
        assert_eq!(error, MS + MS);
        assert_eq!(clock.local_time_or_system(11_000_000), later);
    }
}
