//! The `score-proxy` binary: parse the command line, set up telemetry, run.
#![forbid(unsafe_code)]

use std::process::ExitCode;

use clap::Parser;
use futures_util::{FutureExt, future};
use score_proxy::batch::{EXIT_INTERRUPTED, Ended};
use score_proxy::config::{BatchArgs, Cli, Command, Config, HealthcheckArgs, ServeArgs};
use score_proxy::http::server::{Server, raise_fd_limit};
use score_proxy::shutdown::shutdown_signal;
use score_proxy::telemetry;

use demo::{DemoArgs, DemoUpstream};

/// mimalloc: cheaper allocations on the request path than glibc's malloc, and less overhead
/// per cache entry (no per-allocation header); measured in BENCHMARKS.md.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Exit status for a configuration that does not validate.
const EXIT_CONFIG: u8 = 2;

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command.unwrap_or(Command::Serve(cli.serve)) {
        Command::Serve(args) => serve(&args, None),
        #[cfg(feature = "demo")]
        Command::Demo(args) => serve(
            &args
                .serve
                .clone()
                .with_demo_data_dir(|name| std::env::var(name).ok()),
            Some(&args),
        ),
        Command::Healthcheck(args) => healthcheck(args),
        Command::Batch(args) => batch(&args),
    }
}

/// `score-proxy batch`: a bulk job from a file, with a progress bar.
fn batch(args: &BatchArgs) -> ExitCode {
    let result = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("the tokio runtime starts")
        .block_on(score_proxy::batch::run(args));
    match result {
        Ok(Ended::Done) => ExitCode::SUCCESS,
        Ok(Ended::Cancelled) => ExitCode::FAILURE,
        Ok(Ended::Interrupted) => ExitCode::from(EXIT_INTERRUPTED),
        Err(e) => {
            eprintln!("score-proxy batch: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// `serve` and `demo` alike: validate everything, set up telemetry, bind, run until a
/// signal. The demo only starts the simulator first and points the proxy at it, so what
/// the demo shows is the proxy exactly as `serve` runs it.
fn serve(args: &ServeArgs, demo: Option<&DemoArgs>) -> ExitCode {
    let mut config = match validated(args) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let log = match telemetry::LogSettings::from_env(config.log_format, |name| {
        std::env::var(name).ok()
    }) {
        Ok(log) => log,
        Err(problem) => {
            eprintln!("score-proxy: invalid configuration:\n  {problem}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    // Telemetry is set up outside the runtime: the OTLP exporter's blocking HTTP client
    // must not be created or dropped inside it. The guard lives to the end of `serve`, after
    // the drain: dropping it exports the last spans, then writes out the buffered log lines.
    let _telemetry = match telemetry::init(&log, &config.otel) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("score-proxy: cannot set up telemetry: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    raise_fd_limit();
    let result = runtime().block_on(async {
        let shutdown = shutdown_signal_installed();
        // Held until the proxy stops: dropping the simulator stops it.
        let demo_upstream = match demo {
            Some(demo) => Some(DemoUpstream::start(demo).await?),
            None => None,
        };
        if let Some(upstream) = &demo_upstream {
            config.upstream_url = upstream.url()?;
        }
        let server = Server::bind(config).await?;
        tracing::info!(address = %server.local_addr(), admin = ?server.admin_addr(), "listening");
        if let Some(upstream) = &demo_upstream {
            upstream.print_banner(&server);
        }
        server.run(shutdown).await
    });
    exit_code(result)
}

/// The shutdown signal, with its handlers already in place. Tokio installs a signal's
/// handler when the future waiting for it is first polled, and until then SIGTERM's default
/// action kills the process outright (status 143, nothing drained). Polling it once here,
/// before `listening` is logged, means a SIGTERM from anyone who has seen that line (an
/// orchestrator, a test) is a clean shutdown. `MaybeDone` keeps the answer if the signal
/// has already come, so `run` sees it at once.
fn shutdown_signal_installed() -> impl Future<Output = ()> + Send + 'static {
    let mut signal = Box::pin(future::maybe_done(shutdown_signal()));
    let _ = signal.as_mut().now_or_never();
    signal
}

fn validated(args: &ServeArgs) -> Result<Config, ExitCode> {
    args.validate(|name| std::env::var(name).ok())
        .map_err(|problems| {
            eprintln!("score-proxy: invalid configuration:");
            for p in problems {
                eprintln!("  {p}");
            }
            ExitCode::from(EXIT_CONFIG)
        })
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("the tokio runtime starts")
}

fn healthcheck(args: HealthcheckArgs) -> ExitCode {
    let probe = async {
        let client = reqwest::Client::builder().timeout(args.timeout).build()?;
        let status = client.get(&args.url).send().await?.status();
        anyhow::ensure!(status.is_success(), "{} answered {status}", args.url);
        Ok(())
    };
    let result = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("the tokio runtime starts")
        .block_on(probe);
    exit_code(result)
}

fn exit_code(result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("score-proxy: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// `score-proxy demo`: the project's upstream simulator, in-process, as the proxy's upstream.
#[cfg(feature = "demo")]
mod demo {
    use std::time::Duration;

    pub use score_proxy::config::DemoArgs;
    use score_proxy::http::server::Server;
    use score_sim::{Simulator, SimulatorConfig, SimulatorHandle};
    use url::Url;

    pub(crate) struct DemoUpstream {
        sim: SimulatorHandle,
        latency: Duration,
    }

    impl DemoUpstream {
        /// Starts the simulator with its defaults (the original's 1 call/s and 2 s penalty)
        /// and the latency asked for.
        pub async fn start(args: &DemoArgs) -> anyhow::Result<DemoUpstream> {
            let sim = Simulator::spawn(SimulatorConfig {
                latency: args.upstream_latency,
                ..Default::default()
            })
            .await?;
            Ok(DemoUpstream {
                sim,
                latency: args.upstream_latency,
            })
        }

        pub(crate) fn url(&self) -> anyhow::Result<Url> {
            Ok(self.sim.url().parse()?)
        }

        /// What to try, on stdout: the demo is run by a person at a terminal.
        pub(crate) fn print_banner(&self, server: &Server) {
            let port = server.local_addr().port();
            println!(
                "score-proxy demo: proxy on {} against a simulated upstream at {} \
                 (1 call/s, 2 s penalty, {} latency).\n\
                 Status page (open it in a browser): http://127.0.0.1:{port}/\n\
                 Try:\n  curl -i 'http://127.0.0.1:{port}/proxy/score?cpf=89336333089&client_id=000'\n  \
                 curl -s http://127.0.0.1:{port}/status\n  \
                 curl -s -H 'Accept: text/plain' http://127.0.0.1:{port}/metrics\n\
                 Ctrl-C stops it.",
                server.local_addr(),
                self.sim.url(),
                humantime::format_duration(self.latency),
            );
        }
    }
}

/// Without the `demo` feature there is no demo: these types have no values, so `serve`
/// reads the same in both builds and its demo branches are never taken.
#[cfg(not(feature = "demo"))]
mod demo {
    use score_proxy::http::server::Server;
    use url::Url;

    pub(crate) enum DemoArgs {}

    pub(crate) enum DemoUpstream {}

    impl DemoUpstream {
        pub(crate) async fn start(args: &DemoArgs) -> anyhow::Result<DemoUpstream> {
            match *args {}
        }

        pub(crate) fn url(&self) -> anyhow::Result<Url> {
            match *self {}
        }

        pub(crate) fn print_banner(&self, _: &Server) {
            match *self {}
        }
    }
}
