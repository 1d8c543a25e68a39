//! An unreachable trace collector never slows or fails a lookup (its own binary: the tracing
//! subscriber is global).

mod common;

use std::time::{Duration, Instant};

use common::{Setup, cpf, spawn};
use score_proxy::telemetry::{self, LogFormat, LogSettings, OtelSettings, OtlpProtocol};
use score_test_support::logs::LogCapture;

#[tokio::test]
async fn an_unreachable_collector_costs_lookups_nothing() {
    // A port nobody listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    // The log output is kept off the terminal, not read.
    let writer = LogCapture::new().make_writer();
    let guard = std::thread::spawn(move || {
        telemetry::init_with(
            &LogSettings::new(LogFormat::Json),
            &OtelSettings {
                traces_endpoint: Some(format!("http://127.0.0.1:{port}/v1/traces")),
                protocol: OtlpProtocol::HttpProtobuf,
                service_name: "score-proxy".into(),
                ..OtelSettings::default()
            },
            Some("info"),
            writer,
        )
        .unwrap()
    })
    .join()
    .unwrap();

    let t = spawn(Setup::default()).await;
    assert_eq!(t.lookup(&cpf(1), "000").await.status, 200);
    for _ in 0..200 {
        let started = Instant::now();
        let r = t.lookup(&cpf(1), "000").await;
        assert_eq!(r.status, 200);
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "{:?}",
            started.elapsed()
        );
    }
    // Exporting fails in the background; flushing reports it there, not to clients.
    tokio::task::spawn_blocking(move || {
        guard.flush();
        drop(guard);
    })
    .await
    .unwrap();
    assert_eq!(t.lookup(&cpf(1), "000").await.status, 200);
}
