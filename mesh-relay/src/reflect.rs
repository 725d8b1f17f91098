//! A STUN-like UDP reflector: tells a node the address and port its
//! packets come from after NAT.
//!
//! Nodes send requests from their WireGuard port (so the answer describes
//! the tunnel's NAT mapping) and pick replies out of the tunnel's traffic,
//! so both are side-channel messages ([`crate::wire`]): shaped as WireGuard
//! transport messages with the side-channel magic. Bodies:
//!
//! | message | body                                                         | on the wire |
//! |---------|--------------------------------------------------------------|-------------|
//! | request | txid (16), 16 zero bytes                                     | 64          |
//! | reply   | txid (16), family (4 or 6), address (4/16), port BE          | 48 / 64     |
//!
//! The request is padded to the largest reply's size, so a reply is never
//! bigger than the request that caused it: spoofed requests cannot make
//! the reflector amplify. The server answers only valid requests of exactly
//! that size; anything else is counted and dropped without an answer.
//!
//! The codec is pure: the agent builds requests with it for its raw
//! socket and recognises replies there.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use tokio::net::UdpSocket;

use crate::wire::{self, Kind};
use mesh_metrics::prometheus_client;

/// A request's size on the wire.
pub const REQUEST_LEN: usize = 64;
/// The largest reply (IPv6); never more than [`REQUEST_LEN`].
pub const MAX_REPLY_LEN: usize = 64;
/// Zero bytes after a request's txid that make it as big as a reply.
const REQUEST_PADDING: usize = 16;

/// Why a datagram is not a valid message.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ReflectError {
    /// Not a side-channel message (see [`crate::wire`]).
    #[error("not a side-channel message")]
    NotOurs,
    /// A side-channel message of another kind.
    #[error("unexpected message kind {0:?}")]
    Kind(Kind),
    /// Wrong size for its kind.
    #[error("wrong length {0}")]
    Length(usize),
    /// An address family other than 4 or 6.
    #[error("unknown address family {0}")]
    Family(u8),
}

/// A request carrying `txid`.
#[must_use]
pub fn encode_request(txid: &[u8; 16]) -> Vec<u8> {
    let mut body = [0u8; 16 + REQUEST_PADDING];
    body[..16].copy_from_slice(txid);
    wire::seal(Kind::ReflectRequest, &body)
}

/// The body of a side-channel message of `kind`, starting with a txid.
fn open(buf: &[u8], kind: Kind) -> Result<([u8; 16], &[u8]), ReflectError> {
    let (got, body) = wire::open(buf).ok_or(ReflectError::NotOurs)?;
    if got != kind {
        return Err(ReflectError::Kind(got));
    }
    let (txid, rest) = body.split_first_chunk::<16>().ok_or(ReflectError::Length(buf.len()))?;
    Ok((*txid, rest))
}

/// The txid of a request (exactly [`REQUEST_LEN`] bytes).
pub fn parse_request(buf: &[u8]) -> Result<[u8; 16], ReflectError> {
    let (txid, _) = open(buf, Kind::ReflectRequest)?;
    if buf.len() != REQUEST_LEN {
        return Err(ReflectError::Length(buf.len()));
    }
    Ok(txid)
}

/// The reply telling the sender of `txid` it was seen from `observed`.
/// An IPv4-mapped IPv6 address (a dual-stack socket) is reported as IPv4.
#[must_use]
pub fn encode_reply(txid: &[u8; 16], observed: SocketAddr) -> Vec<u8> {
    let mut body = Vec::with_capacity(16 + 1 + 16 + 2);
    body.extend_from_slice(txid);
    match observed.ip().to_canonical() {
        IpAddr::V4(ip) => {
            body.push(4);
            body.extend_from_slice(&ip.octets());
        }
        IpAddr::V6(ip) => {
            body.push(6);
            body.extend_from_slice(&ip.octets());
        }
    }
    body.extend_from_slice(&observed.port().to_be_bytes());
    wire::seal(Kind::ReflectReply, &body)
}

/// The txid and observed address of a reply (padding after the port is
/// ignored).
pub fn parse_reply(buf: &[u8]) -> Result<([u8; 16], SocketAddr), ReflectError> {
    let (txid, rest) = open(buf, Kind::ReflectReply)?;
    let (&family, rest) = rest.split_first().ok_or(ReflectError::Length(buf.len()))?;
    let ip: IpAddr = match family {
        4 => Ipv4Addr::from(*rest.first_chunk::<4>().ok_or(ReflectError::Length(buf.len()))?).into(),
        6 => Ipv6Addr::from(*rest.first_chunk::<16>().ok_or(ReflectError::Length(buf.len()))?).into(),
        f => return Err(ReflectError::Family(f)),
    };
    let addr_len = if family == 4 { 4 } else { 16 };
    let port = rest[addr_len..].first_chunk::<2>().ok_or(ReflectError::Length(buf.len()))?;
    Ok((txid, SocketAddr::new(ip, u16::from_be_bytes(*port))))
}

/// The reflector's counters.
#[derive(Clone, Debug, Default)]
pub struct ReflectorStats {
    /// Valid requests answered.
    pub answered: Counter,
    /// Datagrams that were not valid requests (dropped silently).
    pub ignored: Counter,
}

/// Answers every valid request on `socket` with its observed source
/// address, until the task is dropped.
pub async fn serve(socket: UdpSocket, stats: ReflectorStats) {
    // One byte more than a request, so an oversized datagram is seen as such.
    let mut buf = [0u8; REQUEST_LEN + 1];
    loop {
        let (n, from) = match socket.recv_from(&mut buf).await {
            Ok(r) => r,
            Err(e) => {
                // E.g. ENOBUFS or an ICMP error surfaced on the socket: not
                // fatal, but never spin on it.
                tracing::debug!(error = %e, "reflector: receive failed");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let Ok(txid) = parse_request(&buf[..n]) else {
            stats.ignored.inc();
            continue;
        };
        stats.answered.inc();
        if let Err(e) = socket.send_to(&encode_reply(&txid, from), from).await {
            tracing::debug!(error = %e, peer = %from, "reflector: reply failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        let txid = *b"0123456789abcdef";
        let req = encode_request(&txid);
        assert_eq!(req.len(), REQUEST_LEN);
        assert_eq!(parse_request(&req), Ok(txid));
        for addr in ["192.0.2.7:51820", "[2001:db8::1]:9", "[::ffff:10.1.2.3]:80"] {
            let addr: SocketAddr = addr.parse().unwrap();
            let reply = encode_reply(&txid, addr);
            assert!(reply.len() <= MAX_REPLY_LEN && MAX_REPLY_LEN <= REQUEST_LEN, "no amplification");
            assert_eq!(wire::open(&reply).map(|(k, _)| k), Some(Kind::ReflectReply));
            let canonical = SocketAddr::new(addr.ip().to_canonical(), addr.port());
            assert_eq!(parse_reply(&reply), Ok((txid, canonical)));
        }
    }

    #[test]
    fn hostile_input() {
        let txid = [9u8; 16];
        let req = encode_request(&txid);
        assert_eq!(parse_request(&[]), Err(ReflectError::NotOurs));
        assert_eq!(parse_request(&req[..40]), Err(ReflectError::Length(40)));
        assert_eq!(parse_request(&[&req[..], &[0; 16]].concat()), Err(ReflectError::Length(80)));
        let mut bad = req.clone();
        bad[5] ^= 1;
        assert_eq!(parse_request(&bad), Err(ReflectError::NotOurs));
        let reply = encode_reply(&txid, "1.2.3.4:5".parse().unwrap());
        assert_eq!(parse_request(&reply), Err(ReflectError::Kind(Kind::ReflectReply)));
        assert_eq!(parse_reply(&req), Err(ReflectError::Kind(Kind::ReflectRequest)));
        assert_eq!(parse_request(&wire::seal(Kind::DiscoPing, &[0; 32])), Err(ReflectError::Kind(Kind::DiscoPing)));
        let family = 17 + 16;
        let mut r = reply.clone();
        r[family] = 5;
        assert_eq!(parse_reply(&r), Err(ReflectError::Family(5)));
        // A v6 family in a v4-sized reply.
        r[family] = 6;
        assert!(parse_reply(&r).is_err());
        // No slice of a message panics.
        let v6 = encode_reply(&txid, "[2001:db8::1]:9".parse().unwrap());
        for m in [&req, &reply, &v6] {
            for i in 0..m.len() {
                let _ = parse_reply(&m[..i]);
                let _ = parse_request(&m[..i]);
            }
        }
    }
}
