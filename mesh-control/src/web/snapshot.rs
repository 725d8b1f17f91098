//! The page's data: a pure function from what `AdminService` answers
//! (`ListNodes`, `ListRoutes`, `GetStatus`'s peer links, `ListAudit`) to
//! the JSON snapshot the page draws. No second source of truth: the
//! caller ([`super::Inputs::gather`]) makes the same calls the handlers do.

use std::collections::{BTreeMap, BTreeSet};

use mesh_proto::v1 as pb;
use serde::Serialize;

use crate::engine::convert::EXPIRING_SOON_SECS;

/// A probe report older than this says nothing about a gateway any more.
pub const STALE_REPORT_SECS: i64 = 10;

/// How many audit entries the page shows.
pub const AUDIT_ENTRIES: u32 = 20;

/// What the snapshot is built from.
#[derive(Debug, Default, Clone)]
pub struct Inputs {
    /// Unix seconds.
    pub now: i64,
    /// Every node, as `ListNodes` answers.
    pub nodes: Vec<pb::Node>,
    /// Every route, as `ListRoutes` answers.
    pub routes: Vec<pb::Route>,
    /// Probe reports, as `GetStatus` answers.
    pub peers: Vec<pb::PeerLink>,
    /// The latest audit entries, oldest first.
    pub audit: Vec<pb::AuditEntry>,
}

/// The page's data.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Snapshot {
    /// Unix seconds.
    pub now: i64,
    /// Sites: gateways serving the same prefixes.
    pub sites: Vec<Site>,
    /// Every gateway.
    pub gateways: Vec<Gateway>,
    /// Every probe report between two gateways.
    pub links: Vec<Link>,
    /// Per ordered site pair, the link between the sites' primaries.
    pub site_pairs: Vec<SitePair>,
    /// Every route.
    pub routes: Vec<Route>,
    /// The last [`AUDIT_ENTRIES`] audit entries, newest first.
    pub audit: Vec<Audit>,
    /// Gateways whose key expires within 7 days (or has expired).
    pub expiring: Vec<Expiring>,
}

/// A site.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Site {
    /// Its name (the gateways' common name before `_gw` / `-gw`).
    pub name: String,
    /// The prefixes its gateways serve.
    pub prefixes: Vec<String>,
    /// Its gateways' names.
    pub gateways: Vec<String>,
}

/// A gateway (any node).
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Gateway {
    /// Node name.
    pub name: String,
    /// Its site's name.
    pub site: String,
    /// `primary` (first in control's order for its site's prefixes),
    /// `backup`, or `none` (serves no route).
    pub role: &'static str,
    /// Holds the site's virtual gateway address.
    pub owner: bool,
    /// Connected to control.
    pub online: bool,
    /// `up` or `down`: down when offline at control, or when every fresh
    /// probe report on it from an online peer says unreachable (a gateway
    /// that died without closing its stream is seen by its peers first).
    pub state: &'static str,
    /// Why it is down (empty when up).
    pub down_reason: String,
    /// WireGuard backend.
    pub backend: String,
    /// Unix seconds.
    pub key_expiry: i64,
}

/// One gateway's probes of another.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Link {
    /// Prober.
    pub from: String,
    /// Probed.
    pub to: String,
    /// The prober sees it reachable.
    pub up: bool,
    /// Median RTT, ms (none: no answered probe in the window).
    pub p50_ms: Option<f64>,
    /// 95th percentile RTT, ms. (Agents report no p99.)
    pub p95_ms: Option<f64>,
    /// Lost share, 0..1.
    pub loss: f64,
    /// Since the last WireGuard handshake, ms (none: never).
    pub handshake_age_ms: Option<i64>,
    /// The endpoint the prober's WireGuard sends to (empty: unknown).
    pub endpoint: String,
    /// How the prober's packets travel: `direct`, `relay (fsn)`, or empty
    /// (unknown: no relays, or an agent before capability 7).
    pub path: String,
    /// Path switches since the prober's agent started.
    pub path_switches: u64,
    /// Bytes the prober received from the probed gateway, and sent to it.
    pub rx_bytes: u64,
    /// See `rx_bytes`.
    pub tx_bytes: u64,
    /// Age of the report at control, seconds.
    pub report_age_secs: i64,
}

/// The link between two sites' primaries.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct SitePair {
    /// From site.
    pub from: String,
    /// To site.
    pub to: String,
    /// The link measured (from primary to primary, else the best up link).
    pub link: Option<Link>,
}

/// A route.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Route {
    /// Prefix.
    pub prefix: String,
    /// Serving gateway.
    pub gateway: String,
    /// Healthy by its gateway's checks.
    pub healthy: bool,
    /// First in control's order.
    pub primary: bool,
    /// Holds the virtual address.
    pub owner: bool,
    /// Position in control's order (-1: not routed).
    pub rank: i32,
    /// Approved.
    pub approved: bool,
    /// Why it is refused (empty: usable).
    pub refusal: String,
    /// Since when its gateway has owned it (unix seconds; 0: not owner).
    pub owner_since: i64,
    /// The latest audit entry about this prefix (unix seconds; 0: none
    /// among the entries shown).
    pub last_change: i64,
}

/// An audit entry.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Audit {
    /// Entry id.
    pub id: u64,
    /// Unix seconds.
    pub at: i64,
    /// Who.
    pub actor: String,
    /// What.
    pub action: String,
    /// On what.
    pub subject: String,
}

/// A key near its expiry.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Expiring {
    /// Node name.
    pub name: String,
    /// Unix seconds.
    pub key_expiry: i64,
    /// Already expired.
    pub expired: bool,
}

/// The site name of a gateway called `name`: what precedes `_gw` or `-gw`.
#[must_use]
pub fn site_of_name(name: &str) -> Option<&str> {
    ["_gw", "-gw"].iter().filter_map(|sep| name.find(sep)).min().map(|i| &name[..i]).filter(|s| !s.is_empty())
}

fn link(l: &pb::PeerLink) -> Option<Link> {
    let h = l.health.as_ref()?;
    let ms = |v: f64| (v >= 0.0).then_some(v);
    Some(Link {
        from: l.from_name.clone(),
        to: l.to_name.clone(),
        up: h.probe_up,
        p50_ms: ms(h.probe_rtt_p50_ms),
        p95_ms: ms(h.probe_rtt_p95_ms),
        loss: h.probe_loss,
        handshake_age_ms: (h.handshake_age_ms >= 0).then_some(h.handshake_age_ms),
        endpoint: h.endpoint.clone(),
        path: crate::relay::paths::Path::of(h).map(|p| p.to_string()).unwrap_or_default(),
        path_switches: h.path_switches,
        rx_bytes: h.rx_bytes,
        tx_bytes: h.tx_bytes,
        report_age_secs: l.report_age_secs,
    })
}

/// Builds the snapshot.
#[must_use]
pub fn build(i: &Inputs) -> Snapshot {
    let online: BTreeMap<&str, bool> = i.nodes.iter().map(|n| (n.name.as_str(), n.online)).collect();
    let links: Vec<Link> = i.peers.iter().filter_map(link).collect();

    // Sites: the gateways serving the same set of prefixes.
    let mut served: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
    for r in i.routes.iter().filter(|r| r.approved) {
        served.entry(r.node_name.as_str()).or_default().insert(r.prefix.as_str());
    }
    let mut groups: BTreeMap<BTreeSet<&str>, Vec<&str>> = BTreeMap::new();
    for n in &i.nodes {
        groups.entry(served.get(n.name.as_str()).cloned().unwrap_or_default()).or_default().push(n.name.as_str());
    }
    let mut sites: Vec<Site> = groups
        .into_iter()
        .map(|(prefixes, mut gws)| {
            gws.sort_unstable();
            let by_name: BTreeSet<&str> = gws.iter().filter_map(|g| site_of_name(g)).collect();
            let name = match (by_name.len(), prefixes.first()) {
                (1, _) => by_name.first().map(|s| (*s).to_owned()).unwrap_or_default(),
                (_, Some(p)) => (*p).to_owned(),
                (_, None) => "no routes".to_owned(),
            };
            Site {
                name,
                prefixes: prefixes.into_iter().map(str::to_owned).collect(),
                gateways: gws.into_iter().map(str::to_owned).collect(),
            }
        })
        .collect();
    sites.sort_by(|a, b| a.name.cmp(&b.name));
    let site_name = |gw: &str| sites.iter().find(|s| s.gateways.iter().any(|g| g == gw)).map(|s| s.name.clone());

    let gateways: Vec<Gateway> = i
        .nodes
        .iter()
        .map(|n| {
            let mine: Vec<&pb::Route> = i.routes.iter().filter(|r| r.node_id == n.id && r.approved).collect();
            let role = match (mine.is_empty(), mine.iter().any(|r| r.primary)) {
                (true, _) => "none",
                (false, true) => "primary",
                (false, false) => "backup",
            };
            // Fresh reports from peers that are themselves connected.
            let verdicts: Vec<bool> = links
                .iter()
                .filter(|l| l.to == n.name && l.report_age_secs <= STALE_REPORT_SECS)
                .filter(|l| online.get(l.from.as_str()).copied().unwrap_or(false))
                .map(|l| l.up)
                .collect();
            let down_reason = if !n.online {
                "offline at control".to_owned()
            } else if !verdicts.is_empty() && verdicts.iter().all(|up| !up) {
                format!("unreachable from all {} reporting peers", verdicts.len())
            } else {
                String::new()
            };
            Gateway {
                name: n.name.clone(),
                site: site_name(&n.name).unwrap_or_default(),
                role,
                owner: mine.iter().any(|r| r.owner),
                online: n.online,
                state: if down_reason.is_empty() { "up" } else { "down" },
                down_reason,
                backend: n.backend.clone(),
                key_expiry: n.key_expiry_unix,
            }
        })
        .collect();

    let mut site_pairs = Vec::new();
    for a in &sites {
        for b in sites.iter().filter(|b| b.name != a.name) {
            let primary = |s: &Site| {
                gateways.iter().find(|g| g.site == s.name && g.role == "primary" && g.state == "up").map(|g| &g.name)
            };
            let between: Vec<&Link> =
                links.iter().filter(|l| a.gateways.contains(&l.from) && b.gateways.contains(&l.to)).collect();
            let chosen = match (primary(a), primary(b)) {
                (Some(x), Some(y)) => between.iter().find(|l| &l.from == x && &l.to == y).copied(),
                _ => None,
            }
            .or_else(|| {
                between
                    .iter()
                    .filter(|l| l.up)
                    .min_by(|x, y| x.p50_ms.unwrap_or(f64::MAX).total_cmp(&y.p50_ms.unwrap_or(f64::MAX)))
                    .copied()
            });
            site_pairs.push(SitePair { from: a.name.clone(), to: b.name.clone(), link: chosen.cloned() });
        }
    }

    let routes = i
        .routes
        .iter()
        .map(|r| Route {
            prefix: r.prefix.clone(),
            gateway: r.node_name.clone(),
            healthy: r.healthy,
            primary: r.primary,
            owner: r.owner,
            rank: r.rank,
            approved: r.approved,
            refusal: r.refusal.clone(),
            owner_since: r.owner_since_unix,
            last_change: i.audit.iter().filter(|e| e.subject.contains(&r.prefix)).map(|e| e.at_unix).max().unwrap_or(0),
        })
        .collect();

    let audit = i
        .audit
        .iter()
        .rev()
        .take(AUDIT_ENTRIES as usize)
        .map(|e| Audit {
            id: e.id,
            at: e.at_unix,
            actor: e.actor.clone(),
            action: e.action.clone(),
            subject: e.subject.clone(),
        })
        .collect();

    let mut expiring: Vec<Expiring> = i
        .nodes
        .iter()
        .filter(|n| n.key_expiry_unix > 0 && n.key_expiry_unix - i.now < EXPIRING_SOON_SECS)
        .map(|n| Expiring { name: n.name.clone(), key_expiry: n.key_expiry_unix, expired: n.key_expiry_unix <= i.now })
        .collect();
    expiring.sort_by_key(|e| e.key_expiry);

    Snapshot { now: i.now, sites, gateways, links, site_pairs, routes, audit, expiring }
}

#[cfg(test)]
mod tests;
