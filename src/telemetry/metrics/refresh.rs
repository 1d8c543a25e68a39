//! Background refreshes (stale-while-revalidate and refresh-ahead): how each ended, and how
//! many wait. The budget they spend is the `refreshed`, `failed` and `penalised` outcomes
//! (each one upstream call); what the cache saved is in `cache_lookups_total`.

use std::collections::HashMap;

use prometheus::{IntCounter, IntGauge};

use super::{Families, Metrics, per_pair};
use crate::lookup::scheduler::{Refresh, RefreshOutcome};

pub(super) struct RefreshMetrics {
    ended: HashMap<(Refresh, RefreshOutcome), IntCounter>,
    waiting: IntGauge,
}

impl RefreshMetrics {
    pub(super) fn new(families: &Families) -> Self {
        RefreshMetrics {
            ended: per_pair(&families.counter_vec(
                "background_refreshes_total",
                "Background refreshes ended, by reason (revalidate: a stale answer was \
                 served; refresh_ahead: a hot entry was about to expire) and outcome \
                 (refreshed, failed, penalised: each one upstream call; superseded: a \
                 caller's lookup fetched it; expired: callers kept the budget busy; refused: \
                 breaker open or shutdown; dropped: too many waiting).",
                &["reason", "outcome"],
            )),
            waiting: families.gauge(
                "background_refreshes_waiting",
                "Background refreshes asked for and not started; they use only budget no \
                 caller needs.",
            ),
        }
    }
}

impl Metrics {
    pub(crate) fn refresh(&self, why: Refresh, outcome: RefreshOutcome) {
        self.refresh.ended[&(why, outcome)].inc();
    }

    pub(crate) fn set_refreshes_waiting(&self, n: usize) {
        self.refresh.waiting.set(n as i64);
    }
}
