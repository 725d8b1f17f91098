//! In-process gRPC: enrollment with each kind of key, Sync streams, policy
//! changes reaching exactly the affected agents, refusals, reflection and
//! metrics, over real TLS on loopback.

use std::sync::Arc;
use std::time::Duration;

use mesh_client::bearer::{Authed, Bearer};
use mesh_client::channel::{Trust, connect};
use mesh_control::engine::{Clock, ManualClock, SystemClock};
use mesh_control::run::{Running, start_with_clock};
use mesh_control::sim::SimAgent;
use mesh_proto::v1 as pb;
use mesh_proto::v1::admin_service_client::AdminServiceClient;
use tonic::Code;

type Admin = AdminServiceClient<Authed>;

async fn control(dir: &std::path::Path) -> Running {
    control_with_clock(dir, Arc::new(SystemClock)).await
}

async fn control_with_clock(dir: &std::path::Path, clock: Arc<dyn Clock>) -> Running {
    let config = mesh_control::sim::loopback_config(dir);
    start_with_clock(&config, clock).await.expect("control starts")
}

async fn admin(c: &Running, token: Option<String>) -> Admin {
    let ch = connect(&c.addr.to_string(), &Trust::CaPem(c.ca_pem.clone())).await.unwrap();
    AdminServiceClient::with_interceptor(ch, Bearer(token))
}

const POLICY: &str = r#"// test policy
{
  "tagOwners": {"tag:app": [], "tag:db": [], "tag:gw": []},
  "acls": [
    {"action": "accept", "src": ["tag:app"], "dst": ["tag:db:5432"]},
  ],
  "tests": [{"src": "tag:app", "accept": ["tag:db:5432"], "deny": ["tag:gw:22"]}],
}"#;

async fn key(a: &mut Admin, reusable: bool, preapproved: bool, tags: &[&str], expires: i64) -> String {
    a.create_enrollment_key(pb::CreateEnrollmentKeyRequest {
        reusable,
        preapproved,
        tags: tags.iter().map(|t| (*t).to_owned()).collect(),
        expires_in_seconds: expires,
        ..Default::default()
    })
    .await
    .unwrap()
    .into_inner()
    .secret
}

const WAIT: Duration = Duration::from_secs(5);
const QUIET: Duration = Duration::from_millis(700);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enroll_sync_policy_push_and_refusals() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::at_wall_clock());
    let c = control_with_clock(dir.path(), clock.clone()).await;
    let addr = c.addr.to_string();
    let token = c.bootstrap_admin_token.clone().expect("first start makes an admin token");
    let mut a = admin(&c, Some(token.clone())).await;
    a.set_policy(pb::PolicyDocument { text: POLICY.into(), generation: 0 }).await.unwrap();

    // Keys of each kind.
    let one_off = key(&mut a, false, true, &["tag:app"], 0).await;
    let reusable_pending = key(&mut a, true, false, &["tag:db"], 0).await;
    let gw_key = key(&mut a, false, true, &["tag:gw"], 0).await;
    let short = key(&mut a, true, true, &["tag:app"], 1).await;

    let app = SimAgent::enroll(&addr, &one_off, "app-1", &[]).await.unwrap();
    assert_eq!(app.node.state(), pb::NodeState::Approved, "pre-approved key");
    assert_eq!(app.node.ipv4, "100.64.0.1");
    // One-off key reused: refused, and the refusal says nothing more.
    let err = SimAgent::enroll(&addr, &one_off, "app-2", &[]).await.unwrap_err();
    assert!(matches!(&err, mesh_control::sim::SimError::Status(s) if s.code() == Code::Unauthenticated), "{err}");
    // Expired key (it lived 1 s): refused.
    clock.advance(1);
    let err = SimAgent::enroll(&addr, &short, "app-3", &[]).await.unwrap_err();
    assert!(matches!(&err, mesh_control::sim::SimError::Status(s) if s.code() == Code::Unauthenticated), "{err}");
    // Pending until approved.
    let db1 = SimAgent::enroll(&addr, &reusable_pending, "db-1", &[]).await.unwrap();
    let db2 = SimAgent::enroll(&addr, &reusable_pending, "db-2", &[]).await.unwrap();
    assert_eq!(db1.node.state(), pb::NodeState::Pending);
    let gw = SimAgent::enroll(&addr, &gw_key, "gw-1", &["198.18.10.0/24"]).await.unwrap();

    let mut s_app = app.sync().await.unwrap();
    let mut s_db1 = db1.sync().await.unwrap();
    let mut s_db2 = db2.sync().await.unwrap();
    let mut s_gw = gw.sync().await.unwrap();
    for s in [&mut s_app, &mut s_db1, &mut s_db2, &mut s_gw] {
        assert!(s.next(WAIT).await.unwrap().is_some(), "every stream starts with a snapshot");
    }
    // A pending node sees only itself.
    let v = s_db1.view.as_ref().unwrap();
    assert!(v.peers.is_empty());
    assert_eq!(v.self_.as_ref().unwrap().state(), pb::NodeState::Pending);

    for n in [&db1, &db2] {
        a.approve_node(pb::NodeRef { id: n.node.id, name: String::new() }).await.unwrap();
    }
    // Approval changes the db nodes' views (and app's: it gains peers);
    // take everything until the streams go quiet.
    for s in [&mut s_db1, &mut s_db2, &mut s_app] {
        assert!(s.next(WAIT).await.unwrap().is_some());
        while s.next(QUIET).await.unwrap().is_some() {}
    }
    let app_view = s_app.view.clone().unwrap();
    let peer_ids: Vec<u64> = app_view.peers.iter().map(|p| p.node_id).collect();
    assert_eq!(peer_ids, vec![db1.node.id, db2.node.id], "app peers with the db nodes only");
    let db_rules = &s_db1.view.as_ref().unwrap().policy.as_ref().unwrap().rules;
    // "tag:db:5432" without a proto: TCP, UDP and SCTP on 5432 plus ICMP
    // (in the dataplane's contract an any-protocol rule has no ports).
    let protos: Vec<pb::RuleProto> = db_rules.iter().map(|r| r.proto()).collect();
    assert_eq!(protos, [pb::RuleProto::Tcp, pb::RuleProto::Udp, pb::RuleProto::Sctp, pb::RuleProto::Icmp]);
    let db_policy = mesh_client::policy::from_proto(s_db1.view.as_ref().unwrap().policy.as_ref().unwrap()).unwrap();
    let src: Vec<String> = db_policy.rules[0].src.iter().map(ToString::to_string).collect();
    assert_eq!(src, ["100.64.0.1/32", "fd7a:6d65:7368::1/128"]);
    assert_eq!((db_rules[0].port_first, db_rules[0].port_last), (5432, 5432));
    while s_gw.next(QUIET).await.unwrap().is_some() {}

    // The policy change: only the db nodes' rules change.
    let gen_before: Vec<u64> =
        [&s_app, &s_db1, &s_db2, &s_gw].iter().map(|s| s.view.as_ref().unwrap().generation).collect();
    a.set_policy(pb::PolicyDocument { text: POLICY.replace("5432", "6432"), generation: 0 }).await.unwrap();
    let g1 = s_db1.next(WAIT).await.unwrap().expect("db-1 gets a new generation");
    let g2 = s_db2.next(WAIT).await.unwrap().expect("db-2 gets a new generation");
    assert!(g1 > gen_before[1] && g2 > gen_before[2]);
    assert_eq!(s_db1.received.last(), Some(&false), "a delta, not a snapshot");
    assert_eq!(s_db1.view.as_ref().unwrap().policy.as_ref().unwrap().rules[0].port_first, 6432);
    // app's egress rule (what it may send, as its dataplane filters both
    // directions) follows the port.
    assert!(s_app.next(WAIT).await.unwrap().is_some(), "app's egress rule changes");
    while s_app.next(QUIET).await.unwrap().is_some() {}
    let app_rules = &s_app.view.as_ref().unwrap().policy.as_ref().unwrap().rules;
    assert!(app_rules.iter().all(|r| r.id & 0x8000 != 0), "app only has egress rules: {app_rules:?}");
    assert!(app_rules.iter().any(|r| r.port_first == 6432), "{app_rules:?}");
    assert_eq!(s_gw.next(QUIET).await.unwrap(), None, "gw's view did not change");
    s_db1.ack(g1).await.unwrap();
    let mut acked = 0;
    for _ in 0..50 {
        acked = c.engine.acked(db1.node.id);
        if acked == g1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(acked, g1);

    // A policy that fails its own tests is refused; nothing changes.
    let failing = POLICY.replace("\"deny\": [\"tag:gw:22\"]", "\"deny\": [\"tag:db:5432\"]");
    let err = a.set_policy(pb::PolicyDocument { text: failing, generation: 0 }).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("line 7: test failed"), "{}", err.message());
    assert_eq!(s_db1.next(QUIET).await.unwrap(), None);
    let current = a.get_policy(pb::Empty {}).await.unwrap().into_inner();
    assert!(current.text.contains("6432"));

    // Diff shows the per-node rule changes of a candidate.
    let diff = a.diff_policy(pb::PolicyDocument { text: POLICY.into(), generation: 0 }).await.unwrap().into_inner();
    let names: Vec<&str> = diff.nodes.iter().map(|n| n.node_name.as_str()).collect();
    assert_eq!(names, vec!["db-1", "db-2"]);
    assert!(diff.nodes[0].added[0].ends_with(":5432") && diff.nodes[0].removed[0].ends_with(":6432"));

    // Routes: the gateway's route is pending until approved.
    let routes = a.list_routes(pb::Empty {}).await.unwrap().into_inner().routes;
    assert_eq!(routes.len(), 1);
    assert!(!routes[0].approved);
    let r = a
        .approve_route(pb::RouteRef { node_id: gw.node.id, prefix: "198.18.10.0/24".into() })
        .await
        .unwrap()
        .into_inner();
    assert!(r.approved && r.primary);

    // Refusals. No token / a bad token: UNAUTHENTICATED.
    let mut anon = admin(&c, None).await;
    assert_eq!(anon.list_nodes(pb::ListNodesRequest {}).await.unwrap_err().code(), Code::Unauthenticated);
    let mut bad = admin(&c, Some("mat1.x.y".into())).await;
    assert_eq!(bad.get_status(pb::GetStatusRequest {}).await.unwrap_err().code(), Code::Unauthenticated);
    // A node credential on the admin API: PERMISSION_DENIED.
    let mut as_node = admin(&c, Some(app.token.clone())).await;
    assert_eq!(as_node.list_nodes(pb::ListNodesRequest {}).await.unwrap_err().code(), Code::PermissionDenied);
    // Sync with no or a forged credential.
    let nobody = SimAgent { token: "mnc1.forged".into(), ..app.clone() };
    assert!(
        matches!(nobody.sync().await.unwrap_err(), mesh_control::sim::SimError::Status(s) if s.code() == Code::Unauthenticated)
    );
    // A valid node asking for another node's stream.
    let err = app.sync_as(db1.node.id).await.unwrap_err();
    assert!(matches!(&err, mesh_control::sim::SimError::Status(s) if s.code() == Code::PermissionDenied), "{err}");
    // An expired key stops the credential working.
    a.expire_node_key(pb::NodeRef { id: db2.node.id, name: String::new() }).await.unwrap();
    let err = db2.client().renew(pb::RenewRequest::default()).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    // Renewal works for a valid node and issues a new credential.
    let renewed = app.client().renew(pb::RenewRequest::default()).await.unwrap().into_inner();
    assert_ne!(renewed.credential.unwrap().token, app.token);

    // Status, audit, metrics.
    let st = a.get_status(pb::GetStatusRequest {}).await.unwrap().into_inner();
    assert_eq!((st.nodes_total, st.nodes_expired, st.store.as_str()), (4, 1, "sqlite"));
    assert_eq!(st.ca_pin, hex::encode(c.ca_pin));
    let audit = a
        .list_audit(pb::ListAuditRequest { action_prefix: "policy.".into(), ..Default::default() })
        .await
        .unwrap()
        .into_inner()
        .entries;
    assert_eq!(audit.len(), 2, "two accepted policy changes, the refused one is not there");
    assert!(audit[1].actor.starts_with("admin:"));
    let metrics = mesh_control::sim::http_get(c.metrics_addr.unwrap(), "/metrics").await;
    assert!(metrics.contains("mesh_control_nodes{state=\"approved\"} 3"), "{metrics}");
    assert!(metrics.contains("mesh_control_push_latency_seconds_count"), "{metrics}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_socket_admin_and_reflection() {
    let dir = tempfile::tempdir().unwrap();
    let c = control(dir.path()).await;
    // The Unix socket needs no token (root-only by file mode).
    let sock = dir.path().join("admin.sock");
    use std::os::unix::fs::PermissionsExt as _;
    assert_eq!(std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777, 0o600);
    let ch = mesh_client::channel::connect_unix(&sock).await.unwrap();
    let mut local = AdminServiceClient::new(ch);
    let st = local.get_status(pb::GetStatusRequest {}).await.unwrap().into_inner();
    assert_eq!(st.nodes_total, 0);
    let k = local
        .create_enrollment_key(pb::CreateEnrollmentKeyRequest { reusable: true, ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    let subject = format!("key/{}", k.key.unwrap().id);
    let audit = local.list_audit(pb::ListAuditRequest::default()).await.unwrap().into_inner().entries;
    assert!(audit.iter().any(|e| e.action == "key.create" && e.actor == "local-admin" && e.subject == subject));

    // Reflection lists our services (over TLS, like grpcurl would).
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    let ch = connect(&c.addr.to_string(), &Trust::Pin(c.ca_pin)).await.unwrap();
    let req = tonic_reflection::pb::v1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut resp = ServerReflectionClient::new(ch)
        .server_reflection_info(tokio_stream::iter(vec![req]))
        .await
        .unwrap()
        .into_inner();
    let msg = resp.message().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = msg.message_response else { panic!("{msg:?}") };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    assert!(
        names.contains(&"mesh.v1.AgentService".to_owned()) && names.contains(&"mesh.v1.AdminService".to_owned()),
        "{names:?}"
    );
}

/// Control reads what an agent's capability version defines and nothing
/// more: a version-1 agent (no probes) shows no probe figures, and a
/// version-2 gateway's site ownership is not read, while the same reports
/// from a current agent are.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn older_agents_are_read_by_their_capability_version() {
    let dir = tempfile::tempdir().unwrap();
    let c = control(dir.path()).await;
    let addr = c.addr.to_string();
    let mut a = admin(&c, c.bootstrap_admin_token.clone()).await;
    a.set_policy(pb::PolicyDocument { text: POLICY.into(), generation: 0 }).await.unwrap();
    let k = key(&mut a, true, true, &["tag:gw"], 0).await;
    let old = SimAgent::enroll(&addr, &k, "gw-v2", &["198.18.10.0/24"]).await.unwrap();
    let new = SimAgent::enroll(&addr, &k, "gw-v3", &["198.18.10.0/24"]).await.unwrap();
    let oldest = SimAgent::enroll(&addr, &k, "gw-v1", &[]).await.unwrap();
    let mut sessions = [
        (&old, new.node.id, old.sync_as_version(2).await.unwrap()),
        (&new, old.node.id, new.sync().await.unwrap()),
        (&oldest, old.node.id, oldest.sync_as_version(1).await.unwrap()),
    ];
    // Every agent sends the same report: a probed peer, and ownership of
    // the site prefix (when it serves one).
    for (agent, peer, s) in &mut sessions {
        let generation = s.next(WAIT).await.unwrap().expect("a snapshot");
        s.health(pb::HealthReport {
            peers: vec![pb::PeerHealth { node_id: *peer, probe_up: true, probe_rtt_ms: 1.5, ..Default::default() }],
            routes: vec![pb::RouteHealth {
                prefix: "198.18.10.0/24".into(),
                healthy: true,
                owner: true,
                owner_since_unix: 1,
                ..Default::default()
            }],
            backend: "userspace".into(),
            ..Default::default()
        })
        .await
        .unwrap();
        // A stream's messages are handled in order: once the ack is in, so is the report.
        s.ack(generation).await.unwrap();
        let node = pb::NodeRef { id: agent.node.id, name: String::new() };
        let mut acked = 0;
        for _ in 0..50 {
            acked = a.get_node(node.clone()).await.unwrap().into_inner().acked_generation;
            if acked == generation {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(acked, generation, "{}", agent.node.name);
    }

    let routes = a.list_routes(pb::Empty {}).await.unwrap().into_inner().routes;
    let owner = |id: u64| routes.iter().find(|r| r.node_id == id).map(|r| r.owner);
    assert_eq!(owner(new.node.id), Some(true), "a version-3 gateway's ownership is read");
    assert_eq!(owner(old.node.id), Some(false), "a version-2 gateway owns no site");
    let st = a.get_status(pb::GetStatusRequest {}).await.unwrap().into_inner();
    let from: Vec<&str> = st.peers.iter().map(|l| l.from_name.as_str()).collect();
    assert!(from.contains(&"gw-v2") && from.contains(&"gw-v3"), "{from:?}");
    assert!(!from.contains(&"gw-v1"), "a version-1 agent has no probe figures: {from:?}");
    let nodes = a.list_nodes(pb::ListNodesRequest {}).await.unwrap().into_inner().nodes;
    let backend = |name: &str| nodes.iter().find(|n| n.name == name).map(|n| n.backend.clone());
    assert_eq!(backend("gw-v2").as_deref(), Some("userspace"));
    assert_eq!(backend("gw-v1").as_deref(), Some(""), "version 1 reports no backend");
}

/// An agent of capability 6 gets its rules compact (each CIDR once, by
/// index); an older one gets the same rules with their CIDRs as text, in
/// snapshots and in deltas.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn older_agents_get_their_rules_as_text() {
    use mesh_client::policy::from_proto;
    let dir = tempfile::tempdir().unwrap();
    let c = control(dir.path()).await;
    let addr = c.addr.to_string();
    let mut a = admin(&c, c.bootstrap_admin_token.clone()).await;
    a.set_policy(pb::PolicyDocument { text: POLICY.into(), generation: 0 }).await.unwrap();
    let app = SimAgent::enroll(&addr, &key(&mut a, false, true, &["tag:app"], 0).await, "app", &[]).await.unwrap();
    let k = key(&mut a, true, true, &["tag:db"], 0).await;
    let (old, new) = (
        SimAgent::enroll(&addr, &k, "db-v5", &[]).await.unwrap(),
        SimAgent::enroll(&addr, &k, "db-v6", &[]).await.unwrap(),
    );
    let mut old_s = old.sync_as_version(5).await.unwrap();
    let mut new_s = new.sync().await.unwrap();
    let app_addrs: Vec<ipnet::IpNet> = [format!("{}/32", app.node.ipv4), format!("{}/128", app.node.ipv6)]
        .iter()
        .map(|s| s.parse().unwrap())
        .collect();
    for port in [5432, 5433] {
        if port != 5432 {
            let text = POLICY.replace("5432", &port.to_string());
            a.set_policy(pb::PolicyDocument { text, generation: 0 }).await.unwrap();
        }
        for (s, compact) in [(&mut old_s, false), (&mut new_s, true)] {
            // Views until the one with this port's rule.
            let mut policy = pb::CompiledPolicy::default();
            for _ in 0..10 {
                s.next(WAIT).await.unwrap().expect("a view");
                policy = s.view.as_ref().unwrap().policy.clone().unwrap_or_default();
                if policy.rules.iter().any(|r| r.port_first == port) {
                    break;
                }
            }
            if port != 5432 {
                assert_eq!(s.received.last(), Some(&false), "port {port}: the change comes in a delta");
            }
            let rules = from_proto(&policy).unwrap().rules;
            let ingress = rules.iter().find(|r| u32::from(r.ports.first) == port && r.src == app_addrs);
            assert!(ingress.is_some(), "port {port}: no rule from the app: {rules:?}");
            let text = policy.rules.iter().all(|r| !r.src.is_empty() && r.src_nets.is_empty() && r.dst_nets.is_empty());
            let indexed = policy.rules.iter().all(|r| r.src.is_empty() && r.dst.is_empty() && !r.src_nets.is_empty());
            if compact {
                assert!(indexed && !policy.nets.is_empty(), "port {port}: capability 6 gets it compact: {policy:?}");
            } else {
                assert!(text && policy.nets.is_empty(), "port {port}: capability 5 gets text: {policy:?}");
            }
        }
    }
}

/// Each gateway's site LAN addresses reach the site's other gateways, and
/// nobody else; an address outside the prefix ends the stream with an
/// error naming it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn site_lan_addresses_reach_only_the_sites_gateways() {
    let dir = tempfile::tempdir().unwrap();
    let c = control(dir.path()).await;
    let addr = c.addr.to_string();
    let mut a = admin(&c, c.bootstrap_admin_token.clone()).await;
    let policy = r#"{"tagOwners": {"tag:app": [], "tag:gw": []},
        "acls": [{"action": "accept", "src": ["tag:app"], "dst": ["198.18.20.0/24:*"]}]}"#;
    a.set_policy(pb::PolicyDocument { text: policy.into(), generation: 0 }).await.unwrap();
    let gw_key = key(&mut a, true, true, &["tag:gw"], 0).await;
    let app_key = key(&mut a, true, true, &["tag:app"], 0).await;
    let prefix = "198.18.20.0/24";
    let options = |lan: &str| pb::RouteAdvertisement {
        prefixes: vec![prefix.into()],
        options: vec![pb::RouteOptions {
            prefix: prefix.into(),
            lan_addresses: vec![lan.into()],
            ..Default::default()
        }],
    };
    let mut gws = Vec::new();
    for (name, lan) in [("gw-1", "198.18.20.1"), ("gw-2", "198.18.20.2")] {
        let gw = SimAgent::enroll(&addr, &gw_key, name, &[prefix]).await.unwrap();
        let s = gw.sync().await.unwrap();
        s.advertise_with(options(lan)).await.unwrap();
        a.approve_route(pb::RouteRef { node_id: gw.node.id, prefix: prefix.into() }).await.unwrap();
        gws.push((gw, s));
    }
    let app = SimAgent::enroll(&addr, &app_key, "app-1", &[]).await.unwrap();
    let mut app_s = app.sync().await.unwrap();
    let (ids, lans) = (vec![gws[0].0.node.id, gws[1].0.node.id], vec!["198.18.20.1", "198.18.20.2"]);
    let route = |v: &Option<pb::NodeView>| v.as_ref()?.routes.iter().find(|r| r.prefix == prefix).cloned();
    let mut seen = None;
    for _ in 0..50 {
        gws[0].1.next(Duration::from_millis(100)).await.unwrap();
        seen = route(&gws[0].1.view);
        if seen.as_ref().is_some_and(|r| r.lan.len() == 2) {
            break;
        }
    }
    let seen = seen.expect("gw-1 gets the route");
    let got: Vec<(u64, Vec<String>)> = seen.lan.iter().map(|g| (g.node_id, g.addresses.clone())).collect();
    let want: Vec<(u64, Vec<String>)> = ids.iter().zip(&lans).map(|(i, l)| (*i, vec![(*l).to_owned()])).collect();
    assert_eq!(got, want, "both gateways' LAN addresses, in control's order");
    let mut app_route = None;
    for _ in 0..50 {
        app_s.next(Duration::from_millis(100)).await.unwrap();
        app_route = route(&app_s.view);
        if app_route.as_ref().is_some_and(|r| r.gateways.len() == 2) {
            break;
        }
    }
    let app_route = app_route.expect("app-1 routes the prefix");
    assert_eq!(app_route.gateways.len(), 2);
    assert!(app_route.lan.is_empty(), "app-1 is no gateway of the site: {app_route:?}");
    let listed = a.list_routes(pb::Empty {}).await.unwrap().into_inner().routes;
    assert_eq!(listed.iter().find(|r| r.node_name == "gw-2").unwrap().lan_addresses, ["198.18.20.2"]);

    // A LAN address outside the prefix: refused, named.
    let (_, s) = &mut gws[1];
    s.advertise_with(options("10.0.0.2")).await.unwrap();
    let mut err = None;
    for _ in 0..20 {
        if let Err(e) = s.next(Duration::from_millis(250)).await {
            err = Some(e.to_string());
            break;
        }
    }
    let err = err.expect("the stream ends");
    assert!(err.contains("LAN address 10.0.0.2"), "{err}");
}

/// Capability 7 from control's side: the configured relays reach every
/// snapshot; a relay ticket names the node's WireGuard key and verifies
/// with the key `GetStatus` shows, and only an approved node with a
/// credential gets one; endpoint candidates (an `ip:port` and the home
/// relay) replace the node's endpoints in its peers' views, without the
/// relay for an older peer, and a malformed one ends the stream, named;
/// path changes in health reports show in the status and the audit log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relays_tickets_and_endpoint_candidates() {
    use mesh_relay::ticket;
    let dir = tempfile::tempdir().unwrap();
    let pin = "0f".repeat(32);
    let relays = vec![
        mesh_control::relay::RelayEntry {
            region: "fsn".into(),
            address: "relay-fsn.example.net:443".into(),
            server_name: None,
            cert_sha256: pin.clone(),
            reflector: Some("192.0.2.50:3478".into()),
        },
        mesh_control::relay::RelayEntry {
            region: "nbg".into(),
            address: "192.0.2.60:443".into(),
            server_name: Some("relay-nbg.example.net".into()),
            cert_sha256: pin,
            reflector: None,
        },
    ];
    let config =
        mesh_control::config::Config { relays: relays.clone(), ..mesh_control::sim::loopback_config(dir.path()) };
    let c = start_with_clock(&config, Arc::new(SystemClock)).await.expect("control starts");
    let addr = c.addr.to_string();
    let mut a = admin(&c, c.bootstrap_admin_token.clone()).await;
    a.set_policy(pb::PolicyDocument { text: POLICY.into(), generation: 0 }).await.unwrap();
    let app = SimAgent::enroll(&addr, &key(&mut a, false, true, &["tag:app"], 0).await, "app", &[]).await.unwrap();
    let db_key = key(&mut a, true, true, &["tag:db"], 0).await;
    let db = SimAgent::enroll(&addr, &db_key, "db", &[]).await.unwrap();
    let db_v6 = SimAgent::enroll(&addr, &db_key, "db-v6", &[]).await.unwrap();
    let pending =
        SimAgent::enroll(&addr, &key(&mut a, false, false, &["tag:db"], 0).await, "db-pending", &[]).await.unwrap();

    // (a) Every snapshot lists the relays, in the configured order.
    let mut app_s = app.sync().await.unwrap();
    let mut db_s = db.sync().await.unwrap();
    let mut old_s = db_v6.sync_as_version(6).await.unwrap();
    for s in [&mut app_s, &mut db_s, &mut old_s] {
        s.next(WAIT).await.unwrap().expect("a snapshot");
        assert_eq!(s.view.as_ref().unwrap().relays, mesh_control::relay::to_proto(&relays));
    }

    // (b) Tickets.
    let status = a.get_status(pb::GetStatusRequest {}).await.unwrap().into_inner();
    let trusted = [ticket::key_from_b64(&status.relay_ticket_key).expect("GetStatus shows the ticket key")];
    let issued = app.client().relay_ticket(pb::RelayTicketRequest {}).await.unwrap().into_inner();
    let now = SystemClock.now();
    let t = ticket::verify_b64(&issued.ticket, &trusted, now).expect("the ticket verifies with the status key");
    assert_eq!(t.public_key.as_slice(), app.node.wireguard_public_key.as_slice(), "it names the node's key");
    assert_eq!((t.node_id, t.expires_unix), (app.node.id, issued.expires_unix));
    assert!((now + 11 * 3600..=now + 12 * 3600 + 5).contains(&t.expires_unix), "about 12 h: {}", t.expires_unix);
    let e = pending.client().relay_ticket(pb::RelayTicketRequest {}).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "a pending node gets none: {e:?}");
    let mut anonymous = mesh_proto::v1::agent_service_client::AgentServiceClient::new(app.channel.clone());
    let e = anonymous.relay_ticket(pb::RelayTicketRequest {}).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    let forged = SimAgent { token: "not-a-credential".into(), ..app.clone() };
    assert_eq!(
        forged.client().relay_ticket(pb::RelayTicketRequest {}).await.unwrap_err().code(),
        Code::Unauthenticated
    );
    {
        let other = tempfile::tempdir().unwrap();
        let bare =
            start_with_clock(&mesh_control::sim::loopback_config(other.path()), Arc::new(SystemClock)).await.unwrap();
        let mut ba = admin(&bare, bare.bootstrap_admin_token.clone()).await;
        let n =
            SimAgent::enroll(&bare.addr.to_string(), &key(&mut ba, false, true, &[], 0).await, "n", &[]).await.unwrap();
        let e = n.client().relay_ticket(pb::RelayTicketRequest {}).await.unwrap_err();
        assert_eq!((e.code(), e.message()), (Code::FailedPrecondition, "no relays configured"));
    }

    // (c) Candidates reach the peers: all of them for a current peer, the
    // `ip:port` ones for a capability-6 peer.
    app_s.candidates(&["198.51.100.7:41641", "relay:fsn"]).await.unwrap();
    let app_endpoints = |s: &mesh_control::sim::SyncSession| {
        let v = s.view.as_ref().unwrap();
        v.peers.iter().find(|p| p.node_id == app.node.id).map(|p| p.endpoints.clone()).unwrap_or_default()
    };
    for (s, want) in [(&mut db_s, vec!["198.51.100.7:41641", "relay:fsn"]), (&mut old_s, vec!["198.51.100.7:41641"])] {
        for _ in 0..50 {
            if app_endpoints(s) == want {
                break;
            }
            s.next(Duration::from_millis(100)).await.unwrap();
        }
        assert_eq!(app_endpoints(s), want);
    }
    let listed = a.get_node(pb::NodeRef { id: app.node.id, name: String::new() }).await.unwrap().into_inner();
    assert_eq!(listed.endpoints, ["198.51.100.7:41641", "relay:fsn"]);

    // Path changes: in the status at once, audited once per change.
    let report = |path: &str, region: &str, switches| pb::HealthReport {
        peers: vec![pb::PeerHealth {
            node_id: db.node.id,
            probe_up: true,
            path: path.into(),
            relay_region: region.into(),
            path_switches: switches,
            ..Default::default()
        }],
        ..Default::default()
    };
    db_s.health(report("direct", "", 0)).await.unwrap();
    db_s.health(report("direct", "", 0)).await.unwrap();
    app_s.health(report("direct", "", 0)).await.unwrap();
    app_s.health(report("relay", "fsn", 1)).await.unwrap();
    let mut entries = Vec::new();
    for _ in 0..50 {
        let req = pb::ListAuditRequest { action_prefix: "peer.path".into(), ..Default::default() };
        entries = a.list_audit(req).await.unwrap().into_inner().entries;
        if !entries.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(entries.len(), 1, "{entries:?}");
    assert_eq!(entries[0].subject, format!("node/{}", app.node.id));
    let after: serde_json::Value = serde_json::from_str(&entries[0].after).unwrap();
    assert_eq!(after["detail"], format!("{} -> {}: direct -> relay (fsn)", app.node.name, db.node.name));
    let status = a.get_status(pb::GetStatusRequest {}).await.unwrap().into_inner();
    let link = status.peers.iter().find(|l| l.from_node == app.node.id).and_then(|l| l.health.clone()).unwrap();
    assert_eq!((link.path.as_str(), link.relay_region.as_str(), link.path_switches), ("relay", "fsn", 1));

    // A malformed candidate ends the stream with an error naming it.
    app_s.candidates(&["198.51.100.7:41641", "relay:FSN"]).await.unwrap();
    let mut err = None;
    for _ in 0..20 {
        if let Err(e) = app_s.next(Duration::from_millis(250)).await {
            err = Some(e.to_string());
            break;
        }
    }
    let err = err.expect("the stream ends");
    assert!(err.contains("relay:FSN") && err.contains("a relay region is"), "{err}");
}
