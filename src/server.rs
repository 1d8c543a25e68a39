//! Listening, the background tasks, and graceful shutdown.
//!
//! Shutdown, in order: stop accepting connections and report not-ready; let queued and
//! running lookups finish for up to `shutdown-grace` (admitting new ones on open connections
//! only if they can start within it); then answer whatever still waits with `503` and close.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::config::Config;
use crate::http;
use crate::proxy::App;

/// After the grace period and the 503s, how long connections get to take their answers.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

pub struct Server {
    app: Arc<App>,
    listener: TcpListener,
    admin: Option<TcpListener>,
}

impl Server {
    /// Builds the app and binds its listeners (nothing is served until [`Server::run`]).
    pub async fn bind(config: Config) -> anyhow::Result<Server> {
        let listener = TcpListener::bind(config.listen)
            .await
            .with_context(|| format!("cannot listen on {}", config.listen))?;
        let admin = match config.admin_listen {
            Some(addr) => Some(
                TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("cannot listen on {addr} (admin)"))?,
            ),
            None => None,
        };
        let app = App::new(config)?;
        Ok(Server {
            app,
            listener,
            admin,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .expect("a bound listener has an address")
    }

    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin
            .as_ref()
            .map(|l| l.local_addr().expect("a bound listener has an address"))
    }

    pub fn app(&self) -> Arc<App> {
        self.app.clone()
    }

    /// Serves until `shutdown` resolves, then shuts down gracefully.
    pub async fn run(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let app = self.app;
        let dispatcher = tokio::spawn(app.dispatcher.clone().run());
        let (stop_tx, stop_rx) = watch::channel(false);

        let mut servers: Vec<JoinHandle<std::io::Result<()>>> = Vec::new();
        servers.push(spawn_serve(
            self.listener,
            http::router(app.clone()),
            stop_rx.clone(),
        ));
        if let Some(admin) = self.admin {
            servers.push(spawn_serve(admin, http::admin_router(app.clone()), stop_rx));
        }

        shutdown.await;
        let grace = app.config.shutdown_grace;
        tracing::info!(
            grace_seconds = grace.as_secs_f64(),
            "shutting down: draining"
        );
        app.begin_drain(grace);
        let _ = stop_tx.send(true);

        let all_served = async {
            for server in &mut servers {
                let _ = server.await;
            }
        };
        tokio::pin!(all_served);
        if tokio::time::timeout(grace, &mut all_served).await.is_err() {
            tracing::info!("grace period over: answering what still waits with 503");
            app.close();
            if tokio::time::timeout(CLOSE_TIMEOUT, &mut all_served)
                .await
                .is_err()
            {
                tracing::warn!("connections still open after the close timeout; exiting anyway");
            }
        }
        app.close();
        dispatcher.abort();
        tracing::info!("stopped");
        Ok(())
    }
}

fn spawn_serve(
    listener: TcpListener,
    router: axum::Router,
    mut stop: watch::Receiver<bool>,
) -> JoinHandle<std::io::Result<()>> {
    tokio::spawn(async move {
        axum::serve(listener, router)
            .with_graceful_shutdown(async move {
                let _ = stop.wait_for(|s| *s).await;
            })
            .await
    })
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
