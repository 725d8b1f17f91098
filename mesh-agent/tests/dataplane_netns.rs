//! The ACL on real traffic: host `a` (an overlay node, 100.64.0.0/24) and
//! host `b` (a site host, 198.18.20.0/24) talk through a gateway namespace
//! whose interface towards `b` carries the ACL. Root only.

use std::time::Duration;

use mesh_agent::dataplane::{AclVerdict, Dataplane};
use mesh_lab::{Host, Lab};
use mesh_policy::{CompiledPolicy, PortRange, Proto, Rule};

const A: &str = "100.64.0.1";
const B: &str = "198.18.20.10";

struct Net {
    _lab: Lab,
    a: Host,
    b: Host,
    gw: Host,
}

fn net() -> Net {
    let lab = Lab::new().unwrap();
    let a = lab.host("a").unwrap();
    let gw = lab.host("gw").unwrap();
    let b = lab.host("b").unwrap();
    lab.link(&a, "eth0", &gw, "eth0").unwrap();
    lab.link(&gw, "eth1", &b, "eth0").unwrap();
    a.addr("eth0", "100.64.0.1/24").unwrap();
    gw.addr("eth0", "100.64.0.254/24").unwrap();
    gw.addr("eth1", "198.18.20.1/24").unwrap();
    b.addr("eth0", "198.18.20.10/24").unwrap();
    a.route_via("198.18.20.0/24", "100.64.0.254").unwrap();
    b.route_via("100.64.0.0/24", "198.18.20.1").unwrap();
    gw.forwarding().unwrap();
    Net { _lab: lab, a, b, gw }
}

fn policy(generation: u64, tcp_port: u16) -> CompiledPolicy {
    let rule = |id, proto, ports| Rule {
        id,
        src: vec!["100.64.0.0/24".parse().unwrap()],
        dst: vec!["198.18.20.0/24".parse().unwrap()],
        proto,
        ports,
    };
    CompiledPolicy {
        generation,
        rules: vec![rule(1, Proto::Tcp, PortRange::single(tcp_port)), rule(2, Proto::Icmp, PortRange::ANY)],
    }
}

fn pings(from: &Host, to: &str, count: u32) -> bool {
    from.exec_unchecked("ping", ["-c", &count.to_string(), "-i", "0.05", "-W", "1", to]).unwrap().status.success()
}

/// Whether a TCP connection from `from` to `to:port` gets through (iperf3
/// server on `server`, one short client run).
fn tcp_ok(server: &Host, from: &Host, to: &str, port: u16) -> bool {
    let port_n = port;
    let port = port.to_string();
    let _srv = server.spawn("iperf3", ["-s", "-1", "-p", &port]).unwrap();
    mesh_lab::wait_for("the iperf3 server", Duration::from_secs(10), || server.tcp_listening(port_n)).unwrap();
    let out = from.exec_unchecked("iperf3", ["-c", to, "-p", &port, "-n", "64K", "--connect-timeout", "1000"]).unwrap();
    if !out.status.success() {
        eprintln!("iperf3 to {to}:{port}: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    out.status.success()
}

#[test]
fn allowed_flows_pass_with_replies_others_drop_counters_match_and_swaps_apply() {
    mesh_lab::require_root!();
    let n = net();
    assert!(pings(&n.a, B, 1), "the lab forwards before any filter");
    let mut dp =
        n.gw.run(|| {
            let mut dp = Dataplane::load_unpinned().unwrap();
            dp.attach_overlay("eth1").unwrap();
            dp
        })
        .unwrap();
    // Attached, no policy: fail closed.
    assert!(!pings(&n.a, B, 1), "no policy: nothing passes");

    dp.install_policy(&policy(1, 5432)).unwrap();
    assert!(pings(&n.a, B, 3), "ICMP allowed, echo replies pass as replies");
    assert!(!pings(&n.b, A, 1), "b may not start anything towards a");
    assert!(tcp_ok(&n.b, &n.a, B, 5432), "TCP 5432 allowed, replies included");
    assert!(!tcp_ok(&n.b, &n.a, B, 5433), "TCP 5433 not allowed");

    let c = dp.counters().unwrap();
    assert_eq!(c.generation, Some(1));
    assert_eq!(c.rule(2).unwrap().packets, 3, "three echo requests by the ICMP rule");
    assert!(c.rule(1).unwrap().packets > 0, "the TCP flow counted on its rule");
    assert!(c.verdict(AclVerdict::AcceptEstablished).packets >= 3, "echo replies and TCP replies");
    assert!(c.verdict(AclVerdict::DropNoRule).packets >= 2, "b's ping and the 5433 SYN");
    eprintln!("counters after generation 1: {c:?}");

    // The swapped policy allows 5433 instead: it applies to new flows.
    dp.install_policy(&policy(2, 5433)).unwrap();
    assert!(tcp_ok(&n.b, &n.a, B, 5433), "5433 allowed by the new policy");
    assert!(!tcp_ok(&n.b, &n.a, B, 5432), "5432 no longer allowed");
    let c = dp.counters().unwrap();
    assert_eq!(c.generation, Some(2));
    assert_eq!(c.rule(2).unwrap().packets, 0, "per-rule counters restart with the generation");
    assert!(c.rule(1).unwrap().packets > 0);
}

#[test]
fn pinned_enforcement_survives_the_agent_and_is_adopted() {
    mesh_lab::require_root!();
    let n = net();
    let pin_dir = std::path::PathBuf::from(format!("/sys/fs/bpf/mesh-test-{}-{}", std::process::id(), n.gw.netns()));
    let dir = pin_dir.clone();
    let dp =
        n.gw.run(move || {
            let mut dp = Dataplane::open(&dir).unwrap();
            dp.attach_overlay("eth1").unwrap();
            dp.install_policy(&policy(7, 5432)).unwrap();
            dp
        })
        .unwrap();
    assert!(pings(&n.a, B, 1));
    drop(dp); // The agent exits (or crashes).
    assert!(pings(&n.a, B, 1), "the policy is still enforced: allowed traffic passes");
    assert!(!pings(&n.b, A, 1), "...and denied traffic is still denied (no fail-open)");

    // A restarted agent adopts the maps and the attachment.
    let dir = pin_dir.clone();
    let mut dp =
        n.gw.run(move || {
            let mut dp = Dataplane::open(&dir).unwrap();
            dp.attach_overlay("eth1").unwrap();
            dp
        })
        .unwrap();
    assert_eq!(dp.active_generation().unwrap(), Some(7), "adopted the installed policy");
    assert!(dp.counters().unwrap().rule(2).unwrap().packets >= 2, "adopted the counters");
    let mut no_icmp = policy(8, 5432);
    no_icmp.rules.truncate(1);
    dp.install_policy(&no_icmp).unwrap();
    assert!(!pings(&n.a, B, 1), "the adopted attachment runs the new policy");

    // Uninstall: unpin everything, traffic is unfiltered again.
    n.gw.run(move || {
        dp.detach_overlay("eth1").unwrap();
        drop(dp);
    })
    .unwrap();
    Dataplane::remove_pins(&pin_dir).unwrap();
    assert!(pings(&n.a, B, 1), "detached");
}

/// The interface is deleted and recreated under a pinned attachment (the
/// node rebooted, or the agent removed its interface on exit): the pin names
/// a link of a dead interface, which cannot be updated. A new attach puts a
/// fresh link in place and only then replaces the pin (before, it failed and
/// the enforcer removed the pin first, then attached: a window with no
/// filter, left open if that attach failed too).
#[test]
fn a_stale_pin_is_replaced_by_a_new_link_in_place() {
    mesh_lab::require_root!();
    let n = net();
    let pin_dir =
        std::path::PathBuf::from(format!("/sys/fs/bpf/mesh-test-stale-{}-{}", std::process::id(), n.gw.netns()));
    let dir = pin_dir.clone();
    let dp =
        n.gw.run(move || {
            let mut dp = Dataplane::open(&dir).unwrap();
            dp.attach_overlay("eth1").unwrap();
            dp.install_policy(&policy(3, 5432)).unwrap();
            dp
        })
        .unwrap();
    drop(dp);
    // Recreate the gateway's interface towards b.
    n.gw.ip(&["link", "del", "eth1"]).unwrap();
    n.gw.lab().link(&n.gw, "eth1", &n.b, "eth0").unwrap();
    n.gw.addr("eth1", "198.18.20.1/24").unwrap();
    n.b.addr("eth0", "198.18.20.10/24").unwrap();
    n.b.route_via("100.64.0.0/24", "198.18.20.1").unwrap();
    assert!(pings(&n.b, A, 1), "the recreated interface is unfiltered until attached");

    let dir = pin_dir.clone();
    let dp =
        n.gw.run(move || {
            let mut dp = Dataplane::open(&dir).unwrap();
            dp.attach_overlay("eth1").expect("a stale pin is replaced, not an error");
            dp
        })
        .unwrap();
    assert!(pings(&n.a, B, 1), "the pinned policy runs on the new interface");
    assert!(!pings(&n.b, A, 1), "and denies what it denies");
    drop(dp);
    assert!(!pings(&n.b, A, 1), "the new link is the pinned one: it outlives the Dataplane");
    Dataplane::remove_pins(&pin_dir).unwrap();
}
