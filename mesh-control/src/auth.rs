//! Secrets: generation, hashing (only hashes are stored), and the text
//! forms of enrollment keys, node credentials and admin tokens.
//!
//! - enrollment key: `mek1.<id>.<secret>.<ca-pin>`; `<ca-pin>` is the hex
//!   SHA-256 of control's CA certificate (DER), which the agent pins;
//! - node credential: `mnc1.<secret>`;
//! - admin API token: `mat1.<id>.<secret>`.
//!
//! Secrets are 32 random bytes, base64url; stored as hex SHA-256 (they are
//! high-entropy, so a plain hash is enough: no password stretching needed).

use base64::Engine as _;
use rand::RngCore as _;
use sha2::{Digest as _, Sha256};

/// Hex SHA-256 of `data`.
#[must_use]
pub fn sha256_hex(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

/// A fresh random secret (base64url, no padding).
#[must_use]
pub fn secret(bytes: usize) -> String {
    let mut buf = vec![0; bytes];
    rand::rng().fill_bytes(&mut buf);
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(buf)
}

/// Compares two hashes in time independent of where they differ.
#[must_use]
pub fn hash_eq(a: &str, b: &str) -> bool {
    a.len() == b.len() && a.bytes().zip(b.bytes()).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// A parsed enrollment key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EnrollmentKeyText {
    /// Key id.
    pub id: String,
    /// The secret.
    pub secret: String,
    /// SHA-256 of the CA certificate to trust, if the key carries it.
    pub ca_pin: Option<[u8; 32]>,
}

impl EnrollmentKeyText {
    /// Parses `mek1.<id>.<secret>[.<ca-pin>]`.
    #[must_use]
    pub fn parse(s: &str) -> Option<Self> {
        let mut parts = s.trim().split('.');
        if parts.next()? != "mek1" {
            return None;
        }
        let id = parts.next()?.to_owned();
        let secret = parts.next()?.to_owned();
        let ca_pin = match parts.next() {
            Some(p) => Some(hex::decode(p).ok()?.try_into().ok()?),
            None => None,
        };
        if parts.next().is_some() || id.is_empty() || secret.is_empty() {
            return None;
        }
        Some(Self { id, secret, ca_pin })
    }

    /// The text form.
    #[must_use]
    pub fn to_text(&self) -> String {
        match &self.ca_pin {
            Some(pin) => format!("mek1.{}.{}.{}", self.id, self.secret, hex::encode(pin)),
            None => format!("mek1.{}.{}", self.id, self.secret),
        }
    }
}

/// A new node credential and its hash.
#[must_use]
pub fn new_credential() -> (String, String) {
    let token = format!("mnc1.{}", secret(32));
    let hash = sha256_hex(token.as_bytes());
    (token, hash)
}

/// A new admin token: (id, text, hash).
#[must_use]
pub fn new_admin_token() -> (String, String, String) {
    let id = secret(6);
    let token = format!("mat1.{id}.{}", secret(32));
    let hash = sha256_hex(token.as_bytes());
    (id, token, hash)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn enrollment_key_round_trip() {
        let k = EnrollmentKeyText { id: "abc".into(), secret: secret(32), ca_pin: Some([7; 32]) };
        assert_eq!(EnrollmentKeyText::parse(&k.to_text()), Some(k.clone()));
        let bare = EnrollmentKeyText { ca_pin: None, ..k };
        assert_eq!(EnrollmentKeyText::parse(&bare.to_text()), Some(bare));
        assert_eq!(EnrollmentKeyText::parse("mek2.a.b"), None);
        assert_eq!(EnrollmentKeyText::parse("mek1.a.b.zz"), None);
        assert_eq!(EnrollmentKeyText::parse("mek1.a"), None);
    }

    #[test]
    fn hashes_compare() {
        let h = sha256_hex(b"x");
        assert!(hash_eq(&h, &sha256_hex(b"x")));
        assert!(!hash_eq(&h, &sha256_hex(b"y")));
        assert!(!hash_eq(&h, "short"));
    }
}
