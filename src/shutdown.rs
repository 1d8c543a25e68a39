//! Shutdown: what starts it (Ctrl-C or SIGTERM) and the states a lookup sees while it runs.
//!
//! The sequence itself is [`crate::http::server::Server::run`]'s tail: stop accepting, let
//! the queue drain for `shutdown-grace` (admitting only lookups that can start within it),
//! then answer whatever still waits with `503` and stop.

/// Shutdown progress, as lookups see it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Lifecycle {
    Running,
    /// Not accepting connections; queued lookups may still finish.
    Draining,
    /// The grace period is over: whatever still waits is answered 503.
    Closed,
}

/// Resolves on Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = terminate => {},
    }
}
