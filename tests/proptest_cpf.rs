//! Property tests of stage 1 (`score_proxy::lookup::validation`): CPF parsing and the query parser
//! of `/proxy/score`, checked against the reference model in `score_test_support` (`cpf` and
//! `query`), written from the rules in `docs/upstream.md`, independently of the implementation
//! (the fuzz target checks the parser against the same model).
//!
//! The model computes check digits the textbook way (`r = sum % 11`, digit `0` if `r < 2`
//! else `11 - r`), where the implementation uses `(10 * sum) % 11`; the two agree only if
//! both are right. The query model decodes `application/x-www-form-urlencoded` by hand.
//!
//! Every property is pure computation (no I/O, no clocks), so the suite is deterministic on a
//! loaded machine; proptest's seed is random per run, and a failure is saved under
//! `proptest-regressions/` and replayed first next time. `PROPTEST_CASES=N` runs more cases.

use proptest::prelude::*;
use score_proxy::lookup::validation::{
    ClientId, ClientIdError, Cpf, CpfError, MAX_CLIENT_ID_LEN, QueryError, parse_lookup,
};
use score_test_support::cpf::{self as model, digits_string, formatted};
use score_test_support::query;

/// The implementation's answer in the model's terms.
fn lookup(query: Option<&str>, default: Option<&str>) -> Result<(String, String), QueryError> {
    let default = default.map(|d| ClientId::parse(d).expect("test default is valid"));
    parse_lookup(query, default.as_ref()).map(|k| (k.cpf.to_string(), k.client_id.as_str().into()))
}

/// Every byte as `%XX`, with upper- or lower-case hex as `upper` says.
fn encode_all(s: &str, upper: bool) -> String {
    s.bytes()
        .map(|b| {
            if upper {
                format!("%{b:02X}")
            } else {
                format!("%{b:02x}")
            }
        })
        .collect()
}

/// The least encoding that keeps `s` one value: only the bytes the form syntax gives a
/// meaning to (`&`, `=`, `+`, `%`, and `#` for good measure); spaces as `+`.
fn encode_min(s: &str) -> String {
    s.chars()
        .map(|c| match c {
            ' ' => "+".to_owned(),
            '&' | '=' | '+' | '%' | '#' => format!("%{:02X}", u32::from(c)),
            _ => c.to_string(),
        })
        .collect()
}

/// A base (first nine digits) that `Cpf::from_base` turns into a valid CPF.
fn valid_base() -> impl Strategy<Value = u32> {
    (0u32..=999_999_999).prop_filter("all nine digits equal", |b| b % 111_111_111 != 0)
}

/// A valid CPF's 11 digits.
fn valid_cpf() -> impl Strategy<Value = String> {
    valid_base().prop_map(|b| digits_string(&model::complete(b)))
}

/// A printable-ASCII client id of 1..=128 characters.
fn valid_client_id() -> impl Strategy<Value = String> {
    proptest::collection::vec(0x20u8..=0x7e, 1..=MAX_CLIENT_ID_LEN)
        .prop_map(|b| String::from_utf8(b).expect("ASCII"))
}

/// Strings near the accepted shapes (where the bugs would be) and arbitrary ones.
fn cpf_like() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<String>(),
        "[0-9]{0,15}",
        "[0-9.\\- /]{0,16}",
        "[0-9]{3}[.\\-,][0-9]{3}[.\\-,][0-9]{3}[.\\-,/][0-9]{2}",
        // A valid CPF, mutated: one character replaced, inserted or removed.
        (
            valid_cpf(),
            any::<bool>(),
            0usize..14,
            any::<char>(),
            0u8..3
        )
            .prop_map(|(d, fmt, at, c, how)| {
                let mut chars: Vec<char> = if fmt { formatted(&d) } else { d }.chars().collect();
                let at = at % (chars.len() + 1);
                match how {
                    0 if at < chars.len() => chars[at] = c,
                    1 => chars.insert(at, c),
                    _ if at < chars.len() => {
                        chars.remove(at);
                    }
                    _ => {}
                }
                chars.into_iter().collect()
            }),
    ]
}

/// A parameter value: valid CPFs in every form, client ids, encodings both well-formed and
/// broken (`%FF` is not UTF-8, `%G1` and a trailing `%` are not escapes), and noise.
fn value() -> impl Strategy<Value = String> {
    prop_oneof![
        valid_cpf(),
        valid_cpf().prop_map(|d| formatted(&d)),
        (valid_cpf(), any::<bool>()).prop_map(|(d, up)| encode_all(&formatted(&d), up)),
        valid_client_id().prop_map(|c| encode_min(&c)),
        cpf_like().prop_map(|s| encode_min(&s)),
        Just(String::new()),
        "[a-zA-Z0-9%+.=\\-]{0,20}",
        "(%[0-9A-Fa-f]{2}|%[G-Zg-z0-9]{0,2}|[a-z0-9+])*",
        any::<String>(),
    ]
}

/// A parameter name: the two that matter, spelled plainly or encoded, near misses, noise.
fn name() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => Just("cpf".to_owned()),
        3 => Just("client_id".to_owned()),
        1 => Just("c%70f".to_owned()),
        1 => Just("client%5Fid".to_owned()),
        1 => Just("%63%70%66".to_owned()),
        1 => Just("CPF".to_owned()),
        1 => Just("cpf+".to_owned()),
        1 => Just("client_id%00".to_owned()),
        1 => Just("%FF".to_owned()),
        1 => Just(String::new()),
        1 => "[a-z_%0-9]{0,8}",
        1 => any::<String>(),
    ]
}

/// A raw query: `name=value` pairs (some without `=`), joined by `&` (some doubled), or
/// arbitrary text.
fn query() -> impl Strategy<Value = String> {
    let pair = (name(), value(), 0u8..8).prop_map(|(n, v, shape)| match shape {
        0 => n,
        1 => format!("{n}={v}={v}"),
        _ => format!("{n}={v}"),
    });
    prop_oneof![
        8 => (proptest::collection::vec(pair, 0..6), any::<bool>())
            .prop_map(|(pairs, doubled)| pairs.join(if doubled { "&&" } else { "&" })),
        1 => any::<String>(),
        1 => "[a-z_%0-9A-F=&+.\\-]{0,64}",
    ]
}

/// 2048 cases per property (about ten seconds in all on a loaded 2-core machine);
/// `PROPTEST_CASES=N` runs more, e.g. for a long run by hand.
fn config() -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2048);
    ProptestConfig::with_cases(cases)
}

proptest! {
    #![proptest_config(config())]

    /// Every number `from_base` makes parses back to itself in both printed forms, and it
    /// makes one exactly when the model says the base yields a valid CPF.
    #[test]
    fn from_base_round_trips_in_both_forms(base in 0u32..=999_999_999) {
        let expected = model::judge(&model::complete(base)).ok();
        let made = Cpf::from_base(base);
        prop_assert_eq!(made.map(|c| c.to_string()), expected.clone());
        if let Some(cpf) = made {
            let digits = cpf.to_string();
            prop_assert_eq!(digits.len(), 11);
            prop_assert!(digits.bytes().all(|b| b.is_ascii_digit()));
            prop_assert_eq!(Cpf::parse(&digits), Ok(cpf));
            prop_assert_eq!(Cpf::parse(&formatted(&digits)), Ok(cpf));
            prop_assert_eq!(cpf.as_u64(), digits.parse::<u64>().unwrap());
        }
    }

    /// Changing one digit of a valid CPF (a check digit or not) makes it invalid, except
    /// where the model's arithmetic says the result is valid too: mod 11 mapped onto ten
    /// digits (residues 0 and 1 both give `0`) lets some single changes through.
    #[test]
    fn single_digit_changes(cpf in valid_cpf(), at in 0usize..11, delta in 1u8..10, fmt: bool) {
        let mut d: Vec<u8> = cpf.bytes().map(|b| b - b'0').collect();
        d[at] = (d[at] + delta) % 10;
        let d: [u8; 11] = d.try_into().unwrap();
        let changed = digits_string(&d);
        let input = if fmt { formatted(&changed) } else { changed.clone() };
        let got = Cpf::parse(&input).map(|c| c.to_string());
        prop_assert_eq!(&got, &model::judge(&d));
        if at >= 9 {
            // Changing only a check digit never gives another valid CPF: the check digits
            // are a function of the body.
            prop_assert_eq!(got, Err(CpfError::CheckDigits));
        }
    }

    /// All eleven digits equal passes the arithmetic and is still refused, in both forms.
    #[test]
    fn all_same_digits_are_refused(digit in 0u8..10, fmt: bool) {
        let s: String = std::iter::repeat_n(char::from(b'0' + digit), 11).collect();
        let input = if fmt { formatted(&s) } else { s };
        prop_assert_eq!(Cpf::parse(&input), Err(CpfError::Repeated));
    }

    /// Any string: no panic, and exactly the model's verdict (accepted only as 11 ASCII
    /// digits or `XXX.XXX.XXX-XX` with valid check digits, not all equal).
    #[test]
    fn arbitrary_strings_match_the_model(s in cpf_like()) {
        let got = Cpf::parse(&s);
        prop_assert_eq!(got.map(|c| c.to_string()), model::parse_cpf(&s));
        if let Ok(cpf) = got {
            let shape_ok = (s.len() == 11 && s.bytes().all(|b| b.is_ascii_digit()))
                || formatted(&cpf.to_string()) == s;
            prop_assert!(shape_ok, "accepted an unexpected shape: {:?}", s);
        }
    }

    /// Any query string, with and without a default client id: no panic, the model's
    /// answer, and every accepted key holds an 11-digit valid CPF and a client id of
    /// 1..=128 printable ASCII characters.
    #[test]
    fn parse_lookup_matches_the_model(q in query(), with_default: bool) {
        let default = with_default.then_some("default-client");
        let got = lookup(Some(&q), default);
        prop_assert_eq!(&got, &query::parse_lookup(Some(&q), default));
        if let Ok((cpf, client)) = got {
            prop_assert_eq!(cpf.len(), 11);
            prop_assert!(cpf.bytes().all(|b| b.is_ascii_digit()));
            prop_assert!(model::parse_cpf(&cpf).is_ok());
            prop_assert!((1..=MAX_CLIENT_ID_LEN).contains(&client.len()));
            prop_assert!(client.bytes().all(|b| (0x20..=0x7e).contains(&b)));
        }
    }

    /// `cpf` or `client_id` given twice is refused whatever the values (even two equal,
    /// valid ones) and wherever the copies sit among other parameters.
    #[test]
    fn repeated_parameters_are_refused(
        cpf in valid_cpf(),
        other in valid_cpf(),
        client in valid_client_id(),
        repeat_client: bool,
        same_value: bool,
        noise in proptest::collection::vec("[a-z]{1,5}=[a-z0-9]{0,5}", 0..4),
        order in any::<proptest::sample::Index>(),
        second_at in any::<proptest::sample::Index>(),
    ) {
        let (name, first, second) = if repeat_client {
            let second = if same_value { client.clone() } else { format!("{client}x") };
            ("client_id", encode_min(&client), encode_min(&second))
        } else {
            ("cpf", cpf.clone(), if same_value { cpf.clone() } else { other })
        };
        let mut pairs: Vec<String> = noise;
        pairs.insert(order.index(pairs.len() + 1), format!("{name}={first}"));
        // Sometimes the second copy is spelled with its name percent-encoded.
        let encoded_name = if second_at.index(2) == 0 { name.to_owned() } else { encode_all(name, true) };
        pairs.insert(second_at.index(pairs.len() + 1), format!("{encoded_name}={second}"));
        if repeat_client {
            pairs.push(format!("cpf={cpf}"));
        } else {
            pairs.push(format!("client_id={}", encode_min(&client)));
        }
        let q = pairs.join("&");
        let got = lookup(Some(&q), Some("default-client"));
        prop_assert_eq!(got, Err(QueryError::Repeated(name)), "query {:?}", q);
    }

    /// A lookup spelled plainly and the same lookup with names and values percent-encoded
    /// (upper or lower hex, spaces as `+` or `%20`, the CPF in either form) are the same key.
    #[test]
    fn percent_encoded_forms_are_the_same_key(
        cpf in valid_cpf(),
        client in valid_client_id(),
        cpf_formatted: bool,
        upper: bool,
        encode_names: bool,
        client_first: bool,
    ) {
        let printed = if cpf_formatted { formatted(&cpf) } else { cpf.clone() };
        let plain = if client_first {
            format!("client_id={}&cpf={printed}", encode_min(&client))
        } else {
            format!("cpf={printed}&client_id={}", encode_min(&client))
        };
        let enc_name = |n: &str| if encode_names { encode_all(n, upper) } else { n.to_owned() };
        let encoded = format!(
            "{}={}&{}={}",
            enc_name("cpf"),
            encode_all(&printed, upper),
            enc_name("client_id"),
            encode_all(&client, !upper).replace("%20", "+"),
        );
        let a = parse_lookup(Some(&plain), None);
        let b = parse_lookup(Some(&encoded), None);
        prop_assert!(a.is_ok(), "plain form refused: {:?} -> {:?}", plain, a);
        prop_assert_eq!(&a, &b, "plain {:?} vs encoded {:?}", plain, encoded);
        let key = a.unwrap();
        prop_assert_eq!(key.cpf.to_string(), cpf);
        prop_assert_eq!(key.client_id.as_str(), client.as_str());
    }

    /// A client id the rules accept is accepted, whatever the default; one they refuse is
    /// refused for the documented reason, and a default never rescues a bad explicit id.
    #[test]
    fn client_id_rules(raw in prop_oneof![
        valid_client_id(),
        "[ -~]{129,200}",
        any::<String>(),
        "[ -~]{0,10}[\\x00-\\x1f\\x7f][ -~]{0,10}",
    ]) {
        prop_assert_eq!(ClientId::parse(&raw).map(|c| c.as_str().to_owned()), query::client_id(&raw));
        let q = format!("cpf=89336333089&client_id={}", encode_min(&raw));
        let got = lookup(Some(&q), Some("default-client"));
        match query::client_id(&raw) {
            Ok(id) => prop_assert_eq!(got, Ok(("89336333089".to_owned(), id))),
            Err(ClientIdError::Missing) => {
                prop_assert_eq!(got, Ok(("89336333089".to_owned(), "default-client".to_owned())))
            }
            Err(e) => prop_assert_eq!(got, Err(QueryError::ClientId(e))),
        }
    }
}

/// The model itself, on the numbers `docs/upstream.md` gives: a wrong model would make every
/// property above vacuous.
#[test]
fn the_model_agrees_with_the_known_numbers() {
    assert_eq!(
        model::parse_cpf("01658739060").as_deref(),
        Ok("01658739060")
    );
    assert_eq!(
        model::parse_cpf("893.363.330-89").as_deref(),
        Ok("89336333089")
    );
    assert_eq!(model::parse_cpf("12345678900"), Err(CpfError::CheckDigits));
    assert_eq!(model::parse_cpf("22222222222"), Err(CpfError::Repeated));
    assert_eq!(model::parse_cpf("893.363.330.89"), Err(CpfError::Format));
    assert_eq!(model::parse_cpf(""), Err(CpfError::Missing));
    assert_eq!(
        query::form_decode("a+b%21%zz%4").as_deref(),
        Some("a b!%zz%4")
    );
    assert_eq!(query::form_decode("%FF"), None);
    // There are single-digit changes that keep a CPF valid (residue 0 vs 1 both give 0):
    // the exception in `single_digit_changes` is real, not hypothetical.
    let collision = (1u32..2_000).find_map(|b| {
        let d = model::complete(b);
        (0..9).find_map(|at| {
            (1..10u8).find_map(|delta| {
                let mut e = d;
                e[at] = (e[at] + delta) % 10;
                (model::judge(&e).is_ok() && e != d).then_some(e)
            })
        })
    });
    assert!(
        collision.is_some(),
        "expected a single-digit change that stays valid"
    );
}
