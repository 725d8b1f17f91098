//! mesh-control's node view (`mesh.v1.NodeView`) to the agent's
//! [`NodeView`]: pure, so it is tested without a network.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddr,
};

use ipnet::IpNet;
use mesh_proto::v1 as pb;

use crate::{
    keys::PublicKey,
    view::{NodeView, PeerView},
};

/// What the conversion needs besides the message.
#[derive(Clone, Debug, Default)]
pub struct Local {
    /// Site subnets this node advertises (never routed into the overlay here).
    pub advertised: Vec<IpNet>,
    /// Persistent keepalive for every peer (0: none).
    pub persistent_keepalive: u16,
    /// The probe port opened between mesh nodes' overlay addresses (0: none).
    pub probe_port: u16,
    /// Prefixes this node routes through another gateway than control's
    /// primary (local failover), by node id.
    pub overrides: BTreeMap<IpNet, u64>,
    /// Peers whose endpoint the path manager chose (a direct candidate that
    /// answers, or the local proxy of a relay), by public key: set even on
    /// live sessions ([`PeerView::pin_endpoint`]).
    pub paths: BTreeMap<PublicKey, SocketAddr>,
}

/// Id of the rule the agent adds to let health probes through the ACL
/// (control's rule ids never reach it: they index ACL entries in the high
/// 16 bits).
pub const PROBE_RULE_ID: u32 = u32::MAX;

/// A control view the agent cannot use.
#[derive(Debug, thiserror::Error)]
#[error("unusable view from control: {0}")]
pub struct ConvertError(String);

fn key(bytes: &[u8], what: &str) -> Result<PublicKey, ConvertError> {
    let arr: [u8; 32] =
        bytes.try_into().map_err(|_| ConvertError(format!("{what}: public key of {} bytes", bytes.len())))?;
    Ok(PublicKey(arr))
}

fn net(s: &str) -> Result<IpNet, ConvertError> {
    s.parse::<IpNet>()
        .or_else(|_| s.parse::<std::net::IpAddr>().map(IpNet::from))
        .map_err(|_| ConvertError(format!("bad CIDR {s:?}")))
}

/// Converts a control view. Routes: every peer's allowed IPs (its overlay
/// addresses and the prefixes it is primary for) plus every assigned prefix
/// this node does not serve itself, so a prefix whose gateway is not (yet) a
/// peer is dropped in the overlay rather than leaked to the default route.
pub fn node_view(v: &pb::NodeView, local: &Local) -> Result<NodeView, ConvertError> {
    let me = v.self_.as_ref().ok_or_else(|| ConvertError("no self".into()))?;
    let mut addresses = Vec::new();
    for (a, len) in [(&me.ipv4, 32), (&me.ipv6, 128)] {
        if !a.is_empty() {
            addresses.push(net(&format!("{a}/{len}"))?);
        }
    }
    let mut own: BTreeSet<IpNet> = local.advertised.iter().map(IpNet::trunc).collect();
    for r in &v.routes {
        if r.gateways.contains(&me.id) {
            own.insert(net(&r.prefix)?.trunc());
        }
    }
    let assigned: BTreeSet<IpNet> =
        v.routes.iter().map(|r| net(&r.prefix).map(|n| n.trunc())).collect::<Result<_, _>>()?;
    // Local failover: each overridden prefix moves to its new gateway,
    // provided that gateway is one of this view's peers.
    let overrides: BTreeMap<IpNet, u64> = local
        .overrides
        .iter()
        .map(|(p, gw)| (p.trunc(), *gw))
        .filter(|(p, gw)| assigned.contains(p) && !own.contains(p) && v.peers.iter().any(|x| x.node_id == *gw))
        .collect();
    let mut peers = Vec::with_capacity(v.peers.len());
    let mut routes = BTreeSet::new();
    let mut overlay = Vec::new();
    for p in &v.peers {
        let mut allowed_ips = p
            .allowed_ips
            .iter()
            .map(|s| net(s))
            .filter(|n| n.as_ref().map_or(true, |n| !overrides.contains_key(&n.trunc())))
            .collect::<Result<Vec<_>, _>>()?;
        allowed_ips.extend(overrides.iter().filter(|(_, gw)| **gw == p.node_id).map(|(prefix, _)| *prefix));
        overlay.extend(allowed_ips.iter().filter(|n| !assigned.contains(&n.trunc())).copied());
        routes.extend(allowed_ips.iter().map(IpNet::trunc).filter(|n| !own.contains(n)));
        let public_key = key(&p.wireguard_public_key, &p.name)?;
        // `relay:<region>` entries (capability 7) are no socket address.
        let configured = p.endpoints.iter().find_map(|e| e.parse::<SocketAddr>().ok());
        let chosen = local.paths.get(&public_key).copied();
        peers.push(PeerView {
            public_key,
            name: Some(p.name.clone()).filter(|n| !n.is_empty()),
            endpoint: chosen.or(configured),
            pin_endpoint: chosen.is_some(),
            allowed_ips,
            persistent_keepalive: Some(local.persistent_keepalive).filter(|&k| k != 0),
            preshared_key: None,
        });
    }
    for r in &v.routes {
        let n = net(&r.prefix)?.trunc();
        if !own.contains(&n) {
            routes.insert(n);
        }
    }
    let mut policy = match &v.policy {
        Some(p) => mesh_client::policy::from_proto(p).map_err(|e| ConvertError(e.to_string()))?,
        None => mesh_policy::CompiledPolicy::default(),
    };
    if local.probe_port != 0 && !overlay.is_empty() && !addresses.is_empty() {
        // Health probes must pass whatever the operator's policy says.
        let nodes: Vec<IpNet> = addresses.iter().chain(&overlay).copied().collect();
        policy.rules.push(mesh_policy::Rule {
            id: PROBE_RULE_ID,
            src: nodes.clone(),
            dst: nodes,
            proto: mesh_policy::Proto::Udp,
            ports: mesh_policy::PortRange::single(local.probe_port),
        });
    }
    Ok(NodeView {
        generation: v.generation,
        // Set by the feeder: the stream's epoch.
        epoch: 0,
        public_key: Some(key(&me.wireguard_public_key, "self")?),
        addresses,
        mtu: if v.mtu == 0 { crate::view::DEFAULT_MTU } else { v.mtu },
        forwarding: !own.is_empty(),
        peers,
        routes: routes.into_iter().collect(),
        policy,
    })
}

/// The probe plan of a view: every peer at its first overlay address
/// (IPv4 preferred), fast for the gateways of the prefixes this node routes
/// into the overlay and for the other gateways of its own site prefixes
/// (which are also probed at their LAN address on that site, IPv4
/// preferred), those prefixes with control's gateway order, and whether the
/// view is `fresh` (from control in this run).
#[must_use]
pub fn probe_plan(v: &pb::NodeView, local: &Local, fresh: bool) -> crate::probe::Plan {
    let me = v.self_.as_ref().map_or(0, |m| m.id);
    let advertised: BTreeSet<IpNet> = local.advertised.iter().map(IpNet::trunc).collect();
    let routes: Vec<(IpNet, Vec<u64>)> = v
        .routes
        .iter()
        .filter(|r| !r.gateways.contains(&me) && !r.gateways.is_empty())
        .filter_map(|r| Some((net(&r.prefix).ok()?.trunc(), r.gateways.clone())))
        .filter(|(p, _)| !advertised.contains(p))
        .collect();
    let site: Vec<(IpNet, Vec<u64>)> = v
        .routes
        .iter()
        .filter(|r| r.gateways.contains(&me))
        .filter_map(|r| Some((net(&r.prefix).ok()?.trunc(), r.gateways.clone())))
        .collect();
    // The LAN address of each other gateway of a site this node serves.
    let mut lan: BTreeMap<u64, (std::net::IpAddr, IpNet)> = BTreeMap::new();
    for r in v.routes.iter().filter(|r| r.gateways.contains(&me)) {
        let Ok(prefix) = net(&r.prefix) else { continue };
        for g in r.lan.iter().filter(|g| g.node_id != me) {
            let mut addrs: Vec<std::net::IpAddr> =
                g.addresses.iter().filter_map(|a| a.parse().ok()).filter(|a| prefix.contains(a)).collect();
            addrs.sort_by_key(std::net::IpAddr::is_ipv6);
            if let Some(a) = addrs.first() {
                lan.entry(g.node_id).or_insert((*a, prefix.trunc()));
            }
        }
    }
    let assigned: BTreeSet<IpNet> = v.routes.iter().filter_map(|r| net(&r.prefix).ok().map(|n| n.trunc())).collect();
    let targets = v
        .peers
        .iter()
        .filter_map(|p| {
            let overlay: Vec<IpNet> = p
                .allowed_ips
                .iter()
                .filter_map(|s| net(s).ok())
                .filter(|n| n.prefix_len() == n.max_prefix_len() && !assigned.contains(&n.trunc()))
                .collect();
            let addr = overlay.iter().find(|n| n.addr().is_ipv4()).or_else(|| overlay.first())?.addr();
            Some(crate::probe::Target {
                node_id: p.node_id,
                name: if p.name.is_empty() { format!("node-{}", p.node_id) } else { p.name.clone() },
                addr,
                fast: routes.iter().chain(&site).any(|(_, gws)| gws.contains(&p.node_id)),
                lan: lan.get(&p.node_id).copied(),
            })
        })
        .collect();
    crate::probe::Plan { targets, routes, me, site, fresh, version: 0 }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::keys::SecretKey;

    fn pk() -> Vec<u8> {
        SecretKey::generate().public_key().0.to_vec()
    }

    #[test]
    fn converts_peers_routes_and_policy() {
        let v = pb::NodeView {
            generation: 7,
            self_: Some(pb::Node {
                id: 1,
                ipv4: "100.64.0.1".into(),
                ipv6: "fd7a:6d65:7368::1".into(),
                wireguard_public_key: pk(),
                ..Default::default()
            }),
            peers: vec![pb::Peer {
                node_id: 2,
                name: "gw-fsn".into(),
                wireguard_public_key: pk(),
                // A home relay (capability 7) is no socket address.
                endpoints: vec!["relay:fra".into(), "192.0.2.2:51820".into()],
                allowed_ips: vec!["100.64.0.2/32".into(), "fd7a:6d65:7368::2/128".into(), "198.18.20.0/24".into()],
            }],
            routes: vec![
                pb::RouteAssignment { prefix: "198.18.10.0/24".into(), gateways: vec![1, 3], lan: Vec::new() },
                pb::RouteAssignment { prefix: "198.18.20.0/24".into(), gateways: vec![2], lan: Vec::new() },
                pb::RouteAssignment { prefix: "198.18.30.0/24".into(), gateways: vec![5], lan: Vec::new() },
            ],
            mtu: 1280,
            policy: Some(pb::CompiledPolicy {
                generation: 3,
                rules: vec![pb::PolicyRule {
                    id: 1,
                    src: vec!["198.18.20.0/24".into()],
                    dst: vec!["198.18.10.20/32".into()],
                    proto: pb::RuleProto::Tcp.into(),
                    proto_number: 6,
                    port_first: 5432,
                    port_last: 5432,
                    ..Default::default()
                }],
                nets: Vec::new(),
            }),
            relays: Vec::new(),
        };
        let n = node_view(&v, &Local { persistent_keepalive: 25, ..Local::default() }).unwrap();
        assert_eq!(n.generation, 7);
        assert!(n.forwarding, "a gateway of a prefix forwards");
        assert_eq!(n.addresses.len(), 2);
        assert_eq!(n.peers[0].endpoint, Some("192.0.2.2:51820".parse().unwrap()));
        assert_eq!(n.peers[0].persistent_keepalive, Some(25));
        let routes: Vec<String> = n.routes.iter().map(ToString::to_string).collect();
        assert_eq!(
            routes,
            ["100.64.0.2/32", "198.18.20.0/24", "198.18.30.0/24", "fd7a:6d65:7368::2/128"],
            "own LAN is not routed into the overlay"
        );
        assert_eq!(n.policy.rules.len(), 1);
        n.validate(&PublicKey(v.self_.as_ref().unwrap().wireguard_public_key.clone().try_into().unwrap())).unwrap();
        assert!(!n.peers[0].pin_endpoint, "control's endpoint is not pinned");
        // The path manager's choice (here a relay proxy) replaces it, pinned.
        let peer = PublicKey(v.peers[0].wireguard_public_key.clone().try_into().unwrap());
        let proxy: SocketAddr = "127.0.0.1:40001".parse().unwrap();
        let local = Local { paths: BTreeMap::from([(peer, proxy)]), ..Local::default() };
        let n = node_view(&v, &local).unwrap();
        assert_eq!((n.peers[0].endpoint, n.peers[0].pin_endpoint), (Some(proxy), true));
    }

    /// A node routing 198.18.20.0/24 through gateway 2 (primary) or 3.
    pub(in crate::control) fn two_gateways() -> pb::NodeView {
        let peer = |id: u64, name: &str, ips: &[&str]| pb::Peer {
            node_id: id,
            name: name.into(),
            wireguard_public_key: pk(),
            endpoints: vec![],
            allowed_ips: ips.iter().map(|s| (*s).to_owned()).collect(),
        };
        pb::NodeView {
            generation: 9,
            self_: Some(pb::Node {
                id: 1,
                ipv4: "100.64.0.1".into(),
                wireguard_public_key: pk(),
                ..Default::default()
            }),
            peers: vec![
                peer(2, "fsn-gw1", &["100.64.0.2/32", "198.18.20.0/24"]),
                peer(3, "fsn-gw2", &["100.64.0.3/32", "fd7a:6d65:7368::3/128"]),
                peer(4, "", &["fd7a:6d65:7368::4/128"]),
            ],
            routes: vec![
                pb::RouteAssignment { prefix: "198.18.20.0/24".into(), gateways: vec![2, 3], lan: Vec::new() },
                pb::RouteAssignment { prefix: "198.18.10.0/24".into(), gateways: vec![1], lan: Vec::new() },
            ],
            ..Default::default()
        }
    }

    #[test]
    fn overrides_move_a_prefix_and_probes_are_let_through() {
        let v = two_gateways();
        let p: IpNet = "198.18.20.0/24".parse().unwrap();
        let mut local = Local { probe_port: 51900, ..Local::default() };
        let n = node_view(&v, &local).unwrap();
        assert!(n.peers[0].allowed_ips.contains(&p));
        let probe = n.policy.rules.iter().find(|r| r.id == PROBE_RULE_ID).expect("probe rule");
        assert_eq!(probe.ports, mesh_policy::PortRange::single(51900));
        assert_eq!(probe.src.len(), 5, "self plus every peer overlay address: {probe:?}");
        assert!(!probe.src.contains(&p), "site prefixes are not opened");
        n.policy.validate().unwrap();

        local.overrides.insert(p, 3);
        let n = node_view(&v, &local).unwrap();
        assert!(!n.peers[0].allowed_ips.contains(&p));
        assert!(n.peers[1].allowed_ips.contains(&p));
        assert!(n.routes.contains(&p));
        // An override naming a node that is not a peer is ignored.
        local.overrides.insert(p, 99);
        let n = node_view(&v, &local).unwrap();
        assert!(n.peers[0].allowed_ips.contains(&p));
        local.probe_port = 0;
        assert!(node_view(&v, &local).unwrap().policy.rules.is_empty());
    }

    #[test]
    fn probe_plan_targets_and_routes() {
        let plan = probe_plan(&two_gateways(), &Local::default(), true);
        assert_eq!(plan.routes, vec![("198.18.20.0/24".parse().unwrap(), vec![2, 3])], "own prefix left out");
        assert_eq!(plan.site, vec![("198.18.10.0/24".parse().unwrap(), vec![1])], "own prefix decided here");
        assert_eq!((plan.me, plan.fresh), (1, true));
        let t: Vec<(u64, String, String, bool)> =
            plan.targets.iter().map(|t| (t.node_id, t.name.clone(), t.addr.to_string(), t.fast)).collect();
        assert_eq!(
            t,
            vec![
                (2, "fsn-gw1".into(), "100.64.0.2".into(), true),
                (3, "fsn-gw2".into(), "100.64.0.3".into(), true),
                (4, "node-4".into(), "fd7a:6d65:7368::4".into(), false),
            ]
        );
        assert!(plan.targets.iter().all(|t| t.lan.is_none()), "no LAN addresses in the view");
    }

    #[test]
    fn site_peers_are_probed_on_the_lan_too() {
        // Node 1 serves 198.18.10.0/24 with node 4; control passed both
        // gateways' LAN addresses (its own, and a bogus one outside the
        // prefix, are ignored).
        let mut v = two_gateways();
        let lan = |id: u64, addrs: &[&str]| pb::GatewayLan {
            node_id: id,
            addresses: addrs.iter().map(|a| (*a).to_owned()).collect(),
        };
        v.routes[1] = pb::RouteAssignment {
            prefix: "198.18.10.0/24".into(),
            gateways: vec![1, 4],
            lan: vec![lan(1, &["198.18.10.1"]), lan(4, &["2001:db8::2", "198.18.99.2", "198.18.10.2"])],
        };
        let plan = probe_plan(&v, &Local::default(), true);
        let t: Vec<(u64, bool, Option<String>)> =
            plan.targets.iter().map(|t| (t.node_id, t.fast, t.lan.map(|(a, p)| format!("{a} on {p}")))).collect();
        assert_eq!(
            t,
            vec![(2, true, None), (3, true, None), (4, true, Some("198.18.10.2 on 198.18.10.0/24".into()))],
            "the site peer fast, at its LAN address inside the prefix"
        );
    }

    #[test]
    fn bad_key_is_refused() {
        let v = pb::NodeView {
            self_: Some(pb::Node { wireguard_public_key: vec![1, 2], ..Default::default() }),
            ..Default::default()
        };
        assert!(node_view(&v, &Local::default()).is_err());
    }
}
