//! TUN offload packet surgery, apart from any syscall.
//!
//! With `IFF_VNET_HDR` and `TUNSETOFFLOAD`, the kernel hands the engine TCP
//! "super-packets" of up to 64 KiB (TSO) with a `virtio_net_hdr` in front,
//! and packets whose checksum it left to us. [`segment`] turns one of those
//! into the MTU-sized packets WireGuard encrypts, checksums complete.
//!
//! In the other direction, [`Coalescer`] merges the consecutive TCP segments
//! (and equal-size UDP datagrams) of one flow that the tunnel decrypted into
//! one GSO packet, so the receiving stack walks one packet where it would
//! have walked dozens (what GRO does on a NIC).

use super::checksum;

/// Size of `struct virtio_net_hdr` (the TUN default, `TUNSETVNETHDRSZ`).
pub const VNET_HDR_LEN: usize = 10;
/// `VIRTIO_NET_HDR_F_NEEDS_CSUM`: the L4 checksum is left to the reader.
pub const F_NEEDS_CSUM: u8 = 1;
/// `VIRTIO_NET_HDR_GSO_NONE`.
pub const GSO_NONE: u8 = 0;
/// `VIRTIO_NET_HDR_GSO_TCPV4`.
pub const GSO_TCPV4: u8 = 1;
/// `VIRTIO_NET_HDR_GSO_TCPV6`.
pub const GSO_TCPV6: u8 = 4;
/// `VIRTIO_NET_HDR_GSO_UDP_L4` (USO: UDP datagrams cut at `gso_size`).
pub const GSO_UDP_L4: u8 = 5;
/// `VIRTIO_NET_HDR_GSO_ECN`, or-ed into the type.
pub const GSO_ECN: u8 = 0x80;

const PROTO_TCP: u8 = 6;
const PROTO_UDP: u8 = 17;
/// Most datagrams merged into one USO packet (the kernel's `UDP_MAX_SEGMENTS`).
const MAX_UDP_SEGMENTS: usize = 64;
const TCP_FIN: u8 = 0x01;
const TCP_PSH: u8 = 0x08;
const TCP_ACK: u8 = 0x10;
const TCP_CWR: u8 = 0x80;
/// Longest IP + TCP header run we handle (IPv4 60 + TCP 60, IPv6 40 + TCP 60).
const MAX_HEADERS: usize = 120;
/// Largest packet we build: the IPv4 total length field's limit.
const MAX_COALESCED: usize = 65535;
/// Flows tracked at once in one batch; more flows just coalesce less.
const MAX_OPEN_FLOWS: usize = 32;

/// Why a packet from the TUN cannot be turned into packets to send.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum GsoError {
    /// The vnet header and the packet disagree, or the packet is cut short.
    #[error("malformed offloaded packet: {0}")]
    Malformed(&'static str),
    /// A GSO type we never enabled (UFO, USO).
    #[error("unsupported GSO type {0}")]
    Unsupported(u8),
}

/// `struct virtio_net_hdr`, in the host's byte order (TUN's legacy default).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VnetHdr {
    /// `VIRTIO_NET_HDR_F_*`.
    pub flags: u8,
    /// `VIRTIO_NET_HDR_GSO_*`.
    pub gso_type: u8,
    /// Length of the headers (IP + L4) of a GSO packet.
    pub hdr_len: u16,
    /// Payload bytes per segment of a GSO packet (the MSS).
    pub gso_size: u16,
    /// Where the checksummed region starts (the L4 header).
    pub csum_start: u16,
    /// Where, from `csum_start`, the checksum is stored.
    pub csum_offset: u16,
}

impl VnetHdr {
    /// Reads the header at the start of `bytes`.
    #[must_use]
    pub fn decode(bytes: &[u8]) -> Option<Self> {
        let b = bytes.get(..VNET_HDR_LEN)?;
        let u = |i: usize| u16::from_ne_bytes([b[i], b[i + 1]]);
        Some(Self { flags: b[0], gso_type: b[1], hdr_len: u(2), gso_size: u(4), csum_start: u(6), csum_offset: u(8) })
    }

    /// The header's bytes.
    #[must_use]
    pub fn encode(&self) -> [u8; VNET_HDR_LEN] {
        let mut b = [0u8; VNET_HDR_LEN];
        b[0] = self.flags;
        b[1] = self.gso_type;
        b[2..4].copy_from_slice(&self.hdr_len.to_ne_bytes());
        b[4..6].copy_from_slice(&self.gso_size.to_ne_bytes());
        b[6..8].copy_from_slice(&self.csum_start.to_ne_bytes());
        b[8..10].copy_from_slice(&self.csum_offset.to_ne_bytes());
        b
    }
}

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn put16(b: &mut [u8], at: usize, v: u16) {
    b[at..at + 2].copy_from_slice(&v.to_be_bytes());
}

/// The source and destination addresses of an IPv4 or IPv6 header.
fn addrs(ip: &[u8], v6: bool) -> (&[u8], &[u8]) {
    if v6 { (&ip[8..24], &ip[24..40]) } else { (&ip[12..16], &ip[16..20]) }
}

fn ipv4_header_checksum(h: &mut [u8], ihl: usize) {
    put16(h, 10, 0);
    let c = checksum::finish(checksum::sum(&h[..ihl], 0));
    put16(h, 10, c);
}

/// Turns one packet read from an offloading TUN (`pkt`, after the vnet
/// header `hdr`) into the packets to send, calling `emit(headers, payload)`
/// for each: the packet is the concatenation of the two. Returns how many
/// packets were emitted.
///
/// A packet that only needs its checksum gets it completed in place. A TCP
/// GSO packet is cut into `gso_size` payloads, each with its own IP length,
/// IPv4 ID and header checksum, sequence number and full TCP checksum; FIN
/// and PSH stay on the last segment only and CWR on the first only, as a
/// NIC's TSO does.
pub fn segment(hdr: &VnetHdr, pkt: &mut [u8], mut emit: impl FnMut(&[u8], &[u8])) -> Result<usize, GsoError> {
    let gso = hdr.gso_type & !GSO_ECN;
    let udp = match gso {
        GSO_TCPV4 | GSO_TCPV6 => false,
        GSO_UDP_L4 => true,
        _ if gso != GSO_NONE => return Err(GsoError::Unsupported(hdr.gso_type)),
        _ => false,
    };
    if gso == GSO_NONE || pkt.len() <= usize::from(hdr.hdr_len) {
        complete_checksum(hdr, pkt)?;
        emit(pkt, &[]);
        return Ok(1);
    }
    let v6 = match pkt[0] >> 4 {
        4 => false,
        6 => true,
        _ => return Err(GsoError::Malformed("not IPv4 or IPv6")),
    };
    if !udp && v6 != (gso == GSO_TCPV6) {
        return Err(GsoError::Malformed("GSO type does not match the IP version"));
    }
    let ip_hlen = if v6 { 40 } else { usize::from(pkt[0] & 0x0f) * 4 };
    let l4 = if hdr.flags & F_NEEDS_CSUM != 0 { usize::from(hdr.csum_start) } else { ip_hlen };
    if l4 < ip_hlen || l4 + if udp { 8 } else { 20 } > pkt.len() {
        return Err(GsoError::Malformed("L4 header out of the packet"));
    }
    let l4_hlen = if udp { 8 } else { usize::from(pkt[l4 + 12] >> 4) * 4 };
    let hdrs = l4 + l4_hlen;
    if l4_hlen < 8 || hdrs > pkt.len() || hdrs > MAX_HEADERS {
        return Err(GsoError::Malformed("L4 header length"));
    }
    let mss = usize::from(hdr.gso_size);
    if mss == 0 {
        return Err(GsoError::Malformed("zero gso_size"));
    }
    let (headers, payload) = pkt.split_at(hdrs);
    let (seq0, flags0) = if udp { (0, 0) } else { (be32(headers, l4 + 4), headers[l4 + 13]) };
    let id0 = be16(headers, 4);
    let (proto, csum_at) = if udp { (PROTO_UDP, l4 + 6) } else { (PROTO_TCP, l4 + 16) };
    let mut head = [0u8; MAX_HEADERS];
    let h = &mut head[..hdrs];
    let mut n = 0;
    for (i, chunk) in payload.chunks(mss).enumerate() {
        h.copy_from_slice(headers);
        let last = (i + 1) * mss >= payload.len();
        if v6 {
            put16(h, 4, (hdrs - 40 + chunk.len()) as u16);
        } else {
            put16(h, 2, (hdrs + chunk.len()) as u16);
            put16(h, 4, id0.wrapping_add(i as u16));
            ipv4_header_checksum(h, ip_hlen);
        }
        if udp {
            put16(h, l4 + 4, (8 + chunk.len()) as u16);
        } else {
            h[l4 + 4..l4 + 8].copy_from_slice(&seq0.wrapping_add((i * mss) as u32).to_be_bytes());
            let mut flags = flags0;
            if !last {
                flags &= !(TCP_FIN | TCP_PSH);
            }
            if i > 0 {
                flags &= !TCP_CWR;
            }
            h[l4 + 13] = flags;
        }
        put16(h, csum_at, 0);
        let (src, dst) = addrs(h, v6);
        let mut acc = checksum::pseudo_header(src, dst, proto, l4_hlen + chunk.len());
        acc = checksum::sum(&h[l4..hdrs], acc);
        acc = checksum::sum(chunk, acc);
        let c = checksum::finish(acc);
        put16(h, csum_at, if udp && c == 0 { 0xffff } else { c });
        emit(h, chunk);
        n += 1;
    }
    Ok(n)
}

/// Completes a checksum the kernel left partial (`VIRTIO_NET_HDR_F_NEEDS_CSUM`):
/// the field holds the pseudo-header sum, so summing the region with it in
/// place gives the checksum.
fn complete_checksum(hdr: &VnetHdr, pkt: &mut [u8]) -> Result<(), GsoError> {
    if hdr.flags & F_NEEDS_CSUM == 0 {
        return Ok(());
    }
    let start = usize::from(hdr.csum_start);
    let field = start + usize::from(hdr.csum_offset);
    if field + 2 > pkt.len() {
        return Err(GsoError::Malformed("checksum field out of the packet"));
    }
    let mut c = checksum::finish(checksum::sum(&pkt[start..], 0));
    // UDP (checksum at offset 6) sends a computed zero as all ones: zero
    // means "no checksum".
    if c == 0 && hdr.csum_offset == 6 {
        c = 0xffff;
    }
    put16(pkt, field, c);
    Ok(())
}

/// What [`Coalescer`] needs of a TCP segment or UDP datagram that may be
/// merged.
#[derive(Clone, Copy, Debug)]
struct Seg {
    v6: bool,
    udp: bool,
    ip_hlen: usize,
    hdrs: usize,
    seq: u32,
    flags: u8,
    payload: usize,
}

/// Parses `pkt` as a mergeable packet: plain IPv4 (no options, not a
/// fragment) or IPv6 without extension headers, carrying data; TCP with no
/// flag but ACK and PSH, or UDP.
fn mergeable(pkt: &[u8]) -> Option<Seg> {
    let v6 = match pkt.first()? >> 4 {
        4 => false,
        6 => true,
        _ => return None,
    };
    let (ip_hlen, total, proto) = if v6 {
        if pkt.len() < 40 {
            return None;
        }
        (40, 40 + usize::from(be16(pkt, 4)), pkt[6])
    } else {
        // No IP options, no fragments (MF clear, offset zero).
        if pkt.len() < 20 || pkt[0] & 0x0f != 5 || be16(pkt, 6) & 0x3fff != 0 {
            return None;
        }
        (20, usize::from(be16(pkt, 2)), pkt[9])
    };
    if total != pkt.len() {
        return None;
    }
    if proto == PROTO_UDP {
        let hdrs = ip_hlen + 8;
        if pkt.len() <= hdrs || usize::from(be16(pkt, ip_hlen + 4)) != pkt.len() - ip_hlen {
            return None;
        }
        return Some(Seg { v6, udp: true, ip_hlen, hdrs, seq: 0, flags: 0, payload: pkt.len() - hdrs });
    }
    if proto != PROTO_TCP || pkt.len() < ip_hlen + 20 {
        return None;
    }
    let tcp_hlen = usize::from(pkt[ip_hlen + 12] >> 4) * 4;
    let hdrs = ip_hlen + tcp_hlen;
    let flags = pkt[ip_hlen + 13];
    if tcp_hlen < 20 || hdrs >= pkt.len() || flags & !TCP_PSH != TCP_ACK {
        return None;
    }
    Some(Seg { v6, udp: false, ip_hlen, hdrs, seq: be32(pkt, ip_hlen + 4), flags, payload: pkt.len() - hdrs })
}

/// Whether two segments' headers agree on everything but what a GSO split
/// rewrites (lengths, IPv4 ID and checksum, sequence number, flags,
/// checksum); the window may differ (the first one's is kept, like GRO).
fn same_flow(a: &[u8], b: &[u8], s: &Seg) -> bool {
    let l4 = s.ip_hlen;
    let ip_same = if s.v6 {
        // Version, traffic class, flow label; next header and hop limit; addresses.
        a[..4] == b[..4] && a[6..40] == b[6..40]
    } else {
        // TOS; DF; TTL and protocol; addresses.
        a[1] == b[1] && a[6] == b[6] && a[8..10] == b[8..10] && a[12..20] == b[12..20]
    };
    // Ports; for TCP, ACK number and data offset, then the options.
    ip_same
        && a[l4..l4 + 4] == b[l4..l4 + 4]
        && (s.udp || a[l4 + 8..l4 + 13] == b[l4 + 8..l4 + 13] && a[l4 + 20..s.hdrs] == b[l4 + 20..s.hdrs])
}

/// One write to the TUN: a packet as it is, or TCP segments merged into a
/// GSO packet (vnet header, then `head`, then every member's payload).
#[derive(Debug, Default)]
pub struct Group {
    /// The vnet header to write first.
    pub vnet: [u8; VNET_HDR_LEN],
    /// Merged headers (empty for a lone packet, written whole).
    head: Vec<u8>,
    /// Indexes of the member packets, in order.
    pub members: Vec<usize>,
    seg: Option<Seg>,
    payload: usize,
    next_seq: u32,
    closed: bool,
}

impl Group {
    /// The headers to write after the vnet header: `None` for a lone
    /// packet, written whole; otherwise the merged headers, after which
    /// come the payloads of [`Self::members`] (from [`Self::payload_offset`]).
    #[must_use]
    pub fn head(&self) -> Option<&[u8]> {
        (self.members.len() > 1).then_some(&self.head[..])
    }

    /// Whether this is merged UDP (USO).
    #[must_use]
    pub fn is_udp(&self) -> bool {
        self.seg.is_some_and(|s| s.udp)
    }

    /// Where a member's payload starts.
    #[must_use]
    pub fn payload_offset(&self) -> usize {
        self.seg.map_or(0, |s| s.hdrs)
    }
}

/// Plans the TUN writes of a batch of decrypted packets: consecutive TCP
/// segments of one flow become one GSO write, so do equal-size datagrams
/// of one UDP flow (unless [`Coalescer::set_merge_udp`] turned that off);
/// everything else is written as it is. Order within a flow is kept; flows may be reordered among each
/// other. Reused across batches to keep its allocations.
#[derive(Debug, Default)]
pub struct Coalescer {
    /// Leave UDP alone (the kernel refused a USO write).
    no_udp: bool,
    groups: Vec<Group>,
    used: usize,
    /// Open group per flow: (lead packet index, group index).
    open: Vec<(usize, usize)>,
}

impl Coalescer {
    /// Whether equal-size UDP datagrams of a flow are merged (USO).
    pub fn set_merge_udp(&mut self, merge: bool) {
        self.no_udp = !merge;
    }

    /// Plans the writes of `packets`; the groups borrow nothing, their
    /// member indexes point into `packets`.
    pub fn plan<P: AsRef<[u8]>>(&mut self, packets: &[P]) -> &[Group] {
        self.used = 0;
        self.open.clear();
        for (i, p) in packets.iter().enumerate() {
            let pkt = p.as_ref();
            let Some(seg) = mergeable(pkt).filter(|s| !(s.udp && self.no_udp)) else {
                // Anything else ends a merge of its flow (a FIN after data,
                // say, must not overtake it): close every open TCP group of
                // the same addresses and ports, whatever the flags.
                self.close_flow_of(pkt, packets);
                self.push_single(i);
                continue;
            };
            let found = self.open.iter().position(|&(lead, gi)| {
                let ls = self.groups[gi].seg.expect("open groups are TCP");
                ls.v6 == seg.v6
                    && ls.udp == seg.udp
                    && ls.hdrs == seg.hdrs
                    && same_flow(packets[lead].as_ref(), pkt, &seg)
            });
            if let Some(at) = found {
                let gi = self.open[at].1;
                let g = &mut self.groups[gi];
                let gso = g.seg.expect("open groups are TCP").payload;
                let fits = seg.hdrs + g.payload + seg.payload <= MAX_COALESCED
                    && (!seg.udp || g.members.len() < MAX_UDP_SEGMENTS);
                let in_order = seg.udp || seg.seq == g.next_seq;
                if !g.closed && in_order && seg.payload <= gso && fits {
                    g.members.push(i);
                    g.payload += seg.payload;
                    g.next_seq = seg.seq.wrapping_add(seg.payload as u32);
                    g.closed = seg.payload < gso || seg.flags & TCP_PSH != 0;
                    continue;
                }
                // Cannot extend: this segment leads a new group of its flow.
                self.open.swap_remove(at);
            }
            let gi = self.push_single(i);
            let g = &mut self.groups[gi];
            g.seg = Some(seg);
            g.payload = seg.payload;
            g.next_seq = seg.seq.wrapping_add(seg.payload as u32);
            g.closed = seg.flags & TCP_PSH != 0;
            if self.open.len() < MAX_OPEN_FLOWS {
                self.open.push((i, gi));
            }
        }
        for g in &mut self.groups[..self.used] {
            finish_group(g, packets);
        }
        &self.groups[..self.used]
    }

    fn push_single(&mut self, i: usize) -> usize {
        if self.used == self.groups.len() {
            self.groups.push(Group::default());
        }
        let g = &mut self.groups[self.used];
        g.members.clear();
        g.members.push(i);
        g.head.clear();
        g.seg = None;
        g.payload = 0;
        g.closed = true;
        g.vnet = [0; VNET_HDR_LEN];
        self.used += 1;
        self.used - 1
    }

    fn close_flow_of<P: AsRef<[u8]>>(&mut self, pkt: &[u8], packets: &[P]) {
        let Some(key) = tcp_flow_key(pkt) else { return };
        self.open.retain(|&(lead, _)| tcp_flow_key(packets[lead].as_ref()) != Some(key));
    }
}

/// Addresses and ports of a TCP packet (any flags), for closing merges.
fn tcp_flow_key(pkt: &[u8]) -> Option<([u8; 32], [u8; 4])> {
    let mut key = [0u8; 32];
    let l4 = match pkt.first()? >> 4 {
        4 if pkt.len() >= 20 && pkt[9] == PROTO_TCP => {
            key[..8].copy_from_slice(&pkt[12..20]);
            usize::from(pkt[0] & 0x0f) * 4
        }
        6 if pkt.len() >= 40 && pkt[6] == PROTO_TCP => {
            key.copy_from_slice(&pkt[8..40]);
            40
        }
        _ => return None,
    };
    let ports = pkt.get(l4..l4 + 4)?;
    Some((key, [ports[0], ports[1], ports[2], ports[3]]))
}

/// Builds the merged headers and vnet header of a group of two or more.
fn finish_group<P: AsRef<[u8]>>(g: &mut Group, packets: &[P]) {
    let Some(seg) = g.seg else { return };
    if g.members.len() < 2 {
        return;
    }
    let lead = packets[g.members[0]].as_ref();
    let last = packets[*g.members.last().expect("two or more")].as_ref();
    let l4 = seg.ip_hlen;
    g.head.clear();
    g.head.extend_from_slice(&lead[..seg.hdrs]);
    let h = &mut g.head[..];
    if seg.v6 {
        put16(h, 4, (seg.hdrs - 40 + g.payload) as u16);
    } else {
        put16(h, 2, (seg.hdrs + g.payload) as u16);
        ipv4_header_checksum(h, seg.ip_hlen);
    }
    let (proto, csum_offset) = if seg.udp {
        put16(h, l4 + 4, (8 + g.payload) as u16);
        (PROTO_UDP, 6)
    } else {
        // PSH comes from the last segment, like GRO.
        h[l4 + 13] = (h[l4 + 13] & !TCP_PSH) | (last[l4 + 13] & TCP_PSH);
        (PROTO_TCP, 16)
    };
    // A partial checksum: the pseudo-header sum, not complemented; the
    // kernel treats the packet as CHECKSUM_PARTIAL (already verified: the
    // tunnel authenticated every byte).
    let (src, dst) = addrs(h, seg.v6);
    let pseudo = checksum::fold(checksum::pseudo_header(src, dst, proto, seg.hdrs - l4 + g.payload));
    put16(h, l4 + csum_offset, pseudo);
    g.vnet = VnetHdr {
        flags: F_NEEDS_CSUM,
        gso_type: match (seg.udp, seg.v6) {
            (true, _) => GSO_UDP_L4,
            (false, true) => GSO_TCPV6,
            (false, false) => GSO_TCPV4,
        },
        hdr_len: seg.hdrs as u16,
        gso_size: seg.payload as u16,
        csum_start: l4 as u16,
        csum_offset: csum_offset as u16,
    }
    .encode();
}

#[cfg(test)]
#[path = "gso_tests.rs"]
mod tests;
