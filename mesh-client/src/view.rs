//! Node-view deltas: control computes the delta between two generations of
//! a node's view, the agent applies it to the view it holds. Both sides live
//! here so that they cannot drift apart.

use std::collections::{BTreeMap, BTreeSet};

use ipnet::IpNet;
use mesh_proto::v1 as pb;

/// A delta that does not follow the view it was applied to.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("delta from {base} onto {have}")]
pub struct OutOfOrder {
    /// The generation the delta starts from.
    pub base: u64,
    /// The generation of the view it was applied to.
    pub have: u64,
}

/// The delta from `old` to `new`.
#[must_use]
pub fn delta(old: &pb::NodeView, new: &pb::NodeView) -> pb::NodeViewDelta {
    let old_peers: BTreeMap<u64, &pb::Peer> = old.peers.iter().map(|p| (p.node_id, p)).collect();
    let new_ids: BTreeSet<u64> = new.peers.iter().map(|p| p.node_id).collect();
    let old_routes: BTreeMap<&str, &pb::RouteAssignment> = old.routes.iter().map(|r| (r.prefix.as_str(), r)).collect();
    let new_prefixes: BTreeSet<&str> = new.routes.iter().map(|r| r.prefix.as_str()).collect();
    pb::NodeViewDelta {
        base_generation: old.generation,
        generation: new.generation,
        self_: (old.self_ != new.self_).then(|| new.self_.clone()).flatten(),
        upsert_peers: new.peers.iter().filter(|p| old_peers.get(&p.node_id) != Some(p)).cloned().collect(),
        removed_peers: old_peers.keys().filter(|id| !new_ids.contains(id)).copied().collect(),
        upsert_routes: new.routes.iter().filter(|r| old_routes.get(r.prefix.as_str()) != Some(r)).cloned().collect(),
        removed_routes: old_routes.keys().filter(|p| !new_prefixes.contains(*p)).map(|p| (*p).to_owned()).collect(),
        mtu: if old.mtu == new.mtu { 0 } else { new.mtu },
        policy: (old.policy != new.policy).then(|| new.policy.clone()).flatten(),
    }
}

/// Applies a delta to a view (what an agent does with each delta).
pub fn apply(view: &mut pb::NodeView, d: &pb::NodeViewDelta) -> Result<(), OutOfOrder> {
    if view.generation != d.base_generation {
        return Err(OutOfOrder { base: d.base_generation, have: view.generation });
    }
    view.generation = d.generation;
    if let Some(s) = &d.self_ {
        view.self_ = Some(s.clone());
    }
    view.peers
        .retain(|p| !d.removed_peers.contains(&p.node_id) && !d.upsert_peers.iter().any(|u| u.node_id == p.node_id));
    view.peers.extend(d.upsert_peers.iter().cloned());
    view.peers.sort_by_key(|p| p.node_id);
    view.routes
        .retain(|r| !d.removed_routes.contains(&r.prefix) && !d.upsert_routes.iter().any(|u| u.prefix == r.prefix));
    view.routes.extend(d.upsert_routes.iter().cloned());
    view.routes.sort_by_key(|r| r.prefix.parse::<IpNet>().ok());
    if d.mtu != 0 {
        view.mtu = d.mtu;
    }
    if let Some(p) = &d.policy {
        view.policy = Some(p.clone());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(id: u64, endpoint: &str) -> pb::Peer {
        pb::Peer { node_id: id, endpoints: vec![endpoint.into()], ..Default::default() }
    }

    fn route(prefix: &str, gateways: &[u64]) -> pb::RouteAssignment {
        pb::RouteAssignment { prefix: prefix.into(), gateways: gateways.to_vec(), lan: Vec::new() }
    }

    /// The view fuzz target's seeds are real: a length-delimited view, then
    /// a delta that applies to it, with a policy that converts.
    #[test]
    fn fuzz_seeds_decode_and_apply() {
        use prost::Message as _;
        for seed in [
            &include_bytes!("../../fuzz/corpus/view/view-and-delta")[..],
            include_bytes!("../../fuzz/corpus/view/removal-delta"),
            include_bytes!("../../fuzz/corpus/view/first-view-as-delta"),
        ] {
            let mut rest = seed;
            let mut view = pb::NodeView::decode_length_delimited(&mut rest).unwrap();
            let d = pb::NodeViewDelta::decode(rest).unwrap();
            apply(&mut view, &d).unwrap();
            assert!(!view.peers.is_empty() && !view.routes.is_empty(), "{view:?}");
            crate::policy::from_proto(view.policy.as_ref().unwrap()).unwrap().validate().unwrap();
        }
    }

    #[test]
    fn applying_the_delta_gives_the_new_view() {
        let old = pb::NodeView {
            generation: 4,
            peers: vec![peer(1, "192.0.2.1:51820"), peer(2, "192.0.2.2:51820")],
            routes: vec![route("198.18.10.0/24", &[1, 2]), route("198.18.20.0/24", &[2])],
            mtu: 1280,
            ..Default::default()
        };
        let new = pb::NodeView {
            generation: 7,
            peers: vec![peer(2, "192.0.2.22:51820"), peer(3, "192.0.2.3:51820")],
            routes: vec![route("198.18.10.0/24", &[2, 1]), route("198.18.30.0/24", &[3])],
            mtu: 1420,
            policy: Some(pb::CompiledPolicy { generation: 2, ..Default::default() }),
            ..Default::default()
        };
        let d = delta(&old, &new);
        assert_eq!(d.removed_peers, vec![1]);
        assert_eq!(d.removed_routes, vec!["198.18.20.0/24".to_owned()]);
        let mut applied = old.clone();
        apply(&mut applied, &d).unwrap();
        assert_eq!(applied, new);
    }

    /// A random view as control makes them: peers by node id and routes by
    /// prefix, each once; its own record, an MTU and a policy always set.
    fn random_view(rng: &mut impl rand::Rng, generation: u64) -> pb::NodeView {
        let mut peers = Vec::new();
        for id in 1..=12u64 {
            if rng.random_bool(0.6) {
                peers.push(pb::Peer {
                    node_id: id,
                    name: format!("gw{id}"),
                    wireguard_public_key: vec![u8::try_from(id).unwrap(); 32],
                    endpoints: vec![format!("192.0.2.{}:51820", rng.random_range(1..4))],
                    allowed_ips: vec![format!("100.64.0.{id}/32")],
                });
            }
        }
        let mut routes = Vec::new();
        for site in 1..=8u8 {
            if rng.random_bool(0.5) {
                let mut gateways = Vec::new();
                for p in &peers {
                    if rng.random_bool(0.3) {
                        gateways.push(p.node_id);
                    }
                }
                if rng.random_bool(0.5) {
                    gateways.reverse();
                }
                routes.push(route(&format!("198.18.{}.0/24", u16::from(site) * 10), &gateways));
            }
        }
        pb::NodeView {
            generation,
            self_: Some(pb::Node { id: 100, name: format!("self-{}", rng.random_range(0..3)), ..Default::default() }),
            peers,
            routes,
            mtu: [1280, 1380, 1420][rng.random_range(0..3)],
            policy: Some(pb::CompiledPolicy { generation: rng.random_range(1..4), ..Default::default() }),
            // Only in snapshots: a delta never changes them.
            relays: Vec::new(),
        }
    }

    /// The round trip, for random pairs of views (fixed seeds: a failure
    /// names its seed and replays).
    #[test]
    fn applying_the_delta_gives_the_new_view_for_random_changes() {
        use rand::{Rng as _, SeedableRng as _};
        for seed in 0..2000u64 {
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            let old = random_view(&mut rng, 10);
            // From small edits to a whole new view.
            let new = if rng.random_bool(0.5) {
                let mut v = old.clone();
                v.generation = 11;
                if let Some(p) = v.peers.first_mut() {
                    p.endpoints = vec!["192.0.2.9:51820".into()];
                }
                if rng.random_bool(0.5) {
                    v.peers.pop();
                }
                if let Some(r) = v.routes.last_mut() {
                    r.gateways.reverse();
                }
                v
            } else {
                random_view(&mut rng, 11)
            };
            let d = delta(&old, &new);
            let mut applied = old.clone();
            apply(&mut applied, &d).unwrap();
            assert_eq!(applied, new, "seed {seed}: {d:?}");
            // A delta carries only what changed.
            let same = delta(&new, &pb::NodeView { generation: 12, ..new.clone() });
            assert!(
                same.upsert_peers.is_empty() && same.upsert_routes.is_empty() && same.self_.is_none(),
                "seed {seed}"
            );
        }
    }

    #[test]
    fn a_delta_from_another_generation_is_refused() {
        let mut view = pb::NodeView { generation: 3, ..Default::default() };
        let d = pb::NodeViewDelta { base_generation: 2, generation: 4, ..Default::default() };
        assert_eq!(apply(&mut view, &d), Err(OutOfOrder { base: 2, have: 3 }));
        assert_eq!(view.generation, 3);
    }
}
