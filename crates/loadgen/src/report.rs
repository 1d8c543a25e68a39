//! What a run counted: every request's outcome, tallied by status, target and outcome name,
//! and the report a run returns. Outcome names come from the proxy's `X-Cache` header or its
//! error `kind`, never from a CPF or a client id.

use std::collections::BTreeMap;
use std::fmt;

use serde::Serialize;

/// What a run sent and what came back.
#[derive(Clone, Debug, Default, Serialize)]
pub struct LoadgenReport {
    pub mode: &'static str,
    pub elapsed_seconds: f64,
    /// Requests sent (lookups and the other routes).
    pub requests: u64,
    /// Answers by HTTP status code.
    pub by_status: BTreeMap<u16, u64>,
    /// Requests sent to each target (its base URL as given), answered or not.
    pub by_target: BTreeMap<String, u64>,
    /// Answers by outcome: the `X-Cache` value of a `200` (`hit`, `miss`, `coalesced`,
    /// `stale`), the `error` kind of any other answer; plus, in once mode, `abandoned`,
    /// `unused_slot` and `penalty` when the proxy's own counters moved.
    pub by_outcome: BTreeMap<String, u64>,
    /// Requests this generator hung up on before an answer came, on purpose.
    pub hung_up: u64,
    /// Requests that failed without an HTTP answer (connection refused or reset).
    pub transport_errors: u64,
    /// Once mode: outcomes that could not be provoked within the step timeout.
    pub missing: Vec<String>,
    /// Once mode: outcomes not attempted (they need `--sim-url`, or `/metrics` on the
    /// target to be seen).
    pub skipped: Vec<String>,
}

impl LoadgenReport {
    /// Whether every attempted outcome was seen (always true for continuous runs).
    pub fn is_complete(&self) -> bool {
        self.missing.is_empty()
    }
}

impl fmt::Display for LoadgenReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "loadgen ({}): {} requests in {:.1}s, {} hung up on purpose, {} transport errors",
            self.mode, self.requests, self.elapsed_seconds, self.hung_up, self.transport_errors
        )?;
        let statuses: Vec<String> = self
            .by_status
            .iter()
            .map(|(s, n)| format!("{s}={n}"))
            .collect();
        writeln!(f, "  by status:  {}", statuses.join(" "))?;
        if self.by_target.len() > 1 {
            let targets: Vec<String> = self
                .by_target
                .iter()
                .map(|(t, n)| format!("{t}={n}"))
                .collect();
            writeln!(f, "  by target:  {}", targets.join(" "))?;
        }
        let outcomes: Vec<String> = self
            .by_outcome
            .iter()
            .map(|(o, n)| format!("{o}={n}"))
            .collect();
        writeln!(f, "  by outcome: {}", outcomes.join(" "))?;
        if !self.skipped.is_empty() {
            writeln!(f, "  skipped (no --sim-url): {}", self.skipped.join(" "))?;
        }
        if !self.missing.is_empty() {
            writeln!(f, "  NOT PROVOKED: {}", self.missing.join(" "))?;
        }
        Ok(())
    }
}

/// What one request came to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Sent {
    Answered {
        status: u16,
        outcome: String,
    },
    /// We stopped waiting (the client "left").
    HungUp,
    /// No HTTP answer at all.
    Failed,
}

impl Sent {
    fn outcome(&self) -> Option<&str> {
        match self {
            Sent::Answered { outcome, .. } => Some(outcome),
            _ => None,
        }
    }
}

#[derive(Clone, Debug, Default)]
pub(crate) struct Tally {
    pub(crate) requests: u64,
    pub(crate) by_status: BTreeMap<u16, u64>,
    pub(crate) by_target: BTreeMap<String, u64>,
    pub(crate) by_outcome: BTreeMap<String, u64>,
    pub(crate) hung_up: u64,
    pub(crate) transport_errors: u64,
}

impl Tally {
    pub(crate) fn count(&mut self, target: &str, sent: &Sent) {
        self.requests += 1;
        *self.by_target.entry(target.to_owned()).or_default() += 1;
        match sent {
            Sent::Answered { status, outcome } => {
                *self.by_status.entry(*status).or_default() += 1;
                *self.by_outcome.entry(outcome.clone()).or_default() += 1;
            }
            Sent::HungUp => self.hung_up += 1,
            Sent::Failed => self.transport_errors += 1,
        }
    }
}

pub(crate) fn outcomes_of(sent: impl IntoIterator<Item = Sent>) -> Vec<String> {
    sent.into_iter()
        .filter_map(|s| s.outcome().map(str::to_owned))
        .collect()
}

/// `X-Cache` of a `200`, else the `error` kind of the JSON body, else `http_<status>`.
pub(crate) fn classify(status: u16, cache: Option<String>, body: &[u8]) -> String {
    if (200..300).contains(&status) {
        return cache.unwrap_or_else(|| "ok".to_owned());
    }
    serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_owned))
        // Only short, plain names: the kind set is small and fixed, and nothing else from
        // a body should end up in a report.
        .filter(|k| k.len() <= 40 && k.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'))
        .unwrap_or_else(|| format!("http_{status}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classify_names_outcomes() {
        assert_eq!(classify(200, Some("hit".into()), b"{}"), "hit");
        assert_eq!(classify(200, None, b"{}"), "ok");
        assert_eq!(
            classify(429, None, br#"{"error":"queue_full","message":"x"}"#),
            "queue_full"
        );
        assert_eq!(classify(502, None, b"<html>"), "http_502");
        assert_eq!(
            classify(400, None, br#"{"error":"01658739060"}"#),
            "http_400",
            "nothing but a plain kind name is taken from a body"
        );
    }
}
