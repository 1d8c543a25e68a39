//! Value parsers: one small function per kind of setting, from the text an operator gave to
//! a typed value whose unit is in its type (`Duration`, `SocketAddr`, `Url`), or an error
//! message that names the text.
//!
//! These are plain functions rather than clap value parsers on purpose: clap stops at the
//! first flag it cannot parse, and start-up must report every problem at once, so clap
//! collects text and [`super::checks`] runs these over all of it. Ranges are given by the
//! caller, next to the setting they bound; the parsers only know what a well-formed value
//! looks like. Every message starts with the text as given, in quotes, so an operator sees
//! exactly what the proxy read (whitespace included).

use std::net::SocketAddr;
use std::ops::RangeInclusive;
use std::time::Duration;

use url::Url;

use crate::lookup::validation::ClientId;
use crate::store::DataKey;
use crate::telemetry::LogFormat;

/// A parser's answer: the value, or what is wrong with the text.
pub(super) type Parsed<T> = Result<T, String>;

/// An optional setting: unset and empty both mean "not given" (an empty environment
/// variable is how a deployment template switches a setting off).
pub(super) fn optional<T>(
    raw: Option<&str>,
    parse: impl FnOnce(&str) -> Parsed<T>,
) -> Parsed<Option<T>> {
    match raw {
        None | Some("") => Ok(None),
        Some(raw) => parse(raw).map(Some),
    }
}

/// A socket address with an IP, not a host name: the proxy binds it before any resolver is
/// worth trusting.
pub(super) fn address(raw: &str) -> Parsed<SocketAddr> {
    raw.trim()
        .parse()
        .map_err(|_| format!("'{raw}' is not an address like 0.0.0.0:8000 or 127.0.0.1:8000"))
}

/// The upstream's URL: http or https, with a host, and no query or fragment (the proxy adds
/// the query itself, and a fragment would never reach the upstream).
pub(super) fn upstream_url(raw: &str) -> Parsed<Url> {
    let url = Url::parse(raw.trim()).map_err(|e| format!("'{raw}' is not a URL ({e})"))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(format!("'{raw}' must be an http or https URL"));
    }
    if url.host().is_none() {
        return Err(format!("'{raw}' has no host"));
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(format!("'{raw}' must not carry a query or fragment"));
    }
    Ok(url)
}

/// Calls per second: fractional rates are allowed (0.5 is one call every two seconds), zero
/// is not (nothing would ever be called), and above 1000 the pacing's millisecond-scale
/// guard would dominate the interval.
pub(super) fn rate_per_second(raw: &str) -> Parsed<f64> {
    let rate: f64 = raw
        .trim()
        .parse()
        .map_err(|_| format!("'{raw}' is not a number"))?;
    if !(rate.is_finite() && rate > 0.0 && rate <= 1000.0) {
        return Err(format!(
            "'{raw}' must be more than 0 and at most 1000 per second"
        ));
    }
    Ok(rate)
}

/// A count within `range`, in whatever integer type the setting is used as (the range is
/// checked first, so the conversion only fails for a range the type cannot hold).
pub(super) fn whole<T: TryFrom<u64>>(raw: &str, range: RangeInclusive<u64>) -> Parsed<T> {
    let n: u64 = raw
        .trim()
        .parse()
        .map_err(|_| format!("'{raw}' is not a whole number"))?;
    if !range.contains(&n) {
        return Err(format!(
            "'{raw}' must be between {} and {}",
            range.start(),
            range.end()
        ));
    }
    T::try_from(n).map_err(|_| format!("'{raw}' is too large for this machine"))
}

/// A duration within `range`. Durations need a unit (`300ms`, `30s`, `5m`): a bare `10`
/// could mean seconds or milliseconds, and guessing wrong by 1000x is the kind of mistake
/// config should not allow.
pub(super) fn duration(raw: &str, range: RangeInclusive<Duration>) -> Parsed<Duration> {
    let trimmed = raw.trim();
    if !trimmed.is_empty() && trimmed.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
        return Err(format!(
            "'{raw}' needs a unit, e.g. {trimmed}s or {trimmed}ms"
        ));
    }
    let d = humantime::parse_duration(trimmed)
        .map_err(|_| format!("'{raw}' is not a duration like 300ms, 30s or 5m"))?;
    if !range.contains(&d) {
        return Err(format!(
            "'{raw}' must be between {} and {}",
            humantime::format_duration(*range.start()),
            humantime::format_duration(*range.end())
        ));
    }
    Ok(d)
}

/// The persistent cache's key (64 hex digits or base64 of 32 bytes). The message never
/// quotes the text: it is a secret.
pub(super) fn data_key(raw: &str) -> Parsed<DataKey> {
    DataKey::parse(raw).map_err(|problem| format!("the key {problem}"))
}

/// The persistent cache's directory: anything but an existing file (it is created at start
/// if missing, and a directory the proxy cannot write turns persistence off with a log line,
/// not a failed start).
pub(super) fn data_dir(raw: &str) -> Parsed<std::path::PathBuf> {
    let path = std::path::PathBuf::from(raw.trim());
    if path.exists() && !path.is_dir() {
        return Err(format!("'{raw}' exists and is not a directory"));
    }
    Ok(path)
}

/// A switch, in the spellings deployment tools write (`true`/`false`, `1`/`0`, `yes`/`no`,
/// `on`/`off`, any case).
pub(super) fn boolean(raw: &str) -> Parsed<bool> {
    match raw.trim().to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" | "on" => Ok(true),
        "false" | "0" | "no" | "off" => Ok(false),
        _ => Err(format!("'{raw}' is not true or false")),
    }
}

pub(super) fn log_format(raw: &str) -> Parsed<LogFormat> {
    match raw.trim() {
        "text" => Ok(LogFormat::Text),
        "json" => Ok(LogFormat::Json),
        other => Err(format!("'{other}' is not a log format (text or json)")),
    }
}

/// The default client id obeys the same rules as one given in a query, so a lookup that
/// falls back to it can never be one the proxy would have refused.
pub(super) fn client_id(raw: &str) -> Parsed<ClientId> {
    ClientId::parse(raw).map_err(|e| e.message().to_owned())
}

/// A Redis URL as the Redis client reads it (`redis://`, `rediss://`, `unix://`); kept as
/// text because that is what the client is opened with.
pub(super) fn redis_url(raw: &str) -> Parsed<String> {
    redis::Client::open(raw)
        .map(|_| raw.to_owned())
        .map_err(|e| format!("'{raw}' is not a Redis URL ({e})"))
}

/// A Redis key prefix: short, and only characters that need no quoting in `redis-cli` or in
/// a `SCAN MATCH` pattern.
pub(super) fn redis_prefix(raw: &str) -> Parsed<String> {
    let allowed = |b: u8| b.is_ascii_alphanumeric() || b"-_.:".contains(&b);
    if !raw.is_empty() && raw.len() <= 64 && raw.bytes().all(allowed) {
        Ok(raw.to_owned())
    } else {
        Err(format!("'{raw}' must be 1 to 64 letters, digits or -_.:"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn optional_treats_unset_and_empty_alike() {
        assert_eq!(optional(None, address), Ok(None));
        assert_eq!(optional(Some(""), address), Ok(None));
        assert_eq!(
            optional(Some("127.0.0.1:9100"), address),
            Ok(Some("127.0.0.1:9100".parse().unwrap()))
        );
        assert!(optional(Some(" "), address).is_err());
    }

    #[test]
    fn addresses_are_ip_and_port() {
        assert_eq!(address(" 0.0.0.0:8000 ").unwrap().port(), 8000);
        assert_eq!(address("[::1]:80").unwrap().port(), 80);
        assert_eq!(
            address("localhost:8000"),
            Err("'localhost:8000' is not an address like 0.0.0.0:8000 or 127.0.0.1:8000".into())
        );
    }

    #[test]
    fn upstream_urls_are_http_with_a_host_and_no_query() {
        assert_eq!(
            upstream_url("http://127.0.0.1:9/api/score").unwrap().path(),
            "/api/score"
        );
        assert!(
            upstream_url("not a url")
                .unwrap_err()
                .contains("is not a URL")
        );
        assert_eq!(
            upstream_url("ftp://x/y"),
            Err("'ftp://x/y' must be an http or https URL".into())
        );
        assert_eq!(
            upstream_url("https://x/api?cpf=1"),
            Err("'https://x/api?cpf=1' must not carry a query or fragment".into())
        );
        assert!(upstream_url("https://x/api#top").is_err());
    }

    #[test]
    fn rates_are_positive_and_bounded() {
        assert_eq!(rate_per_second("0.5"), Ok(0.5));
        assert_eq!(rate_per_second(" 1000 "), Ok(1000.0));
        assert_eq!(rate_per_second("abc"), Err("'abc' is not a number".into()));
        for bad in ["0", "-1", "1000.1", "inf", "NaN"] {
            assert_eq!(
                rate_per_second(bad),
                Err(format!(
                    "'{bad}' must be more than 0 and at most 1000 per second"
                )),
            );
        }
    }

    #[test]
    fn whole_numbers_are_checked_against_their_range() {
        assert_eq!(whole::<usize>(" 20 ", 1..=100), Ok(20));
        assert_eq!(whole::<u32>("0", 0..=5), Ok(0));
        assert_eq!(
            whole::<usize>("0", 1..=100),
            Err("'0' must be between 1 and 100".into())
        );
        assert_eq!(
            whole::<usize>("lots", 1..=100),
            Err("'lots' is not a whole number".into())
        );
        assert_eq!(
            whole::<usize>("-1", 0..=100),
            Err("'-1' is not a whole number".into())
        );
        assert!(whole::<u8>("300", 0..=1000).is_err());
    }

    #[test]
    fn durations_need_a_unit_and_a_range() {
        assert_eq!(duration("10ms", ms(0)..=ms(1000)), Ok(ms(10)));
        assert_eq!(duration(" 1s ", ms(0)..=ms(1000)), Ok(ms(1000)));
        assert_eq!(
            duration("10", ms(0)..=ms(1000)),
            Err("'10' needs a unit, e.g. 10s or 10ms".into())
        );
        assert_eq!(
            duration("soon", ms(0)..=ms(1000)),
            Err("'soon' is not a duration like 300ms, 30s or 5m".into())
        );
        assert_eq!(
            duration("2s", ms(1)..=ms(1000)),
            Err("'2s' must be between 1ms and 1s".into())
        );
        assert_eq!(
            duration("0s", ms(1)..=ms(1000)),
            Err("'0s' must be between 1ms and 1s".into())
        );
    }

    #[test]
    fn booleans_accept_the_usual_spellings() {
        for yes in ["true", "TRUE", "1", "yes", "On"] {
            assert_eq!(boolean(yes), Ok(true), "{yes}");
        }
        for no in ["false", "0", "no", " off "] {
            assert_eq!(boolean(no), Ok(false), "{no}");
        }
        assert_eq!(boolean("maybe"), Err("'maybe' is not true or false".into()));
    }

    #[test]
    fn log_formats_are_text_or_json() {
        assert_eq!(log_format("json "), Ok(LogFormat::Json));
        assert_eq!(log_format("text"), Ok(LogFormat::Text));
        assert_eq!(
            log_format("xml"),
            Err("'xml' is not a log format (text or json)".into())
        );
    }

    #[test]
    fn client_ids_follow_the_query_rules() {
        assert_eq!(client_id("000").unwrap().as_str(), "000");
        assert!(client_id("tab\there").is_err());
    }

    #[test]
    fn redis_urls_and_prefixes() {
        assert_eq!(
            redis_url("redis://127.0.0.1:6379"),
            Ok("redis://127.0.0.1:6379".into())
        );
        assert!(
            redis_url("http://x")
                .unwrap_err()
                .starts_with("'http://x' is not a Redis URL (")
        );
        assert_eq!(redis_prefix("fleet-a:v1"), Ok("fleet-a:v1".into()));
        for bad in ["", "has space", &"x".repeat(65)] {
            assert_eq!(
                redis_prefix(bad),
                Err(format!("'{bad}' must be 1 to 64 letters, digits or -_.:"))
            );
        }
    }
}
