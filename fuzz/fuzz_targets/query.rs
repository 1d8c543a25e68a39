//! Fuzz target: the query path of `/proxy/score`, the one place where bytes chosen by anyone
//! on the network are parsed before anything else looks at them.
//!
//! Arbitrary bytes become the raw query (as UTF-8 when they are, lossily otherwise, since
//! axum hands the handler a `&str`) and go through `parse_lookup` without and with a default
//! client id, and through `Cpf::parse` on their own. The target asserts:
//! - nothing panics;
//! - `parse_lookup` gives exactly the answer of a reference model written here from the
//!   rules (form decoding, left-to-right precedence, mod-11 computed the textbook way);
//! - an accepted key's CPF prints as 11 ASCII digits that parse back to itself, have valid
//!   check digits and are not all equal, and its client id is 1..=128 printable ASCII;
//! - a query that names `cpf` or `client_id` twice is refused;
//! - a default client id changes nothing when the query gives a valid one;
//! - the same bytes as an `X-Queue-Timeout` header value are accepted only as a plain
//!   decimal number of seconds from 0.001 to 3600.
//!
//! The model repeats the one in `tests/proptest_cpf.rs` on purpose: the fuzz crate is a
//! workspace of its own and shares no code with the tests.

#![no_main]

use libfuzzer_sys::fuzz_target;
use score_validation::{
    ClientId, ClientIdError, Cpf, CpfError, MAX_CLIENT_ID_LEN, QueryError, parse_lookup,
    parse_queue_timeout,
};

fuzz_target!(|data: &[u8]| {
    let query = String::from_utf8_lossy(data);
    check_query(&query);
    check_cpf(&query);
    check_queue_timeout(data);
});

fn check_queue_timeout(data: &[u8]) {
    let Ok(wait) = parse_queue_timeout(data) else {
        return;
    };
    let text = std::str::from_utf8(data)
        .expect("accepted values are UTF-8")
        .trim();
    assert!(
        text.bytes().all(|b| b.is_ascii_digit() || b == b'.'),
        "accepted {text:?}"
    );
    let seconds: f64 = text.parse().expect("accepted values are numbers");
    assert!((0.001..=3600.0).contains(&seconds), "accepted {text:?}");
    assert!(
        (wait.as_secs_f64() - seconds).abs() < 1e-9,
        "{text:?} -> {wait:?}"
    );
}

const DEFAULT_CLIENT: &str = "fuzz-default-client";

fn check_query(query: &str) {
    let default = ClientId::parse(DEFAULT_CLIENT).expect("valid default");
    let without = parse_lookup(Some(query), None);
    let with = parse_lookup(Some(query), Some(&default));

    for (result, default) in [(&without, None), (&with, Some(DEFAULT_CLIENT))] {
        let got = result
            .as_ref()
            .map(|k| (k.cpf.to_string(), k.client_id.as_str().to_owned()))
            .map_err(|e| *e);
        let expected = model::parse_lookup(query, default);
        assert_eq!(
            got, expected,
            "parse_lookup disagrees with the model on {query:?}"
        );

        if let Ok(key) = result {
            let digits = key.cpf.to_string();
            assert_eq!(digits.len(), 11, "{digits:?}");
            assert!(digits.bytes().all(|b| b.is_ascii_digit()), "{digits:?}");
            assert!(model::parse_cpf(&digits).is_ok(), "invalid cpf accepted");
            assert_eq!(Cpf::parse(&digits), Ok(key.cpf), "no round trip");
            let id = key.client_id.as_str();
            assert!(
                (1..=MAX_CLIENT_ID_LEN).contains(&id.len()),
                "client id length"
            );
            assert!(
                id.bytes().all(|b| (0x20..=0x7e).contains(&b)),
                "unprintable id"
            );
            // Debug output never shows the values (they are personal data).
            let shown = format!("{key:?}");
            assert!(!shown.contains(&digits), "Debug shows the cpf");
        }
    }

    // A repeated `cpf` or `client_id` is never accepted (the error may be an earlier one:
    // a name that is not UTF-8, or a first copy whose value is not).
    let (cpfs, clients) = model::count_names(query);
    if cpfs > 1 || clients > 1 {
        assert!(
            matches!(with, Err(QueryError::Repeated(_) | QueryError::NotUtf8(_))),
            "repeated parameter not refused: {query:?} -> {with:?}"
        );
    }

    // With a valid explicit client id the default is irrelevant.
    if let Ok(key) = &without {
        assert_eq!(with.as_ref(), Ok(key), "default changed an explicit id");
    }
}

fn check_cpf(input: &str) {
    let got = Cpf::parse(input).map(|c| c.to_string());
    assert_eq!(
        got,
        model::parse_cpf(input),
        "Cpf::parse disagrees on {input:?}"
    );
}

/// The rules, written from `UPSTREAM.md` and the README, not from `validation.rs`.
mod model {
    use super::{ClientIdError, CpfError, QueryError};

    fn check_digit(digits: &[u8]) -> u8 {
        let n = digits.len() as u32;
        let sum: u32 = digits
            .iter()
            .zip((2..=n + 1).rev())
            .map(|(&d, w)| u32::from(d) * w)
            .sum();
        let r = sum % 11;
        if r < 2 { 0 } else { (11 - r) as u8 }
    }

    pub fn parse_cpf(s: &str) -> Result<String, CpfError> {
        if s.is_empty() {
            return Err(CpfError::Missing);
        }
        let b = s.as_bytes();
        let digits: Vec<u8> = match b.len() {
            11 => b.to_vec(),
            14 if b[3] == b'.' && b[7] == b'.' && b[11] == b'-' => b
                .iter()
                .enumerate()
                .filter(|&(i, _)| !matches!(i, 3 | 7 | 11))
                .map(|(_, &c)| c)
                .collect(),
            _ => return Err(CpfError::Format),
        };
        if !digits.iter().all(u8::is_ascii_digit) {
            return Err(CpfError::Format);
        }
        let d: Vec<u8> = digits.iter().map(|c| c - b'0').collect();
        if d[9] != check_digit(&d[..9]) || d[10] != check_digit(&d[..10]) {
            return Err(CpfError::CheckDigits);
        }
        if d.iter().all(|&x| x == d[0]) {
            return Err(CpfError::Repeated);
        }
        Ok(digits.iter().map(|&c| char::from(c)).collect())
    }

    fn client_id(s: &str) -> Result<String, ClientIdError> {
        if s.is_empty() {
            Err(ClientIdError::Missing)
        } else if s.len() > 128 {
            Err(ClientIdError::TooLong)
        } else if !s.bytes().all(|b| (0x20..=0x7e).contains(&b)) {
            Err(ClientIdError::Unprintable)
        } else {
            Ok(s.to_owned())
        }
    }

    /// `+` is a space, `%` and two hex digits a byte, anything else itself; UTF-8 or nothing.
    fn form_decode(raw: &str) -> Option<String> {
        fn hex(c: u8) -> Option<u8> {
            char::from(c).to_digit(16).map(|v| v as u8)
        }
        let b = raw.as_bytes();
        let mut out = Vec::with_capacity(b.len());
        let mut i = 0;
        while i < b.len() {
            match (
                b[i],
                b.get(i + 1).copied().and_then(hex),
                b.get(i + 2).copied().and_then(hex),
            ) {
                (b'+', _, _) => out.push(b' '),
                (b'%', Some(hi), Some(lo)) => {
                    out.push(hi * 16 + lo);
                    i += 2;
                }
                (c, _, _) => out.push(c),
            }
            i += 1;
        }
        String::from_utf8(out).ok()
    }

    fn pairs(query: &str) -> impl Iterator<Item = (&str, &str)> {
        query
            .split('&')
            .filter(|p| !p.is_empty())
            .map(|p| p.split_once('=').unwrap_or((p, "")))
    }

    /// How many parameters decode to the name `cpf` and to `client_id`.
    pub fn count_names(query: &str) -> (usize, usize) {
        let names: Vec<String> = pairs(query).filter_map(|(n, _)| form_decode(n)).collect();
        let count = |want: &str| names.iter().filter(|n| *n == want).count();
        (count("cpf"), count("client_id"))
    }

    pub fn parse_lookup(
        query: &str,
        default: Option<&str>,
    ) -> Result<(String, String), QueryError> {
        let mut cpf: Option<String> = None;
        let mut client: Option<String> = None;
        for (name, value) in pairs(query) {
            let name = form_decode(name).ok_or(QueryError::NotUtf8("parameter name"))?;
            let (slot, label) = match name.as_str() {
                "cpf" => (&mut cpf, "cpf"),
                "client_id" => (&mut client, "client_id"),
                _ => continue,
            };
            if slot.is_some() {
                return Err(QueryError::Repeated(label));
            }
            *slot = Some(form_decode(value).ok_or(QueryError::NotUtf8(label))?);
        }
        let cpf = parse_cpf(cpf.as_deref().unwrap_or("")).map_err(QueryError::Cpf)?;
        let client = match client.as_deref() {
            None | Some("") => default
                .map(str::to_owned)
                .ok_or(QueryError::ClientId(ClientIdError::Missing))?,
            Some(raw) => client_id(raw).map_err(QueryError::ClientId)?,
        };
        Ok((cpf, client))
    }
}
