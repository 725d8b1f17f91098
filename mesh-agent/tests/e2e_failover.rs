//! HA gateways under two-way traffic. Two dual-stack sites, nyc and fsn,
//! with two gateways each; the site hosts route the mesh through their
//! site's virtual gateway addresses, which the owning gateway holds. A
//! conversation app-nyc <-> db-fsn (a long-lived TCP connection with a
//! checked stream both ways, plus pings, over IPv4 and IPv6) runs through:
//!
//! 1. fsn's primary killed (process and links), brought back (fail-back
//!    after control's hold-down), nyc's primary likewise: every cut under
//!    1 s, the same connections throughout;
//! 2. fsn's primary loses its LAN (its reachability check fails): the site
//!    moves to the backup, and back when the LAN returns;
//! 3. with control stopped: fsn's primary killed, the site's gateways and
//!    the nyc agents decide alone; the switch reaches control's audit log
//!    once control is back;
//! 4. split brain (control away, fsn's gateways unable to probe each
//!    other): both claim the site, and the outcome is the documented rank
//!    order (nyc routes through the first in the order, the LAN follows it);
//!    healed, one owner again.
//!
//! `snat_routes_need_no_return_route` covers the SNAT alternative: a site
//! whose hosts have no route to the mesh at all.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use mesh_lab::{Host, Lab, Switch, twoway::Conversation};
use mesh_proto::v1 as pb;

mod e2e_support;

use e2e_support::{BpfFs, Control, Gateway, Tuning, admin, gateway_key, rt, wait_for};

const POLICY: &str = r#"{
  "tagOwners": {"tag:gw": []},
  "hosts": {"app-nyc": "198.18.10.10/32", "app6-nyc": "2001:db8:10::10/128",
            "db-fsn": "198.18.20.20/32", "db6-fsn": "2001:db8:20::20/128"},
  "autoApprovers": {"routes": {"198.18.10.0/24": ["tag:gw"], "198.18.20.0/24": ["tag:gw"],
                               "2001:db8:10::/64": ["tag:gw"], "2001:db8:20::/64": ["tag:gw"]}},
  "acls": [
    {"action": "accept", "src": ["198.18.10.0/24", "198.18.20.0/24", "2001:db8:10::/64", "2001:db8:20::/64"],
     "dst": ["198.18.10.0/24:*", "198.18.20.0/24:*", "2001:db8:10::/64:*", "2001:db8:20::/64:*"], "proto": "icmp"},
    {"action": "accept", "src": ["app-nyc", "app6-nyc"], "dst": ["db-fsn:9000-9001", "db6-fsn:9000-9001"], "proto": "tcp"},
  ],
}"#;

/// Frequent health reports; control's hold-down is 3 s.
const TUNING: Tuning =
    Tuning { metrics_listen: None, health_interval_secs: 0.2, extra: "[probe]\nfailback_hold_secs = 3\n" };
const HOLD_DOWN: i64 = 3;
/// The bound of every cut with control present.
const BOUND: Duration = Duration::from_millis(1000);

fn routes(rt: &tokio::runtime::Runtime, dir: &Path) -> Vec<pb::Route> {
    rt.block_on(async { admin(dir).await.list_routes(pb::Empty {}).await.unwrap().into_inner().routes })
}

/// One gateway with its switch ports (to cut its links from outside).
struct Gw {
    gw: Gateway,
    wan_port: String,
    lan_port: String,
    lan: usize,
}

/// The two-site lab, control and the gateways.
struct Sites {
    lab: Lab,
    ctl: Host,
    ctl_dir: tempfile::TempDir,
    control: Option<Control>,
    rt: tokio::runtime::Runtime,
    wan: Switch,
    lans: Vec<Switch>,
    gws: Vec<(String, Gw)>,
    app: Host,
    db: Host,
    paths: Vec<PathBuf>,
    _bpf: BpfFs,
}

impl Sites {
    /// nyc: gateways at .1/.2 (+ `nycgw2` unless `one_nyc`), app .10; fsn:
    /// gateways .1/.2, db .20; `options(site)` is the TOML of each site's
    /// route options; hosts route via `via(site)` (none: no route at all).
    fn build(one_nyc: bool, options: &dyn Fn(u8) -> String, via: &dyn Fn(u8) -> Option<(String, String)>) -> Self {
        let lab = Lab::new().unwrap();
        let ctl = lab.host("ctl").unwrap();
        let wan = lab.switch("wan").unwrap();
        wan.plug(&ctl, "eth0").unwrap();
        ctl.addr("eth0", "192.0.2.100/24").unwrap();
        let ctl_dir = tempfile::tempdir().unwrap();
        let control = Control::start(&ctl, ctl_dir.path(), HOLD_DOWN);
        let rt = rt();
        let k = rt.block_on(async {
            let mut a = admin(ctl_dir.path()).await;
            a.set_policy(pb::PolicyDocument { text: POLICY.into(), generation: 0 }).await.unwrap();
            gateway_key(&mut a, true).await
        });
        let bpf = BpfFs::mount();
        let mut lans = Vec::new();
        let mut gws = Vec::new();
        let mut hosts = Vec::new();
        for (li, site) in [10u8, 20].into_iter().enumerate() {
            let name = if site == 10 { "nyc" } else { "fsn" };
            let lan = lab.switch(&format!("l{name}")).unwrap();
            let count = if site == 10 && one_nyc { 1 } else { 2 };
            for n in 1..=count {
                let h = lab.host(&format!("{name}gw{n}")).unwrap();
                let wan_port = wan.plug(&h, "eth0").unwrap();
                let underlay = format!("192.0.2.{}{n}", site / 10);
                h.addr("eth0", &format!("{underlay}/24")).unwrap();
                let lan_port = lan.plug(&h, "lan0").unwrap();
                h.addr("lan0", &format!("198.18.{site}.{n}/24")).unwrap();
                h.addr("lan0", &format!("2001:db8:{site}::{n}/64")).unwrap();
                let (v4, v6) = (format!("198.18.{site}.0/24"), format!("2001:db8:{site}::/64"));
                let gw = Gateway::new(h, &lab.unique_ifname("wg"), bpf.0.path(), &k, &underlay, &[&v4, &v6], &TUNING);
                gw.append_config(&options(site));
                gws.push((format!("{name}gw{n}"), Gw { gw, wan_port, lan_port, lan: li }));
            }
            let (role, last) = if site == 10 { ("app", 10) } else { ("db", 20) };
            let h = lab.host(role).unwrap();
            lan.plug(&h, "eth0").unwrap();
            h.addr("eth0", &format!("198.18.{site}.{last}/24")).unwrap();
            h.addr("eth0", &format!("2001:db8:{site}::{last}/64")).unwrap();
            if let Some((v4, v6)) = via(site) {
                h.route_via("198.18.0.0/16", &v4).unwrap();
                h.route_via("2001:db8::/32", &v6).unwrap();
            }
            hosts.push(h);
            lans.push(lan);
        }
        let db = hosts.pop().unwrap();
        let app = hosts.pop().unwrap();
        let paths = gws.iter().map(|(_, g)| g.gw.dir.path().join("agent.log")).collect();
        let mut s = Self { lab, ctl, ctl_dir, control: Some(control), rt, wan, lans, gws, app, db, paths, _bpf: bpf };
        // The first gateways first, so they are the primaries, and their
        // priority says so too (fail-back goes to them).
        for n in ["1", "2"] {
            for (name, g) in &mut s.gws {
                if name.ends_with(n) {
                    g.gw.start();
                }
            }
            let want = 2 * s.gws.iter().filter(|(name, _)| name.ends_with('1') || n == "2").count();
            s.wait("the routes at control", || routes(&s.rt, s.ctl_dir.path()).len() == want);
        }
        s.rt.block_on(async {
            let mut a = admin(s.ctl_dir.path()).await;
            for r in a.list_routes(pb::Empty {}).await.unwrap().into_inner().routes {
                let priority = if r.node_name.ends_with("gw2") { 10 } else { 0 };
                a.set_route_priority(pb::SetRoutePriorityRequest {
                    route: Some(pb::RouteRef { node_id: r.node_id, prefix: r.prefix }),
                    priority,
                })
                .await
                .unwrap();
            }
        });
        s
    }

    fn logs(&self) -> String {
        self.paths
            .iter()
            .map(|p| format!("--- {}:\n{}\n", p.display(), std::fs::read_to_string(p).unwrap_or_default()))
            .collect()
    }

    fn wait(&self, what: &str, f: impl FnMut() -> bool) {
        wait_for(what, &|| self.logs(), f);
    }

    fn gw(&mut self, name: &str) -> &mut Gw {
        &mut self.gws.iter_mut().find(|(n, _)| n == name).unwrap().1
    }

    /// Kills a gateway's agent and cuts its links at the switches.
    fn kill(&mut self, name: &str) {
        let g = self.gw(name);
        g.gw.agent.take().unwrap().child().kill().unwrap();
        let (wan_port, lan_port, lan) = (g.wan_port.clone(), g.lan_port.clone(), g.lan);
        self.wan.set_port(&wan_port, false).unwrap();
        self.lans[lan].set_port(&lan_port, false).unwrap();
    }

    /// Reconnects a gateway's links and starts its agent.
    fn revive(&mut self, name: &str) {
        let g = self.gw(name);
        let (wan_port, lan_port, lan) = (g.wan_port.clone(), g.lan_port.clone(), g.lan);
        self.wan.set_port(&wan_port, true).unwrap();
        self.lans[lan].set_port(&lan_port, true).unwrap();
        self.gw(name).gw.start();
    }

    /// Whether `node` (control's name) is primary and the only owner of
    /// both of `site`'s prefixes, at control.
    fn settled_on(&self, site: u8, node: &str) -> bool {
        let rs = routes(&self.rt, self.ctl_dir.path());
        [format!("198.18.{site}.0/24"), format!("2001:db8:{site}::/64")]
            .iter()
            .all(|p| mesh_lab::control::settled_on(&rs, p, node))
    }

    /// Whether the gateway holds the site's IPv4 virtual address.
    fn holds(&self, name: &str, vip: &str) -> bool {
        let g = &self.gws.iter().find(|(n, _)| n == name).unwrap().1;
        g.gw.host.ip(&["-o", "addr", "show", "dev", "lan0"]).unwrap().contains(&format!("{vip}/"))
    }
}

/// Waits until the conversation flows again after an event at `t`, checks
/// it is intact, and returns the cuts since `t`.
fn cuts_after(s: &Sites, conv: &Conversation, t: Instant) -> mesh_lab::twoway::Cuts {
    let after = Instant::now() + Duration::from_millis(500);
    s.wait("the conversation to flow again", || conv.flowing_since(after));
    assert!(conv.error().is_none(), "{:?}", conv.error());
    conv.cuts(t)
}

fn vip_options(site: u8) -> String {
    format!(
        "[control.route_options.\"198.18.{site}.0/24\"]\nvirtual_addresses = [\"198.18.{site}.254\"]\n\
         [control.route_options.\"2001:db8:{site}::/64\"]\nvirtual_addresses = [\"2001:db8:{site}::254\"]\n"
    )
}

fn conversation(s: &Sites) -> Conversation {
    let addrs: Vec<SocketAddr> = vec!["198.18.20.20:9000".parse().unwrap(), "[2001:db8:20::20]:9000".parse().unwrap()];
    let conv = Conversation::start(&s.app, &s.db, &addrs, Duration::from_millis(10)).unwrap();
    let t = Instant::now();
    s.wait("the conversation to flow", || conv.flowing_since(t));
    conv
}

#[test]
fn two_way_traffic_survives_failover_fail_back_lan_loss_control_loss_and_split_brain() {
    mesh_lab::require_root!();
    let mut s = Sites::build(false, &vip_options, &|site| {
        Some((format!("198.18.{site}.254"), format!("2001:db8:{site}::254")))
    });
    s.wait("each site owned by its first gateway", || s.settled_on(10, "nycgw1") && s.settled_on(20, "fsngw1"));
    // fsn-gw1's overlay address (the split brain below cuts its probes).
    let f1 = s.rt.block_on(async {
        let nodes = admin(s.ctl_dir.path()).await.list_nodes(pb::ListNodesRequest {}).await.unwrap().into_inner().nodes;
        nodes.into_iter().find(|n| n.name == "fsngw1").unwrap().ipv4
    });
    let conv = conversation(&s);

    // 1. The four events with control present.
    for (name, revive, site, expect) in [
        ("fsngw1", false, 20, "fsngw2"),
        ("fsngw1", true, 20, "fsngw1"),
        ("nycgw1", false, 10, "nycgw2"),
        ("nycgw1", true, 10, "nycgw1"),
    ] {
        let t = Instant::now();
        if revive {
            s.revive(name);
        } else {
            s.kill(name);
        }
        s.wait(&format!("{expect} primary and owner of site {site}"), || s.settled_on(site, expect));
        let cuts = cuts_after(&s, &conv, t);
        println!("{} {name}: {cuts}", if revive { "fail-back to" } else { "killed" });
        assert!(
            cuts.worst() < BOUND,
            "{} {name}: {cuts}\n{}",
            if revive { "fail-back to" } else { "killed" },
            s.logs()
        );
    }
    // Every ownership change is audited.
    let owners = s.rt.block_on(async {
        let req = pb::ListAuditRequest { action_prefix: "route.owner".into(), limit: 1000, ..Default::default() };
        admin(s.ctl_dir.path()).await.list_audit(req).await.unwrap().into_inner().entries
    });
    assert!(
        owners.iter().filter(|e| e.subject.ends_with("/198.18.20.0/24")).count() >= 3,
        "fsn's ownership changes in the audit log: {owners:?}"
    );
    assert!(s.holds("fsngw1", "198.18.20.254") && !s.holds("fsngw2", "198.18.20.254"));

    // 2. fsn-gw1 stays up but loses its LAN: it gives the site up.
    let lan_port = s.gw("fsngw1").lan_port.clone();
    let t = Instant::now();
    s.lans[1].set_port(&lan_port, false).unwrap();
    s.wait("fsn-gw2 primary and owner after fsn-gw1 lost its LAN", || s.settled_on(20, "fsngw2"));
    let cuts = cuts_after(&s, &conv, t);
    println!("fsn-gw1 lost its LAN: {cuts}");
    assert!(cuts.worst() < BOUND, "LAN loss: {cuts}\n{}", s.logs());
    assert!(routes(&s.rt, s.ctl_dir.path()).iter().any(|r| r.node_name == "fsngw1" && !r.healthy));
    assert!(!s.holds("fsngw1", "198.18.20.254"), "the gateway without LAN gave its address up");
    s.lans[1].set_port(&lan_port, true).unwrap();
    s.wait("fail-back to fsn-gw1 once its LAN is back", || s.settled_on(20, "fsngw1"));

    // 3. Without control: fsn-gw1 dies; fsn-gw2 sees it by its probes and
    //    takes the site, the nyc agents follow its claim.
    let mut control = s.control.take().unwrap();
    control.stop();
    let t = Instant::now();
    s.kill("fsngw1");
    let flowing = Instant::now() + Duration::from_secs(1);
    s.wait("the conversation through fsn-gw2 without control", || conv.flowing_since(flowing));
    assert!(s.holds("fsngw2", "198.18.20.254"), "fsn-gw2 holds the address\n{}", s.logs());
    let cuts = cuts_after(&s, &conv, t);
    println!("killed fsngw1 with control away: {cuts}");
    // Probes alone take longer than control's view of a dead stream (lost
    // probes, then TCP's retransmission backoff).
    assert!(cuts.worst_of("ping") < BOUND, "control away: {cuts}");
    assert!(cuts.worst() < 2 * BOUND, "control away: {cuts}");

    // 4. Split brain: fsn-gw1 comes back (control still away) and takes the
    //    site back (first in the order).
    s.revive("fsngw1");
    s.wait("fsn-gw1 back as the site's owner", || {
        s.holds("fsngw1", "198.18.20.254") && !s.holds("fsngw2", "198.18.20.254")
    });
    // 4a. The overlay path between the two breaks: their probes over the
    //     overlay (requests and replies, both ways) are dropped at fsn-gw2.
    //     They still probe each other on the LAN, so fsn-gw2 claims nothing.
    let cut = |from: &str| {
        format!(
            "add table inet split; add chain inet split in {{ type filter hook input priority 0; }}; \
             add rule inet split in ip saddr {from} udp dport 51900 drop; \
             add rule inet split in ip saddr {from} udp sport 51900 drop"
        )
    };
    s.gw("fsngw2").gw.host.exec("nft", [cut(&f1).as_str()]).unwrap();
    let until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < until {
        assert!(
            !s.holds("fsngw2", "198.18.20.254"),
            "fsn-gw2 claimed the site although fsn-gw1 answers on the LAN\n{}",
            s.logs()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // 4b. The LAN path breaks too (fsn-gw1's LAN address): now fsn-gw2 can
    //     no longer probe fsn-gw1 (nor be probed) at all, and both claim
    //     the site. (This also shows that 4a's rule did cut the overlay
    //     probes: without it, they would still hold fsn-gw2 back.)
    s.gw("fsngw2").gw.host.exec("nft", [cut("198.18.20.1").as_str()]).unwrap();
    s.wait("both fsn gateways claiming the site", || {
        s.holds("fsngw1", "198.18.20.254") && s.holds("fsngw2", "198.18.20.254")
    });
    // The rank order decides: nyc's gateways route fsn through fsn-gw1,
    // and the LAN converges on it (it re-announces, fsn-gw2 does not).
    let t = Instant::now() + Duration::from_secs(2);
    s.wait("the conversation flowing during the split brain", || Instant::now() > t && conv.flowing_since(t));
    let cuts = conv.cuts(t);
    println!("split brain, settled: {cuts}");
    assert!(cuts.worst() < Duration::from_millis(300), "split brain, once settled: {cuts}\n{}", s.logs());
    // Healed: fsn-gw2 sees fsn-gw1 again and gives the site up.
    s.gw("fsngw2").gw.host.exec("nft", ["delete table inet split"]).unwrap();
    s.wait("one owner again after the split", || {
        s.holds("fsngw1", "198.18.20.254") && !s.holds("fsngw2", "198.18.20.254")
    });

    // Control comes back: the local switches are in its audit log.
    let control = Control::start(&s.ctl, s.ctl_dir.path(), HOLD_DOWN);
    s.wait("the local failover in control's audit log", || {
        let entries = s.rt.block_on(async {
            let req = pb::ListAuditRequest { action_prefix: "route.failover".into(), ..Default::default() };
            admin(s.ctl_dir.path()).await.list_audit(req).await.unwrap().into_inner().entries
        });
        entries.iter().any(|e| e.subject == "route/198.18.20.0/24")
    });
    let streams = conv.finish().unwrap_or_else(|e| panic!("the conversation did not survive: {e}\n{}", s.logs()));
    for (n, o) in streams {
        println!("{n}: {:?} bytes checked", o.bytes);
    }
    drop(control);
    for (_, g) in &mut s.gws {
        g.gw.stop();
    }
    drop(s.lab);
}

#[test]
fn snat_routes_need_no_return_route() {
    mesh_lab::require_root!();
    let snat = |site: u8| {
        if site == 20 {
            "[control.route_options.\"198.18.20.0/24\"]\nsnat = true\n[control.route_options.\"2001:db8:20::/64\"]\nsnat = true\n"
                .to_owned()
        } else {
            String::new()
        }
    };
    // nyc's app routes through its one gateway; fsn's db has no route to
    // the mesh at all.
    let mut s = Sites::build(true, &snat, &|site| {
        (site == 10).then(|| ("198.18.10.1".to_owned(), "2001:db8:10::1".to_owned()))
    });
    // The probe responder answers only on the overlay: a burst of requests
    // spoofed on nyc's LAN from fsn-gw1's overlay address (whose answers
    // would go into the overlay, 50 times larger) gets none.
    let f1 = s.rt.block_on(async {
        let nodes = admin(s.ctl_dir.path()).await.list_nodes(pb::ListNodesRequest {}).await.unwrap().into_inner().nodes;
        nodes.into_iter().find(|n| n.name == "fsngw1").unwrap().ipv4
    });
    let nyc = &mut s.gw("nycgw1").gw;
    nyc.stop();
    nyc.prepend_config("metrics_listen = \"127.0.0.1:9300\"\n");
    nyc.start();
    let answered =
        |s: &Sites| s.gws[0].1.gw.metric("127.0.0.1:9300", "mesh_agent_probe_requests_answered_total").unwrap_or(-1.0);
    s.wait("nyc-gw1 answering fsn's probes on the overlay", || answered(&s) > 5.0);
    s.app.addr("eth0", &format!("{f1}/32")).unwrap();
    let before = answered(&s);
    let spoof = f1.clone();
    s.app
        .run(move || {
            let sock = std::net::UdpSocket::bind((spoof.parse::<std::net::IpAddr>().unwrap(), 0)).unwrap();
            let mut req = b"MSHP\x02\x01\x00\x00".to_vec();
            req.extend_from_slice(&[0; 9]);
            for _ in 0..500 {
                sock.send_to(&req, "198.18.10.1:51900").unwrap();
            }
        })
        .unwrap();
    // Let the burst land (the socket would answer it within milliseconds).
    let t = Instant::now() + Duration::from_millis(500);
    s.wait("the spoofed burst to land", || Instant::now() > t);
    let delta = answered(&s) - before;
    assert!(delta < 100.0, "{delta} requests answered in half a second: the spoofed ones were too");
    let conv = conversation(&s);
    // The db sees the gateway's LAN address as the source.
    let peer = |s: &Sites| -> Option<String> {
        let l = s.db.run(|| std::net::TcpListener::bind("198.18.20.20:9001")).unwrap().unwrap();
        l.set_nonblocking(true).unwrap();
        let to: SocketAddr = "198.18.20.20:9001".parse().unwrap();
        let c = s.app.run(move || std::net::TcpStream::connect_timeout(&to, Duration::from_secs(2))).unwrap();
        c.ok()?;
        // The server side completes the handshake a moment after the client.
        let deadline = Instant::now() + Duration::from_secs(2);
        loop {
            match l.accept() {
                Ok((_, from)) => return Some(from.ip().to_string()),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(_) => return None,
            }
        }
    };
    assert_eq!(peer(&s).as_deref(), Some("198.18.20.1"), "masqueraded behind fsn-gw1's LAN address");
    let table = |s: &Sites, gw: &str| {
        let g = &s.gws.iter().find(|(n, _)| n == gw).unwrap().1;
        String::from_utf8_lossy(&g.gw.host.exec("nft", ["list", "tables"]).unwrap().stdout).contains("mesh_snat_")
    };
    assert!(table(&s, "fsngw1") && table(&s, "fsngw2"), "every gateway of the site masquerades");
    // fsn-gw1 dies: the conversation's connections die with its NAT state
    // (the documented trade-off), but the pings go on and new connections
    // come from fsn-gw2.
    let t = Instant::now();
    s.kill("fsngw1");
    let after = Instant::now() + Duration::from_millis(500);
    s.wait("new connections through fsn-gw2", || Instant::now() > after && peer(&s).as_deref() == Some("198.18.20.2"));
    assert!(conv.cuts(t).worst_of("ping") < BOUND, "pings through the SNAT backup: {}", conv.cuts(t));
    drop(conv);
    // Stopping the agent removes its table.
    s.gw("fsngw2").gw.stop();
    assert!(!table(&s, "fsngw2"), "the SNAT table goes with the agent");
    for (_, g) in &mut s.gws {
        g.gw.stop();
    }
}
