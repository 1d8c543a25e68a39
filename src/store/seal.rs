//! Personal data at rest: what a stored record looks like, and the keys that protect it.
//!
//! A CPF with its score is personal data (LGPD), and the store outlives the process, so the
//! file never holds a CPF or a client id in clear:
//! - a record's **row key** is a keyed BLAKE3 hash of (client id, CPF), so rows can be
//!   replaced and deleted without knowing whose they are;
//! - its **value** is the fetch time (Unix milliseconds, in clear: compaction reads it
//!   without the key), a random 192-bit nonce, and the lookup key with the upstream's body
//!   sealed with XChaCha20-Poly1305 (RustCrypto). The row key and the fetch time are the
//!   associated data, so a sealed body cannot be moved to another row or made to look
//!   younger than it is.
//!
//! The three keys in use (hashing, sealing, and the check value that tells a wrong data key
//! from a corrupt file) are derived from the one data key with BLAKE3's key derivation, each
//! under a context string of its own: learning one tells nothing about the others.

use std::fmt;

use bytes::Bytes;
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};

use crate::lookup::validation::{ClientId, Cpf, LookupKey};

/// Bytes in a data key.
pub(crate) const KEY_LEN: usize = 32;
const NONCE_LEN: usize = 24;
const TIME_LEN: usize = 8;
/// The smallest sealed record: a time, a nonce and an empty message's tag.
const MIN_RECORD: usize = TIME_LEN + NONCE_LEN + 16;

/// A row key: the keyed hash of (client id, CPF).
pub(crate) type RowKey = [u8; 32];

/// The secret the store's keys are derived from (`--data-key`, or generated on first start).
#[derive(Clone, PartialEq, Eq)]
pub struct DataKey(pub(crate) [u8; KEY_LEN]);

/// A key never prints: `{:?}` ends up in logs.
impl fmt::Debug for DataKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("DataKey(<redacted>)")
    }
}

impl DataKey {
    /// Reads a key given as 64 hex digits or as base64 (standard or URL-safe alphabet,
    /// padded or not) of 32 bytes; the message never quotes the text (it is a secret).
    pub(crate) fn parse(raw: &str) -> Result<DataKey, String> {
        use base64::Engine;
        use base64::engine::general_purpose::{
            STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD,
        };
        let raw = raw.trim();
        let bytes = if raw.len() == 2 * KEY_LEN && raw.bytes().all(|b| b.is_ascii_hexdigit()) {
            (0..KEY_LEN)
                .map(|i| u8::from_str_radix(&raw[2 * i..2 * i + 2], 16))
                .collect::<Result<Vec<u8>, _>>()
                .map_err(|_| "is not hex".to_owned())?
        } else {
            [STANDARD, URL_SAFE, STANDARD_NO_PAD, URL_SAFE_NO_PAD]
                .iter()
                .find_map(|engine| engine.decode(raw).ok())
                .ok_or_else(|| {
                    format!(
                        "is neither {} hex digits nor base64 (a key of {KEY_LEN} random \
                         bytes: `openssl rand -hex {KEY_LEN}`)",
                        2 * KEY_LEN
                    )
                })?
        };
        let key: [u8; KEY_LEN] = bytes.as_slice().try_into().map_err(|_| {
            format!(
                "is {} bytes long, not {KEY_LEN} (`openssl rand -hex {KEY_LEN}` makes one)",
                bytes.len()
            )
        })?;
        Ok(DataKey(key))
    }

    /// A fresh key from the operating system's random source.
    pub(crate) fn generate() -> std::io::Result<DataKey> {
        let mut key = [0u8; KEY_LEN];
        getrandom::fill(&mut key).map_err(std::io::Error::other)?;
        Ok(DataKey(key))
    }

    /// The key as the key file holds it: 64 hex digits.
    pub(crate) fn to_hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }
}

/// The keys derived from a data key, and the cipher.
pub(crate) struct Sealer {
    hash_key: [u8; 32],
    check: [u8; 32],
    cipher: XChaCha20Poly1305,
}

/// Why a stored record could not be read back (counted, then skipped).
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Unsealable {
    /// Too short to be a record, or its plaintext is not a lookup key and a body.
    Malformed,
    /// The tag does not verify: another key, another row, or altered bytes.
    Forged,
}

/// A record read back.
#[derive(Debug)]
pub(crate) struct Unsealed {
    pub(crate) key: LookupKey,
    pub(crate) body: Bytes,
    pub(crate) fetched_ms: u64,
}

impl Sealer {
    pub(crate) fn new(key: &DataKey) -> Sealer {
        let seal_key = blake3::derive_key("score-proxy store v1 record seal", &key.0);
        Sealer {
            hash_key: blake3::derive_key("score-proxy store v1 row key", &key.0),
            check: blake3::derive_key("score-proxy store v1 key check", &key.0),
            cipher: XChaCha20Poly1305::new_from_slice(&seal_key)
                .expect("a 32-byte key is the cipher's key size"),
        }
    }

    /// A value that only this data key produces, stored once per file: a file whose value
    /// differs was written under another key (and is moved aside, not read as garbage).
    pub(crate) fn key_check(&self) -> [u8; 32] {
        self.check
    }

    /// The row key for (client id, CPF). The client id is length-prefixed, so no two
    /// (client id, CPF) pairs hash the same input.
    pub(crate) fn row_key(&self, key: &LookupKey) -> RowKey {
        let client = key.client_id.as_str().as_bytes();
        let mut hasher = blake3::Hasher::new_keyed(&self.hash_key);
        hasher.update(&(client.len() as u64).to_le_bytes());
        hasher.update(client);
        hasher.update(&key.cpf.as_u64().to_le_bytes());
        *hasher.finalize().as_bytes()
    }

    /// Seals one answer under a fresh random nonce.
    pub(crate) fn seal(
        &self,
        row: &RowKey,
        fetched_ms: u64,
        key: &LookupKey,
        body: &[u8],
    ) -> std::io::Result<Vec<u8>> {
        let client = key.client_id.as_str().as_bytes();
        let mut plain = Vec::with_capacity(8 + 2 + client.len() + body.len());
        plain.extend_from_slice(&key.cpf.as_u64().to_le_bytes());
        plain.extend_from_slice(&(client.len() as u16).to_le_bytes());
        plain.extend_from_slice(client);
        plain.extend_from_slice(body);
        let mut nonce = [0u8; NONCE_LEN];
        getrandom::fill(&mut nonce).map_err(std::io::Error::other)?;
        let time = fetched_ms.to_le_bytes();
        let sealed = self
            .cipher
            .encrypt(
                &XNonce::from(nonce),
                Payload {
                    msg: &plain,
                    aad: &aad(row, &time),
                },
            )
            .map_err(|_| std::io::Error::other("sealing failed"))?;
        let mut record = Vec::with_capacity(TIME_LEN + NONCE_LEN + sealed.len());
        record.extend_from_slice(&time);
        record.extend_from_slice(&nonce);
        record.extend_from_slice(&sealed);
        Ok(record)
    }

    /// Opens a record found under `row`.
    pub(crate) fn open(&self, row: &[u8], record: &[u8]) -> Result<Unsealed, Unsealable> {
        let fetched_ms = fetched_ms(record).ok_or(Unsealable::Malformed)?;
        let row: &RowKey = row.try_into().map_err(|_| Unsealable::Malformed)?;
        let (time, rest) = record.split_at(TIME_LEN);
        let (nonce, sealed) = rest.split_at(NONCE_LEN);
        let nonce: [u8; NONCE_LEN] = nonce.try_into().expect("split at the nonce's length");
        let plain = self
            .cipher
            .decrypt(
                &XNonce::from(nonce),
                Payload {
                    msg: sealed,
                    aad: &aad(row, time),
                },
            )
            .map_err(|_| Unsealable::Forged)?;
        let key = lookup_key(&plain).ok_or(Unsealable::Malformed)?;
        let body_at = 8 + 2 + key.client_id.as_str().len();
        Ok(Unsealed {
            key,
            body: Bytes::copy_from_slice(&plain[body_at..]),
            fetched_ms,
        })
    }
}

impl Sealer {
    /// Seals `plain` (a job's record) under a fresh nonce, bound to `aad` (its table and row):
    /// nonce, then ciphertext and tag.
    pub(crate) fn seal_blob(&self, aad: &[u8], plain: &[u8]) -> std::io::Result<Vec<u8>> {
        let mut nonce = [0u8; NONCE_LEN];
        getrandom::fill(&mut nonce).map_err(std::io::Error::other)?;
        let sealed = self
            .cipher
            .encrypt(&XNonce::from(nonce), Payload { msg: plain, aad })
            .map_err(|_| std::io::Error::other("sealing failed"))?;
        let mut record = Vec::with_capacity(NONCE_LEN + sealed.len());
        record.extend_from_slice(&nonce);
        record.extend_from_slice(&sealed);
        Ok(record)
    }

    /// Opens what [`Sealer::seal_blob`] sealed under the same `aad`.
    pub(crate) fn open_blob(&self, aad: &[u8], record: &[u8]) -> Result<Vec<u8>, Unsealable> {
        if record.len() < NONCE_LEN + 16 {
            return Err(Unsealable::Malformed);
        }
        let (nonce, sealed) = record.split_at(NONCE_LEN);
        let nonce: [u8; NONCE_LEN] = nonce.try_into().expect("split at the nonce's length");
        self.cipher
            .decrypt(&XNonce::from(nonce), Payload { msg: sealed, aad })
            .map_err(|_| Unsealable::Forged)
    }
}

/// The fetch time of a record, read without the key (compaction needs nothing else).
pub(crate) fn fetched_ms(record: &[u8]) -> Option<u64> {
    if record.len() < MIN_RECORD {
        return None;
    }
    Some(u64::from_le_bytes(record[..TIME_LEN].try_into().ok()?))
}

fn aad(row: &RowKey, time: &[u8]) -> Vec<u8> {
    let mut aad = Vec::with_capacity(row.len() + time.len());
    aad.extend_from_slice(row);
    aad.extend_from_slice(time);
    aad
}

/// The lookup key at the head of a record's plaintext, validated as a request's would be.
fn lookup_key(plain: &[u8]) -> Option<LookupKey> {
    let cpf = u64::from_le_bytes(plain.get(..8)?.try_into().ok()?);
    let len = u16::from_le_bytes(plain.get(8..10)?.try_into().ok()?) as usize;
    let client = std::str::from_utf8(plain.get(10..10 + len)?).ok()?;
    Some(LookupKey {
        client_id: ClientId::parse(client).ok()?,
        cpf: Cpf::parse(&format!("{cpf:011}")).ok()?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lookup::validation::parse_lookup;

    fn key(q: &str) -> LookupKey {
        parse_lookup(Some(q), None).unwrap()
    }

    fn sealer(byte: u8) -> Sealer {
        Sealer::new(&DataKey([byte; KEY_LEN]))
    }

    #[test]
    fn a_record_round_trips_and_holds_nothing_in_clear() {
        let s = sealer(7);
        let k = key("cpf=89336333089&client_id=acme-corp");
        let row = s.row_key(&k);
        let record = s
            .seal(&row, 1_700_000_000_000, &k, br#"{"score":712}"#)
            .unwrap();
        for clear in [&b"89336333089"[..], b"acme-corp", b"712"] {
            assert!(
                !record.windows(clear.len()).any(|w| w == clear),
                "{clear:?} in clear"
            );
            assert!(!row.windows(clear.len()).any(|w| w == clear));
        }
        let back = s.open(&row, &record).unwrap();
        assert_eq!(back.key, k);
        assert_eq!(back.body, &br#"{"score":712}"#[..]);
        assert_eq!(back.fetched_ms, 1_700_000_000_000);
        // A fresh nonce each time: the same answer never seals to the same bytes.
        assert_ne!(
            record,
            s.seal(&row, 1_700_000_000_000, &k, br#"{"score":712}"#)
                .unwrap()
        );
    }

    #[test]
    fn another_key_another_row_or_a_changed_byte_does_not_open() {
        let s = sealer(7);
        let k = key("cpf=89336333089&client_id=a");
        let other = key("cpf=89336333089&client_id=b");
        let row = s.row_key(&k);
        let record = s.seal(&row, 42, &k, b"{}").unwrap();
        assert!(matches!(
            sealer(8).open(&row, &record),
            Err(Unsealable::Forged)
        ));
        assert!(matches!(
            s.open(&s.row_key(&other), &record),
            Err(Unsealable::Forged)
        ));
        // The fetch time is authenticated: a record cannot be made younger.
        let mut younger = record.clone();
        younger[0] ^= 1;
        assert!(matches!(s.open(&row, &younger), Err(Unsealable::Forged)));
        let mut flipped = record.clone();
        *flipped.last_mut().unwrap() ^= 1;
        assert!(matches!(s.open(&row, &flipped), Err(Unsealable::Forged)));
        assert!(matches!(
            s.open(&row, &record[..20]),
            Err(Unsealable::Malformed)
        ));
        assert!(matches!(
            s.open(&row[..5], &record),
            Err(Unsealable::Malformed)
        ));
    }

    #[test]
    fn row_keys_depend_on_the_client_the_cpf_and_the_data_key() {
        let s = sealer(1);
        let a = s.row_key(&key("cpf=89336333089&client_id=a"));
        assert_eq!(a, s.row_key(&key("cpf=893.363.330-89&client_id=a")));
        assert_ne!(a, s.row_key(&key("cpf=89336333089&client_id=b")));
        assert_ne!(a, s.row_key(&key("cpf=01658739060&client_id=a")));
        assert_ne!(a, sealer(2).row_key(&key("cpf=89336333089&client_id=a")));
        assert_ne!(sealer(1).key_check(), sealer(2).key_check());
    }

    #[test]
    fn keys_parse_from_hex_or_base64_of_32_bytes() {
        let hex = "00112233445566778899aabbccddeeff00112233445566778899AABBCCDDEEFF";
        let key = DataKey::parse(hex).unwrap();
        assert_eq!(key.0[1], 0x11);
        assert_eq!(key.to_hex(), hex.to_ascii_lowercase());
        assert_eq!(DataKey::parse(&format!(" {hex}\n")).unwrap(), key);
        use base64::Engine;
        for engine in [
            base64::engine::general_purpose::STANDARD,
            base64::engine::general_purpose::URL_SAFE_NO_PAD,
        ] {
            assert_eq!(DataKey::parse(&engine.encode(key.0)).unwrap(), key);
        }
        let short = DataKey::parse("00112233").unwrap_err();
        assert!(short.contains("6 bytes long, not 32"), "{short}");
        let garbage = DataKey::parse("not a key at all!").unwrap_err();
        assert!(
            garbage.contains("neither 64 hex digits nor base64"),
            "{garbage}"
        );
        assert!(!garbage.contains("not a key"), "a secret is never quoted");
        assert!(DataKey::parse("").is_err());
    }

    #[test]
    fn keys_are_random_and_never_printed() {
        let a = DataKey::generate().unwrap();
        assert_ne!(a, DataKey::generate().unwrap());
        assert_eq!(a.to_hex().len(), 64);
        assert_eq!(format!("{a:?}"), "DataKey(<redacted>)");
    }
}
