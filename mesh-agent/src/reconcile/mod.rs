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
pub mod worker;

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, SocketAddr},
};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

pub use apply::{Applier, ApplyError, Report, Step};
pub use diff::{ENDPOINT_STICKY, diff};
pub use enforcer::{DataplaneStats, EnforcerError, PolicyDigest, PolicyEnforcer};
pub use guard::known_endpoints;

use crate::{
    keys::{PublicKey, SecretKey},
    net::{Forwarding, LinkState, MAIN_TABLE, RouteRule},
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
    /// Where mesh routes go and the rules that make them safe.
    pub routing: Routing,
    /// Control's addresses: always reached through the main table.
    pub control_addrs: Vec<IpAddr>,
}

/// The mesh routing table and its rules, as Tailscale does with table 52
/// and rules 5210-5270.
///
/// Mesh routes go into their own `table`, never into main, so they never
/// replace a host route and withdrawing one restores nothing by hand. Rules
/// from `priority` on (before main's 32766), IPv4 and IPv6:
/// - `priority`: packets carrying the WireGuard socket's fwmark (when one is
///   configured) look up main: the tunnel's own UDP never enters the tunnel;
/// - `priority + 1`: one rule per exception, `to <net> lookup main`: control's
///   address, every peer's underlay endpoint (configured and roamed to), and
///   every connected network of the host's other links (its underlay and
///   site LANs). A mesh prefix equal to or covering one of them can never
///   take that traffic;
/// - `priority + 2`: everything else looks up `table`; what it has no route
///   for falls through to main (the default route included).
///
/// `table` = 254 (main) turns this off: routes go into main, no rules.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Routing {
    /// The mesh routing table.
    pub table: u32,
    /// Priority of the first rule (three consecutive priorities are used).
    pub priority: u32,
}

impl Default for Routing {
    fn default() -> Self {
        Self { table: 109, priority: 5300 }
    }
}

impl Routing {
    /// Whether mesh routes go into their own table (with rules).
    #[must_use]
    pub const fn own_table(&self) -> bool {
        self.table != MAIN_TABLE
    }

    /// The rules for `exceptions` (networks that keep using main) and the
    /// socket's `fwmark`.
    #[must_use]
    pub fn rules(&self, fwmark: Option<u32>, exceptions: &BTreeSet<IpNet>) -> BTreeSet<RouteRule> {
        let mut out = BTreeSet::new();
        if !self.own_table() {
            return out;
        }
        for v6 in [false, true] {
            let rule = |priority, dst, fwmark, table| RouteRule { priority, v6, dst, fwmark, table };
            if let Some(m) = fwmark {
                out.insert(rule(self.priority, None, Some(m), MAIN_TABLE));
            }
            for e in exceptions.iter().filter(|e| e.addr().is_ipv6() == v6) {
                out.insert(rule(self.priority + 1, Some(e.trunc()), None, MAIN_TABLE));
            }
            out.insert(rule(self.priority + 2, None, None, self.table));
        }
        out
    }
}

fn host(ip: IpAddr) -> IpNet {
    IpNet::from(ip)
}

/// One desired peer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DesiredPeer {
    /// Endpoint to set.
    pub endpoint: Option<SocketAddr>,
    /// Set the endpoint even on a live session (see
    /// [`crate::view::PeerView::pin_endpoint`]).
    pub pin_endpoint: bool,
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
    /// Routes into the interface (host bits cleared; never a default route).
    pub routes: BTreeSet<IpNet>,
    /// The mesh routing table and its rules.
    pub routing: Routing,
    /// Networks that always use the main table and do not depend on what
    /// is observed: control's addresses and the view's peer endpoints.
    pub exceptions: BTreeSet<IpNet>,
    /// Forwarding on.
    pub forwarding: bool,
    /// Digest of the policy to enforce; `None` when enforcement is off.
    pub policy: Option<PolicyDigest>,
}

impl Desired {
    /// The rules wanted given what is observed: the fixed exceptions plus
    /// the host's connected networks and the endpoints that peers still in
    /// the view roamed to (a peer being removed needs none: otherwise its
    /// exception would outlive it and the run would never converge; nor
    /// does a peer whose endpoint is pinned, which the run sets).
    #[must_use]
    pub fn rules(&self, actual: &Actual) -> BTreeSet<RouteRule> {
        let mut exceptions = self.exceptions.clone();
        exceptions.extend(actual.connected.iter().map(IpNet::trunc));
        exceptions.extend(
            actual
                .wg
                .peers
                .iter()
                .filter(|(key, _)| self.peers.get(*key).is_some_and(|d| !d.pin_endpoint))
                .filter_map(|(_, p)| p.endpoint)
                .map(|e| host(e.ip())),
        );
        self.routing.rules(self.fwmark, &exceptions)
    }
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
                            pin_endpoint: p.pin_endpoint,
                            allowed_ips: p.allowed_ips.iter().map(IpNet::trunc).collect(),
                            persistent_keepalive: p.persistent_keepalive.filter(|&k| k != 0),
                            preshared_key: p.preshared_key.clone(),
                        },
                    )
                })
                .collect(),
            // A default route would take the host's own traffic: never installed.
            routes: view.routes.iter().map(IpNet::trunc).filter(|r| r.prefix_len() != 0).collect(),
            routing: local.routing,
            exceptions: local
                .control_addrs
                .iter()
                .copied()
                .chain(view.peers.iter().filter_map(|p| p.endpoint).map(|e| e.ip()))
                .map(host)
                .collect(),
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
    /// The agent's routes out of the link (in the mesh table).
    pub routes: BTreeSet<IpNet>,
    /// The agent's routes out of the link in the main table while the mesh
    /// has its own table: left by a release that routed in main; removed.
    pub stale_routes: BTreeSet<IpNet>,
    /// The agent's policy-routing rules.
    pub rules: BTreeSet<RouteRule>,
    /// The host's connected networks on other links (see [`Routing`]).
    pub connected: BTreeSet<IpNet>,
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
    /// Rules to add (before any route: the exceptions are in place before a
    /// route could take their traffic).
    pub add_rules: Vec<RouteRule>,
    /// Routes to remove from the main table (see [`Actual::stale_routes`]).
    pub remove_stale_routes: Vec<IpNet>,
    /// Routes to remove.
    pub remove_routes: Vec<IpNet>,
    /// Routes to add or replace.
    pub replace_routes: Vec<IpNet>,
    /// Rules to remove (after the routes).
    pub remove_rules: Vec<RouteRule>,
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
    /// Rules added.
    pub rules_added: usize,
    /// Rules removed.
    pub rules_removed: usize,
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
