//! BPF_PROG_TEST_RUN tests of the MSS clamp (checksums verified by an
//! independent computation) and of every underlay-guard verdict. Root only.

mod dataplane_support;

use dataplane_support::{Shape, frame, frame_with, packet, tcp_checksum_ok};
use mesh_agent::dataplane::{AllowRule, Dataplane, GuardSettings, GuardVerdict, MssEvent, PROG_ACL_ETH, PROG_GUARD};
use mesh_policy::{CompiledPolicy, PortRange, Proto, Rule};

const MTU: u32 = 1420;

fn allow_all() -> CompiledPolicy {
    let any = |id, net: &str| Rule {
        id,
        src: vec![net.parse().unwrap()],
        dst: vec![net.parse().unwrap()],
        proto: Proto::Any,
        ports: PortRange::ANY,
    };
    CompiledPolicy { generation: 1, rules: vec![any(1, "0.0.0.0/0"), any(2, "::/0")] }
}

/// Runs the ACL on a SYN with `options` and returns the options after it.
fn clamp(dp: &Dataplane, src: &str, dst: &str, flags: u8, options: &[u8]) -> Vec<u8> {
    let mut p = packet(src, dst, 6, 40000, 443);
    p.tcp_flags = flags;
    let f = frame_with(&p, &Shape { tcp_options: options.to_vec(), ..Shape::default() });
    assert!(tcp_checksum_ok(&f), "the builder's own checksum");
    let (ret, out) = dp.test_run_tc(PROG_ACL_ETH, &f).unwrap();
    assert_eq!(ret, 0, "accepted");
    assert_eq!(out.len(), f.len());
    assert!(tcp_checksum_ok(&out), "checksum after the clamp, recomputed from scratch");
    let l4 = if src.contains(':') { 14 + 40 } else { 14 + 20 };
    let (mut a, mut b) = (out[..l4 + 20].to_vec(), f[..l4 + 20].to_vec());
    a[l4 + 16..l4 + 18].fill(0);
    b[l4 + 16..l4 + 18].fill(0);
    assert_eq!(a, b, "headers before the options untouched except the checksum");
    out[l4 + 20..l4 + 20 + options.len()].to_vec()
}

/// One load for the whole binary: each load of the ACL programs costs the
/// verifier 20-30 s under the VM's TCG (`cargo xtask vm`). The MSS case
/// uses only the TC ACL and its counters, the guard case only the XDP guard
/// and its own, so running them in order on one dataplane keeps both exact.
#[test]
fn mss_clamp_and_guard() {
    mesh_lab::require_root!();
    let mut dp = Dataplane::load_unpinned().expect("load (verifier)");
    mss_is_clamped_with_correct_checksums_and_nothing_else_changes(&mut dp);
    guard_checks_wireguard_messages_rate_limits_unknown_sources_and_enforces_strict_mode(&mut dp);
}

fn mss_is_clamped_with_correct_checksums_and_nothing_else_changes(dp: &mut Dataplane) {
    dp.install_policy(&allow_all()).unwrap();
    dp.set_mss(MTU).unwrap();
    let mss = |v: u16| [2, 4, (v >> 8) as u8, v as u8];
    let sack_ws = [4, 2, 1, 3, 3, 7];

    // IPv4 SYN, MSS first (even offset): 1460 -> 1380.
    let mut opts = mss(1460).to_vec();
    opts.extend(sack_ws);
    let out = clamp(dp, "100.64.0.1", "198.18.20.5", 0x02, &opts);
    assert_eq!(out[..4], mss(1380));
    assert_eq!(out[4..], sack_ws, "other options untouched");

    // IPv4, MSS after a NOP (odd offset).
    let mut odd = vec![1];
    odd.extend(mss(1460));
    odd.extend([1, 1, 1]);
    let out = clamp(dp, "100.64.0.1", "198.18.20.5", 0x02, &odd);
    assert_eq!(out[1..5], mss(1380));
    assert_eq!(out[0], 1);
    assert_eq!(out[5..], [1, 1, 1]);

    // IPv6 SYN-ACK: 1440 -> 1360.
    let mut v6 = sack_ws.to_vec();
    v6.extend([1, 1]);
    v6.extend(mss(1440));
    let out = clamp(dp, "fd7a:6d65:7368::2", "fd7a:6d65:7368::1", 0x12, &v6);
    assert_eq!(out[8..12], mss(1360));
    assert_eq!(out[..8], v6[..8]);

    // Already small enough, no MSS option, not a SYN: left alone.
    for (flags, options) in [(0x02, mss(1200).to_vec()), (0x02, sack_ws.to_vec()), (0x10, mss(1460).to_vec())] {
        let out = clamp(dp, "100.64.0.1", "198.18.20.5", flags, &options);
        assert_eq!(out, options);
    }
    let c = dp.counters().unwrap();
    assert_eq!(c.mss(MssEvent::Clamped), 3);
    assert_eq!(c.mss(MssEvent::Unchanged), 1);
    assert_eq!(c.mss(MssEvent::NoOption), 1);

    // Clamp off: a SYN keeps its MSS.
    dp.set_mss(0).unwrap();
    assert_eq!(clamp(dp, "100.64.0.1", "198.18.20.5", 0x02, &mss(1460)), mss(1460));
}

const WG_PORT: u16 = 51820;
const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;

/// A UDP frame to the WireGuard port with a message of `ty` and `len`.
fn wg(src: &str, ty: u8, len: usize) -> Vec<u8> {
    let dst = if src.contains(':') { "2001:db8::1" } else { "203.0.113.1" };
    let p = packet(src, dst, 17, 51820, WG_PORT);
    let mut f = frame_with(&p, &Shape { payload: len, ..Shape::default() });
    let at = f.len() - len;
    f[at..at + 4].copy_from_slice(&[ty, 0, 0, 0]);
    f
}

fn guard_checks_wireguard_messages_rate_limits_unknown_sources_and_enforces_strict_mode(dp: &mut Dataplane) {
    dp.set_wg_port(WG_PORT).unwrap();
    dp.set_guard(&GuardSettings { rate_pps: 1, burst: 5, ..GuardSettings::default() }).unwrap();
    fn run_on(dp: &Dataplane, f: &[u8]) -> u32 {
        dp.test_run_xdp(PROG_GUARD, f).unwrap()
    }
    macro_rules! run {
        ($f:expr) => {
            run_on(dp, $f)
        };
    }

    // Each message type at its exact size passes (unknown source, in budget;
    // the initiation and the cookie reply spend a token each).
    assert_eq!(run!(&wg("192.0.2.10", 1, 148)), XDP_PASS);
    assert_eq!(run!(&wg("192.0.2.10", 2, 92)), XDP_PASS);
    assert_eq!(run!(&wg("192.0.2.10", 3, 64)), XDP_PASS);
    assert_eq!(run!(&wg("192.0.2.10", 4, 32)), XDP_PASS);
    // A full-MTU packet at the usual MTU of 1420 is not padded to 16.
    assert_eq!(run!(&wg("192.0.2.10", 4, 32 + 1420)), XDP_PASS, "unpadded full-MTU transport data");
    // Wrong sizes and types.
    assert_eq!(run!(&wg("192.0.2.10", 1, 100)), XDP_DROP);
    assert_eq!(run!(&wg("192.0.2.10", 4, 40)), XDP_DROP);
    assert_eq!(run!(&wg("192.0.2.10", 7, 148)), XDP_DROP);
    let mut reserved = wg("192.0.2.10", 1, 148);
    let n = reserved.len();
    reserved[n - 147] = 1;
    assert_eq!(run!(&reserved), XDP_DROP);
    // The /24's burst of 5: 2 spent above, 3 more initiations; then its
    // initiations and cookie replies are dropped.
    for _ in 0..3 {
        assert_eq!(run!(&wg("192.0.2.11", 1, 148)), XDP_PASS);
    }
    for _ in 0..3 {
        assert_eq!(run!(&wg("192.0.2.12", 1, 148)), XDP_DROP, "rate-limited");
    }
    assert_eq!(run!(&wg("192.0.2.12", 3, 64)), XDP_DROP, "cookie replies are limited too");
    // Transport data and handshake responses are never limited by source:
    // a peer that roamed into this /24 keeps its session.
    for _ in 0..10 {
        assert_eq!(run!(&wg("192.0.2.12", 4, 1440)), XDP_PASS, "transport data from an unknown source");
    }
    assert_eq!(run!(&wg("192.0.2.12", 2, 92)), XDP_PASS, "a handshake response from an unknown source");
    // Another prefix has its own bucket; a known endpoint is never limited.
    assert_eq!(run!(&wg("198.51.100.7", 1, 148)), XDP_PASS);
    dp.set_known_endpoints(&["192.0.2.12".parse().unwrap()]).unwrap();
    assert_eq!(run!(&wg("192.0.2.12", 1, 148)), XDP_PASS);
    // IPv6 sources: bucket per /64.
    assert_eq!(run!(&wg("2001:db8:1::5", 1, 148)), XDP_PASS);
    // Malformed IPv4 header.
    let mut bad = wg("192.0.2.10", 1, 148);
    bad[14] = 0x43;
    assert_eq!(run!(&bad), XDP_DROP);
    // IPv6 extension headers do not hide a message from the checks: junk
    // behind one or three of them is still dropped, a well-formed message
    // behind them still passes, and a chain longer than the walk is dropped.
    let wg6 = |ext: &[u8], ty: u8, len: usize| {
        let p = packet("2001:db8:2::5", "2001:db8::1", 17, 51820, WG_PORT);
        let mut f = frame_with(&p, &Shape { payload: len, v6_ext: ext.to_vec(), ..Shape::default() });
        let at = f.len() - len;
        f[at..at + 4].copy_from_slice(&[ty, 0, 0, 0]);
        f
    };
    assert_eq!(run!(&wg6(&[60], 9, 148)), XDP_DROP, "junk behind a destination-options header");
    assert_eq!(run!(&wg6(&[0, 43, 44], 1, 100)), XDP_DROP, "bad size behind three extension headers");
    assert_eq!(run!(&wg6(&[0, 60], 4, 64)), XDP_PASS, "transport data behind two extension headers");
    assert_eq!(run!(&wg6(&[60; 7], 4, 64)), XDP_DROP, "a chain longer than the walk");

    // Non-WireGuard traffic passes; in strict mode only what is allowed.
    let ssh = |src: &str, flags: u8| {
        let mut p = packet(src, "203.0.113.1", 6, 40000, 22);
        p.tcp_flags = flags;
        frame(&p)
    };
    let dns = frame(&packet("192.0.2.53", "203.0.113.1", 17, 53, 5353));
    assert_eq!(run!(&ssh("192.0.2.99", 0x02)), XDP_PASS);
    dp.set_guard(&GuardSettings {
        rate_pps: 1,
        burst: 5,
        strict: true,
        allow: vec![AllowRule { src: "198.51.100.0/24".parse().unwrap(), proto: 6, port: 22 }],
        ..GuardSettings::default()
    })
    .unwrap();
    assert_eq!(run!(&ssh("192.0.2.99", 0x02)), XDP_DROP, "SSH from outside the admin CIDR");
    assert_eq!(run!(&ssh("198.51.100.9", 0x02)), XDP_PASS, "SSH from the admin CIDR");
    assert_eq!(run!(&ssh("192.0.2.99", 0x10)), XDP_PASS, "a reply to our own connection");
    assert_eq!(run!(&dns), XDP_DROP);
    let mut ns = packet("fe80::1", "ff02::1:ff00:1", 58, 0, 0);
    ns.icmp_type = 135;
    assert_eq!(run!(&frame(&ns)), XDP_PASS, "neighbour discovery");
    // Path-MTU errors pass in strict mode (without them PMTU discovery
    // blackholes large packets).
    let mut frag_needed = frame(&packet("192.0.2.99", "203.0.113.1", 1, 0, 0));
    frag_needed[14 + 20] = 3;
    frag_needed[14 + 21] = 4;
    assert_eq!(run!(&frag_needed), XDP_PASS, "ICMPv4 fragmentation needed");
    let mut too_big = packet("2001:db8:9::1", "2001:db8::1", 58, 0, 0);
    too_big.icmp_type = 2;
    assert_eq!(run!(&frame(&too_big)), XDP_PASS, "ICMPv6 packet too big");
    let mut unreachable = frag_needed.clone();
    unreachable[14 + 21] = 3;
    assert_eq!(run!(&unreachable), XDP_DROP, "other ICMP errors stay under the allow-list");
    let mut arp = dns.clone();
    arp[12..14].copy_from_slice(&[0x08, 0x06]);
    assert_eq!(run!(&arp), XDP_PASS);

    let c = dp.counters().unwrap();
    let g = |v: GuardVerdict| c.guard(v).packets;
    assert_eq!(g(GuardVerdict::PassUnknown), 4 + 3 + 10 + 1 + 1 + 1 + 1 + 1, "in budget, transport, responses");
    assert_eq!(g(GuardVerdict::PassKnown), 1);
    assert_eq!(g(GuardVerdict::DropBadSize), 3);
    assert_eq!(g(GuardVerdict::DropBadType), 3);
    assert_eq!(g(GuardVerdict::DropRateLimited), 4);
    assert_eq!(g(GuardVerdict::DropMalformed), 2);
    assert_eq!(g(GuardVerdict::Pass), 2, "SSH before strict mode, ARP");
    assert_eq!(g(GuardVerdict::PassAllowed), 5);
    assert_eq!(g(GuardVerdict::DropStrict), 3);
}
