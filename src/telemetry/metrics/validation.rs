//! Lookups refused by validation, by reason.

use std::collections::HashMap;

use prometheus::IntCounter;
use strum::VariantNames;

use super::{Families, Metrics};
use crate::lookup::validation::QueryReason;

pub(super) struct ValidationMetrics {
    /// Keyed by the reason's string, which is what the stage hands over (`QueryError::reason`).
    rejections: HashMap<&'static str, IntCounter>,
}

impl ValidationMetrics {
    pub(super) fn new(families: &Families) -> Self {
        let rejections = families.counter_vec(
            "validation_rejections_total",
            "Lookups refused with 400 before reaching the cache, by reason.",
            &["reason"],
        );
        ValidationMetrics {
            rejections: QueryReason::VARIANTS
                .iter()
                .map(|&reason| (reason, rejections.with_label_values(&[reason])))
                .collect(),
        }
    }
}

impl Metrics {
    pub(crate) fn validation_rejected(&self, reason: &'static str) {
        if !self.enabled {
            return;
        }
        if let Some(c) = self.validation.rejections.get(reason) {
            c.inc();
        }
    }
}
