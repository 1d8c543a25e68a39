//! Stage 4: when the next upstream call may start.
//!
//! The upstream allows one call per `1/rate` for all callers together, counted by its own clock
//! at arrival, and punishes an early call with a penalty that every later call extends. So the
//! pacer guarantees that call *starts* are at least `1/rate + guard` apart (the guard absorbs the
//! jitter between our start and the upstream's arrival), never start inside a known penalty,
//! and otherwise start as early as allowed, so the whole budget gets used.
//!
//! [`LocalLimiter`] meters with the `leaky-bucket` crate (capacity 1, one token per interval,
//! no burst). On its own that is not enough: leaky-bucket refills on a fixed grid anchored at
//! its creation (see `calculate_drain` in leaky-bucket 1.1), so after an idle spell a token can
//! be taken at the end of one grid period and the next at the start of the following one, less
//! than one interval apart. The limiter therefore also keeps the last start and never returns
//! before `last_start + interval`. The floor is what the upstream's rule needs; the bucket keeps
//! the steady-state rate honest even if the floor is ever relaxed.
//!
//! The [`Limiter`] trait is the seam for a shared, multi-replica pacer later.

use std::future::Future;
use std::pin::Pin;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// The interface the dispatcher and admission use.
pub trait Limiter: Send + Sync + 'static {
    /// The spacing between call starts (`1/rate + guard`).
    fn interval(&self) -> Duration;

    /// The earliest instant the next call could start: what admission uses to predict waits.
    fn next_start(&self) -> Instant;

    /// Waits until a call may start, then records that start and returns its instant.
    /// Only the dispatcher calls this, one call at a time.
    fn acquire(&self) -> Pin<Box<dyn Future<Output = Instant> + Send + '_>>;

    /// The upstream penalised us: no call may start before `until`.
    fn penalize(&self, until: Instant);

    /// The end of the current penalty, if one is running.
    fn penalty_until(&self) -> Option<Instant>;
}

/// Pacing for one process.
pub struct LocalLimiter {
    bucket: leaky_bucket::RateLimiter,
    interval: Duration,
    state: Mutex<PaceState>,
}

#[derive(Default)]
struct PaceState {
    last_start: Option<Instant>,
    penalty_until: Option<Instant>,
}

impl PaceState {
    fn floor(&self, interval: Duration) -> Option<Instant> {
        let after_last = self.last_start.map(|t| t + interval);
        after_last.max(self.penalty_until)
    }
}

impl LocalLimiter {
    /// `rate_per_second` calls per second, each start at least `1/rate + guard` after the last.
    pub fn new(rate_per_second: f64, guard: Duration) -> Self {
        let interval = Duration::from_secs_f64(1.0 / rate_per_second) + guard;
        let bucket = leaky_bucket::RateLimiter::builder()
            .max(1)
            .initial(1)
            .refill(1)
            .interval(interval)
            .build();
        LocalLimiter {
            bucket,
            interval,
            state: Mutex::new(PaceState::default()),
        }
    }

    fn floor(&self) -> Option<Instant> {
        self.state.lock().expect("pacing lock").floor(self.interval)
    }
}

impl Limiter for LocalLimiter {
    fn interval(&self) -> Duration {
        self.interval
    }

    fn next_start(&self) -> Instant {
        let now = Instant::now();
        self.floor().map_or(now, |f| f.max(now))
    }

    fn acquire(&self) -> Pin<Box<dyn Future<Output = Instant> + Send + '_>> {
        Box::pin(async move {
            loop {
                if let Some(floor) = self.floor() {
                    tokio::time::sleep_until(floor).await;
                }
                self.bucket.acquire_one().await;
                // A penalty may have been recorded while we waited for the token: check the
                // floor again under the lock and claim the start only if it still holds.
                let now = Instant::now();
                let mut state = self.state.lock().expect("pacing lock");
                if state.floor(self.interval).is_none_or(|f| f <= now) {
                    state.last_start = Some(now);
                    return now;
                }
            }
        })
    }

    fn penalize(&self, until: Instant) {
        let mut state = self.state.lock().expect("pacing lock");
        state.penalty_until = state.penalty_until.max(Some(until));
    }

    fn penalty_until(&self) -> Option<Instant> {
        let state = self.state.lock().expect("pacing lock");
        state.penalty_until.filter(|&t| t > Instant::now())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[tokio::test(start_paused = true)]
    async fn starts_are_spaced_by_interval_even_after_idle_spells() {
        let limiter = LocalLimiter::new(1.0, 10 * MS);
        assert_eq!(limiter.interval(), 1010 * MS);
        let mut starts = vec![limiter.acquire().await];
        // Idle gaps chosen to land at awkward phases of leaky-bucket's refill grid.
        for idle in [0, 1500, 0, 0, 2700, 10, 999, 0, 5050, 0] {
            tokio::time::sleep(idle * MS).await;
            starts.push(limiter.acquire().await);
        }
        for pair in starts.windows(2) {
            let gap = pair[1] - pair[0];
            assert!(gap >= 1010 * MS, "gap {gap:?} shorter than the interval");
        }
        // Back-to-back acquisitions are not slower than the interval either.
        let a = limiter.acquire().await;
        let b = limiter.acquire().await;
        assert_eq!(b - a, 1010 * MS);
    }

    #[tokio::test(start_paused = true)]
    async fn no_start_inside_a_penalty() {
        let limiter = LocalLimiter::new(1.0, Duration::ZERO);
        let first = limiter.acquire().await;
        let until = first + Duration::from_secs(3);
        limiter.penalize(until);
        // A shorter penalty recorded later does not shorten the pause.
        limiter.penalize(first + Duration::from_secs(1));
        assert_eq!(limiter.next_start(), until);
        assert_eq!(limiter.penalty_until(), Some(until));
        let second = limiter.acquire().await;
        assert_eq!(second, until);
    }

    #[tokio::test(start_paused = true)]
    async fn a_penalty_recorded_during_the_wait_is_respected() {
        let limiter = std::sync::Arc::new(LocalLimiter::new(2.0, Duration::ZERO));
        let first = limiter.acquire().await;
        let waiter = {
            let limiter = limiter.clone();
            tokio::spawn(async move { limiter.acquire().await })
        };
        tokio::time::sleep(100 * MS).await;
        limiter.penalize(first + Duration::from_secs(2));
        let second = waiter.await.unwrap();
        assert!(
            second >= first + Duration::from_secs(2),
            "{:?}",
            second - first
        );
    }

    #[tokio::test(start_paused = true)]
    async fn next_start_predicts_the_acquire() {
        let limiter = LocalLimiter::new(4.0, 5 * MS);
        let t0 = limiter.acquire().await;
        assert_eq!(limiter.next_start(), t0 + 255 * MS);
        let t1 = limiter.acquire().await;
        assert_eq!(t1, t0 + 255 * MS);
        tokio::time::sleep(Duration::from_secs(10)).await;
        assert_eq!(limiter.next_start(), Instant::now());
    }
}
