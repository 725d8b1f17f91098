//! The overlay ACL (TC, both directions of the overlay interface) with the
//! MSS clamp. The map layout and the lookup precedence are documented in
//! `mesh_common::acl`; this module follows it step by step.

mod mss;
mod parse;

use aya_ebpf::{
    bindings::{BPF_F_NO_PREALLOC, TC_ACT_OK, TC_ACT_SHOT},
    cty::c_void,
    helpers::{bpf_ktime_get_coarse_ns, bpf_loop},
    macros::{classifier, map},
    maps::{Array, HashMap, LruHashMap, PerCpuArray},
    programs::TcContext,
};
use mesh_common::{
    acl::{
        AclConfig, AclVerdict, DstKey4, DstKey6, FlowKey, FlowKind, FlowValue, FragKey, LENS4, LENS6, LEVEL_ANY_PROTO,
        MAX_CIDRS, MAX_DST_ENTRIES, MAX_FLOWS, MAX_FRAGS, MAX_POLICY_ENTRIES, MAX_RULES, PORT_LEVELS, PolicyKey,
        PolicyValue, SlotLens, SlotMeta, SrcKey4, SrcKey6,
    },
    counter::PacketCount,
};
use parse::{FRAG_FIRST, FRAG_LATER, Packet, TCP_FLAG_ACK, TCP_FLAG_SYN, addr_bytes};

const NS_PER_S: u64 = 1_000_000_000;
/// The policy maps allocate entries on insert: a slot's capacity would
/// otherwise be preallocated up front, twice, for policies that are mostly
/// small.
const NO_PREALLOC: u32 = BPF_F_NO_PREALLOC;
/// [`lookup_active`]'s "no rule matched".
const NO_RULE: u32 = u32::MAX;

#[map(name = "ACL_ACTIVE")]
static ACL_ACTIVE: Array<u32> = Array::with_max_entries(1, 0);
#[map(name = "ACL_CONFIG")]
static ACL_CONFIG: Array<AclConfig> = Array::with_max_entries(1, 0);
#[map(name = "SLOT_META")]
static SLOT_META: Array<SlotMeta> = Array::with_max_entries(2, 0);
#[map(name = "ACL_LENS")]
static ACL_LENS: Array<SlotLens> = Array::with_max_entries(2, 0);
#[map(name = "ACL_FLOWS2")]
static ACL_FLOWS: LruHashMap<FlowKey, FlowValue> = LruHashMap::with_max_entries(MAX_FLOWS, 0);
#[map(name = "ACL_FRAGS")]
static ACL_FRAGS: LruHashMap<FragKey, u64> = LruHashMap::with_max_entries(MAX_FRAGS, 0);
#[map(name = "ACL_VERDICTS")]
static ACL_VERDICTS: PerCpuArray<PacketCount> = PerCpuArray::with_max_entries(AclVerdict::COUNT, 0);
#[map(name = "MSS_STATS")]
static MSS_STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(mesh_common::acl::MssEvent::COUNT, 0);

#[map(name = "SRCH4_0")]
static SRC4_0: HashMap<SrcKey4, u32> = HashMap::with_max_entries(MAX_CIDRS, NO_PREALLOC);
#[map(name = "SRCH4_1")]
static SRC4_1: HashMap<SrcKey4, u32> = HashMap::with_max_entries(MAX_CIDRS, NO_PREALLOC);
#[map(name = "DSTH4_0")]
static DST4_0: HashMap<DstKey4, u32> = HashMap::with_max_entries(MAX_DST_ENTRIES, NO_PREALLOC);
#[map(name = "DSTH4_1")]
static DST4_1: HashMap<DstKey4, u32> = HashMap::with_max_entries(MAX_DST_ENTRIES, NO_PREALLOC);
#[map(name = "SRCH6_0")]
static SRC6_0: HashMap<SrcKey6, u32> = HashMap::with_max_entries(MAX_CIDRS, NO_PREALLOC);
#[map(name = "SRCH6_1")]
static SRC6_1: HashMap<SrcKey6, u32> = HashMap::with_max_entries(MAX_CIDRS, NO_PREALLOC);
#[map(name = "DSTH6_0")]
static DST6_0: HashMap<DstKey6, u32> = HashMap::with_max_entries(MAX_DST_ENTRIES, NO_PREALLOC);
#[map(name = "DSTH6_1")]
static DST6_1: HashMap<DstKey6, u32> = HashMap::with_max_entries(MAX_DST_ENTRIES, NO_PREALLOC);
#[map(name = "DECIDE_0")]
static POLICY_0: HashMap<PolicyKey, PolicyValue> = HashMap::with_max_entries(MAX_POLICY_ENTRIES, NO_PREALLOC);
#[map(name = "DECIDE_1")]
static POLICY_1: HashMap<PolicyKey, PolicyValue> = HashMap::with_max_entries(MAX_POLICY_ENTRIES, NO_PREALLOC);
#[map(name = "RULE_STATS_0")]
static RULE_STATS_0: PerCpuArray<PacketCount> = PerCpuArray::with_max_entries(MAX_RULES, 0);
#[map(name = "RULE_STATS_1")]
static RULE_STATS_1: PerCpuArray<PacketCount> = PerCpuArray::with_max_entries(MAX_RULES, 0);
// Read by the agent only (rule index -> rule id), declared here so that it is
// created and pinned with the rest.
#[map(name = "RULE_IDS_0")]
static RULE_IDS_0: Array<u32> = Array::with_max_entries(MAX_RULES, 0);
#[map(name = "RULE_IDS_1")]
static RULE_IDS_1: Array<u32> = Array::with_max_entries(MAX_RULES, 0);

/// ACL on an L3 device (WireGuard, TUN): the buffer starts at the IP header.
#[classifier]
pub(crate) fn acl_tc_ip(ctx: TcContext) -> i32 {
    acl(&ctx, 0)
}

/// ACL on an Ethernet device (veth in tests and benchmarks).
#[classifier]
pub(crate) fn acl_tc_eth(ctx: TcContext) -> i32 {
    acl(&ctx, 14)
}

/// The empty program the benchmarks compare against: every packet passes.
#[classifier]
pub(crate) fn pass_tc(_ctx: TcContext) -> i32 {
    TC_ACT_OK
}

#[inline(always)]
fn acl(ctx: &TcContext, l3_off: usize) -> i32 {
    let len = u64::from(ctx.len());
    let config = ACL_CONFIG.get(0).copied().unwrap_or(AclConfig::DEFAULT);
    let verdict = match parse::parse(ctx, l3_off) {
        Ok(packet) => {
            let verdict = decide(ctx, &packet, len, &config);
            if verdict.passes() {
                if packet.frag == FRAG_FIRST {
                    frag_remember(&packet, config.other_timeout_s);
                }
                mss::clamp(ctx, &packet, config.mss_mtu, &MSS_STATS);
            }
            verdict
        }
        Err(verdict) => verdict,
    };
    count(&ACL_VERDICTS, verdict as u32, len);
    if verdict.passes() { TC_ACT_OK } else { TC_ACT_SHOT }
}

#[inline(always)]
fn decide(ctx: &TcContext, p: &Packet, len: u64, config: &AclConfig) -> AclVerdict {
    let timeout_s = if p.proto == parse::PROTO_TCP { config.tcp_timeout_s } else { config.other_timeout_s };
    // The coarse clock (one tick, 1-4 ms, of resolution) is plenty for
    // timeouts in seconds and, unlike `bpf_ktime_get_ns`, reads no clock
    // source.
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    let expires_ns = now + u64::from(timeout_s) * NS_PER_S;
    // The active policy, read once: slot in bit 0, install epoch above.
    let active = ACL_ACTIVE.get(0).copied().unwrap_or(0);

    // 0. Parts of accepted flows that carry no flow key of their own: the
    //    later fragments of a datagram whose first fragment passed, ICMP
    //    errors about a packet of an accepted flow.
    if p.frag == FRAG_LATER {
        return if frag_check(p, now) { AclVerdict::AcceptEstablished } else { AclVerdict::DropFragment };
    }
    if p.icmp_error && related(ctx, p, active, now) {
        return AclVerdict::AcceptEstablished;
    }

    // 1. A reply of an accepted flow, or a later packet of a flow the
    //    active policy accepted.
    match flow_check(p, active, now, expires_ns) {
        FLOW_REPLY => return AclVerdict::AcceptEstablished,
        NO_RULE => {}
        rule_index => {
            count_rule(active & 1, rule_index, len);
            return AclVerdict::AcceptRule;
        }
    }

    // 2-4. The active policy.
    let rule_index = if active & 1 == 0 { lookup::<0>(p, false) } else { lookup::<1>(p, false) };
    if rule_index == NO_RULE {
        // 5. A reply whose flow this ACL has not seen (set up through
        //    another gateway, or under an older policy).
        if reply_rule(p, active, expires_ns) {
            return AclVerdict::AcceptEstablished;
        }
        let reply_like = (p.proto == parse::PROTO_TCP && p.tcp_flags & (TCP_FLAG_SYN | TCP_FLAG_ACK) == TCP_FLAG_ACK)
            || (p.echo && parse::echo_reply_type(p.family, p.icmp_type).is_none());
        return if reply_like { AclVerdict::DropNoFlow } else { AclVerdict::DropNoRule };
    }
    count_rule(active & 1, rule_index, len);
    flow_accept(p, rule_index, active, expires_ns);
    AclVerdict::AcceptRule
}

/// Bumps rule `rule_index`'s counter in slot `slot`.
#[inline(always)]
fn count_rule(slot: u32, rule_index: u32, len: u64) {
    count(if slot == 0 { &RULE_STATS_0 } else { &RULE_STATS_1 }, rule_index, len);
}

/// [`flow_check`]'s "a reply of an accepted flow".
const FLOW_REPLY: u32 = u32::MAX - 1;

/// Step 1 on the packet's own flow key: [`FLOW_REPLY`] for a reply of an
/// accepted flow, the rule index for a later packet of a flow that the
/// policy active now (`active`, the `ACL_ACTIVE` word) accepted, else
/// [`NO_RULE`]. Refreshes what it finds. Out of line, like everything that
/// holds flow keys, to keep them off the frame the MSS rewrite stacks on.
#[inline(never)]
fn flow_check(p: &Packet, active: u32, now: u64, expires_ns: u64) -> u32 {
    let key = flow_key(p);
    let Some(flow) = ACL_FLOWS.get_ptr_mut(&key) else { return NO_RULE };
    // SAFETY: a pointer into the map value, valid for this program run;
    // concurrent writers store the same kind of values.
    let flow = unsafe { &mut *flow };
    if flow.expires_ns <= now {
        return NO_RULE;
    }
    // An entry answers only under the policy that made it: after a swap
    // the packet is decided again (a reply by the reversed tuple, step 5),
    // so a revoked flow's replies stop with it.
    if flow.active != active {
        return NO_RULE;
    }
    if flow.kind == FlowKind::Reply as u32 {
        flow.expires_ns = expires_ns;
        return FLOW_REPLY;
    }
    flow.expires_ns = expires_ns;
    let rule_index = flow.rule_index;
    // Keep the replies' entry alive, at most once a second per flow (it
    // then expires up to a second early, and an entry the LRU evicted comes
    // back within a second).
    if flow.reverse_until_ns + NS_PER_S < expires_ns {
        flow.reverse_until_ns = expires_ns;
        refresh_reverse(p, rule_index, active, expires_ns);
    }
    rule_index
}

/// A packet the policy accepted: remember its flow (so that its later
/// packets skip the policy while it stays active) and let the replies in.
#[inline(never)]
fn flow_accept(p: &Packet, rule_index: u32, active: u32, expires_ns: u64) {
    remember(&flow_key(p), rule_index, active, expires_ns);
    refresh_reverse(p, rule_index, active, expires_ns);
}

/// Writes the forward entry of an accepted flow.
#[inline(always)]
fn remember(key: &FlowKey, rule_index: u32, active: u32, expires_ns: u64) {
    let forward = FlowValue {
        expires_ns,
        reverse_until_ns: expires_ns,
        rule_index,
        active,
        kind: FlowKind::Forward as u32,
        pad: 0,
    };
    // A full LRU evicts the least recently used flow; an error here only
    // means the next packet is decided by the policy again.
    let _ = ACL_FLOWS.insert(key, &forward, 0);
}

/// Step 5: whether `p`, which no rule accepts, is a reply-direction packet
/// (TCP without SYN, UDP, ICMP(v6) echo reply) of a flow the active policy
/// accepts in the other direction: a connection set up through another
/// gateway (HA failover) or under an older policy. If so, the flow's
/// entries are written as if its forward packet had just been accepted
/// (forward entry on the reversed tuple, reply entry on `p`'s key), so its
/// later packets hit the flow table. The lookup runs in this frame, not in
/// an out-of-line helper's: its probe loop's frames stack on it, and the
/// three would pass the 512 bytes.
#[inline(always)]
fn reply_rule(p: &Packet, active: u32, expires_ns: u64) -> bool {
    let candidate = match p.proto {
        parse::PROTO_TCP => p.tcp_flags & TCP_FLAG_SYN == 0,
        parse::PROTO_UDP => true,
        _ => p.echo && parse::echo_reply_type(p.family, p.icmp_type).is_none(),
    };
    if !candidate {
        return false;
    }
    let rule_index = if active & 1 == 0 { lookup::<0>(p, true) } else { lookup::<1>(p, true) };
    if rule_index == NO_RULE {
        return false;
    }
    reply_accept(p, rule_index, active, expires_ns);
    true
}

/// Writes the entries of step 5 (see [`reply_rule`]).
#[inline(never)]
fn reply_accept(p: &Packet, rule_index: u32, active: u32, expires_ns: u64) {
    let mut forward = flow_key(p);
    (forward.src, forward.dst) = (forward.dst, forward.src);
    forward.sport = p.dport;
    forward.dport = p.sport;
    if p.echo {
        forward.sport = p.sport;
        forward.dport = [0, parse::echo_counterpart(p.family, p.icmp_type)];
    }
    remember(&forward, rule_index, active, expires_ns);
    write_reply(&flow_key(p), rule_index, active, expires_ns);
}

/// Writes or refreshes the entry the replies of `p`'s flow will find.
#[inline(always)]
fn refresh_reverse(p: &Packet, rule_index: u32, active: u32, expires_ns: u64) {
    if let Some(reverse) = reverse_key(p) {
        write_reply(&reverse, rule_index, active, expires_ns);
    }
}

/// Writes or refreshes (and binds to the policy `active`) the reply entry
/// at `reverse`.
#[inline(always)]
fn write_reply(reverse: &FlowKey, rule_index: u32, active: u32, expires_ns: u64) {
    match ACL_FLOWS.get_ptr_mut(reverse) {
        // SAFETY: as in `flow_check`.
        Some(existing) if unsafe { (*existing).kind } == FlowKind::Reply as u32 => unsafe {
            (*existing).expires_ns = expires_ns;
            (*existing).active = active;
            (*existing).rule_index = rule_index;
        },
        // Absent, or the other direction's forward entry: the reverse
        // direction is now a reply (as it would have been before forward
        // entries existed).
        _ => {
            let value =
                FlowValue { expires_ns, reverse_until_ns: 0, rule_index, active, kind: FlowKind::Reply as u32, pad: 0 };
            // As in `flow_accept`: an error only costs this flow's replies.
            let _ = ACL_FLOWS.insert(reverse, &value, 0);
        }
    }
}

/// Step 0 for an ICMP(v6) error: whether the packet it quotes belongs to a
/// flow with a live entry under the active policy. The quoted packet is
/// one the error's receiver sent through this ACL, so its own key holds a
/// forward entry (it was a packet of a flow accepted here) or a reply
/// entry (it was a reply of one): either direction of an accepted flow.
#[inline(never)]
fn related(ctx: &TcContext, p: &Packet, active: u32, now: u64) -> bool {
    let Some(inner) = parse::embedded(ctx, p) else { return false };
    // SAFETY: a copy is taken at once.
    unsafe { ACL_FLOWS.get(&flow_key(&inner)) }.is_some_and(|f| f.expires_ns > now && f.active == active)
}

/// The key of the datagram a fragment belongs to.
#[inline(always)]
fn frag_key(p: &Packet) -> FragKey {
    FragKey {
        src: addr_bytes(p.src),
        dst: addr_bytes(p.dst),
        id: p.frag_id,
        // See `FragKey::proto`.
        proto: if p.family == 4 { p.proto } else { 0 },
        family: p.family,
        pad: [0; 2],
    }
}

/// A first fragment passed: its datagram's later fragments may follow.
#[inline(never)]
fn frag_remember(p: &Packet, timeout_s: u32) {
    // SAFETY: no arguments.
    let expires_ns = unsafe { bpf_ktime_get_coarse_ns() } + u64::from(timeout_s) * NS_PER_S;
    // As in `flow_accept`: an error only costs this datagram's tail.
    let _ = ACL_FRAGS.insert(&frag_key(p), &expires_ns, 0);
}

/// Step 0 for a non-first fragment: whether its datagram's first fragment
/// passed (and not longer ago than a flow's timeout). Tracked rather than
/// passed unconditionally (Tailscale's way): otherwise any overlay node
/// could fill the reassembly queues of hosts the policy keeps it from; the
/// cost is a later fragment that overtakes its first being dropped (see
/// `mesh_common::acl`, step 0).
#[inline(never)]
fn frag_check(p: &Packet, now: u64) -> bool {
    // SAFETY: a copy is taken at once.
    unsafe { ACL_FRAGS.get(&frag_key(p)) }.is_some_and(|&expires| expires > now)
}

/// The context of one probe loop (`bpf_loop`): the address, the source
/// class (destination and decision probes), what was found.
#[repr(C)]
struct Probe {
    addr: [u64; 2],
    src_class: u32,
    /// Destination class (decision probes) or the protocol/port word.
    arg: u32,
    /// The class or rule index found, `found_any` says whether.
    found: u32,
    found_any: u32,
}

/// Runs `round` for `rounds` rounds on `probe`; `bpf_loop` (Linux 5.17+)
/// makes the verifier check a round once, where an open-coded loop of up to
/// 129 rounds is checked round by round for every way into it.
#[inline(always)]
fn probe_loop(rounds: u8, round: extern "C" fn(u64, *mut c_void) -> i64, probe: &mut Probe) -> Option<u32> {
    if rounds == 0 {
        return None;
    }
    // SAFETY: `round` is a static function and `probe` lives across the call.
    unsafe {
        bpf_loop(u32::from(rounds), round as *mut c_void, core::ptr::from_mut(probe).cast(), 0);
    }
    let found = (probe.found_any != 0).then_some(probe.found);
    probe.found_any = 0;
    found
}

/// Steps 2-4 on the maps of slot `S`, for `p` or (`reversed`) for `p` with
/// source and destination (addresses and ports) swapped. Out of line: its probe context and
/// `bpf_loop`'s bookkeeping then live in their own small stack frame, not
/// in the caller's, which the MSS rewrite's frame is stacked on (512 bytes
/// combined; one probe context is reused for the same reason).
#[inline(never)]
fn lookup<const S: u32>(p: &Packet, reversed: bool) -> u32 {
    let Some(lens) = ACL_LENS.get(S) else { return NO_RULE };
    let v6 = p.family == 6;
    let (src, dst, dport) = if reversed { (p.dst, p.src, p.sport) } else { (p.src, p.dst, p.dport) };
    let mut probe = Probe { addr: src, src_class: 0, arg: 0, found: 0, found_any: 0 };
    let src_class = if v6 {
        probe_loop(lens.n_src6, src6_round::<S>, &mut probe)
    } else {
        probe_loop(lens.n_src4, src4_round::<S>, &mut probe)
    };
    let Some(src_class) = src_class else { return NO_RULE };
    probe.addr = dst;
    probe.src_class = src_class;
    let dst_class = if v6 {
        probe_loop(lens.n_dst6, dst6_round::<S>, &mut probe)
    } else {
        probe_loop(lens.n_dst4, dst4_round::<S>, &mut probe)
    };
    let Some(dst_class) = dst_class else { return NO_RULE };
    let port = if p.has_ports() { u16::from_be_bytes(dport) } else { 0 };
    probe.addr = [u64::from((u32::from(p.proto) << 16) | u32::from(port)), 0];
    probe.arg = dst_class;
    if let Some(rule_index) = probe_loop(lens.n_ports, port_round::<S>, &mut probe) {
        return rule_index;
    }
    if lens.any_proto == 0 {
        return NO_RULE;
    }
    let map = if S == 0 { &POLICY_0 } else { &POLICY_1 };
    let key = PolicyKey { src_class, dst_class, port: [0; 2], proto: 0, level: LEVEL_ANY_PROTO };
    // SAFETY: a copy is taken at once; the agent never changes entries of a
    // slot packets read.
    unsafe { map.get(&key) }.map_or(NO_RULE, |v| v.rule_index)
}

/// Records a probe hit and stops the loop.
#[inline(always)]
fn hit(probe: &mut Probe, value: u32) -> i64 {
    probe.found = value;
    probe.found_any = 1;
    1
}

/// The probe context behind `bpf_loop`'s pointer.
#[inline(always)]
fn probe_of<'a>(ctx: *mut c_void) -> &'a mut Probe {
    // SAFETY: every loop is started by `probe_loop` with a `&mut Probe`.
    unsafe { &mut *ctx.cast::<Probe>() }
}

/// Step 2, IPv4, round `i`: the `i`-th longest source prefix length in use.
extern "C" fn src4_round<const S: u32>(i: u64, ctx: *mut c_void) -> i64 {
    let probe = probe_of(ctx);
    let (Some(lens), Ok(i)) = (ACL_LENS.get(S), usize::try_from(i)) else { return 1 };
    if i >= LENS4 {
        return 1;
    }
    let map = if S == 0 { &SRC4_0 } else { &SRC4_1 };
    let addr = (probe.addr[0] as u32) & lens.src4_mask[i];
    let key = SrcKey4 { prefix_len: u32::from(lens.src4[i]), addr: addr.to_ne_bytes() };
    // SAFETY: as in `lookup`.
    match unsafe { map.get(&key) } {
        Some(c) => hit(probe, *c),
        None => 0,
    }
}

/// Step 3, IPv4, round `i`.
extern "C" fn dst4_round<const S: u32>(i: u64, ctx: *mut c_void) -> i64 {
    let probe = probe_of(ctx);
    let (Some(lens), Ok(i)) = (ACL_LENS.get(S), usize::try_from(i)) else { return 1 };
    if i >= LENS4 {
        return 1;
    }
    let map = if S == 0 { &DST4_0 } else { &DST4_1 };
    let addr = (probe.addr[0] as u32) & lens.dst4_mask[i];
    let key = DstKey4 { src_class: probe.src_class, prefix_len: u32::from(lens.dst4[i]), addr: addr.to_ne_bytes() };
    // SAFETY: as in `lookup`.
    match unsafe { map.get(&key) } {
        Some(c) => hit(probe, *c),
        None => 0,
    }
}

/// The two masked halves of an IPv6 address as key bytes.
#[inline(always)]
fn masked6(addr: &[u64; 2], mask: &[u64; 2]) -> [u8; 16] {
    let (h, l) = ((addr[0] & mask[0]).to_ne_bytes(), (addr[1] & mask[1]).to_ne_bytes());
    [h[0], h[1], h[2], h[3], h[4], h[5], h[6], h[7], l[0], l[1], l[2], l[3], l[4], l[5], l[6], l[7]]
}

/// Step 2, IPv6, round `i`.
extern "C" fn src6_round<const S: u32>(i: u64, ctx: *mut c_void) -> i64 {
    let probe = probe_of(ctx);
    let (Some(lens), Ok(i)) = (ACL_LENS.get(S), usize::try_from(i)) else { return 1 };
    if i >= LENS6 {
        return 1;
    }
    let map = if S == 0 { &SRC6_0 } else { &SRC6_1 };
    let key = SrcKey6 { prefix_len: u32::from(lens.src6[i]), addr: masked6(&probe.addr, &lens.src6_mask[i]) };
    // SAFETY: as in `lookup`.
    match unsafe { map.get(&key) } {
        Some(c) => hit(probe, *c),
        None => 0,
    }
}

/// Step 3, IPv6, round `i`.
extern "C" fn dst6_round<const S: u32>(i: u64, ctx: *mut c_void) -> i64 {
    let probe = probe_of(ctx);
    let (Some(lens), Ok(i)) = (ACL_LENS.get(S), usize::try_from(i)) else { return 1 };
    if i >= LENS6 {
        return 1;
    }
    let map = if S == 0 { &DST6_0 } else { &DST6_1 };
    let key = DstKey6 {
        src_class: probe.src_class,
        prefix_len: u32::from(lens.dst6[i]),
        addr: masked6(&probe.addr, &lens.dst6_mask[i]),
    };
    // SAFETY: as in `lookup`.
    match unsafe { map.get(&key) } {
        Some(c) => hit(probe, *c),
        None => 0,
    }
}

/// Step 4, round `i`: the `i`-th most specific port level in use.
extern "C" fn port_round<const S: u32>(i: u64, ctx: *mut c_void) -> i64 {
    let probe = probe_of(ctx);
    let (Some(lens), Ok(i)) = (ACL_LENS.get(S), usize::try_from(i)) else { return 1 };
    if i >= PORT_LEVELS {
        return 1;
    }
    let map = if S == 0 { &POLICY_0 } else { &POLICY_1 };
    let proto_port = probe.addr[0] as u32;
    let port = (proto_port as u16) & lens.ports_mask[i];
    let key = PolicyKey {
        src_class: probe.src_class,
        dst_class: probe.arg,
        port: port.to_be_bytes(),
        proto: (proto_port >> 16) as u8,
        level: lens.ports[i],
    };
    // SAFETY: as in `lookup`.
    match unsafe { map.get(&key) } {
        Some(v) => hit(probe, v.rule_index),
        None => 0,
    }
}

/// The flow key of the packet as it is (see `FlowKey`).
#[inline(always)]
fn flow_key(p: &Packet) -> FlowKey {
    FlowKey {
        src: addr_bytes(p.src),
        dst: addr_bytes(p.dst),
        sport: p.sport,
        dport: p.dport,
        proto: p.proto,
        family: p.family,
        pad: [0; 2],
    }
}

/// The key the replies of this packet's flow will carry, if it has replies:
/// ports swapped; an echo request's replies are echo replies with its
/// identifier; other ICMP messages start no flow.
#[inline(always)]
fn reverse_key(p: &Packet) -> Option<FlowKey> {
    let (sport, dport) = if parse::is_icmp_of_family(p.proto, p.family) {
        let reply = parse::echo_reply_type(p.family, p.icmp_type)?;
        if !p.echo {
            return None;
        }
        (p.sport, [0, reply])
    } else {
        (p.dport, p.sport)
    };
    Some(FlowKey {
        src: addr_bytes(p.dst),
        dst: addr_bytes(p.src),
        sport,
        dport,
        proto: p.proto,
        family: p.family,
        pad: [0; 2],
    })
}

#[inline(always)]
fn count(map: &PerCpuArray<PacketCount>, index: u32, len: u64) {
    if let Some(c) = map.get_ptr_mut(index) {
        // SAFETY: per-CPU value, only this CPU writes it during the run.
        let c = unsafe { &mut *c };
        c.packets += 1;
        c.bytes += len;
    }
}
