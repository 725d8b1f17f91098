//! The attach credential: a short-lived ticket, signed by control, that
//! names the WireGuard public key a node may attach to the relay as.
//!
//! Wire form (113 bytes):
//!
//! | bytes | field                                                    |
//! |-------|----------------------------------------------------------|
//! | 1     | version, [`VERSION`]                                     |
//! | 32    | the node's WireGuard public key                          |
//! | 8     | node id, big-endian                                      |
//! | 8     | expiry, Unix seconds, big-endian (signed)                |
//! | 64    | Ed25519 signature over [`CONTEXT`] followed by the above |
//!
//! The context prefix keeps a ticket signature from ever being valid for
//! anything else the same key signs (and the reverse). The relay holds only
//! the signing keys' public halves, so a compromised relay cannot mint
//! tickets.

use base64::{Engine as _, engine::general_purpose::STANDARD};
use ring::{
    rand::SystemRandom,
    signature::{ED25519, Ed25519KeyPair, KeyPair as _, UnparsedPublicKey},
};

/// The only ticket version this code reads and writes.
pub const VERSION: u8 = 1;
/// Prefixed to the signed bytes (domain separation).
pub const CONTEXT: &[u8] = b"meshgate relay ticket v1";
/// The signed part: version, key, node id, expiry.
const BODY_LEN: usize = 1 + 32 + 8 + 8;
/// A whole ticket on the wire.
pub const TICKET_LEN: usize = BODY_LEN + 64;

/// What a ticket grants: attaching as `public_key` until `expires_unix`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ticket {
    /// The node's WireGuard public key (the relay address it receives on).
    pub public_key: [u8; 32],
    /// Control's id for the node (logs only).
    pub node_id: u64,
    /// Unix seconds after which the ticket is refused.
    pub expires_unix: i64,
}

/// Why a ticket (or a key) was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TicketError {
    /// Not valid base64.
    #[error("ticket or key is not valid base64")]
    Base64,
    /// Wrong length.
    #[error("malformed: {got} bytes, expected {expected}")]
    Length {
        /// Bytes received.
        got: usize,
        /// Bytes expected.
        expected: usize,
    },
    /// A version this relay does not know.
    #[error("unsupported ticket version {0}")]
    Version(u8),
    /// Not signed by any trusted key.
    #[error("bad signature: not signed by a trusted control key")]
    Signature,
    /// Signed, but past its expiry.
    #[error("expired at {expires_unix} (now {now_unix})")]
    Expired {
        /// The ticket's expiry.
        expires_unix: i64,
        /// The relay's clock.
        now_unix: i64,
    },
    /// A signing key that ring refused.
    #[error("invalid signing key: {0}")]
    Key(String),
}

impl TicketError {
    /// A short, stable name for metrics labels.
    #[must_use]
    pub const fn kind(&self) -> &'static str {
        match self {
            Self::Base64 | Self::Length { .. } => "malformed",
            Self::Version(_) => "bad_version",
            Self::Signature => "bad_signature",
            Self::Expired { .. } => "expired",
            Self::Key(_) => "bad_key",
        }
    }
}

/// Signs tickets (control's side; in this crate for tests and tools).
pub struct TicketSigner {
    key: Ed25519KeyPair,
}

impl std::fmt::Debug for TicketSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the private half.
        f.debug_struct("TicketSigner").field("public_key", &hex::encode(self.public_key())).finish()
    }
}

impl TicketSigner {
    /// A new random signing key, as PKCS#8 v2 DER (store it 0600).
    pub fn generate_pkcs8() -> Result<Vec<u8>, TicketError> {
        Ed25519KeyPair::generate_pkcs8(&SystemRandom::new())
            .map(|d| d.as_ref().to_vec())
            .map_err(|e| TicketError::Key(e.to_string()))
    }

    /// The signer for a PKCS#8 (v1 or v2) Ed25519 key.
    pub fn from_pkcs8(der: &[u8]) -> Result<Self, TicketError> {
        Ed25519KeyPair::from_pkcs8_maybe_unchecked(der)
            .map(|key| Self { key })
            .map_err(|e| TicketError::Key(e.to_string()))
    }

    /// The public key relays must trust.
    #[must_use]
    pub fn public_key(&self) -> [u8; 32] {
        self.key.public_key().as_ref().try_into().expect("Ed25519 public keys are 32 bytes")
    }

    /// The ticket's wire form.
    #[must_use]
    pub fn sign(&self, ticket: &Ticket) -> Vec<u8> {
        let mut out = body(ticket).to_vec();
        let sig = self.key.sign(&signed_message(&out));
        out.extend_from_slice(sig.as_ref());
        out
    }

    /// The ticket's text form (for the `Authorization` header).
    #[must_use]
    pub fn sign_b64(&self, ticket: &Ticket) -> String {
        STANDARD.encode(self.sign(ticket))
    }
}

fn body(t: &Ticket) -> [u8; BODY_LEN] {
    let mut b = [0u8; BODY_LEN];
    b[0] = VERSION;
    b[1..33].copy_from_slice(&t.public_key);
    b[33..41].copy_from_slice(&t.node_id.to_be_bytes());
    b[41..49].copy_from_slice(&t.expires_unix.to_be_bytes());
    b
}

fn signed_message(body: &[u8]) -> Vec<u8> {
    [CONTEXT, body].concat()
}

/// The ticket in `bytes` if it is well formed, signed by one of
/// `trusted_keys` and not expired at `now_unix`. The signature is checked
/// before the expiry, so a forged ticket is always reported as forged.
pub fn verify(bytes: &[u8], trusted_keys: &[[u8; 32]], now_unix: i64) -> Result<Ticket, TicketError> {
    if bytes.len() != TICKET_LEN {
        return Err(TicketError::Length { got: bytes.len(), expected: TICKET_LEN });
    }
    if bytes[0] != VERSION {
        return Err(TicketError::Version(bytes[0]));
    }
    let (body, sig) = bytes.split_at(BODY_LEN);
    let msg = signed_message(body);
    if !trusted_keys.iter().any(|k| UnparsedPublicKey::new(&ED25519, k).verify(&msg, sig).is_ok()) {
        return Err(TicketError::Signature);
    }
    let ticket = Ticket {
        public_key: body[1..33].try_into().expect("sliced to 32"),
        node_id: u64::from_be_bytes(body[33..41].try_into().expect("sliced to 8")),
        expires_unix: i64::from_be_bytes(body[41..49].try_into().expect("sliced to 8")),
    };
    if now_unix >= ticket.expires_unix {
        return Err(TicketError::Expired { expires_unix: ticket.expires_unix, now_unix });
    }
    Ok(ticket)
}

/// [`verify`] for the base64 text form.
pub fn verify_b64(text: &str, trusted_keys: &[[u8; 32]], now_unix: i64) -> Result<Ticket, TicketError> {
    // A ticket is 152 characters; refuse anything much longer before decoding.
    if text.len() > 4 * TICKET_LEN {
        return Err(TicketError::Length { got: text.len() * 3 / 4, expected: TICKET_LEN });
    }
    let bytes = STANDARD.decode(text.trim()).map_err(|_| TicketError::Base64)?;
    verify(&bytes, trusted_keys, now_unix)
}

/// A 32-byte key from its base64 text (as `wg` prints keys).
pub fn key_from_b64(text: &str) -> Result<[u8; 32], TicketError> {
    let bytes = STANDARD.decode(text.trim()).map_err(|_| TicketError::Base64)?;
    let got = bytes.len();
    bytes.try_into().map_err(|_| TicketError::Length { got, expected: 32 })
}

/// A 32-byte key's base64 text.
#[must_use]
pub fn key_to_b64(key: &[u8; 32]) -> String {
    STANDARD.encode(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn signer() -> TicketSigner {
        TicketSigner::from_pkcs8(&TicketSigner::generate_pkcs8().unwrap()).unwrap()
    }

    const T: Ticket = Ticket { public_key: [7; 32], node_id: 42, expires_unix: 1_000 };

    #[test]
    fn round_trip() {
        let s = signer();
        let wire = s.sign(&T);
        assert_eq!(wire.len(), TICKET_LEN);
        assert_eq!(verify(&wire, &[[0; 32], s.public_key()], 999), Ok(T));
        assert_eq!(verify_b64(&s.sign_b64(&T), &[s.public_key()], 0), Ok(T));
    }

    #[test]
    fn refusals_are_distinct() {
        let s = signer();
        let trusted = [s.public_key()];
        let wire = s.sign(&T);
        assert_eq!(verify(&wire, &trusted, 1_000), Err(TicketError::Expired { expires_unix: 1_000, now_unix: 1_000 }));
        assert_eq!(verify(&wire, &[signer().public_key()], 0), Err(TicketError::Signature));
        assert_eq!(verify(&wire, &[], 0), Err(TicketError::Signature));
        assert_eq!(verify(&wire[..50], &trusted, 0), Err(TicketError::Length { got: 50, expected: TICKET_LEN }));
        assert!(matches!(verify(&[], &trusted, 0), Err(TicketError::Length { .. })));
        let mut v2 = wire.clone();
        v2[0] = 2;
        assert_eq!(verify(&v2, &trusted, 0), Err(TicketError::Version(2)));
        assert_eq!(verify_b64("not base64!", &trusted, 0), Err(TicketError::Base64));
        assert!(matches!(verify_b64(&"A".repeat(100_000), &trusted, 0), Err(TicketError::Length { .. })));
    }

    #[test]
    fn every_flipped_bit_is_refused() {
        let s = signer();
        let wire = s.sign(&T);
        for i in 0..wire.len() * 8 {
            let mut bad = wire.clone();
            bad[i / 8] ^= 1 << (i % 8);
            assert!(verify(&bad, &[s.public_key()], 0).is_err(), "bit {i}");
        }
    }

    #[test]
    fn keys_in_base64() {
        let k = signer().public_key();
        assert_eq!(key_from_b64(&key_to_b64(&k)), Ok(k));
        assert_eq!(key_from_b64("AAAA"), Err(TicketError::Length { got: 3, expected: 32 }));
        assert!(TicketSigner::from_pkcs8(b"junk").is_err());
    }
}
