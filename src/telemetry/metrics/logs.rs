//! The log writer: lines dropped because its buffer was full.

use prometheus::IntCounter;

use super::{Families, Metrics};

pub(super) struct LogMetrics {
    dropped: IntCounter,
}

impl LogMetrics {
    pub(super) fn new(families: &Families) -> Self {
        LogMetrics {
            dropped: families.counter(
                "log_lines_dropped_total",
                "Log lines (access log included) dropped because the log buffer was full \
                 (SCORE_PROXY_LOG_BUFFER_LINES): the output could not keep up.",
            ),
        }
    }
}

impl Metrics {
    /// Brings the counter up to the log writer's own count (read at scrape time: the
    /// writer is process-wide and counts without knowing the registry).
    pub(crate) fn set_log_lines_dropped(&self, total: u64) {
        let counter = &self.logs.dropped;
        let shown = counter.get();
        if total > shown {
            counter.inc_by(total - shown);
        }
    }
}
