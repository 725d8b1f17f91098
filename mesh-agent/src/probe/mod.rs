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
//! The site's gateways probe each other on the site LAN as well as over the
//! overlay ([`lan`]): a peer counts as available while either path answers,
//! so a broken overlay path between them alone never splits the site.

pub mod failover;
pub mod lan;
pub mod owner;
pub mod stats;
pub use mesh_agent_formats::probe_wire as wire;

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, VecDeque},
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
    /// Its address on the LAN of a site both serve, and that site's prefix:
    /// also probed there (see [`lan`]).
    pub lan: Option<(IpAddr, IpNet)>,
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
    /// Counts the plans sent: the prober's [`Overrides`] say which plan
    /// they were decided on.
    pub version: u64,
}

/// The local failover's decision: the prefixes routed through another
/// gateway than control's primary, and the plan it was made on.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Overrides {
    /// The [`Plan::version`] the decision was made on.
    pub plan: u64,
    /// Prefix -> the node id of the gateway it goes through.
    pub routes: BTreeMap<IpNet, u64>,
}

/// Probe results of one peer.
#[derive(Clone, Debug)]
pub struct PeerEntry {
    /// Its name.
    pub name: String,
    /// The probed address.
    pub addr: IpAddr,
    /// The statistics (over the overlay).
    pub stats: PeerStats,
    /// A site peer's LAN address and its reachability there.
    pub lan: Option<(IpAddr, Reach)>,
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
            self.peers.values().map(|p| (peer(p), p.stats.reach().gauge())),
        )?;
        gauges(
            e,
            "mesh_agent_peer_lan_probe_up",
            "A site peer's probes on the site LAN: 1 answered, 0 down, -1 unknown.",
            self.peers.values().filter_map(|p| Some((peer(p), p.lan?.1.gauge()))),
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
    /// Prefixes routed through another gateway than control's primary
    /// (published after every new plan, even when unchanged).
    pub overrides: watch::Sender<Overrides>,
    /// Every switch, for control's audit log.
    pub events: mpsc::Sender<failover::Event>,
    /// Statistics for metrics and health reports.
    pub shared: SharedProbe,
    /// The prefixes whose site side this gateway owns (the site module
    /// holds their virtual addresses).
    pub owned: watch::Sender<owner::Ownership>,
}

/// Probing one peer along one path.
#[derive(Debug)]
struct Path {
    stats: PeerStats,
    next_send: Instant,
    pending: VecDeque<(u64, Instant)>,
}

impl Path {
    fn new(cfg: &ProbeConfig) -> Self {
        Self { stats: PeerStats::new(cfg.window, cfg.down_after), next_send: Instant::now(), pending: VecDeque::new() }
    }

    /// Matches a reply to its request; `false` if it matches none.
    fn answered(&mut self, seq: u64, now: Instant) -> bool {
        let Some(i) = self.pending.iter().position(|(s, _)| *s == seq) else { return false };
        let Some((_, sent)) = self.pending.remove(i) else { return false };
        self.stats.answered(now.duration_since(sent));
        true
    }

    /// Counts the requests that timed out as lost: `None` if none did,
    /// else whether the peer just went down on this path.
    fn expire(&mut self, now: Instant, timeout: Duration) -> Option<bool> {
        let mut expired = None;
        while let Some(&(_, sent)) = self.pending.front()
            && now.duration_since(sent) >= timeout
        {
            self.pending.pop_front();
            let was = self.stats.reach();
            self.stats.lost();
            let down = was != Reach::Down && self.stats.reach() == Reach::Down;
            expired = Some(expired.unwrap_or(false) || down);
        }
        expired
    }

    /// A new request's sequence number if one is due, scheduling the next.
    fn due(&mut self, now: Instant, every: Duration, seq: &mut u64) -> Option<u64> {
        if now < self.next_send {
            return None;
        }
        *seq = seq.wrapping_add(1);
        self.pending.push_back((*seq, now));
        self.next_send = now + every;
        Some(*seq)
    }
}

/// A site peer's LAN address, the site's prefix, and the probing there.
#[derive(Debug)]
struct LanPath {
    addr: IpAddr,
    prefix: IpNet,
    path: Path,
}

struct Peer {
    name: String,
    addr: IpAddr,
    fast: bool,
    /// Over the overlay.
    overlay: Path,
    /// On the site LAN (a gateway of a site this one serves).
    lan: Option<LanPath>,
    /// Route states from its last reply or notice, on either path.
    routes: Vec<wire::RouteState>,
    /// When it became a probe target.
    since: Instant,
}

impl Peer {
    /// Reachability over both paths: up while either answers.
    fn reach(&self) -> Reach {
        let lan = self.lan.as_ref().map_or(Reach::Unknown, |l| l.path.stats.reach());
        match (self.overlay.stats.reach(), lan) {
            (Reach::Up, _) | (_, Reach::Up) => Reach::Up,
            (Reach::Down, _) | (_, Reach::Down) => Reach::Down,
            _ => Reach::Unknown,
        }
    }

    /// What this peer's probes say about `prefix`.
    fn sight(&self, prefix: &IpNet, now: Instant) -> owner::PeerSight {
        let entry = self.routes.iter().find(|r| r.prefix.trunc() == prefix.trunc());
        owner::PeerSight {
            reach: self.reach(),
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
/// The overlay socket answers only on the overlay interface `ifname`
/// (`SO_BINDTODEVICE`, renewed when the interface is recreated) and only
/// to mesh peers' overlay addresses: a request spoofed on the underlay
/// (whose reply would be up to 50 times its size, sent into the overlay) is
/// never answered, and until the interface exists nothing is. The LAN
/// sockets ([`lan`]) answer only the site peers' LAN addresses.
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
    let (mut lan_socks, mut lan_rx) = lan::LanSockets::new(cfg.port);
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
    let mut by_lan_addr: HashMap<IpAddr, u64> = HashMap::new();
    let mut routes: Vec<(IpNet, Vec<u64>)> = Vec::new();
    let (mut me, mut site, mut fresh, mut version) = (0u64, Vec::<(IpNet, Vec<u64>)>::new(), false, 0u64);
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
    // The overlay interface the socket is bound to (its index), and the LAN
    // interface of each site prefix with a LAN peer, checked every half
    // second.
    let mut bound: Option<u32> = None;
    let mut lan_ifs: BTreeMap<IpNet, String> = BTreeMap::new();
    let mut next_bind_check = Instant::now();
    let mut answered = 0u64;
    loop {
        if refresh_plan {
            refresh_plan = false;
            dirty = true;
            next_bind_check = Instant::now();
            let p = plan.borrow_and_update().clone();
            let mut next = BTreeMap::new();
            for t in p.targets {
                let old = peers.remove(&t.node_id);
                let (overlay, routes, since, old_lan) = match old {
                    Some(old) if old.addr == t.addr => (old.overlay, old.routes, old.since, old.lan),
                    _ => (Path::new(&cfg), Vec::new(), Instant::now(), None),
                };
                let lan = t.lan.map(|(addr, prefix)| match old_lan {
                    Some(l) if l.addr == addr => LanPath { prefix, ..l },
                    _ => LanPath { addr, prefix, path: Path::new(&cfg) },
                });
                next.insert(t.node_id, Peer { name: t.name, addr: t.addr, fast: t.fast, overlay, lan, routes, since });
            }
            peers = next;
            by_addr = peers.iter().map(|(id, p)| (p.addr, *id)).collect();
            by_lan_addr = peers.iter().filter_map(|(id, p)| Some((p.lan.as_ref()?.addr, *id))).collect();
            routes = p.routes;
            me = p.me;
            site = p.site;
            fresh |= p.fresh;
            version = p.version;
            // Decide on the new plan now: the feeder waits for it.
            tick.reset_immediately();
        }
        tokio::select! {
            r = sock.recv_from(&mut buf) => {
                let Ok((n, src)) = r else { continue };
                let Some(&node) = by_addr.get(&src.ip().to_canonical()) else {
                    // Only mesh peers are answered: nothing to reflect at others.
                    bad_packets += 1;
                    dirty = true;
                    continue;
                };
                if bound.is_none() {
                    continue;
                }
                let got = on_message(&buf[..n], src, node, false, &mut peers, &health, &owned, &mut bad_packets);
                dirty = true;
                if matches!(got, Got::Notice) {
                    // A handover: decide now, not at the next tick.
                    tick.reset_immediately();
                }
                if let Got::Request(reply) = got {
                    answered += 1;
                    if let Err(e) = sock.send_to(&reply, src).await {
                        tracing::debug!(%src, error = %e, "probe reply not sent");
                    }
                }
            }
            Some(d) = lan_rx.recv() => {
                let Some(&node) = by_lan_addr.get(&d.src.ip().to_canonical()) else {
                    bad_packets += 1;
                    dirty = true;
                    continue;
                };
                let got = on_message(&d.data, d.src, node, true, &mut peers, &health, &owned, &mut bad_packets);
                dirty = true;
                if matches!(got, Got::Notice) {
                    tick.reset_immediately();
                }
                if let Got::Request(reply) = got
                    && let Some((s, _)) = lan_socks.get(&d.ifname)
                {
                    answered += 1;
                    if let Err(e) = s.send_to(&reply, d.src).await {
                        tracing::debug!(src = %d.src, error = %e, "probe reply not sent on the LAN");
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
                    // The LAN sockets open once the overlay socket is bound
                    // to its interface (they share the port).
                    let prefixes: BTreeSet<IpNet> = peers.values().filter_map(|p| Some(p.lan.as_ref()?.prefix)).collect();
                    let mut wanted = BTreeMap::new();
                    lan_ifs.clear();
                    for prefix in prefixes {
                        if let Some((index, _, name)) = crate::site::lan_interface(&prefix, &[]) {
                            wanted.insert(name.clone(), index);
                            lan_ifs.insert(prefix, name);
                        }
                    }
                    if bound.is_some() {
                        lan_socks.sync(&wanted);
                    }
                }
                for p in peers.values_mut() {
                    if let Some(down) = p.overlay.expire(now, timeout) {
                        dirty = true;
                        if down {
                            tracing::warn!(peer = %p.name, addr = %p.addr, "peer stopped answering probes");
                        }
                    }
                    let every = if p.fast { fast } else { slow };
                    if let Some(seq) = p.overlay.due(now, every, &mut seq) {
                        // A send error (no route yet) is a lost probe like any other.
                        let _ = sock.send_to(&wire::Message::request(seq).encode(), dest(v6, p.addr, cfg.port)).await;
                    }
                    if let Some(l) = p.lan.as_mut() {
                        if let Some(down) = l.path.expire(now, timeout) {
                            dirty = true;
                            if down {
                                tracing::warn!(peer = %p.name, addr = %l.addr, "peer stopped answering probes on the site LAN");
                            }
                        }
                        // Without a socket on that LAN, requests are not
                        // even sent: the path stays unknown, not down.
                        if let Some((s, s_v6)) = lan_ifs.get(&l.prefix).and_then(|i| lan_socks.get(i))
                            && let Some(seq) = l.path.due(now, fast, &mut seq)
                        {
                            let _ = s.send_to(&wire::Message::request(seq).encode(), dest(s_v6, l.addr, cfg.port)).await;
                        }
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
                    // Tell every peer at once (see `wire`'s notices), on
                    // every path.
                    let notice = wire::Message::Notice { routes: route_states(&health.borrow(), &owned) }.encode();
                    for p in peers.values() {
                        let _ = sock.send_to(&notice, dest(v6, p.addr, cfg.port)).await;
                        if let Some(l) = &p.lan
                            && let Some((s, s_v6)) = lan_ifs.get(&l.prefix).and_then(|i| lan_socks.get(i))
                        {
                            let _ = s.send_to(&notice, dest(s_v6, l.addr, cfg.port)).await;
                        }
                    }
                }
                let decision = selector.evaluate(
                    now,
                    &routes,
                    |gw, prefix| {
                        let p = peers.get(&gw)?;
                        if p.reach() == Reach::Down {
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
                    let changed = cur.routes != decision.overrides || cur.plan != version;
                    if changed {
                        cur.routes.clone_from(&decision.overrides);
                        cur.plan = version;
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
                        .map(|(id, p)| {
                            let entry = PeerEntry {
                                name: p.name.clone(),
                                addr: p.addr,
                                stats: p.overlay.stats.clone(),
                                lan: p.lan.as_ref().map(|l| (l.addr, l.path.stats.reach())),
                            };
                            (*id, entry)
                        })
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

/// What a datagram from a peer was.
enum Got {
    /// A request: the reply to send.
    Request(Vec<u8>),
    /// A notice of a handover (the peer's route states are updated).
    Notice,
    /// A reply, or nothing usable.
    Other,
}

/// Handles a datagram from peer `node` on the overlay or (`on_lan`) the
/// site LAN.
#[allow(clippy::too_many_arguments)]
fn on_message(
    data: &[u8],
    src: SocketAddr,
    node: u64,
    on_lan: bool,
    peers: &mut BTreeMap<u64, Peer>,
    health: &watch::Receiver<Vec<RouteHealth>>,
    owned: &owner::Ownership,
    bad_packets: &mut u64,
) -> Got {
    let msg = match wire::Message::decode(data) {
        Ok(m) => m,
        Err(e) => {
            *bad_packets += 1;
            tracing::debug!(%src, error = %e, "not a probe message");
            return Got::Other;
        }
    };
    let Some(p) = peers.get_mut(&node) else { return Got::Other };
    match msg {
        wire::Message::Request { seq, version } => {
            let routes = route_states(&health.borrow(), owned);
            Got::Request(wire::Message::Reply { seq, version, routes }.encode())
        }
        wire::Message::Notice { routes } => {
            // A handover: follow it now, not at the next probe.
            tracing::debug!(peer = %p.name, on_lan, ?routes, "route notice");
            p.routes = routes;
            Got::Notice
        }
        wire::Message::Reply { seq, routes, .. } => {
            let now = Instant::now();
            let was = p.reach();
            let path = if on_lan {
                match p.lan.as_mut() {
                    Some(l) => &mut l.path,
                    None => return Got::Other,
                }
            } else {
                &mut p.overlay
            };
            if path.answered(seq, now) {
                p.routes = routes;
                if was != Reach::Up {
                    tracing::info!(peer = %p.name, on_lan, "peer answers probes");
                }
            }
            Got::Other
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> ProbeConfig {
        ProbeConfig { window: 10, down_after: 2, ..ProbeConfig::default() }
    }

    /// A path whose last two probes were answered (`Some(true)`), lost
    /// after one answered (`Some(false)`), or never resolved (`None`).
    fn path(answered: Option<bool>) -> Path {
        let mut p = Path::new(&cfg());
        if answered == Some(false) {
            p.stats.answered(Duration::from_millis(1));
        }
        for _ in 0..2 {
            match answered {
                Some(true) => p.stats.answered(Duration::from_millis(1)),
                Some(false) => p.stats.lost(),
                None => {}
            }
        }
        p
    }

    fn peer(overlay: Option<bool>, lan: Option<Option<bool>>) -> Peer {
        Peer {
            name: "gw".into(),
            addr: "100.64.0.2".parse().unwrap(),
            fast: true,
            overlay: path(overlay),
            lan: lan.map(|l| LanPath {
                addr: "198.18.20.2".parse().unwrap(),
                prefix: "198.18.20.0/24".parse().unwrap(),
                path: path(l),
            }),
            routes: Vec::new(),
            since: Instant::now(),
        }
    }

    #[test]
    fn a_site_peer_is_up_while_either_path_answers() {
        assert_eq!(peer(Some(true), None).reach(), Reach::Up);
        assert_eq!(peer(Some(false), None).reach(), Reach::Down);
        assert_eq!(peer(None, None).reach(), Reach::Unknown);
        // The overlay path broken, the LAN answers: up (no split brain).
        assert_eq!(peer(Some(false), Some(Some(true))).reach(), Reach::Up);
        assert_eq!(peer(Some(true), Some(Some(false))).reach(), Reach::Up);
        // Both lost: down; one lost, the other unresolved: down.
        assert_eq!(peer(Some(false), Some(Some(false))).reach(), Reach::Down);
        assert_eq!(peer(Some(false), Some(None)).reach(), Reach::Down);
        assert_eq!(peer(None, Some(None)).reach(), Reach::Unknown);
    }

    #[test]
    fn a_path_matches_replies_and_counts_timeouts() {
        let mut p = Path::new(&cfg());
        let (t0, mut seq) = (Instant::now(), 7u64);
        let every = Duration::from_millis(100);
        let first = p.due(t0, every, &mut seq).unwrap();
        assert!(p.due(t0 + Duration::from_millis(50), every, &mut seq).is_none(), "not yet due");
        let second = p.due(t0 + every, every, &mut seq).unwrap();
        assert_ne!(first, second);
        assert!(!p.answered(999, t0 + every), "a reply to nothing pending");
        assert!(p.answered(second, t0 + every));
        assert_eq!(p.expire(t0 + every, Duration::from_millis(500)), None, "nothing timed out yet");
        // The first request times out: lost, but one loss is not down.
        assert_eq!(p.expire(t0 + Duration::from_secs(1), Duration::from_millis(500)), Some(false));
        assert!(p.pending.is_empty());
    }
}
