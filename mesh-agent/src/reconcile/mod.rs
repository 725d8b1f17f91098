//! Desired state versus actual state.
//!
//! [`Desired`] is built from a [`NodeView`](crate::view::NodeView) plus local
//! settings; [`Actual`] is read from the kernel and the WireGuard backend;
//! [`diff()`] (pure) turns the difference into a [`Plan`] of minimal changes;
//! [`Applier`] executes a plan in a fail-closed order and re-reads to
//! confirm. [`known_endpoints`] (pure) is what the underlay guard must
//! never rate-limit; the applier keeps the enforcer's copy equal to it.

mod apply;
mod diff;
pub mod enforcer;
pub mod fake;
mod guard;

use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddr,
};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

pub use apply::{Applier, ApplyError, Report, Step};
pub use diff::{ENDPOINT_STICKY, diff};
pub use enforcer::{EnforcerError, PolicyDigest, PolicyEnforcer};
pub use guard::known_endpoints;

use crate::{
    keys::{PublicKey, SecretKey},
    net::{Forwarding, LinkState},
    view::NodeView,
    wg::{WgDevice, WgUpdate},
};

/// Settings of this node that do not come from the node view.
#[derive(Clone, Debug)]
pub struct Local {
    /// The node's private key.
    pub private_key: SecretKey,
    /// UDP listen port; `None` lets the engine choose.
    pub listen_port: Option<u16>,
    /// fwmark on the tunnel's UDP packets; `None` for none.
    pub fwmark: Option<u32>,
    /// Whether a policy enforcer is configured (if not, the view's policy is
    /// not enforced, and status says so).
    pub enforce_policy: bool,
}

/// One desired peer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DesiredPeer {
    /// Endpoint to set.
    pub endpoint: Option<SocketAddr>,
    /// Allowed IPs (host bits cleared).
    pub allowed_ips: BTreeSet<IpNet>,
    /// Keepalive; `None` off.
    pub persistent_keepalive: Option<u16>,
    /// Preshared key.
    pub preshared_key: Option<SecretKey>,
}

/// The desired state of the node, normalised for comparison.
#[derive(Clone, Debug)]
pub struct Desired {
    /// Private key to configure.
    pub private_key: SecretKey,
    /// Its public key.
    pub public_key: PublicKey,
    /// Listen port.
    pub listen_port: Option<u16>,
    /// fwmark.
    pub fwmark: Option<u32>,
    /// Interface MTU.
    pub mtu: u32,
    /// Interface addresses.
    pub addresses: BTreeSet<IpNet>,
    /// Peers.
    pub peers: BTreeMap<PublicKey, DesiredPeer>,
    /// Routes into the interface (host bits cleared).
    pub routes: BTreeSet<IpNet>,
    /// Forwarding on.
    pub forwarding: bool,
    /// Digest of the policy to enforce; `None` when enforcement is off.
    pub policy: Option<PolicyDigest>,
}

impl Desired {
    /// Normalises `view` with the local settings.
    #[must_use]
    pub fn new(view: &NodeView, local: &Local) -> Self {
        Self {
            private_key: local.private_key.clone(),
            public_key: local.private_key.public_key(),
            listen_port: local.listen_port,
            fwmark: local.fwmark.filter(|&m| m != 0),
            mtu: view.mtu,
            addresses: view.addresses.iter().copied().collect(),
            peers: view
                .peers
                .iter()
                .map(|p| {
                    (
                        p.public_key,
                        DesiredPeer {
                            endpoint: p.endpoint,
                            allowed_ips: p.allowed_ips.iter().map(IpNet::trunc).collect(),
                            persistent_keepalive: p.persistent_keepalive.filter(|&k| k != 0),
                            preshared_key: p.preshared_key.clone(),
                        },
                    )
                })
                .collect(),
            routes: view.routes.iter().map(IpNet::trunc).collect(),
            forwarding: view.forwarding,
            policy: local.enforce_policy.then(|| PolicyDigest::of(&view.policy)),
        }
    }
}

/// What is in place now.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Actual {
    /// The overlay link; `None` if it does not exist.
    pub link: Option<LinkState>,
    /// The WireGuard device.
    pub wg: WgDevice,
    /// Addresses on the link.
    pub addresses: BTreeSet<IpNet>,
    /// The agent's routes out of the link.
    pub routes: BTreeSet<IpNet>,
    /// Forwarding switches.
    pub forwarding: Forwarding,
    /// Policy in force.
    pub policy: Option<PolicyDigest>,
}

/// Minimal changes that take [`Actual`] to [`Desired`], executed in the order
/// of the fields.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// Enforce the desired policy.
    pub policy: bool,
    /// Set the MTU.
    pub mtu: Option<u32>,
    /// WireGuard device and peer changes (one call).
    pub wg: WgUpdate,
    /// Addresses to remove.
    pub remove_addresses: Vec<IpNet>,
    /// Addresses to add.
    pub add_addresses: Vec<IpNet>,
    /// Set the link up.
    pub up: bool,
    /// Routes to remove.
    pub remove_routes: Vec<IpNet>,
    /// Routes to add or replace.
    pub replace_routes: Vec<IpNet>,
    /// Forwarding switches to turn on.
    pub forwarding: Option<Forwarding>,
    /// The same, counted.
    pub changes: Changes,
}

/// Counts of a plan's changes, for logs, reports and the benchmark.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Changes {
    /// Policy enforced.
    pub policy: bool,
    /// MTU set.
    pub mtu: bool,
    /// Private key, listen port or fwmark set.
    pub device: bool,
    /// Peers added.
    pub peers_added: usize,
    /// Peers changed.
    pub peers_updated: usize,
    /// Peers removed.
    pub peers_removed: usize,
    /// Addresses added.
    pub addresses_added: usize,
    /// Addresses removed.
    pub addresses_removed: usize,
    /// Link set up.
    pub up: bool,
    /// Routes added or replaced.
    pub routes_replaced: usize,
    /// Routes removed.
    pub routes_removed: usize,
    /// Forwarding turned on.
    pub forwarding: bool,
}

impl Changes {
    /// Whether nothing changes.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }
}

impl Plan {
    /// Whether the plan changes nothing.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }
}
