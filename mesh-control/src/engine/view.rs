//! Per-node views: pure functions of the store's snapshot, the policy and
//! the route selector's memory. The deltas between two views are
//! `mesh_client::view` (the agent applies them with the same code).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;

use ipnet::IpNet;
use mesh_proto::v1 as pb;

use super::convert;
use crate::policy::{self, InventoryNode, Policy};
use crate::routes::{Candidate, RouteSelector};
use crate::store::Snapshot;

/// What the views are computed with besides the snapshot.
#[derive(Debug)]
pub struct ViewInput<'a> {
    /// The store snapshot.
    pub snap: &'a Snapshot,
    /// The active policy, parsed.
    pub policy: &'a Policy,
    /// Its generation.
    pub policy_generation: u64,
    /// Overlay MTU.
    pub mtu: u32,
    /// Now, unix seconds.
    pub now: i64,
    /// Since when each (gateway, prefix) has been up.
    pub up_since: &'a HashMap<(u64, IpNet), i64>,
}

/// Every node's view (generation 0: the engine numbers them) and every
/// active prefix's gateway order.
#[derive(Debug, Default)]
pub struct Views {
    /// Node id to its view.
    pub nodes: BTreeMap<u64, pb::NodeView>,
    /// Prefix to its gateways, primary first.
    pub routes: BTreeMap<IpNet, Vec<u64>>,
}

/// The active nodes as the policy compiler sees them, in id order.
#[must_use]
pub fn inventory(snap: &Snapshot, now: i64) -> Vec<InventoryNode> {
    let usable = crate::route_check::usable_routes(snap);
    snap.nodes
        .iter()
        .filter(|n| n.active(now))
        .map(|n| InventoryNode {
            id: n.id,
            name: n.name.clone(),
            addrs: vec![IpAddr::V4(n.ipv4), IpAddr::V6(n.ipv6)],
            tags: n.tags.clone(),
            user: n.owner.clone(),
            routes: usable.iter().filter(|r| r.node_id == n.id).map(|r| r.prefix).collect(),
        })
        .collect()
}

/// Computes every node's view.
#[must_use]
pub fn compute(input: &ViewInput<'_>, selector: &mut RouteSelector) -> Views {
    let snap = input.snap;
    let now = input.now;
    let active: Vec<&crate::store::NodeRecord> = snap.nodes.iter().filter(|n| n.active(now)).collect();
    let active_ids: BTreeSet<u64> = active.iter().map(|n| n.id).collect();
    // Refused prefixes (see `route_check`) are left out like unapproved ones.
    let approved_routes: Vec<&crate::store::RouteRecord> =
        crate::route_check::usable_routes(snap).into_iter().filter(|r| active_ids.contains(&r.node_id)).collect();

    // Route order per prefix.
    let mut by_prefix: BTreeMap<IpNet, Vec<Candidate>> = BTreeMap::new();
    for r in &approved_routes {
        by_prefix.entry(r.prefix).or_default().push(Candidate {
            node: r.node_id,
            priority: r.priority,
            up_since: input.up_since.get(&(r.node_id, r.prefix)).copied(),
        });
    }
    selector.retain(|p| by_prefix.contains_key(p));
    let routes: BTreeMap<IpNet, Vec<u64>> =
        by_prefix.into_iter().map(|(p, c)| (p, selector.select(p, &c, now))).collect();
    let mut primary_of: BTreeMap<u64, Vec<IpNet>> = BTreeMap::new();
    for (p, order) in &routes {
        if let Some(first) = order.first() {
            primary_of.entry(*first).or_default().push(*p);
        }
    }

    // Compile the policy against the active nodes.
    let inv = inventory(snap, now);
    let compiled = policy::compile_for_dataplane(input.policy, &inv, input.policy_generation);
    // Peers: nodes some ACL entry connects, in either direction.
    let mut peers: Vec<BTreeSet<usize>> = vec![BTreeSet::new(); inv.len()];
    for (src, dst) in policy::connectivity(input.policy, &inv) {
        for &a in &src {
            for &b in &dst {
                if a != b {
                    peers[a].insert(b);
                    peers[b].insert(a);
                }
            }
        }
    }
    // Each peer message is built once and cloned into the views.
    let peer_msgs: Vec<pb::Peer> = active
        .iter()
        .map(|n| {
            let mut allowed = vec![format!("{}/32", n.ipv4), format!("{}/128", n.ipv6)];
            allowed.extend(primary_of.get(&n.id).into_iter().flatten().map(ToString::to_string));
            pb::Peer {
                node_id: n.id,
                name: n.name.clone(),
                wireguard_public_key: hex::decode(&n.public_key).unwrap_or_default(),
                endpoints: n.endpoints.clone(),
                allowed_ips: allowed,
            }
        })
        .collect();
    let route_msgs: Vec<pb::RouteAssignment> = routes
        .iter()
        .map(|(p, order)| pb::RouteAssignment { prefix: p.to_string(), gateways: order.clone(), lan: Vec::new() })
        .collect();
    // The site's own gateways also get each other's LAN addresses (they
    // probe each other there); nobody else needs the site's LAN layout.
    let lan_of: BTreeMap<(u64, IpNet), &Vec<String>> = approved_routes
        .iter()
        .filter(|r| !r.lan_addresses.is_empty())
        .map(|r| ((r.node_id, r.prefix), &r.lan_addresses))
        .collect();
    let site_msgs: Vec<pb::RouteAssignment> = routes
        .iter()
        .zip(&route_msgs)
        .map(|((p, order), plain)| pb::RouteAssignment {
            lan: order
                .iter()
                .filter_map(|g| lan_of.get(&(*g, *p)).map(|a| pb::GatewayLan { node_id: *g, addresses: (*a).clone() }))
                .collect(),
            ..plain.clone()
        })
        .collect();
    let views_routes = |id: u64| -> Vec<pb::RouteAssignment> {
        routes
            .values()
            .enumerate()
            .map(|(i, order)| if order.contains(&id) { site_msgs[i].clone() } else { route_msgs[i].clone() })
            .collect()
    };

    let mut nodes = BTreeMap::new();
    for (i, n) in active.iter().enumerate() {
        let view = pb::NodeView {
            generation: 0,
            self_: Some(convert::node(n, now, false)),
            peers: peers[i].iter().map(|&j| peer_msgs[j].clone()).collect(),
            routes: views_routes(n.id),
            mtu: input.mtu,
            policy: compiled.get(&n.id).map(mesh_client::policy::to_proto),
        };
        nodes.insert(n.id, view);
    }
    // Pending and expired nodes see themselves only.
    for n in snap.nodes.iter().filter(|n| !n.active(now)) {
        nodes.insert(
            n.id,
            pb::NodeView {
                generation: 0,
                self_: Some(convert::node(n, now, false)),
                peers: Vec::new(),
                routes: Vec::new(),
                mtu: input.mtu,
                policy: Some(pb::CompiledPolicy { generation: input.policy_generation, rules: Vec::new() }),
            },
        );
    }
    Views { nodes, routes }
}

/// Whether two views differ in anything but their generations. The compiled
/// policy's generation is ignored too: a policy change that leaves a node's
/// rules as they were is not a change for that node (its agent keeps the
/// generation of the policy that last changed its rules).
#[must_use]
pub fn same(a: &pb::NodeView, b: &pb::NodeView) -> bool {
    let rules = |v: &pb::NodeView| v.policy.as_ref().map(|p| p.rules.clone()).unwrap_or_default();
    a.self_ == b.self_ && a.peers == b.peers && a.routes == b.routes && a.mtu == b.mtu && rules(a) == rules(b)
}
