//! The load generator against the real proxy and simulator, in-process: `once` must provoke
//! every outcome, and a short `continuous` run must send a mix of them; with several
//! targets, requests are spread over all of them, and `once` provokes every outcome from a
//! fleet of replicas sharing one budget through a real `redis-server` (Debian's, started on a
//! loopback port, as `tests/replicas.rs` does).

use std::process::Stdio;
use std::time::Duration;

use clap::Parser;
use score_loadgen::{self as loadgen, LoadgenArgs, LoadgenMode};
use score_proxy::config::Cli;
use score_proxy::http::server::Server;
use score_sim::{Simulator, SimulatorConfig};
use score_test_support::redis::Redis;

/// Just the generator's flags, parsed as the binary would.
#[derive(Parser)]
struct Args {
    #[command(flatten)]
    loadgen: LoadgenArgs,
}

struct Stack {
    proxy: String,
    sim: String,
    _sim: score_sim::SimulatorHandle,
    _stop: tokio::sync::oneshot::Sender<()>,
}

/// The fast simulator every stack uses: one call per 200 ms, a 400 ms penalty.
async fn simulator() -> score_sim::SimulatorHandle {
    Simulator::spawn(SimulatorConfig {
        min_interval: Duration::from_millis(200),
        penalty: Duration::from_millis(400),
        client_ids: Some(["000", "001", "002", "003"].map(String::from).into()),
        ..SimulatorConfig::default()
    })
    .await
    .expect("simulator starts")
}

/// The simulator's base URL (its control endpoint is under it).
fn sim_base(sim: &score_sim::SimulatorHandle) -> String {
    let url = sim.url();
    url.strip_suffix(score_sim::SCORE_PATH)
        .unwrap_or(&url)
        .to_owned()
}

/// A fast proxy in front of `upstream`: it starts one call per 220 ms, and its queue (8
/// places, 3 s) fills and times out within seconds. Returns its base URL and the sender that
/// stops it when dropped.
async fn proxy(upstream: &str, extra: &[&str]) -> (String, tokio::sync::oneshot::Sender<()>) {
    let mut argv = vec![
        "score-proxy",
        "--listen",
        "127.0.0.1:0",
        "--upstream-url",
        upstream,
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
    ];
    argv.extend_from_slice(extra);
    let cli = Cli::try_parse_from(argv).expect("flags parse");
    let config = cli.serve.validate(|_| None).expect("valid config");
    let server = Server::bind(config).await.expect("proxy binds");
    let url = format!("http://{}", server.local_addr());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(server.run(async {
        let _ = stopped.await;
    }));
    (url, stop)
}

/// A fast stack: one proxy in front of its own simulator.
async fn stack() -> Stack {
    let sim = simulator().await;
    let (proxy, stop) = proxy(&sim.url(), &[]).await;
    Stack {
        proxy,
        sim: sim_base(&sim),
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

#[test]
fn targets_are_a_comma_separated_list() {
    let one = Args::try_parse_from(["loadgen"]).unwrap().loadgen;
    assert_eq!(
        one.target.iter().map(|u| u.as_str()).collect::<Vec<_>>(),
        ["http://127.0.0.1:8000/"]
    );
    let three = Args::try_parse_from([
        "loadgen",
        "--target",
        "http://proxy-1:8000,http://proxy-2:8000,http://proxy-3:8000",
    ])
    .unwrap()
    .loadgen;
    assert_eq!(
        three.target.iter().map(|u| u.as_str()).collect::<Vec<_>>(),
        [
            "http://proxy-1:8000/",
            "http://proxy-2:8000/",
            "http://proxy-3:8000/"
        ]
    );
    assert!(
        Args::try_parse_from(["loadgen", "--target", "http://a:1,,http://b:2"]).is_err(),
        "an empty entry is a mistake, not a target"
    );
}

/// Two proxies, each with its own upstream: the mix is spread evenly over both, and each
/// still sees bursts larger than its queue.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn continuous_spreads_requests_over_every_target() {
    let (a, b) = (stack().await, stack().await);
    let targets = format!("{},{}", a.proxy, b.proxy);
    let args = Args::try_parse_from([
        "loadgen",
        "--target",
        &targets,
        "--duration",
        "3s",
        "--rate",
        "20",
        "--burst-every",
        "1s",
    ])
    .expect("flags parse")
    .loadgen;
    let report = loadgen::run(args).await.expect("runs");
    assert_eq!(report.by_target.len(), 2, "{report}");
    for (target, n) in &report.by_target {
        assert!(
            *n * 10 >= report.requests * 4,
            "{target} got {n} of {} requests: {report}",
            report.requests
        );
    }
    for outcome in ["hit", "miss", "invalid_request", "queue_full"] {
        assert!(
            report.by_outcome.contains_key(outcome),
            "{outcome} missing: {report}"
        );
    }
}

/// Three replicas sharing one budget through Redis, driven by the real binary with its
/// targets in `LOADGEN_TARGET`: every outcome appears, and every replica gets traffic.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn once_provokes_every_outcome_from_a_fleet() {
    let redis = Redis::start();
    let redis_url = redis.url();
    let sim = simulator().await;
    let shared = [
        "--redis-url",
        redis_url.as_str(),
        "--redaction-key",
        "loadgen-smoke-secret",
        "--expected-replicas",
        "3",
        // Above a loopback round trip to Redis by far, as shared mode needs.
        "--rate-guard",
        "25ms",
    ];
    let mut replicas = Vec::new();
    for _ in 0..3 {
        replicas.push(proxy(&sim.url(), &shared).await);
    }
    let targets: Vec<&str> = replicas.iter().map(|(url, _)| url.as_str()).collect();
    let run = tokio::process::Command::new(env!("CARGO_BIN_EXE_score-loadgen"))
        .args(["--mode", "once", "--step-timeout", "10s"])
        .env("LOADGEN_TARGET", targets.join(","))
        .env("LOADGEN_SIM_URL", sim_base(&sim))
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(240), run)
        .await
        .expect("loadgen finishes")
        .expect("loadgen runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let report: serde_json::Value = serde_json::from_str(&stdout).unwrap_or_else(|_| {
        panic!(
            "no JSON report: {stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    let missing = report["missing"].as_array().expect("missing");
    assert!(missing.is_empty(), "{report}");
    assert!(out.status.success(), "{report}");
    assert_eq!(report["skipped"], serde_json::json!([]), "{report}");
    let by_target = report["by_target"].as_object().expect("by_target");
    for target in &targets {
        let n = by_target
            .get(&format!("{target}/"))
            .and_then(|n| n.as_u64())
            .unwrap_or(0);
        assert!(n >= 10, "{target} got {n} requests: {report}");
    }
    drop(replicas);
}
