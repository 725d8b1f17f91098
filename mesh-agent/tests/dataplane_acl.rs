//! The overlay ACL through BPF_PROG_TEST_RUN on crafted frames: verdicts,
//! stateful replies, counters, odd packets and the atomic swap. Root only.

mod dataplane_support;

use dataplane_support::{Shape, frame, frame_with, packet};
use mesh_agent::dataplane::{AclVerdict, Dataplane, PROG_ACL_ETH};
use mesh_policy::{CompiledPolicy, PortRange, Proto, Rule};

const TC_ACT_OK: i32 = 0;
const TC_ACT_SHOT: i32 = 2;

fn rule(id: u32, src: &str, dst: &str, proto: Proto, ports: PortRange) -> Rule {
    Rule { id, src: vec![src.parse().unwrap()], dst: vec![dst.parse().unwrap()], proto, ports }
}

fn run(dp: &Dataplane, f: &[u8]) -> i32 {
    dp.test_run_tc(PROG_ACL_ETH, f).expect("test run").0
}

/// One load for the whole binary: each load of the ACL programs costs the
/// verifier 20-30 s under the VM's TCG (`cargo xtask vm`). The cases run in
/// order on the same dataplane; the counters each case checks are ones the
/// cases before it leave at zero.
#[test]
fn acl_verdicts() {
    let mut dp = Dataplane::load_unpinned().expect("load (verifier)");
    default_deny_rules_replies_and_counters(&mut dp);
    odd_packets_get_their_documented_verdicts(&mut dp);
    replies_of_a_revoked_flow_are_dropped(&mut dp);
}

/// Packets per verdict so far: the later cases check differences.
fn verdicts(dp: &Dataplane) -> [u64; AclVerdict::COUNT as usize] {
    dp.counters().unwrap().verdicts.map(|c| c.packets)
}

/// `after - before` for one verdict.
fn delta(before: &[u64; AclVerdict::COUNT as usize], dp: &Dataplane, v: AclVerdict) -> u64 {
    verdicts(dp)[v as usize] - before[v as usize]
}

fn two_way_policy(generation: u64, v4: &str, v6: &str, proto: Proto, ports: PortRange) -> CompiledPolicy {
    CompiledPolicy {
        generation,
        rules: vec![rule(1, "100.64.0.0/24", v4, proto, ports), rule(2, "fd7a:6d65:7368::/64", v6, proto, ports)],
    }
}

/// Reply entries are bound to the policy that accepted their flow: once a
/// new policy revokes the flow, its replies are dropped too (issue 13).
fn replies_of_a_revoked_flow_are_dropped(dp: &mut Dataplane) {
    for (client, server) in [("100.64.0.1", "198.18.20.5"), ("fd7a:6d65:7368::1", "2001:db8:20::5")] {
        dp.install_policy(&two_way_policy(10, "198.18.20.0/24", "2001:db8:20::/64", Proto::Udp, PortRange::single(53)))
            .unwrap();
        let query = packet(client, server, 17, 40000, 53);
        let answer = packet(server, client, 17, 53, 40000);
        assert_eq!(run(dp, &frame(&query)), TC_ACT_OK, "{client}: allowed query");
        assert_eq!(run(dp, &frame(&answer)), TC_ACT_OK, "{client}: its answer");
        // The new policy allows only other ports (and another protocol).
        dp.install_policy(&two_way_policy(11, "198.18.20.0/24", "2001:db8:20::/64", Proto::Udp, PortRange::single(54)))
            .unwrap();
        let before = verdicts(dp);
        assert_eq!(run(dp, &frame(&answer)), TC_ACT_SHOT, "{client}: the answer of a revoked flow");
        assert_eq!(run(dp, &frame(&query)), TC_ACT_SHOT, "{client}: the revoked query");
        assert_eq!(delta(&before, dp, AclVerdict::DropNoRule), 2);
        assert_eq!(delta(&before, dp, AclVerdict::AcceptEstablished), 0);
    }
}

fn default_deny_rules_replies_and_counters(dp: &mut Dataplane) {
    let syn = packet("100.64.0.1", "198.18.20.5", 6, 40000, 5432);
    // No policy yet: everything IP is dropped.
    assert_eq!(run(dp, &frame(&syn)), TC_ACT_SHOT);
    let policy = CompiledPolicy {
        generation: 3,
        rules: vec![
            rule(7, "100.64.0.0/10", "198.18.20.0/24", Proto::Tcp, PortRange::single(5432)),
            rule(8, "100.64.0.0/10", "198.18.0.0/15", Proto::Icmp, PortRange::ANY),
        ],
    };
    let report = dp.install_policy(&policy).expect("install");
    assert_eq!(report.generation, 3);
    assert_eq!(run(dp, &frame(&syn)), TC_ACT_OK);
    let mut synack = packet("198.18.20.5", "100.64.0.1", 6, 5432, 40000);
    synack.tcp_flags = 0x12;
    assert_eq!(run(dp, &frame(&synack)), TC_ACT_OK, "reply of an accepted flow");
    let mut stray = synack;
    stray.dport = 40001;
    stray.tcp_flags = 0x10;
    assert_eq!(run(dp, &frame(&stray)), TC_ACT_SHOT, "reply-looking without a flow");
    let other_port = packet("100.64.0.1", "198.18.20.5", 6, 40000, 5433);
    assert_eq!(run(dp, &frame(&other_port)), TC_ACT_SHOT);
    let mut echo = packet("100.64.0.1", "198.18.30.1", 1, 99, 0);
    echo.icmp_type = 8;
    assert_eq!(run(dp, &frame(&echo)), TC_ACT_OK);
    let mut reply = packet("198.18.30.1", "100.64.0.1", 1, 99, 0);
    reply.icmp_type = 0;
    assert_eq!(run(dp, &frame(&reply)), TC_ACT_OK);

    let c = dp.counters().unwrap();
    assert_eq!(c.generation, Some(3));
    assert_eq!(c.rule(7).unwrap().packets, 1);
    assert_eq!(c.rule(8).unwrap().packets, 1);
    assert_eq!(c.verdict(AclVerdict::AcceptRule).packets, 2);
    assert_eq!(c.verdict(AclVerdict::AcceptEstablished).packets, 2);
    assert_eq!(c.verdict(AclVerdict::DropNoFlow).packets, 1);
    assert_eq!(c.verdict(AclVerdict::DropNoRule).packets, 2);
}

fn odd_packets_get_their_documented_verdicts(dp: &mut Dataplane) {
    let policy = CompiledPolicy {
        generation: 4,
        rules: vec![
            rule(1, "0.0.0.0/0", "0.0.0.0/0", Proto::Any, PortRange::ANY),
            rule(2, "::/0", "::/0", Proto::Any, PortRange::ANY),
        ],
    };
    dp.install_policy(&policy).unwrap();
    let udp = packet("100.64.0.1", "100.64.0.2", 17, 1, 53);
    let good = frame(&udp);
    assert_eq!(run(dp, &good), TC_ACT_OK);

    // ARP: not IP, passes.
    let mut arp = good.clone();
    arp[12..14].copy_from_slice(&[0x08, 0x06]);
    assert_eq!(run(dp, &arp), TC_ACT_OK);
    // Truncated UDP header.
    let mut short = good[..14 + 20 + 4].to_vec();
    short[16..18].copy_from_slice(&24u16.to_be_bytes());
    assert_eq!(run(dp, &short), TC_ACT_SHOT);
    // IHL 4.
    let mut bad_ihl = good.clone();
    bad_ihl[14] = 0x44;
    assert_eq!(run(dp, &bad_ihl), TC_ACT_SHOT);
    // Total length beyond the frame.
    let mut long = good.clone();
    long[16..18].copy_from_slice(&1400u16.to_be_bytes());
    assert_eq!(run(dp, &long), TC_ACT_SHOT);
    // A non-first fragment.
    let frag = frame_with(&udp, &Shape { frag_offset: 185, ..Shape::default() });
    assert_eq!(run(dp, &frag), TC_ACT_SHOT);
    // IPv6 through hop-by-hop and destination options, and a first fragment.
    let v6 = packet("fd7a:6d65:7368::1", "fd7a:6d65:7368::2", 17, 1, 53);
    let ext = frame_with(&v6, &Shape { v6_ext: vec![0, 60, 44], ..Shape::default() });
    assert_eq!(run(dp, &ext), TC_ACT_OK);
    // Five extension headers: malformed.
    let deep = frame_with(&v6, &Shape { v6_ext: vec![0, 60, 60, 60, 60], ..Shape::default() });
    assert_eq!(run(dp, &deep), TC_ACT_SHOT);

    let c = dp.counters().unwrap();
    assert_eq!(c.verdict(AclVerdict::PassNonIp).packets, 1);
    assert_eq!(c.verdict(AclVerdict::DropMalformed).packets, 4);
    assert_eq!(c.verdict(AclVerdict::DropFragment).packets, 1);
}
