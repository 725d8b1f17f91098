//! Differential test: random policies (v4 and v6, nested CIDRs, overlapping
//! port ranges, every protocol kind, up to 2,000 rules) and random packets
//! (including replies of earlier packets, reply-direction packets of flows
//! never seen, first and later fragments, and ICMP errors quoting packets
//! that passed or not, forged ones included; IPv4 and IPv6) run through the
//! real ACL program
//! with BPF_PROG_TEST_RUN and through the plain-Rust reference evaluator.
//! Every packet's pass/drop must agree, and after each policy the per-rule
//! and per-verdict counters must equal the evaluator's tallies. Root only.

mod dataplane_support;

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use dataplane_support::{frame, quote};
use ipnet::IpNet;
use mesh_agent::dataplane::{AclVerdict, Dataplane, PROG_ACL_ETH, PacketCount};
use mesh_policy::{
    CompiledPolicy, PortRange, Proto, Rule,
    eval::{Fragment, Packet, Stateful, Verdict},
};

/// xorshift64*: deterministic, no dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn pick<T: Copy>(&mut self, xs: &[T]) -> T {
        xs[self.below(xs.len() as u64) as usize]
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

/// A small universe of addresses so that CIDRs nest and packets hit them.
struct Universe {
    v4: Vec<Ipv4Addr>,
    v6: Vec<Ipv6Addr>,
}

impl Universe {
    fn new(rng: &mut Rng) -> Self {
        let v4 = (0..48)
            .map(|_| {
                let base: u32 = if rng.chance(50) { 0x6440_0000 } else { 0xC612_0000 }; // 100.64/16, 198.18/16
                Ipv4Addr::from(base | (rng.below(4) as u32) << 8 | rng.below(8) as u32)
            })
            .collect();
        let v6 = (0..48)
            .map(|_| {
                let mut o = [0u8; 16];
                o[..6].copy_from_slice(&[0xfd, 0x7a, 0x6d, 0x65, 0x73, 0x68]);
                o[7] = rng.below(4) as u8;
                o[15] = rng.below(8) as u8;
                Ipv6Addr::from(o)
            })
            .collect();
        Self { v4, v6 }
    }

    fn addr(&self, rng: &mut Rng, v4: bool) -> IpAddr {
        if rng.chance(5) {
            // Outside every policy CIDR most of the time.
            return if v4 {
                IpAddr::V4(Ipv4Addr::from(0x0A00_0000 | rng.below(1 << 24) as u32))
            } else {
                IpAddr::V6(Ipv6Addr::from(0xfd00_0000_0000_0000_0000_0000_0000_0000u128 | u128::from(rng.next())))
            };
        }
        if v4 { IpAddr::V4(rng.pick(&self.v4)) } else { IpAddr::V6(rng.pick(&self.v6)) }
    }

    /// A CIDR around a universe address. `wide` is the percentage of wide
    /// ones (/16, /22, /48, /56): they nest with everything and multiply the
    /// decision entries, so big policies get few (as real ones have).
    fn cidr(&self, rng: &mut Rng, v4: bool, wide: u64) -> IpNet {
        let addr = self.addr(rng, v4);
        if !rng.chance(wide) {
            let len = if v4 { rng.pick(&[24, 29, 30, 32, 32, 32]) } else { rng.pick(&[64, 120, 125, 128, 128, 128]) };
            return IpNet::new(addr, len).unwrap().trunc();
        }
        // Mostly hosts and small subnets, some wide ones, rarely everything:
        // a wide CIDR multiplies the decision entries (see compile.rs).
        let len = if rng.chance(5) {
            0
        } else if v4 {
            rng.pick(&[16, 22])
        } else {
            rng.pick(&[48, 56])
        };
        IpNet::new(addr, len).unwrap().trunc()
    }
}

const PORTS: [u16; 8] = [22, 53, 80, 443, 1000, 1500, 5432, 65535];

fn random_rule(rng: &mut Rng, u: &Universe, id: u32, wide: u64) -> Rule {
    let v4 = rng.chance(60);
    let mixed = rng.chance(10);
    let side = |rng: &mut Rng| -> Vec<IpNet> {
        (0..1 + rng.below(3))
            .map(|_| {
                let family = if mixed { rng.chance(50) } else { v4 };
                u.cidr(rng, family, wide)
            })
            .collect()
    };
    let src = side(rng);
    let dst = side(rng);
    let proto = rng.pick(&[Proto::Any, Proto::Tcp, Proto::Tcp, Proto::Udp, Proto::Icmp, Proto::Sctp, Proto::Other(47)]);
    let ports = match rng.below(4) {
        0 => PortRange::ANY,
        1 => PortRange::single(rng.pick(&PORTS)),
        _ => {
            let (a, b) = (rng.pick(&PORTS), rng.pick(&PORTS));
            let (first, last) = if a <= b { (a, b) } else { (b, a) };
            PortRange { first: first.saturating_sub(rng.below(3) as u16), last }
        }
    };
    Rule { id, src, dst, proto, ports }
}

/// What [`random_packet`] made, for the coverage tally.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Made {
    Fresh,
    /// A reply (or reply-looking packet) of something that passed.
    ReplyOfSent,
    /// A reply-direction packet of a flow never seen: passes only by the
    /// reversed tuple.
    ReplyWithoutFlow,
    FirstFragment,
    LaterFragment,
    /// An ICMP error quoting a packet that passed (maybe since revoked).
    ErrorAboutSent,
    /// An ICMP error quoting a packet never seen, or addressed elsewhere.
    ErrorUnrelated,
}

/// A reply-direction packet of `p` (TCP flags of a reply, echo reply for
/// an echo request, sometimes with the wrong source port).
fn reply_of(rng: &mut Rng, p: &Packet) -> Packet {
    let mut r = Packet { src: p.dst, dst: p.src, sport: p.dport, dport: p.sport, quoted: None, ..*p };
    match p.proto {
        6 => r.tcp_flags = rng.pick(&[0x12, 0x10, 0x11, 0x14, 0x18]),
        1 | 58 => {
            r.sport = p.sport;
            r.dport = 0;
            r.icmp_type = match p.icmp_type {
                8 => 0,
                128 => 129,
                t => t,
            };
        }
        _ => {}
    }
    if rng.chance(10) {
        r.sport = r.sport.wrapping_add(1);
    }
    r
}

/// A datagram identifier of the packet's family.
fn frag_id(rng: &mut Rng, p: &Packet) -> u32 {
    if p.src.is_ipv4() { rng.below(1 << 16) as u32 } else { rng.next() as u32 }
}

fn random_packet(rng: &mut Rng, u: &Universe, sent: &[Packet]) -> (Packet, Made) {
    let roll = rng.below(100);
    if !sent.is_empty() && roll < 20 {
        let p = sent[rng.below(sent.len() as u64) as usize];
        return (Packet { fragment: Fragment::Whole, ..reply_of(rng, &p) }, Made::ReplyOfSent);
    }
    if roll < 28 {
        let p = fresh_packet(rng, u);
        return (reply_of(rng, &p), Made::ReplyWithoutFlow);
    }
    if roll < 33 {
        let p = fresh_packet(rng, u);
        return (Packet { fragment: Fragment::First { id: frag_id(rng, &p) }, ..p }, Made::FirstFragment);
    }
    if roll < 38 {
        // Mostly the tail of a datagram whose head was sent.
        let firsts: Vec<&Packet> = sent.iter().filter(|p| matches!(p.fragment, Fragment::First { .. })).collect();
        let p = if !firsts.is_empty() && rng.chance(70) {
            *firsts[rng.below(firsts.len() as u64) as usize]
        } else if sent.is_empty() {
            fresh_packet(rng, u)
        } else {
            sent[rng.below(sent.len() as u64) as usize]
        };
        let id = match p.fragment {
            Fragment::First { id } if rng.chance(80) => id,
            _ => frag_id(rng, &p),
        };
        return (Packet { fragment: Fragment::Later { id }, quoted: None, ..p }, Made::LaterFragment);
    }
    if roll < 46 {
        let about_sent = !sent.is_empty() && rng.chance(75);
        let about = if about_sent { sent[rng.below(sent.len() as u64) as usize] } else { fresh_packet(rng, u) };
        let v4 = about.src.is_ipv4();
        let mut e = Packet {
            src: u.addr(rng, v4),
            dst: about.src,
            proto: if v4 { 1 } else { 58 },
            sport: 0,
            dport: 0,
            // Errors, and a redirect / parameter problem (not related).
            icmp_type: if v4 { rng.pick(&[3, 3, 11, 5, 12]) } else { rng.pick(&[1, 2, 2, 3, 4, 137]) },
            tcp_flags: 0,
            fragment: Fragment::Whole,
            quoted: Some(quote(&about)),
        };
        let forged = rng.chance(10);
        if forged {
            e.dst = u.addr(rng, v4);
        }
        return (e, if about_sent && !forged { Made::ErrorAboutSent } else { Made::ErrorUnrelated });
    }
    (fresh_packet(rng, u), Made::Fresh)
}

fn fresh_packet(rng: &mut Rng, u: &Universe) -> Packet {
    let v4 = rng.chance(55);
    let proto = rng.pick(&[6, 6, 17, 17, 1, 58, 132, 47]);
    let port = |rng: &mut Rng| {
        if rng.chance(80) { rng.pick(&PORTS).wrapping_add(rng.below(3) as u16) } else { rng.next() as u16 }
    };
    let mut p = Packet {
        src: u.addr(rng, v4),
        dst: u.addr(rng, v4),
        proto,
        sport: 1024 + rng.below(64) as u16,
        dport: port(rng),
        icmp_type: 0,
        tcp_flags: 0,
        fragment: Fragment::Whole,
        quoted: None,
    };
    match proto {
        6 => p.tcp_flags = rng.pick(&[0x02, 0x02, 0x10, 0x12, 0x18]),
        1 | 58 => {
            p.dport = 0;
            p.icmp_type = rng.pick(&[8, 8, 0, 128, 129, 3]);
        }
        47 => {
            p.sport = 0;
            p.dport = 0;
        }
        _ => {}
    }
    p
}

#[test]
fn ebpf_acl_agrees_with_the_reference_evaluator() {
    mesh_lab::require_root!();
    let mut dp = Dataplane::load_unpinned().expect("load");
    // The evaluator's flows never expire; neither may the program's during
    // the test.
    dp.set_flow_timeouts(86_400, 86_400).unwrap();
    let mut rng = Rng(0x5eed_ac10_0000_0001);
    let mut state = Stateful::new();
    let mut sent: Vec<Packet> = Vec::new();
    let sizes: Vec<usize> = (0..30).map(|i| [1, 3, 10, 30, 100, 300][i % 6]).chain([1000, 2000]).collect();
    let (mut pairs, mut max_rules, mut total_entries) = (0u64, 0usize, 0usize);
    let mut verdicts_expected = [PacketCount::default(); AclVerdict::COUNT as usize];
    // (what was made, whether it passed) -> packets.
    let mut made: std::collections::BTreeMap<(Made, bool), u64> = std::collections::BTreeMap::new();

    for (g, &size) in sizes.iter().enumerate() {
        let universe = Universe::new(&mut rng);
        let policy = CompiledPolicy {
            generation: g as u64 + 1,
            rules: (0..size)
                .map(|i| random_rule(&mut rng, &universe, 10_000 + i as u32, if size >= 300 { 2 } else { 30 }))
                .collect(),
        };
        let report = dp.install_policy(&policy).unwrap_or_else(|e| panic!("install policy {g} ({size} rules): {e}"));
        state.new_policy();
        max_rules = max_rules.max(size);
        let started = std::time::Instant::now();
        eprintln!("policy {g}: {size} rules, {} entries, installed in {:?}", report.entries, report.elapsed);
        let _ = started;
        total_entries += report.entries;

        let packets = if size >= 1000 { 1500 } else { 700 };
        let mut per_rule: HashMap<u32, PacketCount> = HashMap::new();
        for n in 0..packets {
            let (p, kind) = random_packet(&mut rng, &universe, &sent);
            let f = frame(&p);
            let expected = state.decide(&policy, &p);
            let (ret, _) = dp.test_run_tc(PROG_ACL_ETH, &f).expect("test run");
            let passed = ret == 0;
            assert_eq!(
                passed,
                expected.passes(),
                "policy {g} ({size} rules), packet {n}: {p:?}\nexpected {expected:?}, program returned {ret}\npolicy: {policy:#?}"
            );
            let len = f.len() as u64;
            let slot = match expected {
                Verdict::AcceptRule(i) => {
                    let c = per_rule.entry(policy.rules[i].id).or_default();
                    c.packets += 1;
                    c.bytes += len;
                    AclVerdict::AcceptRule
                }
                Verdict::AcceptEstablished => AclVerdict::AcceptEstablished,
                Verdict::DropNoRule => AclVerdict::DropNoRule,
                Verdict::DropNoFlow => AclVerdict::DropNoFlow,
                Verdict::DropFragment => AclVerdict::DropFragment,
            };
            *made.entry((kind, passed)).or_default() += 1;
            verdicts_expected[slot as usize].packets += 1;
            verdicts_expected[slot as usize].bytes += len;
            if expected.passes() {
                sent.push(p);
            }
            pairs += 1;
        }

        let counters = dp.counters().unwrap();
        assert_eq!(counters.generation, Some(g as u64 + 1));
        for r in &counters.rules {
            let want = per_rule.get(&r.rule_id).copied().unwrap_or_default();
            assert_eq!(r.count, want, "policy {g}: counter of rule {}", r.rule_id);
        }
        assert_eq!(counters.verdicts, verdicts_expected, "policy {g}: per-verdict counters");
    }
    let v = |x: AclVerdict| verdicts_expected[x as usize].packets;
    println!(
        "differential: {pairs} policy/packet pairs compared over {} policies (up to {max_rules} rules, {total_entries} decision entries in all); all agree \
         (accepted by a rule {}, as replies or related {}, dropped without a rule {}, reply-looking without a flow {}, \
         later fragments without their first {})",
        sizes.len(),
        v(AclVerdict::AcceptRule),
        v(AclVerdict::AcceptEstablished),
        v(AclVerdict::DropNoRule),
        v(AclVerdict::DropNoFlow),
        v(AclVerdict::DropFragment),
    );
    println!("differential: packets made (kind, passed): {made:?}");
    for kind in [Made::ReplyWithoutFlow, Made::LaterFragment, Made::ErrorAboutSent, Made::ErrorUnrelated] {
        for passed in [true, false] {
            assert!(made.get(&(kind, passed)).copied().unwrap_or(0) > 20, "too few {kind:?} that passed={passed}");
        }
    }
}
