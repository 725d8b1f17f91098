//! The path manager: how each peer's packets travel, direct or through a
//! relay, when control lists relays.
//!
//! - **Discovery.** The node's public UDP mapping comes from the relays'
//!   reflectors, asked from the WireGuard port ([`raw`]); the node reports
//!   it to control with its configured endpoints and its home relay
//!   (`relay:<region>`) as its endpoint candidates.
//! - **Checks.** Disco pings ([`disco`]) go from the WireGuard port to each
//!   peer's candidates; authenticated pongs say which direct paths work
//!   both ways. A verified ping from an address that is no candidate makes
//!   it one (a NAT mapping made for us, as ICE's peer-reflexive candidates).
//! - **Choice.** [`select`] picks direct or relay per peer; the chosen
//!   endpoint (a candidate, or the peer's local relay proxy, see [`relay`])
//!   goes to the view feeder, which pins it on the WireGuard peer.
//!
//! Without relays in the view, nothing here runs and endpoints are control's.

pub mod disco;
pub mod raw;
pub mod relay;
pub mod select;

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use mesh_proto::v1 as pb;
use tokio::sync::watch;

use crate::keys::PublicKey;
use select::{Path, PeerPath};

/// How often paths are decided and candidates pinged.
const TICK: Duration = Duration::from_millis(250);
/// While a peer's direct path answers, its other candidates are pinged
/// only every this many ticks; so is a candidate that went silent
/// ([`select::SILENT_AFTER`]).
const OTHER_EVERY: u64 = 4;
/// How often the reflectors are asked for the node's mapping.
const REFLECT_EVERY: Duration = Duration::from_secs(20);

/// One peer's path, as metrics, reports and `status` show it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PathInfo {
    /// The peer's node name.
    pub name: String,
    /// `direct` or `relay`.
    pub path: &'static str,
    /// The relay's region while relayed.
    pub relay_region: String,
    /// Switches since the agent started.
    pub switches: u64,
    /// Seconds on each path since the agent started.
    pub direct_secs: f64,
    /// Seconds through a relay.
    pub relay_secs: f64,
}

/// The paths by peer, shared with the metrics and the health reports.
pub type SharedPaths = Arc<Mutex<BTreeMap<PublicKey, PathInfo>>>;

/// What the path manager needs from the agent.
#[derive(Debug)]
pub struct Inputs {
    /// The node's WireGuard private key file (disco's authentication; read
    /// again when control's view names another key: a rotation).
    pub key_path: std::path::PathBuf,
    /// The WireGuard port (side channel and proxies' destination).
    pub listen_port: u16,
    /// Endpoints from the configuration, reported first.
    pub configured: Vec<String>,
    /// The home relay's region (`None`: the view's first relay).
    pub home: Option<String>,
}

/// Where the path manager's decisions go.
#[derive(Debug)]
pub struct Outputs {
    /// The endpoint per peer, for the view feeder.
    pub paths: watch::Sender<BTreeMap<PublicKey, SocketAddr>>,
    /// The node's endpoint candidates, for the control session.
    pub candidates: watch::Sender<Vec<String>>,
    /// For metrics and reports.
    pub shared: SharedPaths,
}

/// One peer, as the manager knows it.
#[derive(Debug)]
struct Peer {
    name: String,
    key: disco::PairKey,
    path: PeerPath,
    /// Candidates from control, in order.
    listed: Vec<SocketAddr>,
    /// The last address a verified ping came from, when not listed.
    learned: Option<SocketAddr>,
    /// Its home relay region, `None` for a peer that attaches to no relay
    /// (an agent before capability 7, or one with `relays = false`).
    home: Option<String>,
}

/// The candidates of a control peer entry, and its home relay region.
/// `None` for a peer with only IPv6 endpoints: disco is IPv4 only and
/// could never find its direct path, so it is left alone (control's
/// endpoints, never relayed) rather than sent through a relay for good.
fn candidates_of(p: &pb::Peer) -> Option<(Vec<SocketAddr>, Option<String>)> {
    let addrs: Vec<SocketAddr> = p.endpoints.iter().filter_map(|e| e.parse().ok()).collect();
    let direct: Vec<SocketAddr> = addrs.iter().copied().filter(SocketAddr::is_ipv4).collect();
    if direct.is_empty() && !addrs.is_empty() {
        return None;
    }
    let home = p.endpoints.iter().find_map(|e| e.strip_prefix("relay:")).map(str::to_owned);
    Some((direct, home))
}

/// Runs while the agent runs: follows control's views (`plan`), the relay
/// tickets the session fetches (`tickets`), and decides paths.
pub async fn run(
    inputs: Inputs,
    mut plan: watch::Receiver<Option<Arc<pb::NodeView>>>,
    tickets: watch::Receiver<Option<String>>,
    out: Outputs,
) {
    let side = match raw::SideSocket::open(inputs.listen_port) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(port = inputs.listen_port, error = %e, "path manager: no raw socket on the WireGuard port; relays and endpoint discovery are off");
            return;
        }
    };
    let private_key = match crate::keys::load_or_generate(&inputs.key_path) {
        Ok(k) => k,
        Err(e) => {
            tracing::error!(error = %e, "path manager: no private key; relays and endpoint discovery are off");
            return;
        }
    };
    let mut m = Manager {
        me: private_key.public_key(),
        private_key,
        relays: relay::Relays::new(inputs.listen_port, tickets),
        inputs,
        out,
        side,
        peers: BTreeMap::new(),
        relay_list: Vec::new(),
        reflected: None,
        reflect_txids: BTreeMap::new(),
        pings: BTreeMap::new(),
        last_reflect: None,
        n: 0,
    };
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut buf = vec![0u8; 2048];
    loop {
        tokio::select! {
            r = plan.changed() => {
                if r.is_err() { return; }
                let view = plan.borrow_and_update().clone();
                if let Some(v) = view {
                    m.on_view(&v).await;
                }
            }
            r = m.side.recv(&mut buf) => match r {
                Ok((from, range)) => m.on_side(from, &buf[range]).await,
                Err(e) => {
                    tracing::warn!(error = %e, "side channel receive failed");
                    tokio::time::sleep(TICK).await;
                }
            },
            _ = tick.tick() => m.on_tick().await,
        }
    }
}

/// The path manager's state between events; the decisions themselves are
/// [`select`]'s.
struct Manager {
    inputs: Inputs,
    out: Outputs,
    side: raw::SideSocket,
    private_key: crate::keys::SecretKey,
    me: PublicKey,
    relays: relay::Relays,
    peers: BTreeMap<PublicKey, Peer>,
    relay_list: Vec<pb::Relay>,
    /// The node's mapping, as the reflector last saw it.
    reflected: Option<SocketAddr>,
    reflect_txids: BTreeMap<[u8; 16], Instant>,
    /// Pings in flight: to which peer and candidate, at which tick.
    pings: BTreeMap<[u8; 16], (PublicKey, SocketAddr, u64)>,
    last_reflect: Option<Instant>,
    /// Ticks so far.
    n: u64,
}

impl Manager {
    /// A new view: the relays, the peers and their candidates, and the
    /// node's own key (disco's keys follow a rotation).
    async fn on_view(&mut self, v: &pb::NodeView) {
        if self.relay_list != v.relays {
            // New relays: ask their reflector now.
            self.last_reflect = None;
            self.relay_list.clone_from(&v.relays);
        }
        if let Some(s) = v.self_.as_ref()
            && s.wireguard_public_key != self.me.0
        {
            match crate::keys::load_or_generate(&self.inputs.key_path) {
                Ok(k) if k.public_key().0.as_slice() == s.wireguard_public_key.as_slice() => {
                    tracing::info!(public_key = %k.public_key(), "path manager: following the rotated key");
                    self.me = k.public_key();
                    self.private_key = k;
                    self.peers.clear();
                }
                _ => {}
            }
        }
        let now = Instant::now();
        let mut homes = BTreeMap::new();
        let mut next = BTreeMap::new();
        for p in &v.peers {
            let Ok(k) = <[u8; 32]>::try_from(p.wireguard_public_key.as_slice()) else { continue };
            let k = PublicKey(k);
            let Some((listed, home)) = candidates_of(p) else { continue };
            homes.insert(k, home.clone());
            let mut peer = self.peers.remove(&k).unwrap_or_else(|| Peer {
                name: p.name.clone(),
                key: disco::PairKey::new(&self.private_key, &k),
                path: PeerPath::new(&listed, now),
                listed: Vec::new(),
                learned: None,
                home: None,
            });
            peer.listed = listed;
            peer.home = home;
            let all: Vec<SocketAddr> =
                peer.listed.iter().copied().chain(peer.learned.filter(|l| !peer.listed.contains(l))).collect();
            peer.path.set_candidates(&all);
            next.insert(k, peer);
        }
        self.peers = next;
        if self.relay_list.is_empty() {
            homes.clear();
        }
        self.relays.reconcile(&self.relay_list, &homes).await;
    }

    /// A side-channel datagram: a reflector's answer, or a peer's disco
    /// ping (answered) or pong (evidence for the path it came back on).
    async fn on_side(&mut self, from: SocketAddr, payload: &[u8]) {
        if let Some((mesh_relay::wire::Kind::ReflectReply, _)) = mesh_relay::wire::open(payload) {
            if let Ok((txid, mapped)) = mesh_relay::reflect::parse_reply(payload)
                && self.reflect_txids.remove(&txid).is_some()
                && self.reflected != Some(mapped)
            {
                tracing::info!(%mapped, "the reflector sees this node's WireGuard port at a new address");
                self.reflected = Some(mapped);
            }
            return;
        }
        let Some(d) = disco::parse(payload) else { return };
        let Some(peer) = self.peers.get_mut(&d.sender) else { return };
        if !d.verify(&peer.key) {
            tracing::debug!(%from, peer = %peer.name, "disco message failing authentication dropped");
            return;
        }
        if d.pong {
            if let Some((k, to, _)) = self.pings.remove(&d.txid)
                && k == d.sender
            {
                peer.path.pong(to, Instant::now());
            }
            return;
        }
        let pong = disco::encode(true, &d.txid, &self.me, &peer.key);
        let _ = self.side.send(from, &pong).await;
        if !peer.listed.contains(&from) && peer.learned != Some(from) {
            tracing::info!(peer = %peer.name, %from, "peer seen at an unlisted address: now a candidate");
            peer.learned = Some(from);
            let all: Vec<SocketAddr> = peer.listed.iter().copied().chain(Some(from)).collect();
            peer.path.set_candidates(&all);
        }
    }

    /// Every [`TICK`]: the reflector when due, pings, decisions, and the
    /// results published.
    async fn on_tick(&mut self) {
        self.n += 1;
        let now = Instant::now();
        if self.relay_list.is_empty() {
            publish(&self.out, &self.peers, &self.relays, now);
            return;
        }
        let n = self.n;
        // A pong later than this is no evidence of a working path.
        self.pings.retain(|_, (_, _, at)| n - *at < 8);
        if self.last_reflect.is_none_or(|t| now.duration_since(t) >= REFLECT_EVERY) {
            self.last_reflect = Some(now);
            self.ask_reflector(now).await;
        }
        // Pings and decisions.
        for (k, peer) in &mut self.peers {
            let current = peer.path.path();
            let settled = peer.path.direct_alive(now);
            for c in peer.path.candidates().to_vec() {
                let fast = (!settled || Some(Path::Direct(c)) == current) && !peer.path.silent(&c);
                if fast || n.is_multiple_of(OTHER_EVERY) {
                    let txid: [u8; 16] = rand::random();
                    self.pings.insert(txid, (*k, c, n));
                    // Counted even when the send fails (a firewall's
                    // EPERM, no route): that path is as dead.
                    let _ = self.side.send(c, &disco::encode(false, &txid, &self.me, &peer.key)).await;
                    peer.path.pinged(c);
                }
            }
            // Only a peer that attaches to a relay can be reached there: an
            // old agent, or one with relays off, answers no disco pings, and
            // relaying it would cut it off instead of keeping the endpoint
            // its WireGuard still answers on.
            let relay = peer.home.is_some() && self.relays.links().can_reach(k);
            if let Some(s) = peer.path.decide(relay, now) {
                tracing::info!(peer = %peer.name, from = ?s.from, to = ?s.to, "path switch");
            }
        }
        let home = self.inputs.home.clone().or_else(|| self.relay_list.first().map(|r| r.region.clone()));
        let mut c: Vec<String> = self.inputs.configured.clone();
        if let Some(m) = self.reflected
            && !c.contains(&m.to_string())
        {
            c.push(m.to_string());
        }
        c.extend(home.map(|h| format!("relay:{h}")));
        self.out.candidates.send_if_modified(|old| {
            if *old == c {
                false
            } else {
                *old = c;
                true
            }
        });
        publish(&self.out, &self.peers, &self.relays, now);
    }

    /// Asks one reflector for the node's mapping. One: behind a symmetric
    /// NAT each would see another port, and the reported candidate would
    /// flap.
    async fn ask_reflector(&mut self, now: Instant) {
        self.reflect_txids.retain(|_, t| now.duration_since(*t) < REFLECT_EVERY * 3);
        let Some(r) = self.relay_list.iter().find(|r| !r.reflector.is_empty()) else { return };
        let Ok(mut addrs) = tokio::net::lookup_host(&r.reflector).await else { return };
        let Some(addr) = addrs.find(SocketAddr::is_ipv4) else { return };
        let txid: [u8; 16] = rand::random();
        self.reflect_txids.insert(txid, now);
        if let Err(e) = self.side.send(addr, &mesh_relay::reflect::encode_request(&txid)).await {
            tracing::debug!(reflector = %addr, error = %e, "reflector request not sent");
        }
    }
}

/// Publishes the chosen endpoints (when they changed) and the shared info.
fn publish(out: &Outputs, peers: &BTreeMap<PublicKey, Peer>, relays: &relay::Relays, now: Instant) {
    let mut paths = BTreeMap::new();
    let mut info = BTreeMap::new();
    for (k, p) in peers {
        let endpoint = match p.path.path() {
            Some(Path::Direct(a)) => Some(a),
            Some(Path::Relay) => relays.proxy(k),
            None => None,
        };
        if let Some(e) = endpoint {
            paths.insert(*k, e);
        }
        if let Some(path) = p.path.path() {
            let (d, r) = p.path.times(now);
            info.insert(
                *k,
                PathInfo {
                    name: p.name.clone(),
                    path: path.kind(),
                    relay_region: if path == Path::Relay {
                        relays.links().region_for(k).unwrap_or_default()
                    } else {
                        String::new()
                    },
                    switches: p.path.switches,
                    direct_secs: d.as_secs_f64(),
                    relay_secs: r.as_secs_f64(),
                },
            );
        }
    }
    out.paths.send_if_modified(|old| {
        if *old == paths {
            false
        } else {
            *old = paths;
            true
        }
    });
    if let Ok(mut s) = out.shared.lock() {
        *s = info;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(endpoints: &[&str]) -> pb::Peer {
        pb::Peer { endpoints: endpoints.iter().map(|e| (*e).to_owned()).collect(), ..Default::default() }
    }

    #[test]
    fn candidates_are_ipv4_endpoints_and_the_home_relay() {
        let (direct, home) = candidates_of(&peer(&["192.0.2.1:51820", "[2001:db8::1]:51820", "relay:fsn"])).unwrap();
        assert_eq!(direct, vec!["192.0.2.1:51820".parse::<SocketAddr>().unwrap()]);
        assert_eq!(home.as_deref(), Some("fsn"));
        // Behind a UDP-blocking provider: no endpoint, only the relay.
        assert_eq!(candidates_of(&peer(&["relay:fsn"])), Some((Vec::new(), Some("fsn".into()))));
        // Only IPv6: disco cannot check it, so the manager leaves it alone.
        assert_eq!(candidates_of(&peer(&["[2001:db8::1]:51820", "relay:fsn"])), None);
    }
}
