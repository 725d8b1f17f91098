//! The overlay ACL's maps: layouts shared by the TC program (`mesh-ebpf`
//! src/acl/) and the agent that fills them (`mesh-agent` src/dataplane/).
//!
//! # How a packet is decided (cilium `policy.h` style)
//!
//! 0. **Parts of accepted flows without a flow key of their own** (checked
//!    first; a non-first fragment is decided here alone):
//!    - a **non-first fragment** (IPv4 offset != 0, IPv6 fragment header
//!      with offset != 0) passes (`AcceptEstablished`) iff the fragment
//!      table (`ACL_FRAGS`, LRU, key [`FragKey`] = source, destination,
//!      identification, and the protocol on IPv4) holds its datagram: a first fragment
//!      (offset 0, more fragments) that passed, by any step, is written
//!      there, valid for `other_timeout_s`. Otherwise `DropFragment`.
//!      First fragments carry the ports and are decided like whole
//!      packets. *Why tracked, not passed as Tailscale's `wgengine/filter`
//!      does* (it passes every non-first fragment, since without its first
//!      one nothing can be reassembled): passing them lets any overlay
//!      node park fragments in the reassembly queues of every host behind
//!      the gateway, hosts the policy does not let it reach at all. The
//!      cost here is one LRU write per fragmented datagram and one lookup
//!      per later fragment, flat. The price: a later fragment that
//!      overtakes its first is dropped (senders, Linux included, emit the
//!      first fragment first and WireGuard keeps a peer's order, so this
//!      is rare; the datagram is then lost as on any lossy path). The
//!      entries are not bound to the policy: a datagram whose head passed
//!      may finish.
//!    - an **ICMP error** (ICMPv4 destination unreachable, fragmentation
//!      needed included, and time exceeded; ICMPv6 destination
//!      unreachable, packet too big and time exceeded) passes as related
//!      (`AcceptEstablished`) when the packet it quotes has a flow entry,
//!      of either kind, that is live under the active policy (step 1's
//!      validity), keyed by the quoted packet's own [`FlowKey`]. The quoted
//!      packet is one the error's receiver sent through this ACL, so its
//!      key holds a forward entry (a packet of a flow accepted here) or a
//!      reply entry (a reply of one): both directions of a flow are
//!      covered. The quote must be addressed from the error's destination
//!      (else the error is forged), hold at least 8 bytes of the transport
//!      header, and not be a non-first fragment; IPv6 quotes may carry one
//!      fragment header and no other extension header. Any other ICMP
//!      error (and every other ICMP message) goes on to step 1 like any
//!      packet.
//! 1. **Flow table** (`ACL_FLOWS2`, LRU hash, key [`FlowKey`] built from the
//!    packet as it is). Entries answer only while they have not expired and
//!    were made under the policy active now (their `active` word equals
//!    `ACL_ACTIVE[0]`, which changes on every install). A
//!    [`FlowKind::Reply`] entry accepts the packet as a reply of an accepted
//!    flow (`AcceptEstablished`). A [`FlowKind::Forward`] entry accepts the
//!    packet with the rule it records (`AcceptRule`, counted to that rule):
//!    the policy would decide the same, as the decision depends only on
//!    fields of the flow key. Any other case goes on to the policy (steps
//!    2-4).
//! 2. **Source identity**: the source address is looked up in
//!    `SRCH4_<slot>` / `SRCH6_<slot>` (hash maps, key [`SrcKey4`] /
//!    [`SrcKey6`] = prefix length and the address masked to it) once per
//!    prefix length the policy's source CIDRs use ([`SlotLens`], longest
//!    first); the first hit is the longest matching source CIDR and gives
//!    the packet's source *class*. Because CIDRs nest or are disjoint, the
//!    longest match fixes the whole chain of source CIDRs that contain the
//!    address, so one class identifies the complete set. No match: default
//!    deny.
//! 3. **Destination identity, per source**: the same over the destination's
//!    prefix lengths in `DSTH4_<slot>` / `DSTH6_<slot>` (key [`DstKey4`] /
//!    [`DstKey6`] = source class, prefix length, masked address) gives the
//!    class of the longest destination CIDR *among the rules that apply to
//!    that source class*. Keying destinations by source keeps a policy like
//!    `* -> *` plus N host rules at O(N) entries instead of the N x N cross
//!    product a global destination class would need. No match: default deny.
//! 4. **Decision**: `DECIDE_<slot>`, a hash map over [`PolicyKey`]
//!    (`src class, dst class, protocol, level, destination port masked to
//!    the level`). The level of an entry is
//!    - 0..=16: one protocol, the first `level` bits of the port (a port
//!      range is split into at most 30 aligned blocks; level 0 is "any
//!      port", which is also how ICMP and portless protocols are stored);
//!    - [`LEVEL_ANY_PROTO`]: any protocol and port (`Proto::Any`; protocol
//!      and port are zero in the key).
//!
//!    The program tries the port levels the policy uses ([`SlotLens`]),
//!    most specific first, then the any-protocol entry if the policy has
//!    one; the first hit wins. Its value is the index of the *first* rule
//!    (in policy order) that matches every packet reaching this entry,
//!    which is the rule whose counter is bumped. No hit: step 5.
//! 5. **Reply without a flow** (issue 12: connections set up through
//!    another gateway, which this one takes over, or flows of an older
//!    policy): a TCP packet without SYN, a UDP datagram, or an ICMP(v6)
//!    echo reply passes as a reply (`AcceptEstablished`, no rule counter)
//!    when steps 2-4 accept its *reversed* tuple: source and destination
//!    addresses swapped, ports swapped (the reversed destination port is
//!    the packet's source port), an echo reply turned into the echo
//!    request with its identifier. Its flow's entries are then written as
//!    if the reversed packet had been accepted (forward entry on the
//!    reversed key, reply entry on the packet's own key), so later packets
//!    of the flow hit step 1. Anything else is dropped: `DropNoFlow` if it
//!    looks like a reply (TCP ACK without SYN, echo reply), else
//!    `DropNoRule`. A TCP SYN (or SYN-ACK) is never judged reversed, so a
//!    server cannot open connections towards a client by posing as its
//!    reply; SCTP and other protocols have no such rule either (their
//!    replies pass only by a reply entry).
//!
//! So a packet costs (step 0 aside: one lookup for a later fragment or a
//! recognised ICMP error) one flow-table lookup plus one hash lookup per prefix
//! length in use on each side and per port level in use; none of that grows
//! with the rule count, which only changes how many entries the hash maps
//! hold (a typical policy of host and site CIDRs with single ports costs
//! two or three source/destination probes and one decision probe; a packet
//! no rule accepts and that step 5 applies to pays for the probes twice). The
//! worst case, a policy using every prefix length, is 33 (IPv4) or 129
//! (IPv6) probes per side, still independent of the rule count. This
//! replaces LPM tries, whose lookup walks a trie that deepens with the
//! number of entries.
//!
//! On accept, the packet's flow key is written as a forward entry and the
//! reverse key as a reply entry (bound to the active policy), so the
//! replies pass (step 1). A new policy applies to every packet, replies
//! included: after a swap, entries of the old policy no longer answer, so a
//! flow the new policy revokes loses its replies too; a flow it still
//! accepts is re-accepted by its next forward packet, which rebinds the
//! reply entry, or by its next reply through step 5. (So a reinstall of an
//! equal policy drops, until the forward side sends again, only replies
//! step 5 does not cover: a SYN-ACK in flight, SCTP and other protocols.) Later packets of an accepted flow refresh the reply entry
//! at most once a second, so it may expire up to a second before its
//! timeout.
//!
//! # Double buffering
//!
//! Each policy map exists twice (`_0`, `_1`), and `ACL_LENS` holds one
//! [`SlotLens`] per slot. `ACL_ACTIVE[0]` names the slot the program reads
//! (bit 0; the bits above count installs, so that every install changes the
//! word); it reads it once per packet, so a packet sees one whole policy. The agent
//! empties and fills the inactive slot (hash maps: batch syscalls, thousands
//! of entries per call), writes its lengths, then flips `ACL_ACTIVE`.
//!
//! # Verdicts of odd packets
//!
//! - non-IP frames (ARP on an Ethernet device): pass (`PassNonIp`); the ACL is
//!   an IP filter, and an overlay (WireGuard) interface carries only IP;
//! - malformed IP (truncated or inconsistent headers, IPv4 IHL < 5, a
//!   transport header too short to read the ports / ICMP id, more than four
//!   IPv6 extension headers): drop (`DropMalformed`);
//! - fragments other than the first: step 0 (`DropFragment` unless their
//!   datagram's first fragment passed). First fragments are decided like
//!   whole packets.

/// Largest number of rules in one policy (size of the per-rule counters).
pub const MAX_RULES: u32 = 16_384;
/// Largest number of decision entries per slot (`DECIDE_<slot>`).
///
/// Hash maps size their bucket array for the maximum (16 bytes a bucket),
/// so the limits are what a big policy needs, not more.
pub const MAX_POLICY_ENTRIES: u32 = 1 << 20;
/// Largest number of distinct source CIDRs per family.
pub const MAX_CIDRS: u32 = 1 << 16;
/// Largest number of (source class, destination CIDR) entries per family.
pub const MAX_DST_ENTRIES: u32 = 1 << 18;
/// Flow-table size (LRU: the least recently used flows are evicted).
pub const MAX_FLOWS: u32 = 1 << 17;
/// Fragmented datagrams remembered at once (LRU). A datagram's fragments
/// follow its first within milliseconds, so this only needs to cover the
/// datagrams in flight.
pub const MAX_FRAGS: u32 = 1 << 14;

/// Decision level of the any-protocol, any-port entry (levels 0..=16 are
/// the port prefix bits of a one-protocol entry).
pub const LEVEL_ANY_PROTO: u8 = 0xff;
/// Number of IPv4 prefix lengths (0..=32).
pub const LENS4: usize = 33;
/// Number of IPv6 prefix lengths (0..=128).
pub const LENS6: usize = 129;
/// Number of port levels (0..=16 prefix bits).
pub const PORT_LEVELS: usize = 17;

/// Key of `SRCH4_<slot>`: an IPv4 source CIDR.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SrcKey4 {
    /// Prefix length (0..=32).
    pub prefix_len: u32,
    /// The address with the bits past `prefix_len` zero.
    pub addr: [u8; 4],
}

/// Key of `SRCH6_<slot>`: an IPv6 source CIDR.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SrcKey6 {
    /// Prefix length (0..=128).
    pub prefix_len: u32,
    /// The address with the bits past `prefix_len` zero.
    pub addr: [u8; 16],
}

/// Key of `DSTH4_<slot>`: an IPv4 destination CIDR under a source class.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct DstKey4 {
    /// Source class.
    pub src_class: u32,
    /// Prefix length (0..=32).
    pub prefix_len: u32,
    /// The address with the bits past `prefix_len` zero.
    pub addr: [u8; 4],
}

/// Key of `DSTH6_<slot>`: an IPv6 destination CIDR under a source class.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct DstKey6 {
    /// Source class.
    pub src_class: u32,
    /// Prefix length (0..=128).
    pub prefix_len: u32,
    /// The address with the bits past `prefix_len` zero.
    pub addr: [u8; 16],
}

/// Key of `DECIDE_<slot>` (hash map).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PolicyKey {
    /// Source class, never 0.
    pub src_class: u32,
    /// Destination class, never 0.
    pub dst_class: u32,
    /// Destination port masked to `level` bits (network order; zero for
    /// level 0 and [`LEVEL_ANY_PROTO`]).
    pub port: [u8; 2],
    /// IP protocol number (ICMPv6 is 58); zero for [`LEVEL_ANY_PROTO`].
    pub proto: u8,
    /// Port prefix bits (0..=16), or [`LEVEL_ANY_PROTO`].
    pub level: u8,
}

/// `ACL_LENS[slot]`: which prefix lengths and port levels the slot's
/// entries use, so the program probes only those (longest first), with the
/// matching masks. The masks are precomputed here rather than derived from
/// the lengths in the program, which would take branches in every probe.
/// Masks are stored as native integers read from the big-endian mask bytes
/// (`u64::from_ne_bytes`), so ANDing them with an address read the same way
/// masks it byte for byte on any host.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SlotLens {
    /// Network masks of `src6` (two halves each).
    pub src6_mask: [[u64; 2]; LENS6],
    /// Network masks of `dst6`.
    pub dst6_mask: [[u64; 2]; LENS6],
    /// Network masks of `src4`.
    pub src4_mask: [u32; LENS4],
    /// Network masks of `dst4`.
    pub dst4_mask: [u32; LENS4],
    /// Port masks of `ports`, as numbers (the port is masked as a number).
    pub ports_mask: [u16; PORT_LEVELS],
    /// IPv4 source prefix lengths, longest first (`n_src4` valid).
    pub src4: [u8; LENS4],
    /// IPv4 destination prefix lengths, longest first (`n_dst4` valid).
    pub dst4: [u8; LENS4],
    /// IPv6 source prefix lengths, longest first (`n_src6` valid).
    pub src6: [u8; LENS6],
    /// IPv6 destination prefix lengths, longest first (`n_dst6` valid).
    pub dst6: [u8; LENS6],
    /// One-protocol port levels, most specific first (`n_ports` valid).
    pub ports: [u8; PORT_LEVELS],
    /// Valid entries of `src4`.
    pub n_src4: u8,
    /// Valid entries of `dst4`.
    pub n_dst4: u8,
    /// Valid entries of `src6`.
    pub n_src6: u8,
    /// Valid entries of `dst6`.
    pub n_dst6: u8,
    /// Valid entries of `ports`.
    pub n_ports: u8,
    /// 1 when the slot has any-protocol entries.
    pub any_proto: u8,
    /// Zero (no implicit padding: the size is a multiple of 8).
    pub pad: [u8; 3],
}

const _: () = assert!(size_of::<SlotLens>().is_multiple_of(8), "SlotLens must have no trailing padding");

impl SlotLens {
    /// No lengths: every lookup misses (default deny).
    pub const EMPTY: Self = Self {
        src6_mask: [[0; 2]; LENS6],
        dst6_mask: [[0; 2]; LENS6],
        src4_mask: [0; LENS4],
        dst4_mask: [0; LENS4],
        ports_mask: [0; PORT_LEVELS],
        src4: [0; LENS4],
        dst4: [0; LENS4],
        src6: [0; LENS6],
        dst6: [0; LENS6],
        ports: [0; PORT_LEVELS],
        n_src4: 0,
        n_dst4: 0,
        n_src6: 0,
        n_dst6: 0,
        n_ports: 0,
        any_proto: 0,
        pad: [0; 3],
    };
}

impl Default for SlotLens {
    fn default() -> Self {
        Self::EMPTY
    }
}

/// The first `len` bits set, the rest clear, as `N` big-endian bytes.
#[must_use]
pub fn prefix_mask<const N: usize>(len: u8) -> [u8; N] {
    let mut m = [0u8; N];
    let mut left = usize::from(len);
    for b in &mut m {
        let bits = left.min(8);
        *b = if bits == 0 { 0 } else { 0xffu8 << (8 - bits) };
        left -= bits;
    }
    m
}

/// Value of `DECIDE_<slot>`: which rule decided.
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
/// protocols have zero ports. Ports are stored as on the wire. Aligned to 8
/// (same size and layout, no padding): the program then builds and copies
/// keys in words, not byte by byte.
#[repr(C, align(8))]
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
    /// Forward entries: the expiry last written into the replies' entry
    /// (refreshed at most once a second). 0 for reply entries.
    pub reverse_until_ns: u64,
    /// Index of the rule that accepted the flow's first packet.
    pub rule_index: u32,
    /// `ACL_ACTIVE[0]` when the flow was accepted: a forward entry is used
    /// only while that word is unchanged, i.e. under the same policy.
    pub active: u32,
    /// A [`FlowKind`].
    pub kind: u32,
    /// Zero.
    pub pad: u32,
}

/// Key of the fragment table (`ACL_FRAGS`, value: the `bpf_ktime` after
/// which the entry is stale): a datagram whose first fragment passed.
/// Aligned to 8 like [`FlowKey`].
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FragKey {
    /// Source address (IPv4 in the first four bytes, rest zero).
    pub src: [u8; 16],
    /// Destination address.
    pub dst: [u8; 16],
    /// Identification as on the wire (IPv4: 16 bits in the last two bytes;
    /// IPv6: the fragment header's 32 bits).
    pub id: [u8; 4],
    /// IPv4: the IP protocol (the identification is unique per source,
    /// destination and protocol). IPv6: zero; the identification is unique
    /// per source and destination (RFC 8200), and the fragment header's
    /// next header is not the transport protocol when more extension
    /// headers follow it.
    pub proto: u8,
    /// 4 or 6.
    pub family: u8,
    /// Zero.
    pub pad: [u8; 2],
}

/// What a flow-table entry stands for.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FlowKind {
    /// The replies of an accepted flow (keyed by the reverse flow key).
    Reply = 0,
    /// An accepted flow itself (keyed by its own flow key): its later
    /// packets take the rule recorded here instead of the policy lookups,
    /// as long as the policy that accepted it is active.
    Forward = 1,
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
    /// Accepted as part of an accepted flow: a reply (including one
    /// accepted by the reversed tuple), a later fragment of a datagram
    /// whose first fragment passed, or an ICMP error about a packet of the
    /// flow.
    AcceptEstablished = 1,
    /// No rule matched (default deny).
    DropNoRule = 2,
    /// No rule matched and the packet looks like a reply (TCP without SYN,
    /// echo reply) of a flow that was never accepted.
    DropNoFlow = 3,
    /// Malformed IP packet.
    DropMalformed = 4,
    /// Non-first fragment of a datagram whose first fragment did not pass
    /// (or was not seen).
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
    /// Active slot in bit 0, install count above (`Array<u32>`, one entry).
    pub const ACTIVE: &str = "ACL_ACTIVE";
    /// [`super::AclConfig`] (`Array`, one entry).
    pub const CONFIG: &str = "ACL_CONFIG";
    /// [`super::SlotMeta`] per slot (`Array`, two entries).
    pub const SLOT_META: &str = "SLOT_META";
    /// Flow table (`LruHashMap<FlowKey, FlowValue>`; "2": the value grew,
    /// so an agent adopting older pins starts a fresh table).
    pub const FLOWS: &str = "ACL_FLOWS2";
    /// Fragment table (`LruHashMap<FragKey, u64>`).
    pub const FRAGS: &str = "ACL_FRAGS";
    /// Verdict counters (`PerCpuArray<PacketCount>`).
    pub const VERDICTS: &str = "ACL_VERDICTS";
    /// MSS counters (`PerCpuArray<u64>`).
    pub const MSS_STATS: &str = "MSS_STATS";
    /// [`super::SlotLens`] per slot (`Array`, two entries).
    pub const LENS: &str = "ACL_LENS";
    // The hash maps below replaced LPM tries of the same role; the names
    // changed with the type so that an agent adopting the pins of an older
    // one creates fresh maps (then empty: default deny until it installs)
    // instead of reusing a trie with another key layout.
    /// IPv4 source classes per slot (`HashMap<SrcKey4, u32>`).
    pub const SRC4: [&str; 2] = ["SRCH4_0", "SRCH4_1"];
    /// IPv6 source classes per slot (`HashMap<SrcKey6, u32>`).
    pub const SRC6: [&str; 2] = ["SRCH6_0", "SRCH6_1"];
    /// IPv4 destination classes per source class, per slot.
    pub const DST4: [&str; 2] = ["DSTH4_0", "DSTH4_1"];
    /// IPv6 destination classes per source class, per slot.
    pub const DST6: [&str; 2] = ["DSTH6_0", "DSTH6_1"];
    /// Decision maps per slot (`HashMap<PolicyKey, PolicyValue>`).
    pub const POLICY: [&str; 2] = ["DECIDE_0", "DECIDE_1"];
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
    unsafe impl aya::Pod for super::SrcKey4 {}
    unsafe impl aya::Pod for super::SrcKey6 {}
    unsafe impl aya::Pod for super::SlotLens {}
    unsafe impl aya::Pod for super::PolicyValue {}
    unsafe impl aya::Pod for super::DstKey4 {}
    unsafe impl aya::Pod for super::DstKey6 {}
    unsafe impl aya::Pod for super::FlowKey {}
    unsafe impl aya::Pod for super::FlowValue {}
    unsafe impl aya::Pod for super::FragKey {}
    unsafe impl aya::Pod for super::AclConfig {}
    unsafe impl aya::Pod for super::SlotMeta {}
}
