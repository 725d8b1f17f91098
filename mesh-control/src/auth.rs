//! Secrets: generation, hashing (only hashes are stored), and the text
//! forms of enrollment keys, node credentials and admin tokens.
//!
//! - enrollment key: `mek1.<id>.<secret>.<ca-pin>`; agents parse it too, so
//!   its text form is `mesh_client::enrollment::EnrollmentKeyText`;
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

/// A new node credential and its hash.
#[must_use]
pub fn new_credential() -> (String, String) {
    let token = format!("mnc1.{}", secret(32));
    let hash = sha256_hex(token.as_bytes());
    (token, hash)
}

/// How long an admin token is valid unless its creator says otherwise
/// (the bootstrap token too): 90 days.
pub const ADMIN_TOKEN_LIFETIME_SECS: i64 = 90 * 86_400;

/// The longest an admin token may be valid: 2 years.
pub const ADMIN_TOKEN_MAX_SECS: i64 = 2 * 365 * 86_400;

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
    fn hashes_compare() {
        let h = sha256_hex(b"x");
        assert!(hash_eq(&h, &sha256_hex(b"x")));
        assert!(!hash_eq(&h, &sha256_hex(b"y")));
        assert!(!hash_eq(&h, "short"));
    }
}
