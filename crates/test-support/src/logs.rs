//! Log output captured in memory, for the tests that read what the proxy logged (the
//! tracing subscriber is process-wide, so each of those tests is a binary of its own).
//!
//! [`LogCapture::make_writer`] is what `score_proxy::telemetry::init_with` takes as its
//! writer: `tracing_subscriber` makes any `Fn() -> impl io::Write` a `MakeWriter`, so the
//! capture itself needs no tracing dependency, and the fuzz target, which depends on this
//! crate too, stays light. `init_test_log` (feature `logs`, on by default, which brings
//! `tracing-subscriber`) is the "quiet unless `TEST_LOG=1`" subscriber of the other tests.

use std::io;
use std::sync::{Arc, Mutex};

/// Everything written to it, shared by its clones.
#[derive(Clone, Debug, Default)]
pub struct LogCapture(Arc<Mutex<Vec<u8>>>);

impl LogCapture {
    pub fn new() -> LogCapture {
        LogCapture::default()
    }

    /// A writer factory for a subscriber: every writer it makes appends to this capture.
    pub fn make_writer(&self) -> impl Fn() -> LogCapture + Send + Sync + 'static {
        let capture = self.clone();
        move || capture.clone()
    }

    /// What was written so far, as text (log lines are UTF-8).
    pub fn text(&self) -> String {
        let bytes = self.0.lock().unwrap_or_else(|e| e.into_inner()).clone();
        String::from_utf8(bytes).expect("log output is UTF-8")
    }
}

impl io::Write for LogCapture {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Installs a log subscriber writing through the test harness's capture when `TEST_LOG` is
/// set (tests are quiet by default), with `directives` as its filter. Does nothing if a
/// subscriber is already installed.
#[cfg(feature = "logs")]
pub fn init_test_log(directives: &str) {
    if std::env::var_os("TEST_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(directives)
            .with_test_writer()
            .try_init();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn clones_share_one_buffer() {
        let capture = LogCapture::new();
        let make = capture.make_writer();
        make().write_all(b"one\n").unwrap();
        make().write_all(b"two\n").unwrap();
        assert_eq!(capture.text(), "one\ntwo\n");
    }
}
