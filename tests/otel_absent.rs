//! With no OTLP endpoint there is no exporter and no error noise, and responses still carry
//! a trace id (its own binary: the tracing subscriber is global).

mod common;

use std::sync::{Arc, Mutex};

use common::{Setup, cpf, spawn};
use score_proxy::telemetry::{self, LogFormat, OtelSettings};

#[tokio::test]
async fn no_endpoint_means_no_exporter_and_no_noise() {
    let settings = OtelSettings::from_env(|_| None).unwrap();
    assert_eq!(settings.traces_endpoint, None);
    let logs = Arc::new(Mutex::new(Vec::<u8>::new()));
    let sink = logs.clone();
    let guard = std::thread::spawn(move || {
        telemetry::init_with(LogFormat::Json, &settings, Some("debug"), move || {
            Capture(sink.clone())
        })
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
    let text = String::from_utf8(logs.lock().unwrap().clone()).unwrap();
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

#[derive(Clone)]
struct Capture(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
