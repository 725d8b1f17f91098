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
}

/// The candidates of a control peer entry, and its home relay region.
fn candidates_of(p: &pb::Peer) -> (Vec<SocketAddr>, Option<String>) {
    let direct = p.endpoints.iter().filter_map(|e| e.parse::<SocketAddr>().ok()).filter(SocketAddr::is_ipv4).collect();
    let home = p.endpoints.iter().find_map(|e| e.strip_prefix("relay:")).map(str::to_owned);
    (direct, home)
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
    let mut private_key = match crate::keys::load_or_generate(&inputs.key_path) {
        Ok(k) => k,
        Err(e) => {
            tracing::error!(error = %e, "path manager: no private key; relays and endpoint discovery are off");
            return;
        }
    };
    let mut me = private_key.public_key();
    let mut relays = relay::Relays::new(inputs.listen_port, tickets);
    let mut peers: BTreeMap<PublicKey, Peer> = BTreeMap::new();
    let mut relay_list: Vec<pb::Relay> = Vec::new();
    let mut reflected: Option<SocketAddr> = None;
    let mut reflect_txids: BTreeMap<[u8; 16], Instant> = BTreeMap::new();
    // Pings in flight: to which peer and candidate, at which tick.
    let mut pings: BTreeMap<[u8; 16], (PublicKey, SocketAddr, u64)> = BTreeMap::new();
    let mut last_reflect: Option<Instant> = None;
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut n: u64 = 0;
    let mut buf = vec![0u8; 2048];
    loop {
        tokio::select! {
            r = plan.changed() => {
                if r.is_err() { return; }
                let Some(v) = plan.borrow_and_update().clone() else { continue };
                if relay_list != v.relays {
                    // New relays: ask their reflector now.
                    last_reflect = None;
                    relay_list = v.relays.clone();
                }
                // A key rotation: disco's keys follow the interface's.
                if let Some(s) = v.self_.as_ref() && s.wireguard_public_key != me.0 {
                    match crate::keys::load_or_generate(&inputs.key_path) {
                        Ok(k) if k.public_key().0.as_slice() == s.wireguard_public_key.as_slice() => {
                            tracing::info!(public_key = %k.public_key(), "path manager: following the rotated key");
                            me = k.public_key();
                            private_key = k;
                            peers.clear();
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
                    let (listed, home) = candidates_of(p);
                    homes.insert(k, home);
                    let mut peer = peers.remove(&k).unwrap_or_else(|| Peer {
                        name: p.name.clone(),
                        key: disco::PairKey::new(&private_key, &k),
                        path: PeerPath::new(&listed, now),
                        listed: Vec::new(),
                        learned: None,
                    });
                    peer.listed = listed;
                    let all: Vec<SocketAddr> = peer.listed.iter().copied().chain(peer.learned.filter(|l| !peer.listed.contains(l))).collect();
                    peer.path.set_candidates(&all);
                    next.insert(k, peer);
                }
                peers = next;
                if relay_list.is_empty() {
                    homes.clear();
                }
                relays.reconcile(&relay_list, &homes).await;
            }
            r = side.recv(&mut buf) => {
                let (from, range) = match r {
                    Ok(x) => x,
                    Err(e) => { tracing::warn!(error = %e, "side channel receive failed"); tokio::time::sleep(TICK).await; continue; }
                };
                let payload = &buf[range];
                if let Some((mesh_relay::wire::Kind::ReflectReply, _)) = mesh_relay::wire::open(payload) {
                    if let Ok((txid, mapped)) = mesh_relay::reflect::parse_reply(payload)
                        && reflect_txids.remove(&txid).is_some()
                        && reflected != Some(mapped)
                    {
                        tracing::info!(%mapped, "the reflector sees this node's WireGuard port at a new address");
                        reflected = Some(mapped);
                    }
                    continue;
                }
                let Some(d) = disco::parse(payload) else { continue };
                let Some(peer) = peers.get_mut(&d.sender) else { continue };
                if !d.verify(&peer.key) {
                    tracing::debug!(%from, peer = %peer.name, "disco message failing authentication dropped");
                    continue;
                }
                if d.pong {
                    if let Some((k, to, _)) = pings.remove(&d.txid) && k == d.sender {
                        peer.path.pong(to, Instant::now());
                    }
                } else {
                    let pong = disco::encode(true, &d.txid, &me, &peer.key);
                    let _ = side.send(from, &pong).await;
                    if !peer.listed.contains(&from) && peer.learned != Some(from) {
                        tracing::info!(peer = %peer.name, %from, "peer seen at an unlisted address: now a candidate");
                        peer.learned = Some(from);
                        let all: Vec<SocketAddr> = peer.listed.iter().copied().chain(Some(from)).collect();
                        peer.path.set_candidates(&all);
                    }
                }
            }
            _ = tick.tick() => {
                n += 1;
                if relay_list.is_empty() {
                    publish(&out, &peers, &relays, Instant::now());
                    continue;
                }
                let now = Instant::now();
                // A pong later than this is no evidence of a working path.
                pings.retain(|_, (_, _, at)| n - *at < 8);
                // Reflectors.
                if last_reflect.is_none_or(|t| now.duration_since(t) >= REFLECT_EVERY) {
                    last_reflect = Some(now);
                    reflect_txids.retain(|_, t| now.duration_since(*t) < REFLECT_EVERY * 3);
                    // One reflector: behind a symmetric NAT each would see
                    // another port, and the reported candidate would flap.
                    for r in relay_list.iter().filter(|r| !r.reflector.is_empty()).take(1) {
                        let Ok(mut addrs) = tokio::net::lookup_host(&r.reflector).await else { continue };
                        let Some(addr) = addrs.find(SocketAddr::is_ipv4) else { continue };
                        let txid: [u8; 16] = rand::random();
                        reflect_txids.insert(txid, now);
                        if let Err(e) = side.send(addr, &mesh_relay::reflect::encode_request(&txid)).await {
                            tracing::debug!(reflector = %addr, error = %e, "reflector request not sent");
                        }
                    }
                }
                // Pings and decisions.
                let mut switches = Vec::new();
                for (k, peer) in &mut peers {
                    let current = peer.path.path();
                    let settled = peer.path.direct_alive(now);
                    for c in peer.path.candidates().to_vec() {
                        let fast = (!settled || Some(Path::Direct(c)) == current) && !peer.path.silent(&c);
                        if fast || n.is_multiple_of(OTHER_EVERY) {
                            let txid: [u8; 16] = rand::random();
                            pings.insert(txid, (*k, c, n));
                            // Counted even when the send fails (a firewall's
                            // EPERM, no route): that path is as dead.
                            let _ = side.send(c, &disco::encode(false, &txid, &me, &peer.key)).await;
                            peer.path.pinged(c);
                        }
                    }
                    if let Some(s) = peer.path.decide(relays.links().can_reach(k), now) {
                        switches.push((peer.name.clone(), s));
                    }
                }
                for (name, s) in &switches {
                    tracing::info!(peer = %name, from = ?s.from, to = ?s.to, "path switch");
                }
                let home = inputs.home.clone().or_else(|| relay_list.first().map(|r| r.region.clone()));
                let mut c: Vec<String> = inputs.configured.clone();
                if let Some(m) = reflected && !c.contains(&m.to_string()) {
                    c.push(m.to_string());
                }
                c.extend(home.map(|h| format!("relay:{h}")));
                out.candidates.send_if_modified(|old| if *old == c { false } else { *old = c; true });
                publish(&out, &peers, &relays, now);
            }
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
