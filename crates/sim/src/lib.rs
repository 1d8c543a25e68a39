//! The upstream simulator: a strict, instrumented stand-in for the credit-score API.
//!
//! Nobody on the project can reach the real API (see `docs/upstream.md`), so every test and
//! benchmark runs against this instead, in-process on loopback or as the
//! `score-sim` binary (`score-proxy demo` links it in-process). It has to be *strict* where the real API
//! is (one call per `min_interval` for all callers together, judged on its own clock at
//! arrival, with a penalty that every arrival during it extends), because a lenient
//! stand-in would let a badly paced proxy pass. And it has to be *instrumented*, because
//! most of the proxy's promises (never more than 1 call/s, abandoned calls really
//! abandoned, trace context propagated, no call for a cached answer) can only be checked
//! by looking at what reached the upstream.
//!
//! - [`config`]: the knobs (rate rule, latency, faults, `Retry-After`, allow-list, network
//!   delay) and the JSON shapes of `/__sim/config`.
//! - [`delay`]: the one-way network delay before an arrival is counted, drawn from a
//!   seeded generator.
//! - [`cpf`]: the simulator's own CPF check and made-up scores, kept apart from the
//!   proxy's validation on purpose.
//! - [`record`]: the rate rule's judge and the record of every arrival.
//! - [`routes`]: the HTTP surface, the score endpoint and the control endpoints.
//! - [`cli`]: the arguments of the `score-sim` binary.
//!
//! The simulator logs only through `tracing` at debug level and never logs a CPF or a
//! client id: its logs end up next to the proxy's, which must not carry personal data.

mod cli;
mod config;
pub mod cpf;
mod delay;
mod record;
mod routes;

use std::fmt;
use std::future::Future;
use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::ops::Deref;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use axum::serve::ListenerExt;
use tokio::net::TcpListener;
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;

pub use cli::SimulateArgs;
pub use config::{
    ConfigUpdate, ConfigView, Fault, ParseModeError, RetryAfterMode, SimulatorConfig,
};
pub use delay::{ArrivalDelay, ParseDelayError};
pub use record::{Arrival, MAX_RECORDED_ARRIVALS, MAX_RECORDED_FIELD_LEN, SimStats};
pub use routes::SCORE_PATH;

use record::State;

/// A simulated upstream: its configuration, its rate-rule clock and its recordings.
///
/// Cloning is cheap and every clone is the same simulator, so a test keeps one while the
/// server task holds another.
#[derive(Clone)]
pub struct Simulator {
    inner: Arc<Inner>,
}

struct Inner {
    /// The origin of [`Arrival::at`].
    started: Instant,
    /// Judged and recorded together; never held across an `.await`.
    state: Mutex<State>,
    /// Mirrors the call counter so that [`Simulator::wait_for_calls`] can await it.
    calls: watch::Sender<u64>,
    /// Score requests being handled now, including hung ones.
    in_flight: watch::Sender<u64>,
    /// Set when a server of this simulator begins shutting down, so that hung and delayed
    /// answers give up instead of holding graceful shutdown open forever.
    stopping: watch::Sender<bool>,
}

/// Shows the knobs a reader debugging a test wants, but not the client-id allow-list:
/// client ids must not reach logs.
impl fmt::Debug for Simulator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let config = self.config();
        f.debug_struct("Simulator")
            .field("min_interval", &config.min_interval)
            .field("penalty", &config.penalty)
            .field("latency", &config.latency)
            .field("arrival_delay", &config.arrival_delay)
            .field("fault", &config.fault)
            .field("calls", &self.calls())
            .finish_non_exhaustive()
    }
}

impl Simulator {
    pub fn new(config: SimulatorConfig) -> Self {
        Self {
            inner: Arc::new(Inner {
                started: Instant::now(),
                state: Mutex::new(State::new(config)),
                calls: watch::Sender::new(0),
                in_flight: watch::Sender::new(0),
                stopping: watch::Sender::new(false),
            }),
        }
    }

    /// The whole app: `GET /api/score`, `GET /health` and the `/__sim/*` control endpoints.
    pub fn router(&self) -> axum::Router {
        routes::router(self.clone())
    }

    /// Starts a simulator on `127.0.0.1:0` in a tokio task; the handle tells where.
    pub async fn spawn(config: SimulatorConfig) -> io::Result<SimulatorHandle> {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await?;
        let addr = listener.local_addr()?;
        let sim = Simulator::new(config);
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let task = tokio::spawn(serve(listener, sim.clone(), async move {
            // A dropped sender means the handle was dropped: stop just the same.
            let _ = stop_rx.await;
        }));
        Ok(SimulatorHandle {
            sim,
            addr,
            stop: Some(stop_tx),
            task: Some(task),
        })
    }

    /// Everything recorded since creation or the last [`reset`](Self::reset).
    pub fn stats(&self) -> SimStats {
        self.snapshot(true)
    }

    /// Like [`stats`](Self::stats) without the arrival list, which can hold 100 000
    /// entries: for soak tests that only need the counters.
    pub fn stats_summary(&self) -> SimStats {
        self.snapshot(false)
    }

    fn snapshot(&self, with_arrivals: bool) -> SimStats {
        let in_flight = *self.inner.in_flight.borrow();
        self.lock().stats(Instant::now(), with_arrivals, in_flight)
    }

    /// Calls since creation or the last reset.
    pub fn calls(&self) -> u64 {
        self.lock().calls()
    }

    /// Score requests being handled right now (delayed, hung, or about to answer).
    pub fn in_flight(&self) -> u64 {
        *self.inner.in_flight.borrow()
    }

    /// How long the running penalty still lasts, if one is running.
    pub fn penalty_remaining(&self) -> Option<Duration> {
        self.lock().penalty_remaining(Instant::now())
    }

    /// When the latest penalty ends (or ended), on the same clock as [`Arrival::at`]; `None`
    /// if there has been none since the last reset. Unlike
    /// [`penalty_remaining`](Self::penalty_remaining) this does not depend on when it is
    /// asked, so a test can compare it exactly with an arrival's `at` plus the penalty.
    pub fn penalty_ends_at(&self) -> Option<Duration> {
        self.lock()
            .penalty_until()
            .map(|until| self.elapsed_at(until))
    }

    /// Time since the simulator was created, the clock of [`Arrival::at`].
    pub fn elapsed(&self) -> Duration {
        self.inner.started.elapsed()
    }

    /// The configuration in force.
    pub fn config(&self) -> SimulatorConfig {
        self.lock().config.clone()
    }

    /// Changes the configuration in place; the change applies from the next arrival on.
    /// A changed seed restarts the delays' sequence.
    pub fn configure(&self, change: impl FnOnce(&mut SimulatorConfig)) {
        let mut state = self.lock();
        let seed = state.config.seed;
        change(&mut state.config);
        if state.config.seed != seed {
            state.reseed();
        }
    }

    /// Applies a partial update (the body of `PUT /__sim/config`) atomically, or refuses
    /// it whole; returns the configuration now in force. A seed in the update restarts
    /// the delays' sequence even if it is the seed in force, so a script can replay it.
    pub fn update_config(&self, update: ConfigUpdate) -> Result<ConfigView, String> {
        let mut state = self.lock();
        let reseed = update.seed.is_some();
        update.apply(&mut state.config)?;
        if reseed {
            state.reseed();
        }
        Ok(ConfigView::from(&state.config))
    }

    pub fn set_arrival_delay(&self, delay: ArrivalDelay) {
        self.configure(|c| c.arrival_delay = delay);
    }

    /// Draws the next call's network delay, under the lock so that concurrent calls take
    /// the seeded sequence's numbers one each.
    fn draw_arrival_delay(&self) -> Duration {
        self.lock().draw_delay()
    }

    pub fn set_fault(&self, fault: Fault) {
        self.configure(|c| c.fault = fault);
    }

    pub fn set_latency(&self, latency: Duration) {
        self.configure(|c| c.latency = latency);
    }

    pub fn set_retry_after(&self, mode: RetryAfterMode) {
        self.configure(|c| c.retry_after = mode);
    }

    pub fn set_fail_every(&self, every: Option<u32>) {
        self.configure(|c| c.fail_every = every);
    }

    pub fn set_min_interval(&self, interval: Duration) {
        self.configure(|c| c.min_interval = interval);
    }

    pub fn set_penalty(&self, penalty: Duration) {
        self.configure(|c| c.penalty = penalty);
    }

    pub fn set_client_ids(&self, ids: Option<std::collections::HashSet<String>>) {
        self.configure(|c| c.client_ids = ids);
    }

    /// Clears the recordings and the rate rule's clock (last arrival and penalty), so a
    /// test starts from a clean upstream. The configuration stays, and sequence numbers
    /// keep counting up so that a `request_id` never repeats.
    pub fn reset(&self) {
        let mut state = self.lock();
        state.reset();
        // Under the lock, so that the watched count never goes back to a stale value.
        self.inner.calls.send_replace(0);
    }

    /// Resolves once at least `n` calls have arrived since creation or the last reset.
    /// A call counts on arrival, before it is answered.
    pub async fn wait_for_calls(&self, n: u64) {
        let mut calls = self.inner.calls.subscribe();
        // The sender lives in `self.inner`, so the channel cannot close while we wait.
        let _ = calls.wait_for(|&c| c >= n).await;
    }

    /// Resolves once at least `n` score requests are being handled: with a network delay,
    /// a call reaches this count when it reaches the handler, before it is counted as an
    /// arrival, so a test can change the delay for the calls after it.
    pub async fn wait_for_in_flight(&self, n: u64) {
        let mut in_flight = self.inner.in_flight.subscribe();
        let _ = in_flight.wait_for(|&c| c >= n).await;
    }

    /// Resolves once no score request is being handled: every answer was sent, or its
    /// client went away and the pending answer was dropped.
    pub async fn wait_until_idle(&self) {
        let mut in_flight = self.inner.in_flight.subscribe();
        let _ = in_flight.wait_for(|&n| n == 0).await;
    }

    /// The state lock. A panic while it was held cannot leave the bookkeeping half
    /// updated in a way that matters to a test, so poisoning is ignored.
    fn lock(&self) -> MutexGuard<'_, State> {
        self.inner
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn elapsed_at(&self, at: Instant) -> Duration {
        at.saturating_duration_since(self.inner.started)
    }

    /// Runs `fut` unless a server of this simulator starts shutting down first.
    async fn unless_stopping<F: Future>(&self, fut: F) -> Option<F::Output> {
        let mut stopping = self.inner.stopping.subscribe();
        tokio::select! {
            out = fut => Some(out),
            _ = stopping.wait_for(|&s| s) => None,
        }
    }

    /// Counts a score request as in flight until the guard is dropped, which also happens
    /// when hyper drops the handler because the client disconnected.
    fn in_flight_guard(&self) -> InFlight {
        self.inner.in_flight.send_modify(|n| *n += 1);
        InFlight { sim: self.clone() }
    }
}

struct InFlight {
    sim: Simulator,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.sim
            .inner
            .in_flight
            .send_modify(|n| *n = n.saturating_sub(1));
    }
}

/// Serves `sim` on `listener` until `shutdown` resolves, then shuts down gracefully:
/// in-flight answers are cut short (hung and delayed ones included, their connections
/// closed without an answer) so that shutdown cannot wait forever.
///
/// Serving one simulator on two listeners at once works, but shutting one down cuts the
/// hung answers of both.
pub async fn serve(
    listener: TcpListener,
    sim: Simulator,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> io::Result<()> {
    sim.inner.stopping.send_replace(false);
    let stopper = sim.clone();
    let signal = async move {
        shutdown.await;
        tracing::debug!("upstream simulator shutting down");
        stopper.inner.stopping.send_replace(true);
    };
    // Small answers on loopback must not wait for Nagle's algorithm: latency is a knob
    // here, and it must be the only source of delay.
    let listener = listener.tap_io(|tcp| {
        if let Err(err) = tcp.set_nodelay(true) {
            tracing::debug!(%err, "could not set TCP_NODELAY");
        }
    });
    axum::serve(listener, sim.router())
        .with_graceful_shutdown(signal)
        .await
}

/// A simulator served in a background task. Dropping the handle stops serving (in the
/// background); [`shutdown`](Self::shutdown) stops and waits until it has.
pub struct SimulatorHandle {
    sim: Simulator,
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<io::Result<()>>>,
}

impl fmt::Debug for SimulatorHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SimulatorHandle")
            .field("addr", &self.addr)
            .field("sim", &self.sim)
            .finish_non_exhaustive()
    }
}

impl SimulatorHandle {
    pub fn sim(&self) -> &Simulator {
        &self.sim
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The score endpoint, what a proxy is configured with: `http://127.0.0.1:PORT/api/score`.
    pub fn url(&self) -> String {
        format!("{}{SCORE_PATH}", self.base_url())
    }

    /// The server root, for the control endpoints: `http://127.0.0.1:PORT`.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Stops serving and waits for the server task to finish.
    pub async fn shutdown(mut self) -> io::Result<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        match self.task.take() {
            Some(task) => task.await.map_err(io::Error::other)?,
            None => Ok(()),
        }
    }
}

impl Deref for SimulatorHandle {
    type Target = Simulator;

    fn deref(&self) -> &Simulator {
        &self.sim
    }
}

impl Drop for SimulatorHandle {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// Resolves on Ctrl-C or SIGTERM (the simulator's binary stops gracefully on either).
pub async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {},
        Some(()) = async { term.as_mut()?.recv().await } => {},
    }
}
