//! Tests of the offload surgery against packets built independently here,
//! with a checksum written the slow, obvious way.

use super::*;

/// RFC 1071 over 16-bit words with an end-around carry, folded as we go.
fn ref_sum(parts: &[&[u8]]) -> u16 {
    let bytes: Vec<u8> = parts.concat();
    let mut s: u32 = 0;
    for pair in bytes.chunks(2) {
        s += u32::from(pair[0]) << 8 | u32::from(*pair.get(1).unwrap_or(&0));
        s = (s & 0xffff) + (s >> 16);
    }
    s as u16
}

fn pseudo(v6: bool, src: &[u8], dst: &[u8], proto: u8, len: usize) -> Vec<u8> {
    let mut p = [src, dst].concat();
    if v6 {
        p.extend_from_slice(&(len as u32).to_be_bytes());
        p.extend_from_slice(&[0, 0, 0, proto]);
    } else {
        p.extend_from_slice(&[0, proto]);
        p.extend_from_slice(&(len as u16).to_be_bytes());
    }
    p
}

/// Whether a packet's IPv4 header and TCP/UDP checksums verify.
fn checksums_ok(pkt: &[u8]) -> bool {
    let v6 = pkt[0] >> 4 == 6;
    let (l4, proto, src, dst) = if v6 {
        (40, pkt[6], &pkt[8..24], &pkt[24..40])
    } else {
        let ihl = usize::from(pkt[0] & 0xf) * 4;
        if ref_sum(&[&pkt[..ihl]]) != 0xffff {
            return false;
        }
        (ihl, pkt[9], &pkt[12..16], &pkt[16..20])
    };
    let ph = pseudo(v6, src, dst, proto, pkt.len() - l4);
    ref_sum(&[&ph, &pkt[l4..]]) == 0xffff
}

#[derive(Clone)]
struct Tcp {
    v6: bool,
    sport: u16,
    seq: u32,
    ack: u32,
    flags: u8,
    options: Vec<u8>,
    id: u16,
    window: u16,
    tos: u8,
}

impl Tcp {
    fn v4() -> Self {
        Self {
            v6: false,
            sport: 40000,
            seq: 1000,
            ack: 77,
            flags: TCP_ACK,
            options: vec![],
            id: 9,
            window: 500,
            tos: 0,
        }
    }
    fn v6() -> Self {
        Self { v6: true, ..Self::v4() }
    }
    fn addrs(&self) -> (Vec<u8>, Vec<u8>) {
        if self.v6 {
            let mut s = vec![0xfd, 0x7a, 0x6d, 0x65, 0x73, 0x68, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
            let mut d = s.clone();
            d[15] = 2;
            s[14] = 0x12;
            (s, d)
        } else {
            (vec![100, 64, 0, 1], vec![100, 64, 0, 2])
        }
    }

    /// A complete packet with correct checksums.
    fn packet(&self, payload: &[u8]) -> Vec<u8> {
        let mut p = self.headers(payload.len());
        p.extend_from_slice(payload);
        let l4 = if self.v6 { 40 } else { 20 };
        let (s, d) = self.addrs();
        let c = !ref_sum(&[&pseudo(self.v6, &s, &d, 6, p.len() - l4), &p[l4..]]);
        p[l4 + 16..l4 + 18].copy_from_slice(&c.to_be_bytes());
        p
    }

    /// IP and TCP headers for `payload_len` bytes, TCP checksum zero.
    fn headers(&self, payload_len: usize) -> Vec<u8> {
        let (s, d) = self.addrs();
        let tcp_len = 20 + self.options.len();
        let mut ip = if self.v6 {
            let mut h = vec![0x60 | (self.tos >> 4), self.tos << 4, 0, 0];
            h.extend_from_slice(&((tcp_len + payload_len) as u16).to_be_bytes());
            h.extend_from_slice(&[6, 64]);
            h.extend_from_slice(&s);
            h.extend_from_slice(&d);
            h
        } else {
            let mut h = vec![0x45, self.tos];
            h.extend_from_slice(&((20 + tcp_len + payload_len) as u16).to_be_bytes());
            h.extend_from_slice(&self.id.to_be_bytes());
            h.extend_from_slice(&[0x40, 0, 64, 6, 0, 0]);
            h.extend_from_slice(&s);
            h.extend_from_slice(&d);
            let c = !ref_sum(&[&h]);
            h[10..12].copy_from_slice(&c.to_be_bytes());
            h
        };
        ip.extend_from_slice(&self.sport.to_be_bytes());
        ip.extend_from_slice(&5201u16.to_be_bytes());
        ip.extend_from_slice(&self.seq.to_be_bytes());
        ip.extend_from_slice(&self.ack.to_be_bytes());
        ip.push(((tcp_len / 4) as u8) << 4);
        ip.push(self.flags);
        ip.extend_from_slice(&self.window.to_be_bytes());
        ip.extend_from_slice(&[0, 0, 0, 0]);
        ip.extend_from_slice(&self.options);
        ip
    }

    /// The TSO packet the kernel would hand us: all the payload, a partial
    /// checksum, and its vnet header.
    fn tso(&self, payload: &[u8], mss: u16) -> (VnetHdr, Vec<u8>) {
        let mut p = self.headers(payload.len());
        let l4 = if self.v6 { 40 } else { 20 };
        let hdrs = p.len();
        p.extend_from_slice(payload);
        let (s, d) = self.addrs();
        let partial = ref_sum(&[&pseudo(self.v6, &s, &d, 6, p.len() - l4)]);
        p[l4 + 16..l4 + 18].copy_from_slice(&partial.to_be_bytes());
        let hdr = VnetHdr {
            flags: F_NEEDS_CSUM,
            gso_type: if self.v6 { GSO_TCPV6 } else { GSO_TCPV4 },
            hdr_len: hdrs as u16,
            gso_size: mss,
            csum_start: l4 as u16,
            csum_offset: 16,
        };
        (hdr, p)
    }
}

fn payload(n: usize, salt: u8) -> Vec<u8> {
    (0..n).map(|i| (i as u8).wrapping_mul(31).wrapping_add(salt)).collect()
}

fn run_segment(hdr: &VnetHdr, pkt: &[u8]) -> Result<Vec<Vec<u8>>, GsoError> {
    let mut pkt = pkt.to_vec();
    let mut out = vec![];
    let n = segment(hdr, &mut pkt, |h, p| out.push([h, p].concat()))?;
    assert_eq!(n, out.len());
    Ok(out)
}

/// Timestamps option, padded: what Linux puts on every segment.
const TS_OPTION: [u8; 12] = [1, 1, 8, 10, 0, 0, 0x12, 0x34, 0, 0, 0x56, 0x78];

#[test]
fn vnet_header_round_trips() {
    let h = VnetHdr { flags: 1, gso_type: 4, hdr_len: 72, gso_size: 1368, csum_start: 40, csum_offset: 16 };
    assert_eq!(VnetHdr::decode(&h.encode()), Some(h));
    assert_eq!(VnetHdr::decode(&[0; 9]), None);
}

#[test]
fn splits_ipv4_tso_like_a_nic() {
    let data = payload(5000, 3);
    let first = Tcp { options: TS_OPTION.to_vec(), flags: TCP_ACK | TCP_PSH | TCP_FIN, ..Tcp::v4() };
    let (hdr, pkt) = first.tso(&data, 1368);
    let segs = run_segment(&hdr, &pkt).unwrap();
    assert_eq!(segs.len(), 4);
    for (i, seg) in segs.iter().enumerate() {
        let last = i == 3;
        let expect = Tcp {
            seq: first.seq + (i * 1368) as u32,
            id: first.id + i as u16,
            flags: if last { TCP_ACK | TCP_PSH | TCP_FIN } else { TCP_ACK },
            ..first.clone()
        }
        .packet(&data[i * 1368..((i + 1) * 1368).min(data.len())]);
        assert!(checksums_ok(seg), "segment {i}");
        assert_eq!(seg, &expect, "segment {i}");
    }
}

#[test]
fn splits_ipv6_tso_with_cwr_on_the_first_only() {
    let data = payload(4000, 7);
    let first = Tcp { flags: TCP_ACK | TCP_CWR | TCP_PSH, seq: u32::MAX - 100, ..Tcp::v6() };
    let (mut hdr, pkt) = first.tso(&data, 1000);
    hdr.gso_type |= GSO_ECN;
    let segs = run_segment(&hdr, &pkt).unwrap();
    assert_eq!(segs.len(), 4);
    for (i, seg) in segs.iter().enumerate() {
        let flags = match i {
            0 => TCP_ACK | TCP_CWR,
            3 => TCP_ACK | TCP_PSH,
            _ => TCP_ACK,
        };
        // The sequence number wraps past 2^32 on the way.
        let expect = Tcp { seq: first.seq.wrapping_add((i * 1000) as u32), flags, ..first.clone() }
            .packet(&data[i * 1000..(i + 1) * 1000]);
        assert!(checksums_ok(seg), "segment {i}");
        assert_eq!(seg, &expect, "segment {i}");
    }
}

#[test]
fn odd_mss_and_odd_tail_checksum_right() {
    let data = payload(3001, 1);
    let (hdr, pkt) = Tcp::v4().tso(&data, 999);
    let segs = run_segment(&hdr, &pkt).unwrap();
    assert_eq!(segs.iter().map(|s| s.len() - 40).collect::<Vec<_>>(), [999, 999, 999, 4]);
    assert!(segs.iter().all(|s| checksums_ok(s)));
}

#[test]
fn completes_partial_checksums_of_single_packets() {
    // TCP with a partial checksum and no GSO.
    let t = Tcp::v6();
    let (mut hdr, pkt) = t.tso(&payload(100, 5), 1400);
    hdr.gso_type = GSO_NONE;
    let segs = run_segment(&hdr, &pkt).unwrap();
    assert_eq!(segs, vec![t.packet(&payload(100, 5))]);

    // UDP over IPv4, partial checksum at offset 6.
    let body = payload(333, 9);
    let mut udp = vec![0x45, 0, 0, 0, 0, 1, 0x40, 0, 64, 17, 0, 0, 100, 64, 0, 1, 100, 64, 0, 2];
    let total = (20 + 8 + body.len()) as u16;
    udp[2..4].copy_from_slice(&total.to_be_bytes());
    let c = !ref_sum(&[&udp]);
    udp[10..12].copy_from_slice(&c.to_be_bytes());
    udp.extend_from_slice(&[0x13, 0x88, 0x14, 0x51]);
    udp.extend_from_slice(&((8 + body.len()) as u16).to_be_bytes());
    let partial = ref_sum(&[&pseudo(false, &[100, 64, 0, 1], &[100, 64, 0, 2], 17, 8 + body.len())]);
    udp.extend_from_slice(&partial.to_be_bytes());
    udp.extend_from_slice(&body);
    let hdr = VnetHdr { flags: F_NEEDS_CSUM, csum_start: 20, csum_offset: 6, ..VnetHdr::default() };
    let segs = run_segment(&hdr, &udp).unwrap();
    assert!(checksums_ok(&segs[0]));

    // No flags: untouched (ICMP, say).
    let icmp =
        vec![0x45, 0, 0, 28, 0, 0, 0, 0, 64, 1, 0, 0, 100, 64, 0, 1, 100, 64, 0, 2, 8, 0, 0xf7, 0xff, 0, 0, 0, 0];
    assert_eq!(run_segment(&VnetHdr::default(), &icmp).unwrap(), vec![icmp]);
}

#[test]
fn refuses_what_it_cannot_split() {
    let (mut hdr, pkt) = Tcp::v4().tso(&payload(3000, 0), 1000);
    hdr.gso_type = 3; // UFO: never enabled.
    assert_eq!(run_segment(&hdr, &pkt), Err(GsoError::Unsupported(3)));
    let (mut hdr, pkt) = Tcp::v4().tso(&payload(3000, 0), 1000);
    hdr.gso_type = GSO_TCPV6;
    assert!(matches!(run_segment(&hdr, &pkt), Err(GsoError::Malformed(_))));
    let (mut hdr, pkt) = Tcp::v4().tso(&payload(3000, 0), 1000);
    hdr.gso_size = 0;
    assert!(matches!(run_segment(&hdr, &pkt), Err(GsoError::Malformed(_))));
    let (hdr, pkt) = Tcp::v4().tso(&payload(3000, 0), 1000);
    assert!(matches!(run_segment(&hdr, &pkt[..30]), Err(GsoError::Malformed(_))));
}

/// Writes a plan out as the bytes the TUN would get, one buffer per write.
fn materialize(groups: &[Group], packets: &[Vec<u8>]) -> Vec<(VnetHdr, Vec<u8>)> {
    groups
        .iter()
        .map(|g| {
            let vnet = VnetHdr::decode(&g.vnet).unwrap();
            let bytes = match g.head() {
                None => packets[g.members[0]].clone(),
                Some(head) => {
                    let mut b = head.to_vec();
                    for &m in &g.members {
                        b.extend_from_slice(&packets[m][g.payload_offset()..]);
                    }
                    b
                }
            };
            (vnet, bytes)
        })
        .collect()
}

/// A run of segments of one flow, as a sender's TSO would produce them.
fn flow(t: &Tcp, sizes: &[usize], last_flags: u8) -> Vec<Vec<u8>> {
    let mut seq = t.seq;
    let mut out = vec![];
    for (i, &n) in sizes.iter().enumerate() {
        let flags = if i + 1 == sizes.len() { last_flags } else { TCP_ACK };
        out.push(Tcp { seq, id: t.id.wrapping_add(i as u16), flags, ..t.clone() }.packet(&payload(n, i as u8)));
        seq = seq.wrapping_add(n as u32);
    }
    out
}

#[test]
fn coalesces_interleaved_flows_and_round_trips_through_segment() {
    let a = flow(&Tcp { options: TS_OPTION.to_vec(), ..Tcp::v4() }, &[1368, 1368, 1368, 500], TCP_ACK | TCP_PSH);
    let b = flow(&Tcp { sport: 40001, ..Tcp::v6() }, &[1000, 1000, 1000], TCP_ACK);
    let icmp =
        vec![0x45, 0, 0, 28, 0, 0, 0, 0, 64, 1, 0, 0, 100, 64, 0, 1, 100, 64, 0, 2, 8, 0, 0xf7, 0xff, 0, 0, 0, 0];
    // a0 b0 a1 icmp b1 a2 b2 a3
    let packets = vec![
        a[0].clone(),
        b[0].clone(),
        a[1].clone(),
        icmp.clone(),
        b[1].clone(),
        a[2].clone(),
        b[2].clone(),
        a[3].clone(),
    ];
    let mut c = Coalescer::default();
    let groups = c.plan(&packets);
    assert_eq!(
        groups.iter().map(|g| g.members.clone()).collect::<Vec<_>>(),
        [vec![0, 2, 5, 7], vec![1, 4, 6], vec![3]]
    );
    let writes = materialize(groups, &packets);

    let (hdr, bytes) = &writes[0];
    assert_eq!((hdr.gso_type, hdr.gso_size, hdr.hdr_len, hdr.csum_start), (GSO_TCPV4, 1368, 52, 20));
    assert_eq!(bytes.len(), 52 + 3 * 1368 + 500);
    assert_eq!(run_segment(hdr, bytes).unwrap(), a);

    let (hdr, bytes) = &writes[1];
    assert_eq!((hdr.gso_type, hdr.gso_size, hdr.csum_start), (GSO_TCPV6, 1000, 40));
    assert_eq!(run_segment(hdr, bytes).unwrap(), b);

    assert_eq!(writes[2], (VnetHdr::default(), icmp));
}

#[test]
fn merged_ipv4_header_is_valid_and_checksum_is_the_partial_sum() {
    let a = flow(&Tcp::v4(), &[1000, 1000], TCP_ACK);
    let mut c = Coalescer::default();
    let writes = materialize(c.plan(&a), &a);
    let (hdr, bytes) = &writes[0];
    assert_eq!(ref_sum(&[&bytes[..20]]), 0xffff, "IPv4 header checksum");
    assert_eq!(u16::from_be_bytes([bytes[2], bytes[3]]), 2040);
    // Summing the TCP part with the partial checksum in place, plus nothing
    // else, is what the kernel does: the result must verify against the
    // pseudo-header once completed.
    let mut full = bytes.clone();
    let vnet = *hdr;
    segment(&VnetHdr { gso_type: GSO_NONE, ..vnet }, &mut full, |_, _| {}).unwrap();
    assert!(checksums_ok(&full));
}

#[test]
fn stops_merging_where_gro_would() {
    let t = Tcp::v4();
    let run = |packets: Vec<Vec<u8>>| {
        let mut c = Coalescer::default();
        c.plan(&packets).iter().map(|g| g.members.len()).collect::<Vec<_>>()
    };
    // PSH ends a group.
    let mut p = flow(&t, &[1000, 1000], TCP_ACK | TCP_PSH);
    p.extend(flow(&Tcp { seq: t.seq + 2000, ..t.clone() }, &[1000], TCP_ACK));
    assert_eq!(run(p), [2, 1]);
    // A short segment ends a group; a longer one cannot join.
    assert_eq!(run(flow(&t, &[1000, 500, 1000], TCP_ACK)), [2, 1]);
    assert_eq!(run(flow(&t, &[1000, 1200], TCP_ACK)), [1, 1]);
    // A gap in sequence numbers (a loss, a retransmission).
    let mut p = flow(&t, &[1000], TCP_ACK);
    p.extend(flow(&Tcp { seq: t.seq + 3000, ..t.clone() }, &[1000], TCP_ACK));
    assert_eq!(run(p), [1, 1]);
    // Different options, ACK numbers or TOS (an ECN mark) do not mix.
    let mut p = flow(&t, &[1000], TCP_ACK);
    p.extend(flow(&Tcp { seq: t.seq + 1000, options: TS_OPTION.to_vec(), ..t.clone() }, &[1000], TCP_ACK));
    assert_eq!(run(p), [1, 1]);
    let mut p = flow(&t, &[1000], TCP_ACK);
    p.extend(flow(&Tcp { seq: t.seq + 1000, ack: 78, ..t.clone() }, &[1000], TCP_ACK));
    assert_eq!(run(p), [1, 1]);
    let mut p = flow(&t, &[1000], TCP_ACK);
    p.extend(flow(&Tcp { seq: t.seq + 1000, tos: 3, ..t.clone() }, &[1000], TCP_ACK));
    assert_eq!(run(p), [1, 1]);
    // SYN, FIN, pure ACKs are written alone, and a FIN closes the flow's
    // group so nothing after it can overtake it.
    let mut p = flow(&t, &[1000], TCP_ACK);
    p.push(Tcp { seq: t.seq + 1000, flags: TCP_ACK | TCP_FIN, ..t.clone() }.packet(&[]));
    p.extend(flow(&Tcp { seq: t.seq + 1000, ..t.clone() }, &[1000], TCP_ACK));
    assert_eq!(run(p), [1, 1, 1]);
    assert_eq!(run(vec![Tcp { flags: 0x02, ..t.clone() }.packet(&[]), t.packet(&[])]), [1, 1]);
    // Never more than 64 KiB in one packet.
    let sizes = vec![1400; 60];
    let groups = run(flow(&t, &sizes, TCP_ACK));
    assert!(groups.len() > 1 && groups.iter().all(|&n| 40 + n * 1400 <= 65535), "{groups:?}");
    assert_eq!(groups.iter().sum::<usize>(), 60);
}

#[test]
fn reuse_across_batches_starts_clean() {
    let t = Tcp::v4();
    let mut c = Coalescer::default();
    let a = flow(&t, &[1000, 1000, 1000], TCP_ACK);
    assert_eq!(c.plan(&a).len(), 1);
    let b = vec![t.packet(&payload(10, 0))];
    let groups = c.plan(&b);
    assert_eq!(groups.len(), 1);
    assert_eq!(groups[0].head(), None);
    assert_eq!(groups[0].vnet, [0; VNET_HDR_LEN]);
}

/// A UDP datagram with a correct checksum.
fn udp_packet(v6: bool, id: u16, sport: u16, body: &[u8]) -> Vec<u8> {
    let t = Tcp { v6, id, ..Tcp::v4() };
    let (s, d) = t.addrs();
    let ulen = 8 + body.len();
    let mut p = if v6 {
        let mut h = vec![0x60, 0, 0, 0];
        h.extend_from_slice(&(ulen as u16).to_be_bytes());
        h.extend_from_slice(&[17, 64]);
        h.extend_from_slice(&s);
        h.extend_from_slice(&d);
        h
    } else {
        let mut h = vec![0x45, 0];
        h.extend_from_slice(&((20 + ulen) as u16).to_be_bytes());
        h.extend_from_slice(&id.to_be_bytes());
        h.extend_from_slice(&[0x40, 0, 64, 17, 0, 0]);
        h.extend_from_slice(&s);
        h.extend_from_slice(&d);
        let c = !ref_sum(&[&h]);
        h[10..12].copy_from_slice(&c.to_be_bytes());
        h
    };
    let l4 = p.len();
    p.extend_from_slice(&sport.to_be_bytes());
    p.extend_from_slice(&5201u16.to_be_bytes());
    p.extend_from_slice(&(ulen as u16).to_be_bytes());
    p.extend_from_slice(&[0, 0]);
    p.extend_from_slice(body);
    let mut c = !ref_sum(&[&pseudo(v6, &s, &d, 17, ulen), &p[l4..]]);
    if c == 0 {
        c = 0xffff;
    }
    p[l4 + 6..l4 + 8].copy_from_slice(&c.to_be_bytes());
    p
}

#[test]
fn merges_udp_datagrams_of_a_flow_and_round_trips() {
    for v6 in [false, true] {
        let sizes = [1372, 1372, 1372, 900];
        let flow: Vec<Vec<u8>> =
            sizes.iter().enumerate().map(|(i, &n)| udp_packet(v6, 50 + i as u16, 3000, &payload(n, i as u8))).collect();
        let other = udp_packet(v6, 1, 3001, &payload(1372, 9));
        let packets = vec![flow[0].clone(), other.clone(), flow[1].clone(), flow[2].clone(), flow[3].clone()];
        let mut c = Coalescer::default();
        let groups = c.plan(&packets);
        assert_eq!(groups.iter().map(|g| g.members.clone()).collect::<Vec<_>>(), [vec![0, 2, 3, 4], vec![1]]);
        assert!(groups[0].is_udp());
        let writes = materialize(groups, &packets);
        let (hdr, bytes) = &writes[0];
        let l4 = if v6 { 40 } else { 20 };
        assert_eq!((hdr.gso_type, hdr.gso_size, hdr.hdr_len, hdr.csum_offset), (GSO_UDP_L4, 1372, l4 + 8, 6));
        assert_eq!(u16::from_be_bytes([bytes[l4 as usize + 4], bytes[l4 as usize + 5]]) as usize, 8 + 3 * 1372 + 900);
        let segs = run_segment(hdr, bytes).unwrap();
        assert!(segs.iter().all(|s| checksums_ok(s)));
        assert_eq!(segs, flow, "v6 {v6}");
        assert_eq!(writes[1], (VnetHdr::default(), other));

        // Turned off: every datagram alone.
        c.set_merge_udp(false);
        assert_eq!(c.plan(&packets).len(), 5);
    }
}

#[test]
fn udp_merges_stop_at_a_short_datagram_and_at_64() {
    let run = |packets: Vec<Vec<u8>>| {
        let mut c = Coalescer::default();
        c.plan(&packets).iter().map(|g| g.members.len()).collect::<Vec<_>>()
    };
    let mk = |sizes: &[usize]| -> Vec<Vec<u8>> {
        sizes.iter().enumerate().map(|(i, &n)| udp_packet(false, i as u16, 3000, &payload(n, 0))).collect()
    };
    assert_eq!(run(mk(&[100, 50, 100])), [2, 1]);
    assert_eq!(run(mk(&[100, 200])), [1, 1]);
    assert_eq!(run(mk(&[10; 70])), [64, 6]);
}
