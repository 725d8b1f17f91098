//! The overlay ACL through BPF_PROG_TEST_RUN on crafted frames: verdicts,
//! stateful replies, counters, odd packets and the atomic swap. Root only.

mod dataplane_support;

use dataplane_support::{Shape, frame, frame_with, icmp_error, packet};
use mesh_agent::dataplane::{AclVerdict, Dataplane, PROG_ACL_ETH};
use mesh_policy::{
    CompiledPolicy, PortRange, Proto, Rule,
    eval::{Fragment, Packet},
};

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
    mesh_lab::require_root!();
    let mut dp = Dataplane::load_unpinned().expect("load (verifier)");
    default_deny_rules_replies_and_counters(&mut dp);
    odd_packets_get_their_documented_verdicts(&mut dp);
    replies_of_a_revoked_flow_are_dropped(&mut dp);
    replies_without_a_flow_pass_by_the_reversed_tuple(&mut dp);
    later_fragments_follow_their_first(&mut dp);
    icmp_errors_about_accepted_flows_pass(&mut dp);
}

/// Client and server of the cases below, IPv4 and IPv6, a router on the
/// server's side and a node outside the clients' network.
const PAIRS: [(&str, &str, &str, &str); 2] = [
    ("100.64.0.1", "198.18.20.5", "198.18.20.1", "100.64.1.9"),
    ("fd7a:6d65:7368::1", "2001:db8:20::5", "2001:db8:20::1", "fd7a:6d65:7368:1::9"),
];

/// UDP 53, TCP 5432 and ICMP from the clients to the servers, nothing back.
fn client_policy(generation: u64) -> CompiledPolicy {
    let mut rules = Vec::new();
    for (id, proto, ports) in [
        (1, Proto::Udp, PortRange::single(53)),
        (3, Proto::Tcp, PortRange::single(5432)),
        (5, Proto::Icmp, PortRange::ANY),
    ] {
        rules.push(rule(id, "100.64.0.0/24", "198.18.20.0/24", proto, ports));
        rules.push(rule(id + 1, "fd7a:6d65:7368::/64", "2001:db8:20::/64", proto, ports));
    }
    CompiledPolicy { generation, rules }
}

/// Issue 12: a gateway that takes over established connections sees their
/// replies first. They pass when the policy accepts the reversed tuple
/// (TCP without SYN, UDP, echo replies), and their flow is remembered.
fn replies_without_a_flow_pass_by_the_reversed_tuple(dp: &mut Dataplane) {
    dp.install_policy(&client_policy(20)).unwrap();
    for (client, server, _, outsider) in PAIRS {
        let icmp = if client.contains(':') { 58 } else { 1 };
        let (echo_request, echo_reply) = if icmp == 1 { (8, 0) } else { (128, 129) };
        let before = verdicts(dp);
        let answer = packet(server, client, 17, 53, 40000);
        assert_eq!(run(dp, &frame(&answer)), TC_ACT_OK, "{client}: UDP answer of an allowed query");
        let wrong_port = packet(server, client, 17, 54, 40000);
        assert_eq!(run(dp, &frame(&wrong_port)), TC_ACT_SHOT, "{client}: UDP from a port no rule opens");
        let mut ack = packet(server, client, 6, 5432, 40001);
        ack.tcp_flags = 0x10;
        assert_eq!(run(dp, &frame(&ack)), TC_ACT_OK, "{client}: TCP ACK of an allowed connection");
        // The flow was remembered: even a SYN-ACK on its tuple is a reply
        // now, while one on a fresh tuple is not.
        let synack = Packet { tcp_flags: 0x12, ..ack };
        assert_eq!(run(dp, &frame(&synack)), TC_ACT_OK, "{client}: the remembered flow");
        let fresh_synack = Packet { dport: 40002, ..synack };
        assert_eq!(run(dp, &frame(&fresh_synack)), TC_ACT_SHOT, "{client}: SYN is never judged reversed");
        let other = Packet { sport: 5433, ..ack };
        assert_eq!(run(dp, &frame(&other)), TC_ACT_SHOT, "{client}: TCP from a port no rule opens");
        let mut reply = packet(server, client, icmp, 7, 0);
        reply.icmp_type = echo_reply;
        assert_eq!(run(dp, &frame(&reply)), TC_ACT_OK, "{client}: echo reply of an allowed request");
        let mut unasked = packet(server, outsider, icmp, 8, 0);
        unasked.icmp_type = echo_reply;
        assert_eq!(run(dp, &frame(&unasked)), TC_ACT_SHOT, "{client}: echo reply of a request no rule allows");
        // The forward direction still counts on its rule.
        let mut request = packet(client, server, icmp, 7, 0);
        request.icmp_type = echo_request;
        assert_eq!(run(dp, &frame(&request)), TC_ACT_OK);
        assert_eq!(delta(&before, dp, AclVerdict::AcceptEstablished), 4, "{client}");
        assert_eq!(delta(&before, dp, AclVerdict::AcceptRule), 1, "{client}");
        assert_eq!(delta(&before, dp, AclVerdict::DropNoFlow), 2, "{client}: the stray ACK and echo reply");
        assert_eq!(delta(&before, dp, AclVerdict::DropNoRule), 2, "{client}: the UDP and the SYN-ACK");
    }
}

/// Issue 13: the later fragments of a datagram whose first fragment passed
/// pass; others are dropped.
fn later_fragments_follow_their_first(dp: &mut Dataplane) {
    dp.install_policy(&client_policy(21)).unwrap();
    for (client, server, _, _) in PAIRS {
        let before = verdicts(dp);
        let first = Packet { fragment: Fragment::First { id: 0x1234 }, ..packet(client, server, 17, 40000, 53) };
        let later = Packet { fragment: Fragment::Later { id: 0x1234 }, ..first };
        assert_eq!(run(dp, &frame(&later)), TC_ACT_SHOT, "{client}: a later fragment before its first");
        assert_eq!(run(dp, &frame(&first)), TC_ACT_OK, "{client}: an allowed first fragment");
        assert_eq!(run(dp, &frame(&later)), TC_ACT_OK, "{client}: its later fragments");
        assert_eq!(run(dp, &frame(&later)), TC_ACT_OK, "{client}: its later fragments");
        let stranger = Packet { fragment: Fragment::Later { id: 0x1235 }, ..first };
        assert_eq!(run(dp, &frame(&stranger)), TC_ACT_SHOT, "{client}: another datagram's");
        let denied = Packet { dport: 54, fragment: Fragment::First { id: 0x2000 }, ..first };
        assert_eq!(run(dp, &frame(&denied)), TC_ACT_SHOT, "{client}: a denied first fragment");
        let denied_later = Packet { fragment: Fragment::Later { id: 0x2000 }, ..denied };
        assert_eq!(run(dp, &frame(&denied_later)), TC_ACT_SHOT, "{client}: ...and its later ones");
        // A reply's fragments: the first passes as a reply, so its tail does.
        let answer = Packet { fragment: Fragment::First { id: 0x3000 }, ..packet(server, client, 17, 53, 40000) };
        assert_eq!(run(dp, &frame(&answer)), TC_ACT_OK, "{client}: a reply's first fragment");
        let answer_later = Packet { fragment: Fragment::Later { id: 0x3000 }, ..answer };
        assert_eq!(run(dp, &frame(&answer_later)), TC_ACT_OK, "{client}: ...and its later one");
        assert_eq!(delta(&before, dp, AclVerdict::DropFragment), 3, "{client}");
        assert_eq!(delta(&before, dp, AclVerdict::AcceptEstablished), 4, "{client}");
    }
}

/// Issue 13: ICMP errors (fragmentation needed / packet too big, time
/// exceeded) about a packet of an accepted flow pass as related; others
/// follow the policy, which here allows no ICMP towards the clients.
fn icmp_errors_about_accepted_flows_pass(dp: &mut Dataplane) {
    dp.install_policy(&client_policy(22)).unwrap();
    for (client, server, router, outsider) in PAIRS {
        let (too_big, exceeded, unreachable) = if client.contains(':') { (2, 3, 1) } else { (3, 11, 3) };
        let before = verdicts(dp);
        let query = packet(client, server, 17, 40000, 53);
        assert_eq!(run(dp, &frame(&icmp_error(router, too_big, &query))), TC_ACT_SHOT, "{client}: before the flow");
        assert_eq!(run(dp, &frame(&query)), TC_ACT_OK);
        assert_eq!(run(dp, &frame(&icmp_error(router, too_big, &query))), TC_ACT_OK, "{client}: PMTU error");
        assert_eq!(run(dp, &frame(&icmp_error(router, exceeded, &query))), TC_ACT_OK, "{client}: time exceeded");
        assert_eq!(run(dp, &frame(&icmp_error(server, unreachable, &query))), TC_ACT_OK, "{client}: unreachable");
        let other = Packet { dport: 54, ..query };
        assert_eq!(run(dp, &frame(&icmp_error(router, too_big, &other))), TC_ACT_SHOT, "{client}: no such flow");
        let mut forged = icmp_error(router, too_big, &query);
        forged.dst = outsider.parse().unwrap();
        assert_eq!(run(dp, &frame(&forged)), TC_ACT_SHOT, "{client}: not addressed to the quoted sender");
        // About the reply direction: the server hears of its answer.
        let answer = packet(server, client, 17, 53, 40000);
        assert_eq!(run(dp, &frame(&icmp_error(client, too_big, &answer))), TC_ACT_OK, "{client}: about a reply");
        // A quoted first fragment of the flow (the quote then carries the
        // fragment header on IPv6, flags on IPv4).
        let first = Packet { fragment: Fragment::First { id: 77 }, ..query };
        assert_eq!(
            run(dp, &frame(&icmp_error(router, too_big, &first))),
            TC_ACT_OK,
            "{client}: about a first fragment"
        );
        assert_eq!(delta(&before, dp, AclVerdict::AcceptEstablished), 5, "{client}");
        assert_eq!(delta(&before, dp, AclVerdict::DropNoRule), 3, "{client}");
        // A new policy that revokes the flow: its errors follow the policy.
        dp.install_policy(&CompiledPolicy { generation: 23, rules: vec![] }).unwrap();
        assert_eq!(run(dp, &frame(&icmp_error(router, too_big, &query))), TC_ACT_SHOT, "{client}: revoked flow");
        dp.install_policy(&client_policy(22)).unwrap();
    }
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
    // From a port no rule opens in the other direction.
    let mut stray = synack;
    stray.sport = 5433;
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
