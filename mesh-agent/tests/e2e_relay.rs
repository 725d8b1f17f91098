//! Gateways behind NAT and UDP-blocking providers (#19): a relay
//! (mesh-relay, TLS on TCP 443, reflector on UDP 3478), control listing it,
//! and four gateways.
//!
//! ```text
//!   ctl 192.0.2.100   relay 192.0.2.50
//!             |  wan 192.0.2.0/24  |
//!   nyc 192.0.2.1 (app 198.18.10.10)      fsn 192.0.2.2 (db 198.18.20.20:5432)
//!   nat-ams 192.0.2.3 -- ams 10.3.0.2     nat-sym 192.0.2.4 -- sym 10.4.0.2
//!   (masquerade, endpoint-independent)    (masquerade fully-random: symmetric)
//! ```
//!
//! 1. fsn's underlay drops all UDP (nftables): it joins through the relay,
//!    and app reaches db on TCP 5432 with the policy enforced (5433 is not
//!    allowed and stays closed).
//! 2. ams, behind the endpoint-independent NAT, learns its mapping from the
//!    reflector and talks to nyc directly: control's status says `direct`.
//! 3. sym, behind the symmetric NAT, cannot reach ams directly (both are
//!    behind NAT): that pair stays relayed, and pings pass.
//! 4. old (192.0.2.5) runs with `relays = false`, as an agent from before
//!    relays would: it answers no disco pings and attaches to no relay, so
//!    nyc keeps it direct (relaying it would cut it off) and they ping.
//! 5. With a two-way TCP conversation app <-> db running, fsn's UDP is
//!    unblocked (the path goes direct), blocked (relay, cut under 2 s), and
//!    unblocked again (direct); the same connection throughout.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use mesh_lab::{Host, Lab, twoway::Conversation};
use mesh_proto::v1 as pb;

mod e2e_support;

use e2e_support::{BpfFs, Gateway, Tuning, admin, gateway_key, rt, wait_for};

const POLICY: &str = r#"{
  "tagOwners": {"tag:gw": []},
  "hosts": {"app-nyc": "198.18.10.10/32", "db-fsn": "198.18.20.20/32"},
  "autoApprovers": {"routes": {"198.18.10.0/24": ["tag:gw"], "198.18.20.0/24": ["tag:gw"]}},
  "acls": [
    {"action": "accept", "src": ["tag:gw", "198.18.10.0/24", "198.18.20.0/24"],
     "dst": ["tag:gw:*", "198.18.10.0/24:*", "198.18.20.0/24:*"], "proto": "icmp"},
    {"action": "accept", "src": ["app-nyc"], "dst": ["db-fsn:5432", "db-fsn:9000-9001"], "proto": "tcp"},
  ],
}"#;

const TUNING: Tuning = Tuning { metrics_listen: Some("127.0.0.1:9300"), health_interval_secs: 0.5, extra: "" };
/// An agent that takes no part in relays.
const RELAYS_OFF: Tuning = Tuning { extra: "relays = false\n", ..TUNING };
/// The bound of a move between direct and relay under two-way traffic.
const SWITCH_BOUND: Duration = Duration::from_secs(2);

fn relay_config(dir: &Path, keys: Vec<[u8; 32]>) -> mesh_relay::server::RelayConfig {
    mesh_relay::server::RelayConfig {
        listen: "192.0.2.50:443".parse().unwrap(),
        reflector: Some("192.0.2.50:3478".parse().unwrap()),
        metrics: None,
        cert_path: dir.join("relay.pem"),
        key_path: dir.join("relay.key"),
        names: vec!["relay.lab".into()],
        trusted_keys: keys,
        region: "lab".into(),
        max_connections: 100,
    }
}

/// A router namespace masquerading `inside` (a /24 on its `in0`) behind
/// its WAN address; `symmetric` picks a random port per flow.
fn nat_router(lab: &Lab, wan: &mesh_lab::Switch, name: &str, wan_addr: &str, inside: u8, symmetric: bool) -> Host {
    let r = lab.host(&format!("nat{name}")).unwrap();
    wan.plug(&r, "eth0").unwrap();
    r.addr("eth0", &format!("{wan_addr}/24")).unwrap();
    let gw = lab.host(name).unwrap();
    lab.link(&r, "in0", &gw, "eth0").unwrap();
    r.addr("in0", &format!("10.{inside}.0.1/24")).unwrap();
    gw.addr("eth0", &format!("10.{inside}.0.2/24")).unwrap();
    gw.ip(&["route", "add", "default", "via", &format!("10.{inside}.0.1")]).unwrap();
    r.forwarding().unwrap();
    let how = if symmetric { " fully-random" } else { "" };
    let rules = format!(
        "table ip nat {{\n chain post {{ type nat hook postrouting priority 100; oifname \"eth0\" masquerade{how}; }}\n}}\n"
    );
    let f = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(f.path(), rules).unwrap();
    r.exec("nft", ["-f", f.path().to_str().unwrap()]).unwrap();
    gw
}

/// The path `from` reports to `to` at control ("" before any report).
fn path(rt: &tokio::runtime::Runtime, dir: &Path, from: &str, to: &str) -> String {
    rt.block_on(async {
        let s = admin(dir).await.get_status(pb::GetStatusRequest {}).await.unwrap().into_inner();
        s.peers
            .iter()
            .find(|l| l.from_name == from && l.to_name == to)
            .and_then(|l| l.health.as_ref())
            .map(|h| h.path.clone())
            .unwrap_or_default()
    })
}

fn ping(from: &Host, to: &str) -> bool {
    from.exec_unchecked("ping", ["-c", "1", "-W", "1", to]).unwrap().status.success()
}

#[test]
#[expect(clippy::too_many_lines, reason = "one scenario, told in order")]
fn gateways_behind_nat_and_udp_blocks_join_through_the_relay() {
    if !mesh_lab::root_or_skip("gateways_behind_nat_and_udp_blocks_join_through_the_relay") {
        return;
    }
    let lab = Lab::new().unwrap();
    let wan = lab.switch("wan").unwrap();
    let plug = |name: &str, addr: &str| {
        let h = lab.host(name).unwrap();
        wan.plug(&h, "eth0").unwrap();
        h.addr("eth0", &format!("{addr}/24")).unwrap();
        h
    };
    let ctl = plug("ctl", "192.0.2.100");
    let relay_host = plug("relay", "192.0.2.50");
    let relay_dir = tempfile::tempdir().unwrap();
    // The relay's certificate first: control pins it.
    let pin = mesh_relay::server::certificate_pin(&relay_config(relay_dir.path(), vec![[0; 32]])).unwrap();
    let ctl_dir = tempfile::tempdir().unwrap();
    let config = mesh_control::config::Config {
        relays: vec![mesh_control::relay::RelayEntry {
            region: "lab".into(),
            address: "192.0.2.50:443".into(),
            server_name: Some("relay.lab".into()),
            cert_sha256: hex::encode(pin),
            reflector: Some("192.0.2.50:3478".into()),
        }],
        ..mesh_lab::control::lab_config(ctl_dir.path())
    };
    let _control = mesh_lab::control::ControlInNs::start(&ctl, config).expect("control starts");
    let rt = rt();
    let (key, ticket_key) = rt.block_on(async {
        let mut a = admin(ctl_dir.path()).await;
        a.set_policy(pb::PolicyDocument { text: POLICY.into(), generation: 0 }).await.unwrap();
        let status = a.get_status(pb::GetStatusRequest {}).await.unwrap().into_inner();
        (gateway_key(&mut a, true).await, status.relay_ticket_key)
    });
    let _relay = mesh_lab::relay::RelayInNs::start(
        &relay_host,
        relay_config(relay_dir.path(), vec![mesh_relay::ticket::key_from_b64(&ticket_key).unwrap()]),
    )
    .unwrap();
    let bpf = BpfFs::mount();

    // nyc and fsn: public gateways with a site LAN each.
    let mut gws: Vec<Gateway> = Vec::new();
    let mut hosts = Vec::new();
    for (name, n, role) in [("nyc", 1u8, "app"), ("fsn", 2, "db")] {
        let h = plug(name, &format!("192.0.2.{n}"));
        let lan = lab.switch(&format!("l{name}")).unwrap();
        lan.plug(&h, "lan0").unwrap();
        h.addr("lan0", &format!("198.18.{n}0.1/24")).unwrap();
        let site = lab.host(role).unwrap();
        lan.plug(&site, "eth0").unwrap();
        let last = if role == "app" { 10 } else { 20 };
        site.addr("eth0", &format!("198.18.{n}0.{last}/24")).unwrap();
        site.route_via("198.18.0.0/16", &format!("198.18.{n}0.1")).unwrap();
        hosts.push(site);
        let prefix = format!("198.18.{n}0.0/24");
        let gw =
            Gateway::new(h, &lab.unique_ifname("wg"), bpf.0.path(), &key, &format!("192.0.2.{n}"), &[&prefix], &TUNING);
        gw.guard_underlay("eth0");
        gws.push(gw);
    }
    let (app, db) = (&hosts[0], &hosts[1]);
    // ams and sym: behind NAT, their configured endpoint is private.
    for (name, wan_addr, inside, symmetric) in [("ams", "192.0.2.3", 3u8, false), ("sym", "192.0.2.4", 4, true)] {
        let h = nat_router(&lab, &wan, name, wan_addr, inside, symmetric);
        let gw =
            Gateway::new(h, &lab.unique_ifname("wg"), bpf.0.path(), &key, &format!("10.{inside}.0.2"), &[], &TUNING);
        gws.push(gw);
    }
    // old: public, relays off.
    let h = plug("old", "192.0.2.5");
    gws.push(Gateway::new(h, &lab.unique_ifname("wg"), bpf.0.path(), &key, "192.0.2.5", &[], &RELAYS_OFF));
    // fsn's provider drops UDP from the start.
    gws[1].host.block_udp("eth0", true).unwrap();
    for g in &mut gws {
        g.start();
    }
    let paths: Vec<PathBuf> = gws.iter().map(|g| g.dir.path().join("agent.log")).collect();
    let logs = || {
        paths
            .iter()
            .map(|p| format!("--- {}:\n{}\n", p.display(), std::fs::read_to_string(p).unwrap_or_default()))
            .collect::<String>()
    };
    let wait = |what: &str, f: &mut dyn FnMut() -> bool| wait_for(what, &logs, f);
    let dir = ctl_dir.path();

    // 1. UDP blocked: through the relay, policy enforced.
    mesh_lab::traffic::echo_servers(db, &["198.18.20.20:5432".parse().unwrap(), "198.18.20.20:5433".parse().unwrap()])
        .unwrap();
    wait("db:5432 from app through the relay", &mut || {
        mesh_lab::traffic::tcp_echo(app, "198.18.20.20:5432".parse().unwrap())
    });
    wait("nyc and fsn report their path as relay", &mut || {
        path(&rt, dir, "nyc", "fsn") == "relay" && path(&rt, dir, "fsn", "nyc") == "relay"
    });
    assert!(!mesh_lab::traffic::tcp_echo(app, "198.18.20.20:5433".parse().unwrap()), "5433 is not in the policy");

    // 2. Endpoint-independent NAT: direct after discovery.
    wait("ams and nyc direct", &mut || {
        path(&rt, dir, "ams", "nyc") == "direct" && path(&rt, dir, "nyc", "ams") == "direct"
    });
    let nodes =
        rt.block_on(async { admin(dir).await.list_nodes(pb::ListNodesRequest {}).await.unwrap().into_inner().nodes });
    let overlay = |name: &str| nodes.iter().find(|n| n.name == name).map(|n| n.ipv4.clone()).unwrap();
    let ams = nodes.iter().find(|n| n.name == "ams").unwrap();
    assert!(ams.endpoints.iter().any(|e| e == "192.0.2.3:51820"), "ams's reflected mapping: {:?}", ams.endpoints);
    assert!(ping(&gws[0].host, &overlay("ams")));

    // 3. Symmetric NAT behind NAT: relayed, working.
    wait("sym and ams relayed", &mut || {
        path(&rt, dir, "sym", "ams") == "relay" && path(&rt, dir, "ams", "sym") == "relay"
    });
    wait("sym pings ams", &mut || ping(&gws[3].host, &overlay("ams")));
    assert!(ping(&gws[3].host, &overlay("nyc")), "sym reaches the public nyc");

    // 4. A peer that attaches to no relay stays direct, and works, long
    //    after its unanswered disco pings would have called it dead.
    let nodes =
        rt.block_on(async { admin(dir).await.list_nodes(pb::ListNodesRequest {}).await.unwrap().into_inner().nodes });
    let old = nodes.iter().find(|n| n.name == "old").map(|n| n.ipv4.clone()).expect("old enrolled");
    wait("nyc pings old", &mut || ping(&gws[0].host, &old));
    std::thread::sleep(Duration::from_secs(1));
    wait("nyc reports its path to old", &mut || !path(&rt, dir, "nyc", "old").is_empty());
    assert_eq!(path(&rt, dir, "nyc", "old"), "direct", "nyc relayed a peer that is on no relay\n{}", logs());
    assert!(ping(&gws[0].host, &old), "nyc pings old");
    assert!(ping(&gws[4].host, &overlay("nyc")), "old pings nyc");

    // 5. Path switches under a two-way conversation.
    let conv =
        Conversation::start(app, db, &["198.18.20.20:9000".parse::<SocketAddr>().unwrap()], Duration::from_millis(20));
    let conv = conv.unwrap_or_else(|e| panic!("conversation: {e}\n{}", logs()));
    let check = |what: &str, unblock: bool, want: &str| {
        std::thread::sleep(Duration::from_secs(1));
        let t = Instant::now();
        gws[1].host.block_udp("eth0", !unblock).unwrap();
        wait(&format!("{what}: nyc->fsn {want}"), &mut || {
            path(&rt, dir, "nyc", "fsn") == want && path(&rt, dir, "fsn", "nyc") == want
        });
        wait(&format!("{what}: flowing"), &mut || conv.flowing_since(Instant::now() - Duration::from_millis(100)));
        std::thread::sleep(Duration::from_secs(1));
        let cuts = conv.cuts(t);
        eprintln!("{what}: {cuts}");
        assert!(conv.error().is_none(), "{what}: {:?}", conv.error());
        assert!(cuts.worst() < SWITCH_BOUND, "{what}: cuts {cuts}\n{}", logs());
    };
    check("UDP unblocked", true, "direct");
    check("UDP blocked", false, "relay");
    check("UDP unblocked again", true, "direct");
    let outcome = conv.finish().unwrap_or_else(|e| panic!("{e}\n{}", logs()));
    eprintln!("{outcome:?}");
    let switches = gws[0].metric("127.0.0.1:9300", "mesh_agent_peer_path_switches_total{peer=\"fsn\"}");
    assert!(switches.is_some_and(|s| s >= 3.0), "switches {switches:?}");
    for g in &mut gws {
        g.stop();
    }
}
