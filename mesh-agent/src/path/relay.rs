//! The agent's side of the relays: one attached connection per relay in the
//! view (kept up with backoff, re-attached with a fresh ticket), and one
//! local UDP proxy per peer (`127.0.0.1:<port>`) that WireGuard, kernel or
//! userspace, uses as the peer's endpoint while the peer is relayed.
//!
//! WireGuard's datagrams to a proxy go to the relay addressed by the peer's
//! public key; datagrams the relay delivers from a peer leave that peer's
//! proxy towards the WireGuard port, so WireGuard sees the peer at the
//! proxy's address, the endpoint it was given. Both engines work unchanged.

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddr},
    sync::{Arc, Mutex},
    time::Duration,
};

use mesh_proto::v1 as pb;
use mesh_relay::client::{RelayClient, RelaySender};
use tokio::{net::UdpSocket, sync::watch, task::JoinHandle};

use crate::keys::PublicKey;

/// The relays' senders by region (present while attached) and the peers'
/// proxies, shared between the connection tasks, the proxies and the path
/// manager.
#[derive(Debug, Default)]
pub struct Links {
    attached: Mutex<BTreeMap<String, RelaySender>>,
    proxies: Mutex<BTreeMap<PublicKey, Arc<UdpSocket>>>,
    /// Each peer's home relay region (where its packets are sent).
    homes: Mutex<BTreeMap<PublicKey, String>>,
}

impl Links {
    /// Whether a relay that can reach `peer` is attached.
    #[must_use]
    pub fn can_reach(&self, peer: &PublicKey) -> bool {
        self.sender_for(peer).is_some()
    }

    /// The regions attached now.
    #[must_use]
    pub fn attached(&self) -> Vec<String> {
        self.attached.lock().map(|a| a.keys().cloned().collect()).unwrap_or_default()
    }

    fn sender_for(&self, peer: &PublicKey) -> Option<RelaySender> {
        let home = self.homes.lock().ok()?.get(peer).cloned();
        let attached = self.attached.lock().ok()?;
        // The peer's home relay; a peer without one (or whose home is not
        // attached) is tried through any: it may be attached there too.
        home.and_then(|h| attached.get(&h).filter(|s| !s.is_closed()).cloned())
            .or_else(|| attached.values().find(|s| !s.is_closed()).cloned())
    }

    /// The relay region `peer`'s packets go through now, if any.
    #[must_use]
    pub fn region_for(&self, peer: &PublicKey) -> Option<String> {
        let home = self.homes.lock().ok()?.get(peer).cloned();
        let attached = self.attached.lock().ok()?;
        home.filter(|h| attached.contains_key(h)).or_else(|| attached.keys().next().cloned())
    }
}

/// Relay connections and proxies, reconciled to each view.
#[derive(Debug)]
pub struct Relays {
    links: Arc<Links>,
    wg: SocketAddr,
    conns: BTreeMap<String, (pb::Relay, JoinHandle<()>)>,
    proxy_tasks: BTreeMap<PublicKey, JoinHandle<()>>,
    tickets: watch::Receiver<Option<String>>,
}

impl Relays {
    /// Nothing attached yet; WireGuard listens on `listen_port`.
    #[must_use]
    pub fn new(listen_port: u16, tickets: watch::Receiver<Option<String>>) -> Self {
        Self {
            links: Arc::default(),
            wg: SocketAddr::from((Ipv4Addr::LOCALHOST, listen_port)),
            conns: BTreeMap::new(),
            proxy_tasks: BTreeMap::new(),
            tickets,
        }
    }

    /// The shared links.
    #[must_use]
    pub fn links(&self) -> &Arc<Links> {
        &self.links
    }

    /// The proxy address of `peer`, if it has one.
    #[must_use]
    pub fn proxy(&self, peer: &PublicKey) -> Option<SocketAddr> {
        self.links.proxies.lock().ok()?.get(peer).and_then(|s| s.local_addr().ok())
    }

    /// Attaches to exactly `relays` and keeps a proxy for exactly `peers`
    /// (with their home regions).
    pub async fn reconcile(&mut self, relays: &[pb::Relay], peers: &BTreeMap<PublicKey, Option<String>>) {
        let want: BTreeMap<String, &pb::Relay> = relays.iter().map(|r| (r.region.clone(), r)).collect();
        self.conns.retain(|region, (r, task)| {
            let keep = want.get(region).is_some_and(|w| *w == r);
            if !keep {
                task.abort();
                if let Ok(mut a) = self.links.attached.lock() {
                    a.remove(region);
                }
            }
            keep
        });
        for (region, r) in want {
            if !self.conns.contains_key(&region) {
                let task = tokio::spawn(attach(r.clone(), self.links.clone(), self.tickets.clone(), self.wg));
                self.conns.insert(region, (r.clone(), task));
            }
        }
        if let Ok(mut h) = self.links.homes.lock() {
            *h = peers.iter().filter_map(|(k, r)| Some((*k, r.clone()?))).collect();
        }
        self.proxy_tasks.retain(|k, task| {
            let keep = peers.contains_key(k);
            if !keep {
                task.abort();
                if let Ok(mut p) = self.links.proxies.lock() {
                    p.remove(k);
                }
            }
            keep
        });
        for peer in peers.keys() {
            if self.proxy_tasks.contains_key(peer) {
                continue;
            }
            match UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).await {
                Ok(s) => {
                    let s = Arc::new(s);
                    if let Ok(mut p) = self.links.proxies.lock() {
                        p.insert(*peer, s.clone());
                    }
                    self.proxy_tasks.insert(*peer, tokio::spawn(proxy(*peer, s, self.links.clone())));
                }
                Err(e) => tracing::error!(peer = %peer, error = %e, "relay proxy: cannot bind on 127.0.0.1"),
            }
        }
    }
}

impl Drop for Relays {
    fn drop(&mut self) {
        for (_, t) in self.conns.values() {
            t.abort();
        }
        for t in self.proxy_tasks.values() {
            t.abort();
        }
    }
}

/// WireGuard's datagrams for `peer` (sent to its proxy) to the relay.
async fn proxy(peer: PublicKey, socket: Arc<UdpSocket>, links: Arc<Links>) {
    let mut buf = vec![0u8; 65_535];
    loop {
        let (n, from) = match socket.recv_from(&mut buf).await {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(peer = %peer, error = %e, "relay proxy receive failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        // Only the local WireGuard may send through a peer's proxy.
        if !from.ip().is_loopback() {
            continue;
        }
        if let Some(s) = links.sender_for(&peer) {
            // A full queue or a closed link drops the datagram, as UDP would.
            let _ = s.send(peer.0, &buf[..n]);
        }
    }
}

/// Keeps one relay attached: connect with the latest ticket, deliver what
/// it sends, reconnect with backoff (1 s doubling to 30 s) when it drops.
async fn attach(relay: pb::Relay, links: Arc<Links>, mut tickets: watch::Receiver<Option<String>>, wg: SocketAddr) {
    let region = relay.region.clone();
    let mut backoff = Duration::from_secs(1);
    loop {
        let ticket = match tickets.wait_for(Option::is_some).await {
            Ok(t) => t.clone().unwrap_or_default(),
            Err(_) => return,
        };
        match connect(&relay, &ticket).await {
            Ok((sender, mut receiver)) => {
                tracing::info!(%region, address = %relay.address, "attached to the relay");
                backoff = Duration::from_secs(1);
                if let Ok(mut a) = links.attached.lock() {
                    a.insert(region.clone(), sender);
                }
                // `wait_for` marked the ticket used here as seen: a newer one
                // (even one that came while connecting) wakes the loop.
                loop {
                    tokio::select! {
                        got = receiver.recv() => {
                            let Some((src, payload)) = got else {
                                tracing::warn!(%region, "relay connection closed; reconnecting");
                                break;
                            };
                            let proxy = links.proxies.lock().ok().and_then(|p| p.get(&PublicKey(src)).cloned());
                            if let Some(p) = proxy {
                                let _ = p.send_to(&payload, wg).await;
                            }
                        }
                        // A new ticket (renewal, or a key rotation): attach
                        // with it before letting this connection go, so the
                        // relay never looks unreachable and relayed peers
                        // do not flap. If that fails, this one serves on
                        // until it closes.
                        r = tickets.changed() => {
                            if r.is_err() { return; }
                            let ticket = tickets.borrow_and_update().clone().unwrap_or_default();
                            match connect(&relay, &ticket).await {
                                Ok((sender, next)) => {
                                    tracing::info!(%region, "attached again with a new relay ticket");
                                    if let Ok(mut a) = links.attached.lock() {
                                        a.insert(region.clone(), sender);
                                    }
                                    receiver = next;
                                }
                                Err(e) => tracing::warn!(%region, error = %e, "cannot attach with the new relay ticket; keeping the current attach"),
                            }
                        }
                    }
                }
                if let Ok(mut a) = links.attached.lock() {
                    a.remove(&region);
                }
            }
            Err(e) => tracing::warn!(%region, address = %relay.address, error = %e, "cannot attach to the relay"),
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).clamp(Duration::from_secs(1), Duration::from_secs(30));
    }
}

async fn connect(relay: &pb::Relay, ticket: &str) -> Result<(RelaySender, mesh_relay::client::RelayReceiver), String> {
    let addr = tokio::net::lookup_host(&relay.address)
        .await
        .map_err(|e| format!("resolving {}: {e}", relay.address))?
        .next()
        .ok_or_else(|| format!("{} resolves to nothing", relay.address))?;
    let name = if relay.server_name.is_empty() {
        relay.address.rsplit_once(':').map_or(relay.address.as_str(), |(h, _)| h).trim_matches(['[', ']'])
    } else {
        relay.server_name.as_str()
    };
    let pin = hex::decode(&relay.cert_sha256)
        .ok()
        .and_then(|b| <[u8; 32]>::try_from(b).ok())
        .ok_or_else(|| format!("relay {}: cert_sha256 is not 32 bytes of hex", relay.region))?;
    RelayClient::connect(addr, name, Some(pin), ticket).await.map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use std::time::{SystemTime, UNIX_EPOCH};

    use mesh_relay::{Relay, RelayConfig, Ticket, TicketSigner};
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    use super::*;

    /// A renewed ticket (every 6 h, and at a key rotation) attaches again
    /// before the old connection goes: a relayed peer never sees its relay
    /// unreachable, so its path does not flap to a dead direct candidate.
    #[tokio::test]
    async fn a_new_ticket_attaches_again_without_a_gap() {
        let dir = tempfile::tempdir().unwrap();
        let signer = TicketSigner::from_pkcs8(&TicketSigner::generate_pkcs8().unwrap()).unwrap();
        let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
        let server = Relay::bind(RelayConfig {
            listen: any,
            reflector: None,
            metrics: Some(any),
            cert_path: dir.path().join("relay.crt"),
            key_path: dir.path().join("relay.key"),
            names: vec!["relay.test".into()],
            trusted_keys: vec![signer.public_key()],
            region: "t".into(),
            max_connections: 8,
        })
        .await
        .unwrap();
        let relay = pb::Relay {
            region: "t".into(),
            address: server.local_addr().to_string(),
            cert_sha256: hex::encode(server.cert_pin()),
            server_name: "relay.test".into(),
            ..Default::default()
        };
        let metrics = server.metrics_addr().unwrap();
        tokio::spawn(server.serve(std::future::pending()));

        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs() as i64;
        let ticket =
            |key, lifetime| signer.sign_b64(&Ticket { public_key: key, node_id: 1, expires_unix: now + lifetime });
        let (tickets, rx) = watch::channel(Some(ticket([7; 32], 3600)));
        let mut relays = Relays::new(51820, rx);
        let peer = PublicKey([9; 32]);
        relays.reconcile(&[relay], &BTreeMap::from([(peer, Some("t".to_owned()))])).await;
        let links = relays.links().clone();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while !links.can_reach(&peer) {
            assert!(tokio::time::Instant::now() < deadline, "never attached");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let scrape = || async move {
            let mut s = tokio::net::TcpStream::connect(metrics).await.unwrap();
            s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await.unwrap();
            let mut text = String::new();
            s.read_to_string(&mut text).await.unwrap();
            text
        };

        // A renewal (the same key), then a rotation (a new key).
        for (attaches, key) in [(2, [7; 32]), (3, [8; 32])] {
            tickets.send_replace(Some(ticket(key, 7200)));
            for _ in 0..500 {
                assert!(links.can_reach(&peer), "the relay looked unreachable while attaching with a new ticket");
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            let want =
                [format!("mesh_relay_attach_total{{result=\"ok\"}} {attaches}\n"), "mesh_relay_clients 1\n".into()];
            let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
            loop {
                let text = scrape().await;
                if want.iter().all(|w| text.contains(w.as_str())) {
                    break;
                }
                // Attached with the new ticket, and the old connection let go.
                assert!(tokio::time::Instant::now() < deadline, "want {want:?}:\n{text}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}
