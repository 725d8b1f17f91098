//! Packet counters: an XDP and a TC program that count every packet (and its
//! address family) into a per-CPU array and let it pass. The first program of
//! the pipeline; also useful to operators as a cheap tap on an interface.

use aya_ebpf::{
    bindings::{TC_ACT_OK, xdp_action},
    macros::{classifier, map, xdp},
    maps::PerCpuArray,
    programs::{TcContext, XdpContext},
};
use mesh_common::counter::{CounterSlot, PacketCount};

const ETH_HDR_LEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86DD;

#[map(name = "PKT_COUNT")]
static PKT_COUNT: PerCpuArray<PacketCount> = PerCpuArray::with_max_entries(CounterSlot::COUNT, 0);

#[inline(always)]
fn bump(slot: CounterSlot, len: u64) {
    if let Some(count) = PKT_COUNT.get_ptr_mut(slot as u32) {
        // SAFETY: per-CPU slot, only this CPU writes it while the program runs.
        let count = unsafe { &mut *count };
        count.packets += 1;
        count.bytes += len;
    }
}

#[inline(always)]
fn slot_for(ethertype: u16) -> CounterSlot {
    match ethertype {
        ETH_P_IP => CounterSlot::Ipv4,
        ETH_P_IPV6 => CounterSlot::Ipv6,
        _ => CounterSlot::Other,
    }
}

/// XDP counter: frames are Ethernet; the EtherType says the family.
#[xdp]
pub(crate) fn count_xdp(ctx: XdpContext) -> u32 {
    let (start, end) = (ctx.data(), ctx.data_end());
    let len = (end - start) as u64;
    let slot = if start + ETH_HDR_LEN > end {
        CounterSlot::Other
    } else {
        // SAFETY: bounds checked just above; the verifier checks it again.
        let raw = unsafe { *((start + 12) as *const [u8; 2]) };
        slot_for(u16::from_be_bytes(raw))
    };
    bump(CounterSlot::All, len);
    bump(slot, len);
    xdp_action::XDP_PASS
}

/// TC counter: works on Ethernet and on L3 devices (TUN, WireGuard) alike,
/// because it reads the family from the socket buffer, not from a header.
#[classifier]
pub(crate) fn count_tc(ctx: TcContext) -> i32 {
    let len = u64::from(ctx.len());
    bump(CounterSlot::All, len);
    bump(slot_for(u16::from_be(ctx.skb.protocol() as u16)), len);
    TC_ACT_OK
}
