//! Listening, connection limits, the background tasks, and graceful shutdown.
//!
//! Each listener has its own accept loop (hyper's HTTP/1.1 server on tokio) so the limits
//! that protect the process are ours to set:
//! - at most `max-connections` open connections on the public listener (the admin listener
//!   has its own small allowance, so `/health` and `/metrics` stay reachable when the public
//!   one is full); a connection beyond the cap gets an immediate `503` and is closed;
//! - a request head must arrive within `header-read-timeout` (slowloris clients, and idle
//!   keep-alive connections, are cut off) and fit in [`MAX_HEADER_BYTES`].
//!
//! Shutdown, in order: report not-ready and admit only lookups that can start within
//! `shutdown-grace`; let every open connection finish the request it is on (no reset), and
//! answer new connections `503` meanwhile, and let the upstream calls under way end (a
//! background lookup's call holds no connection); when the grace period ends, answer
//! whatever still waits with `503` and close.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use std::convert::Infallible;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinHandle;
use tower::ServiceExt;

use crate::app::App;
use crate::config::Config;
use crate::http;
use crate::http::connection::{ConnectionError, ConnectionRefusal, Listener};

/// After the grace period and the 503s, how long connections get to take their answers.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// The largest request head hyper reads at all (request line and headers); beyond it, `431`.
/// The finer limits (`414` for long URIs, `431` for many headers) are in `http.rs`.
pub(crate) const MAX_HEADER_BYTES: usize = 64 * 1024;

/// Connections the admin listener accepts at once: operators and Prometheus, not clients.
const ADMIN_MAX_CONNECTIONS: usize = 256;

pub struct Server {
    app: Arc<App>,
    listener: TcpListener,
    admin: Option<TcpListener>,
}

impl Server {
    /// Builds the app and binds its listeners (nothing is served until [`Server::run`]).
    pub async fn bind(config: Config) -> anyhow::Result<Server> {
        let listener =
            listen(config.listen).with_context(|| format!("cannot listen on {}", config.listen))?;
        let admin = match config.admin_listen {
            Some(addr) => {
                Some(listen(addr).with_context(|| format!("cannot listen on {addr} (admin)"))?)
            }
            None => None,
        };
        let app = App::new(config)?;
        if let Some(shared) = &app.shared {
            // Start in shared mode if Redis answers now; otherwise in fallback, and the
            // health check keeps trying.
            shared.connect().await;
        }
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
        let job_runner = tokio::spawn(app.jobs.clone().run());
        let refresher = app.refresh_ahead.clone().map(|ahead| {
            tokio::spawn(ahead.run(
                app.scheduler.clone(),
                app.cache.clone(),
                app.pacer.interval(),
            ))
        });
        let shared_tasks = match &app.shared {
            Some(shared) => {
                let mut tasks = shared.start();
                tasks.push(tokio::spawn(app.clone().follow_pacing_mode()));
                tasks
            }
            None => Vec::new(),
        };
        let (stop_tx, stop_rx) = watch::channel(false);

        let mut loops: Vec<JoinHandle<()>> = vec![tokio::spawn(accept_loop(
            self.listener,
            http::router(app.clone()),
            Listener::Public,
            app.config.max_connections,
            app.clone(),
            stop_rx.clone(),
        ))];
        if let Some(admin) = self.admin {
            loops.push(tokio::spawn(accept_loop(
                admin,
                http::admin_router(app.clone()),
                Listener::Admin,
                ADMIN_MAX_CONNECTIONS,
                app.clone(),
                stop_rx,
            )));
        }

        shutdown.await;
        let grace = app.config.shutdown_grace;
        tracing::info!(
            grace_seconds = grace.as_secs_f64(),
            "shutting down: draining"
        );
        app.begin_drain(grace);
        let _ = stop_tx.send(true);

        let drained = async {
            for accept in &mut loops {
                let _ = accept.await;
            }
        };
        tokio::pin!(drained);
        let grace_ends = tokio::time::Instant::now() + grace;
        if tokio::time::timeout(grace, &mut drained).await.is_err() {
            tracing::info!("grace period over: answering what still waits with 503");
            app.close();
            if tokio::time::timeout(CLOSE_TIMEOUT, &mut drained)
                .await
                .is_err()
            {
                tracing::warn!("connections still open after the close timeout; exiting anyway");
                for accept in &loops {
                    accept.abort();
                }
            }
        } else if tokio::time::timeout_at(grace_ends, app.scheduler.calls_under_way_done())
            .await
            .is_err()
        {
            // Calls no connection waits for (background lookups) had the rest of the grace.
            tracing::info!("grace period over: upstream calls still under way are cut off");
        }
        app.close();
        dispatcher.abort();
        job_runner.abort();
        if let Some(refresher) = refresher {
            refresher.abort();
        }
        for task in shared_tasks {
            task.abort();
        }
        tracing::info!("stopped");
        Ok(())
    }
}

/// Connections the kernel may hold for us before we accept them: a burst of clients
/// connecting at once should wait in the backlog, not retry their SYNs a second later.
const BACKLOG: u32 = 4096;

fn listen(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(BACKLOG)
}

/// Accepts connections until `stop`, then keeps answering newcomers `503` until every open
/// connection has finished its request.
async fn accept_loop(
    listener: TcpListener,
    router: axum::Router,
    which: Listener,
    max_connections: usize,
    app: Arc<App>,
    mut stop: watch::Receiver<bool>,
) {
    let metrics = app.metrics.clone();
    let graceful = GracefulShutdown::new();
    let slots = Arc::new(Semaphore::new(max_connections));
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(app.config.header_read_timeout)
        .max_header_size(MAX_HEADER_BYTES)
        .keep_alive(true);

    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of file descriptors, usually: pause rather than spin.
                    tracing::warn!(error = %e, listener = which.as_str(), "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = stopped(&mut stop) => break,
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            metrics.connection_refused(which, ConnectionRefusal::Limit);
            tokio::spawn(refuse(stream, &OVERLOADED));
            continue;
        };
        let _ = stream.set_nodelay(true);
        // Lookups go straight to their handler; every other request through the router.
        let (app, router) = (app.clone(), router.clone());
        let fast = which == Listener::Public;
        let service = hyper::service::service_fn(move |request: hyper::Request<Incoming>| {
            let (app, router) = (app.clone(), router.clone());
            async move {
                if fast && http::is_lookup(&request) {
                    Ok::<_, Infallible>(http::score_direct(app, request).await)
                } else {
                    router.oneshot(request.map(axum::body::Body::new)).await
                }
            }
        });
        let connection = builder.serve_connection(TokioIo::new(stream), service);
        let connection = graceful.watch(connection);
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let open = metrics.connections_open(which);
            open.inc();
            if let Err(e) = connection.await {
                metrics.connection_error(which, classify(&e));
            }
            open.dec();
            drop(slot);
        });
    }

    // Draining: open connections finish what they are doing; newcomers learn why they
    // cannot be served instead of meeting a closed port.
    let drained = graceful.shutdown();
    tokio::pin!(drained);
    loop {
        tokio::select! {
            () = &mut drained => break,
            accepted = listener.accept() => {
                if let Ok((stream, _)) = accepted {
                    metrics.connection_refused(which, ConnectionRefusal::Shutdown);
                    tokio::spawn(refuse(stream, &SHUTTING_DOWN));
                }
            }
        }
    }
}

async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

fn classify(e: &hyper::Error) -> ConnectionError {
    if e.is_timeout() {
        ConnectionError::HeaderTimeout
    } else if e.is_parse() || e.is_parse_too_large() || e.is_parse_status() {
        ConnectionError::Parse
    } else if e.is_incomplete_message() || e.is_closed() || e.is_canceled() {
        ConnectionError::Io
    } else {
        ConnectionError::Other
    }
}

/// A complete `503` answer with a JSON body, for connections refused before any request is
/// read.
fn canned_503(kind: &str, message: &str) -> Vec<u8> {
    let body =
        format!("{{\"error\":\"{kind}\",\"message\":\"{message}\",\"retry_after_seconds\":1}}");
    format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n\
         retry-after: 1\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

static OVERLOADED: std::sync::LazyLock<Vec<u8>> =
    std::sync::LazyLock::new(|| canned_503("overloaded", "too many open connections; retry later"));
static SHUTTING_DOWN: std::sync::LazyLock<Vec<u8>> =
    std::sync::LazyLock::new(|| canned_503("shutting_down", "the proxy is shutting down"));

/// Answers a connection we will not serve, without reading its request first, then closes
/// it gently: our FIN first, then whatever the client sent is drained, so the kernel does
/// not turn the close into a reset that could destroy the answer in flight.
async fn refuse(mut stream: TcpStream, response: &'static [u8]) {
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        stream.write_all(response).await?;
        stream.shutdown().await?;
        let mut sink = [0u8; 4096];
        let mut drained = 0;
        while drained < 64 * 1024 {
            match stream.read(&mut sink).await? {
                0 => break,
                n => drained += n,
            }
        }
        Ok::<_, std::io::Error>(())
    })
    .await;
}

/// Raises this process's open-file limit to the hard limit, so `max-connections` is not
/// capped by a low default soft limit (1024 on many systems).
pub fn raise_fd_limit() -> Option<u64> {
    rlimit::increase_nofile_limit(u64::MAX).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canned_answers_are_well_formed() {
        for response in [&*OVERLOADED, &*SHUTTING_DOWN] {
            let text = std::str::from_utf8(response).unwrap();
            let (head, body) = text.split_once("\r\n\r\n").unwrap();
            let length: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length: "))
                .unwrap()
                .parse()
                .unwrap();
            assert_eq!(length, body.len(), "{head}");
            let json: serde_json::Value = serde_json::from_str(body).unwrap();
            assert!(json["error"].is_string());
        }
    }
}
