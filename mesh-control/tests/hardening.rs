//! Control under hostile or careless input (issue #14): a policy built to
//! crash the parser, a flood of unauthenticated enrollments, an agent that
//! opens too many streams, outlives its key or flaps its health, and
//! malformed endpoints and failover reports. Each test drives a real
//! control over TLS on loopback.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use mesh_client::bearer::{Authed, Bearer};
use mesh_client::channel::{Trust, connect};
use mesh_control::config::Config;
use mesh_control::engine::{Clock as _, ManualClock};
use mesh_control::run::{Running, start, start_with_clock};
use mesh_control::sim::{SimAgent, fake_public_key, loopback_config};
use mesh_proto::v1 as pb;
use mesh_proto::v1::admin_service_client::AdminServiceClient;
use mesh_proto::v1::agent_service_client::AgentServiceClient;
use tonic::Code;

type Admin = AdminServiceClient<Authed>;

async fn admin(c: &Running) -> Admin {
    let ch = connect(&c.addr.to_string(), &Trust::CaPem(c.ca_pem.clone())).await.unwrap();
    AdminServiceClient::with_interceptor(ch, Bearer(c.bootstrap_admin_token.clone()))
}

async fn key(a: &mut Admin, tags: &[&str]) -> String {
    a.create_enrollment_key(pb::CreateEnrollmentKeyRequest {
        reusable: true,
        preapproved: true,
        tags: tags.iter().map(|t| (*t).to_owned()).collect(),
        ..Default::default()
    })
    .await
    .unwrap()
    .into_inner()
    .secret
}

const POLICY: &str = r#"{
  "tagOwners": {"tag:gw": []},
  "autoApprovers": {"routes": {"10.20.0.0/16": ["tag:gw"]}},
  "acls": [{"action": "accept", "src": ["tag:gw"], "dst": ["tag:gw:*"]}],
}"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_policies_are_refused_and_control_stays_up() {
    let dir = tempfile::tempdir().unwrap();
    let c = start(&loopback_config(dir.path())).await.unwrap();
    let mut a = admin(&c).await;
    // 200 KB of '[' overflowed a runtime worker's stack and aborted control.
    let deep = "[".repeat(200_000);
    let v = a.validate_policy(pb::PolicyDocument { text: deep.clone(), generation: 0 }).await.unwrap().into_inner();
    assert!(!v.ok);
    assert_eq!(v.problems[0].line, 1);
    assert!(v.problems[0].message.contains("nested deeper than 64"), "{:?}", v.problems);
    for r in [
        a.diff_policy(pb::PolicyDocument { text: deep.clone(), generation: 0 }).await.map(|_| ()),
        a.set_policy(pb::PolicyDocument { text: deep, generation: 0 }).await.map(|_| ()),
        a.set_policy(pb::PolicyDocument { text: " ".repeat(2 << 20), generation: 0 }).await.map(|_| ()),
    ] {
        let e = r.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    }
    // Nothing changed, and control still answers.
    let p = a.get_policy(pb::Empty {}).await.unwrap().into_inner();
    assert!(!p.text.starts_with('['));
    a.set_policy(pb::PolicyDocument { text: POLICY.into(), generation: 0 }).await.unwrap();
}

/// A wrong but well-formed enrollment key for control `c`.
fn bad_key(c: &Running, i: u64) -> String {
    mesh_client::enrollment::EnrollmentKeyText {
        id: format!("flood{i}"),
        secret: "x".repeat(32),
        ca_pin: Some(c.ca_pin),
    }
    .to_text()
}

/// An enrollment with a wrong but well-formed key.
fn bad_enrollment(c: &Running, i: u64) -> pb::EnrollRequest {
    pb::EnrollRequest {
        enrollment_key: bad_key(c, i),
        wireguard_public_key: fake_public_key(),
        hostname: "flood".into(),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_bad_enrollments_stalls_neither_renewals_nor_admin_writes() {
    let dir = tempfile::tempdir().unwrap();
    // Rate limits as loose as the simulated agents need: every flood request
    // reaches the key check, which must not take the database from others.
    let c = Arc::new(start(&loopback_config(dir.path())).await.unwrap());
    let mut a = admin(&c).await;
    a.set_policy(pb::PolicyDocument { text: POLICY.into(), generation: 0 }).await.unwrap();
    let k = key(&mut a, &["tag:gw"]).await;
    let mut agent = SimAgent::enroll(&c.addr.to_string(), &k, "gw", &[]).await.unwrap();

    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let mut flood = Vec::new();
    for ch in 0..32 {
        let channel = connect(&c.addr.to_string(), &Trust::Pin(c.ca_pin)).await.unwrap();
        for t in 0..8 {
            let (stop, sent, c, channel) = (stop.clone(), sent.clone(), c.clone(), channel.clone());
            flood.push(tokio::spawn(async move {
                let mut client = AgentServiceClient::new(channel);
                let mut i = ch * 1_000_000 + t * 100_000;
                while !stop.load(Ordering::Relaxed) {
                    i += 1;
                    let r = client.enroll(bad_enrollment(&c, i)).await;
                    let code = r.map(|_| Code::Ok).unwrap_or_else(|s| s.code());
                    assert!(matches!(code, Code::Unauthenticated | Code::ResourceExhausted), "{code:?}");
                    sent.fetch_add(1, Ordering::Relaxed);
                }
            }));
        }
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let began = Instant::now();
    let before = sent.load(Ordering::Relaxed);
    let writes_before = c.engine.store().write_transactions();
    let mut worst = Duration::ZERO;
    for round in 0..5 {
        let t = Instant::now();
        let r = agent.client().renew(pb::RenewRequest::default()).await.expect("renewal during the flood").into_inner();
        agent.token = r.credential.unwrap().token;
        let renew = t.elapsed();
        let t = Instant::now();
        let text = format!("// round {round}\n{POLICY}");
        a.set_policy(pb::PolicyDocument { text, generation: 0 }).await.expect("admin write during the flood");
        let write = t.elapsed();
        eprintln!("round {round}: renew {renew:?}, set_policy {write:?}");
        worst = worst.max(renew).max(write);
    }
    let rate = (sent.load(Ordering::Relaxed) - before) as f64 / began.elapsed().as_secs_f64();
    let writes = c.engine.store().write_transactions() - writes_before;
    stop.store(true, Ordering::Relaxed);
    for f in flood {
        f.await.unwrap();
    }
    eprintln!("flood: {rate:.0} bad enrollments/s; slowest renewal or admin write {worst:?}");
    assert!(rate > 100.0, "the flood was not a flood: {rate:.0}/s");
    // Bad keys never open a write transaction (which holds the whole SQLite
    // database): only the 5 renewals and 5 policy changes (and the presence
    // and health writes they cause) did.
    eprintln!("write transactions during the flood: {writes}");
    assert!(writes < 40, "{writes} write transactions: bad enrollments open them");
    assert!(worst < Duration::from_secs(1), "a renewal or admin write took {worst:?} during the flood");
    // The renewed credential still works: the flood took nothing from it.
    agent.sync().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enrollment_is_rate_limited_per_source_by_default() {
    let dir = tempfile::tempdir().unwrap();
    let config = Config { limits: Default::default(), ..loopback_config(dir.path()) };
    let c = start(&config).await.unwrap();
    let mut a = admin(&c).await;
    a.set_policy(pb::PolicyDocument { text: POLICY.into(), generation: 0 }).await.unwrap();
    let k = key(&mut a, &["tag:gw"]).await;
    let channel = connect(&c.addr.to_string(), &Trust::Pin(c.ca_pin)).await.unwrap();
    let mut client = AgentServiceClient::new(channel.clone());
    let mut codes = Vec::new();
    for i in 0..40 {
        let r = client.enroll(bad_enrollment(&c, i)).await;
        codes.push(r.map(|_| Code::Ok).unwrap_or_else(|s| s.code()));
    }
    let limited = codes.iter().filter(|c| **c == Code::ResourceExhausted).count();
    assert!(limited >= 15, "{codes:?}");
    assert!(codes.iter().all(|c| matches!(c, Code::Unauthenticated | Code::ResourceExhausted)));
    // The refusals are counted on /metrics.
    let text = mesh_control::sim::http_get(c.metrics_addr.unwrap(), "/metrics").await;
    assert!(text.contains("mesh_control_limited_total{limit=\"enroll_source\"}"), "{text}");
    // A real key from the same address works again once the bucket refills.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    SimAgent::enroll_on(channel, &k, "gw", &[]).await.expect("enrollment after the limit");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoints_and_failover_reports_are_checked() {
    let dir = tempfile::tempdir().unwrap();
    let c = start(&loopback_config(dir.path())).await.unwrap();
    let mut a = admin(&c).await;
    a.set_policy(pb::PolicyDocument { text: POLICY.into(), generation: 0 }).await.unwrap();
    let k = key(&mut a, &["tag:gw"]).await;
    let channel = connect(&c.addr.to_string(), &Trust::Pin(c.ca_pin)).await.unwrap();
    let mut client = AgentServiceClient::new(channel.clone());
    for (endpoints, why) in [
        ((0..17).map(|i| format!("192.0.2.{i}:51820")).collect::<Vec<_>>(), "at most 16"),
        (vec!["relay:fsn".into(), "relay:nbg".into()], "only one home relay"),
        (vec!["gw.example:51820".into()], "not IP:port"),
        (vec!["0.0.0.0:51820".into()], "unicast"),
        (vec!["192.0.2.1:0".into()], "unicast"),
    ] {
        let e = client
            .enroll(pb::EnrollRequest {
                enrollment_key: k.clone(),
                wireguard_public_key: fake_public_key(),
                hostname: "gw".into(),
                endpoints,
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument);
        assert!(e.message().contains(why), "{e:?}");
    }
    // Key lifetimes out of range are refused, not overflowed.
    for secs in [i64::MAX, -1] {
        let e = a
            .create_enrollment_key(pb::CreateEnrollmentKeyRequest { expires_in_seconds: secs, ..Default::default() })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    }

    let gw = SimAgent::enroll_on(channel, &k, "gw", &["10.20.0.0/16"]).await.unwrap();
    let s = gw.sync().await.unwrap();
    let report = |from, to| pb::FailoverReport {
        prefix: "10.20.0.0/16".into(),
        from_node: from,
        to_node: to,
        reason: "test".into(),
        at_unix_ms: 0,
    };
    s.failover(report(gw.node.id, 999_999)).await.unwrap();
    s.failover(pb::FailoverReport { prefix: "10.99.0.0/16".into(), ..report(gw.node.id, 0) }).await.unwrap();
    s.failover(report(999_999, gw.node.id)).await.unwrap();
    s.failover(report(gw.node.id, 0)).await.unwrap();
    let audited = || async {
        let mut a = admin(&c).await;
        let list =
            a.list_audit(pb::ListAuditRequest { action_prefix: "route.failover".into(), ..Default::default() }).await;
        list.unwrap().into_inner().entries.len()
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    while audited().await == 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Only the report that names real nodes and a real route is audited.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(audited().await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_are_capped_per_node_and_end_when_the_key_expires() {
    let dir = tempfile::tempdir().unwrap();
    let c = start(&loopback_config(dir.path())).await.unwrap();
    let mut a = admin(&c).await;
    a.set_policy(pb::PolicyDocument { text: POLICY.into(), generation: 0 }).await.unwrap();
    let k = key(&mut a, &["tag:gw"]).await;
    let gw = SimAgent::enroll(&c.addr.to_string(), &k, "gw", &[]).await.unwrap();
    let cap = c.engine.limits.config().streams_per_node;
    let mut streams = Vec::new();
    for _ in 0..cap {
        let mut s = gw.sync().await.unwrap();
        s.next(Duration::from_secs(5)).await.unwrap().expect("a view");
        streams.push(s);
    }
    let e = gw.sync().await.map(|_| ()).unwrap_err();
    assert!(e.to_string().contains("maximum number of sync streams"), "{e}");
    // One closes: one more may open.
    drop(streams.pop());
    let deadline = Instant::now() + Duration::from_secs(5);
    let extra = loop {
        match gw.sync().await {
            Ok(s) => break s,
            Err(_) if Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(50)).await,
            Err(e) => panic!("no stream after one closed: {e}"),
        }
    };
    streams.push(extra);
    // The admin expires the key: every open stream ends, unauthenticated.
    a.expire_node_key(pb::NodeRef { id: gw.node.id, ..Default::default() }).await.unwrap();
    for s in &mut streams {
        let end = loop {
            match s.next(Duration::from_secs(5)).await {
                Ok(Some(_)) => {}
                other => break other,
            }
        };
        let e = end.expect_err("the stream ends with an error");
        assert!(e.to_string().contains("unauthenticated"), "{e}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flapping_gateway_costs_a_bounded_number_of_recomputes() {
    let dir = tempfile::tempdir().unwrap();
    let c = start(&loopback_config(dir.path())).await.unwrap();
    let mut a = admin(&c).await;
    a.set_policy(pb::PolicyDocument { text: POLICY.into(), generation: 0 }).await.unwrap();
    let k = key(&mut a, &["tag:gw"]).await;
    let gw = SimAgent::enroll(&c.addr.to_string(), &k, "gw", &["10.20.0.0/16"]).await.unwrap();
    let s = gw.sync().await.unwrap();
    let health = |healthy| pb::HealthReport {
        routes: vec![pb::RouteHealth { prefix: "10.20.0.0/16".into(), healthy, ..Default::default() }],
        ..Default::default()
    };
    s.health(health(true)).await.unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let refreshes = || c.engine.metrics.refreshes.load(Ordering::Relaxed);
    let before = refreshes();
    let began = Instant::now();
    // 400 flips in about 2 s, ending unhealthy.
    for i in 0..400 {
        s.health(health(i % 2 == 0)).await.unwrap();
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    s.health(health(false)).await.unwrap();
    let took = began.elapsed();
    // The last report is applied within one interval.
    let deadline = Instant::now() + Duration::from_secs(3);
    let healthy = || {
        let snap = c.engine.snapshot();
        snap.routes.iter().find(|r| r.node_id == gw.node.id).map(|r| r.healthy)
    };
    while healthy() != Some(false) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(healthy(), Some(false), "the last health report was applied");
    let spent = refreshes() - before;
    let interval = c.engine.limits.config().report_interval();
    // One per interval, plus the burst and the first and last reports.
    let bound = (took.as_secs_f64() / interval.as_secs_f64()).ceil() as u64 + 4 + 3;
    eprintln!("401 health reports in {took:?}: {spent} recomputes (bound {bound})");
    assert!(spent <= bound, "{spent} recomputes for 401 reports in {took:?}");
}

/// Renews `agent`'s credential with the token it holds; the new token.
async fn renew(agent: &SimAgent) -> Result<String, tonic::Status> {
    let r = agent.client().renew(pb::RenewRequest::default()).await?.into_inner();
    Ok(r.credential.unwrap().token)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_renewal_answer_does_not_lock_the_agent_out() {
    let dir = tempfile::tempdir().unwrap();
    let c = start(&loopback_config(dir.path())).await.unwrap();
    let mut a = admin(&c).await;
    a.set_policy(pb::PolicyDocument { text: POLICY.into(), generation: 0 }).await.unwrap();
    let k = key(&mut a, &["tag:gw"]).await;
    let first = SimAgent::enroll(&c.addr.to_string(), &k, "gw", &[]).await.unwrap();
    let expiry = first.node.key_expiry_unix;
    // The answer to this renewal is "lost": the agent keeps its old token.
    let lost = renew(&first).await.unwrap();
    first.sync().await.expect("the old token still works");
    // It renews again with the old token, and this time gets the answer.
    let newer = renew(&first).await.expect("renewal with the old token");
    let renewed = SimAgent { token: newer, ..first.clone() };
    renewed.sync().await.expect("the new token works");
    // Its first use retired the old one; the lost one was never valid after.
    for token in [first.token.clone(), lost] {
        let e = SimAgent { token, ..first.clone() }.sync().await.map(|_| ()).unwrap_err();
        assert!(e.to_string().contains("unauthenticated"), "{e}");
    }
    // Renewing rotates the credential, never the key's expiry.
    let n = a.get_node(pb::NodeRef { id: first.node.id, ..Default::default() }).await.unwrap().into_inner();
    assert_eq!(n.key_expiry_unix, expiry);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_key_needs_an_admin_or_an_enrollment_key() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::at_wall_clock());
    let c = start_with_clock(&loopback_config(dir.path()), clock.clone()).await.unwrap();
    let mut a = admin(&c).await;
    a.set_policy(pb::PolicyDocument { text: POLICY.into(), generation: 0 }).await.unwrap();
    let k = key(&mut a, &["tag:gw"]).await;
    let gw = SimAgent::enroll(&c.addr.to_string(), &k, "gw", &[]).await.unwrap();
    let lifetime = gw.node.key_expiry_unix - clock.now();
    assert!(lifetime >= 30 * 86_400, "{lifetime}");
    // The bootstrap token expires with the months this test skips.
    let long = a
        .create_admin_token(pb::CreateAdminTokenRequest { expires_in_seconds: 700 * 86_400, ..Default::default() })
        .await
        .unwrap()
        .into_inner()
        .secret;
    let ch = connect(&c.addr.to_string(), &Trust::CaPem(c.ca_pem.clone())).await.unwrap();
    let mut a = AdminServiceClient::with_interceptor(ch, Bearer(Some(long)));
    // A renewal just before expiry does not extend the key.
    clock.advance(lifetime - 60);
    let gw = SimAgent { token: renew(&gw).await.unwrap(), ..gw };
    clock.advance(61);
    let e = renew(&gw).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    // An admin extends it: the same credential works again.
    a.extend_node_key(pb::ExtendNodeKeyRequest {
        node: Some(pb::NodeRef { id: gw.node.id, ..Default::default() }),
        days: 7,
    })
    .await
    .unwrap();
    let gw = SimAgent { token: renew(&gw).await.expect("renewal after the admin's extension"), ..gw };
    // Expired again, the node re-authenticates with an enrollment key and
    // keeps its identity; a wrong key or a stranger's credential do not.
    clock.advance(8 * 86_400);
    // The first key expired long ago: the operator hands out a new one.
    let expired_key = k;
    let k = key(&mut a, &["tag:gw"]).await;
    let mut client = AgentServiceClient::new(gw.channel.clone());
    let reauth = |key: String, previous: String| pb::EnrollRequest {
        enrollment_key: key,
        wireguard_public_key: fake_public_key(),
        hostname: "gw".into(),
        previous_credential: previous,
        ..Default::default()
    };
    for bad in [bad_key(&c, 1), expired_key] {
        let e = client.enroll(reauth(bad, gw.token.clone())).await.unwrap_err();
        assert_eq!(e.code(), Code::Unauthenticated);
    }
    let e = client.enroll(reauth(k.clone(), "mnc1.stranger".into())).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    let r = client.enroll(reauth(k.clone(), gw.token.clone())).await.expect("re-authentication").into_inner();
    let node = r.node.unwrap();
    assert_eq!((node.id, node.name.as_str()), (gw.node.id, gw.node.name.as_str()));
    assert!(node.key_expiry_unix >= clock.now() + lifetime - 5);
    let again = SimAgent { token: r.credential.unwrap().token, node, ..gw.clone() };
    again.sync().await.expect("the re-authenticated node syncs");
    let nodes = a.list_nodes(pb::ListNodesRequest {}).await.unwrap().into_inner().nodes;
    assert_eq!(nodes.len(), 1, "no second node");
    let audit = a.list_audit(pb::ListAuditRequest { action_prefix: "node.".into(), ..Default::default() }).await;
    let actions: Vec<String> = audit.unwrap().into_inner().entries.into_iter().map(|e| e.action).collect();
    for want in ["node.extend", "node.reauth"] {
        assert!(actions.iter().any(|a| a == want), "{want} in {actions:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_tokens_expire_and_are_listed_and_revoked() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::at_wall_clock());
    let c = start_with_clock(&loopback_config(dir.path()), clock.clone()).await.unwrap();
    let mut a = admin(&c).await;
    let ch = connect(&c.addr.to_string(), &Trust::CaPem(c.ca_pem.clone())).await.unwrap();
    let with = |t: String| AdminServiceClient::with_interceptor(ch.clone(), Bearer(Some(t)));
    let short = a
        .create_admin_token(pb::CreateAdminTokenRequest { description: "ci".into(), expires_in_seconds: 3600 })
        .await
        .unwrap()
        .into_inner();
    let long = a
        .create_admin_token(pb::CreateAdminTokenRequest { description: "ops".into(), expires_in_seconds: 0 })
        .await
        .unwrap()
        .into_inner();
    for secs in [-5, i64::MAX, 3 * 365 * 86_400] {
        let e = a
            .create_admin_token(pb::CreateAdminTokenRequest { expires_in_seconds: secs, ..Default::default() })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{secs}: {e:?}");
    }
    with(short.secret.clone()).get_policy(pb::Empty {}).await.expect("a fresh token works");
    let list = a.list_admin_tokens(pb::Empty {}).await.unwrap().into_inner().tokens;
    let mut names: Vec<&str> = list.iter().map(|t| t.description.as_str()).collect();
    names.sort_unstable();
    assert_eq!(names, ["bootstrap", "ci", "ops"]);
    assert!(list.iter().all(|t| t.expires_unix > 0));
    assert!(!format!("{list:?}").contains(&short.secret), "secrets are never listed");
    clock.advance(3601);
    let e = with(short.secret).get_policy(pb::Empty {}).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "expired");
    let id = long.token.unwrap().id;
    a.revoke_admin_token(pb::AdminTokenRef { id: id.clone() }).await.unwrap();
    let e = with(long.secret).get_policy(pb::Empty {}).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "revoked");
    let audit = a.list_audit(pb::ListAuditRequest { action_prefix: "token.".into(), ..Default::default() }).await;
    let actions: Vec<String> = audit.unwrap().into_inner().entries.into_iter().map(|e| e.action).collect();
    assert_eq!(actions.iter().filter(|a| *a == "token.create").count(), 3, "{actions:?}");
    assert_eq!(actions.iter().filter(|a| *a == "token.revoke").count(), 1, "{actions:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removing_an_auto_approver_or_a_tag_withdraws_the_routes_it_approved() {
    let dir = tempfile::tempdir().unwrap();
    let c = start(&loopback_config(dir.path())).await.unwrap();
    let mut a = admin(&c).await;
    let with_app = POLICY.replace(r#""tagOwners": {"tag:gw": []}"#, r#""tagOwners": {"tag:gw": [], "tag:app": []}"#);
    a.set_policy(pb::PolicyDocument { text: with_app.clone(), generation: 0 }).await.unwrap();
    let k = key(&mut a, &["tag:gw"]).await;
    let gw = SimAgent::enroll(&c.addr.to_string(), &k, "gw", &["10.20.0.0/16", "10.30.0.0/16"]).await.unwrap();
    let id = gw.node.id;
    // 10.30/16 is approved by hand; autoApprovers approved 10.20/16.
    a.approve_route(pb::RouteRef { node_id: id, prefix: "10.30.0.0/16".into() }).await.unwrap();
    let approved = |c: &Running| {
        let snap = c.engine.snapshot();
        let mut v: Vec<String> =
            snap.routes.iter().filter(|r| r.node_id == id && r.approved).map(|r| r.prefix.to_string()).collect();
        v.sort();
        v
    };
    assert_eq!(approved(&c), ["10.20.0.0/16", "10.30.0.0/16"]);
    // The node loses the tag the autoApprovers entry names.
    a.set_node_tags(pb::SetNodeTagsRequest {
        node: Some(pb::NodeRef { id, ..Default::default() }),
        tags: vec!["tag:app".into()],
    })
    .await
    .unwrap();
    assert_eq!(approved(&c), ["10.30.0.0/16"], "the hand-approved route stays");
    // It gets the tag back: autoApprovers approve again.
    a.set_node_tags(pb::SetNodeTagsRequest {
        node: Some(pb::NodeRef { id, ..Default::default() }),
        tags: vec!["tag:gw".into()],
    })
    .await
    .unwrap();
    assert_eq!(approved(&c), ["10.20.0.0/16", "10.30.0.0/16"]);
    // The autoApprovers entry goes away.
    let without = with_app.replace(r#""autoApprovers": {"routes": {"10.20.0.0/16": ["tag:gw"]}},"#, "");
    assert_ne!(without, with_app);
    a.set_policy(pb::PolicyDocument { text: without, generation: 0 }).await.unwrap();
    assert_eq!(approved(&c), ["10.30.0.0/16"]);
    let audit = a.list_audit(pb::ListAuditRequest { action_prefix: "route.auto".into(), ..Default::default() }).await;
    let actions: Vec<String> = audit.unwrap().into_inner().entries.into_iter().map(|e| e.action).collect();
    assert_eq!(actions.iter().filter(|a| *a == "route.auto_approval_revoked").count(), 2, "{actions:?}");
}
