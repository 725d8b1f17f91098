//! What the agent tells control about itself: its capabilities (in the
//! hello), the routes it advertises, health reports and local failover
//! reports.

use std::{
    collections::BTreeMap,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use mesh_proto::v1 as pb;

use super::now_secs;
use crate::{
    config::ControlConfig,
    probe::{self, ProbeState, stats::Reach},
    reach::RouteHealth,
    status::Status,
};

/// This agent's capabilities; with the eBPF ACL enforcing, its map sizes
/// (capability 3), so that control refuses a policy this node cannot hold
/// instead of sending it a view it must nack.
pub(super) fn capabilities(enforced: bool) -> pb::Capabilities {
    let l = mesh_policy::tables::Limits::DATAPATH;
    let limits = enforced.then_some(pb::DataplaneLimits {
        max_rules: l.max_rules,
        max_cidrs: l.max_cidrs,
        max_dst_entries: l.max_dst_entries,
        max_policy_entries: l.max_policy_entries,
    });
    pb::Capabilities { limits, ..mesh_proto::capabilities("mesh-agent") }
}

fn ms(d: Option<Duration>) -> f64 {
    d.map_or(-1.0, |d| d.as_secs_f64() * 1e3)
}

/// The peers the probes see up: when this set changes, the session reports
/// at once rather than at the next health tick, so control (and its web
/// page) learns a gateway died within a probe interval or so, not a whole
/// `health_interval_secs` later.
#[must_use]
pub(super) fn reachable(probes: &ProbeState) -> Vec<u64> {
    probes.peers.iter().filter(|(_, e)| e.stats.reach() == Reach::Up).map(|(id, _)| *id).collect()
}

/// The health report from the agent's status and probes: per-peer
/// handshake age, traffic, probe RTT and loss; the health of the routes
/// this node advertises; the backend.
#[must_use]
pub fn health_report(
    status: &Status,
    view: Option<&pb::NodeView>,
    routes: &[RouteHealth],
    probes: &ProbeState,
    paths: &BTreeMap<crate::keys::PublicKey, crate::path::PathInfo>,
) -> pb::HealthReport {
    let now = now_secs();
    let ids: BTreeMap<Vec<u8>, u64> =
        view.map(|v| v.peers.iter().map(|p| (p.wireguard_public_key.clone(), p.node_id)).collect()).unwrap_or_default();
    let peers = status
        .peers
        .iter()
        .filter_map(|p| {
            let id = *ids.get(p.public_key.0.as_slice())?;
            let age = p.last_handshake_unix.map_or(-1, |t| (now - i64::try_from(t).unwrap_or(now)).max(0) * 1000);
            let mut h = pb::PeerHealth {
                node_id: id,
                handshake_age_ms: age,
                probe_rtt_ms: -1.0,
                probe_loss: 0.0,
                probe_rtt_p50_ms: -1.0,
                probe_rtt_p95_ms: -1.0,
                probe_up: false,
                rx_bytes: p.rx_bytes,
                tx_bytes: p.tx_bytes,
                endpoint: p.endpoint.map(|e| e.to_string()).unwrap_or_default(),
                ..pb::PeerHealth::default()
            };
            if let Some(info) = paths.get(&p.public_key) {
                h.path = info.path.to_owned();
                h.relay_region.clone_from(&info.relay_region);
                h.path_switches = info.switches;
                h.direct_secs = info.direct_secs;
                h.relay_secs = info.relay_secs;
            }
            if let Some(e) = probes.peers.get(&id) {
                h.probe_rtt_ms = ms(e.stats.last_rtt());
                h.probe_loss = e.stats.loss_ratio();
                h.probe_rtt_p50_ms = ms(e.stats.quantile(0.5));
                h.probe_rtt_p95_ms = ms(e.stats.quantile(0.95));
                h.probe_up = e.stats.reach() == Reach::Up;
            }
            Some(h)
        })
        .collect();
    let (rx, tx) = status.peers.iter().fold((0, 0), |(r, t), p| (r + p.rx_bytes, t + p.tx_bytes));
    pb::HealthReport {
        peers,
        routes: routes
            .iter()
            .map(|r| {
                let owned = probes.owned.get(&r.prefix.trunc());
                pb::RouteHealth {
                    prefix: r.prefix.to_string(),
                    healthy: r.healthy,
                    detail: r.detail.clone(),
                    owner: owned.is_some(),
                    owner_since_unix: owned.map_or(0, |o| o.since_unix),
                }
            })
            .collect(),
        counters: Some(pb::DataplaneCounters { rx_bytes: rx, tx_bytes: tx, ..Default::default() }),
        backend: status.backend.as_ref().map(|b| b.kind.to_string()).unwrap_or_default(),
    }
}

/// The routes this gateway advertises, with their options and this
/// gateway's current addresses on each site LAN (looked up now: the
/// session re-sends the advertisement when they change).
pub(super) fn advertisement(cc: &ControlConfig) -> pb::RouteAdvertisement {
    pb::RouteAdvertisement {
        prefixes: cc.advertise_routes.iter().map(ToString::to_string).collect(),
        options: cc
            .advertise_routes
            .iter()
            .map(|prefix| {
                let o = cc.route_options.get(prefix).cloned().unwrap_or_default();
                pb::RouteOptions {
                    prefix: prefix.to_string(),
                    virtual_addresses: o.virtual_addresses.iter().map(ToString::to_string).collect(),
                    snat: o.snat,
                    lan_addresses: crate::site::lan_addresses(prefix, &o.virtual_addresses)
                        .iter()
                        .map(ToString::to_string)
                        .collect(),
                }
            })
            .collect(),
    }
}

/// The report of a local switch, stamped now.
pub(super) fn failover_report(e: probe::failover::Event) -> pb::FailoverReport {
    let at = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(0));
    pb::FailoverReport {
        prefix: e.prefix.to_string(),
        from_node: e.from,
        to_node: e.to,
        reason: e.reason,
        at_unix_ms: at,
    }
}
