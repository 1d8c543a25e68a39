//! `score-loadgen`: a realistic mix of lookups over one or several proxies (the compose
//! stack's load and the stack checks' driver). Prints its report as JSON; exits non-zero
//! when a `once` run could not provoke every outcome.
#![forbid(unsafe_code)]

use std::process::ExitCode;

use clap::Parser;
use score_loadgen::LoadgenArgs;

#[derive(Parser, Debug)]
#[command(
    name = "score-loadgen",
    version,
    about = "Send a realistic mix of lookups to one or several score-proxy replicas"
)]
struct Cli {
    #[command(flatten)]
    args: LoadgenArgs,
}

fn main() -> ExitCode {
    let args = Cli::parse().args;
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let result = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("the tokio runtime starts")
        .block_on(async {
            let report = score_loadgen::run(args).await?;
            println!("{}", serde_json::to_string_pretty(&report)?);
            anyhow::ensure!(
                report.is_complete(),
                "could not provoke: {}",
                report.missing.join(", ")
            );
            Ok(())
        });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("score-loadgen: {e:#}");
            ExitCode::FAILURE
        }
    }
}
