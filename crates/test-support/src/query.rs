//! The reference model of the `/proxy/score` query: what `score_validation::parse_lookup`
//! should answer, written from the rules in `docs/upstream.md` and the README (form decoding by
//! hand, parameters left to right, a repeated `cpf` or `client_id` refused) on top of the
//! CPF model in [`crate::cpf`].
//!
//! The property tests and the fuzz target both compare the parser with it; it used to be
//! written twice, once in each.

use score_validation::{ClientIdError, QueryError};

use crate::cpf;

/// What `ClientId::parse` should say: the id, or why not (1..=128 printable ASCII).
pub fn client_id(s: &str) -> Result<String, ClientIdError> {
    if s.is_empty() {
        Err(ClientIdError::Missing)
    } else if s.len() > 128 {
        // Counted in bytes: the id travels as an HTTP header value. Only the reason given
        // for a long non-ASCII id depends on it; both reasons refuse.
        Err(ClientIdError::TooLong)
    } else if !s.bytes().all(|b| (0x20..=0x7e).contains(&b)) {
        Err(ClientIdError::Unprintable)
    } else {
        Ok(s.to_owned())
    }
}

/// Form decoding: `+` is a space, `%` and two hex digits a byte, anything else itself (a
/// `%` not followed by two hex digits included); the bytes must be UTF-8.
pub fn form_decode(raw: &str) -> Option<String> {
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

/// The query's `name=value` pairs, raw (a pair without `=` has an empty value; empty pairs
/// are skipped).
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

/// What `parse_lookup` should answer: `(cpf digits, client id)` or the error, with the
/// documented precedence (parameters left to right; a bad name or a repeated or undecodable
/// `cpf`/`client_id` stops there; then the cpf; then the client id).
pub fn parse_lookup(
    query: Option<&str>,
    default: Option<&str>,
) -> Result<(String, String), QueryError> {
    let mut cpf: Option<String> = None;
    let mut client: Option<String> = None;
    for (name, value) in pairs(query.unwrap_or("")) {
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
    let cpf = cpf::parse_cpf(cpf.as_deref().unwrap_or("")).map_err(QueryError::Cpf)?;
    let client = match client.as_deref() {
        None | Some("") => default
            .map(str::to_owned)
            .ok_or(QueryError::ClientId(ClientIdError::Missing))?,
        Some(raw) => client_id(raw).map_err(QueryError::ClientId)?,
    };
    Ok((cpf, client))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decoding_and_precedence() {
        assert_eq!(form_decode("a+b%21%zz%4").as_deref(), Some("a b!%zz%4"));
        assert_eq!(form_decode("%FF"), None);
        assert_eq!(
            parse_lookup(Some("c%70f=893.363.330-89&client_id=a+b"), None),
            Ok(("89336333089".to_owned(), "a b".to_owned()))
        );
        assert_eq!(
            parse_lookup(Some("cpf=1&cpf=2"), None),
            Err(QueryError::Repeated("cpf"))
        );
        assert_eq!(
            parse_lookup(Some("cpf=89336333089"), Some("d")),
            Ok(("89336333089".to_owned(), "d".to_owned()))
        );
        assert_eq!(count_names("cpf&c%70f=1&client_id"), (2, 1));
    }
}
