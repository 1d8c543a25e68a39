//! `score-sim`: the upstream simulator on its own, so that scripts, the benchmark, the
//! compose stack and the original Python proxy can be pointed at it.
#![forbid(unsafe_code)]

use std::process::ExitCode;

use clap::Parser;
use score_sim::{SimulateArgs, Simulator};

#[derive(Parser, Debug)]
#[command(
    name = "score-sim",
    version,
    about = "The score API's contract, strict, on loopback: 1 call/s, a 2 s penalty, fault modes"
)]
struct Cli {
    #[command(flatten)]
    args: SimulateArgs,
}

fn main() -> ExitCode {
    let args = Cli::parse().args;
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stdout)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()))
        .init();
    let listen = args.listen;
    let sim = Simulator::new(args.into_config());
    let result = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("the tokio runtime starts")
        .block_on(async {
            let listener = tokio::net::TcpListener::bind(listen).await?;
            tracing::info!(address = %listener.local_addr()?, "upstream simulator listening");
            score_sim::serve(listener, sim, score_sim::shutdown_signal()).await
        });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("score-sim: {e}");
            ExitCode::FAILURE
        }
    }
}
