//! WireGuard: one interface ([`WireGuard`]), two implementations.
//!
//! - [`kernel::KernelWg`]: the kernel module, link created over rtnetlink and
//!   configured over WireGuard's generic netlink (wireguard-control).
//! - [`userspace::UserspaceWg`]: gotatun running inside the agent process on
//!   a TUN device, serving the standard UAPI socket
//!   (`/var/run/wireguard/<ifname>.sock`, so `wg show` works) and configured
//!   through it by wireguard-control's userspace backend.
//!
//! [`select`] picks one: `auto` probes the kernel and falls back. Both
//! backends read back into the same normalised [`WgDevice`] (see
//! [`convert`] for the engines' quirks).

pub mod convert;
pub mod handshake;
pub mod kernel;
pub mod select;
pub mod userspace;

use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddr,
    time::SystemTime,
};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::keys::{PublicKey, SecretKey};

pub use select::{BackendKind, BackendMode, KernelProbe, Selection, probe_kernel, select};

/// Errors of the WireGuard backends.
#[derive(Debug, thiserror::Error)]
pub enum WgError {
    /// A configuration or read call failed.
    #[error("wireguard {op} on {ifname} ({backend}): {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The interface.
        ifname: String,
        /// Which backend.
        backend: BackendKind,
        /// The error.
        source: std::io::Error,
    },
    /// The userspace engine failed to start.
    #[error("starting the userspace WireGuard engine on {ifname}: {message}")]
    Engine {
        /// The interface.
        ifname: String,
        /// What failed.
        message: String,
    },
    /// The interface name is not a valid Linux interface name.
    #[error("invalid interface name {0:?}")]
    Name(String),
    /// Creating or deleting the link over rtnetlink failed.
    #[error(transparent)]
    Net(#[from] crate::net::NetError),
}

/// One peer as read back from a backend, normalised.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WgPeer {
    /// Current endpoint (roams with the peer).
    pub endpoint: Option<SocketAddr>,
    /// Allowed IPs, host bits cleared.
    pub allowed_ips: BTreeSet<IpNet>,
    /// Persistent keepalive; `None` when off (never `Some(0)`).
    pub persistent_keepalive: Option<u16>,
    /// Preshared key, if one is set.
    #[serde(skip)]
    pub preshared_key: Option<SecretKey>,
    /// Time of the last completed handshake; `None` if none yet.
    pub last_handshake: Option<SystemTime>,
    /// Bytes received from the peer.
    pub rx_bytes: u64,
    /// Bytes sent to the peer.
    pub tx_bytes: u64,
}

/// A WireGuard device as read back, normalised. The private key is not kept:
/// only its public key.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WgDevice {
    /// Public key of the configured private key; `None` if none is set.
    pub public_key: Option<PublicKey>,
    /// UDP listen port (0 if not yet bound).
    pub listen_port: u16,
    /// Firewall mark on outgoing packets; `None` when 0.
    pub fwmark: Option<u32>,
    /// Peers by public key.
    pub peers: BTreeMap<PublicKey, WgPeer>,
}

/// How one peer is changed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerUpdate {
    /// The peer.
    pub public_key: PublicKey,
    /// Remove the peer (other fields are ignored).
    pub remove: bool,
    /// Set the endpoint.
    pub endpoint: Option<SocketAddr>,
    /// Replace the allowed IPs with exactly these.
    pub allowed_ips: Option<Vec<IpNet>>,
    /// Set the keepalive (`Some(0)` turns it off).
    pub persistent_keepalive: Option<u16>,
    /// Set (`Some(Some)`) or clear (`Some(None)`) the preshared key.
    pub preshared_key: Option<Option<SecretKey>>,
}

impl PeerUpdate {
    /// An update of `public_key` that changes nothing yet.
    #[must_use]
    pub const fn new(public_key: PublicKey) -> Self {
        Self {
            public_key,
            remove: false,
            endpoint: None,
            allowed_ips: None,
            persistent_keepalive: None,
            preshared_key: None,
        }
    }
}

/// A change to a device, applied in one call (one netlink batch or one UAPI
/// `set` transaction).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WgUpdate {
    /// Set the private key.
    pub private_key: Option<SecretKey>,
    /// Set the listen port.
    pub listen_port: Option<u16>,
    /// Set the fwmark (`Some(0)` clears it).
    pub fwmark: Option<u32>,
    /// Peer changes, in order.
    pub peers: Vec<PeerUpdate>,
}

impl WgUpdate {
    /// Whether the update changes nothing.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.private_key.is_none() && self.listen_port.is_none() && self.fwmark.is_none() && self.peers.is_empty()
    }
}

/// A WireGuard backend bound to one interface.
pub trait WireGuard: Send {
    /// Which implementation this is.
    fn kind(&self) -> BackendKind;

    /// The interface name.
    fn ifname(&self) -> &str;

    /// Makes sure the interface exists and, for the userspace engine, that
    /// the engine serving it runs (a TUN deleted by hand restarts it).
    /// Returns whether anything had to be created. Idempotent.
    fn ensure(&mut self) -> Result<bool, WgError>;

    /// Reads the device back.
    fn read(&self) -> Result<WgDevice, WgError>;

    /// Applies a change.
    fn apply(&mut self, update: &WgUpdate) -> Result<(), WgError>;

    /// Called on agent shutdown. `keep` leaves the data path in place (the
    /// userspace TUN is persistent: addresses, routes and eBPF programs stay,
    /// and traffic is dropped, not leaked, until the agent is back).
    fn shutdown(&mut self, keep: bool) -> Result<(), WgError>;
}
