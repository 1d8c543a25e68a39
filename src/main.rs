//! The `score-proxy` binary: parse the command line, set up telemetry, run.
#![forbid(unsafe_code)]

use std::process::ExitCode;

use clap::Parser;
use score_proxy::config::{Cli, Command, Config, DemoArgs, HealthcheckArgs, ServeArgs};
use score_proxy::server::{Server, shutdown_signal};
use score_proxy::simulator::{self, SimulateArgs, Simulator};
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
        Command::Serve(args) => serve(args),
        Command::SimulateUpstream(args) => simulate(args),
        Command::Demo(args) => demo(args),
        Command::Healthcheck(args) => healthcheck(args),
        Command::Loadgen(args) => loadgen(args),
    }
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

fn serve(args: ServeArgs) -> ExitCode {
    let config = match validated(&args) {
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
    score_proxy::server::raise_fd_limit();
    let result = runtime().block_on(async {
        let server = Server::bind(config).await?;
        tracing::info!(address = %server.local_addr(), admin = ?server.admin_addr(), "listening");
        server.run(shutdown_signal()).await
    });
    exit_code(result)
}

fn simulate(args: SimulateArgs) -> ExitCode {
    let _telemetry = telemetry::init(telemetry::LogFormat::Text, &Default::default());
    let listen = args.listen;
    let sim = Simulator::new(args.into_config());
    let result = runtime().block_on(async {
        let listener = tokio::net::TcpListener::bind(listen).await?;
        tracing::info!(address = %listener.local_addr()?, "upstream simulator listening");
        simulator::serve(listener, sim, shutdown_signal()).await?;
        Ok(())
    });
    exit_code(result)
}

fn demo(args: DemoArgs) -> ExitCode {
    let latency = match humantime::parse_duration(&args.upstream_latency) {
        Ok(d) => d,
        Err(_) => {
            eprintln!(
                "score-proxy: --upstream-latency: '{}' is not a duration",
                args.upstream_latency
            );
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let mut config = match validated(&args.serve) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let _telemetry = match telemetry::init(config.log_format, &config.otel) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("score-proxy: cannot set up telemetry: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    score_proxy::server::raise_fd_limit();
    let result = runtime().block_on(async {
        let sim = Simulator::spawn(simulator::SimulatorConfig {
            latency,
            ..Default::default()
        })
        .await?;
        config.upstream_url = sim.url().parse()?;
        let server = Server::bind(config).await?;
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
            humantime::format_duration(latency),
        );
        server.run(shutdown_signal()).await
    });
    exit_code(result)
}

fn loadgen(args: score_proxy::loadgen::LoadgenArgs) -> ExitCode {
    let _telemetry = telemetry::init(telemetry::LogFormat::Text, &Default::default());
    let result = runtime().block_on(async {
        let report = score_proxy::loadgen::run(args).await?;
        println!("{}", serde_json::to_string_pretty(&report)?);
        anyhow::ensure!(
            report.is_complete(),
            "could not provoke: {}",
            report.missing.join(", ")
        );
        Ok(())
    });
    exit_code(result)
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
