//! The circuit breaker: its state, and the changes into each state.

use std::collections::HashMap;

use prometheus::{IntCounter, IntCounterVec, IntGauge};

use super::{Families, Metrics};
use crate::lookup::breaker::BreakerState;

/// The states whose transition series are pre-registered. `BreakerState` derives no list of
/// its variants, so a state added there and not here still counts, from its first use.
const STATES: [BreakerState; 3] = [
    BreakerState::Closed,
    BreakerState::HalfOpen,
    BreakerState::Open,
];

pub(super) struct BreakerMetrics {
    state: IntGauge,
    transitions: HashMap<&'static str, IntCounter>,
    transitions_vec: IntCounterVec,
}

impl BreakerMetrics {
    pub(super) fn new(families: &Families) -> Self {
        let transitions_vec = families.counter_vec(
            "breaker_transitions_total",
            "Circuit breaker state changes, by the state entered.",
            &["to"],
        );
        BreakerMetrics {
            state: families.gauge(
                "breaker_state",
                "Circuit breaker state: 0 closed, 1 half-open (one probe call), 2 open \
                 (lookups refused).",
            ),
            transitions: STATES
                .iter()
                .map(|s| (s.as_str(), transitions_vec.with_label_values(&[s.as_str()])))
                .collect(),
            transitions_vec,
        }
    }
}

impl Metrics {
    pub fn breaker_transition(&self, state: BreakerState) {
        let breaker = &self.breaker;
        breaker.state.set(state.level());
        match breaker.transitions.get(state.as_str()) {
            Some(c) => c.inc(),
            None => breaker
                .transitions_vec
                .with_label_values(&[state.as_str()])
                .inc(),
        }
    }
}
