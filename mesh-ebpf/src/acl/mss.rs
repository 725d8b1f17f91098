//! TCP MSS clamping: a SYN or SYN-ACK whose MSS option exceeds what fits the
//! overlay MTU gets it lowered, with the TCP checksum updated incrementally.
//! Other options are not touched; a segment without an MSS option is left
//! alone (the peer then assumes 536 / 1220, which fits any sane MTU).

use aya_ebpf::{helpers::bpf_skb_load_bytes, maps::PerCpuArray, programs::TcContext};
use mesh_common::acl::{MssEvent, mss_v4, mss_v6};

use super::parse::{PROTO_TCP, Packet, TCP_FLAG_SYN};

/// `bpf_l4_csum_replace` flag: the changed field is 2 bytes wide.
const CSUM_SIZE_2: u64 = 2;
/// `bpf_skb_store_bytes` flag: keep `skb->csum` right for CHECKSUM_COMPLETE.
const F_RECOMPUTE_CSUM: u64 = 1;
const TCP_OPT_EOL: u8 = 0;
const TCP_OPT_NOP: u8 = 1;
const TCP_OPT_MSS: u8 = 2;
const MAX_OPTS: usize = 40;
/// Buffer size: a power of two above `MAX_OPTS`, so masked indexes are in
/// bounds without a (panicking) bounds check.
const BUF: usize = 64;

/// Clamps the MSS of `p` if it is a TCP SYN and the clamp is on.
#[inline(always)]
pub(super) fn clamp(ctx: &TcContext, p: &Packet, mtu: u32, stats: &PerCpuArray<u64>) {
    if mtu == 0 || p.proto != PROTO_TCP || p.tcp_flags & TCP_FLAG_SYN == 0 {
        return;
    }
    let limit = if p.family == 4 { mss_v4(mtu) } else { mss_v6(mtu) };
    let event = rewrite(ctx, p.l4_off, limit as u16);
    if let Some(c) = stats.get_ptr_mut(event as u32) {
        // SAFETY: per-CPU value, only this CPU writes it during the run.
        unsafe { *c += 1 };
    }
}

/// Kept out of line: the verifier then walks the option scan once.
#[inline(never)]
fn rewrite(ctx: &TcContext, l4_off: usize, limit: u16) -> MssEvent {
    let Ok(doff) = ctx.load::<u8>(l4_off + 12) else { return MssEvent::NoOption };
    let opts_len = ((doff >> 4) as usize * 4).saturating_sub(20);
    if opts_len == 0 || opts_len > MAX_OPTS {
        return MssEvent::NoOption;
    }
    let mut words = core::mem::MaybeUninit::<[u64; BUF / 8]>::uninit();
    let buf = zeroed(&mut words);
    // The verifier needs the length visibly within 1..=BUF; the volatile
    // read keeps the compiler from dropping the mask as redundant.
    // SAFETY: reading a local.
    let opaque = unsafe { core::ptr::read_volatile(&opts_len) };
    let load_len = (opaque.wrapping_sub(1) & (BUF - 1)) + 1;
    // SAFETY: `buf` has room for `load_len` (1..=BUF) bytes.
    let rc = unsafe {
        bpf_skb_load_bytes(ctx.skb.skb as *const _, (l4_off + 20) as u32, buf.as_mut_ptr() as *mut _, load_len as u32)
    };
    if rc != 0 {
        return MssEvent::NoOption;
    }
    let Some(pos) = find_mss(buf, opts_len) else { return MssEvent::NoOption };
    let at = l4_off + 20 + pos;
    let raw = [buf[pos & (BUF - 1)], buf[(pos + 1) & (BUF - 1)]];
    if u16::from_be_bytes(raw) <= limit {
        return MssEvent::Unchanged;
    }
    let new = limit.to_be_bytes();
    // The checksum sums 16-bit words from the start of the segment: a field
    // at an odd offset contributes its bytes swapped.
    let (from, to) = if pos % 2 == 0 {
        (u16::from_ne_bytes(raw), u16::from_ne_bytes(new))
    } else {
        (u16::from_ne_bytes([raw[1], raw[0]]), u16::from_ne_bytes([new[1], new[0]]))
    };
    if ctx.store(at, &new, F_RECOMPUTE_CSUM).is_err() {
        return MssEvent::NoOption;
    }
    let _ = ctx.l4_csum_replace(l4_off + 16, u64::from(from), u64::from(to), CSUM_SIZE_2);
    MssEvent::Clamped
}

/// The option buffer, zeroed without `memset`: the zeroing of a byte
/// array compiles to a call to the `memset` BPF subprogram, and Linux 6.1
/// counts that call as one more frame (rounded up to 32 bytes) in the
/// combined stack of `acl_tc_*` -> `rewrite` -> `memset`, which then exceeds
/// 512 bytes. Eight volatile word stores stay inline. The buffer must be
/// zeroed (not left uninitialised): the scan may read past the loaded bytes,
/// and uninitialised stack reads either fail verification or, with
/// privileged uninit reads, stop state pruning (E2BIG).
#[inline(always)]
fn zeroed(words: &mut core::mem::MaybeUninit<[u64; BUF / 8]>) -> &mut [u8; BUF] {
    let p = words.as_mut_ptr().cast::<u64>();
    // SAFETY: every write is inside `words` (BUF / 8 == 8 words); after
    // them all of it is initialised, [u64; 8] and [u8; 64] have the same
    // size, u8 the weaker alignment, and any bit pattern is a valid byte.
    unsafe {
        core::ptr::write_volatile(p, 0);
        core::ptr::write_volatile(p.add(1), 0);
        core::ptr::write_volatile(p.add(2), 0);
        core::ptr::write_volatile(p.add(3), 0);
        core::ptr::write_volatile(p.add(4), 0);
        core::ptr::write_volatile(p.add(5), 0);
        core::ptr::write_volatile(p.add(6), 0);
        core::ptr::write_volatile(p.add(7), 0);
        &mut *p.cast::<[u8; BUF]>()
    }
}

/// Offset of the MSS option's value inside the options, walking the
/// options as TLVs. Every byte position is visited in order (constant
/// offsets for the verifier); `next` says where the next option starts.
#[inline(always)]
fn find_mss(buf: &[u8; BUF], len: usize) -> Option<usize> {
    let mut next = 0usize;
    let mut pos = 0usize;
    while pos < MAX_OPTS - 1 {
        if pos >= len {
            return None;
        }
        if pos == next {
            let kind = buf[pos & (BUF - 1)];
            if kind == TCP_OPT_EOL {
                return None;
            }
            if kind == TCP_OPT_NOP {
                next = pos + 1;
            } else {
                let olen = buf[(pos + 1) & (BUF - 1)] as usize;
                if olen < 2 {
                    return None;
                }
                if kind == TCP_OPT_MSS && olen == 4 && pos + 4 <= len {
                    return Some(pos + 2);
                }
                next = pos + olen;
            }
        }
        pos += 1;
    }
    None
}
