//! The pure diff: desired against actual, nothing touched.

use std::time::{Duration, SystemTime};

use super::{Actual, Changes, Desired, Plan};
use crate::{
    net::Forwarding,
    wg::{PeerUpdate, WgPeer},
};

/// A peer whose last handshake is more recent than this keeps the endpoint
/// it roamed to; an endpoint is only forced back onto a peer without a live
/// session (WireGuard's reject-after-time is 180 s).
pub const ENDPOINT_STICKY: Duration = Duration::from_secs(180);

fn live(peer: &WgPeer, now: SystemTime) -> bool {
    peer.last_handshake.is_some_and(|t| now.duration_since(t).unwrap_or_default() < ENDPOINT_STICKY)
}

/// The minimal plan taking `actual` to `desired`. `now` is only used to tell
/// live sessions (whose endpoint may have roamed) from dead ones.
#[must_use]
pub fn diff(desired: &Desired, actual: &Actual, now: SystemTime) -> Plan {
    let mut plan = Plan::default();
    let mut ch = Changes::default();

    if let Some(want) = desired.policy
        && actual.policy != Some(want)
    {
        plan.policy = true;
        ch.policy = true;
    }

    if actual.link.is_none_or(|l| l.mtu != desired.mtu) {
        plan.mtu = Some(desired.mtu);
        ch.mtu = true;
    }

    // Device.
    if actual.wg.public_key != Some(desired.public_key) {
        plan.wg.private_key = Some(desired.private_key.clone());
    }
    if let Some(port) = desired.listen_port
        && actual.wg.listen_port != port
    {
        plan.wg.listen_port = Some(port);
    }
    if actual.wg.fwmark != desired.fwmark {
        plan.wg.fwmark = Some(desired.fwmark.unwrap_or(0));
    }
    ch.device = plan.wg.private_key.is_some() || plan.wg.listen_port.is_some() || plan.wg.fwmark.is_some();

    // Peers: removals first, then changes, then additions. With "replace
    // allowed IPs" semantics an allowed IP moving between peers ends up right
    // in any order; this order keeps the moment two peers both claim one
    // as short as possible.
    for key in actual.wg.peers.keys().filter(|k| !desired.peers.contains_key(k)) {
        plan.wg.peers.push(PeerUpdate { remove: true, ..PeerUpdate::new(*key) });
        ch.peers_removed += 1;
    }
    let mut added = Vec::new();
    for (key, want) in &desired.peers {
        match actual.wg.peers.get(key) {
            None => {
                added.push(PeerUpdate {
                    endpoint: want.endpoint,
                    allowed_ips: Some(want.allowed_ips.iter().copied().collect()),
                    persistent_keepalive: want.persistent_keepalive,
                    preshared_key: want.preshared_key.clone().map(Some),
                    ..PeerUpdate::new(*key)
                });
            }
            Some(have) => {
                let mut u = PeerUpdate::new(*key);
                if have.allowed_ips != want.allowed_ips {
                    u.allowed_ips = Some(want.allowed_ips.iter().copied().collect());
                }
                if have.persistent_keepalive != want.persistent_keepalive {
                    u.persistent_keepalive = Some(want.persistent_keepalive.unwrap_or(0));
                }
                if have.preshared_key != want.preshared_key {
                    u.preshared_key = Some(want.preshared_key.clone());
                }
                if want.endpoint.is_some() && have.endpoint != want.endpoint && (want.pin_endpoint || !live(have, now))
                {
                    u.endpoint = want.endpoint;
                }
                if u != PeerUpdate::new(*key) {
                    plan.wg.peers.push(u);
                    ch.peers_updated += 1;
                }
            }
        }
    }
    ch.peers_added = added.len();
    plan.wg.peers.extend(added);

    plan.remove_addresses = actual.addresses.difference(&desired.addresses).copied().collect();
    plan.add_addresses = desired.addresses.difference(&actual.addresses).copied().collect();
    ch.addresses_removed = plan.remove_addresses.len();
    ch.addresses_added = plan.add_addresses.len();

    if actual.link.is_none_or(|l| !l.up) {
        plan.up = true;
        ch.up = true;
    }

    let rules = desired.rules(actual);
    plan.add_rules = rules.difference(&actual.rules).copied().collect();
    plan.remove_rules = actual.rules.difference(&rules).copied().collect();
    ch.rules_added = plan.add_rules.len();
    ch.rules_removed = plan.remove_rules.len();

    plan.remove_stale_routes = actual.stale_routes.iter().copied().collect();
    plan.remove_routes = actual.routes.difference(&desired.routes).copied().collect();
    plan.replace_routes = desired.routes.difference(&actual.routes).copied().collect();
    ch.routes_removed = plan.remove_routes.len() + plan.remove_stale_routes.len();
    ch.routes_replaced = plan.replace_routes.len();

    if desired.forwarding {
        let need = Forwarding { ipv4: !actual.forwarding.ipv4, ipv6: !actual.forwarding.ipv6 };
        if need.ipv4 || need.ipv6 {
            plan.forwarding = Some(need);
            ch.forwarding = true;
        }
    }

    plan.changes = ch;
    plan
}

#[cfg(test)]
mod tests {
    use ipnet::IpNet;
    use mesh_policy::{CompiledPolicy, PortRange, Proto, Rule};

    use super::*;
    use crate::{
        keys::{PublicKey, SecretKey},
        net::{LinkState, MAIN_TABLE},
        reconcile::{Local, PolicyDigest},
        view::{DEFAULT_MTU, NodeView, PeerView},
        wg::{WgDevice, WgUpdate},
    };

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    fn peer(key: PublicKey, ips: &[&str]) -> PeerView {
        PeerView {
            public_key: key,
            name: None,
            endpoint: Some("192.0.2.2:51820".parse().unwrap()),
            pin_endpoint: false,
            allowed_ips: ips.iter().map(|s| net(s)).collect(),
            persistent_keepalive: None,
            preshared_key: None,
        }
    }

    fn view(peers: Vec<PeerView>, routes: &[&str]) -> NodeView {
        NodeView {
            generation: 1,
            epoch: 0,
            public_key: None,
            addresses: vec![net("100.64.0.1/32"), net("fd7a:6d65:7368::1/128")],
            mtu: DEFAULT_MTU,
            forwarding: true,
            peers,
            routes: routes.iter().map(|s| net(s)).collect(),
            policy: CompiledPolicy {
                generation: 3,
                rules: vec![Rule {
                    id: 0,
                    src: vec![net("198.18.0.0/15")],
                    dst: vec![net("198.18.0.0/15")],
                    proto: Proto::Any,
                    ports: PortRange::ANY,
                }],
            },
        }
    }

    fn local() -> Local {
        Local {
            private_key: SecretKey::generate(),
            listen_port: Some(51820),
            fwmark: None,
            enforce_policy: true,
            routing: crate::reconcile::Routing::default(),
            control_addrs: vec!["192.0.2.100".parse().unwrap()],
        }
    }

    /// Applies a plan to an in-memory model with WireGuard's semantics (an
    /// allowed IP given to one peer is taken from any other).
    fn apply(actual: &mut Actual, plan: &Plan, desired: &Desired) {
        apply_wg(&mut actual.wg, &plan.wg);
        if plan.policy {
            actual.policy = desired.policy;
        }
        let link = actual.link.get_or_insert(LinkState { index: 7, up: false, mtu: 1500 });
        if let Some(m) = plan.mtu {
            link.mtu = m;
        }
        if plan.up {
            link.up = true;
        }
        for a in &plan.remove_addresses {
            actual.addresses.remove(a);
        }
        actual.addresses.extend(plan.add_addresses.iter().copied());
        for r in &plan.remove_routes {
            actual.routes.remove(r);
        }
        actual.stale_routes.clear();
        actual.routes.extend(plan.replace_routes.iter().copied());
        actual.rules.extend(plan.add_rules.iter().copied());
        for r in &plan.remove_rules {
            actual.rules.remove(r);
        }
        if let Some(f) = plan.forwarding {
            actual.forwarding.ipv4 |= f.ipv4;
            actual.forwarding.ipv6 |= f.ipv6;
        }
    }

    fn apply_wg(dev: &mut WgDevice, u: &WgUpdate) {
        crate::reconcile::fake::apply_update(dev, u);
    }

    fn converge(desired: &Desired, actual: &mut Actual) -> Plan {
        let now = SystemTime::now();
        let plan = diff(desired, actual, now);
        apply(actual, &plan, desired);
        let again = diff(desired, actual, now);
        assert!(again.is_empty(), "not converged after one plan: {again:?}");
        plan
    }

    #[test]
    fn from_nothing_everything_is_added_then_nothing() {
        let (a, b) = (SecretKey::generate().public_key(), SecretKey::generate().public_key());
        let v =
            view(vec![peer(a, &["100.64.0.2/32"]), peer(b, &["100.64.0.3/32", "198.18.20.0/24"])], &["198.18.20.0/24"]);
        let d = Desired::new(&v, &local());
        let mut actual = Actual::default();
        let plan = converge(&d, &mut actual);
        let c = plan.changes;
        assert!(c.policy && c.mtu && c.device && c.up && c.forwarding);
        assert_eq!((c.peers_added, c.peers_updated, c.peers_removed), (2, 0, 0));
        assert_eq!((c.addresses_added, c.routes_replaced), (2, 1));
        // Idempotent: the same desired state again is a no-op.
        assert!(diff(&d, &actual, SystemTime::now()).is_empty());
    }

    #[test]
    fn peer_add_remove_update() {
        let (a, b, c) = (
            SecretKey::generate().public_key(),
            SecretKey::generate().public_key(),
            SecretKey::generate().public_key(),
        );
        let l = local();
        let mut actual = Actual::default();
        converge(
            &Desired::new(&view(vec![peer(a, &["100.64.0.2/32"]), peer(b, &["100.64.0.3/32"])], &[]), &l),
            &mut actual,
        );

        // b removed, c added, a gets a keepalive and another allowed IP.
        let mut pa = peer(a, &["100.64.0.2/32", "198.18.30.0/24"]);
        pa.persistent_keepalive = Some(25);
        let plan = converge(&Desired::new(&view(vec![pa, peer(c, &["100.64.0.4/32"])], &[]), &l), &mut actual);
        let ch = plan.changes;
        assert_eq!((ch.peers_added, ch.peers_updated, ch.peers_removed), (1, 1, 1));
        assert!(!ch.device && !ch.mtu && !ch.up && !ch.policy, "only peers change: {ch:?}");
        let removal = &plan.wg.peers[0];
        assert!(removal.remove && removal.public_key == b, "removals come first");
        assert_eq!(actual.wg.peers[&a].persistent_keepalive, Some(25));

        // Keepalive off again is an update that sends 0.
        let plan = converge(
            &Desired::new(
                &view(vec![peer(a, &["100.64.0.2/32", "198.18.30.0/24"]), peer(c, &["100.64.0.4/32"])], &[]),
                &l,
            ),
            &mut actual,
        );
        assert_eq!(plan.wg.peers.len(), 1);
        assert_eq!(plan.wg.peers[0].persistent_keepalive, Some(0));
    }

    #[test]
    fn allowed_ip_moves_between_peers() {
        let (a, b) = (SecretKey::generate().public_key(), SecretKey::generate().public_key());
        let l = local();
        let mut actual = Actual::default();
        converge(
            &Desired::new(
                &view(vec![peer(a, &["100.64.0.2/32", "198.18.20.0/24"]), peer(b, &["100.64.0.3/32"])], &[]),
                &l,
            ),
            &mut actual,
        );
        // The site subnet fails over from a to b.
        let plan = converge(
            &Desired::new(
                &view(vec![peer(a, &["100.64.0.2/32"]), peer(b, &["100.64.0.3/32", "198.18.20.0/24"])], &[]),
                &l,
            ),
            &mut actual,
        );
        assert_eq!(plan.changes.peers_updated, 2);
        assert!(actual.wg.peers[&b].allowed_ips.contains(&net("198.18.20.0/24")));
        assert!(!actual.wg.peers[&a].allowed_ips.contains(&net("198.18.20.0/24")));
        // Moving it onto a brand-new peer while removing the old one.
        let c = SecretKey::generate().public_key();
        converge(
            &Desired::new(&view(vec![peer(a, &["100.64.0.2/32"]), peer(c, &["198.18.20.0/24"])], &[]), &l),
            &mut actual,
        );
        assert_eq!(actual.wg.peers.len(), 2);
    }

    #[test]
    fn route_and_address_changes() {
        let a = SecretKey::generate().public_key();
        let l = local();
        let mut actual = Actual::default();
        converge(
            &Desired::new(&view(vec![peer(a, &["198.18.20.0/24"])], &["198.18.20.0/24", "198.18.30.0/24"]), &l),
            &mut actual,
        );
        let mut v = view(vec![peer(a, &["198.18.20.0/24"])], &["198.18.20.0/24", "fd7a:6d65:7368:20::/64"]);
        v.addresses = vec![net("100.64.0.9/32")];
        let plan = converge(&Desired::new(&v, &l), &mut actual);
        assert_eq!(plan.remove_routes, vec![net("198.18.30.0/24")]);
        assert_eq!(plan.replace_routes, vec![net("fd7a:6d65:7368:20::/64")]);
        assert_eq!(plan.add_addresses, vec![net("100.64.0.9/32")]);
        assert_eq!(plan.remove_addresses.len(), 2);
        assert_eq!(plan.changes.peers_updated, 0);
    }

    #[test]
    fn tampering_is_repaired_minimally() {
        let a = SecretKey::generate().public_key();
        let l = local();
        let d = Desired::new(&view(vec![peer(a, &["198.18.20.0/24"])], &["198.18.20.0/24"]), &l);
        let mut actual = Actual::default();
        converge(&d, &mut actual);
        actual.routes.clear();
        actual.wg.peers.clear();
        actual.link.as_mut().unwrap().up = false;
        let plan = converge(&d, &mut actual);
        let c = plan.changes;
        assert_eq!((c.routes_replaced, c.peers_added, c.up), (1, 1, true));
        assert!(!c.policy && !c.mtu && !c.device && c.addresses_added == 0);
    }

    #[test]
    fn roamed_endpoint_of_live_peer_is_kept() {
        let a = SecretKey::generate().public_key();
        let d = Desired::new(&view(vec![peer(a, &["100.64.0.2/32"])], &[]), &local());
        let mut actual = Actual::default();
        converge(&d, &mut actual);
        let now = SystemTime::now();
        let p = actual.wg.peers.get_mut(&a).unwrap();
        p.endpoint = Some("203.0.113.7:4000".parse().unwrap());
        p.last_handshake = Some(now - Duration::from_secs(10));
        let plan = diff(&d, &actual, now);
        assert!(plan.wg.is_empty(), "a live session keeps its roamed endpoint");
        // The tunnel's packets to the roamed endpoint keep using the main table.
        let roamed = net("203.0.113.7/32");
        assert_eq!(plan.add_rules.iter().filter(|r| r.dst == Some(roamed)).count(), 1, "{plan:?}");
        assert_eq!(plan.changes.rules_added, 1);
        let p = actual.wg.peers.get_mut(&a).unwrap();
        p.last_handshake = Some(now - ENDPOINT_STICKY - Duration::from_secs(1));
        let plan = diff(&d, &actual, now);
        assert_eq!(plan.wg.peers[0].endpoint, Some("192.0.2.2:51820".parse().unwrap()));
    }

    #[test]
    fn a_pinned_endpoint_replaces_a_roamed_one_on_a_live_session() {
        let a = SecretKey::generate().public_key();
        let mut v = view(vec![peer(a, &["100.64.0.2/32"])], &[]);
        // The path manager moved the peer to its relay proxy.
        v.peers[0].endpoint = Some("127.0.0.1:40001".parse().unwrap());
        v.peers[0].pin_endpoint = true;
        let d = Desired::new(&v, &local());
        let mut actual = Actual::default();
        converge(&d, &mut actual);
        let now = SystemTime::now();
        let p = actual.wg.peers.get_mut(&a).unwrap();
        p.endpoint = Some("192.0.2.2:51820".parse().unwrap());
        p.last_handshake = Some(now - Duration::from_secs(10));
        let plan = diff(&d, &actual, now);
        assert_eq!(plan.wg.peers.len(), 1, "{plan:?}");
        assert_eq!(plan.wg.peers[0].endpoint, Some("127.0.0.1:40001".parse().unwrap()));
    }

    #[test]
    fn routes_go_to_the_mesh_table_behind_exception_rules() {
        let a = SecretKey::generate().public_key();
        let mut actual = Actual::default();
        actual.connected.insert(net("192.0.2.0/24"));
        actual.connected.insert(net("198.18.20.0/24"));
        // A default route is never installed, a covering one is.
        let v = view(vec![peer(a, &["100.64.0.2/32"])], &["0.0.0.0/0", "192.0.0.0/8", "::/0"]);
        let d = Desired::new(&v, &local());
        converge(&d, &mut actual);
        assert_eq!(actual.routes, [net("192.0.0.0/8")].into());
        let to_main = |dst: &str| {
            actual.rules.iter().any(|r| r.dst == Some(net(dst)) && r.table == MAIN_TABLE && r.priority == 5301)
        };
        // Underlay and LAN networks, control and the peer's endpoint stay on main.
        for dst in ["192.0.2.0/24", "198.18.20.0/24", "192.0.2.100/32", "192.0.2.2/32"] {
            assert!(to_main(dst), "{dst}: {:?}", actual.rules);
        }
        let lookups: Vec<_> = actual.rules.iter().filter(|r| r.table == 109).collect();
        assert_eq!(lookups.len(), 2, "one per family: {lookups:?}");
        assert!(lookups.iter().all(|r| r.priority == 5302 && r.dst.is_none()));
        assert!(!actual.rules.iter().any(|r| r.fwmark.is_some()), "no fwmark configured");
        // A network that goes away loses its exception; nothing else changes.
        actual.connected.remove(&net("198.18.20.0/24"));
        let plan = converge(&d, &mut actual);
        assert_eq!((plan.changes.rules_removed, plan.changes.rules_added), (1, 0));
        assert!(plan.remove_routes.is_empty() && plan.replace_routes.is_empty());
        // With a fwmark, marked packets (the tunnel's own) look up main first.
        let marked = Local { fwmark: Some(0x6d), ..local() };
        converge(&Desired::new(&v, &marked), &mut actual);
        assert_eq!(actual.rules.iter().filter(|r| r.fwmark == Some(0x6d) && r.priority == 5300).count(), 2);
        // Routes an older release left in main are removed, once.
        actual.stale_routes.insert(net("198.18.20.0/24"));
        let plan = converge(&d, &mut actual);
        assert_eq!(plan.remove_stale_routes, vec![net("198.18.20.0/24")]);
        assert!(plan.remove_routes.is_empty());
        // Table main: the old behaviour, no rules.
        let main = Local { routing: crate::reconcile::Routing { table: MAIN_TABLE, priority: 5300 }, ..local() };
        converge(&Desired::new(&v, &main), &mut actual);
        assert!(actual.rules.is_empty());
    }

    #[test]
    fn policy_change_alone() {
        let a = SecretKey::generate().public_key();
        let l = local();
        let mut v = view(vec![peer(a, &["100.64.0.2/32"])], &[]);
        let mut actual = Actual::default();
        converge(&Desired::new(&v, &l), &mut actual);
        v.policy.rules[0].ports = PortRange::single(443);
        let plan = converge(&Desired::new(&v, &l), &mut actual);
        assert!(plan.policy);
        assert_eq!(actual.policy, Some(PolicyDigest::of(&v.policy)));
        let c = Changes { policy: true, ..Changes::default() };
        assert_eq!(plan.changes, c);
        // Without an enforcer, the policy is not part of the desired state.
        let off = Local { enforce_policy: false, ..l };
        assert!(Desired::new(&v, &off).policy.is_none());
    }
}
