//! The underlay guard (XDP on the gateway's public interface): WireGuard
//! messages are checked by type and exact size, handshake initiations and
//! cookie replies from unknown sources are rate-limited per prefix,
//! everything else passes unless the strict allow-list is on. The rules are
//! written out in `mesh_common::guard`.

use aya_ebpf::{
    bindings::xdp_action,
    helpers::bpf_ktime_get_ns,
    macros::{map, xdp},
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, lpm_trie::Key},
    programs::XdpContext,
};
use mesh_common::{
    counter::PacketCount,
    guard::{
        AllowKey, GuardAddr, GuardConfig, GuardVerdict, MAX_ALLOW, MAX_BUCKETS, MAX_KNOWN, TokenBucket, WG_COOKIE_LEN,
        WG_INITIATION_LEN, WG_MIN_MTU, WG_RESPONSE_LEN, WG_TRANSPORT_MIN_LEN,
    },
};

const ETH_HDR_LEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86DD;
const PROTO_ICMP: u8 = 1;
const PROTO_TCP: u8 = 6;
const PROTO_UDP: u8 = 17;
const PROTO_ICMPV6: u8 = 58;
const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_FRAG_NEEDED: u8 = 4;
const ICMPV6_PACKET_TOO_BIG: u8 = 2;
/// Stands for "no transport header here" (a non-first fragment).
const PROTO_NONE: u8 = 0xff;
/// IPv6 extension headers walked to reach the transport header.
const V6_HOP_BY_HOP: u8 = 0;
const V6_ROUTING: u8 = 43;
const V6_FRAGMENT: u8 = 44;
const V6_AUTH: u8 = 51;
const V6_DEST_OPTS: u8 = 60;
const V6_MOBILITY: u8 = 135;
/// Extension headers walked at most; a longer chain is dropped as malformed
/// (no honest sender needs more, and an unwalked chain could hide a
/// WireGuard message from the checks).
const V6_MAX_EXT: usize = 6;
/// Largest offset of a transport header the guard accepts (keeps the
/// verifier's offset ranges small).
const MAX_L4_OFF: usize = 512;
const TOKEN: u64 = 1_000_000_000;
/// Longest refill interval counted, so `elapsed * rate` cannot overflow.
const MAX_REFILL_NS: u64 = 10 * TOKEN;

#[map(name = "GUARD_CONFIG")]
static GUARD_CONFIG: Array<GuardConfig> = Array::with_max_entries(1, 0);
#[map(name = "GUARD_KNOWN")]
static GUARD_KNOWN: HashMap<GuardAddr, u8> = HashMap::with_max_entries(MAX_KNOWN, 0);
#[map(name = "GUARD_RATE")]
static GUARD_RATE: LruHashMap<GuardAddr, TokenBucket> = LruHashMap::with_max_entries(MAX_BUCKETS, 0);
#[map(name = "GUARD_ALLOW")]
static GUARD_ALLOW: LpmTrie<AllowKey, u8> = LpmTrie::with_max_entries(MAX_ALLOW, 0);
#[map(name = "GUARD_STATS")]
static GUARD_STATS: PerCpuArray<PacketCount> = PerCpuArray::with_max_entries(GuardVerdict::COUNT, 0);

/// The guard.
#[xdp]
pub(crate) fn guard_xdp(ctx: XdpContext) -> u32 {
    let len = (ctx.data_end() - ctx.data()) as u64;
    let verdict = guard(&ctx);
    if let Some(c) = GUARD_STATS.get_ptr_mut(verdict as u32) {
        // SAFETY: per-CPU value, only this CPU writes it during the run.
        let c = unsafe { &mut *c };
        c.packets += 1;
        c.bytes += len;
    }
    match verdict {
        GuardVerdict::Pass | GuardVerdict::PassKnown | GuardVerdict::PassUnknown | GuardVerdict::PassAllowed => {
            xdp_action::XDP_PASS
        }
        _ => xdp_action::XDP_DROP,
    }
}

/// The empty XDP program the benchmarks compare against.
#[xdp]
pub(crate) fn pass_xdp(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

#[inline(always)]
fn ptr_at<T>(ctx: &XdpContext, offset: usize) -> Option<*const T> {
    let start = ctx.data();
    if start + offset + core::mem::size_of::<T>() > ctx.data_end() {
        return None;
    }
    Some((start + offset) as *const T)
}

#[inline(always)]
fn read<T: Copy>(ctx: &XdpContext, offset: usize) -> Option<T> {
    // SAFETY: `ptr_at` checked the bounds; unaligned read of plain bytes.
    ptr_at::<T>(ctx, offset).map(|p| unsafe { core::ptr::read_unaligned(p) })
}

#[inline(always)]
fn guard(ctx: &XdpContext) -> GuardVerdict {
    let Some(ethertype) = read::<[u8; 2]>(ctx, 12) else { return GuardVerdict::Pass };
    let ethertype = u16::from_be_bytes(ethertype);
    let mut src = GuardAddr { addr: [0; 16] };
    let (proto, l4, l4_len, v4) = match ethertype {
        ETH_P_IP => {
            let Some(h) = read::<[u8; 20]>(ctx, ETH_HDR_LEN) else { return GuardVerdict::DropMalformed };
            let ihl = ((h[0] & 0x0f) as usize) * 4;
            let tot = u16::from_be_bytes([h[2], h[3]]) as usize;
            if h[0] >> 4 != 4 || ihl < 20 || tot < ihl {
                return GuardVerdict::DropMalformed;
            }
            src.addr[10] = 0xff;
            src.addr[11] = 0xff;
            src.addr[12..].copy_from_slice(&h[12..16]);
            // Non-first fragments carry no transport header.
            let first = u16::from_be_bytes([h[6], h[7]]) & 0x1fff == 0;
            (if first { h[9] } else { PROTO_NONE }, ETH_HDR_LEN + ihl, tot - ihl, true)
        }
        ETH_P_IPV6 => {
            let Some(h) = read::<[u8; 40]>(ctx, ETH_HDR_LEN) else { return GuardVerdict::DropMalformed };
            if h[0] >> 4 != 6 {
                return GuardVerdict::DropMalformed;
            }
            src.addr.copy_from_slice(&h[8..24]);
            let payload = u16::from_be_bytes([h[4], h[5]]) as usize;
            let Some((proto, l4)) = walk_v6_extensions(ctx, h[6]) else { return GuardVerdict::DropMalformed };
            let ext = l4 - (ETH_HDR_LEN + 40);
            if ext > payload {
                return GuardVerdict::DropMalformed;
            }
            (proto, l4, payload - ext, false)
        }
        _ => return GuardVerdict::Pass,
    };
    let config = GUARD_CONFIG.get(0).copied().unwrap_or_default();

    let mut dport = [0u8; 2];
    if proto == PROTO_UDP || proto == PROTO_TCP {
        let Some(ports) = read::<[u8; 4]>(ctx, l4) else { return GuardVerdict::DropMalformed };
        dport = [ports[2], ports[3]];
    }
    if proto == PROTO_UDP && config.wg_port != 0 && u16::from_be_bytes(dport) == config.wg_port {
        let Some(udp) = read::<[u8; 8]>(ctx, l4) else { return GuardVerdict::DropMalformed };
        let udp_len = u16::from_be_bytes([udp[4], udp[5]]) as usize;
        if udp_len < 8 || udp_len > l4_len {
            return GuardVerdict::DropMalformed;
        }
        let ty = match check_wireguard(ctx, l4 + 8, udp_len - 8) {
            Ok(ty) => ty,
            Err(v) => return v,
        };
        // SAFETY: read-only use of the value.
        if unsafe { GUARD_KNOWN.get(&src) }.is_some() {
            return GuardVerdict::PassKnown;
        }
        // Only the messages that make the receiver do public-key work and
        // keep state (initiations) or that an attacker can use to poison
        // one (cookie replies) are limited. Responses and transport data
        // are answered by an index lookup that costs no crypto when it
        // misses, and they come from peers that roamed before the agent's
        // next reconcile has made their new address known: throttling them
        // would stall live tunnels.
        if ty == WG_INITIATION || ty == WG_COOKIE {
            return rate_limit(&src, v4, &config);
        }
        return GuardVerdict::PassUnknown;
    }

    if config.strict == 0 {
        return GuardVerdict::Pass;
    }
    strict(ctx, proto, l4, dport, &src)
}

/// WireGuard message types.
const WG_INITIATION: u8 = 1;
const WG_RESPONSE: u8 = 2;
const WG_COOKIE: u8 = 3;
const WG_TRANSPORT: u8 = 4;

/// Type and exact size of a WireGuard message of `len` bytes at `at`;
/// returns the type.
#[inline(always)]
fn check_wireguard(ctx: &XdpContext, at: usize, len: usize) -> Result<u8, GuardVerdict> {
    let Some(h) = read::<[u8; 4]>(ctx, at) else { return Err(GuardVerdict::DropBadSize) };
    if h[1] != 0 || h[2] != 0 || h[3] != 0 {
        return Err(GuardVerdict::DropBadType);
    }
    let size_ok = match h[0] {
        WG_INITIATION => len == WG_INITIATION_LEN,
        WG_RESPONSE => len == WG_RESPONSE_LEN,
        WG_COOKIE => len == WG_COOKIE_LEN,
        // The plaintext is padded to a multiple of 16, except where that
        // would pass the tunnel's MTU: a full-MTU packet keeps its length
        // (1420 is not a multiple of 16). MTUs are at least 576.
        WG_TRANSPORT => {
            len >= WG_TRANSPORT_MIN_LEN
                && ((len - WG_TRANSPORT_MIN_LEN) % 16 == 0 || len - WG_TRANSPORT_MIN_LEN >= WG_MIN_MTU)
        }
        _ => return Err(GuardVerdict::DropBadType),
    };
    if size_ok { Ok(h[0]) } else { Err(GuardVerdict::DropBadSize) }
}

/// Follows the IPv6 extension headers after the fixed header, starting
/// with next-header `first`: returns the transport protocol (`PROTO_NONE`
/// for a non-first fragment) and the offset of its header, or `None` for a
/// truncated or over-long chain.
#[inline(always)]
fn walk_v6_extensions(ctx: &XdpContext, first: u8) -> Option<(u8, usize)> {
    let mut next = first;
    let mut off = ETH_HDR_LEN + 40;
    let mut i = 0;
    while i < V6_MAX_EXT {
        let len = match next {
            V6_HOP_BY_HOP | V6_ROUTING | V6_DEST_OPTS | V6_MOBILITY => {
                let h = read::<[u8; 2]>(ctx, off)?;
                next = h[0];
                (usize::from(h[1]) + 1) * 8
            }
            V6_AUTH => {
                let h = read::<[u8; 2]>(ctx, off)?;
                next = h[0];
                (usize::from(h[1]) + 2) * 4
            }
            V6_FRAGMENT => {
                let h = read::<[u8; 4]>(ctx, off)?;
                // Only the first fragment carries the transport header.
                if u16::from_be_bytes([h[2], h[3]]) & 0xfff8 != 0 {
                    return Some((PROTO_NONE, off + 8));
                }
                next = h[0];
                8
            }
            _ => return Some((next, off)),
        };
        off += len;
        if off > MAX_L4_OFF {
            return None;
        }
        i += 1;
    }
    // Still an extension header after the walk's limit.
    match next {
        V6_HOP_BY_HOP | V6_ROUTING | V6_DEST_OPTS | V6_MOBILITY | V6_AUTH | V6_FRAGMENT => None,
        _ => Some((next, off)),
    }
}

/// Spends one token of the source prefix's bucket.
#[inline(always)]
fn rate_limit(src: &GuardAddr, v4: bool, config: &GuardConfig) -> GuardVerdict {
    // The bucket key: the source masked to its prefix (v4 counts from bit 96).
    let bits = if v4 { 96 + u32::from(config.v4_prefix.min(32)) } else { u32::from(config.v6_prefix.min(128)) };
    let mut key = GuardAddr { addr: [0; 16] };
    let mut i = 0;
    while i < 16 {
        let bit = (i as u32) * 8;
        key.addr[i] = if bit + 8 <= bits {
            src.addr[i]
        } else if bit < bits {
            src.addr[i] & (0xffu8 << (8 - (bits - bit)))
        } else {
            0
        };
        i += 1;
    }
    let now = unsafe { bpf_ktime_get_ns() };
    let full = u64::from(config.burst) * TOKEN;
    match GUARD_RATE.get_ptr_mut(&key) {
        Some(bucket) => {
            // SAFETY: pointer into the map value for this run; races between
            // CPUs only make the limit approximate.
            let bucket = unsafe { &mut *bucket };
            let elapsed = now.saturating_sub(bucket.last_ns).min(MAX_REFILL_NS);
            let tokens = (bucket.nanotokens + elapsed * u64::from(config.rate_pps)).min(full);
            bucket.last_ns = now;
            if tokens >= TOKEN {
                bucket.nanotokens = tokens - TOKEN;
                GuardVerdict::PassUnknown
            } else {
                bucket.nanotokens = tokens;
                GuardVerdict::DropRateLimited
            }
        }
        None => {
            if full < TOKEN {
                return GuardVerdict::DropRateLimited;
            }
            let _ = GUARD_RATE.insert(&key, &TokenBucket { nanotokens: full - TOKEN, last_ns: now }, 0);
            GuardVerdict::PassUnknown
        }
    }
}

/// The strict allow-list for traffic other than WireGuard.
#[inline(always)]
fn strict(ctx: &XdpContext, proto: u8, l4: usize, dport: [u8; 2], src: &GuardAddr) -> GuardVerdict {
    if proto == PROTO_ICMPV6 {
        // Multi-byte reads: a one-byte bounds check compiles to `p >= end`,
        // which the verifier does not turn into a readable range.
        if let Some(h) = read::<[u8; 4]>(ctx, l4) {
            // Neighbour discovery, and "packet too big": without it IPv6
            // path-MTU discovery (which has no fragmentation fallback)
            // blackholes large packets.
            if (133..=137).contains(&h[0]) || h[0] == ICMPV6_PACKET_TOO_BIG {
                return GuardVerdict::PassAllowed;
            }
        }
    }
    if proto == PROTO_ICMP {
        // "Fragmentation needed": IPv4 path-MTU discovery.
        if let Some(h) = read::<[u8; 4]>(ctx, l4) {
            if h[0] == ICMP_DEST_UNREACH && h[1] == ICMP_FRAG_NEEDED {
                return GuardVerdict::PassAllowed;
            }
        }
    }
    if proto == PROTO_TCP {
        if let Some(h) = read::<[u8; 14]>(ctx, l4) {
            if h[13] & 0x10 != 0 {
                return GuardVerdict::PassAllowed;
            }
        }
    }
    let lookups = [(proto, dport), (proto, [0, 0]), (0, [0, 0])];
    for (p, port) in lookups {
        let key = AllowKey { proto: p, pad: 0, port, addr: src.addr };
        if GUARD_ALLOW.get(Key::new(32 + 128, key)).is_some() {
            return GuardVerdict::PassAllowed;
        }
    }
    GuardVerdict::DropStrict
}
