//! The overlay ACL (TC, both directions of the overlay interface) with the
//! MSS clamp. The map layout and the lookup precedence are documented in
//! `mesh_common::acl`; this module follows it step by step.

mod mss;
mod parse;

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT},
    helpers::bpf_ktime_get_ns,
    macros::{classifier, map},
    maps::{Array, LpmTrie, LruHashMap, PerCpuArray, lpm_trie::Key},
    programs::TcContext,
};
use mesh_common::{
    acl::{
        AclConfig, AclVerdict, DstKey4, DstKey6, FlowKey, FlowValue, MAX_CIDRS, MAX_DST_ENTRIES, MAX_FLOWS,
        MAX_POLICY_ENTRIES, MAX_RULES, POLICY_PREFIX_FULL, PolicyKey, PolicyValue, SlotMeta,
    },
    counter::PacketCount,
};
use parse::{Packet, TCP_FLAG_ACK, TCP_FLAG_SYN};

const NS_PER_S: u64 = 1_000_000_000;

#[map(name = "ACL_ACTIVE")]
static ACL_ACTIVE: Array<u32> = Array::with_max_entries(1, 0);
#[map(name = "ACL_CONFIG")]
static ACL_CONFIG: Array<AclConfig> = Array::with_max_entries(1, 0);
#[map(name = "SLOT_META")]
static SLOT_META: Array<SlotMeta> = Array::with_max_entries(2, 0);
#[map(name = "ACL_FLOWS")]
static ACL_FLOWS: LruHashMap<FlowKey, FlowValue> = LruHashMap::with_max_entries(MAX_FLOWS, 0);
#[map(name = "ACL_VERDICTS")]
static ACL_VERDICTS: PerCpuArray<PacketCount> = PerCpuArray::with_max_entries(AclVerdict::COUNT, 0);
#[map(name = "MSS_STATS")]
static MSS_STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(mesh_common::acl::MssEvent::COUNT, 0);

#[map(name = "SRC4_0")]
static SRC4_0: LpmTrie<[u8; 4], u32> = LpmTrie::with_max_entries(MAX_CIDRS, 0);
#[map(name = "SRC4_1")]
static SRC4_1: LpmTrie<[u8; 4], u32> = LpmTrie::with_max_entries(MAX_CIDRS, 0);
#[map(name = "DST4_0")]
static DST4_0: LpmTrie<DstKey4, u32> = LpmTrie::with_max_entries(MAX_DST_ENTRIES, 0);
#[map(name = "DST4_1")]
static DST4_1: LpmTrie<DstKey4, u32> = LpmTrie::with_max_entries(MAX_DST_ENTRIES, 0);
#[map(name = "SRC6_0")]
static SRC6_0: LpmTrie<[u8; 16], u32> = LpmTrie::with_max_entries(MAX_CIDRS, 0);
#[map(name = "SRC6_1")]
static SRC6_1: LpmTrie<[u8; 16], u32> = LpmTrie::with_max_entries(MAX_CIDRS, 0);
#[map(name = "DST6_0")]
static DST6_0: LpmTrie<DstKey6, u32> = LpmTrie::with_max_entries(MAX_DST_ENTRIES, 0);
#[map(name = "DST6_1")]
static DST6_1: LpmTrie<DstKey6, u32> = LpmTrie::with_max_entries(MAX_DST_ENTRIES, 0);
#[map(name = "POLICY_0")]
static POLICY_0: LpmTrie<PolicyKey, PolicyValue> = LpmTrie::with_max_entries(MAX_POLICY_ENTRIES, 0);
#[map(name = "POLICY_1")]
static POLICY_1: LpmTrie<PolicyKey, PolicyValue> = LpmTrie::with_max_entries(MAX_POLICY_ENTRIES, 0);
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

/// One policy slot's maps.
struct Slot {
    src4: &'static LpmTrie<[u8; 4], u32>,
    dst4: &'static LpmTrie<DstKey4, u32>,
    src6: &'static LpmTrie<[u8; 16], u32>,
    dst6: &'static LpmTrie<DstKey6, u32>,
    policy: &'static LpmTrie<PolicyKey, PolicyValue>,
    stats: &'static PerCpuArray<PacketCount>,
}

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
            let verdict = decide(&packet, len, &config);
            if verdict.passes() {
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
fn decide(p: &Packet, len: u64, config: &AclConfig) -> AclVerdict {
    let timeout_s = if p.proto == parse::PROTO_TCP { config.tcp_timeout_s } else { config.other_timeout_s };
    let now = unsafe { bpf_ktime_get_ns() };
    let expires_ns = now + u64::from(timeout_s) * NS_PER_S;

    // 1. A reply of an accepted flow.
    let key = flow_key(p);
    if let Some(flow) = ACL_FLOWS.get_ptr_mut(&key) {
        // SAFETY: a pointer into the map value, valid for this program run;
        // concurrent writers only ever store a later expiry.
        let flow = unsafe { &mut *flow };
        if flow.expires_ns > now {
            flow.expires_ns = expires_ns;
            return AclVerdict::AcceptEstablished;
        }
    }

    // 2-4. The active policy, read once.
    let slot = ACL_ACTIVE.get(0).copied().unwrap_or(0);
    let matched = if slot == 0 {
        lookup(
            &Slot {
                src4: &SRC4_0,
                dst4: &DST4_0,
                src6: &SRC6_0,
                dst6: &DST6_0,
                policy: &POLICY_0,
                stats: &RULE_STATS_0,
            },
            p,
            len,
        )
    } else {
        lookup(
            &Slot {
                src4: &SRC4_1,
                dst4: &DST4_1,
                src6: &SRC6_1,
                dst6: &DST6_1,
                policy: &POLICY_1,
                stats: &RULE_STATS_1,
            },
            p,
            len,
        )
    };
    let Some(rule_index) = matched else {
        let reply_like = (p.proto == parse::PROTO_TCP && p.tcp_flags & (TCP_FLAG_SYN | TCP_FLAG_ACK) == TCP_FLAG_ACK)
            || (p.echo && parse::echo_reply_type(p.family, p.icmp_type).is_none());
        return if reply_like { AclVerdict::DropNoFlow } else { AclVerdict::DropNoRule };
    };

    // Accepted: let the replies in.
    if let Some(reverse) = reverse_key(p) {
        let value = FlowValue { expires_ns, rule_index, slot };
        match ACL_FLOWS.get_ptr_mut(&reverse) {
            // SAFETY: as above.
            Some(existing) => unsafe { (*existing).expires_ns = expires_ns },
            None => {
                // A full LRU evicts the least recently used flow; an error
                // here only means this flow's replies will need a rule.
                let _ = ACL_FLOWS.insert(&reverse, &value, 0);
            }
        }
    }
    AclVerdict::AcceptRule
}

/// Steps 2-4 on one slot: the index of the deciding rule, `None` to deny.
#[inline(always)]
fn lookup(slot: &Slot, p: &Packet, len: u64) -> Option<u32> {
    let (src_class, dst_class) = if p.family == 4 {
        let src = [p.src[0], p.src[1], p.src[2], p.src[3]];
        let dst = [p.dst[0], p.dst[1], p.dst[2], p.dst[3]];
        let src_class = *slot.src4.get(Key::new(32, src))?;
        let key = DstKey4 { src_class: src_class.to_be_bytes(), addr: dst };
        (src_class, *slot.dst4.get(Key::new(64, key))?)
    } else {
        let src_class = *slot.src6.get(Key::new(128, p.src))?;
        let key = DstKey6 { src_class: src_class.to_be_bytes(), addr: p.dst };
        (src_class, *slot.dst6.get(Key::new(160, key))?)
    };
    let port = if p.has_ports() { p.dport } else { [0, 0] };
    let key = PolicyKey {
        src_class: src_class.to_be_bytes(),
        dst_class: dst_class.to_be_bytes(),
        proto: p.proto,
        port,
        pad: 0,
    };
    let rule_index = slot.policy.get(Key::new(POLICY_PREFIX_FULL, key))?.rule_index;
    count(slot.stats, rule_index, len);
    Some(rule_index)
}

/// The flow key of the packet as it is (see `FlowKey`).
#[inline(always)]
fn flow_key(p: &Packet) -> FlowKey {
    FlowKey { src: p.src, dst: p.dst, sport: p.sport, dport: p.dport, proto: p.proto, family: p.family, pad: [0; 2] }
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
    Some(FlowKey { src: p.dst, dst: p.src, sport, dport, proto: p.proto, family: p.family, pad: [0; 2] })
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
