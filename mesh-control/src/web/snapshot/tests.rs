use super::*;

const NOW: i64 = 1_800_000_000;

fn node(id: u64, name: &str, online: bool) -> pb::Node {
    pb::Node {
        id,
        name: name.into(),
        online,
        backend: "userspace".into(),
        key_expiry_unix: NOW + 90 * 86_400,
        ..Default::default()
    }
}

fn route(id: u64, name: &str, prefix: &str, primary: bool) -> pb::Route {
    pb::Route {
        prefix: prefix.into(),
        node_id: id,
        node_name: name.into(),
        approved: true,
        healthy: true,
        primary,
        owner: primary,
        rank: i32::from(!primary),
        ..Default::default()
    }
}

fn peer(from: &str, to: &str, up: bool, p50: f64) -> pb::PeerLink {
    pb::PeerLink {
        from_name: from.into(),
        to_name: to.into(),
        health: Some(pb::PeerHealth {
            probe_up: up,
            probe_rtt_p50_ms: p50,
            probe_rtt_p95_ms: p50 * 2.0,
            handshake_age_ms: 3000,
            endpoint: "192.0.2.1:51820".into(),
            path: "relay".into(),
            relay_region: "fsn".into(),
            path_switches: 2,
            rx_bytes: 2048,
            tx_bytes: 1024,
            ..Default::default()
        }),
        report_age_secs: 1,
        ..Default::default()
    }
}

/// Two sites of two gateways each, everyone probing everyone.
fn lab() -> Inputs {
    let names = [(1, "nyc_gw1"), (2, "nyc_gw2"), (3, "fsn-gw1"), (4, "fsn-gw2")];
    let mut peers = Vec::new();
    for (_, a) in names {
        for (_, b) in names {
            if a != b {
                peers.push(peer(a, b, true, 1.0));
            }
        }
    }
    Inputs {
        now: NOW,
        nodes: names.iter().map(|(id, n)| node(*id, n, true)).collect(),
        routes: vec![
            route(1, "nyc_gw1", "198.18.10.0/24", true),
            route(1, "nyc_gw1", "2001:db8:10::/64", true),
            route(2, "nyc_gw2", "198.18.10.0/24", false),
            route(2, "nyc_gw2", "2001:db8:10::/64", false),
            route(3, "fsn-gw1", "198.18.20.0/24", true),
            route(4, "fsn-gw2", "198.18.20.0/24", false),
        ],
        peers,
        audit: (1..=30)
            .map(|id| pb::AuditEntry {
                id,
                at_unix: NOW - 100 + i64::try_from(id).unwrap(),
                action: "route.failover".into(),
                subject: if id == 25 { "route/2/198.18.10.0/24".into() } else { "x".into() },
                ..Default::default()
            })
            .collect(),
    }
}

fn gw<'a>(s: &'a Snapshot, name: &str) -> &'a Gateway {
    s.gateways.iter().find(|g| g.name == name).unwrap()
}

#[test]
fn sites_are_gateways_serving_the_same_prefixes() {
    let s = build(&lab());
    let sites: Vec<(&str, &[String])> = s.sites.iter().map(|s| (s.name.as_str(), s.gateways.as_slice())).collect();
    assert_eq!(sites.len(), 2);
    assert_eq!(sites[0], ("fsn", &["fsn-gw1".to_owned(), "fsn-gw2".to_owned()][..]));
    assert_eq!(sites[1], ("nyc", &["nyc_gw1".to_owned(), "nyc_gw2".to_owned()][..]));
    assert_eq!(s.sites[1].prefixes, ["198.18.10.0/24", "2001:db8:10::/64"]);
    assert_eq!(gw(&s, "nyc_gw1").role, "primary");
    assert!(gw(&s, "nyc_gw1").owner);
    assert_eq!(gw(&s, "nyc_gw2").role, "backup");
    assert!(s.gateways.iter().all(|g| g.state == "up"));
}

#[test]
fn names_without_routes_fall_back_to_the_name_or_a_bucket() {
    assert_eq!(site_of_name("nyc_gw1"), Some("nyc"));
    assert_eq!(site_of_name("eu-west-gw2"), Some("eu-west"));
    assert_eq!(site_of_name("laptop"), None);
    let mut i = lab();
    i.nodes.push(node(9, "laptop", true));
    let s = build(&i);
    assert!(s.sites.iter().any(|s| s.name == "no routes" && s.gateways == ["laptop"]));
    assert_eq!(gw(&s, "laptop").role, "none");
}

#[test]
fn a_gateway_is_down_when_offline_or_when_every_online_peer_says_so() {
    let mut i = lab();
    // Still connected at control (its stream saw no FIN), but every peer's
    // probes lost it.
    for p in i.peers.iter_mut().filter(|p| p.to_name == "nyc_gw1") {
        p.health.as_mut().unwrap().probe_up = false;
    }
    let s = build(&i);
    assert_eq!(gw(&s, "nyc_gw1").state, "down");
    assert!(gw(&s, "nyc_gw1").down_reason.contains("all 3"));

    // One peer still sees it: up.
    i.peers.iter_mut().find(|p| p.to_name == "nyc_gw1").unwrap().health.as_mut().unwrap().probe_up = true;
    assert_eq!(gw(&build(&i), "nyc_gw1").state, "up");

    // ...unless that peer is offline itself, or its report is stale.
    let mut j = i.clone();
    let who = j
        .peers
        .iter()
        .find(|p| p.to_name == "nyc_gw1" && p.health.as_ref().unwrap().probe_up)
        .unwrap()
        .from_name
        .clone();
    j.nodes.iter_mut().find(|n| n.name == who).unwrap().online = false;
    assert_eq!(gw(&build(&j), "nyc_gw1").state, "down");
    i.peers
        .iter_mut()
        .find(|p| p.to_name == "nyc_gw1" && p.health.as_ref().unwrap().probe_up)
        .unwrap()
        .report_age_secs = STALE_REPORT_SECS + 1;
    assert_eq!(gw(&build(&i), "nyc_gw1").state, "down");

    // Offline at control: down whatever the reports say.
    let mut k = lab();
    k.nodes[2].online = false;
    let s = build(&k);
    assert_eq!(gw(&s, "fsn-gw1").state, "down");
    assert_eq!(gw(&s, "fsn-gw1").down_reason, "offline at control");
}

#[test]
fn site_pairs_measure_primary_to_primary_and_skip_missing_figures() {
    let mut i = lab();
    i.peers.iter_mut().find(|p| p.from_name == "nyc_gw1" && p.to_name == "fsn-gw1").unwrap().health =
        Some(pb::PeerHealth {
            probe_up: true,
            probe_rtt_p50_ms: 7.0,
            probe_rtt_p95_ms: -1.0,
            handshake_age_ms: -1,
            ..Default::default()
        });
    let s = build(&i);
    let pair = s.site_pairs.iter().find(|p| p.from == "nyc" && p.to == "fsn").unwrap();
    let l = pair.link.as_ref().unwrap();
    assert_eq!((l.from.as_str(), l.to.as_str()), ("nyc_gw1", "fsn-gw1"));
    assert_eq!(l.p50_ms, Some(7.0));
    assert_eq!(l.p95_ms, None, "a negative figure means none");
    assert_eq!(l.handshake_age_ms, None);
    assert_eq!(s.site_pairs.len(), 2);
    let json = serde_json::to_value(&s).unwrap();
    assert!(json["links"][0].get("p99_ms").is_none(), "agents report no p99: the field is omitted");
    assert_eq!(json["links"][0]["endpoint"], "192.0.2.1:51820", "the path facts reach the page");
    assert_eq!((&json["links"][0]["path"], &json["links"][0]["path_switches"]), (&"relay (fsn)".into(), &2.into()));
    assert_eq!(
        (json["links"][0]["rx_bytes"].as_u64(), json["links"][0]["tx_bytes"].as_u64()),
        (Some(2048), Some(1024))
    );
}

#[test]
fn audit_routes_and_expiring_keys() {
    let mut i = lab();
    i.nodes[3].key_expiry_unix = NOW + 3 * 86_400;
    i.nodes[2].key_expiry_unix = NOW - 1;
    let s = build(&i);
    assert_eq!(s.audit.len(), 20);
    assert_eq!(s.audit[0].id, 30, "newest first");
    let r = s.routes.iter().find(|r| r.prefix == "198.18.10.0/24" && r.gateway == "nyc_gw1").unwrap();
    assert_eq!(r.last_change, NOW - 75);
    let names: Vec<(&str, bool)> = s.expiring.iter().map(|e| (e.name.as_str(), e.expired)).collect();
    assert_eq!(names, [("fsn-gw1", true), ("fsn-gw2", false)]);
}
