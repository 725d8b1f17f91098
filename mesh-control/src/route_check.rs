//! Which advertised site prefixes may become routes: pure checks over the
//! store's snapshot, so they are tested without a server.
//!
//! An approved prefix ends up in every peer's WireGuard allowed IPs and in
//! the remote agents' mesh routing table, so a careless or hostile prefix
//! can take traffic that is not its gateway's to take. Refused:
//! - **hard** (no approval makes them usable): a default route (`/0`), and a
//!   prefix overlapping an overlay range (100.64.0.0/10, the overlay ULA),
//!   which would claim other nodes' overlay addresses (WireGuard refuses one
//!   allowed IP on two peers, so every agent would reject its whole view);
//! - **soft** (an admin's `ApproveRoute` overrides them, autoApprovers do
//!   not): a prefix strictly inside another node's approved prefix, unless
//!   the advertising node serves that covering prefix too (it is a gateway
//!   of the same site). Longest-prefix match would otherwise let the more
//!   specific prefix capture part of another site's traffic.
//!
//! Equal prefixes from several nodes are the HA case (two gateways of one
//! site) and are always allowed.

use std::collections::BTreeMap;

use ipnet::IpNet;

use crate::store::{RouteRecord, Snapshot, overlay_ranges};

/// Why a prefix may not be routed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RouteConflict {
    /// `/0`: would take every destination, the gateways' own underlay included.
    #[error("{prefix} is a default route; the mesh does not carry default routes")]
    Default {
        /// The refused prefix.
        prefix: IpNet,
    },
    /// Inside (or equal to) an overlay range.
    #[error("{prefix} is inside the overlay range {range}")]
    InsideOverlay {
        /// The refused prefix.
        prefix: IpNet,
        /// The overlay range.
        range: IpNet,
    },
    /// Contains an overlay range, and with it every node's overlay address.
    #[error("{prefix} contains the overlay range {range} (every node's overlay address)")]
    ContainsOverlay {
        /// The refused prefix.
        prefix: IpNet,
        /// The overlay range.
        range: IpNet,
    },
    /// Strictly inside another node's approved prefix.
    #[error("{prefix} is inside {covering} approved for {node_name}")]
    InsideOther {
        /// The refused prefix.
        prefix: IpNet,
        /// The other node's approved prefix.
        covering: IpNet,
        /// The other node's id.
        node: u64,
        /// Its name.
        node_name: String,
    },
}

impl RouteConflict {
    /// Whether an admin's explicit approval makes the prefix usable anyway.
    #[must_use]
    pub const fn overridable(&self) -> bool {
        matches!(self, Self::InsideOther { .. })
    }
}

/// The conflict, if any, of `prefix` advertised by `node`, against the
/// other routes of `snap`. Checks in order: default route, overlay ranges,
/// other nodes' approved prefixes (the widest covering one is named).
#[must_use]
pub fn conflict(snap: &Snapshot, node: u64, prefix: IpNet) -> Option<RouteConflict> {
    let prefix = prefix.trunc();
    if prefix.prefix_len() == 0 {
        return Some(RouteConflict::Default { prefix });
    }
    for range in overlay_ranges() {
        if range.contains(&prefix) {
            return Some(RouteConflict::InsideOverlay { prefix, range });
        }
        if prefix.contains(&range) {
            return Some(RouteConflict::ContainsOverlay { prefix, range });
        }
    }
    let serves = |n: u64, p: &IpNet| snap.routes.iter().any(|r| r.node_id == n && r.approved && r.prefix == *p);
    snap.routes
        .iter()
        .filter(|r| r.node_id != node && r.approved)
        .filter(|r| r.prefix.prefix_len() < prefix.prefix_len() && r.prefix.contains(&prefix))
        .filter(|r| !serves(node, &r.prefix))
        .min_by_key(|r| (r.prefix.prefix_len(), r.node_id))
        .map(|r| RouteConflict::InsideOther {
            prefix,
            covering: r.prefix,
            node: r.node_id,
            node_name: snap.nodes.iter().find(|n| n.id == r.node_id).map(|n| n.name.clone()).unwrap_or_default(),
        })
}

/// Whether an approved route may be used: no conflict, or one an admin
/// overrode by approving the route explicitly (autoApprovers never do).
#[must_use]
pub fn usable(route: &RouteRecord, conflict: Option<&RouteConflict>) -> bool {
    route.approved && conflict.is_none_or(|c| c.overridable() && !route.auto_approved)
}

/// Every route's conflict, keyed by (node, prefix); routes without one are
/// left out.
#[must_use]
pub fn conflicts(snap: &Snapshot) -> BTreeMap<(u64, IpNet), RouteConflict> {
    snap.routes.iter().filter_map(|r| Some(((r.node_id, r.prefix), conflict(snap, r.node_id, r.prefix)?))).collect()
}

/// The routes that may be used (approved and [`usable`]), in snapshot order.
#[must_use]
pub fn usable_routes(snap: &Snapshot) -> Vec<&RouteRecord> {
    let conflicts = conflicts(snap);
    snap.routes.iter().filter(|r| usable(r, conflicts.get(&(r.node_id, r.prefix)))).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::NodeRecord;

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    fn node(id: u64, name: &str) -> NodeRecord {
        NodeRecord::for_test(id, name)
    }

    fn route(node_id: u64, prefix: &str, approved: bool, auto: bool) -> RouteRecord {
        RouteRecord {
            node_id,
            prefix: net(prefix),
            approved,
            auto_approved: auto,
            priority: 0,
            healthy: true,
            virtual_addresses: Vec::new(),
            lan_addresses: Vec::new(),
            snat: false,
            owner: false,
            owner_since: 0,
        }
    }

    fn snap(routes: Vec<RouteRecord>) -> Snapshot {
        Snapshot {
            nodes: vec![node(1, "fsn-gw1"), node(2, "fsn-gw2"), node(3, "nyc-gw1")],
            routes,
            ..Snapshot::default()
        }
    }

    #[test]
    fn default_and_overlay_prefixes_are_refused_whoever_approves() {
        let s = snap(vec![]);
        for (p, want) in [
            ("0.0.0.0/0", "0.0.0.0/0 is a default route"),
            ("::/0", "::/0 is a default route"),
            ("100.64.3.0/24", "100.64.3.0/24 is inside the overlay range 100.64.0.0/10"),
            ("100.64.0.7/32", "inside the overlay range 100.64.0.0/10"),
            ("100.0.0.0/8", "100.0.0.0/8 contains the overlay range 100.64.0.0/10"),
            ("fd7a:6d65:7368:20::/64", "inside the overlay range fd7a:6d65:7368::/48"),
            ("fd00::/8", "contains the overlay range fd7a:6d65:7368::/48"),
        ] {
            let c = conflict(&s, 3, net(p)).unwrap_or_else(|| panic!("{p} accepted"));
            assert!(c.to_string().contains(want), "{p}: {c}");
            assert!(!c.overridable(), "{p}");
            // Not even an admin's approval makes it usable.
            assert!(!usable(&route(3, p, true, false), Some(&c)));
        }
        assert_eq!(conflict(&s, 3, net("198.18.20.0/24")), None);
        assert_eq!(conflict(&s, 3, net("100.128.0.0/16")), None, "just outside 100.64.0.0/10");
    }

    #[test]
    fn more_specific_inside_another_nodes_route_is_refused_and_named() {
        let s = snap(vec![route(1, "198.18.20.0/24", true, false), route(3, "198.18.20.128/25", true, true)]);
        let c = conflict(&s, 3, net("198.18.20.128/25")).unwrap();
        assert_eq!(c.to_string(), "198.18.20.128/25 is inside 198.18.20.0/24 approved for fsn-gw1");
        assert!(c.overridable());
        // Auto-approved: not usable; approved by an admin: usable.
        assert!(!usable(&route(3, "198.18.20.128/25", true, true), Some(&c)));
        assert!(usable(&route(3, "198.18.20.128/25", true, false), Some(&c)));
        assert_eq!(usable_routes(&s).len(), 1, "only fsn-gw1's /24 is used");
        // The covering prefix itself is fine, and so is one outside it.
        assert_eq!(conflict(&s, 1, net("198.18.20.0/24")), None);
        assert_eq!(conflict(&s, 3, net("198.18.21.0/24")), None);
        // A pending (unapproved) covering route protects nothing yet.
        let s = snap(vec![route(1, "198.18.20.0/24", false, false)]);
        assert_eq!(conflict(&s, 3, net("198.18.20.128/25")), None);
    }

    #[test]
    fn gateways_of_one_site_share_and_split_their_prefix() {
        // Two gateways of one site advertise the same /24: the HA case.
        let s = snap(vec![
            route(1, "198.18.20.0/24", true, true),
            route(2, "198.18.20.0/24", true, true),
            route(2, "198.18.20.128/25", true, true),
        ]);
        assert_eq!(conflict(&s, 2, net("198.18.20.0/24")), None);
        // fsn-gw2 serves the /24 too, so its /25 inside fsn-gw1's /24 is its own site's.
        assert_eq!(conflict(&s, 2, net("198.18.20.128/25")), None);
        assert_eq!(usable_routes(&s).len(), 3);
        // nyc-gw1 does not serve the /24: refused, naming the widest cover.
        let c = conflict(&s, 3, net("198.18.20.192/26")).unwrap();
        assert!(c.to_string().contains("inside 198.18.20.0/24 approved for fsn-gw1"), "{c}");
    }
}
