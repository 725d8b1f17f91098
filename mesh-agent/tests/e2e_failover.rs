//! Gateway failover driven by health: a continuous UDP flow from a nyc app
//! host to a fsn db host crosses fsn's primary gateway; (1) the primary is
//! killed (process and links) and (2) the primary stays up but loses its
//! LAN (its route is reported unhealthy). Both times control re-orders the
//! fsn prefix, the nyc gateway moves it to fsn's second gateway and the
//! flow resumes; the outage (longest gap at the receiver) is printed. When
//! the first gateway comes back, the route fails back only after control's
//! hold-down.
//!
//! (3) With control stopped, the primary is killed again: the nyc agent's
//! own probes move the prefix, the flow resumes, and once control is back
//! the switch is in its audit log.
//!
//! The flow is one-way on purpose: the return path from a site LAN to its
//! gateways (a VIP or VRRP on the LAN) is not part of the mesh yet.

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use mesh_lab::{Host, Lab, traffic::UdpFlow};
use mesh_proto::v1 as pb;

const POLICY: &str = r#"{
  "tagOwners": {"tag:gw": []},
  "hosts": {"app-nyc": "198.18.10.10/32", "db-fsn": "198.18.20.20/32"},
  "autoApprovers": {"routes": {"198.18.10.0/24": ["tag:gw"], "198.18.20.0/24": ["tag:gw"]}},
  "acls": [
    {"action": "accept", "src": ["198.18.10.0/24", "198.18.20.0/24"], "dst": ["198.18.10.0/24:*", "198.18.20.0/24:*"], "proto": "icmp"},
    {"action": "accept", "src": ["app-nyc"], "dst": ["db-fsn:9000"], "proto": "udp"},
  ],
}"#;

mod e2e_support;

use e2e_support::{Admin, BpfFs, Control, Gateway, Tuning, admin, rt, wait_for};

/// Frequent health reports: a LAN loss reaches control quickly. The local
/// fail-back hold-down is as short as control's.
const TUNING: Tuning =
    Tuning { metrics_listen: None, health_interval_secs: 0.2, extra: "[probe]\nfailback_hold_secs = 3\n" };
async fn key(a: &mut Admin) -> String {
    a.create_enrollment_key(pb::CreateEnrollmentKeyRequest {
        reusable: true,
        preapproved: true,
        tags: vec!["tag:gw".into()],
        ..Default::default()
    })
    .await
    .unwrap()
    .into_inner()
    .secret
}

fn primary(rt: &tokio::runtime::Runtime, dir: &Path, prefix: &str) -> String {
    rt.block_on(async {
        let routes = admin(dir).await.list_routes(pb::Empty {}).await.unwrap().into_inner().routes;
        routes.iter().find(|r| r.prefix == prefix && r.primary).map(|r| r.node_name.clone()).unwrap_or_default()
    })
}

/// Flow resumes after the break; returns the outage.
fn outage(flow: &UdpFlow, cut: Instant, logs: &dyn Fn() -> String) -> Duration {
    let before = flow.received();
    wait_for("the flow to resume through the backup", logs, || flow.received() > before + 200);
    flow.longest_gap_since(cut)
}

#[test]
fn failover_on_gateway_loss_and_on_lan_loss_with_hold_down() {
    let lab = Lab::new().unwrap();
    let ctl = lab.host("ctl").unwrap();
    let nyc = lab.host("nycgw1").unwrap();
    let f1 = lab.host("fsngw1").unwrap();
    let f2 = lab.host("fsngw2").unwrap();
    let app = lab.host("app").unwrap();
    let db = lab.host("db").unwrap();
    let wan = lab.switch("wan").unwrap();
    let mut wan_ports = Vec::new();
    for (h, a) in [(&ctl, "192.0.2.100"), (&nyc, "192.0.2.11"), (&f1, "192.0.2.21"), (&f2, "192.0.2.22")] {
        wan_ports.push(wan.plug(h, "eth0").unwrap());
        h.addr("eth0", &format!("{a}/24")).unwrap();
    }
    let lnyc = lab.switch("lnyc").unwrap();
    lnyc.plug(&nyc, "lan0").unwrap();
    lnyc.plug(&app, "eth0").unwrap();
    nyc.addr("lan0", "198.18.10.1/24").unwrap();
    app.addr("eth0", "198.18.10.10/24").unwrap();
    app.route_via("198.18.0.0/16", "198.18.10.1").unwrap();
    let lfsn = lab.switch("lfsn").unwrap();
    let f1_lan = lfsn.plug(&f1, "lan0").unwrap();
    lfsn.plug(&f2, "lan0").unwrap();
    lfsn.plug(&db, "eth0").unwrap();
    f1.addr("lan0", "198.18.20.1/24").unwrap();
    f2.addr("lan0", "198.18.20.2/24").unwrap();
    db.addr("eth0", "198.18.20.20/24").unwrap();

    let ctl_dir = tempfile::tempdir().unwrap();
    let mut control = Control::start(&ctl, ctl_dir.path(), 3);
    let rt = rt();
    let k = rt.block_on(async {
        let mut a = admin(ctl_dir.path()).await;
        a.set_policy(pb::PolicyDocument { text: POLICY.into(), generation: 0 }).await.unwrap();
        key(&mut a).await
    });
    let bpf = BpfFs::mount();
    let mk = |h: &Host, u: &str, lan: &str| {
        Gateway::new(h.clone(), &lab.unique_ifname("wg"), bpf.0.path(), &k, u, lan, &TUNING)
    };
    let mut gn = mk(&nyc, "192.0.2.11", "198.18.10.0/24");
    let mut g1 = mk(&f1, "192.0.2.21", "198.18.20.0/24");
    let mut g2 = mk(&f2, "192.0.2.22", "198.18.20.0/24");
    let paths: Vec<PathBuf> = [&gn, &g1, &g2].iter().map(|g| g.dir.path().join("agent.log")).collect();
    let logs = || {
        paths
            .iter()
            .map(|p| format!("--- {}:\n{}\n", p.display(), std::fs::read_to_string(p).unwrap_or_default()))
            .collect::<String>()
    };
    gn.start();
    g1.start();
    wait_for("fsn-gw1 primary", &logs, || primary(&rt, ctl_dir.path(), "198.18.20.0/24") == "fsngw1");
    g2.start();
    wait_for("three routes", &logs, || {
        rt.block_on(async {
            admin(ctl_dir.path()).await.list_routes(pb::Empty {}).await.unwrap().into_inner().routes.len()
        }) == 3
    });
    // fsn-gw1 is preferred (lower priority value), so fail-back happens.
    rt.block_on(async {
        let mut a = admin(ctl_dir.path()).await;
        for r in a.list_routes(pb::Empty {}).await.unwrap().into_inner().routes {
            let priority = if r.node_name == "fsngw2" { 10 } else { 0 };
            a.set_route_priority(pb::SetRoutePriorityRequest {
                route: Some(pb::RouteRef { node_id: r.node_id, prefix: r.prefix }),
                priority,
            })
            .await
            .unwrap();
        }
    });
    let flow = UdpFlow::start(&app, &db, "198.18.20.20:9000".parse().unwrap()).unwrap();
    wait_for("the flow through fsn-gw1", &logs, || flow.received() > 100);

    // 1. fsn-gw1 dies: process killed, links down.
    let cut = Instant::now();
    g1.agent.take().unwrap().child().kill().unwrap();
    wan.set_port(&wan_ports[2], false).unwrap();
    lfsn.set_port(&f1_lan, false).unwrap();
    let out1 = outage(&flow, cut, &logs);
    assert_eq!(primary(&rt, ctl_dir.path(), "198.18.20.0/24"), "fsngw2");
    println!("failover outage, primary killed: {} ms", out1.as_millis());

    // It comes back: fail-back waits for the hold-down (3 s).
    wan.set_port(&wan_ports[2], true).unwrap();
    lfsn.set_port(&f1_lan, true).unwrap();
    g1.start();
    wait_for("fsn-gw1 online again", &logs, || {
        rt.block_on(async {
            let nodes =
                admin(ctl_dir.path()).await.list_nodes(pb::ListNodesRequest {}).await.unwrap().into_inner().nodes;
            nodes.iter().any(|n| n.name == "fsngw1" && n.online)
        })
    });
    assert_eq!(primary(&rt, ctl_dir.path(), "198.18.20.0/24"), "fsngw2", "no fail-back before the hold-down");
    wait_for("fail-back to fsn-gw1 after the hold-down", &logs, || {
        primary(&rt, ctl_dir.path(), "198.18.20.0/24") == "fsngw1"
    });
    let resumed = flow.received();
    wait_for("the flow through fsn-gw1 again", &logs, || flow.received() > resumed + 200);

    // 2. fsn-gw1 stays up but loses its LAN: it reports the route unhealthy.
    let cut = Instant::now();
    lfsn.set_port(&f1_lan, false).unwrap();
    let out2 = outage(&flow, cut, &logs);
    assert_eq!(primary(&rt, ctl_dir.path(), "198.18.20.0/24"), "fsngw2");
    let routes =
        rt.block_on(async { admin(ctl_dir.path()).await.list_routes(pb::Empty {}).await.unwrap().into_inner().routes });
    assert!(routes.iter().any(|r| r.node_name == "fsngw1" && !r.healthy), "{routes:?}");
    println!("failover outage, primary lost its LAN: {} ms", out2.as_millis());

    // 3. Without control: fsn-gw1 gets its LAN back and the route fails
    //    back (both hold-downs); then control stops and fsn-gw1 dies. The
    //    nyc agent's own probes move the prefix to fsn-gw2.
    lfsn.set_port(&f1_lan, true).unwrap();
    wait_for("fail-back to fsn-gw1 after its LAN is back", &logs, || {
        primary(&rt, ctl_dir.path(), "198.18.20.0/24") == "fsngw1"
    });
    let resumed = flow.received();
    wait_for("the flow through fsn-gw1 again", &logs, || flow.received() > resumed + 200);
    control.stop();
    // The nyc agent restarts meanwhile: it knows the gateway order from the
    // control view it saved.
    let answered = |g: &Gateway| g.log().matches("peer answers probes peer=fsngw1").count();
    let before = answered(&gn);
    gn.stop();
    gn.start();
    wait_for("the restarted nyc agent probing fsn-gw1", &logs, || answered(&gn) > before);
    let resumed = flow.received();
    wait_for("the flow after the nyc restart", &logs, || flow.received() > resumed + 100);
    let cut = Instant::now();
    g1.agent.take().unwrap().child().kill().unwrap();
    wan.set_port(&wan_ports[2], false).unwrap();
    lfsn.set_port(&f1_lan, false).unwrap();
    let out3 = outage(&flow, cut, &logs);
    println!("failover outage, primary killed while control is down (agent probes): {} ms", out3.as_millis());
    assert!(gn.log().contains("route failover (local)"), "the nyc agent switched on its own\n{}", logs());

    // Control comes back: the nyc agent reports the switch, control audits
    // it, next to its own primary changes.
    let control = Control::start(&ctl, ctl_dir.path(), 3);
    wait_for("the local failover in control's audit log", &logs, || {
        let entries = rt.block_on(async {
            let req = pb::ListAuditRequest { action_prefix: "route.failover".into(), ..Default::default() };
            admin(ctl_dir.path()).await.list_audit(req).await.unwrap().into_inner().entries
        });
        entries.iter().any(|e| e.subject == "route/198.18.20.0/24" && e.after.contains("lost"))
    });
    let primaries = rt.block_on(async {
        let req = pb::ListAuditRequest { action_prefix: "route.primary".into(), ..Default::default() };
        admin(ctl_dir.path()).await.list_audit(req).await.unwrap().into_inner().entries
    });
    assert!(primaries.len() >= 4, "control audits each primary change: {primaries:?}");
    drop(control);

    drop(flow);
    gn.stop();
    g2.stop();
    g1.stop();
}
