//! [`NetOps`] over rtnetlink 0.24. A small current-thread runtime drives the
//! netlink connection, so callers stay synchronous (reconcile runs on its own
//! thread) and the socket lives in the namespace of the thread that opened it.

use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use futures::TryStreamExt as _;
use ipnet::IpNet;
use rtnetlink::{
    Handle, IpVersion, LinkUnspec, LinkWireguard, RouteMessageBuilder,
    packet_route::{
        AddressFamily,
        address::{AddressAttribute, AddressFlags, AddressMessage},
        link::{LinkAttribute, LinkFlags},
        route::{RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteScope},
        rule::{RuleAction, RuleAttribute, RuleMessage},
    },
};

use super::{Forwarding, LinkState, NetError, NetOps, ROUTE_PROTOCOL, RouteRule, sysctl};

const EEXIST: i32 = 17;

const ENODEV: i32 = 19;
const ESRCH: i32 = 3;
const EADDRNOTAVAIL: i32 = 99;
const ENOENT: i32 = 2;

/// rtnetlink, synchronously.
#[derive(Debug)]
pub struct Rtnl {
    rt: tokio::runtime::Runtime,
    handle: Handle,
}

fn nl_err(op: impl Into<String>, e: rtnetlink::Error) -> NetError {
    let errno = match &e {
        rtnetlink::Error::NetlinkError(m) => m.code.map(|c| -c.get()),
        _ => None,
    };
    let message = match (&e, errno) {
        (_, Some(n)) => std::io::Error::from_raw_os_error(n).to_string(),
        _ => e.to_string(),
    };
    NetError::Netlink { op: op.into(), message, errno }
}

impl Rtnl {
    /// Opens a netlink socket in the calling thread's network namespace.
    pub fn new() -> Result<Self, NetError> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .build()
            .map_err(|source| NetError::Io { what: "building the netlink runtime", source })?;
        let (conn, handle, _) = {
            let _guard = rt.enter();
            rtnetlink::new_connection().map_err(|source| NetError::Io { what: "opening a netlink socket", source })?
        };
        rt.spawn(conn);
        Ok(Self { rt, handle })
    }

    /// Creates a WireGuard link (kernel module) called `name`; an existing
    /// link of that name is left alone. `EOPNOTSUPP` here means the kernel
    /// has no WireGuard.
    pub fn create_wireguard(&mut self, name: &str) -> Result<(), NetError> {
        if self.link(name)?.is_some() {
            return Ok(());
        }
        let msg = LinkWireguard::new(name).build();
        let h = self.handle.clone();
        self.rt
            .block_on(async move { h.link().add(msg).execute().await })
            .map_err(|e| nl_err(format!("creating wireguard link {name}"), e))
    }

    /// Deletes a link; absent is not an error.
    pub fn delete_link(&mut self, name: &str) -> Result<(), NetError> {
        let Some(link) = self.link(name)? else { return Ok(()) };
        let h = self.handle.clone();
        match self.rt.block_on(async move { h.link().del(link.index).execute().await }) {
            Ok(()) => Ok(()),
            Err(e) => match nl_err(format!("deleting link {name}"), e) {
                err if err.errno() == Some(ENODEV) => Ok(()),
                err => Err(err),
            },
        }
    }

    /// Adds a single address (`/32` or `/128`) to a link, replacing an equal
    /// one; IPv6 without duplicate address detection, so that a virtual
    /// address taken over from another gateway is usable at once instead of
    /// tentative for a second (or failed, while the old owner still had it).
    pub fn add_host_address(&mut self, index: u32, addr: IpAddr) -> Result<(), NetError> {
        let h = self.handle.clone();
        let len = if addr.is_ipv4() { 32 } else { 128 };
        self.rt
            .block_on(async move {
                let mut req = h.address().add(index, addr, len).replace();
                if addr.is_ipv6() {
                    req.message_mut().attributes.push(AddressAttribute::Flags(AddressFlags::Nodad));
                }
                req.execute().await
            })
            .map_err(|e| nl_err(format!("adding address {addr} to link {index}"), e))
    }

    fn address_messages(&mut self, index: u32) -> Result<Vec<AddressMessage>, NetError> {
        let h = self.handle.clone();
        self.rt
            .block_on(
                async move { h.address().get().set_link_index_filter(index).execute().try_collect::<Vec<_>>().await },
            )
            .map_err(|e| nl_err("listing addresses", e))
    }

    fn route_messages(&mut self) -> Result<Vec<RouteMessage>, NetError> {
        let h = self.handle.clone();
        self.rt
            .block_on(async move {
                let mut all = h
                    .route()
                    .get(RouteMessageBuilder::<Ipv4Addr>::new().build())
                    .execute()
                    .try_collect::<Vec<_>>()
                    .await?;
                let v6 = h
                    .route()
                    .get(RouteMessageBuilder::<Ipv6Addr>::new().build())
                    .execute()
                    .try_collect::<Vec<_>>()
                    .await?;
                all.extend(v6);
                Ok(all)
            })
            .map_err(|e| nl_err("listing routes", e))
    }

    fn route_message(index: u32, table: u32, dst: IpNet) -> RouteMessage {
        let mut msg = RouteMessageBuilder::<IpAddr>::new()
            .destination_prefix(dst.network(), dst.prefix_len())
            .expect("an IpNet is a valid prefix")
            .output_interface(index)
            .table_id(table)
            .protocol(RouteProtocol::from(ROUTE_PROTOCOL))
            .build();
        // `ip route add X dev Y` uses link scope for IPv4 device routes.
        if dst.addr().is_ipv4() {
            msg.header.scope = RouteScope::Link;
        }
        msg
    }
}

/// The netlink form of a rule (`ip rule add [fwmark M/M] [to D] lookup T
/// priority P protocol 109`).
fn rule_message(r: &RouteRule) -> RuleMessage {
    let mut msg = RuleMessage::default();
    msg.header.family = if r.v6 { AddressFamily::Inet6 } else { AddressFamily::Inet };
    msg.header.action = RuleAction::ToTable;
    // Tables above 255 only fit the attribute; the header says "see it".
    msg.header.table = u8::try_from(r.table).unwrap_or(0);
    msg.attributes.push(RuleAttribute::Table(r.table));
    msg.attributes.push(RuleAttribute::Priority(r.priority));
    msg.attributes.push(RuleAttribute::Protocol(RouteProtocol::from(ROUTE_PROTOCOL)));
    if let Some(m) = r.fwmark {
        msg.attributes.push(RuleAttribute::FwMark(m));
        msg.attributes.push(RuleAttribute::FwMask(m));
    }
    if let Some(d) = r.dst {
        msg.header.dst_len = d.prefix_len();
        msg.attributes.push(RuleAttribute::Destination(d.network()));
    }
    msg
}

/// The agent's rule a netlink rule message describes, if it is one.
fn rule_of(msg: &RuleMessage) -> Option<RouteRule> {
    let attr = |f: &dyn Fn(&RuleAttribute) -> Option<u32>| msg.attributes.iter().find_map(f);
    let own = msg
        .attributes
        .iter()
        .any(|a| matches!(a, RuleAttribute::Protocol(p) if *p == RouteProtocol::from(ROUTE_PROTOCOL)));
    if !own || msg.header.action != RuleAction::ToTable {
        return None;
    }
    let dst = msg.attributes.iter().find_map(|a| if let RuleAttribute::Destination(ip) = a { Some(*ip) } else { None });
    Some(RouteRule {
        priority: attr(&|a| if let RuleAttribute::Priority(p) = a { Some(*p) } else { None }).unwrap_or(0),
        v6: msg.header.family == AddressFamily::Inet6,
        dst: dst.and_then(|ip| IpNet::new(ip, msg.header.dst_len).ok()),
        fwmark: attr(&|a| if let RuleAttribute::FwMark(m) = a { Some(*m) } else { None }),
        table: attr(&|a| if let RuleAttribute::Table(t) = a { Some(*t) } else { None })
            .unwrap_or(u32::from(msg.header.table)),
    })
}

fn address_of(msg: &AddressMessage) -> Option<IpNet> {
    // IFA_LOCAL is the local address on point-to-point links; IFA_ADDRESS
    // otherwise (and for IPv6).
    let ip = msg
        .attributes
        .iter()
        .find_map(|a| if let AddressAttribute::Local(ip) = a { Some(*ip) } else { None })
        .or_else(|| {
            msg.attributes.iter().find_map(|a| if let AddressAttribute::Address(ip) = a { Some(*ip) } else { None })
        })?;
    IpNet::new(ip, msg.header.prefix_len).ok()
}

fn is_link_local(net: &IpNet) -> bool {
    matches!(net.addr(), IpAddr::V6(v6) if v6.is_unicast_link_local())
}

fn route_dst(msg: &RouteMessage) -> Option<IpNet> {
    let len = msg.header.destination_prefix_length;
    let ip = msg.attributes.iter().find_map(|a| match a {
        RouteAttribute::Destination(RouteAddress::Inet(v4)) => Some(IpAddr::V4(*v4)),
        RouteAttribute::Destination(RouteAddress::Inet6(v6)) => Some(IpAddr::V6(*v6)),
        _ => None,
    });
    let ip = ip.unwrap_or(match msg.header.address_family {
        AddressFamily::Inet6 => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
        _ => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
    });
    IpNet::new(ip, len).ok()
}

fn route_table(msg: &RouteMessage) -> u32 {
    msg.attributes
        .iter()
        .find_map(|a| if let RouteAttribute::Table(t) = a { Some(*t) } else { None })
        .unwrap_or(u32::from(msg.header.table))
}

fn route_oif(msg: &RouteMessage) -> Option<u32> {
    msg.attributes.iter().find_map(|a| if let RouteAttribute::Oif(i) = a { Some(*i) } else { None })
}

impl NetOps for Rtnl {
    fn link(&mut self, name: &str) -> Result<Option<LinkState>, NetError> {
        let h = self.handle.clone();
        let name_owned = name.to_owned();
        let res = self
            .rt
            .block_on(async move { h.link().get().match_name(name_owned).execute().try_collect::<Vec<_>>().await });
        match res {
            Ok(msgs) => Ok(msgs.into_iter().next().map(|m| LinkState {
                index: m.header.index,
                up: m.header.flags.contains(LinkFlags::Up),
                mtu: m
                    .attributes
                    .iter()
                    .find_map(|a| if let LinkAttribute::Mtu(v) = a { Some(*v) } else { None })
                    .unwrap_or(0),
            })),
            Err(e) => match nl_err(format!("reading link {name}"), e) {
                err if err.errno() == Some(ENODEV) => Ok(None),
                err => Err(err),
            },
        }
    }

    fn set_mtu(&mut self, index: u32, mtu: u32) -> Result<(), NetError> {
        let h = self.handle.clone();
        self.rt
            .block_on(async move { h.link().set(LinkUnspec::new_with_index(index).mtu(mtu).build()).execute().await })
            .map_err(|e| nl_err(format!("setting mtu {mtu} on link {index}"), e))
    }

    fn set_up(&mut self, index: u32) -> Result<(), NetError> {
        let h = self.handle.clone();
        self.rt
            .block_on(async move { h.link().set(LinkUnspec::new_with_index(index).up().build()).execute().await })
            .map_err(|e| nl_err(format!("setting link {index} up"), e))
    }

    fn addresses(&mut self, index: u32) -> Result<BTreeSet<IpNet>, NetError> {
        Ok(self
            .address_messages(index)?
            .iter()
            .filter(|m| m.header.index == index)
            .filter_map(address_of)
            .filter(|n| !is_link_local(n))
            .collect())
    }

    fn replace_address(&mut self, index: u32, addr: IpNet) -> Result<(), NetError> {
        let h = self.handle.clone();
        self.rt
            .block_on(async move { h.address().add(index, addr.addr(), addr.prefix_len()).replace().execute().await })
            .map_err(|e| nl_err(format!("adding address {addr} to link {index}"), e))
    }

    fn remove_address(&mut self, index: u32, addr: IpNet) -> Result<(), NetError> {
        let msgs = self.address_messages(index)?;
        let Some(msg) = msgs.into_iter().find(|m| m.header.index == index && address_of(m) == Some(addr)) else {
            return Ok(());
        };
        let h = self.handle.clone();
        match self.rt.block_on(async move { h.address().del(msg).execute().await }) {
            Ok(()) => Ok(()),
            Err(e) => match nl_err(format!("removing address {addr} from link {index}"), e) {
                err if err.errno() == Some(EADDRNOTAVAIL) => Ok(()),
                err => Err(err),
            },
        }
    }

    fn routes(&mut self, index: u32, table: u32) -> Result<BTreeSet<IpNet>, NetError> {
        Ok(self
            .route_messages()?
            .iter()
            .filter(|m| m.header.protocol == RouteProtocol::from(ROUTE_PROTOCOL))
            .filter(|m| route_table(m) == table)
            .filter(|m| route_oif(m) == Some(index))
            .filter_map(route_dst)
            .collect())
    }

    fn connected(&mut self, index: u32) -> Result<BTreeSet<IpNet>, NetError> {
        Ok(self
            .route_messages()?
            .iter()
            .filter(|m| route_table(m) == u32::from(RouteHeader::RT_TABLE_MAIN))
            .filter(|m| m.header.scope == RouteScope::Link)
            .filter(|m| route_oif(m).is_some_and(|o| o != index))
            .filter_map(route_dst)
            .filter(|d| d.prefix_len() != 0 && !is_link_local(d))
            .collect())
    }

    fn rules(&mut self) -> Result<BTreeSet<RouteRule>, NetError> {
        let h = self.handle.clone();
        let msgs = self
            .rt
            .block_on(async move {
                let mut all = h.rule().get(IpVersion::V4).execute().try_collect::<Vec<_>>().await?;
                all.extend(h.rule().get(IpVersion::V6).execute().try_collect::<Vec<_>>().await?);
                Ok::<_, rtnetlink::Error>(all)
            })
            .map_err(|e| nl_err("listing rules", e))?;
        Ok(msgs.iter().filter_map(rule_of).collect())
    }

    fn add_rule(&mut self, rule: &RouteRule) -> Result<(), NetError> {
        let msg = rule_message(rule);
        let h = self.handle.clone();
        let res = self.rt.block_on(async move {
            let mut req = h.rule().add();
            *req.message_mut() = msg;
            req.execute().await
        });
        match res {
            Ok(()) => Ok(()),
            Err(e) => match nl_err(format!("adding rule {rule:?}"), e) {
                err if err.errno() == Some(EEXIST) => Ok(()),
                err => Err(err),
            },
        }
    }

    fn remove_rule(&mut self, rule: &RouteRule) -> Result<(), NetError> {
        let msg = rule_message(rule);
        let h = self.handle.clone();
        match self.rt.block_on(async move { h.rule().del(msg).execute().await }) {
            Ok(()) => Ok(()),
            Err(e) => match nl_err(format!("removing rule {rule:?}"), e) {
                err if matches!(err.errno(), Some(ESRCH | ENOENT)) => Ok(()),
                err => Err(err),
            },
        }
    }

    fn replace_route(&mut self, index: u32, table: u32, dst: IpNet) -> Result<(), NetError> {
        let msg = Self::route_message(index, table, dst);
        let h = self.handle.clone();
        self.rt
            .block_on(async move { h.route().add(msg).replace().execute().await })
            .map_err(|e| nl_err(format!("routing {dst} via link {index}"), e))
    }

    fn remove_route(&mut self, index: u32, table: u32, dst: IpNet) -> Result<(), NetError> {
        let msg = Self::route_message(index, table, dst);
        let h = self.handle.clone();
        match self.rt.block_on(async move { h.route().del(msg).execute().await }) {
            Ok(()) => Ok(()),
            Err(e) => match nl_err(format!("removing route {dst}"), e) {
                err if matches!(err.errno(), Some(ESRCH | ENOENT)) => Ok(()),
                err => Err(err),
            },
        }
    }

    fn forwarding(&mut self) -> Result<Forwarding, NetError> {
        sysctl::forwarding()
    }

    fn enable_forwarding(&mut self, on: Forwarding) -> Result<(), NetError> {
        sysctl::enable(on)
    }
}
