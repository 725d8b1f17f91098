//! The applier against in-memory fakes: convergence, repair after tampering,
//! fail-closed ordering, and a failed step reported as a failure (never as a
//! success) and repaired by the next run.

use std::sync::{Arc, Mutex};

use mesh_agent::{
    keys::SecretKey,
    reconcile::{
        Applier, ApplyError, Local, PolicyDigest, Step,
        fake::{FakeEnforcer, FakeNet, FakeState, FakeWg, Shared},
    },
    view::{DEFAULT_MTU, NodeView, PeerView},
};
use mesh_policy::{CompiledPolicy, PortRange, Proto, Rule};

fn view() -> NodeView {
    let peer = |ips: &[&str]| PeerView {
        public_key: SecretKey::generate().public_key(),
        name: None,
        endpoint: Some("192.0.2.2:51820".parse().unwrap()),
        pin_endpoint: false,
        allowed_ips: ips.iter().map(|s| s.parse().unwrap()).collect(),
        persistent_keepalive: Some(25),
        preshared_key: Some(SecretKey::generate()),
    };
    NodeView {
        generation: 7,
        epoch: 0,
        public_key: None,
        addresses: vec!["100.64.0.1/32".parse().unwrap()],
        mtu: DEFAULT_MTU,
        forwarding: true,
        peers: vec![peer(&["100.64.0.2/32", "198.18.20.0/24"]), peer(&["100.64.0.3/32", "198.18.30.0/24"])],
        routes: vec!["198.18.20.0/24".parse().unwrap(), "198.18.30.0/24".parse().unwrap()],
        policy: CompiledPolicy {
            generation: 1,
            rules: vec![Rule {
                id: 0,
                src: vec!["198.18.0.0/15".parse().unwrap()],
                dst: vec!["198.18.0.0/15".parse().unwrap()],
                proto: Proto::Tcp,
                ports: PortRange::single(443),
            }],
        },
    }
}

fn applier(state: &Shared, enforce: bool) -> Applier {
    let local = Local {
        private_key: SecretKey::generate(),
        listen_port: Some(51820),
        fwmark: None,
        enforce_policy: true,
        routing: Default::default(),
        control_addrs: vec![],
    };
    let enforcer = enforce.then(|| Box::new(FakeEnforcer { state: state.clone() }) as _);
    Applier::new(
        local,
        Box::new(FakeWg { state: state.clone(), ifname: "wgtest".into() }),
        Box::new(FakeNet { state: state.clone() }),
        enforcer,
    )
}

fn state() -> Shared {
    Arc::new(Mutex::new(FakeState::default()))
}

#[test]
fn converges_and_repeats_as_a_no_op() {
    let s = state();
    let mut a = applier(&s, true);
    let v = view();
    let first = a.reconcile(&v).unwrap();
    assert_eq!(first.changes.peers_added, 2);
    assert_eq!(first.generation, 7);
    let log_len = s.lock().unwrap().log.len();
    let again = a.reconcile(&v).unwrap();
    assert!(again.changes.is_empty(), "second run changed {:?}", again.changes);
    assert_eq!(s.lock().unwrap().log.len(), log_len, "a no-op run must not touch anything");
    assert_eq!(s.lock().unwrap().policy, Some(PolicyDigest::of(&v.policy)));
}

#[test]
fn policy_is_in_force_before_peers_and_up() {
    let s = state();
    applier(&s, true).reconcile(&view()).unwrap();
    let log = s.lock().unwrap().log.clone();
    let at = |op| log.iter().position(|o| *o == op).unwrap_or_else(|| panic!("{op} not in {log:?}"));
    assert!(at("enforce") < at("wg.apply"), "{log:?}");
    assert!(at("enforce") < at("set_up"), "{log:?}");
    assert!(at("wg.apply") < at("replace_route"), "{log:?}");
}

#[test]
fn failed_policy_leaves_the_new_interface_closed() {
    let s = state();
    s.lock().unwrap().fail.insert("enforce");
    let err = applier(&s, true).reconcile(&view()).unwrap_err();
    assert!(matches!(err, ApplyError::Step { step: Step::Policy, .. }), "{err}");
    let st = s.lock().unwrap();
    assert!(st.wg.peers.is_empty(), "no peer may be added without the policy");
    assert!(!st.link.unwrap().up, "the link stays down without the policy");
}

#[test]
fn failed_step_is_an_error_and_the_retry_repairs() {
    let s = state();
    let mut a = applier(&s, true);
    let v = view();
    s.lock().unwrap().fail.insert("replace_route");
    let err = a.reconcile(&v).unwrap_err();
    match &err {
        ApplyError::Step { step: Step::ReplaceRoute(r), .. } => assert_eq!(r.to_string(), "198.18.20.0/24"),
        other => panic!("unexpected error {other}"),
    }
    assert!(err.to_string().contains("add route 198.18.20.0/24"), "the error names the step: {err}");
    s.lock().unwrap().fail.clear();
    let report = a.reconcile(&v).unwrap_or_else(|e| panic!("retry failed: {e}"));
    assert_eq!(report.changes.routes_replaced, 2);
    assert_eq!(report.changes.peers_added, 0, "peers were applied by the failed run already");
}

#[test]
fn tampering_is_repaired() {
    let s = state();
    let mut a = applier(&s, true);
    let v = view();
    a.reconcile(&v).unwrap();
    {
        let mut st = s.lock().unwrap();
        st.routes.clear();
        let first = *st.wg.peers.keys().next().unwrap();
        st.wg.peers.remove(&first);
        st.addresses.insert("100.64.9.9/32".parse().unwrap());
        st.policy = None;
    }
    let r = a.reconcile(&v).unwrap();
    assert_eq!((r.changes.routes_replaced, r.changes.peers_added, r.changes.addresses_removed), (2, 1, 1));
    assert!(r.changes.policy);
    // The interface deleted by hand is recreated from scratch.
    s.lock().unwrap().link = None;
    let r = a.reconcile(&v).unwrap();
    assert!(r.changes.up && r.changes.peers_added == 2 && r.changes.routes_replaced == 2);
}

#[test]
fn without_enforcer_policy_is_not_desired() {
    let s = state();
    let mut a = applier(&s, false);
    assert!(!a.enforces_policy());
    a.reconcile(&view()).unwrap();
    assert!(s.lock().unwrap().policy.is_none());
    assert!(!s.lock().unwrap().log.contains(&"enforce"));
}

#[test]
fn invalid_view_touches_nothing() {
    let s = state();
    let mut a = applier(&s, true);
    let mut v = view();
    v.peers[1].allowed_ips = v.peers[0].allowed_ips.clone();
    assert!(matches!(a.reconcile(&v), Err(ApplyError::View(_))));
    assert!(s.lock().unwrap().log.is_empty());
}

#[test]
fn unapplicable_policy_still_removes_a_revoked_peer_and_adds_nothing() {
    let s = state();
    let mut a = applier(&s, true);
    let v = view();
    a.reconcile(&v).unwrap();
    let old_policy = s.lock().unwrap().policy;
    // The next view revokes the second peer (and its route), adds a third
    // peer and a route, and carries a policy the data path refuses.
    let mut next = view();
    next.generation = 8;
    next.peers = vec![v.peers[0].clone(), next.peers[1].clone()];
    next.routes = vec!["198.18.20.0/24".parse().unwrap(), "198.18.40.0/24".parse().unwrap()];
    next.policy.rules[0].ports = PortRange::single(8443);
    let revoked = v.peers[1].public_key;
    let newcomer = next.peers[1].public_key;
    s.lock().unwrap().fail.insert("enforce");
    let err = a.reconcile(&next).unwrap_err();
    assert!(matches!(err, ApplyError::Step { step: Step::Policy, .. }), "{err}");
    let st = s.lock().unwrap();
    assert!(!st.wg.peers.contains_key(&revoked), "a revoked node stops being a peer");
    assert!(!st.wg.peers.contains_key(&newcomer), "nothing is added without its policy");
    assert!(!st.routes.contains(&"198.18.30.0/24".parse().unwrap()), "its route is removed");
    assert!(!st.routes.contains(&"198.18.40.0/24".parse().unwrap()), "no route is added");
    assert_eq!(st.policy, old_policy, "the policy in force stays (never fail-open)");
    let log = &st.log;
    let at = |op| log.iter().rposition(|o| *o == op).unwrap();
    assert!(at("wg.apply") < at("enforce"), "peer removal first: {log:?}");
}

#[test]
fn guard_knows_the_view_endpoints_before_the_peers_and_follows_roaming() {
    let s = state();
    let mut a = applier(&s, true);
    let v = view();
    a.reconcile(&v).unwrap();
    let ip = |t: &str| t.parse::<std::net::IpAddr>().unwrap();
    {
        let st = s.lock().unwrap();
        assert_eq!(st.known_endpoints, [ip("192.0.2.2")].into());
        let at = |op| st.log.iter().position(|o| *o == op).unwrap();
        assert!(at("set_known_endpoints") < at("wg.apply"), "{:?}", st.log);
    }
    // A peer roams (WireGuard now reaches it elsewhere): the next run, a
    // no-op for everything else, makes its new address known.
    {
        let mut st = s.lock().unwrap();
        let key = v.peers[1].public_key;
        let peer = st.wg.peers.get_mut(&key).unwrap();
        peer.endpoint = Some("198.51.100.7:40000".parse().unwrap());
        peer.last_handshake = Some(std::time::SystemTime::now());
    }
    let r = a.reconcile(&v).unwrap();
    // The session is left alone (the roamed endpoint only gains its
    // main-table exception rule, so the tunnel's own packets stay out of it).
    let c = &r.changes;
    assert!(
        c.peers_added == 0 && c.peers_updated == 0 && c.peers_removed == 0 && !c.device && c.routes_replaced == 0,
        "a live roamed session is left alone: {c:?}"
    );
    assert_eq!(s.lock().unwrap().known_endpoints, [ip("192.0.2.2"), ip("198.51.100.7")].into());
    // Without peers, nothing is known any more.
    let mut empty = v.clone();
    empty.peers.clear();
    empty.routes.clear();
    a.reconcile(&empty).unwrap();
    assert!(s.lock().unwrap().known_endpoints.is_empty());
}

#[test]
fn failed_known_endpoints_stop_the_run_before_peers() {
    let s = state();
    s.lock().unwrap().fail.insert("set_known_endpoints");
    let err = applier(&s, true).reconcile(&view()).unwrap_err();
    assert!(matches!(err, ApplyError::Step { step: Step::KnownEndpoints, .. }), "{err}");
    assert!(s.lock().unwrap().wg.peers.is_empty());
}
