//! Fuzz target: the query path of `/proxy/score`, the one place where bytes chosen by anyone
//! on the network are parsed before anything else looks at them.
//!
//! Arbitrary bytes become the raw query (as UTF-8 when they are, lossily otherwise, since
//! axum hands the handler a `&str`) and go through `parse_lookup` without and with a default
//! client id, and through `Cpf::parse` on their own. The target asserts:
//! - nothing panics;
//! - `parse_lookup` gives exactly the answer of a reference model written from the
//!   rules (form decoding, left-to-right precedence, mod-11 computed the textbook way);
//! - an accepted key's CPF prints as 11 ASCII digits that parse back to itself, have valid
//!   check digits and are not all equal, and its client id is 1..=128 printable ASCII;
//! - a query that names `cpf` or `client_id` twice is refused;
//! - a default client id changes nothing when the query gives a valid one;
//! - the same bytes as an `X-Queue-Timeout` header value are accepted only as a plain
//!   decimal number of seconds from 0.001 to 3600.
//!
//! The model is `score_test_support`'s (`cpf` and `query`), the one the property tests in
//! `tests/proptest_cpf.rs` use: written from the rules, not from the parser. That crate is
//! taken without default features, so the fuzz build stays the parser and the model.

#![no_main]

use libfuzzer_sys::fuzz_target;
use score_test_support::{cpf as cpf_model, query as query_model};
use score_validation::{
    ClientId, Cpf, MAX_CLIENT_ID_LEN, QueryError, parse_lookup, parse_queue_timeout,
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
        let expected = query_model::parse_lookup(Some(query), default);
        assert_eq!(
            got, expected,
            "parse_lookup disagrees with the model on {query:?}"
        );

        if let Ok(key) = result {
            let digits = key.cpf.to_string();
            assert_eq!(digits.len(), 11, "{digits:?}");
            assert!(digits.bytes().all(|b| b.is_ascii_digit()), "{digits:?}");
            assert!(cpf_model::parse_cpf(&digits).is_ok(), "invalid cpf accepted");
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
    let (cpfs, clients) = query_model::count_names(query);
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
        cpf_model::parse_cpf(input),
        "Cpf::parse disagrees on {input:?}"
    );
}
