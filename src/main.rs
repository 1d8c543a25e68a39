//! The `score-proxy` binary: parse the command line, set up telemetry, run.
#![forbid(unsafe_code)]

use std::process::ExitCode;

use clap::Parser;
#[cfg(feature = "demo")]
use score_proxy::config::DemoArgs;
use score_proxy::config::{Cli, Command, Config, HealthcheckArgs, ServeArgs};
use score_proxy::http::server::{Server, raise_fd_limit};
use score_proxy::shutdown::shutdown_signal;
use score_proxy::telemetry;

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
        Command::Demo(args) => serve(&args.serve, Some(&args)),
        Command::Healthcheck(args) => healthcheck(args),
    }
}

/// Without the `demo` feature there is no demo; the type keeps `serve`'s signature one.
#[cfg(not(feature = "demo"))]
enum DemoArgs {}

/// `serve` and `demo` alike: validate everything, set up telemetry, bind, run until a
/// signal. The demo only starts the simulator first and points the proxy at it.
fn serve(args: &ServeArgs, demo: Option<&DemoArgs>) -> ExitCode {
    let config = match validated(args) {
        Ok(c) => c,
        Err(code) => return code,
    };
    // Telemetry is set up outside the runtime: the OTLP exporter's blocking HTTP client
    // must not be created or dropped inside it.
    let _telemetry = match telemetry::init(config.log_format, &config.otel) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("score-proxy: cannot set up telemetry: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    raise_fd_limit();
    let result = runtime().block_on(async {
        #[cfg(feature = "demo")]
        let (config, sim) = match demo {
            Some(demo) => {
                let sim = score_sim::Simulator::spawn(score_sim::SimulatorConfig {
                    latency: demo.upstream_latency,
                    ..Default::default()
                })
                .await?;
                let mut config = config;
                config.upstream_url = sim.url().parse()?;
                (config, Some(sim))
            }
            None => (config, None),
        };
        #[cfg(not(feature = "demo"))]
        let _ = demo;
        let server = Server::bind(config).await?;
        tracing::info!(address = %server.local_addr(), admin = ?server.admin_addr(), "listening");
        #[cfg(feature = "demo")]
        if let (Some(demo), Some(sim)) = (demo, &sim) {
            print_demo_banner(&server, sim, demo);
        }
        server.run(shutdown_signal()).await
    });
    exit_code(result)
}

#[cfg(feature = "demo")]
fn print_demo_banner(server: &Server, sim: &score_sim::SimulatorHandle, demo: &DemoArgs) {
    let port = server.local_addr().port();
    println!(
        "score-proxy demo: proxy on {} against a simulated upstream at {} \
         (1 call/s, 2 s penalty, {} latency).\n\
         Try:\n  curl -i 'http://127.0.0.1:{port}/proxy/score?cpf=89336333089&client_id=000'\n  \
         curl -s http://127.0.0.1:{port}/status\n  \
         curl -s -H 'Accept: text/plain' http://127.0.0.1:{port}/metrics\n\
         Ctrl-C stops it.",
        server.local_addr(),
        sim.url(),
        humantime::format_duration(demo.upstream_latency),
    );
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
