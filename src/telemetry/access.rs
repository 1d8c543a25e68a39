//! The access-log line, formatted by hand.
//!
//! The access line is a `tracing` event like any other (so `RUST_LOG` filters it, and any
//! subscriber sees it), but it is written on every request, and `tracing-subscriber`'s
//! general formatters spend more on it than the rest of a cache hit: a date computed from
//! scratch, every value through `Debug`. [`AccessFormat`] writes the same line, byte for
//! byte, in text or JSON, from a timestamp whose date part is cached for the second and
//! numbers written directly; every other event (and the access line on a colour terminal)
//! goes to the formatter it wraps.

use std::cell::RefCell;
use std::fmt::{self, Write as _};
use std::time::SystemTime;

use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

use super::log_writer::ACCESS_TARGET;

/// The log layer's event format: the access line by hand, the rest by `inner`.
pub(crate) struct AccessFormat<F> {
    inner: F,
    json: bool,
}

impl<F> AccessFormat<F> {
    pub(crate) fn text(inner: F) -> Self {
        AccessFormat { inner, json: false }
    }

    pub(crate) fn json(inner: F) -> Self {
        AccessFormat { inner, json: true }
    }
}

impl<S, N, F> FormatEvent<S, N> for AccessFormat<F>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
    F: FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let meta = event.metadata();
        if meta.target() != ACCESS_TARGET
            || *meta.level() != Level::INFO
            || writer.has_ansi_escapes()
        {
            return self.inner.format_event(ctx, writer, event);
        }
        LINE.with(|line| {
            let Ok(mut line) = line.try_borrow_mut() else {
                return self.inner.format_event(ctx, writer, event);
            };
            line.clear();
            format_line(&mut line, event, self.json, SystemTime::now());
            writer.write_str(&line)
        })
    }
}

thread_local! {
    /// The line being formatted (kept: no allocation per line once it has grown).
    static LINE: RefCell<String> = const { RefCell::new(String::new()) };
}

fn format_line(line: &mut String, event: &Event<'_>, json: bool, now: SystemTime) {
    if json {
        line.push_str("{\"timestamp\":\"");
        push_timestamp(line, now);
        line.push_str("\",\"level\":\"INFO\"");
        event.record(&mut Fields {
            line: &mut *line,
            json,
            first: true,
        });
        line.push_str(",\"target\":\"");
        line.push_str(ACCESS_TARGET);
        line.push_str("\"}\n");
    } else {
        push_timestamp(line, now);
        line.push_str("  INFO ");
        line.push_str(ACCESS_TARGET);
        line.push_str(": ");
        event.record(&mut Fields {
            line: &mut *line,
            json,
            first: true,
        });
        line.push('\n');
    }
}

/// Writes the event's fields as `tracing-subscriber` would: text `name=value` pairs after
/// the message (strings quoted, `%` values bare), or JSON members.
struct Fields<'a> {
    line: &'a mut String,
    json: bool,
    first: bool,
}

impl Fields<'_> {
    /// The separator and the name; `message` has no name in text.
    fn name(&mut self, field: &Field) {
        let name = field.name();
        if self.json {
            self.line.push_str(",\"");
            push_json_escaped(self.line, name);
            self.line.push_str("\":");
        } else {
            if !self.first {
                self.line.push(' ');
            }
            self.first = false;
            if name != "message" {
                self.line.push_str(name);
                self.line.push('=');
            }
        }
    }
}

impl Visit for Fields<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.name(field);
        if self.json {
            self.line.push('"');
            push_json_escaped(self.line, value);
            self.line.push('"');
        } else if field.name() == "message" {
            self.line.push_str(value);
        } else if value.bytes().all(plain) {
            self.line.push('"');
            self.line.push_str(value);
            self.line.push('"');
        } else {
            let _ = write!(self.line, "{value:?}");
        }
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.name(field);
        push_u64(self.line, value);
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.name(field);
        if value < 0 {
            self.line.push('-');
        }
        push_u64(self.line, value.unsigned_abs());
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.name(field);
        self.line.push_str(if value { "true" } else { "false" });
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        self.name(field);
        push_f64(self.line, value, self.json);
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.name(field);
        if self.json {
            // As `tracing-serde` does: the `Debug` text, as a JSON string.
            self.line.push('"');
            let _ = write!(JsonEscaped(self.line), "{value:?}");
            self.line.push('"');
        } else {
            let _ = write!(self.line, "{value:?}");
        }
    }
}

/// A byte that `Debug` leaves as it is inside quotes.
fn plain(b: u8) -> bool {
    (0x20..0x7f).contains(&b) && b != b'"' && b != b'\\'
}

fn push_u64(line: &mut String, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    loop {
        at -= 1;
        digits[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    line.push_str(std::str::from_utf8(&digits[at..]).unwrap_or("0"));
}

/// Milliseconds with at most three decimals (what the access line records) the way Rust's
/// `Debug` and `serde_json` print them, without the general float algorithm; anything else
/// goes through it.
fn push_f64(line: &mut String, value: f64, json: bool) {
    let thousandths = (value * 1e3).round();
    if value >= 0.0 && thousandths < 1e15 && thousandths / 1e3 == value {
        let n = thousandths as u64;
        push_u64(line, n / 1000);
        line.push('.');
        let mut frac = n % 1000;
        if frac == 0 {
            line.push('0');
            return;
        }
        let mut digits = 3;
        while frac.is_multiple_of(10) {
            frac /= 10;
            digits -= 1;
        }
        let text = [
            b'0' + (frac / 100 % 10) as u8,
            b'0' + (frac / 10 % 10) as u8,
            b'0' + (frac % 10) as u8,
        ];
        line.push_str(std::str::from_utf8(&text[3 - digits..]).unwrap_or("0"));
        return;
    }
    if json && !value.is_finite() {
        line.push_str("null");
        return;
    }
    let _ = write!(line, "{value:?}");
}

fn push_json_escaped(line: &mut String, s: &str) {
    let _ = JsonEscaped(line).write_str(s);
}

/// Escapes what passes through it for the inside of a JSON string, as `serde_json` does.
struct JsonEscaped<'a>(&'a mut String);

impl fmt::Write for JsonEscaped<'_> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let mut rest = s;
        while let Some(i) = rest
            .bytes()
            .position(|b| b < 0x20 || b == b'"' || b == b'\\')
        {
            self.0.push_str(&rest[..i]);
            match rest.as_bytes()[i] {
                b'"' => self.0.push_str("\\\""),
                b'\\' => self.0.push_str("\\\\"),
                b'\n' => self.0.push_str("\\n"),
                b'\r' => self.0.push_str("\\r"),
                b'\t' => self.0.push_str("\\t"),
                0x08 => self.0.push_str("\\b"),
                0x0c => self.0.push_str("\\f"),
                b => write!(self.0, "\\u{b:04x}")?,
            }
            rest = &rest[i + 1..];
        }
        self.0.push_str(rest);
        Ok(())
    }
}

thread_local! {
    /// The last second formatted (`YYYY-MM-DDTHH:MM:SS`), and which second it was.
    static SECOND: RefCell<(u64, [u8; 19])> = const { RefCell::new((u64::MAX, [0; 19])) };
}

/// RFC 3339 in UTC with microseconds, as `tracing-subscriber` writes it:
/// `2025-01-31T23:59:59.123456Z`.
fn push_timestamp(line: &mut String, now: SystemTime) {
    let since = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    let (secs, micros) = (since.as_secs(), since.subsec_micros());
    SECOND.with(|cell| {
        let mut cached = cell.borrow_mut();
        if cached.0 != secs {
            *cached = (secs, civil(secs));
        }
        line.push_str(std::str::from_utf8(&cached.1).unwrap_or("0000-00-00T00:00:00"));
    });
    let mut frac = *b".000000Z";
    let mut n = micros;
    for i in (1..7).rev() {
        frac[i] = b'0' + (n % 10) as u8;
        n /= 10;
    }
    line.push_str(std::str::from_utf8(&frac).unwrap_or(".000000Z"));
}

/// `YYYY-MM-DDTHH:MM:SS` for seconds since the Unix epoch (Howard Hinnant's
/// `civil_from_days`; years 0 to 9999).
fn civil(secs: u64) -> [u8; 19] {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let mut out = *b"0000-00-00T00:00:00";
    let mut put = |at: usize, width: usize, mut n: u64| {
        for i in (at..at + width).rev() {
            out[i] = b'0' + (n % 10) as u8;
            n /= 10;
        }
    };
    put(0, 4, year.clamp(0, 9999) as u64);
    put(5, 2, month as u64);
    put(8, 2, day as u64);
    put(11, 2, rem / 3600);
    put(14, 2, rem / 60 % 60);
    put(17, 2, rem % 60);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};
    use std::time::Duration;
    use tracing_subscriber::layer::SubscriberExt;

    #[test]
    fn dates() {
        let at = |secs| String::from_utf8(civil(secs).to_vec()).unwrap();
        assert_eq!(at(0), "1970-01-01T00:00:00");
        assert_eq!(at(951_782_400), "2000-02-29T00:00:00");
        assert_eq!(at(1_709_251_199), "2024-02-29T23:59:59");
        assert_eq!(at(4_102_444_800), "2100-01-01T00:00:00");
        let mut line = String::new();
        push_timestamp(
            &mut line,
            SystemTime::UNIX_EPOCH + Duration::from_micros(1_700_000_000_000_042),
        );
        assert_eq!(line, "2023-11-14T22:13:20.000042Z");
    }

    /// What a subscriber with `format` writes for one access event and one other event.
    fn lines(json: bool, hand: bool) -> Vec<String> {
        let out = Arc::new(Mutex::new(Vec::new()));
        let make = {
            let out = out.clone();
            move || Capture(out.clone())
        };
        let layer = tracing_subscriber::fmt::layer()
            .with_writer(make)
            .with_ansi(false);
        let subscriber: Box<dyn Subscriber + Send + Sync> = match (json, hand) {
            (false, false) => Box::new(tracing_subscriber::registry().with(layer)),
            (false, true) => Box::new(
                tracing_subscriber::registry().with(layer.map_event_format(AccessFormat::text)),
            ),
            (true, hand) => {
                let layer = layer
                    .json()
                    .flatten_event(true)
                    .with_current_span(false)
                    .with_span_list(false);
                if hand {
                    Box::new(
                        tracing_subscriber::registry()
                            .with(layer.map_event_format(AccessFormat::json)),
                    )
                } else {
                    Box::new(tracing_subscriber::registry().with(layer))
                }
            }
        };
        tracing::subscriber::with_default(subscriber, || {
            struct Hex;
            impl fmt::Display for Hex {
                fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                    f.write_str("4bf92f3577b34da6a3ce929d0e0e4736")
                }
            }
            for (duration, cache) in [
                (0.042, Some("hit")),
                (1500.0, None),
                (2.05, Some("q\"\\é")),
                (0.1, Some("\u{1b}[31m\n")),
                (123456.789, Some("ok")),
                (1e-7, None),
            ] {
                tracing::info!(
                    target: "score_proxy::access",
                    trace_id = %Hex,
                    route = "/proxy/score",
                    status = 200u16,
                    outcome = "hit",
                    cache,
                    queue_wait_ms = Some(1.111),
                    upstream_status = None::<u16>,
                    duration_ms = duration,
                    "request"
                );
            }
            tracing::warn!(grace_seconds = 10.0, "shutting down: draining");
        });
        let text = String::from_utf8(out.lock().unwrap().clone()).unwrap();
        // The timestamps differ, and only them.
        text.lines()
            .map(|l| {
                let end = l.find("Z ").or_else(|| l.find("Z\"")).expect("a timestamp");
                l[end..].to_owned()
            })
            .collect()
    }

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

    #[test]
    fn the_hand_made_line_is_the_general_formatters_line() {
        for json in [false, true] {
            let general = lines(json, false);
            assert_eq!(general.len(), 7, "{general:#?}");
            assert_eq!(lines(json, true), general, "json: {json}");
        }
    }
}
