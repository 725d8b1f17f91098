//! What an agent's capability version means to control.
//!
//! The history of the versions is in `proto/mesh/v1/mesh.proto`, next to
//! `Capabilities`. Control reads a field only from an agent whose version
//! defines it: proto3 reads a field the sender never set as zero or
//! `false`, and control must not take that for a figure. A version-1
//! agent's peer entries, for one, would show every peer as probed down at
//! 0 ms, and a version-2 gateway's `owner: false` would say something about
//! site ownership, which that version knows nothing of.
//!
//! What control sends depends on the version for `TrustedCas` (4), for
//! how a view's rules name their CIDRs (6) and for relay endpoints (7, see
//! [`for_version`]); every other field of a view has been there since
//! version 1 (older agents skip `NodeView.relays`, an unknown field).

use mesh_policy::tables::Limits;
use mesh_proto::v1 as pb;

use crate::engine::convert;

/// Agents probe their peers (`PeerHealth.probe_*`), report their WireGuard
/// backend (`HealthReport.backend`) and their local failovers.
pub const PROBES: u32 = 2;

/// HA gateways: site ownership (`RouteHealth.owner`), route options
/// (`RouteAdvertisement.options`) and the data path's limits
/// (`Capabilities.limits`).
pub const HA_GATEWAYS: u32 = 3;

/// Agents take the CAs to trust from the Sync stream (`TrustedCas`).
pub const CA_ROTATION: u32 = 4;

/// Agents report each peer's endpoint in use (`PeerHealth.endpoint`).
pub const PATH_FACTS: u32 = 5;
/// Agents read rules that name their CIDRs by index into the policy's
/// table (`CompiledPolicy.nets`).
pub const COMPACT_RULES: u32 = 6;
/// Relays: agents read `relay:<region>` endpoints and `NodeView.relays`,
/// ask for relay tickets, send endpoint candidates, and report each
/// peer's path (`PeerHealth.path`, `relay_region`, `path_switches`,
/// `direct_secs`, `relay_secs`).
pub const RELAYS: u32 = 7;

/// The version a peer reported. Capabilities came with version 1, so a
/// sender without them speaks 1.
#[must_use]
pub fn version(caps: Option<&pb::Capabilities>) -> u32 {
    caps.map_or(1, |c| c.capability_version.max(1))
}

/// The data path limits a hello carries, when its version defines them.
#[must_use]
pub fn limits(caps: Option<&pb::Capabilities>) -> Option<Limits> {
    let caps = caps.filter(|c| version(Some(c)) >= HA_GATEWAYS)?;
    caps.limits.as_ref().map(convert::limits)
}

/// A health report without what the sender's version does not define.
#[must_use]
pub fn health(version: u32, mut report: pb::HealthReport) -> pb::HealthReport {
    if version < PROBES {
        // The peer entries are the probes' figures (`Status.peers`), and a
        // version-1 agent has none.
        report.peers.clear();
        report.backend.clear();
    }
    if version < PATH_FACTS {
        for p in &mut report.peers {
            p.endpoint.clear();
        }
    }
    if version < RELAYS {
        for p in &mut report.peers {
            p.path.clear();
            p.relay_region.clear();
            p.path_switches = 0;
            p.direct_secs = 0.0;
            p.relay_secs = 0.0;
        }
    }
    if version < HA_GATEWAYS {
        // The gateway holds no site address: it owns no site.
        for r in &mut report.routes {
            r.owner = false;
            r.owner_since_unix = 0;
        }
    }
    report
}

/// A route advertisement without what the sender's version does not
/// define.
#[must_use]
pub fn routes(version: u32, mut adv: pb::RouteAdvertisement) -> pb::RouteAdvertisement {
    if version < HA_GATEWAYS {
        adv.options.clear();
    }
    adv
}

/// A view message as an agent of `version` reads it: before
/// [`COMPACT_RULES`], its policy's CIDRs as text in each rule; before
/// [`RELAYS`], no `relay:` endpoints (such an agent would refuse the
/// view, as it parses every endpoint as `ip:port`). Views are built for
/// the current version, once for every agent; only older agents' streams
/// pay for the conversion.
#[must_use]
pub fn for_version(version: u32, mut msg: pb::sync_response::Msg) -> pb::sync_response::Msg {
    use pb::sync_response::Msg;
    if version >= RELAYS {
        return msg;
    }
    let (own, peers, policy) = match &mut msg {
        Msg::Snapshot(v) => (v.self_.as_mut(), v.peers.as_mut_slice(), v.policy.as_mut()),
        Msg::Delta(d) => (d.self_.as_mut(), d.upsert_peers.as_mut_slice(), d.policy.as_mut()),
        Msg::TrustedCas(_) => return msg,
    };
    let no_relays = |e: &mut Vec<String>| e.retain(|e| !e.starts_with(crate::relay::ENDPOINT_PREFIX));
    if let Some(n) = own {
        no_relays(&mut n.endpoints);
    }
    for p in peers {
        no_relays(&mut p.endpoints);
    }
    if version >= COMPACT_RULES {
        return msg;
    }
    if let Some(p) = policy.filter(|p| !p.nets.is_empty()) {
        match mesh_client::policy::from_proto(p) {
            Ok(rules) => *p = mesh_client::policy::to_text_proto(&rules),
            // Control built it; the agent will refuse it and say so.
            Err(e) => tracing::error!(error = %e, "a view's own policy does not convert"),
        }
    }
    msg
}

#[cfg(test)]
mod tests {
    use super::*;

    fn caps(version: u32, limits: Option<pb::DataplaneLimits>) -> pb::Capabilities {
        pb::Capabilities { capability_version: version, software: "mesh-agent 0.1.0".into(), limits }
    }

    fn report() -> pb::HealthReport {
        pb::HealthReport {
            peers: vec![pb::PeerHealth {
                node_id: 2,
                probe_up: true,
                probe_rtt_ms: 1.5,
                endpoint: "192.0.2.2:51820".into(),
                ..Default::default()
            }],
            routes: vec![pb::RouteHealth {
                prefix: "198.18.10.0/24".into(),
                healthy: true,
                owner: true,
                owner_since_unix: 100,
                ..Default::default()
            }],
            counters: Some(pb::DataplaneCounters { accepted_packets: 7, ..Default::default() }),
            backend: "userspace".into(),
        }
    }

    /// Agents before version 6 get the same rules, as text; version 6
    /// gets them compact.
    #[test]
    fn older_agents_get_their_rules_as_text() {
        use pb::sync_response::Msg;
        let rules = mesh_policy::CompiledPolicy {
            generation: 3,
            rules: vec![mesh_policy::Rule {
                id: 1,
                src: vec!["100.64.0.1/32".parse().unwrap()],
                dst: vec!["fd7a:6d65:7368::2/128".parse().unwrap(), "100.64.0.1/32".parse().unwrap()],
                proto: mesh_policy::Proto::Tcp,
                ports: mesh_policy::PortRange { first: 22, last: 22 },
            }],
        };
        let compact = mesh_client::policy::to_proto(&rules);
        let view =
            |p: &pb::CompiledPolicy| Msg::Snapshot(pb::NodeView { policy: Some(p.clone()), ..Default::default() });
        let delta =
            |p: &pb::CompiledPolicy| Msg::Delta(pb::NodeViewDelta { policy: Some(p.clone()), ..Default::default() });
        assert_eq!(for_version(COMPACT_RULES, view(&compact)), view(&compact));
        let text = mesh_client::policy::to_text_proto(&rules);
        assert_eq!(text.rules[0].dst, ["fd7a:6d65:7368::2/128", "100.64.0.1/32"]);
        assert_eq!(for_version(PATH_FACTS, view(&compact)), view(&text));
        assert_eq!(for_version(1, delta(&compact)), delta(&text));
        assert_eq!(
            for_version(PATH_FACTS, delta(&pb::CompiledPolicy::default())),
            delta(&pb::CompiledPolicy::default())
        );
    }

    /// Agents before version 7 get no `relay:` endpoints (their own, or
    /// their peers'), in snapshots and deltas; version 7 gets them all.
    #[test]
    fn older_agents_get_no_relay_endpoints() {
        use pb::sync_response::Msg;
        let endpoints = || vec!["192.0.2.1:51820".to_owned(), "relay:fsn".to_owned()];
        let peer = || pb::Peer { node_id: 2, endpoints: endpoints(), ..Default::default() };
        let own = || Some(pb::Node { id: 1, endpoints: endpoints(), ..Default::default() });
        let relays = vec![pb::Relay { region: "fsn".into(), ..Default::default() }];
        let view = || {
            Msg::Snapshot(pb::NodeView {
                self_: own(),
                peers: vec![peer()],
                relays: relays.clone(),
                ..Default::default()
            })
        };
        let delta = || Msg::Delta(pb::NodeViewDelta { self_: own(), upsert_peers: vec![peer()], ..Default::default() });
        assert_eq!(for_version(RELAYS, view()), view());
        assert_eq!(for_version(RELAYS, delta()), delta());
        for version in [COMPACT_RULES, PATH_FACTS] {
            let Msg::Snapshot(v) = for_version(version, view()) else { panic!() };
            assert_eq!(v.peers[0].endpoints, ["192.0.2.1:51820"]);
            assert_eq!(v.self_.unwrap().endpoints, ["192.0.2.1:51820"]);
            assert_eq!(v.relays, relays, "an unknown field to them: left in");
            let Msg::Delta(d) = for_version(version, delta()) else { panic!() };
            assert_eq!(d.upsert_peers[0].endpoints, ["192.0.2.1:51820"]);
            assert_eq!(d.self_.unwrap().endpoints, ["192.0.2.1:51820"]);
        }
    }

    #[test]
    fn path_facts_are_read_from_version_7_on() {
        let mut r = report();
        r.peers[0].path = "relay".into();
        r.peers[0].relay_region = "fsn".into();
        r.peers[0].path_switches = 3;
        r.peers[0].relay_secs = 12.5;
        assert_eq!(health(RELAYS, r.clone()), r);
        let old = health(COMPACT_RULES, r).peers.remove(0);
        assert_eq!((old.path.as_str(), old.relay_region.as_str(), old.path_switches), ("", "", 0));
        assert_eq!((old.direct_secs, old.relay_secs), (0.0, 0.0));
        assert_eq!(old.endpoint, "192.0.2.2:51820", "version 5's field stays");
    }

    #[test]
    fn a_sender_without_capabilities_speaks_version_1() {
        assert_eq!(version(None), 1);
        assert_eq!(version(Some(&caps(0, None))), 1);
        assert_eq!(version(Some(&caps(3, None))), 3);
    }

    #[test]
    fn limits_are_read_from_version_3_on() {
        let l = pb::DataplaneLimits { max_rules: 2, ..Default::default() };
        assert_eq!(limits(Some(&caps(3, Some(l)))).map(|l| l.max_rules), Some(2));
        assert_eq!(limits(Some(&caps(2, Some(l)))), None, "version 2 has no limits");
        assert_eq!(limits(Some(&caps(3, None))), None);
        assert_eq!(limits(None), None);
    }

    #[test]
    fn health_keeps_what_the_version_defines() {
        assert_eq!(health(RELAYS, report()), report());
        assert_eq!(health(5, report()), report());
        let v4 = health(4, report());
        assert_eq!(v4.peers[0].endpoint, "", "the endpoint is version 5");
        assert!(v4.peers[0].probe_up);
        let v2 = health(2, report());
        assert_eq!((v2.peers.len(), v2.backend.as_str()), (1, "userspace"));
        assert_eq!((v2.routes[0].owner, v2.routes[0].owner_since_unix), (false, 0));
        assert!(v2.routes[0].healthy, "route health is version 1");
        let v1 = health(1, report());
        assert!(v1.peers.is_empty() && v1.backend.is_empty());
        assert_eq!(v1.counters, report().counters, "counters are version 1");
    }

    #[test]
    fn route_options_are_read_from_version_3_on() {
        let adv = pb::RouteAdvertisement {
            prefixes: vec!["198.18.10.0/24".into()],
            options: vec![pb::RouteOptions { prefix: "198.18.10.0/24".into(), snat: true, ..Default::default() }],
        };
        assert_eq!(routes(3, adv.clone()), adv);
        let old = routes(2, adv.clone());
        assert_eq!((old.prefixes, old.options.len()), (adv.prefixes, 0));
    }
}
