//! Log lines off the request path: a bounded buffer in memory, written out by a thread of its
//! own.
//!
//! Writing each access-log line to stdout as it is made costs the request a system call (and
//! waits on whatever is behind stdout: a full pipe, a slow disk). Here a line is copied into a
//! buffer under a short lock and the request goes on; a writer thread takes the whole buffer
//! at once and writes it with one call, like nginx's `access_log ... buffer= flush=`:
//! - access lines (and anything below `info`) wait at most [`FLUSH_INTERVAL`], or until the
//!   buffer is half full; every other line (start-up, warnings, errors) wakes the writer at
//!   once, so an operator or an orchestrator reading the log sees them without delay;
//! - the buffer holds at most `capacity` lines (`SCORE_PROXY_LOG_BUFFER_LINES`); when it is
//!   full, a line is dropped and counted ([`lines_dropped`], exported as
//!   `score_proxy_log_lines_dropped_total`), never waited for;
//! - the request path makes no system call in the common case: it wakes the writer only for
//!   the first line after a flush, an urgent line, or a half-full buffer;
//! - [`LogWriterGuard`] flushes everything buffered when dropped (the end of `main`, after
//!   the drain), and lines written after that go straight through.

use std::io::{self, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tracing::{Level, Metadata};
use tracing_subscriber::fmt::MakeWriter;

/// How long an access line may wait in the buffer before it is written.
pub(crate) const FLUSH_INTERVAL: Duration = Duration::from_millis(100);

/// Lines held at most when `SCORE_PROXY_LOG_BUFFER_LINES` is not set: a few hundred
/// milliseconds of lines at full speed, about 4 MiB at most.
pub const DEFAULT_BUFFER_LINES: usize = 16 * 1024;

/// The target of the access-log lines, which are the ones that may wait.
pub(crate) const ACCESS_TARGET: &str = "score_proxy::access";

/// Lines dropped because the buffer was full, since the process started (the buffer is
/// process-wide, like the subscriber it serves).
static DROPPED: AtomicU64 = AtomicU64::new(0);

/// Lines dropped so far because the log buffer was full.
pub fn lines_dropped() -> u64 {
    DROPPED.load(Ordering::Relaxed)
}

struct State {
    bytes: Vec<u8>,
    lines: usize,
    /// The writer should take the buffer now, not at the end of the interval.
    urgent: bool,
    /// The guard is gone: no writer thread any more, lines go straight through.
    closed: bool,
    /// Lines appended, and lines handed to the output, since the start (for `flush`).
    appended: u64,
    written: u64,
}

struct Shared<W> {
    state: Mutex<State>,
    /// Wakes the writer thread.
    wake: Condvar,
    /// Tells `flush` callers that a batch was written.
    written: Condvar,
    capacity: usize,
    output: W,
}

impl<W> Shared<W> {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The [`MakeWriter`] the log layer writes through.
pub(crate) struct BufferedLog<W> {
    shared: Arc<Shared<W>>,
}

/// Flushes and stops the writer thread when dropped.
pub(crate) struct LogWriterGuard {
    stop: Option<Box<dyn FnOnce() + Send + Sync>>,
    flush: Box<dyn Fn() + Send + Sync>,
}

impl LogWriterGuard {
    /// Writes out every line buffered so far, and returns once they are written.
    pub(crate) fn flush(&self) {
        (self.flush)();
    }
}

impl Drop for LogWriterGuard {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            stop();
        }
    }
}

/// Starts the writer thread for `output`, with room for `capacity` lines.
pub(crate) fn spawn<W>(output: W, capacity: usize) -> io::Result<(BufferedLog<W>, LogWriterGuard)>
where
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    let shared = Arc::new(Shared {
        state: Mutex::new(State {
            bytes: Vec::new(),
            lines: 0,
            urgent: false,
            closed: false,
            appended: 0,
            written: 0,
        }),
        wake: Condvar::new(),
        written: Condvar::new(),
        capacity: capacity.max(1),
        output,
    });
    let thread: JoinHandle<()> = {
        let shared = shared.clone();
        std::thread::Builder::new()
            .name("score-proxy-log".into())
            .spawn(move || write_out(&shared))?
    };
    let stop = {
        let shared = shared.clone();
        move || {
            shared.lock().closed = true;
            shared.wake.notify_one();
            let _ = thread.join();
        }
    };
    let flush = {
        let shared = shared.clone();
        move || flush(&shared)
    };
    Ok((
        BufferedLog { shared },
        LogWriterGuard {
            stop: Some(Box::new(stop)),
            flush: Box::new(flush),
        },
    ))
}

fn flush<W>(shared: &Shared<W>) {
    let mut state = shared.lock();
    let target = state.appended;
    if state.written >= target || state.closed {
        return;
    }
    state.urgent = true;
    shared.wake.notify_one();
    while state.written < target && !state.closed {
        state = shared
            .written
            .wait(state)
            .unwrap_or_else(|e| e.into_inner());
    }
}

/// The writer thread: waits for a first line, gives the others [`FLUSH_INTERVAL`] to join
/// it (unless one is urgent), then writes them all at once; after the guard is dropped,
/// writes what is left and stops.
fn write_out<W>(shared: &Shared<W>)
where
    W: for<'w> MakeWriter<'w>,
{
    let mut spare = Vec::new();
    loop {
        let mut state = shared.lock();
        while state.bytes.is_empty() && !state.closed {
            state = shared.wake.wait(state).unwrap_or_else(|e| e.into_inner());
        }
        let deadline = Instant::now() + FLUSH_INTERVAL;
        while !state.urgent && !state.closed {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            state = shared
                .wake
                .wait_timeout(state, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        let mut batch = std::mem::replace(&mut state.bytes, std::mem::take(&mut spare));
        let taken = state.appended;
        let closed = state.closed;
        state.lines = 0;
        state.urgent = false;
        drop(state);

        if !batch.is_empty() {
            let mut out = shared.output.make_writer();
            let _ = out.write_all(&batch);
            let _ = out.flush();
        }
        batch.clear();
        spare = batch;
        let mut state = shared.lock();
        state.written = taken;
        shared.written.notify_all();
        if closed && state.bytes.is_empty() {
            return;
        }
    }
}

impl<'a, W> MakeWriter<'a> for BufferedLog<W>
where
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    type Writer = LineWriter<'a, W>;

    fn make_writer(&'a self) -> Self::Writer {
        LineWriter {
            shared: &self.shared,
            urgent: true,
        }
    }

    fn make_writer_for(&'a self, meta: &Metadata<'_>) -> Self::Writer {
        LineWriter {
            shared: &self.shared,
            urgent: meta.target() != ACCESS_TARGET && *meta.level() <= Level::INFO,
        }
    }
}

/// One line's writer: the log layer formats a whole line, then writes it with one call.
pub(crate) struct LineWriter<'a, W> {
    shared: &'a Arc<Shared<W>>,
    urgent: bool,
}

impl<W> Write for LineWriter<'_, W>
where
    W: for<'w> MakeWriter<'w>,
{
    fn write(&mut self, line: &[u8]) -> io::Result<usize> {
        let shared = &**self.shared;
        let mut state = shared.lock();
        if state.closed {
            drop(state);
            shared.output.make_writer().write_all(line)?;
            return Ok(line.len());
        }
        if state.lines >= shared.capacity {
            drop(state);
            DROPPED.fetch_add(1, Ordering::Relaxed);
            return Ok(line.len());
        }
        let first = state.bytes.is_empty();
        state.bytes.extend_from_slice(line);
        state.lines += 1;
        state.appended += 1;
        let hurry = !state.urgent && (self.urgent || state.lines * 2 >= shared.capacity);
        if hurry {
            state.urgent = true;
        }
        drop(state);
        // A system call only for the first line after a flush (the writer is asleep) or
        // to hurry it: not for every line.
        if first || hurry {
            shared.wake.notify_one();
        }
        Ok(line.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex as StdMutex;

    #[derive(Clone, Default)]
    struct Sink(Arc<StdMutex<Vec<u8>>>);

    impl Write for Sink {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn text(sink: &Sink) -> String {
        String::from_utf8(sink.0.lock().unwrap().clone()).unwrap()
    }

    #[test]
    fn lines_arrive_in_order_and_flush_waits_for_them() {
        let sink = Sink::default();
        let out = sink.clone();
        let (log, guard) = spawn(move || out.clone(), 64).unwrap();
        for i in 0..10 {
            log.make_writer()
                .write_all(format!("{i}\n").as_bytes())
                .unwrap();
        }
        guard.flush();
        assert_eq!(text(&sink), "0\n1\n2\n3\n4\n5\n6\n7\n8\n9\n");
        drop(guard);
        log.make_writer().write_all(b"after\n").unwrap();
        assert!(text(&sink).ends_with("9\nafter\n"));
    }

    /// An output that announces each write, then blocks until the test opens it.
    struct Blocking {
        sink: Sink,
        entered: std::sync::mpsc::Sender<()>,
        open: Arc<(StdMutex<bool>, Condvar)>,
    }

    impl Write for Blocking {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            let _ = self.entered.send(());
            let (open, cv) = &*self.open;
            drop(cv.wait_while(open.lock().unwrap(), |open| !*open).unwrap());
            self.sink.write(buf)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_full_buffer_drops_and_counts_and_the_guard_flushes_the_rest() {
        let sink = Sink::default();
        let open = Arc::new((StdMutex::new(false), Condvar::new()));
        let (entered_tx, entered) = std::sync::mpsc::channel();
        let output = {
            let (sink, open) = (sink.clone(), open.clone());
            let entered_tx = StdMutex::new(entered_tx);
            move || Blocking {
                sink: sink.clone(),
                entered: entered_tx.lock().unwrap().clone(),
                open: open.clone(),
            }
        };
        let (log, guard) = spawn(output, 4).unwrap();
        // An urgent line: the writer thread takes it, and is stuck writing it.
        log.make_writer().write_all(b"first\n").unwrap();
        entered.recv().unwrap();
        let before = lines_dropped();
        for i in 0..10 {
            log.make_writer()
                .write_all(format!("line {i}\n").as_bytes())
                .unwrap();
        }
        // Four fit, six were dropped (other tests in this binary drop none).
        assert_eq!(lines_dropped() - before, 6);
        *open.0.lock().unwrap() = true;
        open.1.notify_all();
        drop(guard);
        assert_eq!(
            text(&sink),
            "first\nline 0\nline 1\nline 2\nline 3\n",
            "the guard wrote what was buffered"
        );
    }
}
