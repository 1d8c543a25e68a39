//! What the simulator can be told to do, and the JSON shape of `/__sim/config`.
//!
//! The defaults are the real API's known behaviour (1 call/s for everyone together, a 2 s
//! penalty, no `Retry-After`) on loopback (no network delay), so a test that changes nothing tests against the strict
//! contract. Everything else is a knob a test turns to reproduce one way the real API has
//! been seen (or feared) to misbehave.

use std::collections::HashSet;
use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize};

use super::delay::ArrivalDelay;

/// Everything that shapes the simulator's answers.
///
/// Build one with struct-update syntax over [`Default`] so that new knobs do not break
/// callers: `SimulatorConfig { min_interval: ms(100), ..Default::default() }`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SimulatorConfig {
    /// An arrival sooner than this after the previous arrival (any caller's) is a violation.
    /// `Duration::ZERO` switches the rate rule off, which is what tests of validation and
    /// faults want so that they need not space their calls.
    pub min_interval: Duration,
    /// How long a violation keeps every later arrival failing with `429`.
    pub penalty: Duration,
    /// Delay before any answer, counted after the arrival was recorded, so that latency
    /// never shifts the rate rule's clock.
    pub latency: Duration,
    /// How the upstream misbehaves when the call is not a rate violation.
    pub fault: Fault,
    /// Apply [`fault`](Self::fault) only to every Nth arrival since the last reset (`None`,
    /// `Some(0)` and `Some(1)` all mean every arrival), so soak tests can mix good and bad.
    pub fail_every: Option<u32>,
    /// Whether, and how, a `429` says when to come back.
    pub retry_after: RetryAfterMode,
    /// Accepted `client-id` values; `None` accepts any non-empty id, `Some(empty)` none.
    pub client_ids: Option<HashSet<String>>,
    /// The one-way network delay before an arrival is counted: the rate rule judges the
    /// delayed arrival, as the real API judges what reaches it, not what left the caller.
    pub arrival_delay: ArrivalDelay,
    /// Seeds the generator the delays are drawn from, so a test gets the same delays on
    /// every run. Changing it (or resetting the simulator) restarts the sequence.
    pub seed: u64,
}

impl Default for SimulatorConfig {
    fn default() -> Self {
        Self {
            min_interval: Duration::from_secs(1),
            penalty: Duration::from_secs(2),
            latency: Duration::ZERO,
            fault: Fault::None,
            fail_every: None,
            retry_after: RetryAfterMode::None,
            client_ids: None,
            arrival_delay: ArrivalDelay::None,
            seed: 0,
        }
    }
}

impl SimulatorConfig {
    /// Whether the configured fault hits the arrival numbered `calls` since the last reset.
    pub(crate) fn fault_applies(&self, calls: u64) -> bool {
        match self.fail_every {
            None | Some(0) | Some(1) => true,
            Some(n) => calls.is_multiple_of(u64::from(n)),
        }
    }

    /// Whether `client_id` may call at all; an empty id never may, as upstream answers
    /// `401` for a missing header and an empty one alike.
    pub(crate) fn accepts_client(&self, client_id: &str) -> bool {
        !client_id.is_empty()
            && self
                .client_ids
                .as_ref()
                .is_none_or(|allowed| allowed.contains(client_id))
    }
}

/// One way the upstream can fail. Faults never replace a `429`: the rate rule is judged
/// first, as the real API counts the call whatever happens next.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize, clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum Fault {
    /// Answer as the contract says.
    #[default]
    None,
    /// Never answer; the pending answer is dropped when the client goes away. This is what
    /// made the original proxy block every client behind one call.
    Hang,
    /// `500` with a JSON error body.
    Error,
    /// `503` with a JSON error body.
    Unavailable,
    /// `200` whose body is HTML, not JSON, as an upstream behind a broken gateway sends.
    Garbage,
    /// Start a `200` and break the connection mid-body, so the client fails while reading.
    Reset,
}

impl Fault {
    /// Every variant, in the order of its wire names in [`Fault::as_str`].
    pub const ALL: [Fault; 6] = [
        Fault::None,
        Fault::Hang,
        Fault::Error,
        Fault::Unavailable,
        Fault::Garbage,
        Fault::Reset,
    ];

    /// The wire name, the same in JSON, on the command line and in [`FromStr`].
    pub fn as_str(self) -> &'static str {
        match self {
            Fault::None => "none",
            Fault::Hang => "hang",
            Fault::Error => "error",
            Fault::Unavailable => "unavailable",
            Fault::Garbage => "garbage",
            Fault::Reset => "reset",
        }
    }
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Fault {
    type Err = ParseModeError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Fault::ALL
            .into_iter()
            .find(|fault| fault.as_str() == s)
            .ok_or_else(|| ParseModeError::new("fault", s, &Fault::ALL.map(Fault::as_str)))
    }
}

/// How a `429` tells the client when the penalty ends. The real API's behaviour here is
/// unknown, so a proxy has to cope with all three.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize, clap::ValueEnum,
)]
#[serde(rename_all = "kebab-case")]
pub enum RetryAfterMode {
    /// No `Retry-After` header.
    #[default]
    None,
    /// Whole seconds until the penalty ends, rounded up so that obeying it is never early.
    Seconds,
    /// The HTTP date at which the penalty ends, rounded up to the next whole second.
    HttpDate,
}

impl RetryAfterMode {
    /// Every variant, in the order of its wire names in [`RetryAfterMode::as_str`].
    pub const ALL: [RetryAfterMode; 3] = [
        RetryAfterMode::None,
        RetryAfterMode::Seconds,
        RetryAfterMode::HttpDate,
    ];

    /// The wire name, the same in JSON, on the command line and in [`FromStr`].
    pub fn as_str(self) -> &'static str {
        match self {
            RetryAfterMode::None => "none",
            RetryAfterMode::Seconds => "seconds",
            RetryAfterMode::HttpDate => "http-date",
        }
    }
}

impl fmt::Display for RetryAfterMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for RetryAfterMode {
    type Err = ParseModeError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        RetryAfterMode::ALL
            .into_iter()
            .find(|mode| mode.as_str() == s)
            .ok_or_else(|| {
                ParseModeError::new(
                    "retry-after mode",
                    s,
                    &RetryAfterMode::ALL.map(|m| m.as_str()),
                )
            })
    }
}

/// A mode name that is not one of the known ones; the message lists the valid names so a
/// typo on the command line is fixed in one go.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown {what} {value:?}; expected one of: {expected}")]
pub struct ParseModeError {
    what: &'static str,
    value: String,
    expected: String,
}

impl ParseModeError {
    fn new(what: &'static str, value: &str, expected: &[&str]) -> Self {
        Self {
            what,
            value: value.to_owned(),
            expected: expected.join(", "),
        }
    }
}

/// The configuration as `GET /__sim/config` and `PUT /__sim/config` show it: durations in
/// whole milliseconds, because scripts and `curl` users write numbers, not `Duration`s.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConfigView {
    pub fault: Fault,
    pub latency_ms: u64,
    pub retry_after: RetryAfterMode,
    pub fail_every: Option<u32>,
    pub min_interval_ms: u64,
    pub penalty_ms: u64,
    /// Sorted, so that the output is stable.
    pub client_ids: Option<Vec<String>>,
    /// In the command line's syntax: `none`, `uniform:0ms..30ms`, `spikes:0ms..3ms,5%,150ms`.
    #[serde(default)]
    pub arrival_delay: ArrivalDelay,
    #[serde(default)]
    pub seed: u64,
}

impl From<&SimulatorConfig> for ConfigView {
    fn from(config: &SimulatorConfig) -> Self {
        Self {
            fault: config.fault,
            latency_ms: millis(config.latency),
            retry_after: config.retry_after,
            fail_every: config.fail_every,
            min_interval_ms: millis(config.min_interval),
            penalty_ms: millis(config.penalty),
            client_ids: config.client_ids.as_ref().map(|ids| {
                let mut ids: Vec<String> = ids.iter().cloned().collect();
                ids.sort();
                ids
            }),
            arrival_delay: config.arrival_delay,
            seed: config.seed,
        }
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// A partial change to the configuration, the body of `PUT /__sim/config`. Absent fields
/// are left alone; `null` clears the two optional ones (`fail_every`, `client_ids`).
/// Unknown fields are refused, so a misspelt knob fails loudly instead of silently
/// leaving a test running against the wrong upstream.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigUpdate {
    pub fault: Option<Fault>,
    pub latency_ms: Option<u64>,
    pub retry_after: Option<RetryAfterMode>,
    #[serde(default, deserialize_with = "present")]
    pub fail_every: Option<Option<u32>>,
    pub min_interval_ms: Option<u64>,
    pub penalty_ms: Option<u64>,
    #[serde(default, deserialize_with = "present")]
    pub client_ids: Option<Option<Vec<String>>>,
    pub arrival_delay: Option<ArrivalDelay>,
    /// Restarts the delays' sequence from this seed, even if it is the seed in force.
    pub seed: Option<u64>,
}

/// Tells an explicit `null` (outer `Some(None)`) apart from an absent field (outer `None`,
/// via `#[serde(default)]`).
fn present<'de, D, T>(deserializer: D) -> Result<Option<Option<T>>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    Option::<T>::deserialize(deserializer).map(Some)
}

impl ConfigUpdate {
    /// Applies the change, or explains why it is refused without changing anything.
    pub fn apply(self, config: &mut SimulatorConfig) -> Result<(), String> {
        if self.fail_every == Some(Some(0)) {
            return Err("fail_every must be at least 1 (or null for every call)".to_owned());
        }
        if let Some(fault) = self.fault {
            config.fault = fault;
        }
        if let Some(ms) = self.latency_ms {
            config.latency = Duration::from_millis(ms);
        }
        if let Some(mode) = self.retry_after {
            config.retry_after = mode;
        }
        if let Some(every) = self.fail_every {
            config.fail_every = every;
        }
        if let Some(ms) = self.min_interval_ms {
            config.min_interval = Duration::from_millis(ms);
        }
        if let Some(ms) = self.penalty_ms {
            config.penalty = Duration::from_millis(ms);
        }
        if let Some(ids) = self.client_ids {
            config.client_ids = ids.map(|ids| ids.into_iter().collect());
        }
        if let Some(delay) = self.arrival_delay {
            config.arrival_delay = delay;
        }
        if let Some(seed) = self.seed {
            config.seed = seed;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_through_from_str_and_serde() {
        for fault in Fault::ALL {
            assert_eq!(fault.as_str().parse::<Fault>(), Ok(fault));
            let json = serde_json::to_string(&fault).expect("serialises");
            assert_eq!(json, format!("\"{fault}\""));
        }
        for mode in RetryAfterMode::ALL {
            assert_eq!(mode.as_str().parse::<RetryAfterMode>(), Ok(mode));
            let json = serde_json::to_string(&mode).expect("serialises");
            assert_eq!(json, format!("\"{mode}\""));
        }
        let err = "HANG".parse::<Fault>().err().map(|e| e.to_string());
        assert_eq!(
            err.as_deref(),
            Some(
                "unknown fault \"HANG\"; expected one of: none, hang, error, unavailable, garbage, reset"
            )
        );
    }

    #[test]
    fn fail_every_picks_every_nth_call() {
        let mut config = SimulatorConfig::default();
        assert!((1..=5).all(|n| config.fault_applies(n)));
        config.fail_every = Some(3);
        let hit: Vec<u64> = (1..=9).filter(|&n| config.fault_applies(n)).collect();
        assert_eq!(hit, vec![3, 6, 9]);
    }

    #[test]
    fn allow_list_rules() {
        let mut config = SimulatorConfig::default();
        assert!(config.accepts_client("anyone"));
        assert!(!config.accepts_client(""));
        config.client_ids = Some(HashSet::from(["alpha".to_owned()]));
        assert!(config.accepts_client("alpha"));
        assert!(!config.accepts_client("beta"));
        config.client_ids = Some(HashSet::new());
        assert!(!config.accepts_client("alpha"));
    }

    #[test]
    fn update_distinguishes_null_from_absent() {
        let mut config = SimulatorConfig {
            fail_every: Some(4),
            ..Default::default()
        };
        let absent: ConfigUpdate =
            serde_json::from_str(r#"{"latency_ms": 5}"#).expect("valid update");
        absent.apply(&mut config).ok();
        assert_eq!(config.fail_every, Some(4));
        assert_eq!(config.latency, Duration::from_millis(5));

        let null: ConfigUpdate =
            serde_json::from_str(r#"{"fail_every": null}"#).expect("valid update");
        assert_eq!(null.fail_every, Some(None));
        null.apply(&mut config).ok();
        assert_eq!(config.fail_every, None);

        let zero: ConfigUpdate =
            serde_json::from_str(r#"{"fail_every": 0}"#).expect("valid update");
        assert!(zero.apply(&mut config).is_err());
        assert!(serde_json::from_str::<ConfigUpdate>(r#"{"faults": "hang"}"#).is_err());
    }
}
