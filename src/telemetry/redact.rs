//! Pseudonyms for personal data: what logs and spans carry instead of a CPF or a client id.
//!
//! A CPF is personal data under Brazil's LGPD, and there are only about 10^9 valid ones, so a
//! plain hash could be reversed by trying them all. A *keyed* hash (BLAKE3 keyed with 32 secret
//! bytes) cannot be, without the key. The key is random per process unless
//! `SCORE_PROXY_REDACTION_KEY` sets one, which operators do when they want the same CPF to
//! carry the same tag across replicas and restarts (to follow one lookup through several logs).
//!
//! Tags are 12 hex digits (48 bits): plenty to tell lookups apart in a trace, short enough to
//! read.

use std::sync::OnceLock;

use crate::lookup::validation::{ClientId, Cpf};

static KEY: OnceLock<[u8; 32]> = OnceLock::new();

pub(crate) const HEX: &[u8; 16] = b"0123456789abcdef";

/// Sets the redaction key from a secret string. Only the first call has an effect; it must
/// come before the first tag is computed (start-up does this before serving).
pub(crate) fn set_key(secret: &str) {
    let _ = KEY.set(blake3::derive_key(
        "score-proxy redaction key v1",
        secret.as_bytes(),
    ));
}

fn key() -> &'static [u8; 32] {
    KEY.get_or_init(|| {
        let mut key = [0u8; 32];
        getrandom::fill(&mut key).expect("the OS random source is available");
        key
    })
}

fn tag(domain: u8, data: &[u8]) -> String {
    let mut hasher = blake3::Hasher::new_keyed(key());
    hasher.update(&[domain]);
    hasher.update(data);
    let hash = hasher.finalize();
    let mut out = String::with_capacity(12);
    for b in &hash.as_bytes()[..6] {
        out.push(char::from(HEX[usize::from(b >> 4)]));
        out.push(char::from(HEX[usize::from(b & 0xf)]));
    }
    out
}

/// The pseudonym of a CPF in logs and spans.
pub(crate) fn cpf(cpf: Cpf) -> String {
    tag(b'c', &cpf.as_u64().to_le_bytes())
}

/// The pseudonym of a client id in logs and spans.
pub fn client(id: &ClientId) -> String {
    tag(b'k', id.as_str().as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_are_stable_distinct_and_reveal_nothing() {
        let a = Cpf::parse("89336333089").unwrap();
        let b = Cpf::parse("01658739060").unwrap();
        assert_eq!(cpf(a), cpf(a));
        assert_ne!(cpf(a), cpf(b));
        assert_eq!(cpf(a).len(), 12);
        assert!(!cpf(a).contains("89336333089"));
        let id = ClientId::parse("000").unwrap();
        // The same bytes in another domain give another tag.
        assert_ne!(client(&id), tag(b'c', b"000"));
    }
}
