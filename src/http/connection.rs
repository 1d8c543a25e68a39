//! How connections come and go, as metrics name it: the listener, and why a connection was
//! refused or ended badly (a leaf module, shared by the accept loops and the metrics).
//!
//! Each label value is its variant's name in snake case.

/// Which listener a connection came in on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, strum::IntoStaticStr, strum::VariantArray)]
#[strum(serialize_all = "snake_case")]
pub(crate) enum Listener {
    Public,
    Admin,
}

impl Listener {
    pub(crate) fn as_str(self) -> &'static str {
        self.into()
    }
}

/// Why a connection was turned away before any request was read.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, strum::IntoStaticStr, strum::VariantArray)]
#[strum(serialize_all = "snake_case")]
pub(crate) enum ConnectionRefusal {
    /// `max-connections` were already open.
    Limit,
    /// The proxy is shutting down.
    Shutdown,
}

/// How a connection ended badly.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, strum::IntoStaticStr, strum::VariantArray)]
#[strum(serialize_all = "snake_case")]
pub(crate) enum ConnectionError {
    /// The request head did not arrive within `header-read-timeout` (slowloris, or an idle
    /// keep-alive connection reaching the limit).
    HeaderTimeout,
    /// Not HTTP, or a head too large.
    Parse,
    /// Reset or broken by the peer.
    Io,
    Other,
}
