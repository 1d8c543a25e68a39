//! Background refreshes (stale-while-revalidate and refresh-ahead): how each ended, and how
//! many wait. The budget they spend is the `refreshed`, `failed` and `penalised` outcomes
//! (each one upstream call); what the cache saved is in `cache_lookups_total`.

use std::collections::HashMap;

use prometheus::{IntCounter, IntGauge};

use super::{Families, Metrics, per_pair};
use crate::lookup::scheduler::{BackgroundOutcome, BackgroundReason};

pub(super) struct RefreshMetrics {
    ended: HashMap<(BackgroundReason, BackgroundOutcome), IntCounter>,
    waiting: IntGauge,
}

impl RefreshMetrics {
    pub(super) fn new(families: &Families) -> Self {
        RefreshMetrics {
            ended: per_pair(&families.counter_vec(
                "background_lookups_total",
                "Background refreshes ended, by reason (revalidate: a stale answer was \
                 served; refresh_ahead: a hot entry was about to expire) and outcome \
                 (refreshed, failed, penalised: each one upstream call; superseded: a \
                 caller's lookup fetched it; expired: callers kept the budget busy; refused: \
                 breaker open or shutdown; dropped: too many waiting).",
                &["reason", "outcome"],
            )),
            waiting: families.gauge(
                "background_lookups_waiting",
                "Background refreshes asked for and not started; they use only budget no \
                 caller needs.",
            ),
        }
    }
}

impl Metrics {
    pub(crate) fn refresh(&self, why: BackgroundReason, outcome: BackgroundOutcome) {
        self.refresh.ended[&(why, outcome)].inc();
    }

    pub(crate) fn set_refreshes_waiting(&self, n: usize) {
        self.refresh.waiting.set(n as i64);
    }
}
