//! Reads the IP and transport headers of a socket buffer into a [`Packet`],
//! or says why the packet is not decided by the policy (see the verdicts in
//! `mesh_common::acl`). Reads are direct packet reads, each bounds-checked
//! against `data_end` (a helper call per header, `bpf_skb_load_bytes`, cost
//! more than the rest of the parse). Headers outside the linear part are
//! pulled in first (`bpf_skb_pull_data`, rare: the stack hands TC linear
//! headers); a pull past the packet's end fails, so a short packet is an
//! error here, never an out-of-bounds read.

use aya_ebpf::programs::TcContext;
use mesh_common::acl::AclVerdict;

pub(crate) const PROTO_ICMP: u8 = 1;
pub(crate) const PROTO_TCP: u8 = 6;
pub(crate) const PROTO_UDP: u8 = 17;
pub(crate) const PROTO_ICMPV6: u8 = 58;
pub(crate) const PROTO_SCTP: u8 = 132;

const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86DD;

pub(crate) const TCP_FLAG_SYN: u8 = 0x02;
pub(crate) const TCP_FLAG_ACK: u8 = 0x10;

/// The fields the ACL decides on. The addresses are two native-order
/// halves of the address bytes (IPv4: the first four bytes, rest zero), the
/// form the prefix masks are kept in: copied and zeroed as words, where a
/// byte array costs a load and a store per byte (BPF forbids misaligned
/// stack access, so byte arrays move bytewise) and its zeroing a call to
/// the `memset` subprogram.
#[derive(Clone, Copy)]
pub(crate) struct Packet {
    pub(crate) src: [u64; 2],
    pub(crate) dst: [u64; 2],
    pub(crate) family: u8,
    pub(crate) proto: u8,
    /// Ports as on the wire (for ICMP echo: the identifier and `[0, type]`).
    pub(crate) sport: [u8; 2],
    pub(crate) dport: [u8; 2],
    /// Offset of the transport header from the start of the buffer.
    pub(crate) l4_off: usize,
    /// TCP flags (byte 13), 0 for other protocols.
    pub(crate) tcp_flags: u8,
    /// ICMP / ICMPv6 type, 0 for other protocols.
    pub(crate) icmp_type: u8,
    /// Whether this is an ICMP(v6) echo request or reply.
    pub(crate) echo: bool,
    /// Whether this is an ICMP(v6) error that carries the header of the
    /// packet it is about (see [`embedded`]).
    pub(crate) icmp_error: bool,
    /// [`FRAG_NONE`], [`FRAG_FIRST`] or [`FRAG_LATER`].
    pub(crate) frag: u8,
    /// The fragment's datagram identifier (IPv4: 16 bits; IPv6: 32), as
    /// on the wire; zero for whole packets.
    pub(crate) frag_id: [u8; 4],
}

/// A whole packet.
pub(crate) const FRAG_NONE: u8 = 0;
/// The first fragment of a datagram (offset 0, more to come): it carries
/// the transport header and is decided like a whole packet.
pub(crate) const FRAG_FIRST: u8 = 1;
/// A fragment other than the first: no transport header, only the
/// datagram identity (addresses, protocol, identifier) to go by.
pub(crate) const FRAG_LATER: u8 = 2;

impl Packet {
    /// Whether the protocol's destination port is part of the decision.
    #[inline(always)]
    pub(crate) fn has_ports(&self) -> bool {
        matches!(self.proto, PROTO_TCP | PROTO_UDP | PROTO_SCTP)
    }
}

#[repr(C)]
#[derive(Clone, Copy)]
struct Ipv4Hdr {
    ver_ihl: u8,
    tos: u8,
    tot_len: [u8; 2],
    id: [u8; 2],
    frag: [u8; 2],
    ttl: u8,
    proto: u8,
    csum: [u8; 2],
    src: [u8; 4],
    dst: [u8; 4],
}

#[repr(C)]
#[derive(Clone, Copy)]
struct Ipv6Hdr {
    ver_tc_flow: [u8; 4],
    payload_len: [u8; 2],
    next: u8,
    hop_limit: u8,
    /// Source and destination address as native-order halves: read as
    /// words, they stay four values (not 32 bytes, which the compiler keeps
    /// in as many stack slots across the extension-header walk).
    addrs: [u64; 4],
}

/// Parses the packet starting at `l3_off` (0 on an L3 device, 14 after an
/// Ethernet header).
#[inline(always)]
pub(crate) fn parse(ctx: &TcContext, l3_off: usize) -> Result<Packet, AclVerdict> {
    let skb_len = ctx.len() as usize;
    let ethertype = u16::from_be(ctx.skb.protocol() as u16);
    let mut p = Packet {
        family: 0,
        src: [0; 2],
        dst: [0; 2],
        proto: 0,
        sport: [0; 2],
        dport: [0; 2],
        l4_off: 0,
        tcp_flags: 0,
        icmp_type: 0,
        echo: false,
        icmp_error: false,
        frag: FRAG_NONE,
        frag_id: [0; 4],
    };
    // Length of the transport segment (header and payload).
    let l4_len: usize;
    match ethertype {
        ETH_P_IP => {
            let ip: Ipv4Hdr = read(ctx, l3_off)?;
            let ihl = ((ip.ver_ihl & 0x0f) as usize) * 4;
            let tot_len = u16::from_be_bytes(ip.tot_len) as usize;
            if ip.ver_ihl >> 4 != 4 || ihl < 20 || tot_len < ihl || l3_off + tot_len > skb_len {
                return Err(AclVerdict::DropMalformed);
            }
            p.family = 4;
            p.src = [u64::from(u32::from_ne_bytes(ip.src)), 0];
            p.dst = [u64::from(u32::from_ne_bytes(ip.dst)), 0];
            p.proto = ip.proto;
            let frag = u16::from_be_bytes(ip.frag);
            if frag & 0x3fff != 0 {
                p.frag_id = [0, 0, ip.id[0], ip.id[1]];
                if frag & 0x1fff != 0 {
                    p.frag = FRAG_LATER;
                    return Ok(p);
                }
                p.frag = FRAG_FIRST;
            }
            p.l4_off = l3_off + ihl;
            l4_len = tot_len - ihl;
        }
        ETH_P_IPV6 => {
            let ip: Ipv6Hdr = read(ctx, l3_off)?;
            let payload = u16::from_be_bytes(ip.payload_len) as usize;
            if ip.ver_tc_flow[0] >> 4 != 6 || l3_off + 40 + payload > skb_len {
                return Err(AclVerdict::DropMalformed);
            }
            p.family = 6;
            // Volatile: stored as words here, before the extension-header
            // walk, instead of as 32 separately spilled bytes assembled
            // after it (which took the frame past the 512-byte stack that
            // `flow_check`'s frame is stacked on).
            // SAFETY: writes to a local.
            unsafe {
                core::ptr::write_volatile(&mut p.src, [ip.addrs[0], ip.addrs[1]]);
                core::ptr::write_volatile(&mut p.dst, [ip.addrs[2], ip.addrs[3]]);
            }
            let mut next = ip.next;
            let mut ext_len = 0usize;
            // Hop-by-hop (0), routing (43), fragment (44), destination
            // options (60): at most four, which is all a sane packet has.
            let mut i = 0;
            while i < 4 {
                i += 1;
                let at = l3_off + 40 + ext_len;
                match next {
                    0 | 43 | 60 => {
                        let h: [u8; 2] = read(ctx, at)?;
                        next = h[0];
                        ext_len += (h[1] as usize + 1) * 8;
                    }
                    44 => {
                        let h: [u8; 8] = read(ctx, at)?;
                        next = h[0];
                        ext_len += 8;
                        let frag = u16::from_be_bytes([h[2], h[3]]);
                        // An atomic fragment (offset 0, no more) is a
                        // whole packet.
                        if frag & 0xfff9 != 0 {
                            p.frag_id = [h[4], h[5], h[6], h[7]];
                            if frag & 0xfff8 != 0 {
                                p.frag = FRAG_LATER;
                                p.proto = next;
                                return Ok(p);
                            }
                            p.frag = FRAG_FIRST;
                        }
                    }
                    _ => break,
                }
            }
            if matches!(next, 0 | 43 | 44 | 60) || ext_len > payload {
                return Err(AclVerdict::DropMalformed);
            }
            p.proto = next;
            p.l4_off = l3_off + 40 + ext_len;
            l4_len = payload - ext_len;
        }
        _ => return Err(AclVerdict::PassNonIp),
    }
    let min_len = match p.proto {
        PROTO_TCP => 20,
        PROTO_UDP | PROTO_SCTP => 8,
        PROTO_ICMP | PROTO_ICMPV6 if is_icmp_of_family(p.proto, p.family) => 8,
        _ => return Ok(p),
    };
    if l4_len < min_len {
        return Err(AclVerdict::DropMalformed);
    }
    if p.proto == PROTO_TCP {
        // One read for the ports and the flags.
        let h: [u8; 14] = read(ctx, p.l4_off)?;
        p.tcp_flags = h[13];
        set_ports(&mut p, &[h[0], h[1], h[2], h[3], 0, 0, 0, 0]);
    } else {
        let h: [u8; 8] = read(ctx, p.l4_off)?;
        set_ports(&mut p, &h);
    }
    p.icmp_error = is_icmp_of_family(p.proto, p.family) && is_error(p.family, p.icmp_type);
    Ok(p)
}

/// The flow-key fields of a transport header from its first 8 bytes (the
/// part an ICMP error quotes): ports for TCP, UDP and SCTP; type and, for
/// echo messages, identifier and `[0, type]` as ports for ICMP of the
/// packet's family; nothing for other protocols.
#[inline(always)]
fn set_ports(p: &mut Packet, h: &[u8; 8]) {
    match p.proto {
        PROTO_TCP | PROTO_UDP | PROTO_SCTP => {
            p.sport = [h[0], h[1]];
            p.dport = [h[2], h[3]];
        }
        PROTO_ICMP | PROTO_ICMPV6 if is_icmp_of_family(p.proto, p.family) => {
            p.icmp_type = h[0];
            if is_echo(p.family, h[0]) {
                p.echo = true;
                p.sport = [h[4], h[5]];
                p.dport = [0, h[0]];
            }
        }
        _ => {}
    }
}

/// The packet an ICMP(v6) error `p` quotes (its IP header and the first 8
/// bytes of its transport header), as far as its flow key goes; `None`
/// when the quote is not one this ACL can relate to a flow:
/// - it is not addressed back to its own source (an error goes to the
///   sender of the packet it is about; one that does not is forged);
/// - its IP header is malformed or truncated, or it is a non-first
///   fragment (no transport header);
/// - IPv6: it has extension headers other than one fragment header
///   (routers quote what they forward, and fragments are what this
///   overlay's senders add).
#[inline(always)]
pub(crate) fn embedded(ctx: &TcContext, p: &Packet) -> Option<Packet> {
    let at = p.l4_off + 8;
    let mut inner = *p;
    inner.tcp_flags = 0;
    inner.icmp_type = 0;
    inner.echo = false;
    inner.icmp_error = false;
    inner.sport = [0; 2];
    inner.dport = [0; 2];
    let l4_at = if p.family == 4 {
        let ip: Ipv4Hdr = read(ctx, at).ok()?;
        let ihl = ((ip.ver_ihl & 0x0f) as usize) * 4;
        if ip.ver_ihl >> 4 != 4 || ihl < 20 || u16::from_be_bytes(ip.frag) & 0x1fff != 0 {
            return None;
        }
        inner.src = [u64::from(u32::from_ne_bytes(ip.src)), 0];
        inner.dst = [u64::from(u32::from_ne_bytes(ip.dst)), 0];
        inner.proto = ip.proto;
        at + ihl
    } else {
        let ip: Ipv6Hdr = read(ctx, at).ok()?;
        if ip.ver_tc_flow[0] >> 4 != 6 {
            return None;
        }
        inner.src = [ip.addrs[0], ip.addrs[1]];
        inner.dst = [ip.addrs[2], ip.addrs[3]];
        inner.proto = ip.next;
        if ip.next == 44 {
            let h: [u8; 8] = read(ctx, at + 40).ok()?;
            if u16::from_be_bytes([h[2], h[3]]) & 0xfff8 != 0 {
                return None;
            }
            inner.proto = h[0];
            at + 48
        } else {
            at + 40
        }
    };
    if inner.src != p.dst {
        return None;
    }
    let h: [u8; 8] = read(ctx, l4_at).ok()?;
    set_ports(&mut inner, &h);
    Some(inner)
}

/// Copies a `T` from `off` bytes into the packet: directly when the linear
/// data holds it, else after pulling the first `off + size_of::<T>()` bytes
/// into the linear part (which fails past the packet's end).
#[inline(always)]
fn read<T: Copy>(ctx: &TcContext, off: usize) -> Result<T, AclVerdict> {
    if let Some(v) = read_linear(ctx, off) {
        return Ok(v);
    }
    let want = u32::try_from(off + core::mem::size_of::<T>()).map_err(|_| AclVerdict::DropMalformed)?;
    ctx.pull_data(want).map_err(|_| AclVerdict::DropMalformed)?;
    read_linear(ctx, off).ok_or(AclVerdict::DropMalformed)
}

/// A `T` from the linear data, if it lies inside it.
#[inline(always)]
fn read_linear<T: Copy>(ctx: &TcContext, off: usize) -> Option<T> {
    let (start, end) = (ctx.data(), ctx.data_end());
    if start + off + core::mem::size_of::<T>() > end {
        return None;
    }
    // SAFETY: the bytes lie between `data` and `data_end` (checked just
    // above, and by the verifier); packet bytes carry no alignment.
    Some(unsafe { core::ptr::read_unaligned((start + off) as *const T) })
}

/// The address bytes of two native-order halves.
#[inline(always)]
pub(crate) fn addr_bytes(h: [u64; 2]) -> [u8; 16] {
    // SAFETY: same size, every bit pattern is valid for both.
    unsafe { core::mem::transmute::<[u64; 2], [u8; 16]>(h) }
}

/// ICMP for IPv4 and ICMPv6 for IPv6; the other pairing is just a protocol.
#[inline(always)]
pub(crate) fn is_icmp_of_family(proto: u8, family: u8) -> bool {
    (proto == PROTO_ICMP && family == 4) || (proto == PROTO_ICMPV6 && family == 6)
}

/// Echo request or reply.
#[inline(always)]
fn is_echo(family: u8, ty: u8) -> bool {
    if family == 4 { ty == 8 || ty == 0 } else { ty == 128 || ty == 129 }
}

/// Whether `ty` is an ICMP error that relates to a flow: IPv4 destination
/// unreachable (fragmentation needed included) and time exceeded; ICMPv6
/// destination unreachable, packet too big and time exceeded.
#[inline(always)]
fn is_error(family: u8, ty: u8) -> bool {
    if family == 4 { ty == 3 || ty == 11 } else { matches!(ty, 1..=3) }
}

/// The other echo type of an echo message: request for reply and back.
#[inline(always)]
pub(crate) fn echo_counterpart(family: u8, ty: u8) -> u8 {
    match (family, ty) {
        (4, 8) => 0,
        (4, _) => 8,
        (_, 128) => 129,
        _ => 128,
    }
}

/// Whether `ty` is an echo request (its flow's replies are echo replies).
#[inline(always)]
pub(crate) fn echo_reply_type(family: u8, ty: u8) -> Option<u8> {
    match (family, ty) {
        (4, 8) => Some(0),
        (6, 128) => Some(129),
        _ => None,
    }
}
