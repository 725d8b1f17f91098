//! Disco: the ping and pong agents exchange on their WireGuard UDP ports to
//! learn whether a direct path works both ways (pure codec).
//!
//! They travel on the WireGuard port itself, so that they share its NAT
//! mapping with the tunnel, and in the side-channel framing
//! ([`mesh_relay::wire`]): a WireGuard transport header with a receiver index
//! no session uses, which the underlay guard passes and both WireGuard
//! engines drop.
//!
//! A ping or pong is authenticated with the two nodes' static WireGuard keys:
//! HMAC-SHA256 keyed with X25519(own private key, peer's public key), which
//! both sides compute and nobody else can. A forged pong could otherwise
//! move a peer onto a path that does not work.

use hmac::{Hmac, Mac as _};
use mesh_relay::wire::{self, Kind};
use sha2::{Digest as _, Sha256};

use crate::keys::{PublicKey, SecretKey};

/// Bytes of a transaction id.
pub const TXID_LEN: usize = 16;
const MAC_LEN: usize = 16;
const BODY_LEN: usize = TXID_LEN + 32 + MAC_LEN;
const CONTEXT: &[u8] = b"meshgate disco v1";

/// A disco message, parsed but not yet authenticated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Disco {
    /// Ping or pong.
    pub pong: bool,
    /// The transaction: a pong echoes its ping's.
    pub txid: [u8; TXID_LEN],
    /// Who sent it.
    pub sender: PublicKey,
    mac: [u8; MAC_LEN],
}

/// The key two nodes share for disco: only they can compute it.
#[derive(Clone)]
pub struct PairKey([u8; 32]);

impl std::fmt::Debug for PairKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PairKey(..)")
    }
}

impl PairKey {
    /// The key `own` shares with `peer`.
    #[must_use]
    pub fn new(own: &SecretKey, peer: &PublicKey) -> Self {
        let shared = x25519_dalek::x25519(*own.as_bytes(), peer.0);
        let mut h = Sha256::new();
        h.update(CONTEXT);
        h.update(shared);
        Self(h.finalize().into())
    }

    fn mac(&self, pong: bool, txid: &[u8; TXID_LEN], sender: &PublicKey) -> [u8; MAC_LEN] {
        let mut m = <Hmac<Sha256>>::new_from_slice(&self.0).expect("HMAC takes any key length");
        m.update(&[u8::from(pong)]);
        m.update(txid);
        m.update(&sender.0);
        let full = m.finalize().into_bytes();
        let mut out = [0; MAC_LEN];
        out.copy_from_slice(&full[..MAC_LEN]);
        out
    }
}

/// A ping or pong from `sender`, authenticated with `key`.
#[must_use]
pub fn encode(pong: bool, txid: &[u8; TXID_LEN], sender: &PublicKey, key: &PairKey) -> Vec<u8> {
    let mut body = Vec::with_capacity(BODY_LEN);
    body.extend_from_slice(txid);
    body.extend_from_slice(&sender.0);
    body.extend_from_slice(&key.mac(pong, txid, sender));
    wire::seal(if pong { Kind::DiscoPong } else { Kind::DiscoPing }, &body)
}

/// Parses a UDP payload; `None` for anything that is not a disco message.
#[must_use]
pub fn parse(payload: &[u8]) -> Option<Disco> {
    let (kind, body) = wire::open(payload)?;
    let pong = match kind {
        Kind::DiscoPing => false,
        Kind::DiscoPong => true,
        _ => return None,
    };
    let body = body.get(..BODY_LEN)?;
    let mut txid = [0; TXID_LEN];
    txid.copy_from_slice(&body[..TXID_LEN]);
    let mut sender = [0; 32];
    sender.copy_from_slice(&body[TXID_LEN..TXID_LEN + 32]);
    let mut mac = [0; MAC_LEN];
    mac.copy_from_slice(&body[TXID_LEN + 32..]);
    Some(Disco { pong, txid, sender: PublicKey(sender), mac })
}

impl Disco {
    /// Whether the message was made by the holder of the key shared with
    /// its sender (constant-time comparison).
    #[must_use]
    pub fn verify(&self, key: &PairKey) -> bool {
        let want = key.mac(self.pong, &self.txid, &self.sender);
        ring_eq(&want, &self.mac)
    }
}

fn ring_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_sides_share_the_key_and_a_third_cannot_forge() {
        let (a, b, c) = (SecretKey::generate(), SecretKey::generate(), SecretKey::generate());
        let ab = PairKey::new(&a, &b.public_key());
        let ba = PairKey::new(&b, &a.public_key());
        let txid = [7; TXID_LEN];
        let ping = encode(false, &txid, &a.public_key(), &ab);
        // Shaped like a WireGuard transport message: the guard's size rule.
        assert_eq!(ping[0], 4);
        assert!(ping.len() >= 32 && (ping.len() - 32).is_multiple_of(16), "{}", ping.len());
        let got = parse(&ping).unwrap();
        assert!(!got.pong);
        assert_eq!(got.sender, a.public_key());
        assert!(got.verify(&ba), "b verifies a's ping");
        // c claims to be a, but cannot compute a's key with b.
        let forged = encode(true, &txid, &a.public_key(), &PairKey::new(&c, &b.public_key()));
        assert!(!parse(&forged).unwrap().verify(&ba));
        // A flipped bit anywhere in the body fails.
        let mut bad = ping.clone();
        bad[20] ^= 1;
        assert!(parse(&bad).is_none_or(|d| !d.verify(&ba)));
    }

    #[test]
    fn garbage_and_wireguard_messages_are_not_disco() {
        assert!(parse(&[]).is_none());
        assert!(parse(&[4, 0, 0, 0, 1, 2, 3, 4]).is_none());
        let mut transport = vec![4, 0, 0, 0, 9, 9, 9, 9];
        transport.resize(64, 0);
        assert!(parse(&transport).is_none(), "a real session's transport message");
        let mut init = vec![1, 0, 0, 0];
        init.resize(148, 0);
        assert!(parse(&init).is_none());
    }
}
