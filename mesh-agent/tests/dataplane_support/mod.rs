//! Packet building for the dataplane tests: Ethernet frames from the
//! reference evaluator's `Packet`, with correct checksums, and an
//! independent checksum verifier.
#![allow(dead_code, unreachable_pub, reason = "each test file uses part of it")]

use std::net::IpAddr;

use mesh_policy::eval::{Fragment, Packet, Quoted};

/// Extra shape for a frame.
#[derive(Clone, Debug, Default)]
pub struct Shape {
    /// TCP options (padded to 4 bytes by the builder).
    pub tcp_options: Vec<u8>,
    /// IPv6 extension headers to insert (next-header values 0, 60, 43, 44).
    pub v6_ext: Vec<u8>,
    /// Payload bytes after the transport header.
    pub payload: usize,
    /// IPv4 fragment offset (8-byte units) and MF flag.
    pub frag_offset: u16,
}

/// One's-complement sum of `data` (16-bit big-endian words).
pub fn csum_add(mut sum: u32, data: &[u8]) -> u32 {
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        sum += u32::from(u16::from_be_bytes([c[0], c[1]]));
    }
    if let [last] = chunks.remainder() {
        sum += u32::from(*last) << 8;
    }
    sum
}

/// Folds and complements.
pub fn csum_fold(mut sum: u32) -> u16 {
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

fn pseudo(src: IpAddr, dst: IpAddr, proto: u8, len: usize) -> u32 {
    let mut s = 0;
    match (src, dst) {
        (IpAddr::V4(a), IpAddr::V4(b)) => {
            s = csum_add(s, &a.octets());
            s = csum_add(s, &b.octets());
            s = csum_add(s, &[0, proto]);
            s = csum_add(s, &(len as u16).to_be_bytes());
        }
        (IpAddr::V6(a), IpAddr::V6(b)) => {
            s = csum_add(s, &a.octets());
            s = csum_add(s, &b.octets());
            s = csum_add(s, &(len as u32).to_be_bytes());
            s = csum_add(s, &[0, 0, 0, proto]);
        }
        _ => panic!("mixed families"),
    }
    s
}

/// The transport segment of `p` with its checksum; for a non-first
/// fragment, just payload bytes.
fn segment(p: &Packet, shape: &Shape) -> Vec<u8> {
    if let Fragment::Later { .. } = p.fragment {
        return (0..16 + shape.payload).map(|i| i as u8).collect();
    }
    let mut seg = match p.proto {
        6 => {
            let mut opts = shape.tcp_options.clone();
            while !opts.len().is_multiple_of(4) {
                opts.push(0);
            }
            let mut h = vec![0u8; 20];
            h[0..2].copy_from_slice(&p.sport.to_be_bytes());
            h[2..4].copy_from_slice(&p.dport.to_be_bytes());
            h[4..8].copy_from_slice(&0x0102_0304u32.to_be_bytes());
            h[12] = (((20 + opts.len()) / 4) as u8) << 4;
            h[13] = p.tcp_flags;
            h[14..16].copy_from_slice(&64240u16.to_be_bytes());
            h.extend(opts);
            h
        }
        17 | 132 => {
            let mut h = vec![0u8; if p.proto == 17 { 8 } else { 12 }];
            h[0..2].copy_from_slice(&p.sport.to_be_bytes());
            h[2..4].copy_from_slice(&p.dport.to_be_bytes());
            h
        }
        1 | 58 => {
            let mut h = vec![0u8; 8];
            h[0] = p.icmp_type;
            h[4..6].copy_from_slice(&p.sport.to_be_bytes());
            // An error quotes the packet it is about: its IP header and at
            // least 8 bytes after it, as ICMP requires (here its transport
            // header and 8 payload bytes).
            if let Some(q) = &p.quoted {
                h.extend_from_slice(&frame_with(&q.packet(), &Shape { payload: 8, ..Shape::default() })[14..]);
            }
            h
        }
        _ => Vec::new(),
    };
    seg.extend((0..shape.payload).map(|i| i as u8));
    if p.proto == 17 {
        let len = seg.len() as u16;
        seg[4..6].copy_from_slice(&len.to_be_bytes());
    }
    let csum_at = match p.proto {
        6 => Some(16),
        17 => Some(6),
        58 => Some(2),
        1 => Some(2),
        _ => None,
    };
    if let Some(at) = csum_at {
        let base = if p.proto == 1 { 0 } else { pseudo(p.src, p.dst, p.proto, seg.len()) };
        let c = csum_fold(csum_add(base, &seg));
        seg[at..at + 2].copy_from_slice(&c.to_be_bytes());
    }
    seg
}

/// An Ethernet frame carrying `p`.
pub fn frame(p: &Packet) -> Vec<u8> {
    frame_with(p, &Shape::default())
}

/// An Ethernet frame carrying `p`, shaped by `shape`.
pub fn frame_with(p: &Packet, shape: &Shape) -> Vec<u8> {
    let seg = segment(p, shape);
    let mut f = vec![0x02, 0, 0, 0, 0, 2, 0x02, 0, 0, 0, 0, 1];
    match (p.src, p.dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            f.extend([0x08, 0x00]);
            let mut ip = vec![0u8; 20];
            ip[0] = 0x45;
            ip[2..4].copy_from_slice(&((20 + seg.len()) as u16).to_be_bytes());
            let (id, frag) = match p.fragment {
                Fragment::Whole => (0, 0),
                Fragment::First { id } => (id, 0x2000),
                Fragment::Later { id } => (id, 185),
            };
            ip[4..6].copy_from_slice(&u16::try_from(id).expect("IPv4 fragment ids are 16 bits").to_be_bytes());
            ip[6..8].copy_from_slice(&(shape.frag_offset | frag).to_be_bytes());
            ip[8] = 64;
            ip[9] = p.proto;
            ip[12..16].copy_from_slice(&s.octets());
            ip[16..20].copy_from_slice(&d.octets());
            let c = csum_fold(csum_add(0, &ip));
            ip[10..12].copy_from_slice(&c.to_be_bytes());
            f.extend(ip);
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            f.extend([0x86, 0xDD]);
            let mut ext = Vec::new();
            let mut kinds = shape.v6_ext.clone();
            let frag = match p.fragment {
                Fragment::Whole => None,
                Fragment::First { id } => Some((id, 0x0001u16)),
                Fragment::Later { id } => Some((id, 185 << 3)),
            };
            if frag.is_some() {
                kinds.push(44);
            }
            kinds.push(p.proto);
            for (i, w) in kinds.windows(2).enumerate() {
                if let (Some((id, off)), true) = (frag, i + 2 == kinds.len()) {
                    ext.push(w[1]);
                    ext.push(0);
                    ext.extend(off.to_be_bytes());
                    ext.extend(id.to_be_bytes());
                } else if w[0] == 44 {
                    ext.extend([w[1], 0, 0, 0, 0, 0, 0, 1]);
                } else {
                    ext.extend([w[1], 0, 1, 4, 0, 0, 0, 0]);
                }
            }
            let first = *kinds.first().unwrap();
            let mut ip = vec![0u8; 40];
            ip[0] = 0x60;
            ip[4..6].copy_from_slice(&((ext.len() + seg.len()) as u16).to_be_bytes());
            ip[6] = first;
            ip[7] = 64;
            ip[8..24].copy_from_slice(&s.octets());
            ip[24..40].copy_from_slice(&d.octets());
            f.extend(ip);
            f.extend(ext);
        }
        _ => panic!("mixed families"),
    }
    f.extend(seg);
    f
}

/// Verifies the TCP checksum of an Ethernet frame from scratch.
pub fn tcp_checksum_ok(frame: &[u8]) -> bool {
    let (src, dst, l4): (IpAddr, IpAddr, usize) = match u16::from_be_bytes([frame[12], frame[13]]) {
        0x0800 => {
            let ihl = usize::from(frame[14] & 0x0f) * 4;
            let s: [u8; 4] = frame[26..30].try_into().unwrap();
            let d: [u8; 4] = frame[30..34].try_into().unwrap();
            (s.into(), d.into(), 14 + ihl)
        }
        _ => {
            let s: [u8; 16] = frame[22..38].try_into().unwrap();
            let d: [u8; 16] = frame[38..54].try_into().unwrap();
            (s.into(), d.into(), 54)
        }
    };
    let seg = &frame[l4..];
    csum_fold(csum_add(pseudo(src, dst, 6, seg.len()), seg)) == 0
}

/// A packet with defaults filled in.
pub fn packet(src: &str, dst: &str, proto: u8, sport: u16, dport: u16) -> Packet {
    Packet {
        src: src.parse().unwrap(),
        dst: dst.parse().unwrap(),
        proto,
        sport,
        dport,
        icmp_type: 0,
        tcp_flags: if proto == 6 { 0x02 } else { 0 },
        fragment: Fragment::Whole,
        quoted: None,
    }
}

/// How an ICMP error quotes `p`.
pub fn quote(p: &Packet) -> Quoted {
    Quoted {
        src: p.src,
        dst: p.dst,
        proto: p.proto,
        sport: p.sport,
        dport: p.dport,
        icmp_type: p.icmp_type,
        fragment: p.fragment,
    }
}

/// An ICMP error of type `ty` (ICMP or ICMPv6 by `about`'s family) from
/// `from` to `about`'s sender, quoting `about`.
pub fn icmp_error(from: &str, ty: u8, about: &Packet) -> Packet {
    let proto = if about.src.is_ipv4() { 1 } else { 58 };
    let mut e = packet(from, &about.src.to_string(), proto, 0, 0);
    e.icmp_type = ty;
    e.quoted = Some(quote(about));
    e
}
