//! Stage 1 of a lookup: turn the raw query string into a [`LookupKey`] or say exactly what is
//! wrong with it.
//!
//! Nothing here allocates more than the client id it keeps, and nothing reaches the upstream
//! unless it passed these checks: a CPF that fails them costs no upstream budget.

use std::borrow::Cow;
use std::fmt;
use std::time::Duration;

use compact_str::CompactString;
use percent_encoding::percent_decode;

/// Longest client id accepted, in characters (all ASCII, so also bytes).
pub const MAX_CLIENT_ID_LEN: usize = 128;

/// A CPF that passed both check digits, kept as its 11 digits packed in an integer.
///
/// The integer form is what the cache keys on (8 bytes instead of a heap string) and what
/// the redactor hashes. `Display` gives back the 11 digits, leading zeros included.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Cpf(u64);

/// `Debug` never prints the number: a CPF is personal data and `{:?}` ends up in logs.
impl fmt::Debug for Cpf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Cpf(<redacted>)")
    }
}

impl fmt::Display for Cpf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:011}", self.0)
    }
}

/// Why a CPF was rejected. The variants are the `reason` label of the validation metrics,
/// so the set is small and fixed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CpfError {
    /// No `cpf` parameter, or an empty one.
    Missing,
    /// Not 11 digits, nor `XXX.XXX.XXX-XX`.
    Format,
    /// Well formed, but a check digit does not match.
    CheckDigits,
    /// All 11 digits the same: passes the arithmetic, never issued.
    Repeated,
}

impl CpfError {
    pub fn message(self) -> &'static str {
        match self {
            CpfError::Missing => "the cpf parameter is required",
            CpfError::Format => "cpf must be 11 digits or formatted as XXX.XXX.XXX-XX",
            CpfError::CheckDigits => "cpf check digits do not match",
            CpfError::Repeated => "cpf with all digits equal is not valid",
        }
    }
}

impl Cpf {
    /// Parses `01658739060` or `016.587.390-60`; nothing else (no spaces, no other separators).
    pub fn parse(input: &str) -> Result<Cpf, CpfError> {
        let bytes = input.as_bytes();
        if bytes.is_empty() {
            return Err(CpfError::Missing);
        }
        let mut digits = [0u8; 11];
        match bytes.len() {
            11 => {
                for (slot, &b) in digits.iter_mut().zip(bytes) {
                    *slot = ascii_digit(b)?;
                }
            }
            14 => {
                // Positions 3 and 7 hold '.', 11 holds '-'; the rest are the digits.
                let mut next = 0;
                for (i, &b) in bytes.iter().enumerate() {
                    match i {
                        3 | 7 if b == b'.' => {}
                        11 if b == b'-' => {}
                        3 | 7 | 11 => return Err(CpfError::Format),
                        _ => {
                            digits[next] = ascii_digit(b)?;
                            next += 1;
                        }
                    }
                }
            }
            _ => return Err(CpfError::Format),
        }
        Cpf::from_digits(digits)
    }

    fn from_digits(d: [u8; 11]) -> Result<Cpf, CpfError> {
        if d[9] != check_digit(&d[..9]) || d[10] != check_digit(&d[..10]) {
            return Err(CpfError::CheckDigits);
        }
        if d.iter().all(|&x| x == d[0]) {
            return Err(CpfError::Repeated);
        }
        Ok(Cpf(d.iter().fold(0u64, |acc, &x| acc * 10 + u64::from(x))))
    }

    /// The packed number (for hashing and compact storage).
    pub fn as_u64(self) -> u64 {
        self.0
    }

    /// Builds a valid CPF from its first nine digits (0..=999_999_999) by computing the
    /// check digits. Tests, the load generator and the benchmarks use it to make as many
    /// distinct valid numbers as they need. Returns `None` for the all-same-digit numbers.
    pub fn from_base(base: u32) -> Option<Cpf> {
        if base > 999_999_999 {
            return None;
        }
        let mut d = [0u8; 11];
        let mut n = base;
        for slot in d[..9].iter_mut().rev() {
            *slot = (n % 10) as u8;
            n /= 10;
        }
        d[9] = check_digit(&d[..9]);
        d[10] = check_digit(&d[..10]);
        Cpf::from_digits(d).ok()
    }
}

fn ascii_digit(b: u8) -> Result<u8, CpfError> {
    if b.is_ascii_digit() {
        Ok(b - b'0')
    } else {
        Err(CpfError::Format)
    }
}

/// Mod-11 check digit over `digits` with weights `len+1 .. 2`.
fn check_digit(digits: &[u8]) -> u8 {
    let weight_start = digits.len() as u32 + 1;
    let sum: u32 = digits
        .iter()
        .enumerate()
        .map(|(i, &d)| u32::from(d) * (weight_start - i as u32))
        .sum();
    let r = (sum * 10) % 11;
    if r == 10 { 0 } else { r as u8 }
}

/// A validated client id: 1..=128 printable ASCII characters (it travels to the upstream as
/// an HTTP header value, which is why non-ASCII is refused rather than mangled).
///
/// Stored inline up to 24 bytes (client ids are short), so neither a lookup nor a cache
/// entry allocates for it; longer ones go to the heap.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ClientId(CompactString);

impl fmt::Debug for ClientId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ClientId(<redacted>)")
    }
}

/// Why a client id was rejected (also the `reason` label of the validation metrics).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientIdError {
    /// Absent or empty, and no default client id is configured.
    Missing,
    TooLong,
    /// A character outside printable ASCII (0x20..=0x7E).
    Unprintable,
}

impl ClientIdError {
    pub fn message(self) -> &'static str {
        match self {
            ClientIdError::Missing => {
                "the client_id parameter is required (no default client id is configured)"
            }
            ClientIdError::TooLong => "client_id must be at most 128 characters",
            ClientIdError::Unprintable => "client_id must be printable ASCII characters",
        }
    }
}

impl ClientId {
    pub fn parse(input: &str) -> Result<ClientId, ClientIdError> {
        if input.is_empty() {
            return Err(ClientIdError::Missing);
        }
        if input.len() > MAX_CLIENT_ID_LEN {
            return Err(ClientIdError::TooLong);
        }
        if !input.bytes().all(|b| (0x20..=0x7e).contains(&b)) {
            return Err(ClientIdError::Unprintable);
        }
        Ok(ClientId(CompactString::from(input)))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// What a lookup is about: the cache key, the coalescing key and the unit of fairness all
/// start from here. Keying on both halves is what keeps one client from ever receiving an
/// answer that was fetched with another client's id.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct LookupKey {
    pub client_id: ClientId,
    pub cpf: Cpf,
}

/// Everything that can be wrong with a `/proxy/score` query.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueryError {
    Cpf(CpfError),
    ClientId(ClientIdError),
    /// A parameter given twice (`cpf=1&cpf=2`): which one was meant is a guess we refuse to make.
    Repeated(&'static str),
    /// Percent-decoding produced bytes that are not UTF-8.
    NotUtf8(&'static str),
    /// The `X-Queue-Timeout` header is not a number of seconds in range.
    QueueTimeout,
}

/// Why a query was refused, flattened to one level: the `reason` label of the validation
/// metrics is the variant's name in snake case, and `VARIANTS` (from [`strum::VariantNames`])
/// lists every value so that metrics can pre-register them at zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq, strum::IntoStaticStr, strum::VariantNames)]
#[strum(serialize_all = "snake_case")]
pub enum QueryReason {
    CpfMissing,
    CpfFormat,
    CpfCheckDigits,
    CpfRepeatedDigits,
    ClientIdMissing,
    ClientIdTooLong,
    ClientIdUnprintable,
    RepeatedParameter,
    NotUtf8,
    QueueTimeoutHeader,
}

impl QueryError {
    /// The `reason` label value: stable, small set.
    pub fn reason(self) -> &'static str {
        self.why().into()
    }

    /// Which of the fixed reasons this is (the parameter names the variants carry are left out).
    pub fn why(self) -> QueryReason {
        match self {
            QueryError::Cpf(CpfError::Missing) => QueryReason::CpfMissing,
            QueryError::Cpf(CpfError::Format) => QueryReason::CpfFormat,
            QueryError::Cpf(CpfError::CheckDigits) => QueryReason::CpfCheckDigits,
            QueryError::Cpf(CpfError::Repeated) => QueryReason::CpfRepeatedDigits,
            QueryError::ClientId(ClientIdError::Missing) => QueryReason::ClientIdMissing,
            QueryError::ClientId(ClientIdError::TooLong) => QueryReason::ClientIdTooLong,
            QueryError::ClientId(ClientIdError::Unprintable) => QueryReason::ClientIdUnprintable,
            QueryError::Repeated(_) => QueryReason::RepeatedParameter,
            QueryError::NotUtf8(_) => QueryReason::NotUtf8,
            QueryError::QueueTimeout => QueryReason::QueueTimeoutHeader,
        }
    }

    pub fn message(self) -> String {
        match self {
            QueryError::Cpf(e) => e.message().to_owned(),
            QueryError::ClientId(e) => e.message().to_owned(),
            QueryError::Repeated(name) => format!("the {name} parameter is given more than once"),
            QueryError::NotUtf8(name) => format!("the {name} parameter is not valid UTF-8"),
            QueryError::QueueTimeout => format!(
                "the {QUEUE_TIMEOUT_HEADER} header must be a number of seconds from 0.001 to \
                 3600 (e.g. 2 or 0.5)"
            ),
        }
    }
}

/// The request header with which a client shortens its own lookup's queue timeout.
pub const QUEUE_TIMEOUT_HEADER: &str = "X-Queue-Timeout";

/// Parses an `X-Queue-Timeout` header: decimal seconds, from 1 ms to an hour. A client that
/// will give up after a few seconds says so, and a lookup that could not start in that time
/// is refused at once (`503 deadline_unreachable`) instead of being queued for nothing.
pub fn parse_queue_timeout(value: &[u8]) -> Result<Duration, QueryError> {
    let text = std::str::from_utf8(value).map_err(|_| QueryError::QueueTimeout)?;
    let text = text.trim();
    // Plain decimals only: no signs, exponents, "inf" or "NaN".
    if text.is_empty()
        || !text.bytes().all(|b| b.is_ascii_digit() || b == b'.')
        || text.bytes().filter(|&b| b == b'.').count() > 1
        || text.starts_with('.')
        || text.ends_with('.')
    {
        return Err(QueryError::QueueTimeout);
    }
    let seconds: f64 = text.parse().map_err(|_| QueryError::QueueTimeout)?;
    if !(0.001..=3600.0).contains(&seconds) {
        return Err(QueryError::QueueTimeout);
    }
    Ok(Duration::from_secs_f64(seconds))
}

/// Parses the raw query string of `/proxy/score`.
///
/// Unknown parameters are ignored (scripts written for the original sometimes add their own),
/// but `cpf` and `client_id` must appear at most once each. `default_client_id` stands in
/// for an absent or empty `client_id`, as the original's `CLIENT_ID` setting did.
pub fn parse_lookup(
    raw_query: Option<&str>,
    default_client_id: Option<&ClientId>,
) -> Result<LookupKey, QueryError> {
    let mut cpf_raw: Option<Cow<'_, str>> = None;
    let mut client_raw: Option<Cow<'_, str>> = None;
    for pair in raw_query.unwrap_or("").split('&') {
        if pair.is_empty() {
            continue;
        }
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        let (slot, label) = match &*decode(name, "parameter name")? {
            "cpf" => (&mut cpf_raw, "cpf"),
            "client_id" => (&mut client_raw, "client_id"),
            _ => continue,
        };
        if slot.is_some() {
            return Err(QueryError::Repeated(label));
        }
        *slot = Some(decode(value, label)?);
    }

    let cpf = Cpf::parse(cpf_raw.as_deref().unwrap_or("")).map_err(QueryError::Cpf)?;
    let client_id = match client_raw.as_deref() {
        None | Some("") => default_client_id
            .cloned()
            .ok_or(QueryError::ClientId(ClientIdError::Missing))?,
        Some(raw) => ClientId::parse(raw).map_err(QueryError::ClientId)?,
    };
    Ok(LookupKey { client_id, cpf })
}

/// `application/x-www-form-urlencoded` decoding: `+` is a space, `%XX` a byte. Borrows
/// when there is nothing to decode (the usual case), so a plain query allocates nothing.
fn decode<'a>(raw: &'a str, label: &'static str) -> Result<Cow<'a, str>, QueryError> {
    if !raw.bytes().any(|b| b == b'%' || b == b'+') {
        return Ok(Cow::Borrowed(raw));
    }
    let spaced = raw.replace('+', " ");
    percent_decode(spaced.as_bytes())
        .decode_utf8()
        .map(|s| Cow::Owned(s.into_owned()))
        .map_err(|_| QueryError::NotUtf8(label))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_numbers() {
        assert_eq!(
            Cpf::parse("01658739060").unwrap().to_string(),
            "01658739060"
        );
        assert_eq!(
            Cpf::parse("89336333089").unwrap().to_string(),
            "89336333089"
        );
        assert_eq!(
            Cpf::parse("893.363.330-89").unwrap().to_string(),
            "89336333089"
        );
        assert_eq!(Cpf::parse("12345678900"), Err(CpfError::CheckDigits));
        assert_eq!(Cpf::parse("11111111111"), Err(CpfError::Repeated));
        assert_eq!(Cpf::parse("00000000000"), Err(CpfError::Repeated));
        assert_eq!(Cpf::parse(""), Err(CpfError::Missing));
        assert_eq!(Cpf::parse("8933633308"), Err(CpfError::Format));
        assert_eq!(Cpf::parse("893.363.330.89"), Err(CpfError::Format));
        assert_eq!(Cpf::parse("893-363-330-89"), Err(CpfError::Format));
        assert_eq!(Cpf::parse("8933633308a"), Err(CpfError::Format));
        assert_eq!(Cpf::parse("89336333089 "), Err(CpfError::Format));
        assert_eq!(Cpf::parse("８9336333089"), Err(CpfError::Format));
    }

    #[test]
    fn from_base_makes_valid_numbers() {
        assert_eq!(
            Cpf::from_base(16_587_390).unwrap().to_string(),
            "01658739060"
        );
        assert_eq!(
            Cpf::from_base(893_363_330).unwrap().to_string(),
            "89336333089"
        );
        assert_eq!(Cpf::from_base(111_111_111), None);
        assert_eq!(Cpf::from_base(1_000_000_000), None);
    }

    #[test]
    fn debug_never_shows_the_number() {
        let key = parse_lookup(Some("cpf=89336333089&client_id=secret-client"), None).unwrap();
        let shown = format!("{key:?}");
        assert!(!shown.contains("89336333089"), "{shown}");
        assert!(!shown.contains("secret-client"), "{shown}");
    }

    #[test]
    fn query_parsing() {
        let key = parse_lookup(Some("cpf=893.363.330-89&client_id=000"), None).unwrap();
        assert_eq!(key.cpf.to_string(), "89336333089");
        assert_eq!(key.client_id.as_str(), "000");

        let encoded =
            parse_lookup(Some("cpf=893%2E363%2E330%2D89&client_id=a+b%21"), None).unwrap();
        assert_eq!(encoded.client_id.as_str(), "a b!");
        assert_eq!(encoded.cpf.to_string(), "89336333089");

        // Extra parameters are ignored, repeated ones are refused.
        assert!(parse_lookup(Some("cpf=89336333089&client_id=1&x=y"), None).is_ok());
        assert_eq!(
            parse_lookup(Some("cpf=89336333089&cpf=01658739060&client_id=1"), None),
            Err(QueryError::Repeated("cpf"))
        );
        // An injection attempt stays inside the cpf value and fails its format check.
        assert_eq!(
            parse_lookup(Some("cpf=89336333089%26x%3Dy&client_id=1"), None),
            Err(QueryError::Cpf(CpfError::Format))
        );
        assert_eq!(
            parse_lookup(Some("cpf=%FF&client_id=1"), None),
            Err(QueryError::NotUtf8("cpf"))
        );
        assert_eq!(
            parse_lookup(None, None),
            Err(QueryError::Cpf(CpfError::Missing))
        );
    }

    #[test]
    fn client_id_rules_and_default() {
        let default = ClientId::parse("fallback").unwrap();
        let key = parse_lookup(Some("cpf=89336333089&client_id="), Some(&default)).unwrap();
        assert_eq!(key.client_id.as_str(), "fallback");
        let key = parse_lookup(Some("cpf=89336333089"), Some(&default)).unwrap();
        assert_eq!(key.client_id.as_str(), "fallback");
        assert_eq!(
            parse_lookup(Some("cpf=89336333089"), None),
            Err(QueryError::ClientId(ClientIdError::Missing))
        );
        let long = "x".repeat(129);
        assert_eq!(
            parse_lookup(Some(&format!("cpf=89336333089&client_id={long}")), None),
            Err(QueryError::ClientId(ClientIdError::TooLong))
        );
        assert!(ClientId::parse(&"x".repeat(128)).is_ok());
        assert_eq!(
            parse_lookup(Some("cpf=89336333089&client_id=a%0Ab"), None),
            Err(QueryError::ClientId(ClientIdError::Unprintable))
        );
        assert_eq!(ClientId::parse("café"), Err(ClientIdError::Unprintable));
    }
}
