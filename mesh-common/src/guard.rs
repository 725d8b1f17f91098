//! The underlay guard's maps (XDP on the gateway's public interface).
//!
//! # What the guard does with a frame
//!
//! 1. Non-IP frames (ARP, ...) pass.
//! 2. IPv4 / IPv6 with truncated headers: drop (`DropMalformed`). IPv6
//!    extension headers (hop-by-hop, routing, fragment, destination
//!    options, AH, mobility) are walked to the transport header, up to six
//!    of them; a longer or truncated chain is `DropMalformed`. Non-first
//!    fragments (IPv4 or IPv6) have no transport header and count as "other
//!    traffic" (step 4).
//! 3. UDP to the WireGuard port (`GUARD_CONFIG.wg_port`): the payload must be
//!    a WireGuard message: type 1 and exactly 148 bytes (handshake
//!    initiation), type 2 and 92 (response), type 3 and 64 (cookie reply),
//!    type 4 and at least 32 bytes, a multiple of 16 over those 32 unless
//!    the plaintext is a full-MTU packet, which WireGuard does not pad past
//!    the MTU (at least [`WG_MIN_MTU`]; 1420 is no multiple of 16)
//!    (transport data);
//!    the three reserved bytes are zero. Anything else: `DropBadType` /
//!    `DropBadSize`. A source in `GUARD_KNOWN` (the peers' endpoints, kept
//!    by the agent on every reconcile) passes (`PassKnown`). From any other
//!    source, handshake initiations and cookie replies spend a token from
//!    the bucket of the source's prefix (/24 for IPv4, /64 for IPv6 by
//!    default) in `GUARD_RATE`; an empty bucket drops (`DropRateLimited`).
//!    Handshake responses and transport data from unknown sources are never
//!    limited (`PassUnknown`, like initiations within their rate): they cost
//!    the receiver no public-key work, and a peer that roamed sends them from
//!    its new address before the agent learns it.
//! 4. Other traffic passes, unless `strict` is on. Then it passes only when
//!    it matches `GUARD_ALLOW` (source CIDR, protocol, port: see
//!    [`AllowKey`]), is ICMPv6 neighbour discovery (types 133-137), a path-MTU
//!    error (ICMPv4 "fragmentation needed", type 3 code 4; ICMPv6 "packet too
//!    big", type 2), or is a TCP segment with ACK set (a reply to a
//!    connection this host opened: XDP has no connection tracking, and a
//!    segment without SYN cannot open a connection). Everything else:
//!    `DropStrict`.
//!
//! Addresses are kept as 16 bytes: IPv4 as IPv4-mapped IPv6 (`::ffff:a.b.c.d`).

/// Size of the known-endpoint map.
pub const MAX_KNOWN: u32 = 65_536;
/// Size of the token-bucket table (LRU).
pub const MAX_BUCKETS: u32 = 65_536;
/// Size of the strict allow-list.
pub const MAX_ALLOW: u32 = 4_096;

/// WireGuard message sizes (UDP payload) by type.
pub const WG_INITIATION_LEN: usize = 148;
/// Handshake response.
pub const WG_RESPONSE_LEN: usize = 92;
/// Cookie reply.
pub const WG_COOKIE_LEN: usize = 64;
/// Smallest transport message (a keepalive).
pub const WG_TRANSPORT_MIN_LEN: usize = 32;
/// The smallest tunnel MTU the guard allows for: a transport message whose
/// plaintext is at least this long may be unpadded (it fills the MTU).
pub const WG_MIN_MTU: usize = 576;

/// `GUARD_CONFIG[0]`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GuardConfig {
    /// WireGuard listen port (host order); 0 turns the WireGuard checks off.
    pub wg_port: u16,
    /// 1: strict allow-list for non-WireGuard traffic.
    pub strict: u8,
    /// Prefix length of an IPv4 source's bucket.
    pub v4_prefix: u8,
    /// Prefix length of an IPv6 source's bucket.
    pub v6_prefix: u8,
    /// Zero.
    pub pad: [u8; 3],
    /// Packets per second an unknown prefix may send.
    pub rate_pps: u32,
    /// Bucket depth, packets.
    pub burst: u32,
}

/// An address, IPv4 mapped into IPv6.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct GuardAddr {
    /// The 16 address bytes.
    pub addr: [u8; 16],
}

/// A token bucket (`GUARD_RATE` value). Tokens are counted in billionths so
/// refilling needs no division: `elapsed_ns * rate_pps` nanotokens.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TokenBucket {
    /// Nanotokens left.
    pub nanotokens: u64,
    /// Last refill, `bpf_ktime_get_ns()`.
    pub last_ns: u64,
}

/// Key data of `GUARD_ALLOW` (LPM): exact fields first, the source last.
/// Prefix length = 32 + 96 + the IPv4 prefix, or 32 + the IPv6 prefix.
/// `proto` 0 means any protocol and `port` 0 any port (the guard looks up the
/// exact pair, then port 0, then protocol 0).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct AllowKey {
    /// IP protocol, 0 for any.
    pub proto: u8,
    /// Zero.
    pub pad: u8,
    /// Destination port (network order), 0 for any.
    pub port: [u8; 2],
    /// Source address (IPv4-mapped for IPv4).
    pub addr: [u8; 16],
}

/// Guard counter slots of `GUARD_STATS`.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GuardVerdict {
    /// Non-WireGuard traffic passed (strict off, or non-IP).
    Pass = 0,
    /// WireGuard message from a known endpoint.
    PassKnown = 1,
    /// WireGuard message from an unknown source: a handshake response or
    /// transport data (never limited), or an initiation / cookie reply
    /// within its prefix's rate.
    PassUnknown = 2,
    /// Traffic passed by the strict allow-list.
    PassAllowed = 3,
    /// Malformed IP or UDP header.
    DropMalformed = 4,
    /// Not a WireGuard message type (or reserved bytes set).
    DropBadType = 5,
    /// Wrong size for its message type.
    DropBadSize = 6,
    /// Handshake initiation or cookie reply from an unknown source over its
    /// prefix's rate.
    DropRateLimited = 7,
    /// Strict mode, not allowed.
    DropStrict = 8,
}

impl GuardVerdict {
    /// Number of slots.
    pub const COUNT: u32 = 9;
    /// All slots in map order.
    pub const ALL: [Self; 9] = [
        Self::Pass,
        Self::PassKnown,
        Self::PassUnknown,
        Self::PassAllowed,
        Self::DropMalformed,
        Self::DropBadType,
        Self::DropBadSize,
        Self::DropRateLimited,
        Self::DropStrict,
    ];
}

/// Map names.
pub mod names {
    /// [`super::GuardConfig`] (`Array`, one entry).
    pub const CONFIG: &str = "GUARD_CONFIG";
    /// Known endpoints (`HashMap<GuardAddr, u8>`).
    pub const KNOWN: &str = "GUARD_KNOWN";
    /// Token buckets (`LruHashMap<GuardAddr, TokenBucket>`).
    pub const RATE: &str = "GUARD_RATE";
    /// Strict allow-list (`LpmTrie<AllowKey, u8>`).
    pub const ALLOW: &str = "GUARD_ALLOW";
    /// Counters (`PerCpuArray<PacketCount>`).
    pub const STATS: &str = "GUARD_STATS";
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY (all): `#[repr(C)]`, integers and byte arrays laid out without
    // padding, every bit pattern valid.
    unsafe impl aya::Pod for super::GuardConfig {}
    unsafe impl aya::Pod for super::GuardAddr {}
    unsafe impl aya::Pod for super::TokenBucket {}
    unsafe impl aya::Pod for super::AllowKey {}
}
