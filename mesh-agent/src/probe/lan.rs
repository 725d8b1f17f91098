//! Probes between a site's gateways on the site LAN.
//!
//! Over the overlay alone, a gateway cannot tell "my site peer is down"
//! from "the overlay path between us is down" (a provider's filtering, a
//! broken WireGuard session): both would claim the site. So the site's
//! gateways also probe each other at their LAN addresses, which each
//! advertises to control and control passes to the site's gateways only.
//!
//! The LAN socket shares the probe port with the overlay socket: it is bound
//! to the LAN interface (`SO_BINDTODEVICE` before `bind`, which the kernel
//! allows next to a socket bound to another device), so it sees only what
//! arrives on the LAN, and the prober answers only the site peers' LAN
//! addresses there. One socket per LAN interface, reopened when the
//! interface is recreated; a receiving task per socket forwards datagrams
//! to the prober.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{Ipv6Addr, SocketAddr},
    sync::Arc,
};

use tokio::{net::UdpSocket, sync::mpsc, task::JoinHandle};

/// A datagram received on a LAN socket.
#[derive(Debug)]
pub struct Datagram {
    /// The interface it came in on.
    pub ifname: String,
    /// Its payload.
    pub data: Vec<u8>,
    /// Its source.
    pub src: SocketAddr,
}

#[derive(Debug)]
struct LanSock {
    index: u32,
    sock: Arc<UdpSocket>,
    v6: bool,
    task: JoinHandle<()>,
}

impl Drop for LanSock {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The prober's LAN sockets, one per site LAN interface.
#[derive(Debug)]
pub struct LanSockets {
    port: u16,
    socks: BTreeMap<String, LanSock>,
    /// Interfaces whose socket failed to open, to warn once.
    failing: BTreeSet<String>,
    tx: mpsc::Sender<Datagram>,
}

impl LanSockets {
    /// No sockets yet; datagrams will arrive on the returned receiver.
    #[must_use]
    pub fn new(port: u16) -> (Self, mpsc::Receiver<Datagram>) {
        let (tx, rx) = mpsc::channel(256);
        (Self { port, socks: BTreeMap::new(), failing: BTreeSet::new(), tx }, rx)
    }

    /// Opens a socket on each interface of `wanted` (name, index) that has
    /// none or whose interface was recreated, and closes the others. A
    /// socket that cannot be opened (the port taken, the overlay socket not
    /// yet bound to its interface) is retried at the next call.
    pub fn sync(&mut self, wanted: &BTreeMap<String, u32>) {
        self.socks.retain(|name, s| wanted.get(name) == Some(&s.index));
        for (name, &index) in wanted {
            if self.socks.contains_key(name) {
                continue;
            }
            match open(name, self.port) {
                Ok((sock, v6)) => {
                    tracing::info!(interface = %name, port = self.port, "probe responder listening on the site LAN");
                    self.failing.remove(name);
                    let sock = Arc::new(sock);
                    let task = tokio::spawn(receive(name.clone(), sock.clone(), self.tx.clone()));
                    self.socks.insert(name.clone(), LanSock { index, sock, v6, task });
                }
                Err(e) => {
                    if self.failing.insert(name.clone()) {
                        tracing::warn!(interface = %name, error = %e, "cannot open the probe port on the site LAN yet; retrying");
                    }
                }
            }
        }
    }

    /// The socket of interface `ifname` and whether it is dual-stack.
    #[must_use]
    pub fn get(&self, ifname: &str) -> Option<(&UdpSocket, bool)> {
        self.socks.get(ifname).map(|s| (s.sock.as_ref(), s.v6))
    }
}

/// A socket on `port` bound to `ifname`, dual-stack when IPv6 is there.
fn open(ifname: &str, port: u16) -> std::io::Result<(UdpSocket, bool)> {
    use socket2::{Domain, Protocol, Socket, Type};
    let (sock, v6) = match Socket::new(Domain::IPV6, Type::DGRAM, Some(Protocol::UDP)) {
        Ok(s) => {
            s.set_only_v6(false)?;
            (s, true)
        }
        Err(_) => (Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?, false),
    };
    // Before `bind`: the port is shared with the overlay socket, which the
    // kernel allows only between sockets bound to different devices.
    sock.bind_device(Some(ifname.as_bytes()))?;
    sock.set_nonblocking(true)?;
    let addr: SocketAddr =
        if v6 { (Ipv6Addr::UNSPECIFIED, port).into() } else { (std::net::Ipv4Addr::UNSPECIFIED, port).into() };
    sock.bind(&addr.into())?;
    Ok((UdpSocket::from_std(sock.into())?, v6))
}

async fn receive(ifname: String, sock: Arc<UdpSocket>, tx: mpsc::Sender<Datagram>) {
    let mut buf = vec![0u8; 2048];
    loop {
        let (n, src) = match sock.recv_from(&mut buf).await {
            Ok(r) => r,
            // An ICMP error of an earlier send, or the interface going away
            // (the prober reopens the socket then): never spin on it.
            Err(_) => {
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                continue;
            }
        };
        // A full queue drops the datagram, like a full socket buffer would.
        if let Err(mpsc::error::TrySendError::Closed(_)) =
            tx.try_send(Datagram { ifname: ifname.clone(), data: buf[..n].to_vec(), src })
        {
            return;
        }
    }
}
