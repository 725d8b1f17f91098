//! The site side of a gateway: what makes the site's LAN send its mesh
//! traffic, and the replies to mesh traffic, through the right gateway.
//!
//! - **Virtual addresses.** Each advertised prefix may have virtual gateway
//!   addresses (`control.route_options`). The gateway that owns the prefix's
//!   site side (decided by the prober, see [`crate::probe::owner`]) holds
//!   them on its LAN interface (the interface with an address inside the
//!   prefix) as `/32` / `/128`, and announces them ([`announce`]) five times
//!   over a second when it takes over; the owner ranked first in control's
//!   order also re-announces every second (the split-brain rule). It removes
//!   them as soon as it no longer owns the prefix, and when the agent stops
//!   (unless `keep_dataplane_on_exit`).
//! - **SNAT** ([`snat`]) for the prefixes that ask for it, on every gateway
//!   that serves them, owner or not.
//!
//! All of it runs on its own thread, in the agent's network namespace: the
//! netlink socket is synchronous, and a takeover must not wait behind the
//! control session.

pub mod announce;
pub mod snat;

use std::{
    collections::BTreeMap,
    net::IpAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use ipnet::IpNet;
use tokio::sync::watch;

use crate::{
    config::RouteOptions,
    net::{NetOps as _, ifaddr_ip, rtnl::Rtnl},
    probe::owner::Ownership,
};

/// Announcements when taking over, and the gap between them.
const TAKEOVER_ANNOUNCEMENTS: u32 = 5;
const ANNOUNCE_GAP: Duration = Duration::from_millis(200);
/// The first-ranked owner's re-announcement period.
const REFRESH: Duration = Duration::from_secs(1);
/// How often the thread looks for a new decision (a takeover waits at most
/// this long) and checks that held addresses are still in place.
const TICK: Duration = Duration::from_millis(20);
const VERIFY: Duration = Duration::from_secs(1);

/// A held prefix's addresses on its LAN interface.
#[derive(Debug)]
struct Held {
    ifindex: u32,
    mac: [u8; 6],
    addrs: Vec<IpAddr>,
    announcements_left: u32,
    next_announce: Instant,
    first: bool,
}

/// The addresses of up interfaces inside `prefix` other than its virtual
/// ones, with their interface: where this gateway sits on the site LAN.
fn on_site<'a>(
    ifs: &'a [nix::ifaddrs::InterfaceAddress],
    prefix: &'a IpNet,
    virtual_addrs: &'a [IpAddr],
) -> impl Iterator<Item = (&'a nix::ifaddrs::InterfaceAddress, IpAddr)> + 'a {
    ifs.iter().filter_map(move |ifa| {
        let ip = ifaddr_ip(ifa)?;
        (ifa.flags.contains(nix::net::if_::InterfaceFlags::IFF_UP)
            && prefix.contains(&ip)
            && !virtual_addrs.contains(&ip))
        .then_some((ifa, ip))
    })
}

/// This gateway's own addresses on the LAN of `prefix` ([`on_site`]): the
/// first of each family. The site's other gateways probe it there.
#[must_use]
pub fn lan_addresses(prefix: &IpNet, virtual_addrs: &[IpAddr]) -> Vec<IpAddr> {
    let Ok(ifs) = nix::ifaddrs::getifaddrs() else { return Vec::new() };
    let ifs: Vec<_> = ifs.collect();
    let mut out: Vec<IpAddr> = Vec::new();
    for (_, ip) in on_site(&ifs, prefix, virtual_addrs) {
        if !out.iter().any(|o| o.is_ipv4() == ip.is_ipv4()) {
            out.push(ip);
        }
    }
    out.sort_by_key(IpAddr::is_ipv6);
    out
}

/// The LAN interface for `prefix`: the interface of its first address
/// there ([`on_site`]); its index, MAC and name.
pub(crate) fn lan_interface(prefix: &IpNet, virtual_addrs: &[IpAddr]) -> Option<(u32, [u8; 6], String)> {
    let ifs: Vec<_> = nix::ifaddrs::getifaddrs().ok()?.collect();
    let name = on_site(&ifs, prefix, virtual_addrs).next()?.0.interface_name.clone();
    let mac = ifs.iter().find_map(|ifa| {
        (ifa.interface_name == name).then_some(())?;
        ifa.address.as_ref()?.as_link_addr()?.addr()
    })?;
    let index = nix::net::if_::if_nametoindex(name.as_str()).ok()?;
    Some((index, mac, name))
}

/// Every interface index holding `addr` (as a host address).
fn holders(rtnl: &mut Rtnl, addr: IpAddr) -> Vec<u32> {
    let Ok(ifs) = nix::ifaddrs::getifaddrs() else { return Vec::new() };
    let mut names: Vec<String> = ifs.filter(|ifa| ifaddr_ip(ifa) == Some(addr)).map(|ifa| ifa.interface_name).collect();
    names.dedup();
    names.iter().filter_map(|n| rtnl.link(n).ok().flatten().map(|l| l.index)).collect()
}

/// The site thread; stops (and cleans up) when dropped.
#[derive(Debug)]
pub struct Site {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Site {
    /// Starts the thread for these route options; `ifname` is the overlay
    /// interface (SNAT matches traffic coming from it). The returned sender
    /// is where the prober publishes what this gateway owns.
    pub fn start(
        options: BTreeMap<IpNet, RouteOptions>,
        ifname: String,
        keep_on_exit: bool,
    ) -> std::io::Result<(Self, watch::Sender<Ownership>)> {
        let (tx, rx) = watch::channel(Ownership::new());
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name("site".into())
            .spawn(move || run(&options, &ifname, keep_on_exit, rx, &flag))?;
        Ok((Self { stop, thread: Some(thread) }, tx))
    }
}

impl Drop for Site {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn run(
    options: &BTreeMap<IpNet, RouteOptions>,
    ifname: &str,
    keep_on_exit: bool,
    mut owned: watch::Receiver<Ownership>,
    stop: &AtomicBool,
) {
    let snat: Vec<IpNet> = options.iter().filter(|(_, o)| o.snat).map(|(p, _)| *p).collect();
    let vips: BTreeMap<IpNet, Vec<IpAddr>> = options
        .iter()
        .filter(|(_, o)| !o.virtual_addresses.is_empty())
        .map(|(p, o)| (p.trunc(), o.virtual_addresses.clone()))
        .collect();
    if snat.is_empty() && vips.is_empty() {
        return;
    }
    match snat::apply(ifname, &snat) {
        Ok(()) if !snat.is_empty() => tracing::info!(prefixes = ?snat, table = %snat::table_name(ifname), "SNAT on"),
        Ok(()) => {}
        Err(e) => tracing::error!(error = %e, "SNAT not set; replies from those sites depend on their LAN routes"),
    }
    let mut rtnl = match Rtnl::new() {
        Ok(r) => Some(r),
        Err(e) => {
            tracing::error!(error = %e, "no netlink socket: virtual addresses cannot be held");
            None
        }
    };
    // Addresses a previous run left behind (killed, or kept on exit) are
    // dropped: this run holds only what the decision gives it, after the
    // prober's start-up grace, so a restarted gateway never answers for an
    // address its peer took over meanwhile.
    if let Some(r) = rtnl.as_mut() {
        for addr in vips.values().flatten() {
            for index in holders(r, *addr) {
                let net = IpNet::from(*addr);
                match r.remove_address(index, net) {
                    Ok(()) => tracing::info!(%addr, "removed a virtual address left by an earlier run"),
                    Err(e) => tracing::warn!(%addr, error = %e, "could not remove a stale virtual address"),
                }
            }
        }
    }
    let mut held: BTreeMap<IpNet, Held> = BTreeMap::new();
    let mut wanted = Ownership::new();
    let mut next_verify = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        let now = Instant::now();
        if owned.has_changed().unwrap_or(false) {
            wanted = owned.borrow_and_update().clone();
        }
        let Some(r) = rtnl.as_mut() else {
            std::thread::sleep(TICK);
            continue;
        };
        // Give up what is no longer ours first: two holders of one address
        // are worse than none for the instant between the two steps.
        let gone: Vec<IpNet> = held.keys().filter(|p| !wanted.contains_key(*p)).copied().collect();
        for prefix in gone {
            if let Some(h) = held.remove(&prefix) {
                release(r, &prefix, &h);
            }
        }
        for (prefix, o) in &wanted {
            let Some(addrs) = vips.get(prefix) else { continue };
            if let Some(h) = held.get_mut(prefix) {
                h.first = o.first;
                continue;
            }
            match take(r, prefix, addrs, o.first) {
                Ok(h) => {
                    held.insert(*prefix, h);
                }
                // Retried at the next tick.
                Err(e) => tracing::error!(%prefix, error = %e, "could not take the virtual addresses"),
            }
        }
        if now >= next_verify {
            next_verify = now + VERIFY;
            for (prefix, h) in &mut held {
                let present = r.addresses(h.ifindex).unwrap_or_default();
                for addr in &h.addrs {
                    if !present.contains(&IpNet::from(*addr))
                        && let Err(e) = r.add_host_address(h.ifindex, *addr)
                    {
                        tracing::warn!(%prefix, %addr, error = %e, "could not restore a virtual address");
                    }
                }
            }
        }
        for (prefix, h) in &mut held {
            if now < h.next_announce {
                continue;
            }
            for addr in &h.addrs {
                if let Err(e) = announce::announce(h.ifindex, h.mac, *addr) {
                    tracing::warn!(%prefix, %addr, error = %e, "announcement not sent");
                }
            }
            if h.announcements_left > 0 {
                h.announcements_left -= 1;
            }
            h.next_announce = match (h.announcements_left, h.first) {
                (n, _) if n > 0 => now + ANNOUNCE_GAP,
                (_, true) => now + REFRESH,
                // Nothing more to say until something changes.
                (_, false) => now + Duration::from_secs(3600),
            };
        }
        std::thread::sleep(TICK);
    }
    if !keep_on_exit {
        if let Some(r) = rtnl.as_mut() {
            for (prefix, h) in &held {
                release(r, prefix, h);
            }
        }
        if !snat.is_empty()
            && let Err(e) = snat::remove(ifname)
        {
            tracing::warn!(error = %e, "SNAT table not removed");
        }
    }
}

fn take(r: &mut Rtnl, prefix: &IpNet, addrs: &[IpAddr], first: bool) -> Result<Held, String> {
    let (ifindex, mac, name) =
        lan_interface(prefix, addrs).ok_or_else(|| format!("no up interface with an address in {prefix}"))?;
    for addr in addrs {
        r.add_host_address(ifindex, *addr).map_err(|e| e.to_string())?;
    }
    tracing::warn!(%prefix, interface = %name, addresses = ?addrs, "holding the site's virtual addresses");
    Ok(Held {
        ifindex,
        mac,
        addrs: addrs.to_vec(),
        announcements_left: TAKEOVER_ANNOUNCEMENTS,
        next_announce: Instant::now(),
        first,
    })
}

fn release(r: &mut Rtnl, prefix: &IpNet, h: &Held) {
    for addr in &h.addrs {
        if let Err(e) = r.remove_address(h.ifindex, IpNet::from(*addr)) {
            tracing::error!(%prefix, %addr, error = %e, "could not give up a virtual address");
        }
    }
    tracing::warn!(%prefix, addresses = ?h.addrs, "gave up the site's virtual addresses");
}
