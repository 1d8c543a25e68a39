//! The simulator's own CPF check and its made-up scores.
//!
//! This is deliberately a second, independent implementation rather than a call into the
//! proxy's validation: if both sides shared one function, a bug in it would be invisible
//! to every test. It is also strict in the way the real API is assumed to be: exactly 11
//! ASCII digits, no punctuation, correct check digits, not all digits equal.

/// Whether `cpf` is a CPF the upstream accepts.
pub fn is_valid_cpf(cpf: &str) -> bool {
    let bytes = cpf.as_bytes();
    if bytes.len() != 11 || !bytes.iter().all(u8::is_ascii_digit) {
        return false;
    }
    let digits: Vec<u32> = bytes.iter().map(|b| u32::from(b - b'0')).collect();
    if digits.iter().all(|&d| d == digits[0]) {
        return false;
    }
    check_digit(&digits[..9]) == digits[9] && check_digit(&digits[..10]) == digits[10]
}

/// The mod-11 check digit over `digits`, whose weights run from `len + 1` down to 2.
fn check_digit(digits: &[u32]) -> u32 {
    let top = digits.len() as u32 + 1;
    let sum: u32 = digits.iter().zip((2..=top).rev()).map(|(d, w)| d * w).sum();
    let r = sum * 10 % 11;
    if r < 10 { r } else { 0 }
}

/// The valid CPF whose first nine digits are `base` (zero-padded), or `None` if `base` has
/// more than nine digits or the result would be all one digit. Tests and benchmarks use
/// this rather than hard-coded numbers, which are easy to get wrong.
pub fn cpf_from_base(base: u32) -> Option<String> {
    if base > 999_999_999 {
        return None;
    }
    let mut digits: Vec<u32> = format!("{base:09}")
        .bytes()
        .map(|b| u32::from(b - b'0'))
        .collect();
    digits.push(check_digit(&digits));
    digits.push(check_digit(&digits));
    let cpf: String = digits
        .iter()
        .filter_map(|&d| char::from_digit(d, 10))
        .collect();
    is_valid_cpf(&cpf).then_some(cpf)
}

/// An endless supply of distinct valid CPFs, in a fixed order.
pub fn valid_cpfs() -> impl Iterator<Item = String> {
    (1..=999_999_999).filter_map(cpf_from_base)
}

/// A score in `300..=900` that depends on the CPF alone, so that a test can tell whose
/// score a response carries (the original proxy leaked one client's cached score to
/// another) and so that two runs agree. FNV-1a is used because its output is fixed by
/// its definition, unlike `std`'s hasher, which may change between Rust releases.
pub fn score_for(cpf: &str) -> u16 {
    const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;
    let hash = cpf.bytes().fold(FNV_OFFSET, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(FNV_PRIME)
    });
    // 601 values: 300 through 900 inclusive; the remainder is < 601, so it fits in u16.
    300 + (hash % 601) as u16
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_numbers() {
        assert!(is_valid_cpf("01658739060"));
        assert!(is_valid_cpf("89336333089"));
        assert!(!is_valid_cpf("12345678900"));
        assert!(!is_valid_cpf("11111111111"));
        assert!(!is_valid_cpf("00000000000"));
        assert!(!is_valid_cpf("123"));
        assert!(!is_valid_cpf(""));
        assert!(!is_valid_cpf("016.587.390-60"));
        assert!(!is_valid_cpf("0165873906a"));
        assert!(!is_valid_cpf("016587390600"));
        // Non-ASCII digits must not sneak through a char-based digit test.
        assert!(!is_valid_cpf("٠١٦٥٨٧٣٩٠٦٠"));
    }

    #[test]
    fn check_digits_follow_the_rule() {
        // Every valid completion of a 9-digit prefix is accepted and no other one is.
        let prefix = "016587390";
        let valid: Vec<String> = (0..100)
            .map(|n| format!("{prefix}{n:02}"))
            .filter(|c| is_valid_cpf(c))
            .collect();
        assert_eq!(valid, vec!["01658739060".to_owned()]);
    }

    #[test]
    fn generated_numbers_are_valid_and_distinct() {
        assert_eq!(cpf_from_base(16_587_390).as_deref(), Some("01658739060"));
        assert_eq!(cpf_from_base(893_363_330).as_deref(), Some("89336333089"));
        assert_eq!(cpf_from_base(1_000_000_000), None);
        let some: Vec<String> = valid_cpfs().take(500).collect();
        assert!(some.iter().all(|c| is_valid_cpf(c)));
        let distinct: std::collections::HashSet<&String> = some.iter().collect();
        assert_eq!(distinct.len(), some.len());
    }

    #[test]
    fn scores_are_stable_and_in_range() {
        assert_eq!(score_for("01658739060"), score_for("01658739060"));
        for n in 0..2000u32 {
            let s = score_for(&format!("{n:011}"));
            assert!((300..=900).contains(&s));
        }
        assert_ne!(score_for("01658739060"), score_for("89336333089"));
    }
}
