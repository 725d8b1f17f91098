//! The overlay ACL's maps: layouts shared by the TC program (`mesh-ebpf`
//! src/acl/) and the agent that fills them (`mesh-agent` src/dataplane/).
//!
//! # How a packet is decided (cilium `policy.h` style)
//!
//! 1. **Flow table** (`ACL_FLOWS`, LRU hash, key [`FlowKey`] built from the
//!    packet as it is): a hit that has not expired accepts the packet as a
//!    reply of an accepted flow (`AcceptEstablished`).
//! 2. **Source identity**: `SRC4_<slot>` / `SRC6_<slot>` (LPM tries, key = the
//!    address, big-endian) give the packet's source *class*: the number of the
//!    longest policy source CIDR that contains it. Because CIDRs nest or are
//!    disjoint, the longest match fixes the whole chain of source CIDRs that
//!    contain the address, so one lookup identifies the complete set. No
//!    match: default deny.
//! 3. **Destination identity, per source**: `DST4_<slot>` / `DST6_<slot>`
//!    (LPM tries, key [`DstKey4`] / [`DstKey6`] = `source class | address`,
//!    prefix length 32 + the CIDR's) give the class of the longest
//!    destination CIDR *among the rules that apply to that source class*.
//!    Keying destinations by source keeps a policy like `* -> *` plus N
//!    host rules at O(N) entries instead of the N x N cross product a global
//!    destination class would need. No match: default deny.
//! 4. **Decision**: `POLICY_<slot>`, an LPM trie over [`PolicyKey`]
//!    (`src class | dst class | protocol | destination port`, exact fields
//!    first, wildcardable last). Entries have prefix length
//!    - 64: both classes, any protocol, any port (`Proto::Any`);
//!    - 72: plus the protocol, any port (ICMP, other protocols, or a full
//!      port range);
//!    - 72 + n: plus the first `n` bits of the port (a port range is split
//!      into at most 30 aligned blocks).
//!
//!    The longest matching entry wins; its value is the index of the *first*
//!    rule (in policy order) that matches every packet reaching this entry,
//!    which is the rule whose counter is bumped. A miss is default deny.
//!
//! So a packet costs at most one hash and three LPM lookups whatever the rule
//! count; the rule count only changes how many entries the tries hold.
//!
//! On accept, the reverse of the packet's flow key is written to the flow
//! table, so the replies pass (step 1) even if a new policy no longer allows
//! the flow. A new policy applies to new flows and to every packet that is
//! not a reply.
//!
//! # Double buffering
//!
//! Each policy map exists twice (`_0`, `_1`). `ACL_ACTIVE[0]` names the slot
//! the program reads; it reads it once per packet, so a packet sees one whole
//! policy. The agent fills the inactive slot, then flips `ACL_ACTIVE`.
//!
//! # Verdicts of odd packets
//!
//! - non-IP frames (ARP on an Ethernet device): pass (`PassNonIp`); the ACL is
//!   an IP filter, and an overlay (WireGuard) interface carries only IP;
//! - malformed IP (truncated or inconsistent headers, IPv4 IHL < 5, a
//!   transport header too short to read the ports / ICMP id, more than four
//!   IPv6 extension headers): drop (`DropMalformed`);
//! - fragments other than the first (IPv4 offset != 0, IPv6 fragment header
//!   with offset != 0): drop (`DropFragment`); they carry no ports to decide
//!   on. First fragments are decided like whole packets.

/// Largest number of rules in one policy (size of the per-rule counters).
pub const MAX_RULES: u32 = 16_384;
/// Largest number of decision entries per slot (`POLICY_<slot>`).
pub const MAX_POLICY_ENTRIES: u32 = 1 << 20;
/// Largest number of distinct source CIDRs per family.
pub const MAX_CIDRS: u32 = 1 << 16;
/// Largest number of (source class, destination CIDR) entries per family.
pub const MAX_DST_ENTRIES: u32 = 1 << 20;
/// Flow-table size (LRU: the least recently used flows are evicted).
pub const MAX_FLOWS: u32 = 1 << 17;

/// Prefix length of a decision entry for any protocol and port.
pub const POLICY_PREFIX_ANY_PROTO: u32 = 64;
/// Prefix length of a decision entry for one protocol and any port.
pub const POLICY_PREFIX_PROTO: u32 = 72;
/// Prefix length of a decision entry for one protocol and one port.
pub const POLICY_PREFIX_FULL: u32 = 88;

/// Key data of `POLICY_<slot>` (LPM): compared bit by bit from the first byte,
/// so the numbers are stored big-endian.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PolicyKey {
    /// Source class (big-endian), never 0.
    pub src_class: [u8; 4],
    /// Destination class (big-endian), never 0.
    pub dst_class: [u8; 4],
    /// IP protocol number (ICMPv6 is 58).
    pub proto: u8,
    /// Destination port (big-endian; 0 for protocols without ports).
    pub port: [u8; 2],
    /// Zero; never covered by a prefix.
    pub pad: u8,
}

/// Key data of `DST4_<slot>` (LPM): the source class, then the address.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct DstKey4 {
    /// Source class (big-endian), always fully matched.
    pub src_class: [u8; 4],
    /// Destination address.
    pub addr: [u8; 4],
}

/// Key data of `DST6_<slot>` (LPM): the source class, then the address.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct DstKey6 {
    /// Source class (big-endian), always fully matched.
    pub src_class: [u8; 4],
    /// Destination address.
    pub addr: [u8; 16],
}

/// Value of `POLICY_<slot>`: which rule decided.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PolicyValue {
    /// Index of the rule in the installed policy (indexes `RULE_STATS_<slot>`
    /// and `RULE_IDS_<slot>`).
    pub rule_index: u32,
}

/// Key of the flow table. For TCP, UDP and SCTP the ports are the packet's;
/// for ICMP and ICMPv6 echo messages `sport` is the echo identifier and
/// `dport` the message type (reply types are what a reverse key holds); other
/// protocols have zero ports. Ports are stored as on the wire.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowKey {
    /// Source address (IPv4 in the first four bytes, rest zero).
    pub src: [u8; 16],
    /// Destination address.
    pub dst: [u8; 16],
    /// Source port (network order bytes).
    pub sport: [u8; 2],
    /// Destination port (network order bytes).
    pub dport: [u8; 2],
    /// IP protocol.
    pub proto: u8,
    /// 4 or 6.
    pub family: u8,
    /// Zero.
    pub pad: [u8; 2],
}

/// Value of the flow table.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowValue {
    /// `bpf_ktime_get_ns()` after which the entry is stale.
    pub expires_ns: u64,
    /// Index of the rule that accepted the flow's first packet.
    pub rule_index: u32,
    /// Policy slot that accepted it.
    pub slot: u32,
}

/// `ACL_CONFIG[0]`: settings the agent may change at any time.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AclConfig {
    /// Overlay MTU for the MSS clamp; 0 turns the clamp off.
    pub mss_mtu: u32,
    /// Idle timeout of TCP flows, seconds.
    pub tcp_timeout_s: u32,
    /// Idle timeout of other flows, seconds.
    pub other_timeout_s: u32,
    /// Zero.
    pub pad: u32,
}

impl AclConfig {
    /// Defaults: clamp off, TCP flows idle out after 10 minutes, others 2.
    pub const DEFAULT: Self = Self { mss_mtu: 0, tcp_timeout_s: 600, other_timeout_s: 120, pad: 0 };
}

/// `SLOT_META[slot]`: what a slot holds.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SlotMeta {
    /// Generation of the policy in the slot.
    pub generation: u64,
    /// Number of rules (valid indexes of `RULE_IDS_<slot>`).
    pub rule_count: u32,
    /// 1 when the slot holds a complete policy.
    pub valid: u32,
}

/// Per-verdict counter slots of `ACL_VERDICTS`.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AclVerdict {
    /// Accepted by a rule (a new flow or a non-reply packet).
    AcceptRule = 0,
    /// Accepted as a reply of an accepted flow.
    AcceptEstablished = 1,
    /// No rule matched (default deny).
    DropNoRule = 2,
    /// No rule matched and the packet looks like a reply (TCP without SYN,
    /// echo reply) of a flow that was never accepted.
    DropNoFlow = 3,
    /// Malformed IP packet.
    DropMalformed = 4,
    /// Non-first fragment.
    DropFragment = 5,
    /// Non-IP frame, passed.
    PassNonIp = 6,
}

impl AclVerdict {
    /// Number of verdicts.
    pub const COUNT: u32 = 7;
    /// All verdicts in map order.
    pub const ALL: [Self; 7] = [
        Self::AcceptRule,
        Self::AcceptEstablished,
        Self::DropNoRule,
        Self::DropNoFlow,
        Self::DropMalformed,
        Self::DropFragment,
        Self::PassNonIp,
    ];
    /// Whether the packet is let through.
    #[must_use]
    pub const fn passes(self) -> bool {
        matches!(self, Self::AcceptRule | Self::AcceptEstablished | Self::PassNonIp)
    }
}

/// MSS-clamp counter slots of `MSS_STATS`.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MssEvent {
    /// A SYN or SYN-ACK whose MSS was lowered.
    Clamped = 0,
    /// A SYN or SYN-ACK whose MSS was already small enough.
    Unchanged = 1,
    /// A SYN or SYN-ACK without an MSS option (left alone).
    NoOption = 2,
}

impl MssEvent {
    /// Number of slots.
    pub const COUNT: u32 = 3;
}

/// MSS for an overlay MTU: MTU minus the IPv4 (20) and TCP (20) headers.
#[must_use]
pub const fn mss_v4(mtu: u32) -> u32 {
    mtu.saturating_sub(40)
}

/// MSS for an overlay MTU: MTU minus the IPv6 (40) and TCP (20) headers.
#[must_use]
pub const fn mss_v6(mtu: u32) -> u32 {
    mtu.saturating_sub(60)
}

/// Map names (the two policy slots append `_0` / `_1`).
pub mod names {
    /// Active slot (`Array<u32>`, one entry).
    pub const ACTIVE: &str = "ACL_ACTIVE";
    /// [`super::AclConfig`] (`Array`, one entry).
    pub const CONFIG: &str = "ACL_CONFIG";
    /// [`super::SlotMeta`] per slot (`Array`, two entries).
    pub const SLOT_META: &str = "SLOT_META";
    /// Flow table (`LruHashMap<FlowKey, FlowValue>`).
    pub const FLOWS: &str = "ACL_FLOWS";
    /// Verdict counters (`PerCpuArray<PacketCount>`).
    pub const VERDICTS: &str = "ACL_VERDICTS";
    /// MSS counters (`PerCpuArray<u64>`).
    pub const MSS_STATS: &str = "MSS_STATS";
    /// IPv4 source classes per slot.
    pub const SRC4: [&str; 2] = ["SRC4_0", "SRC4_1"];
    /// IPv6 source classes per slot.
    pub const SRC6: [&str; 2] = ["SRC6_0", "SRC6_1"];
    /// IPv4 destination classes per source class, per slot.
    pub const DST4: [&str; 2] = ["DST4_0", "DST4_1"];
    /// IPv6 destination classes per source class, per slot.
    pub const DST6: [&str; 2] = ["DST6_0", "DST6_1"];
    /// Decision tries per slot.
    pub const POLICY: [&str; 2] = ["POLICY_0", "POLICY_1"];
    /// Per-rule counters per slot (`PerCpuArray<PacketCount>`).
    pub const RULE_STATS: [&str; 2] = ["RULE_STATS_0", "RULE_STATS_1"];
    /// Rule index to rule id per slot (`Array<u32>`).
    pub const RULE_IDS: [&str; 2] = ["RULE_IDS_0", "RULE_IDS_1"];
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY (all): `#[repr(C)]`, only integers and byte arrays, no padding
    // (sizes are multiples of the alignment and fields are laid out densely),
    // every bit pattern valid.
    unsafe impl aya::Pod for super::PolicyKey {}
    unsafe impl aya::Pod for super::PolicyValue {}
    unsafe impl aya::Pod for super::DstKey4 {}
    unsafe impl aya::Pod for super::DstKey6 {}
    unsafe impl aya::Pod for super::FlowKey {}
    unsafe impl aya::Pod for super::FlowValue {}
    unsafe impl aya::Pod for super::AclConfig {}
    unsafe impl aya::Pod for super::SlotMeta {}
}
