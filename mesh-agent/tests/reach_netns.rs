//! Reachability checks of an advertised route against real hosts: a
//! gateway namespace and a site host on a LAN switch. The route is healthy
//! while a target answers (TCP accepted or refused, ICMP echo), unhealthy
//! with a detail naming the targets once the LAN port is cut, and the
//! default check (no targets) follows the LAN interface.

use std::{collections::BTreeMap, time::Duration};

use ipnet::IpNet;
use mesh_agent::reach::{Target, check_all};
use mesh_lab::Lab;

#[test]
fn route_health_follows_the_site_lan() {
    mesh_lab::require_root!();
    let lab = Lab::new().unwrap();
    let gw = lab.host("gw").unwrap();
    let db = lab.host("db").unwrap();
    let lan = lab.switch("lan").unwrap();
    lan.plug(&gw, "lan0").unwrap();
    let db_port = lan.plug(&db, "eth0").unwrap();
    gw.addr("lan0", "198.18.20.1/24").unwrap();
    db.addr("eth0", "198.18.20.20/24").unwrap();
    let listener = db.run(|| std::net::TcpListener::bind("198.18.20.20:5432").unwrap()).unwrap();

    let prefix: IpNet = "198.18.20.0/24".parse().unwrap();
    let timeout = Duration::from_millis(500);
    let host = gw.clone();
    let check = move |targets: &[&str]| {
        let targets: Vec<Target> = targets.iter().map(|t| t.parse().unwrap()).collect();
        let map: BTreeMap<IpNet, Vec<Target>> =
            if targets.is_empty() { BTreeMap::new() } else { BTreeMap::from([(prefix, targets)]) };
        host.run(move || check_all(&[prefix], &map, timeout)).unwrap().remove(0)
    };

    for targets in [&["tcp:198.18.20.20:5432"][..], &["tcp:198.18.20.20:22"], &["icmp:198.18.20.20"], &[]] {
        let h = check(targets);
        assert!(h.healthy, "{targets:?}: {h:?}");
    }
    // One dead target among live ones is enough to stay healthy.
    let h = check(&["tcp:198.18.20.99:5432", "icmp:198.18.20.20"]);
    assert!(h.healthy, "{h:?}");
    assert_eq!(h.detail, "icmp:198.18.20.20 answers");

    // The site host is cut off: every target fails, and says so.
    lan.set_port(&db_port, false).unwrap();
    let h = check(&["tcp:198.18.20.20:5432", "icmp:198.18.20.20"]);
    assert!(!h.healthy, "{h:?}");
    assert!(h.detail.contains("tcp:198.18.20.20:5432") && h.detail.contains("icmp:198.18.20.20"), "{h:?}");
    // The gateway's own LAN link is still up: the default check cannot see
    // the cut, which is why targets exist.
    assert!(check(&[]).healthy);
    gw.down("lan0").unwrap();
    let h = check(&[]);
    assert!(!h.healthy, "{h:?}");
    drop(listener);
}
