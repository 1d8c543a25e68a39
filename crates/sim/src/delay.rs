//! The network between a caller and the simulator: a one-way delay before an arrival is
//! counted.
//!
//! The real API is across the Internet and judges the rate on its own clock, at arrival. On
//! loopback every call arrives the instant it leaves, so a proxy that spaces its starts
//! well is never caught out by calls that left in order but arrive closer together (or in
//! the other order) because their one-way delays differ. This module draws such delays.
//!
//! The draws come from a small seeded generator (SplitMix64) rather than a random-number
//! crate: a test that names a seed gets the same sequence of delays on every machine and
//! every run, and the simulator gains no dependency for twenty lines of arithmetic.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// How long a call travels before the simulator counts its arrival.
///
/// Written the same way on the command line, in `/__sim/config` and in [`fmt::Display`]:
/// `none`; `uniform:0ms..30ms` (uniform in the range, ends included);
/// `spikes:0ms..3ms,5%,150ms` (uniform in the range, except that with the given
/// probability the delay is the spike instead).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum ArrivalDelay {
    /// Arrive at once, as on loopback.
    #[default]
    None,
    /// Uniform in `[min, max]`.
    Uniform { min: Duration, max: Duration },
    /// Mostly uniform in `[min, max]`; with probability `spike_ppm` (parts per million)
    /// the delay is `spike` instead: a network that is usually quiet and now and then
    /// holds a packet back (a retransmission, a queue somewhere).
    Spikes {
        min: Duration,
        max: Duration,
        spike_ppm: u32,
        spike: Duration,
    },
}

/// One in a million, the unit of [`ArrivalDelay::Spikes`]'s probability.
const MILLION: u32 = 1_000_000;

impl ArrivalDelay {
    /// The next delay, drawn from `rng`. `None` draws nothing, so switching the delay on
    /// later starts the seeded sequence from its beginning.
    pub(crate) fn draw(&self, rng: &mut SplitMix64) -> Duration {
        match *self {
            ArrivalDelay::None => Duration::ZERO,
            ArrivalDelay::Uniform { min, max } => uniform(rng, min, max),
            ArrivalDelay::Spikes {
                min,
                max,
                spike_ppm,
                spike,
            } => {
                // Always two draws, so that the sequence of small delays does not depend
                // on where the spikes fall.
                let roll = rng.next_u64() % u64::from(MILLION);
                let small = uniform(rng, min, max);
                if roll < u64::from(spike_ppm) {
                    spike
                } else {
                    small
                }
            }
        }
    }

    /// The largest delay this can draw, which tests use as a bound.
    pub fn max_delay(&self) -> Duration {
        match *self {
            ArrivalDelay::None => Duration::ZERO,
            ArrivalDelay::Uniform { max, .. } => max,
            ArrivalDelay::Spikes {
                max,
                spike_ppm,
                spike,
                ..
            } if spike_ppm > 0 => max.max(spike),
            ArrivalDelay::Spikes { max, .. } => max,
        }
    }
}

fn uniform(rng: &mut SplitMix64, min: Duration, max: Duration) -> Duration {
    let span = u64::try_from(max.saturating_sub(min).as_nanos()).unwrap_or(u64::MAX);
    let offset = match span.checked_add(1) {
        Some(n) => rng.next_u64() % n,
        None => rng.next_u64(),
    };
    min + Duration::from_nanos(offset)
}

impl fmt::Display for ArrivalDelay {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let d = humantime::format_duration;
        match *self {
            ArrivalDelay::None => f.write_str("none"),
            ArrivalDelay::Uniform { min, max } => write!(f, "uniform:{}..{}", d(min), d(max)),
            ArrivalDelay::Spikes {
                min,
                max,
                spike_ppm,
                spike,
            } => write!(
                f,
                "spikes:{}..{},{}%,{}",
                d(min),
                d(max),
                f64::from(spike_ppm) / 10_000.0,
                d(spike)
            ),
        }
    }
}

/// Why a delay was not understood; the message shows the syntax, so one look fixes it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid arrival delay {value:?} ({reason}); expected none, uniform:MIN..MAX or \
     spikes:MIN..MAX,PERCENT%,SPIKE (e.g. uniform:0ms..30ms, spikes:0ms..3ms,5%,150ms)"
)]
pub struct ParseDelayError {
    value: String,
    reason: String,
}

impl FromStr for ArrivalDelay {
    type Err = ParseDelayError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let fail = |reason: &str| ParseDelayError {
            value: s.to_owned(),
            reason: reason.to_owned(),
        };
        let s_trim = s.trim();
        if s_trim == "none" {
            return Ok(ArrivalDelay::None);
        }
        let (kind, rest) = s_trim
            .split_once(':')
            .ok_or_else(|| fail("no kind before ':'"))?;
        let range = |text: &str| -> Result<(Duration, Duration), ParseDelayError> {
            let (lo, hi) = text
                .split_once("..")
                .ok_or_else(|| fail("a range is MIN..MAX"))?;
            let (lo, hi) = (
                duration(lo).map_err(|e| fail(&e))?,
                duration(hi).map_err(|e| fail(&e))?,
            );
            if lo > hi {
                return Err(fail("the range's minimum is above its maximum"));
            }
            Ok((lo, hi))
        };
        match kind.trim() {
            "uniform" => {
                let (min, max) = range(rest)?;
                Ok(ArrivalDelay::Uniform { min, max })
            }
            "spikes" => {
                let parts: Vec<&str> = rest.split(',').collect();
                let [bounds, chance, spike] = parts[..] else {
                    return Err(fail("spikes take MIN..MAX,PERCENT%,SPIKE"));
                };
                let (min, max) = range(bounds)?;
                let percent: f64 = chance
                    .trim()
                    .strip_suffix('%')
                    .ok_or_else(|| fail("the probability ends in '%'"))?
                    .trim()
                    .parse()
                    .map_err(|_| fail("the probability is not a number"))?;
                if !(0.0..=100.0).contains(&percent) {
                    return Err(fail("the probability is not between 0% and 100%"));
                }
                // Within 0..=100 by the check above, so the cast cannot overflow.
                let spike_ppm = (percent * 10_000.0).round() as u32;
                let spike = duration(spike).map_err(|e| fail(&e))?;
                Ok(ArrivalDelay::Spikes {
                    min,
                    max,
                    spike_ppm,
                    spike,
                })
            }
            _ => Err(fail("the kind is none, uniform or spikes")),
        }
    }
}

fn duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text.trim()).map_err(|e| format!("{:?}: {e}", text.trim()))
}

/// In JSON the delay is the same string as on the command line, so a script can copy it.
impl Serialize for ArrivalDelay {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for ArrivalDelay {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// SplitMix64 (Steele, Lea and Flood, 2014): a 64-bit state, one addition and three
/// mixing steps per number. Statistically good enough to spread delays, and reproducible
/// from its seed alone.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct SplitMix64 {
    state: u64,
}

impl SplitMix64 {
    pub(crate) fn new(seed: u64) -> Self {
        Self { state: seed }
    }

    pub(crate) fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn syntax_round_trips() {
        for text in [
            "none",
            "uniform:0s..30ms",
            "uniform:5ms..5ms",
            "spikes:0s..3ms,5%,150ms",
            "spikes:1ms..2ms,0.5%,1s",
        ] {
            let delay: ArrivalDelay = text.parse().expect(text);
            assert_eq!(delay.to_string(), text);
            let json = serde_json::to_string(&delay).expect("serialises");
            assert_eq!(
                serde_json::from_str::<ArrivalDelay>(&json).ok(),
                Some(delay)
            );
        }
        assert_eq!(
            " uniform: 0ms .. 30ms ".parse(),
            Ok(ArrivalDelay::Uniform {
                min: ms(0),
                max: ms(30)
            })
        );
        assert_eq!(
            "spikes:0ms..3ms,5%,150ms".parse(),
            Ok(ArrivalDelay::Spikes {
                min: ms(0),
                max: ms(3),
                spike_ppm: 50_000,
                spike: ms(150)
            })
        );
        for bad in [
            "",
            "uniform",
            "uniform:30ms",
            "uniform:30ms..0ms",
            "uniform:0ms..3",
            "normal:0ms..1ms",
            "spikes:0ms..3ms,5,150ms",
            "spikes:0ms..3ms,150%,150ms",
            "spikes:0ms..3ms,5%",
        ] {
            let err = bad.parse::<ArrivalDelay>().expect_err(bad).to_string();
            assert!(err.contains("uniform:MIN..MAX"), "{err}");
        }
    }

    #[test]
    fn draws_stay_in_bounds_and_repeat_with_the_seed() {
        let uniform = ArrivalDelay::Uniform {
            min: ms(10),
            max: ms(20),
        };
        let draws = |seed| {
            let mut rng = SplitMix64::new(seed);
            (0..1000)
                .map(|_| uniform.draw(&mut rng))
                .collect::<Vec<_>>()
        };
        let first = draws(7);
        assert!(first.iter().all(|d| (ms(10)..=ms(20)).contains(d)));
        assert_eq!(first, draws(7));
        assert_ne!(first, draws(8));
        // Spread over the range, not stuck at one end.
        assert!(first.iter().any(|d| *d < ms(12)) && first.iter().any(|d| *d > ms(18)));

        let spikes = ArrivalDelay::Spikes {
            min: ms(0),
            max: ms(3),
            spike_ppm: 50_000,
            spike: ms(150),
        };
        let mut rng = SplitMix64::new(1);
        let drawn: Vec<Duration> = (0..10_000).map(|_| spikes.draw(&mut rng)).collect();
        let spiked = drawn.iter().filter(|d| **d == ms(150)).count();
        assert!(
            (350..=650).contains(&spiked),
            "{spiked} spikes in 10000 at 5%"
        );
        assert!(drawn.iter().all(|d| *d <= ms(3) || *d == ms(150)));
        assert_eq!(spikes.max_delay(), ms(150));
        assert_eq!(ArrivalDelay::None.draw(&mut rng), Duration::ZERO);
    }
}
