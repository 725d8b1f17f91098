//! Proof that an agent holds a new WireGuard private key, for a key
//! rotation ([`AgentService.KeyChallenge`] then `Renew`).
//!
//! WireGuard keys are X25519 keys: they do Diffie-Hellman, not signatures.
//! So the proof answers a challenge: control sends a fresh ephemeral public
//! key and a nonce; the agent returns HMAC-SHA256, keyed with X25519(new
//! private key, control's ephemeral public key), over a fixed context, its
//! node id, the nonce and the new public key. Control computes the same key
//! from X25519(ephemeral private key, new public key). Only a holder of the
//! new private key (or of the ephemeral one, which never leaves control's
//! memory) can answer, and an answer is bound to one node, one challenge and
//! one key.

use hmac::{Hmac, Mac as _};
use sha2::Sha256;

/// What every proof covers first: the protocol and its version.
const CONTEXT: &[u8] = b"meshgate wireguard key rotation v1";

/// The X25519 public key of `secret`.
#[must_use]
pub fn public_key(secret: &[u8; 32]) -> [u8; 32] {
    x25519_dalek::x25519(*secret, x25519_dalek::X25519_BASEPOINT_BYTES)
}

fn mac(shared: &[u8; 32], node_id: u64, nonce: &[u8], new_public: &[u8; 32]) -> Hmac<Sha256> {
    let mut m = <Hmac<Sha256>>::new_from_slice(shared).expect("HMAC takes any key length");
    m.update(CONTEXT);
    m.update(&node_id.to_be_bytes());
    m.update(nonce);
    m.update(new_public);
    m
}

/// The agent's answer: proves it holds `new_secret`.
#[must_use]
pub fn prove(new_secret: &[u8; 32], control_public: &[u8; 32], node_id: u64, nonce: &[u8]) -> [u8; 32] {
    let shared = x25519_dalek::x25519(*new_secret, *control_public);
    mac(&shared, node_id, nonce, &public_key(new_secret)).finalize().into_bytes().into()
}

/// Control's check of an answer (constant time). A new key of low order
/// (an all-zero shared secret, which anyone can compute) never passes.
#[must_use]
pub fn verify(ephemeral_secret: &[u8; 32], new_public: &[u8; 32], node_id: u64, nonce: &[u8], proof: &[u8]) -> bool {
    let shared = x25519_dalek::x25519(*ephemeral_secret, *new_public);
    if shared == [0; 32] {
        return false;
    }
    mac(&shared, node_id, nonce, new_public).verify_slice(proof).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(b: u8) -> [u8; 32] {
        let mut k = [b; 32];
        k[0] &= 248;
        k[31] = (k[31] & 127) | 64;
        k
    }

    #[test]
    fn only_the_holder_of_the_new_key_answers() {
        let (eph, new, other) = (key(1), key(2), key(3));
        let (eph_pub, new_pub) = (public_key(&eph), public_key(&new));
        let nonce = [7u8; 32];
        let p = prove(&new, &eph_pub, 42, &nonce);
        assert!(verify(&eph, &new_pub, 42, &nonce, &p));
        // Another key, node, nonce or claimed key: refused.
        assert!(!verify(&eph, &new_pub, 42, &nonce, &prove(&other, &eph_pub, 42, &nonce)));
        assert!(!verify(&eph, &new_pub, 43, &nonce, &p));
        assert!(!verify(&eph, &new_pub, 42, &[8u8; 32], &p));
        assert!(!verify(&eph, &public_key(&other), 42, &nonce, &p));
        assert!(!verify(&eph, &new_pub, 42, &nonce, &p[..31]));
        // A low-order "public key" gives an all-zero secret anyone knows.
        assert!(!verify(&eph, &[0; 32], 42, &nonce, &mac(&[0; 32], 42, &nonce, &[0; 32]).finalize().into_bytes()));
    }
}
