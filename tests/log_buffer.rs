//! A log output that cannot keep up: the access log's buffer fills, lines are dropped and
//! counted, and no request waits for the log (its own binary: the tracing subscriber, and
//! the log buffer with it, are global).

mod common;

use std::io::{self, Write};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use common::{Setup, cpf, spawn};
use score_proxy::telemetry::{self, LogFormat, LogSettings, OtelSettings};
use score_test_support::logs::LogCapture;

/// An output stuck until the test opens it (a full pipe, a stalled disk).
#[derive(Clone)]
struct Stuck {
    out: LogCapture,
    open: Arc<(Mutex<bool>, Condvar)>,
}

impl Write for Stuck {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let (open, cv) = &*self.open;
        drop(cv.wait_while(open.lock().unwrap(), |open| !*open).unwrap());
        self.out.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn a_full_log_buffer_drops_and_counts_lines_and_never_holds_a_request() {
    const BUFFER: usize = 4;
    const REQUESTS: usize = 40;
    let logs = LogCapture::new();
    let stuck = Stuck {
        out: logs.clone(),
        open: Arc::new((Mutex::new(false), Condvar::new())),
    };
    let open = stuck.open.clone();
    let guard = std::thread::spawn(move || {
        telemetry::init_with(
            &LogSettings {
                format: LogFormat::Text,
                buffer_lines: BUFFER,
            },
            &OtelSettings::default(),
            Some("score_proxy::access=info"),
            move || stuck.clone(),
        )
        .unwrap()
    })
    .join()
    .unwrap();

    let t = spawn(Setup::default()).await;
    let lookup_cpf = cpf(9100);
    // Every lookup is answered while the output is stuck.
    tokio::time::timeout(Duration::from_secs(60), async {
        for _ in 0..REQUESTS {
            assert_eq!(t.lookup(&lookup_cpf, "000").await.status, 200);
        }
    })
    .await
    .expect("no request waits for the log");

    // At most a buffer's worth is held, plus one batch taken by the stuck writer.
    let dropped = t.metric("score_proxy_log_lines_dropped_total").await;
    assert!(
        dropped >= (REQUESTS - 2 * BUFFER) as f64 && dropped < REQUESTS as f64,
        "{dropped} lines dropped"
    );
    assert_eq!(dropped, telemetry::lines_dropped() as f64);

    // Once the output moves again, shutting down writes out everything held.
    {
        let (lock, cv) = &*open;
        *lock.lock().unwrap() = true;
        cv.notify_all();
    }
    tokio::task::spawn_blocking(move || drop(guard))
        .await
        .unwrap();
    let text = logs.text();
    let written = text
        .lines()
        .filter(|l| l.contains("score_proxy::access"))
        .count();
    assert_eq!(
        written as f64 + dropped,
        REQUESTS as f64,
        "every line was written or counted as dropped:\n{text}"
    );
}
