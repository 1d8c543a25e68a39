//! With no OTLP endpoint there is no exporter and no error noise, and responses still carry
//! a trace id (its own binary: the tracing subscriber is global).

mod common;

use common::{Setup, cpf, spawn};
use score_proxy::telemetry::{self, LogFormat, LogSettings, OtelSettings};
use score_test_support::logs::LogCapture;

#[tokio::test]
async fn no_endpoint_means_no_exporter_and_no_noise() {
    let settings = OtelSettings::from_env(|_| None).unwrap();
    assert_eq!(settings.traces_endpoint, None);
    let logs = LogCapture::new();
    let writer = logs.make_writer();
    let guard = std::thread::spawn(move || {
        telemetry::init_with(
            &LogSettings::new(LogFormat::Json),
            &settings,
            Some("debug"),
            writer,
        )
        .unwrap()
    })
    .join()
    .unwrap();

    let t = spawn(Setup::default()).await;
    for _ in 0..3 {
        let r = t.lookup(&cpf(1), "000").await;
        assert_eq!(r.status, 200);
        assert_eq!(r.header("x-trace-id").unwrap().len(), 32);
    }
    tokio::task::spawn_blocking(move || drop(guard))
        .await
        .unwrap();
    let text = logs.text();
    let noisy: Vec<&str> = text
        .lines()
        .filter(|l| {
            (l.contains("\"level\":\"WARN\"") || l.contains("\"level\":\"ERROR\""))
                && (l.contains("opentelemetry") || l.contains("otel") || l.contains("export"))
        })
        .collect();
    assert!(noisy.is_empty(), "{noisy:#?}");
    assert!(text.contains("score_proxy::access"), "logging works");
}
