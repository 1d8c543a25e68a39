//! The CPF reference model: what the rules in `docs/upstream.md` say a CPF is, written from the
//! rules and not from `score_validation`, so that a test comparing the two finds a bug in
//! either.
//!
//! The check digits are computed the textbook way (`r = sum % 11`, digit `0` if `r < 2`
//! else `11 - r`), where the implementation uses `(10 * sum) % 11`: the two agree only if
//! both are right. The model answers in the implementation's error type ([`CpfError`]) so
//! that a property can compare verdicts with `==`; it shares nothing else with it.
//!
//! Used by the property tests (`tests/proptest_cpf.rs`), the fuzz target
//! (`fuzz/fuzz_targets/query.rs`) and the integration tests' `cpf(n)`, which all used to
//! carry a copy. The upstream simulator (`crates/sim/src/cpf.rs`) keeps its own check on
//! purpose: it stands in for the real API, and a bug shared by the proxy and its upstream
//! would be invisible to every test.

use score_validation::CpfError;

/// Mod-11 check digit of `digits` with weights `len + 1` down to `2`.
pub fn check_digit(digits: &[u8]) -> u8 {
    let n = digits.len() as u32;
    let sum: u32 = digits
        .iter()
        .zip((2..=n + 1).rev())
        .map(|(&d, w)| u32::from(d) * w)
        .sum();
    let r = sum % 11;
    if r < 2 { 0 } else { (11 - r) as u8 }
}

/// Whether 11 digits pass both check digits (the arithmetic alone).
pub fn arithmetic_ok(d: &[u8; 11]) -> bool {
    d[9] == check_digit(&d[..9]) && d[10] == check_digit(&d[..10])
}

/// Whether all 11 digits are equal: such numbers pass the arithmetic and are never issued.
pub fn all_same(d: &[u8; 11]) -> bool {
    d.iter().all(|&x| x == d[0])
}

/// The verdict on 11 digits: a valid CPF (its digits as text), or why not.
pub fn judge(d: &[u8; 11]) -> Result<String, CpfError> {
    if !arithmetic_ok(d) {
        Err(CpfError::CheckDigits)
    } else if all_same(d) {
        Err(CpfError::Repeated)
    } else {
        Ok(digits_string(d))
    }
}

/// The 11 digits of `s` if it has one of the two accepted shapes: 11 ASCII digits, or
/// `XXX.XXX.XXX-XX`.
pub fn shape(s: &str) -> Option<[u8; 11]> {
    let b = s.as_bytes();
    let digits: Vec<u8> = match b.len() {
        11 => b.to_vec(),
        14 if b[3] == b'.' && b[7] == b'.' && b[11] == b'-' => b
            .iter()
            .enumerate()
            .filter(|&(i, _)| !matches!(i, 3 | 7 | 11))
            .map(|(_, &c)| c)
            .collect(),
        _ => return None,
    };
    if !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let mut out = [0u8; 11];
    for (slot, c) in out.iter_mut().zip(digits) {
        *slot = c - b'0';
    }
    Some(out)
}

/// What `Cpf::parse` should say about `s`: the CPF's 11 digits, or the error.
pub fn parse_cpf(s: &str) -> Result<String, CpfError> {
    if s.is_empty() {
        return Err(CpfError::Missing);
    }
    judge(&shape(s).ok_or(CpfError::Format)?)
}

/// Digits of `base` (0..=999_999_999, zero-padded to nine) followed by its two check digits;
/// all eleven equal for the nine bases `k * 111_111_111`.
pub fn complete(base: u32) -> [u8; 11] {
    let mut d = [0u8; 11];
    let mut n = base;
    for slot in d[..9].iter_mut().rev() {
        *slot = (n % 10) as u8;
        n /= 10;
    }
    d[9] = check_digit(&d[..9]);
    d[10] = check_digit(&d[..10]);
    d
}

/// Digits as text: `[0, 1, ...]` is `"01..."`.
pub fn digits_string(d: &[u8; 11]) -> String {
    d.iter().map(|&x| char::from(b'0' + x)).collect()
}

/// The printed form `XXX.XXX.XXX-XX` of 11 digits given as text.
pub fn formatted(digits: &str) -> String {
    format!(
        "{}.{}.{}-{}",
        &digits[0..3],
        &digits[3..6],
        &digits[6..9],
        &digits[9..11]
    )
}

/// The `n`-th valid CPF of the integration tests: distinct for each `n` (bases
/// `100_000_000 + n * 7919`, far apart and never all one digit for the `n` tests use).
pub fn nth(n: u32) -> String {
    let d = complete(100_000_000 + n * 7919);
    assert!(!all_same(&d), "cpf::nth({n}) is an all-same-digit number");
    digits_string(&d)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The numbers `docs/upstream.md` gives: a wrong model would make every property that uses
    /// it vacuous.
    #[test]
    fn known_numbers() {
        assert_eq!(parse_cpf("01658739060").as_deref(), Ok("01658739060"));
        assert_eq!(parse_cpf("893.363.330-89").as_deref(), Ok("89336333089"));
        assert_eq!(parse_cpf("12345678900"), Err(CpfError::CheckDigits));
        assert_eq!(parse_cpf("22222222222"), Err(CpfError::Repeated));
        assert_eq!(parse_cpf("893.363.330.89"), Err(CpfError::Format));
        assert_eq!(parse_cpf(""), Err(CpfError::Missing));
        assert_eq!(formatted("89336333089"), "893.363.330-89");
    }

    #[test]
    fn nth_makes_distinct_valid_numbers() {
        let all: Vec<String> = (0..1000).map(nth).collect();
        for cpf in &all {
            assert!(parse_cpf(cpf).is_ok(), "{cpf}");
        }
        let distinct: std::collections::BTreeSet<&String> = all.iter().collect();
        assert_eq!(distinct.len(), all.len());
    }
}
