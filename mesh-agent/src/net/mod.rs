//! Network programming: the overlay link's state, addresses, routes and
//! forwarding. [`NetOps`] is what reconcile calls; [`rtnl::Rtnl`] implements
//! it over rtnetlink (every change idempotent: replace, never add-and-fail),
//! [`sysctl`] reads and writes the forwarding switches.
//!
//! Everything acts on the network namespace of the thread that opened the
//! netlink socket (and, for sysctls, of the calling thread).

pub mod rtnl;
pub mod sysctl;

use std::collections::BTreeSet;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

/// The IP address of a `getifaddrs` entry, if it has one (link-layer
/// entries have none).
#[must_use]
pub fn ifaddr_ip(ifa: &nix::ifaddrs::InterfaceAddress) -> Option<std::net::IpAddr> {
    let a = ifa.address.as_ref()?;
    a.as_sockaddr_in()
        .map(|s| std::net::IpAddr::V4(s.ip()))
        .or_else(|| a.as_sockaddr_in6().map(|s| std::net::IpAddr::V6(s.ip())))
}

/// Routes and rules the agent installs carry this `rtm_protocol` /
/// `FRA_PROTOCOL`, so the agent only ever removes its own (`ip route` and
/// `ip rule` show it as `proto 109`).
pub const ROUTE_PROTOCOL: u8 = 109;

/// The main routing table (`RT_TABLE_MAIN`).
pub const MAIN_TABLE: u32 = 254;

/// One policy-routing rule of the agent (`ip rule`): packets that match
/// `dst` (all when `None`) and carry `fwmark` (any when `None`) look up
/// `table`. IPv4 or IPv6 by `v6`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct RouteRule {
    /// Rule priority (lower is consulted first; main's rule is 32766).
    pub priority: u32,
    /// An IPv6 rule.
    pub v6: bool,
    /// Destination selector.
    pub dst: Option<IpNet>,
    /// fwmark selector (matched with the mark as its own mask).
    pub fwmark: Option<u32>,
    /// Table to look up.
    pub table: u32,
}

/// Errors of network programming.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// A netlink request failed.
    #[error("netlink {op}: {message}")]
    Netlink {
        /// What was being done.
        op: String,
        /// The kernel's or the library's message.
        message: String,
        /// The errno, when the kernel sent one (positive).
        errno: Option<i32>,
    },
    /// A sysctl could not be read or written.
    #[error("sysctl {key}: {source}")]
    Sysctl {
        /// The key.
        key: String,
        /// The error.
        source: std::io::Error,
    },
    /// Local I/O (opening the netlink socket, the runtime).
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The error.
        source: std::io::Error,
    },
}

impl NetError {
    /// The kernel's errno, if this is a netlink error carrying one.
    #[must_use]
    pub const fn errno(&self) -> Option<i32> {
        match self {
            Self::Netlink { errno, .. } => *errno,
            _ => None,
        }
    }
}

/// A link's state.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LinkState {
    /// Interface index.
    pub index: u32,
    /// Administratively up.
    pub up: bool,
    /// MTU.
    pub mtu: u32,
}

/// The forwarding switches.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Forwarding {
    /// `net.ipv4.ip_forward`.
    pub ipv4: bool,
    /// `net.ipv6.conf.all.forwarding`.
    pub ipv6: bool,
}

/// The network operations reconcile needs; faked in tests.
pub trait NetOps: Send {
    /// The link called `name`, or `None` if there is none.
    fn link(&mut self, name: &str) -> Result<Option<LinkState>, NetError>;
    /// Sets the link's MTU.
    fn set_mtu(&mut self, index: u32, mtu: u32) -> Result<(), NetError>;
    /// Sets the link administratively up.
    fn set_up(&mut self, index: u32) -> Result<(), NetError>;
    /// Addresses on the link (IPv6 link-local ones left out: the kernel owns them).
    fn addresses(&mut self, index: u32) -> Result<BTreeSet<IpNet>, NetError>;
    /// Adds an address, replacing an equal one.
    fn replace_address(&mut self, index: u32, addr: IpNet) -> Result<(), NetError>;
    /// Removes an address; absent is not an error.
    fn remove_address(&mut self, index: u32, addr: IpNet) -> Result<(), NetError>;
    /// Destinations of the agent's routes ([`ROUTE_PROTOCOL`]) in `table` out of the link.
    fn routes(&mut self, index: u32, table: u32) -> Result<BTreeSet<IpNet>, NetError>;
    /// Routes `dst` out of the link in `table`, replacing any route to `dst` there.
    fn replace_route(&mut self, index: u32, table: u32, dst: IpNet) -> Result<(), NetError>;
    /// Removes the agent's route to `dst` from `table`; absent is not an error.
    fn remove_route(&mut self, index: u32, table: u32, dst: IpNet) -> Result<(), NetError>;
    /// The networks of the main table's link-scope (connected) routes out of
    /// links other than `index`: the underlay and LANs the host reaches
    /// directly, which mesh routes must never take over.
    fn connected(&mut self, index: u32) -> Result<BTreeSet<IpNet>, NetError>;
    /// The agent's policy-routing rules ([`ROUTE_PROTOCOL`]).
    fn rules(&mut self) -> Result<BTreeSet<RouteRule>, NetError>;
    /// Adds a rule; an identical existing one is not an error.
    fn add_rule(&mut self, rule: &RouteRule) -> Result<(), NetError>;
    /// Removes a rule; absent is not an error.
    fn remove_rule(&mut self, rule: &RouteRule) -> Result<(), NetError>;
    /// The forwarding switches.
    fn forwarding(&mut self) -> Result<Forwarding, NetError>;
    /// Turns on the switches that are `true` in `on` (never turns any off).
    fn enable_forwarding(&mut self, on: Forwarding) -> Result<(), NetError>;
}
