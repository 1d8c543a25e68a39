//! The load generator against the real proxy and simulator, in-process: `once` must provoke
//! every outcome, and a short `continuous` run must send a mix of them.

use std::time::Duration;

use clap::Parser;
use score_proxy::config::Cli;
use score_proxy::loadgen::{self, LoadgenArgs, LoadgenMode};
use score_proxy::server::Server;
use score_proxy::simulator::{Simulator, SimulatorConfig};

/// Just the generator's flags, parsed as the binary would.
#[derive(Parser)]
struct Args {
    #[command(flatten)]
    loadgen: LoadgenArgs,
}

struct Stack {
    proxy: String,
    sim: String,
    _sim: score_proxy::simulator::SimulatorHandle,
    _stop: tokio::sync::oneshot::Sender<()>,
}

/// A fast stack: the simulator allows one call per 200 ms, the proxy starts one per 220 ms,
/// and the queue (8 places, 3 s) fills and times out within seconds.
async fn stack() -> Stack {
    let sim = Simulator::spawn(SimulatorConfig {
        min_interval: Duration::from_millis(200),
        penalty: Duration::from_millis(400),
        client_ids: Some(["000", "001", "002", "003"].map(String::from).into()),
        ..SimulatorConfig::default()
    })
    .await
    .expect("simulator starts");
    let cli = Cli::try_parse_from([
        "score-proxy",
        "--listen",
        "127.0.0.1:0",
        "--upstream-url",
        &sim.url(),
        "--rate",
        "5",
        "--rate-guard",
        "20ms",
        "--queue-capacity",
        "8",
        "--queue-timeout",
        "3s",
        "--upstream-timeout",
        "1s",
    ])
    .expect("flags parse");
    let config = cli.serve.validate(|_| None).expect("valid config");
    let server = Server::bind(config).await.expect("proxy binds");
    let proxy = format!("http://{}", server.local_addr());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(server.run(async {
        let _ = stopped.await;
    }));
    let sim_base = sim.url();
    let sim_base = sim_base
        .strip_suffix(score_proxy::simulator::SCORE_PATH)
        .unwrap_or(&sim_base)
        .to_owned();
    Stack {
        proxy,
        sim: sim_base,
        _sim: sim,
        _stop: stop,
    }
}

fn args(stack: &Stack, extra: &[&str]) -> LoadgenArgs {
    let mut argv = vec!["loadgen", "--target", &stack.proxy, "--sim-url", &stack.sim];
    argv.extend_from_slice(extra);
    Args::try_parse_from(argv).expect("flags parse").loadgen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn once_provokes_every_outcome() {
    let stack = stack().await;
    let args = args(&stack, &["--mode", "once", "--step-timeout", "20s"]);
    assert_eq!(args.mode, LoadgenMode::Once);
    let report = loadgen::run(args).await.expect("runs");
    assert!(report.is_complete(), "{report}");
    assert!(report.skipped.is_empty(), "{report}");
    for outcome in [
        "hit",
        "miss",
        "coalesced",
        "invalid_request",
        "upstream_unauthorized",
        "queue_full",
        "abandoned",
        "unused_slot",
        "upstream_error",
        "upstream_bad_body",
        "upstream_timeout",
        "penalty",
        "deadline_unreachable",
    ] {
        assert!(
            report.by_outcome.contains_key(outcome),
            "{outcome} missing: {report}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn continuous_sends_a_mix_and_stops_on_time() {
    let stack = stack().await;
    let args = args(
        &stack,
        &[
            "--duration",
            "3s",
            "--rate",
            "20",
            "--burst-every",
            "1s",
            "--chaos-every",
            "1s",
        ],
    );
    let report = loadgen::run(args).await.expect("runs");
    assert!(report.elapsed_seconds < 10.0, "{report}");
    assert!(report.requests > 30, "{report}");
    for outcome in ["hit", "miss", "invalid_request", "queue_full"] {
        assert!(
            report.by_outcome.contains_key(outcome),
            "{outcome} missing: {report}"
        );
    }
    // Chaos was on: the simulator must have been put back.
    let config: serde_json::Value = serde_json::from_str(
        &reqwest::get(format!("{}/__sim/config", stack.sim))
            .await
            .unwrap()
            .text()
            .await
            .unwrap(),
    )
    .unwrap();
    assert_eq!(config["fault"], "none", "{config}");
}
