//! How connections come and go, as metrics name it: the listener, and why a connection was
//! refused or ended badly (a leaf module, shared by the accept loops and the metrics).

/// Which listener a connection came in on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Listener {
    Public,
    Admin,
}

impl Listener {
    pub const ALL: [Listener; 2] = [Listener::Public, Listener::Admin];

    pub fn as_str(self) -> &'static str {
        match self {
            Listener::Public => "public",
            Listener::Admin => "admin",
        }
    }
}

/// Why a connection was turned away before any request was read.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ConnectionRefusal {
    /// `max-connections` were already open.
    Limit,
    /// The proxy is shutting down.
    Shutdown,
}

/// How a connection ended badly.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ConnectionError {
    /// The request head did not arrive within `header-read-timeout` (slowloris, or an idle
    /// keep-alive connection reaching the limit).
    HeaderTimeout,
    /// Not HTTP, or a head too large.
    Parse,
    /// Reset or broken by the peer.
    Io,
    Other,
}

impl ConnectionError {
    pub const ALL: [ConnectionError; 4] = [
        ConnectionError::HeaderTimeout,
        ConnectionError::Parse,
        ConnectionError::Io,
        ConnectionError::Other,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ConnectionError::HeaderTimeout => "header_timeout",
            ConnectionError::Parse => "parse",
            ConnectionError::Io => "io",
            ConnectionError::Other => "other",
        }
    }
}
