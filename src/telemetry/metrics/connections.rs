//! Client connections, by listener: open, refused before any request was read, and ended by
//! an error.

use std::collections::HashMap;

use prometheus::{IntCounter, IntGauge};

use super::{Families, Metrics, per_pair, per_value};
use crate::http::connection::{ConnectionError, ConnectionRefusal, Listener};

pub(super) struct ConnectionMetrics {
    open: HashMap<Listener, IntGauge>,
    refused: HashMap<(Listener, ConnectionRefusal), IntCounter>,
    errors: HashMap<(Listener, ConnectionError), IntCounter>,
}

impl ConnectionMetrics {
    pub(super) fn new(families: &Families) -> Self {
        ConnectionMetrics {
            open: per_value(&families.gauge_vec(
                "http_connections_open",
                "Client connections open, by listener.",
                &["listener"],
            )),
            refused: per_pair(&families.counter_vec(
                "http_connections_refused_total",
                "Connections answered 503 and closed before any request was read, by \
                 listener and reason (limit: max-connections reached; shutdown).",
                &["listener", "reason"],
            )),
            errors: per_pair(&families.counter_vec(
                "http_connection_errors_total",
                "Connections that ended in an error, by listener and kind (header_timeout \
                 counts slow or idle clients cut off by header-read-timeout).",
                &["listener", "kind"],
            )),
        }
    }
}

impl Metrics {
    pub(crate) fn connections_open(&self, listener: Listener) -> &IntGauge {
        &self.connections.open[&listener]
    }

    pub(crate) fn connection_refused(&self, listener: Listener, reason: ConnectionRefusal) {
        self.connections.refused[&(listener, reason)].inc();
    }

    pub(crate) fn connection_error(&self, listener: Listener, kind: ConnectionError) {
        self.connections.errors[&(listener, kind)].inc();
    }
}
