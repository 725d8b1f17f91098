//! Health probes between agents over the overlay, and local failover.
//!
//! Every agent answers a small UDP echo ([`wire`]) on the probe port of its
//! overlay addresses and probes its peers: the gateways it routes a prefix
//! through several times a second, other peers every few seconds. From the
//! answers it keeps per-peer RTT, loss and reachability ([`stats`]) for the
//! metrics endpoint and the health reports to control, and decides which
//! gateway each prefix goes through ([`failover`]): a gateway whose probes
//! are lost, or which answers that it cannot reach the prefix, is skipped at
//! once, without waiting for control. The decision is published as
//! overrides of control's primaries, applied by the control module's view
//! feeder, and every switch is queued as an event for control's audit log.
//!
//! At a gateway, the prober also decides which of the site's gateways owns
//! each prefix it serves ([`owner`]): the owner holds the site's virtual
//! gateway address (the `site` module acts on [`Outputs::owned`]) and says
//! so in its probe replies, and remote agents route the prefix through it.

pub mod failover;
pub mod owner;
pub mod stats;
pub mod wire;

use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use ipnet::IpNet;
use mesh_metrics::{
    Label,
    family::{counter, counters, gauges, histograms},
    prometheus_client::encoding::DescriptorEncoder,
};
use tokio::{
    net::UdpSocket,
    sync::{mpsc, watch},
};

use crate::{config::ProbeConfig, reach::RouteHealth};
use stats::{PeerStats, Reach};

/// A peer to probe.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    /// Its node id at control.
    pub node_id: u64,
    /// Its name (metrics labels, logs).
    pub name: String,
    /// Its overlay address.
    pub addr: IpAddr,
    /// Probed at the gateway rate (this node routes a prefix through it).
    pub fast: bool,
}

/// What to probe and which routes to decide, from the current view.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// The peers.
    pub targets: Vec<Target>,
    /// Prefixes this node routes into the overlay, with control's gateway
    /// order (primary first).
    pub routes: Vec<(IpNet, Vec<u64>)>,
    /// This node's id at control (0: unknown).
    pub me: u64,
    /// Prefixes this node serves as a gateway, with control's gateway order
    /// (which contains this node).
    pub site: Vec<(IpNet, Vec<u64>)>,
    /// The plan comes from a view control sent in this run (not from the
    /// view saved by an earlier run, whose order may be stale).
    pub fresh: bool,
}

/// Probe results of one peer.
#[derive(Clone, Debug)]
pub struct PeerEntry {
    /// Its name.
    pub name: String,
    /// The probed address.
    pub addr: IpAddr,
    /// The statistics.
    pub stats: PeerStats,
}

/// What the prober knows, for metrics and health reports.
#[derive(Clone, Debug, Default)]
pub struct ProbeState {
    /// Per node id.
    pub peers: BTreeMap<u64, PeerEntry>,
    /// The gateway each routed prefix currently goes through.
    pub effective: BTreeMap<IpNet, u64>,
    /// Local switches per prefix since the start.
    pub switches: BTreeMap<IpNet, u64>,
    /// Datagrams on the probe port that were not probe messages.
    pub bad_packets: u64,
    /// Whether the probe socket is open.
    pub listening: bool,
    /// Probe requests answered.
    pub requests_answered: u64,
    /// The prefixes whose site side this gateway owns.
    pub owned: owner::Ownership,
    /// Changes of ownership per prefix since the start.
    pub owner_changes: BTreeMap<IpNet, u64>,
    /// The prefixes this node serves as a gateway.
    pub site_prefixes: Vec<IpNet>,
}

/// [`ProbeState`] shared with the metrics endpoint and the control session.
pub type SharedProbe = Arc<Mutex<ProbeState>>;

impl ProbeState {
    /// Writes per-peer RTT histograms, loss, reachability, probe totals,
    /// local route switches and site ownership as metric families (on each
    /// scrape).
    pub fn encode_metrics(&self, e: &mut DescriptorEncoder<'_>) -> std::fmt::Result {
        let peer = |p: &PeerEntry| [("peer", Label::from(p.name.as_str()))];
        histograms(
            e,
            "mesh_agent_peer_rtt_seconds",
            "Round-trip time of answered probes over the overlay.",
            self.peers.values().map(|p| (peer(p), p.stats.rtt_buckets())),
        )?;
        gauges(
            e,
            "mesh_agent_peer_probe_loss_ratio",
            "Share of lost probes over the recent window.",
            self.peers.values().map(|p| (peer(p), p.stats.loss_ratio())),
        )?;
        gauges(
            e,
            "mesh_agent_peer_probe_up",
            "1 if the last probe was answered, 0 if the peer is down, -1 unknown.",
            self.peers.values().map(|p| {
                let up = match p.stats.reach() {
                    Reach::Up => 1i64,
                    Reach::Down => 0,
                    Reach::Unknown => -1,
                };
                (peer(p), up)
            }),
        )?;
        counters(
            e,
            "mesh_agent_peer_probes_answered",
            "Probes answered.",
            self.peers.values().map(|p| (peer(p), p.stats.totals().0)),
        )?;
        counters(
            e,
            "mesh_agent_peer_probes_lost",
            "Probes lost.",
            self.peers.values().map(|p| (peer(p), p.stats.totals().1)),
        )?;
        let prefix = |p: &IpNet| [("prefix", Label::new(p))];
        counters(
            e,
            "mesh_agent_route_local_failovers",
            "Switches of a prefix's gateway decided by this agent's probes.",
            self.switches.iter().map(|(p, n)| (prefix(p), *n)),
        )?;
        gauges(
            e,
            "mesh_agent_route_owner",
            "1 while this gateway owns the prefix's site side (holds its virtual address).",
            self.site_prefixes.iter().map(|p| (prefix(p), i64::from(self.owned.contains_key(p)))),
        )?;
        gauges(
            e,
            "mesh_agent_route_owner_since_timestamp_seconds",
            "Since when this gateway has owned the prefix's site side.",
            self.owned.iter().map(|(p, o)| (prefix(p), o.since_unix)),
        )?;
        counters(
            e,
            "mesh_agent_route_owner_changes",
            "Times this gateway took or gave up a prefix's site side.",
            self.owner_changes.iter().map(|(p, n)| (prefix(p), *n)),
        )?;
        counter(
            e,
            "mesh_agent_probe_requests_answered",
            "Probe requests this node answered (on the overlay, from mesh peers).",
            self.requests_answered,
        )?;
        counter(
            e,
            "mesh_agent_probe_bad_packets",
            "Datagrams on the probe port that were not probe messages.",
            self.bad_packets,
        )
    }
}

/// Where the prober sends its decisions.
#[derive(Debug)]
pub struct Outputs {
    /// Prefixes routed through another gateway than control's primary.
    pub overrides: watch::Sender<BTreeMap<IpNet, u64>>,
    /// Every switch, for control's audit log.
    pub events: mpsc::Sender<failover::Event>,
    /// Statistics for metrics and health reports.
    pub shared: SharedProbe,
    /// The prefixes whose site side this gateway owns (the site module
    /// holds their virtual addresses).
    pub owned: watch::Sender<owner::Ownership>,
}

struct Peer {
    name: String,
    addr: IpAddr,
    fast: bool,
    stats: PeerStats,
    next_send: Instant,
    pending: VecDeque<(u64, Instant)>,
    /// Route states from its last reply.
    routes: Vec<wire::RouteState>,
    /// When it became a probe target.
    since: Instant,
}

impl Peer {
    /// What this peer's probes say about `prefix`.
    fn sight(&self, prefix: &IpNet, now: Instant) -> owner::PeerSight {
        let entry = self.routes.iter().find(|r| r.prefix.trunc() == prefix.trunc());
        owner::PeerSight {
            reach: self.stats.reach(),
            known_for: now.duration_since(self.since),
            reports_unhealthy: entry.is_some_and(|r| !r.healthy),
            claims: entry.is_some_and(|r| r.owner),
        }
    }
}

/// What this node says about its routes in replies and notices.
fn route_states(health: &[RouteHealth], owned: &owner::Ownership) -> Vec<wire::RouteState> {
    health
        .iter()
        .map(|h| wire::RouteState {
            prefix: h.prefix,
            healthy: h.healthy,
            owner: owned.contains_key(&h.prefix.trunc()),
        })
        .collect()
}

/// Seconds since the epoch.
fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// The probe socket: dual-stack when IPv6 is available.
async fn bind(port: u16) -> std::io::Result<UdpSocket> {
    match UdpSocket::bind((Ipv6Addr::UNSPECIFIED, port)).await {
        Ok(s) => Ok(s),
        Err(_) => UdpSocket::bind((Ipv4Addr::UNSPECIFIED, port)).await,
    }
}

/// Maps an address to the socket's family (v4-mapped on a dual-stack one).
fn dest(sock_v6: bool, addr: IpAddr, port: u16) -> SocketAddr {
    match addr {
        IpAddr::V4(a) if sock_v6 => SocketAddr::new(IpAddr::V6(a.to_ipv6_mapped()), port),
        _ => SocketAddr::new(addr, port),
    }
}

/// The prober: answers probes, sends its own, decides local failover.
/// Runs until `plan`'s sender is dropped.
///
/// The socket answers only on the overlay interface `ifname`
/// (`SO_BINDTODEVICE`, renewed when the interface is recreated) and only
/// to mesh peers' addresses: a request spoofed on the underlay (whose
/// reply would be up to 50 times its size, sent into the overlay) is never
/// answered, and until the interface exists nothing is.
pub async fn run(
    cfg: ProbeConfig,
    ifname: String,
    mut plan: watch::Receiver<Plan>,
    health: watch::Receiver<Vec<RouteHealth>>,
    out: Outputs,
) {
    let sock = loop {
        match bind(cfg.port).await {
            Ok(s) => break s,
            Err(e) => {
                tracing::error!(port = cfg.port, error = %e, "cannot open the probe port; retrying in 5 s");
                tokio::time::sleep(Duration::from_secs(5)).await;
            }
        }
    };
    let v6 = sock.local_addr().is_ok_and(|a| a.is_ipv6());
    tracing::info!(port = cfg.port, "probe responder listening");
    let secs = Duration::from_secs_f64;
    let (fast, slow, timeout) = (secs(cfg.gateway_interval_secs), secs(cfg.peer_interval_secs), secs(cfg.timeout_secs));
    let mut selector = failover::Selector::new(secs(cfg.failback_hold_secs));
    // How long an unresolved peer (and this agent itself, without a view
    // from control) is given before the ownership decision counts it out:
    // time for `down_after` probes to be lost, plus a second.
    let grace = timeout + fast * cfg.down_after + Duration::from_secs(1);
    let started = Instant::now();
    let mut peers: BTreeMap<u64, Peer> = BTreeMap::new();
    let mut by_addr: HashMap<IpAddr, u64> = HashMap::new();
    let mut routes: Vec<(IpNet, Vec<u64>)> = Vec::new();
    let (mut me, mut site, mut fresh) = (0u64, Vec::<(IpNet, Vec<u64>)>::new(), false);
    let mut owned = owner::Ownership::new();
    let mut owner_changes: BTreeMap<IpNet, u64> = BTreeMap::new();
    let (mut effective, mut switches, mut bad_packets) = (BTreeMap::new(), BTreeMap::new(), 0u64);
    // Whether the shared state lags behind (published on the next tick).
    let mut dirty = true;
    // Sequence numbers start at a random point: a stale or forged reply
    // does not match a pending probe.
    let mut seq: u64 = rand::random();
    let mut tick = tokio::time::interval(fast.min(Duration::from_millis(50)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut buf = vec![0u8; 2048];
    let mut refresh_plan = true;
    // The overlay interface the socket is bound to (its index), checked
    // every half second.
    let mut bound: Option<u32> = None;
    let mut next_bind_check = Instant::now();
    let mut answered = 0u64;
    loop {
        if refresh_plan {
            refresh_plan = false;
            dirty = true;
            let p = plan.borrow_and_update().clone();
            let mut next = BTreeMap::new();
            for t in p.targets {
                let (stats, routes, since) = match peers.remove(&t.node_id) {
                    Some(old) if old.addr == t.addr => (old.stats, old.routes, old.since),
                    _ => (PeerStats::new(cfg.window, cfg.down_after), Vec::new(), Instant::now()),
                };
                next.insert(
                    t.node_id,
                    Peer {
                        name: t.name,
                        addr: t.addr,
                        fast: t.fast,
                        stats,
                        next_send: Instant::now(),
                        pending: VecDeque::new(),
                        routes,
                        since,
                    },
                );
            }
            peers = next;
            by_addr = peers.iter().map(|(id, p)| (p.addr, *id)).collect();
            routes = p.routes;
            me = p.me;
            site = p.site;
            fresh |= p.fresh;
        }
        tokio::select! {
            r = sock.recv_from(&mut buf) => {
                let Ok((n, src)) = r else { continue };
                let src_ip = src.ip().to_canonical();
                let Some(&node) = by_addr.get(&src_ip) else {
                    // Only mesh peers are answered: nothing to reflect at others.
                    bad_packets += 1;
                    dirty = true;
                    continue;
                };
                match wire::Message::decode(&buf[..n]) {
                    Err(e) => {
                        bad_packets += 1;
                        dirty = true;
                        tracing::debug!(%src, error = %e, "not a probe message");
                    }
                    Ok(wire::Message::Request { .. }) if bound.is_none() => {}
                    Ok(wire::Message::Request { seq, version }) => {
                        answered += 1;
                        let routes = route_states(&health.borrow(), &owned);
                        let reply = wire::Message::Reply { seq, version, routes }.encode();
                        if let Err(e) = sock.send_to(&reply, src).await {
                            tracing::debug!(%src, error = %e, "probe reply not sent");
                        }
                    }
                    Ok(wire::Message::Notice { routes }) => {
                        // A handover: follow it now, not at the next probe.
                        if let Some(p) = peers.get_mut(&node) {
                            tracing::debug!(peer = %p.name, ?routes, "route notice");
                            p.routes = routes;
                            dirty = true;
                        }
                    }
                    Ok(wire::Message::Reply { seq, routes, .. }) => {
                        let now = Instant::now();
                        if let Some(p) = peers.get_mut(&node)
                            && let Some(i) = p.pending.iter().position(|(s, _)| *s == seq)
                            && let Some((_, sent)) = p.pending.remove(i)
                        {
                            let was = p.stats.reach();
                            p.stats.answered(now.duration_since(sent));
                            p.routes = routes;
                            dirty = true;
                            if was != Reach::Up {
                                tracing::info!(peer = %p.name, addr = %p.addr, "peer answers probes");
                            }
                        }
                    }
                }
            }
            _ = tick.tick() => {
                let now = Instant::now();
                if now >= next_bind_check {
                    next_bind_check = now + Duration::from_millis(500);
                    let index = nix::net::if_::if_nametoindex(ifname.as_str()).ok();
                    if index != bound {
                        bound = match index {
                            Some(i) => match socket2::SockRef::from(&sock).bind_device(Some(ifname.as_bytes())) {
                                Ok(()) => {
                                    tracing::info!(interface = %ifname, "probe responder bound to the overlay interface");
                                    Some(i)
                                }
                                Err(e) => {
                                    tracing::warn!(interface = %ifname, error = %e, "cannot bind the probe socket to the overlay interface; not answering");
                                    None
                                }
                            },
                            None => None,
                        };
                    }
                }
                for p in peers.values_mut() {
                    while let Some(&(_, sent)) = p.pending.front() && now.duration_since(sent) >= timeout {
                        p.pending.pop_front();
                        let was = p.stats.reach();
                        p.stats.lost();
                        dirty = true;
                        if was != Reach::Down && p.stats.reach() == Reach::Down {
                            tracing::warn!(peer = %p.name, addr = %p.addr, "peer stopped answering probes");
                        }
                    }
                    if now >= p.next_send {
                        seq = seq.wrapping_add(1);
                        let msg = wire::Message::request(seq).encode();
                        // A send error (no route yet) is a lost probe like any other.
                        let _ = sock.send_to(&msg, dest(v6, p.addr, cfg.port)).await;
                        p.pending.push_back((seq, now));
                        p.next_send = now + if p.fast { fast } else { slow };
                    }
                }
                // This gateway's own site prefixes: who owns them.
                let ready = fresh || now.duration_since(started) >= grace;
                let healthy: BTreeMap<IpNet, bool> =
                    health.borrow().iter().map(|h| (h.prefix.trunc(), h.healthy)).collect();
                let mut next = owner::Ownership::new();
                for (prefix, order) in &site {
                    let ok = healthy.get(prefix).copied().unwrap_or(false);
                    let sight = |gw: u64| peers.get(&gw).map(|p| p.sight(prefix, now));
                    if owner::claims(me, order, ok, ready, grace, sight) {
                        let since_unix = owned.get(prefix).map_or_else(unix_now, |o| o.since_unix);
                        next.insert(*prefix, owner::Owned { since_unix, first: order.first() == Some(&me) });
                    }
                }
                if next != owned {
                    for prefix in next.keys().filter(|p| !owned.contains_key(p)) {
                        tracing::warn!(%prefix, "this gateway now owns the site side of the prefix");
                        *owner_changes.entry(*prefix).or_default() += 1;
                    }
                    for prefix in owned.keys().filter(|p| !next.contains_key(p)) {
                        tracing::warn!(%prefix, "this gateway no longer owns the site side of the prefix");
                        *owner_changes.entry(*prefix).or_default() += 1;
                    }
                    owned = next;
                    out.owned.send_replace(owned.clone());
                    dirty = true;
                    // Tell every peer at once (see `wire`'s notices).
                    let notice = wire::Message::Notice { routes: route_states(&health.borrow(), &owned) }.encode();
                    for p in peers.values() {
                        let _ = sock.send_to(&notice, dest(v6, p.addr, cfg.port)).await;
                    }
                }
                let decision = selector.evaluate(
                    now,
                    &routes,
                    |gw, prefix| {
                        let p = peers.get(&gw)?;
                        if p.stats.reach() == Reach::Down {
                            return Some(format!("probes to {} lost", p.name));
                        }
                        p.sight(prefix, now)
                            .reports_unhealthy
                            .then(|| format!("{} reports {prefix} unreachable", p.name))
                    },
                    |prefix, order| owner::claimant(order, |gw| peers.get(&gw).map(|p| p.sight(prefix, now))),
                );
                for e in &decision.events {
                    let name = |id: u64| peers.get(&id).map_or_else(|| format!("node-{id}"), |p| p.name.clone());
                    tracing::warn!(prefix = %e.prefix, from = %name(e.from), to = %name(e.to), reason = %e.reason, "route failover (local)");
                    *switches.entry(e.prefix).or_default() += 1;
                    dirty = true;
                    if out.events.try_send(e.clone()).is_err() {
                        tracing::warn!("failover event queue full; control will not see this switch in its audit log");
                    }
                }
                out.overrides.send_if_modified(|cur| {
                    let changed = *cur != decision.overrides;
                    if changed {
                        cur.clone_from(&decision.overrides);
                    }
                    changed
                });
                if effective != decision.effective {
                    effective = decision.effective;
                    dirty = true;
                }
                // Published only when something changed: most ticks only send.
                if dirty && let Ok(mut s) = out.shared.lock() {
                    s.peers = peers
                        .iter()
                        .map(|(id, p)| (*id, PeerEntry { name: p.name.clone(), addr: p.addr, stats: p.stats.clone() }))
                        .collect();
                    s.effective.clone_from(&effective);
                    s.switches.clone_from(&switches);
                    s.bad_packets = bad_packets;
                    s.requests_answered = answered;
                    s.listening = true;
                    s.owned.clone_from(&owned);
                    s.owner_changes.clone_from(&owner_changes);
                    s.site_prefixes = site.iter().map(|(p, _)| *p).collect();
                    dirty = false;
                }
            }
            r = plan.changed() => {
                if r.is_err() {
                    return;
                }
                refresh_plan = true;
            }
        }
    }
}
