//! The probe protocol on the wire: a UDP echo between agents over the
//! overlay. Pure encode/decode, so garbage is rejected by tested code.
//!
//! ```text
//! 0..4   magic "MSHP"
//! 4      version (1)
//! 5      kind: 1 request, 2 reply
//! 6..8   reserved, zero
//! 8..16  sequence number (big endian), echoed by the reply
//! 16     number of route entries (requests: 0)
//! 17..   entries: family (4 or 6), prefix length, healthy (0/1),
//!        address (4 or 16 bytes)
//! ```
//!
//! A reply carries the health of the routes its sender advertises, so that
//! a peer routing a prefix through a gateway that is up but has lost its
//! LAN learns it from its own probes, without waiting for control.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;

const MAGIC: &[u8; 4] = b"MSHP";
const VERSION: u8 = 1;
const HEADER: usize = 17;
/// Most route entries a reply carries (a reply stays under 1 KiB, well
/// inside any overlay MTU).
pub const MAX_ROUTES: usize = 48;

/// A decoded probe message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Message {
    /// "Are you there?"
    Request {
        /// Chosen by the sender, echoed in the reply.
        seq: u64,
    },
    /// The answer.
    Reply {
        /// The request's sequence number.
        seq: u64,
        /// Health of the routes the replying node advertises.
        routes: Vec<(IpNet, bool)>,
    },
}

/// Why a datagram is not a probe message.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// Shorter than the header or than its entries say.
    #[error("truncated probe message ({0} bytes)")]
    Truncated(usize),
    /// Not our magic or version.
    #[error("not a mesh probe message (bad magic or version)")]
    NotProbe,
    /// Unknown kind byte.
    #[error("unknown probe message kind {0}")]
    Kind(u8),
    /// A request with a body, trailing bytes or a bad route entry.
    #[error("malformed probe message: {0}")]
    Malformed(&'static str),
}

impl Message {
    /// Encodes the message (routes beyond [`MAX_ROUTES`] are left out).
    #[must_use]
    pub fn encode(&self) -> Vec<u8> {
        let (kind, seq, routes): (u8, u64, &[(IpNet, bool)]) = match self {
            Self::Request { seq } => (1, *seq, &[]),
            Self::Reply { seq, routes } => (2, *seq, &routes[..routes.len().min(MAX_ROUTES)]),
        };
        let mut b = Vec::with_capacity(HEADER + routes.len() * 19);
        b.extend_from_slice(MAGIC);
        b.extend_from_slice(&[VERSION, kind, 0, 0]);
        b.extend_from_slice(&seq.to_be_bytes());
        #[expect(clippy::cast_possible_truncation, reason = "at most MAX_ROUTES entries")]
        b.push(routes.len() as u8);
        for (net, healthy) in routes {
            match net.network() {
                IpAddr::V4(a) => {
                    b.extend_from_slice(&[4, net.prefix_len(), u8::from(*healthy)]);
                    b.extend_from_slice(&a.octets());
                }
                IpAddr::V6(a) => {
                    b.extend_from_slice(&[6, net.prefix_len(), u8::from(*healthy)]);
                    b.extend_from_slice(&a.octets());
                }
            }
        }
        b
    }

    /// Decodes one datagram; anything else than exactly one well-formed
    /// message is an error.
    pub fn decode(b: &[u8]) -> Result<Self, WireError> {
        if b.len() < HEADER {
            return Err(WireError::Truncated(b.len()));
        }
        if &b[..4] != MAGIC || b[4] != VERSION {
            return Err(WireError::NotProbe);
        }
        if b[6..8] != [0, 0] {
            return Err(WireError::Malformed("reserved bytes are not zero"));
        }
        let seq = u64::from_be_bytes(b[8..16].try_into().map_err(|_| WireError::Truncated(b.len()))?);
        let count = usize::from(b[16]);
        let mut rest = &b[HEADER..];
        match b[5] {
            1 => {
                if count != 0 || !rest.is_empty() {
                    return Err(WireError::Malformed("a request carries no body"));
                }
                Ok(Self::Request { seq })
            }
            2 => {
                if count > MAX_ROUTES {
                    return Err(WireError::Malformed("too many route entries"));
                }
                let mut routes = Vec::with_capacity(count);
                for _ in 0..count {
                    let (head, tail) = rest.split_first_chunk::<3>().ok_or(WireError::Truncated(b.len()))?;
                    let [family, len, healthy] = *head;
                    if healthy > 1 {
                        return Err(WireError::Malformed("route health is not 0 or 1"));
                    }
                    let (addr, tail): (IpAddr, &[u8]) = match family {
                        4 => {
                            let (a, t) = tail.split_first_chunk::<4>().ok_or(WireError::Truncated(b.len()))?;
                            (Ipv4Addr::from(*a).into(), t)
                        }
                        6 => {
                            let (a, t) = tail.split_first_chunk::<16>().ok_or(WireError::Truncated(b.len()))?;
                            (Ipv6Addr::from(*a).into(), t)
                        }
                        _ => return Err(WireError::Malformed("route family is not 4 or 6")),
                    };
                    let net = IpNet::new(addr, len).map_err(|_| WireError::Malformed("route prefix length"))?;
                    routes.push((net, healthy == 1));
                    rest = tail;
                }
                if !rest.is_empty() {
                    return Err(WireError::Malformed("trailing bytes"));
                }
                Ok(Self::Reply { seq, routes })
            }
            k => Err(WireError::Kind(k)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    #[test]
    fn round_trips() {
        for m in [
            Message::Request { seq: 0 },
            Message::Request { seq: u64::MAX },
            Message::Reply { seq: 7, routes: vec![] },
            Message::Reply {
                seq: 9,
                routes: vec![(net("198.18.20.0/24"), true), (net("fd00:1::/64"), false), (net("0.0.0.0/0"), true)],
            },
        ] {
            assert_eq!(Message::decode(&m.encode()), Ok(m));
        }
    }

    #[test]
    fn caps_the_number_of_routes() {
        let routes: Vec<_> = (0..100u8).map(|i| (net(&format!("10.{i}.0.0/16")), true)).collect();
        let m = Message::Reply { seq: 1, routes };
        let Ok(Message::Reply { routes, .. }) = Message::decode(&m.encode()) else { panic!() };
        assert_eq!(routes.len(), MAX_ROUTES);
    }

    #[test]
    fn rejects_garbage() {
        let good = Message::Reply { seq: 3, routes: vec![(net("198.18.20.0/24"), true)] }.encode();
        assert_eq!(Message::decode(&[]), Err(WireError::Truncated(0)));
        assert_eq!(Message::decode(&good[..HEADER - 1]), Err(WireError::Truncated(HEADER - 1)));
        let mut b = good.clone();
        b[0] = b'X';
        assert_eq!(Message::decode(&b), Err(WireError::NotProbe));
        let mut b = good.clone();
        b[5] = 9;
        assert_eq!(Message::decode(&b), Err(WireError::Kind(9)));
        // Cut inside the entry.
        assert!(matches!(Message::decode(&good[..good.len() - 1]), Err(WireError::Truncated(_))));
        let mut b = good.clone();
        b.push(0);
        assert_eq!(Message::decode(&b), Err(WireError::Malformed("trailing bytes")));
        let mut b = good.clone();
        b[HEADER] = 5;
        assert_eq!(Message::decode(&b), Err(WireError::Malformed("route family is not 4 or 6")));
        let mut b = good.clone();
        b[HEADER + 1] = 33;
        assert_eq!(Message::decode(&b), Err(WireError::Malformed("route prefix length")));
        let mut b = good;
        b[HEADER + 2] = 2;
        assert_eq!(Message::decode(&b), Err(WireError::Malformed("route health is not 0 or 1")));
        let mut req = Message::Request { seq: 1 }.encode();
        req.push(1);
        assert_eq!(Message::decode(&req), Err(WireError::Malformed("a request carries no body")));
    }
}
