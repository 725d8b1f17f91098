//! The side-channel framing of the messages that share a node's WireGuard
//! UDP port with the tunnel: reflector requests and replies, and the
//! agents' disco pings and pongs (pure).
//!
//! They must use that port, not one of their own, to learn and to open the
//! NAT mapping the tunnel uses. So they are shaped as WireGuard transport
//! messages: type 4, three zero bytes, a receiver index no session uses
//! ([`MAGIC`]), a zero counter, then the body, zero-padded to 32 bytes plus
//! a multiple of 16. The agents' underlay guard passes that shape, and both
//! WireGuard engines drop it (no session has that index; were one to draw
//! it, the message would fail authentication all the same).

/// The receiver index of every side-channel message ("MSH" and version 1).
pub const MAGIC: [u8; 4] = *b"MSH\x01";
/// Bytes before the body: type, reserved, receiver index, counter, kind.
const HEADER: usize = 17;
/// The largest body: nothing sent on the side channel is bigger.
pub const MAX_BODY: usize = 256;

/// What a side-channel message is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    /// "What is my address?" to a reflector.
    ReflectRequest = 1,
    /// The reflector's answer.
    ReflectReply = 2,
    /// An agent asks a peer whether the direct path works.
    DiscoPing = 3,
    /// The peer's answer.
    DiscoPong = 4,
}

impl Kind {
    const fn from_u8(b: u8) -> Option<Self> {
        Some(match b {
            1 => Self::ReflectRequest,
            2 => Self::ReflectReply,
            3 => Self::DiscoPing,
            4 => Self::DiscoPong,
            _ => return None,
        })
    }
}

/// Frames `body` (at most [`MAX_BODY`] bytes; longer is cut, which no
/// caller does).
#[must_use]
pub fn seal(kind: Kind, body: &[u8]) -> Vec<u8> {
    let body = &body[..body.len().min(MAX_BODY)];
    let len = HEADER + body.len();
    let padded = if len <= 32 { 32 } else { 32 + (len - 32).div_ceil(16) * 16 };
    let mut out = Vec::with_capacity(padded);
    out.extend_from_slice(&[4, 0, 0, 0]);
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&[0; 8]);
    out.push(kind as u8);
    out.extend_from_slice(body);
    out.resize(padded, 0);
    out
}

/// The kind and body (with its padding) of a side-channel message; `None`
/// for anything else, a real WireGuard message included.
#[must_use]
pub fn open(payload: &[u8]) -> Option<(Kind, &[u8])> {
    if payload.len() < 32 || payload.len() > HEADER + MAX_BODY + 16 || payload[..4] != [4, 0, 0, 0] {
        return None;
    }
    if payload[4..8] != MAGIC || payload[8..16] != [0; 8] {
        return None;
    }
    Some((Kind::from_u8(payload[16])?, &payload[HEADER..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_messages_have_a_transport_messages_shape_and_open_again() {
        for n in [0, 15, 16, 40, 64, MAX_BODY] {
            let body = vec![0xab; n];
            let m = seal(Kind::DiscoPing, &body);
            assert!(m.len() >= 32 && (m.len() - 32).is_multiple_of(16), "{n}: {}", m.len());
            let (kind, got) = open(&m).unwrap();
            assert_eq!(kind, Kind::DiscoPing);
            assert_eq!(&got[..n], &body[..]);
        }
    }

    #[test]
    fn other_payloads_do_not_open() {
        let m = seal(Kind::ReflectReply, b"x");
        for i in [0, 4, 7, 8, 15, 16] {
            let mut bad = m.clone();
            bad[i] ^= 0x40;
            assert!(open(&bad).is_none(), "byte {i}");
        }
        assert!(open(&m[..31]).is_none());
        assert!(open(&[]).is_none());
        let mut kind0 = m.clone();
        kind0[16] = 0;
        assert!(open(&kind0).is_none());
    }
}
