//! The circuit breaker: its state, one series per state, and the changes into each state.

use std::collections::HashMap;

use prometheus::{IntCounter, IntGauge};

use super::{Families, Metrics, per_value};
use crate::lookup::breaker::BreakerState;

pub(super) struct BreakerMetrics {
    /// One series per state, 1 for the current one.
    state: HashMap<BreakerState, IntGauge>,
    /// One pre-registered child per state: every state's series exists from the start.
    transitions: HashMap<BreakerState, IntCounter>,
}

impl BreakerMetrics {
    pub(super) fn new(families: &Families) -> Self {
        let metrics = BreakerMetrics {
            state: per_value(&families.gauge_vec(
                "breaker_state",
                "Circuit breaker state, 1 for the current one: closed, half_open (the cool-down \
                 is over: the next lookup's call is the probe), open (lookups refused).",
                &["state"],
            )),
            transitions: per_value(&families.counter_vec(
                "breaker_transitions_total",
                "Circuit breaker state changes, by the state entered.",
                &["to"],
            )),
        };
        metrics.state[&BreakerState::Closed].set(1);
        metrics
    }
}

impl Metrics {
    /// The breaker entered `state` (called under the breaker's lock, on every change).
    pub(crate) fn breaker_transition(&self, state: BreakerState) {
        self.set_breaker_state(state);
        self.breaker.transitions[&state].inc();
    }

    /// The breaker's state as of now; the `/metrics` handler calls it before rendering, so
    /// that an open breaker whose cool-down has passed reads `half_open` without traffic.
    pub(crate) fn set_breaker_state(&self, state: BreakerState) {
        for (&s, gauge) in &self.breaker.state {
            gauge.set(i64::from(s == state));
        }
    }
}
