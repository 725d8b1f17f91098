//! Two gateways with the userspace backend, each with a site LAN host behind
//! it, configured only through `mesh-agent apply`: the site hosts reach each
//! other through the encrypted tunnel (ping and a TCP exchange), `wg show`
//! lists the expected peer and allowed IPs, a route deleted by hand comes
//! back with the next reconcile, and a restarted agent comes back with the
//! same state. Mesh routes that equal or cover the gateway's underlay and
//! LAN networks leave them (and the tunnel) working and the main table
//! untouched, and are gone on withdrawal and shutdown.
//!
//! Lab:
//! ```text
//! h1 198.18.10.10 --lan1-- gw1 [192.0.2.1 eth0]====[192.0.2.2 eth0] gw2 --lan2-- h2 198.18.20.10
//!                          overlay 100.64.0.1 / fd7a:6d65:7368::1    100.64.0.2 / ...::2
//! ```

use std::{
    io::{Read as _, Write as _},
    net::{TcpListener, TcpStream},
    path::Path,
    time::Duration,
};

use mesh_lab::{Host, Lab};

mod standalone_support;

use standalone_support::{Gateway, two_sites, view, wait_for};

/// Reconcile often, log everything: the test reads the log.
const CONFIG: &str = "reconcile_interval_secs = 0.5\nretry_interval_secs = 0.5\nlog = \"debug\"\n";

fn status(gw: &Gateway) -> serde_json::Value {
    serde_json::from_str(&gw.cli(&["status", "--format", "json"])).unwrap()
}

fn wg_show(gw: &Gateway, what: &str) -> String {
    let out = gw.host.exec("wg", ["show", &gw.ifname, what]).unwrap();
    String::from_utf8(out.stdout).unwrap()
}

/// The agent's routes: in the mesh routing table (109 by default).
fn routes(gw: &Gateway) -> String {
    gw.host.ip(&["route", "show", "dev", &gw.ifname, "table", "109"]).unwrap()
}

fn ping(from: &Host, to: &str) -> bool {
    let v6 = if to.contains(':') { "-6" } else { "-4" };
    from.exec_unchecked("ping", [v6, "-c", "1", "-W", "1", to]).unwrap().status.success()
}

fn tcp_exchange(server: &Host, client: &Host, addr: &'static str) {
    let listener = server.run(move || TcpListener::bind(addr).unwrap()).unwrap();
    let echo = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let mut buf = [0u8; 64];
        let n = s.read(&mut buf).unwrap();
        s.write_all(&buf[..n].to_ascii_uppercase()).unwrap();
    });
    let reply = client
        .run(move || {
            let mut s = TcpStream::connect_timeout(&addr.parse().unwrap(), Duration::from_secs(5)).unwrap();
            s.write_all(b"hello through the mesh").unwrap();
            let mut out = String::new();
            s.read_to_string(&mut out).unwrap();
            out
        })
        .unwrap();
    echo.join().unwrap();
    assert_eq!(reply, "HELLO THROUGH THE MESH");
}

fn dump(gws: &[&Gateway]) -> String {
    gws.iter().map(|g| format!("--- {} log:\n{}", g.host.name(), g.log())).collect()
}

#[test]
fn two_sites_through_the_userspace_tunnel() {
    mesh_lab::require_root!();
    let lab = Lab::new().unwrap();
    let (gw1h, gw2h, h1, h2) = two_sites(&lab);

    let mut gw1 = Gateway::new(gw1h, &lab.unique_ifname("wg"), CONFIG);
    let mut gw2 = Gateway::new(gw2h, &lab.unique_ifname("wg"), CONFIG);
    let (k1, k2) = (gw1.pubkey(), gw2.pubkey());
    let o1 = ("100.64.0.1", "fd7a:6d65:7368::1");
    let o2 = ("100.64.0.2", "fd7a:6d65:7368::2");
    gw1.start();
    gw2.start();
    let r1 = gw1.apply(&view(o1, &k2, "192.0.2.2:51820", o2, "198.18.20.0/24"));
    gw2.apply(&view(o2, &k1, "192.0.2.1:51820", o1, "198.18.10.0/24"));
    let report: serde_json::Value = serde_json::from_str(&r1).unwrap();
    assert_eq!(report["backend"], "userspace");
    assert_eq!(report["changes"]["peers_added"], 1);

    // Site to site through the tunnel, IPv4; overlay to overlay, IPv4 and IPv6.
    wait_for("h1 -> h2 ping", || ping(&h1, "198.18.20.10"));
    assert!(ping(&h2, "198.18.10.10"), "{}", dump(&[&gw1, &gw2]));
    assert!(ping(&gw1.host, "100.64.0.2"));
    assert!(ping(&gw1.host, "fd7a:6d65:7368::2"));
    tcp_exchange(&h2, &h1, "198.18.20.10:7000");

    // `wg show` sees the peer, its allowed IPs and a handshake.
    let allowed = wg_show(&gw1, "allowed-ips");
    assert!(allowed.contains(&k2), "{allowed}");
    for ip in ["100.64.0.2/32", "fd7a:6d65:7368::2/128", "198.18.20.0/24"] {
        assert!(allowed.contains(ip), "{ip} missing from {allowed}");
    }
    let hs = wg_show(&gw2, "latest-handshakes");
    let mut fields = hs.split_whitespace();
    assert_eq!(fields.next(), Some(k1.as_str()), "{hs}");
    assert!(fields.next().and_then(|t| t.parse::<u64>().ok()).is_some_and(|t| t > 0), "no handshake: {hs}");
    // Status reads the same back, normalised: handshake time and counters.
    let st = status(&gw1);
    assert_eq!(st["backend"]["kind"], "userspace");
    assert_eq!(st["applied_generation"], 1);
    let peer = &st["peers"][0];
    assert_eq!(peer["public_key"], k2.as_str());
    assert_eq!(peer["endpoint"], "192.0.2.2:51820");
    assert!(peer["last_handshake_unix"].as_u64().unwrap() > 1_600_000_000, "{peer}");
    assert!(peer["rx_bytes"].as_u64().unwrap() > 0 && peer["tx_bytes"].as_u64().unwrap() > 0, "{peer}");

    // A route deleted by hand is restored by the next reconcile.
    gw1.host.ip(&["route", "del", "198.18.20.0/24", "dev", &gw1.ifname, "table", "109"]).unwrap();
    wait_for("route restored", || routes(&gw1).contains("198.18.20.0/24"));
    assert!(routes(&gw1).contains("proto 109"));
    // So is a peer removed by hand.
    gw1.host.exec("wg", ["set", &gw1.ifname, "peer", &k2, "remove"]).unwrap();
    wait_for("peer restored", || wg_show(&gw1, "peers").contains(&k2));
    wait_for("h1 -> h2 ping after repair", || ping(&h1, "198.18.20.10"));

    // Restart: SIGTERM leaves the data path (interface, addresses, routes);
    // the new agent re-applies the persisted view on its own.
    gw1.stop();
    let link = gw1.host.ip(&["link", "show", &gw1.ifname]).unwrap();
    assert!(link.contains(&gw1.ifname), "the TUN stays: {link}");
    assert!(routes(&gw1).contains("198.18.20.0/24"), "routes stay while the agent is down");
    gw1.start();
    wait_for("restarted agent re-applied", || {
        let st = status(&gw1);
        st["applied_generation"] == 1
            && st["peers"].as_array().is_some_and(|p| p.len() == 1)
            && st["last_run"]["report"].is_object()
    });
    assert!(wg_show(&gw1, "allowed-ips").contains("198.18.20.0/24"));
    wait_for("h1 -> h2 ping after restart", || ping(&h1, "198.18.20.10"));
    tcp_exchange(&h2, &h1, "198.18.20.10:7001");

    // A private key change (a rotation's step) keeps the engine's UDP
    // socket: gotatun rebuilds its connection on every key change, and a
    // fresh bind can race the old socket's close (EADDRINUSE), leaving the
    // engine with no socket. Five changes by hand, each repaired by the
    // agent: the same socket (inode) throughout, and traffic after.
    let socket = || {
        let out = gw1.host.exec("ss", ["-H", "-u", "-l", "-n", "-e", "sport = :51820"]).unwrap();
        let text = String::from_utf8(out.stdout).unwrap();
        text.split_whitespace().find_map(|w| w.strip_prefix("ino:").map(str::to_owned)).unwrap_or_default()
    };
    let bound = socket();
    assert!(!bound.is_empty(), "no socket on 51820: {}", dump(&[&gw1]));
    let own_key = wg_show(&gw1, "private-key");
    let scratch = tempfile::tempdir().unwrap();
    for i in 0..5 {
        let key = gw1.host.exec("wg", ["genkey"]).unwrap().stdout;
        let file = scratch.path().join(format!("key{i}"));
        std::fs::write(&file, key).unwrap();
        gw1.host.exec("wg", ["set", &gw1.ifname, "private-key", file.to_str().unwrap()]).unwrap();
        wait_for("the agent restored its key", || wg_show(&gw1, "private-key") == own_key);
        assert_eq!(socket(), bound, "the key change re-bound the WireGuard socket: {}", dump(&[&gw1]));
    }
    wait_for("h1 -> h2 ping after key changes", || ping(&h1, "198.18.20.10"));
    tcp_exchange(&h2, &h1, "198.18.20.10:7002");

    // Re-applying the same view is a no-op.
    let again: serde_json::Value =
        serde_json::from_str(&gw1.apply(&view(o1, &k2, "192.0.2.2:51820", o2, "198.18.20.0/24"))).unwrap();
    assert_eq!(again["changes"]["peers_added"], 0, "{again}");
    assert_eq!(again["changes"]["routes_replaced"], 0, "{again}");

    gw1.stop();
    gw2.stop();
    assert!(!Path::new(&format!("/var/run/wireguard/{}.sock", gw1.ifname)).exists(), "UAPI socket removed on exit");
}

#[test]
fn covering_prefixes_leave_the_underlay_and_main_table_alone() {
    mesh_lab::require_root!();
    let lab = Lab::new().unwrap();
    let (gw1h, gw2h, h1, h2) = two_sites(&lab);
    // gw1 tears its data path down on exit: its rules must go with it.
    let config = format!("{CONFIG}keep_dataplane_on_exit = false\n");
    let mut gw1 = Gateway::new(gw1h, &lab.unique_ifname("wg"), &config);
    let mut gw2 = Gateway::new(gw2h, &lab.unique_ifname("wg"), CONFIG);
    let (k1, k2) = (gw1.pubkey(), gw2.pubkey());
    let o1 = ("100.64.0.1", "fd7a:6d65:7368::1");
    let o2 = ("100.64.0.2", "fd7a:6d65:7368::2");
    gw1.start();
    gw2.start();
    gw2.apply(&view(o2, &k1, "192.0.2.1:51820", o1, "198.18.10.0/24"));
    let plain = view(o1, &k2, "192.0.2.2:51820", o2, "198.18.20.0/24");
    gw1.apply(&plain);
    wait_for("h1 -> h2 ping", || ping(&h1, "198.18.20.10"));
    let main_before = gw1.host.ip(&["route", "show", "table", "main"]).unwrap();
    // A route an older release left in main is removed by the next run.
    gw1.host.ip(&["route", "add", "198.18.99.0/24", "dev", &gw1.ifname, "proto", "109"]).unwrap();

    // Control hands gw1 routes through gw2 for gw1's own underlay network
    // (equal), a prefix covering it, and gw1's own site LAN.
    let mut hostile: serde_json::Value = serde_json::from_str(&plain).unwrap();
    for p in ["192.0.2.0/24", "192.0.0.0/16", "198.18.10.0/24"] {
        hostile["routes"].as_array_mut().unwrap().push(p.into());
    }
    hostile["peers"][0]["allowed_ips"].as_array_mut().unwrap().push("192.0.0.0/16".into());
    let r: serde_json::Value = serde_json::from_str(&gw1.apply(&hostile.to_string())).unwrap();
    assert_eq!(r["changes"]["routes_replaced"], 3, "{r}");
    assert!(routes(&gw1).contains("192.0.2.0/24"), "{}", routes(&gw1));
    let rules = gw1.host.ip(&["rule"]).unwrap();
    for want in
        ["to 192.0.2.0/24 lookup main", "to 198.18.10.0/24 lookup main", "to 192.0.2.2 lookup main", "lookup 109"]
    {
        assert!(rules.contains(want), "{want} missing:\n{rules}");
    }
    assert!(gw1.host.ip(&["-6", "rule"]).unwrap().contains("lookup 109"));

    // The underlay, the LAN and the tunnel over the underlay all still work,
    // and the main table is exactly as it was.
    assert!(ping(&gw1.host, "192.0.2.2"), "underlay");
    assert!(ping(&gw1.host, "198.18.10.10"), "own LAN");
    wait_for("h1 -> h2 ping with covering routes", || ping(&h1, "198.18.20.10"));
    tcp_exchange(&h2, &h1, "198.18.20.10:7002");
    assert_eq!(gw1.host.ip(&["route", "show", "table", "main"]).unwrap(), main_before);

    // Withdrawn: gone from the mesh table; main still untouched.
    gw1.apply(&plain);
    let left = routes(&gw1);
    assert!(
        !left.contains("192.0.2.0/24") && !left.contains("192.0.0.0/16") && !left.contains("198.18.10.0/24"),
        "{left}"
    );
    assert_eq!(gw1.host.ip(&["route", "show", "table", "main"]).unwrap(), main_before);
    assert!(ping(&h1, "198.18.20.10"));

    // Shutdown without keeping the data path: no rule of the agent is left.
    gw1.stop();
    for fam in ["-4", "-6"] {
        let rules = gw1.host.ip(&[fam, "rule"]).unwrap();
        assert!(!rules.contains("lookup 109") && !rules.contains("proto 109"), "{rules}");
    }
    assert_eq!(gw1.host.ip(&["route", "show", "table", "main"]).unwrap(), main_before);
    gw2.stop();
}
