//! The probe protocol on the wire: a UDP echo between agents over the
//! overlay. Pure encode/decode, so garbage is rejected by tested code.
//!
//! ```text
//! 0..4   magic "MSHP"
//! 4      version (1 or 2)
//! 5      kind: 1 request, 2 reply, 3 notice (version 2)
//! 6..8   reserved, zero
//! 8..16  sequence number (big endian), echoed by the reply
//! 16     number of route entries (requests: 0)
//! 17..   entries: family (4 or 6), prefix length, state,
//!        address (4 or 16 bytes)
//! ```
//!
//! A reply carries the state of the routes its sender advertises, so that
//! a peer routing a prefix through a gateway that is up but has lost its
//! LAN learns it from its own probes, without waiting for control; and,
//! from version 2 on, whether the sender owns the prefix's site side (holds
//! its virtual gateway address), so that every remote agent routes the
//! prefix through the gateway the site's LAN answers through.
//!
//! A notice is a reply nobody asked for (sequence number 0): a gateway
//! sends one to every peer the moment it takes or gives up a site, so that
//! remote agents follow a handover within one round trip instead of at
//! their next probe.
//!
//! Versions: in version 1 the state byte is 0 or 1 (healthy); in version 2
//! it is a set of flags (bit 0 healthy, bit 1 owner). A reply has the
//! version of the request it answers, so an agent of an older release
//! (which sends and reads only version 1) keeps probing newer ones during a
//! rolling upgrade.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;

const MAGIC: &[u8; 4] = b"MSHP";
/// The version this release sends requests in.
const VERSION: u8 = 2;
const HEADER: usize = 17;
const FLAG_HEALTHY: u8 = 1;
const FLAG_OWNER: u8 = 2;
/// Most route entries a reply carries (a reply stays under 1 KiB, well
/// inside any overlay MTU).
pub const MAX_ROUTES: usize = 48;

/// What a gateway says about one route it advertises.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RouteState {
    /// The prefix.
    pub prefix: IpNet,
    /// It can reach the prefix (its reachability check passes).
    pub healthy: bool,
    /// It owns the prefix's site side (version 2; always false in version 1).
    pub owner: bool,
}

/// A decoded probe message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Message {
    /// "Are you there?"
    Request {
        /// Chosen by the sender, echoed in the reply.
        seq: u64,
        /// The protocol version of the request; the reply uses the same.
        version: u8,
    },
    /// The answer.
    Reply {
        /// The request's sequence number.
        seq: u64,
        /// The request's protocol version.
        version: u8,
        /// State of the routes the replying node advertises.
        routes: Vec<RouteState>,
    },
    /// The sender's route states changed (version 2).
    Notice {
        /// State of the routes the sending node advertises.
        routes: Vec<RouteState>,
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
    /// A request in this release's version.
    #[must_use]
    pub const fn request(seq: u64) -> Self {
        Self::Request { seq, version: VERSION }
    }

    /// Encodes the message (routes beyond [`MAX_ROUTES`] are left out; in
    /// version 1 the owner flag is).
    #[must_use]
    pub fn encode(&self) -> Vec<u8> {
        let (kind, seq, version, routes): (u8, u64, u8, &[RouteState]) = match self {
            Self::Request { seq, version } => (1, *seq, *version, &[]),
            Self::Reply { seq, version, routes } => (2, *seq, *version, &routes[..routes.len().min(MAX_ROUTES)]),
            Self::Notice { routes } => (3, 0, VERSION, &routes[..routes.len().min(MAX_ROUTES)]),
        };
        let mut b = Vec::with_capacity(HEADER + routes.len() * 19);
        b.extend_from_slice(MAGIC);
        b.extend_from_slice(&[version, kind, 0, 0]);
        b.extend_from_slice(&seq.to_be_bytes());
        #[expect(clippy::cast_possible_truncation, reason = "at most MAX_ROUTES entries")]
        b.push(routes.len() as u8);
        for r in routes {
            let mut state = u8::from(r.healthy) * FLAG_HEALTHY;
            if version >= 2 && r.owner {
                state |= FLAG_OWNER;
            }
            let family = if r.prefix.addr().is_ipv4() { 4 } else { 6 };
            b.extend_from_slice(&[family, r.prefix.prefix_len(), state]);
            match r.prefix.network() {
                IpAddr::V4(a) => b.extend_from_slice(&a.octets()),
                IpAddr::V6(a) => b.extend_from_slice(&a.octets()),
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
        let version = b[4];
        if &b[..4] != MAGIC || !(1..=VERSION).contains(&version) {
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
                Ok(Self::Request { seq, version })
            }
            2 | 3 => {
                if b[5] == 3 && (version < 2 || seq != 0) {
                    return Err(WireError::Malformed("a notice is version 2 with sequence number 0"));
                }
                if count > MAX_ROUTES {
                    return Err(WireError::Malformed("too many route entries"));
                }
                let known = if version == 1 { FLAG_HEALTHY } else { FLAG_HEALTHY | FLAG_OWNER };
                let mut routes = Vec::with_capacity(count);
                for _ in 0..count {
                    let (head, tail) = rest.split_first_chunk::<3>().ok_or(WireError::Truncated(b.len()))?;
                    let [family, len, state] = *head;
                    if state & !known != 0 {
                        return Err(WireError::Malformed("unknown route state flags"));
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
                    let prefix = IpNet::new(addr, len).map_err(|_| WireError::Malformed("route prefix length"))?;
                    routes.push(RouteState {
                        prefix,
                        healthy: state & FLAG_HEALTHY != 0,
                        owner: state & FLAG_OWNER != 0,
                    });
                    rest = tail;
                }
                if !rest.is_empty() {
                    return Err(WireError::Malformed("trailing bytes"));
                }
                if b[5] == 3 {
                    return Ok(Self::Notice { routes });
                }
                Ok(Self::Reply { seq, version, routes })
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

    fn rs(prefix: &str, healthy: bool, owner: bool) -> RouteState {
        RouteState { prefix: net(prefix), healthy, owner }
    }

    fn reply(seq: u64, routes: Vec<RouteState>) -> Message {
        Message::Reply { seq, version: VERSION, routes }
    }

    /// The fuzz seeds are real messages of every kind and version.
    #[test]
    fn fuzz_seeds_decode() {
        for seed in [
            &include_bytes!("../../fuzz/corpus/probe_wire/request-v1")[..],
            include_bytes!("../../fuzz/corpus/probe_wire/request-v2"),
            include_bytes!("../../fuzz/corpus/probe_wire/reply-v1"),
            include_bytes!("../../fuzz/corpus/probe_wire/reply-v2-two-routes"),
            include_bytes!("../../fuzz/corpus/probe_wire/notice-v2"),
        ] {
            let m = Message::decode(seed).unwrap();
            assert_eq!(m.encode(), seed);
        }
    }

    #[test]
    fn round_trips() {
        for m in [
            Message::request(0),
            Message::request(u64::MAX),
            reply(7, vec![]),
            reply(
                9,
                vec![rs("198.18.20.0/24", true, true), rs("fd00:1::/64", false, false), rs("0.0.0.0/0", true, false)],
            ),
            Message::Notice { routes: vec![rs("198.18.20.0/24", true, true)] },
        ] {
            assert_eq!(Message::decode(&m.encode()), Ok(m));
        }
    }

    #[test]
    fn version_1_peers_get_version_1_replies_without_the_owner_flag() {
        let req = Message::Request { seq: 5, version: 1 };
        assert_eq!(Message::decode(&req.encode()), Ok(req));
        let m = Message::Reply { seq: 5, version: 1, routes: vec![rs("198.18.20.0/24", true, true)] };
        let b = m.encode();
        assert_eq!(b[4], 1);
        assert_eq!(b[HEADER + 2], 1, "a version 1 reader accepts only 0 or 1");
        assert_eq!(
            Message::decode(&b),
            Ok(Message::Reply { seq: 5, version: 1, routes: vec![rs("198.18.20.0/24", true, false)] })
        );
        // The owner bit is not a version 1 flag.
        let mut b = b;
        b[HEADER + 2] = 3;
        assert_eq!(Message::decode(&b), Err(WireError::Malformed("unknown route state flags")));
    }

    #[test]
    fn caps_the_number_of_routes() {
        let routes: Vec<_> = (0..100u8).map(|i| rs(&format!("10.{i}.0.0/16"), true, false)).collect();
        let Ok(Message::Reply { routes, .. }) = Message::decode(&reply(1, routes).encode()) else { panic!() };
        assert_eq!(routes.len(), MAX_ROUTES);
    }

    #[test]
    fn rejects_garbage() {
        let good = reply(3, vec![rs("198.18.20.0/24", true, false)]).encode();
        assert_eq!(Message::decode(&[]), Err(WireError::Truncated(0)));
        assert_eq!(Message::decode(&good[..HEADER - 1]), Err(WireError::Truncated(HEADER - 1)));
        let mut b = good.clone();
        b[0] = b'X';
        assert_eq!(Message::decode(&b), Err(WireError::NotProbe));
        let mut b = good.clone();
        b[4] = 3;
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
        b[HEADER + 2] = 4;
        assert_eq!(Message::decode(&b), Err(WireError::Malformed("unknown route state flags")));
        let mut notice = Message::Notice { routes: vec![] }.encode();
        notice[15] = 1;
        assert_eq!(Message::decode(&notice), Err(WireError::Malformed("a notice is version 2 with sequence number 0")));
        let mut req = Message::request(1).encode();
        req.push(1);
        assert_eq!(Message::decode(&req), Err(WireError::Malformed("a request carries no body")));
    }
}
