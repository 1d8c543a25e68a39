//! The circuit breaker: its state, and the changes into each state.

use std::collections::HashMap;

use prometheus::{IntCounter, IntGauge};
use strum::VariantArray;

use super::{Families, Metrics};
use crate::lookup::breaker::BreakerState;

pub(super) struct BreakerMetrics {
    state: IntGauge,
    /// One pre-registered child per state: every state's series exists from the start.
    transitions: HashMap<BreakerState, IntCounter>,
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
            transitions: BreakerState::VARIANTS
                .iter()
                .map(|&s| (s, transitions_vec.with_label_values(&[s.as_str()])))
                .collect(),
        }
    }
}

impl Metrics {
    pub(crate) fn breaker_transition(&self, state: BreakerState) {
        let breaker = &self.breaker;
        breaker.state.set(state.level());
        breaker.transitions[&state].inc();
    }
}
