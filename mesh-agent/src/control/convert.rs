//! mesh-control's node view (`mesh.v1.NodeView`) to the agent's
//! [`NodeView`]: pure, so it is tested without a network.

use std::{collections::BTreeSet, net::SocketAddr};

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
}

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
    let mut peers = Vec::with_capacity(v.peers.len());
    let mut routes = BTreeSet::new();
    for p in &v.peers {
        let allowed_ips = p.allowed_ips.iter().map(|s| net(s)).collect::<Result<Vec<_>, _>>()?;
        routes.extend(allowed_ips.iter().map(IpNet::trunc).filter(|n| !own.contains(n)));
        let endpoint = p.endpoints.iter().find_map(|e| e.parse::<SocketAddr>().ok());
        peers.push(PeerView {
            public_key: key(&p.wireguard_public_key, &p.name)?,
            name: Some(p.name.clone()).filter(|n| !n.is_empty()),
            endpoint,
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
    let policy = match &v.policy {
        Some(p) => mesh_control::engine::convert::policy_from_proto(p).map_err(|e| ConvertError(e.to_string()))?,
        None => mesh_policy::CompiledPolicy::default(),
    };
    Ok(NodeView {
        generation: v.generation,
        public_key: Some(key(&me.wireguard_public_key, "self")?),
        addresses,
        mtu: if v.mtu == 0 { crate::view::DEFAULT_MTU } else { v.mtu },
        forwarding: !own.is_empty(),
        peers,
        routes: routes.into_iter().collect(),
        policy,
    })
}

#[cfg(test)]
mod tests {
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
                endpoints: vec!["192.0.2.2:51820".into()],
                allowed_ips: vec!["100.64.0.2/32".into(), "fd7a:6d65:7368::2/128".into(), "198.18.20.0/24".into()],
            }],
            routes: vec![
                pb::RouteAssignment { prefix: "198.18.10.0/24".into(), gateways: vec![1, 3] },
                pb::RouteAssignment { prefix: "198.18.20.0/24".into(), gateways: vec![2] },
                pb::RouteAssignment { prefix: "198.18.30.0/24".into(), gateways: vec![5] },
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
                }],
            }),
        };
        let n = node_view(&v, &Local { advertised: vec![], persistent_keepalive: 25 }).unwrap();
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
