//! What an operator sees through `meshctl`, against a real control
//! in-process driven by simulated agents. Site prefixes that could capture
//! other traffic are refused with a reason (`meshctl routes`, the audit log,
//! `ApproveRoute`); a policy that does not fit an agent's reported data path
//! limits is refused up front; an agent's nack shows in the node, in
//! `meshctl status` and in the metrics; agents' probe figures and backends
//! reach `meshctl status`.

use std::time::Duration;

use mesh_client::bearer::{Authed, Bearer};
use mesh_client::channel::{Trust, connect};
use mesh_control::run::{Running, start};
use mesh_control::sim::SimAgent;
use mesh_proto::v1 as pb;
use mesh_proto::v1::admin_service_client::AdminServiceClient;
use tonic::Code;

type Admin = AdminServiceClient<Authed>;

async fn control(dir: &std::path::Path) -> (Running, Admin) {
    let config = mesh_control::sim::loopback_config(dir);
    let c = start(&config).await.expect("control starts");
    let ch = connect(&c.addr.to_string(), &Trust::CaPem(c.ca_pem.clone())).await.unwrap();
    let a = AdminServiceClient::with_interceptor(ch, Bearer(c.bootstrap_admin_token.clone()));
    (c, a)
}

const POLICY: &str = r#"{
  "tagOwners": {"tag:gw": [], "tag:app": []},
  "acls": [{"action": "accept", "src": ["tag:app"], "dst": ["tag:gw:*"]}],
  "autoApprovers": {"routes": {"198.18.0.0/15": ["tag:gw"]}},
}"#;

async fn key(a: &mut Admin, tags: &[&str]) -> String {
    let req = pb::CreateEnrollmentKeyRequest {
        reusable: true,
        preapproved: true,
        tags: tags.iter().map(|t| (*t).to_owned()).collect(),
        ..Default::default()
    };
    a.create_enrollment_key(req).await.unwrap().into_inner().secret
}

async fn route(a: &mut Admin, node: u64, prefix: &str) -> pb::Route {
    let routes = a.list_routes(pb::Empty {}).await.unwrap().into_inner().routes;
    routes.into_iter().find(|r| r.node_id == node && r.prefix == prefix).unwrap_or_else(|| panic!("{prefix} of {node}"))
}

async fn meshctl(dir: &std::path::Path, args: &[&str]) -> String {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_meshctl"))
        .arg("--socket")
        .arg(dir.join("admin.sock"))
        .args(args)
        .output()
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
    text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conflicting_prefixes_are_refused_with_a_reason() {
    let dir = tempfile::tempdir().unwrap();
    let (c, mut a) = control(dir.path()).await;
    let addr = c.addr.to_string();
    a.set_policy(pb::PolicyDocument { text: POLICY.into(), generation: 0 }).await.unwrap();
    let k = key(&mut a, &["tag:gw"]).await;
    let fsn1 = SimAgent::enroll(&addr, &k, "fsn-gw1", &["198.18.20.0/24"]).await.unwrap();
    // Its sibling gateway serves the same /24 (HA): allowed.
    let fsn2 = SimAgent::enroll(&addr, &k, "fsn-gw2", &["198.18.20.0/24"]).await.unwrap();
    // Another site's gateway claims half of fsn's /24, and an overlay range.
    let nyc = SimAgent::enroll(&addr, &k, "nyc-gw1", &["198.18.10.0/24", "198.18.20.128/25"]).await.unwrap();

    assert!(route(&mut a, fsn1.node.id, "198.18.20.0/24").await.approved);
    let r = route(&mut a, fsn2.node.id, "198.18.20.0/24").await;
    assert!(r.approved && r.refusal.is_empty(), "{r:?}");
    assert!(route(&mut a, nyc.node.id, "198.18.10.0/24").await.approved);
    let r = route(&mut a, nyc.node.id, "198.18.20.128/25").await;
    assert!(!r.approved, "autoApprovers do not approve a conflicting prefix: {r:?}");
    assert_eq!(r.refusal, "198.18.20.128/25 is inside 198.18.20.0/24 approved for fsn-gw1");

    // The stream can advertise one too: refused and audited with the reason.
    let s = nyc.sync().await.unwrap();
    s.advertise(&["198.18.10.0/24", "198.18.20.128/25", "100.64.9.0/24"]).await.unwrap();
    let mut refused = Vec::new();
    for _ in 0..50 {
        let req = pb::ListAuditRequest { action_prefix: "route.refused".into(), ..Default::default() };
        refused = a.list_audit(req).await.unwrap().into_inner().entries;
        if refused.len() >= 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let reasons: Vec<&str> = refused.iter().map(|e| e.after.as_str()).collect();
    assert!(reasons.iter().any(|r| r.contains("is inside 198.18.20.0/24 approved for fsn-gw1")), "{reasons:?}");
    assert!(
        reasons.iter().any(|r| r.contains("100.64.9.0/24 is inside the overlay range 100.64.0.0/10")),
        "{reasons:?}"
    );

    // An admin cannot approve an overlay prefix...
    let err = a.approve_route(pb::RouteRef { node_id: nyc.node.id, prefix: "100.64.9.0/24".into() }).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains("inside the overlay range 100.64.0.0/10"), "{}", err.message());
    // ...and `meshctl routes` says why each refused prefix is not routed.
    let text = meshctl(dir.path(), &["routes"]).await;
    assert!(text.lines().any(|l| l.starts_with("198.18.20.128/25") && l.contains("approved for fsn-gw1")), "{text}");
    assert!(text.lines().any(|l| l.starts_with("100.64.9.0/24") && l.contains("overlay range")), "{text}");
    assert!(!c.engine.route_order().contains_key(&"198.18.20.128/25".parse().unwrap()), "not routed");

    // An admin's explicit approval overrides the more-specific conflict.
    let r = a
        .approve_route(pb::RouteRef { node_id: nyc.node.id, prefix: "198.18.20.128/25".into() })
        .await
        .unwrap()
        .into_inner();
    assert!(r.approved && !r.auto_approved && r.refusal.is_empty(), "{r:?}");
    assert_eq!(c.engine.route_order().get(&"198.18.20.128/25".parse().unwrap()), Some(&vec![nyc.node.id]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_limit_policy_is_refused_and_nacks_are_visible() {
    let dir = tempfile::tempdir().unwrap();
    let (c, mut a) = control(dir.path()).await;
    let addr = c.addr.to_string();
    a.set_policy(pb::PolicyDocument { text: POLICY.into(), generation: 0 }).await.unwrap();
    let gw = SimAgent::enroll(&addr, &key(&mut a, &["tag:gw"]).await, "fsn-gw1", &[]).await.unwrap();
    let app = SimAgent::enroll(&addr, &key(&mut a, &["tag:app"]).await, "app-1", &[]).await.unwrap();
    // fsn-gw1's agent can hold 2 rules.
    let limits = pb::DataplaneLimits { max_rules: 2, ..Default::default() };
    let mut s = gw.sync_with_limits(limits).await.unwrap();
    let first = s.next(Duration::from_secs(5)).await.unwrap().expect("a snapshot");

    // Three ACL entries towards the gateway compile to more than two rules for it.
    let big = POLICY.replace(
        r#""acls": [{"action": "accept", "src": ["tag:app"], "dst": ["tag:gw:*"]}],"#,
        r#""acls": [
            {"action": "accept", "src": ["tag:app"], "dst": ["tag:gw:22"]},
            {"action": "accept", "src": ["tag:app"], "dst": ["tag:gw:80"]},
            {"action": "accept", "src": ["tag:app"], "dst": ["tag:gw:443"]},
        ],"#,
    );
    let v = a.validate_policy(pb::PolicyDocument { text: big.clone(), generation: 0 }).await.unwrap().into_inner();
    assert!(!v.ok);
    let msg = &v.problems[0].message;
    assert!(msg.contains("fsn-gw1") && msg.contains(" rules; the data path holds at most 2"), "{msg}");
    let err = a.set_policy(pb::PolicyDocument { text: big, generation: 0 }).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("node fsn-gw1") && err.message().contains("at most 2"), "{}", err.message());
    assert_eq!(a.get_policy(pb::Empty {}).await.unwrap().into_inner().text, POLICY, "nothing changed");
    let _ = app;

    // The agent could not apply a view: the nack shows until it applies one.
    s.nack(first, "reconcile step \"enforce policy\" failed: map full").await.unwrap();
    let mut node = pb::Node::default();
    for _ in 0..50 {
        node = a.get_node(pb::NodeRef { id: gw.node.id, name: String::new() }).await.unwrap().into_inner();
        if !node.view_error.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(node.view_error_generation, first);
    assert!(node.view_error.contains("map full"), "{node:?}");
    let text = meshctl(dir.path(), &["status"]).await;
    assert!(text.lines().any(|l| l.starts_with("fsn-gw1 (") && l.contains(&format!("NACK gen {first}: "))), "{text}");
    let metrics = mesh_control::sim::http_get(c.metrics_addr.unwrap(), "/metrics").await;
    assert!(metrics.contains("mesh_control_nodes_nacking 1"), "{metrics}");
    assert!(
        metrics.contains(&format!("mesh_control_node_view_nacked{{node=\"fsn-gw1\",node_id=\"{}\"}} 1", gw.node.id))
    );
    assert!(metrics.contains("mesh_control_view_nacks_total 1"), "{metrics}");

    s.ack(first).await.unwrap();
    for _ in 0..50 {
        if c.engine.nacked(gw.node.id).is_none() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(c.engine.nacked(gw.node.id), None, "an applied view clears the nack");
    let metrics = mesh_control::sim::http_get(c.metrics_addr.unwrap(), "/metrics").await;
    assert!(metrics.contains("mesh_control_nodes_nacking 0"), "{metrics}");
}

/// Agents' probe figures and backends reach `GetStatus`, `ListNodes` and
/// `meshctl status`; a local failover report becomes an audit entry; a
/// report with a malformed prefix ends the stream with a clear error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probe_reports_status_and_failover_audit() {
    let dir = tempfile::tempdir().unwrap();
    let (c, mut a) = control(dir.path()).await;
    let addr = c.addr.to_string();
    a.set_policy(pb::PolicyDocument { text: POLICY.into(), generation: 0 }).await.unwrap();
    let k = key(&mut a, &["tag:gw"]).await;
    let gw1 = SimAgent::enroll(&addr, &k, "gw-1", &[]).await.unwrap();
    // gw-2 serves the prefix that gw-1 reports failing over from it:
    // control audits only reports about real routes and nodes.
    let gw2 = SimAgent::enroll(&addr, &k, "gw-2", &["198.18.20.0/24"]).await.unwrap();
    let s1 = gw1.sync().await.unwrap();
    s1.health(pb::HealthReport {
        peers: vec![pb::PeerHealth {
            node_id: gw2.node.id,
            handshake_age_ms: 4000,
            probe_rtt_ms: 1.5,
            probe_loss: 0.25,
            probe_rtt_p50_ms: 1.25,
            probe_rtt_p95_ms: 3.5,
            probe_up: true,
            rx_bytes: 10,
            tx_bytes: 20,
            endpoint: "192.0.2.2:51820".into(),
            path: "relay".into(),
            relay_region: "fsn".into(),
            path_switches: 3,
            direct_secs: 40.0,
            relay_secs: 2.5,
        }],
        backend: "userspace".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    s1.failover(pb::FailoverReport {
        prefix: "198.18.20.0/24".into(),
        from_node: gw2.node.id,
        to_node: 0,
        reason: "probes to gw-2 lost".into(),
        at_unix_ms: 1,
    })
    .await
    .unwrap();
    let mut audited = Vec::new();
    for _ in 0..50 {
        let req = pb::ListAuditRequest { action_prefix: "route.failover".into(), ..Default::default() };
        audited = a.list_audit(req).await.unwrap().into_inner().entries;
        if !audited.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(audited.len(), 1, "{audited:?}");
    assert_eq!(audited[0].actor, format!("node/{}", gw1.node.id));
    assert_eq!(audited[0].subject, "route/198.18.20.0/24");
    assert!(audited[0].after.contains("probes to gw-2 lost"), "{audited:?}");

    let st = a.get_status(pb::GetStatusRequest {}).await.unwrap().into_inner();
    let link = st.peers.iter().find(|l| l.from_name == "gw-1" && l.to_name == "gw-2").expect("gw-1 -> gw-2");
    assert_eq!(link.health.as_ref().unwrap().probe_rtt_p95_ms, 3.5);
    let nodes = a.list_nodes(pb::ListNodesRequest {}).await.unwrap().into_inner().nodes;
    assert_eq!(nodes.iter().find(|n| n.name == "gw-1").unwrap().backend, "userspace");
    assert_eq!(nodes.iter().find(|n| n.name == "gw-2").unwrap().backend, "", "gw-2 reported nothing");

    // What an operator sees.
    let text = meshctl(dir.path(), &["status"]).await;
    let row = text.lines().find(|l| l.starts_with("gw-1 ") && l.contains("gw-2")).unwrap_or_default();
    for cell in ["yes", "1.50", "1.25", "3.50", "25%", "4s ago", "192.0.2.2:51820", "relay fsn  3", "10 B", "20 B"] {
        assert!(row.contains(cell), "{cell} missing in {row:?}\n{text}");
    }
    assert!(text.lines().any(|l| l.starts_with("gw-1 (") && l.contains("userspace")), "{text}");
    let v: serde_json::Value = serde_json::from_str(&meshctl(dir.path(), &["--json", "status"]).await).unwrap();
    assert_eq!(v["peers"][0]["loss"], 0.25, "{v}");
    assert_eq!(v["peers"][0]["endpoint"], "192.0.2.2:51820", "{v}");
    assert_eq!((&v["peers"][0]["path"], &v["peers"][0]["path_switches"]), (&"relay".into(), &3.into()), "{v}");
    let key = v["relay_ticket_key"].as_str().unwrap_or_default();
    assert_eq!(key.len(), 44, "the relay ticket key, base64: {v}");
    assert!(text.contains(&format!("Relay ticket key: {key}\n")), "{text}");

    // A malformed prefix: the stream ends with an error naming it.
    let mut s2 = gw2.sync().await.unwrap();
    s2.failover(pb::FailoverReport { prefix: "not-a-prefix".into(), ..Default::default() }).await.unwrap();
    let mut err = None;
    for _ in 0..10 {
        match s2.next(Duration::from_secs(1)).await {
            Ok(_) => {}
            Err(e) => {
                err = Some(e.to_string());
                break;
            }
        }
    }
    let err = err.expect("the stream ends");
    assert!(err.contains("not-a-prefix"), "{err}");
}
