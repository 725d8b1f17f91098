//! Reachability of the site routes this gateway advertises: a gateway that
//! is up but has lost its LAN must say so, or traffic keeps flowing into a
//! black hole. Each advertised prefix is checked against its configured
//! targets (a TCP connection, accepted or refused, or an ICMP echo); a
//! prefix without targets is healthy while an up interface has an address
//! inside it.
//!
//! The checks run on their own thread (they block, with timeouts) and
//! publish the result on a `watch` channel read by the control session
//! (health reports) and the probe responder (probe replies). They run every
//! `interval`, and at once when a link or an address changes (rtnetlink
//! events). A link counts as down as soon as it loses carrier (see
//! [`lan_up`]).

use std::{
    net::{IpAddr, SocketAddr, TcpStream},
    time::{Duration, Instant},
};

use ipnet::IpNet;

pub use mesh_agent_formats::reach::Target;

/// The health of one advertised route.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RouteHealth {
    /// The prefix.
    pub prefix: IpNet,
    /// Whether this gateway can serve it.
    pub healthy: bool,
    /// What the check saw.
    pub detail: String,
}

/// Checks a target once.
fn check(target: &Target, timeout: Duration) -> Result<(), String> {
    match target {
        Target::Tcp(a) => match TcpStream::connect_timeout(a, timeout) {
            Ok(_) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => Ok(()),
            Err(e) => Err(format!("{target}: {e}")),
        },
        Target::Icmp(a) => icmp_echo(*a, timeout).map_err(|e| format!("{target}: {e}")),
    }
}

/// One ICMP echo over a raw socket (the agent runs as root); the kernel
/// fills the ICMPv6 checksum, ours is computed for ICMPv4.
fn icmp_echo(addr: IpAddr, timeout: Duration) -> std::io::Result<()> {
    use socket2::{Domain, Protocol, Socket, Type};
    let (domain, proto, request, reply) = match addr {
        IpAddr::V4(_) => (Domain::IPV4, Protocol::ICMPV4, 8u8, 0u8),
        IpAddr::V6(_) => (Domain::IPV6, Protocol::ICMPV6, 128, 129),
    };
    let sock = Socket::new(domain, Type::RAW, Some(proto))?;
    static SEQ: std::sync::atomic::AtomicU16 = std::sync::atomic::AtomicU16::new(1);
    #[expect(clippy::cast_possible_truncation, reason = "an ICMP identifier is 16 bits")]
    let id = (std::process::id() as u16) ^ 0x6d65;
    let seq = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let mut pkt = [request, 0, 0, 0, 0, 0, 0, 0, b'm', b'e', b's', b'h'];
    pkt[4..6].copy_from_slice(&id.to_be_bytes());
    pkt[6..8].copy_from_slice(&seq.to_be_bytes());
    if addr.is_ipv4() {
        let c = inet_checksum(&pkt);
        pkt[2..4].copy_from_slice(&c.to_be_bytes());
    }
    sock.send_to(&pkt, &SocketAddr::new(addr, 0).into())?;
    let deadline = Instant::now() + timeout;
    let mut buf = [std::mem::MaybeUninit::<u8>::uninit(); 1500];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(std::io::ErrorKind::TimedOut.into());
        }
        sock.set_read_timeout(Some(left))?;
        let (n, from) = match sock.recv_from(&mut buf) {
            Ok(r) => r,
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                return Err(std::io::ErrorKind::TimedOut.into());
            }
            Err(e) => return Err(e),
        };
        // SAFETY: recv_from initialised the first `n` bytes.
        let data: Vec<u8> = buf[..n].iter().map(|b| unsafe { b.assume_init() }).collect();
        // IPv4 raw sockets deliver the IP header; IPv6 ones do not.
        let icmp = match addr {
            IpAddr::V4(_) => data.get(usize::from(data.first().copied().unwrap_or(0) & 0x0f) * 4..).unwrap_or(&[]),
            IpAddr::V6(_) => &data[..],
        };
        let from_ip = from.as_socket().map(|s| s.ip());
        if from_ip == Some(addr) && icmp.len() >= 8 && icmp[0] == reply && icmp[4..6] == id.to_be_bytes() {
            return Ok(());
        }
    }
}

/// The Internet checksum (RFC 1071).
fn inet_checksum(b: &[u8]) -> u16 {
    let mut sum: u32 = b.chunks(2).map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]))).sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    #[expect(clippy::cast_possible_truncation, reason = "folded to 16 bits above")]
    let folded = sum as u16;
    !folded
}

/// Whether an up, running interface with carrier has an address inside
/// `prefix`.
#[must_use]
pub fn lan_up(prefix: &IpNet) -> bool {
    use nix::net::if_::InterfaceFlags as F;
    let Ok(addrs) = nix::ifaddrs::getifaddrs() else { return true };
    addrs.into_iter().any(|ifa| {
        // IFF_LOWER_UP is the carrier as the driver has it now. IFF_RUNNING
        // (the operational state) and the link event follow it through the
        // kernel's link watch, which batches them up to a second when links
        // change elsewhere on the host: a pulled cable read "running", and
        // came as no event, 0.8 s long in CI.
        let up = ifa.flags.contains(F::IFF_UP | F::IFF_RUNNING | F::IFF_LOWER_UP);
        up && crate::net::ifaddr_ip(&ifa).is_some_and(|ip| prefix.contains(&ip))
    })
}

/// Checks every advertised prefix once.
#[must_use]
pub fn check_all(
    advertised: &[IpNet],
    targets: &std::collections::BTreeMap<IpNet, Vec<Target>>,
    timeout: Duration,
) -> Vec<RouteHealth> {
    advertised
        .iter()
        .map(|prefix| {
            let (healthy, detail) = match targets.get(prefix).filter(|t| !t.is_empty()) {
                None if lan_up(prefix) => (true, "LAN interface up".to_owned()),
                None => (false, "no up interface with an address in the prefix".to_owned()),
                Some(ts) => {
                    let mut errors = Vec::new();
                    let ok = ts.iter().find(|t| match check(t, timeout) {
                        Ok(()) => true,
                        Err(e) => {
                            errors.push(e);
                            false
                        }
                    });
                    match ok {
                        Some(t) => (true, format!("{t} answers")),
                        None => (false, format!("no target answers: {}", errors.join("; "))),
                    }
                }
            };
            RouteHealth { prefix: *prefix, healthy, detail }
        })
        .collect()
}

/// Starts the checking thread; the receiver sees every change (the first
/// result is there before this returns, so nothing starts out "healthy" by
/// default).
pub fn spawn(
    advertised: Vec<IpNet>,
    targets: std::collections::BTreeMap<IpNet, Vec<Target>>,
    interval: Duration,
    timeout: Duration,
) -> tokio::sync::watch::Receiver<Vec<RouteHealth>> {
    let first = check_all(&advertised, &targets, timeout);
    let (tx, rx) = tokio::sync::watch::channel(first);
    if advertised.is_empty() {
        return rx;
    }
    let spawned = std::thread::Builder::new().name("reachability".into()).spawn(move || {
        // Opened on this thread, so in the caller's network namespace.
        let events = LinkEvents::open(interval)
            .inspect_err(|e| tracing::warn!(error = %e, "no link events: LAN changes are seen at the next check only"))
            .ok();
        let mut last = Instant::now();
        loop {
            match &events {
                Some(ev) => ev.wait(),
                None => std::thread::sleep(interval),
            }
            // A storm of link events (a host creating containers) costs at
            // most 20 checks a second, not a target check per event.
            if let Some(rest) = Duration::from_millis(50).checked_sub(last.elapsed()) {
                std::thread::sleep(rest);
            }
            last = Instant::now();
            let now = check_all(&advertised, &targets, timeout);
            let changed = tx.send_if_modified(|cur| {
                if *cur == now {
                    return false;
                }
                for (old, new) in cur.iter().zip(&now) {
                    if old.healthy != new.healthy {
                        tracing::warn!(prefix = %new.prefix, healthy = new.healthy, detail = %new.detail, "advertised route health changed");
                    }
                }
                *cur = now;
                true
            });
            if !changed && tx.is_closed() {
                return;
            }
        }
    });
    if let Err(e) = spawned {
        tracing::error!(error = %e, "could not start the reachability checks; routes stay as first checked");
    }
    rx
}

/// Link and address changes, from rtnetlink's multicast groups.
struct LinkEvents(std::os::fd::OwnedFd);

impl LinkEvents {
    /// A subscription whose [`Self::wait`] returns after `timeout` at most.
    fn open(timeout: Duration) -> nix::Result<Self> {
        use nix::sys::socket::{
            AddressFamily, NetlinkAddr, SockFlag, SockProtocol, SockType, bind, setsockopt, socket,
            sockopt::ReceiveTimeout,
        };
        use std::os::fd::AsRawFd as _;
        let fd = socket(AddressFamily::Netlink, SockType::Raw, SockFlag::SOCK_CLOEXEC, SockProtocol::NetlinkRoute)?;
        let groups = (libc::RTMGRP_LINK | libc::RTMGRP_IPV4_IFADDR | libc::RTMGRP_IPV6_IFADDR) as u32;
        bind(fd.as_raw_fd(), &NetlinkAddr::new(0, groups))?;
        let tv = nix::sys::time::TimeVal::new(
            i64::try_from(timeout.as_secs()).unwrap_or(i64::MAX),
            i64::from(timeout.subsec_micros()),
        );
        setsockopt(&fd, ReceiveTimeout, &tv)?;
        Ok(Self(fd))
    }

    /// Returns when something changed or after the timeout, having read
    /// everything queued (a burst of changes costs one check). An overrun
    /// (ENOBUFS) counts as a change.
    fn wait(&self) {
        use nix::sys::socket::{MsgFlags, recv};
        use std::os::fd::AsRawFd as _;
        let mut buf = [0u8; 8192];
        match recv(self.0.as_raw_fd(), &mut buf, MsgFlags::empty()) {
            Err(nix::errno::Errno::EAGAIN | nix::errno::Errno::EINTR) => {}
            _ => while recv(self.0.as_raw_fd(), &mut buf, MsgFlags::MSG_DONTWAIT).is_ok() {},
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_parse_and_print() {
        for s in ["tcp:198.18.10.20:5432", "tcp:[fd00::1]:22", "icmp:198.18.10.20", "icmp:fd00::1"] {
            let t: Target = s.parse().unwrap();
            assert_eq!(t.to_string(), s);
        }
        for bad in ["198.18.10.20", "tcp:198.18.10.20", "icmp:host", "udp:1.2.3.4:5"] {
            assert!(bad.parse::<Target>().is_err(), "{bad}");
        }
    }

    #[test]
    fn checksum_of_a_known_echo() {
        // Echo request id 0x0001 seq 0x0001, no payload: checksum 0xf7fd.
        assert_eq!(inet_checksum(&[8, 0, 0, 0, 0, 1, 0, 1]), 0xf7fd);
    }

    #[test]
    fn loopback_targets() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let open = Target::Tcp(l.local_addr().unwrap());
        assert_eq!(check(&open, Duration::from_secs(1)), Ok(()));
        drop(l);
        // Refused still proves the host is there.
        assert_eq!(check(&open, Duration::from_secs(1)), Ok(()));
    }

    #[test]
    fn loopback_icmp_targets() {
        // A raw ICMP socket.
        mesh_lab::require_root!();
        assert_eq!(check(&Target::Icmp("127.0.0.1".parse().unwrap()), Duration::from_secs(1)), Ok(()));
        let lo: IpNet = "127.0.0.0/8".parse().unwrap();
        let h = check_all(&[lo], &std::collections::BTreeMap::new(), Duration::from_secs(1));
        assert!(h[0].healthy, "{h:?}");
    }

    /// A LAN cable pulled and plugged back is seen when it happens, not at
    /// the next check (a minute away here): the link events wake the checks.
    #[test]
    fn a_lan_link_change_is_seen_at_once() {
        mesh_lab::require_root!();
        let lab = mesh_lab::Lab::new().unwrap();
        let gw = lab.host("gw").unwrap();
        let lan = lab.switch("lan").unwrap();
        let port = lan.plug(&gw, "lan0").unwrap();
        gw.addr("lan0", "198.18.10.1/24").unwrap();
        let prefix: IpNet = "198.18.10.0/24".parse().unwrap();
        let interval = Duration::from_secs(60);
        // Spawned in the gateway's namespace: the thread and its socket stay there.
        let rx = gw
            .run(move || spawn(vec![prefix], std::collections::BTreeMap::new(), interval, Duration::from_secs(1)))
            .unwrap();
        let healthy = || rx.borrow()[0].healthy;
        assert!(healthy(), "{:?}", *rx.borrow());
        let seen = |want: bool| {
            let t = Instant::now();
            while healthy() != want {
                assert!(
                    t.elapsed() < Duration::from_secs(10),
                    "not seen in 10 s (checks every 60 s): {:?}",
                    *rx.borrow()
                );
                std::thread::sleep(Duration::from_millis(10));
            }
            t.elapsed()
        };
        lan.set_port(&port, false).unwrap();
        let down = seen(false);
        lan.set_port(&port, true).unwrap();
        let up = seen(true);
        eprintln!("LAN down seen after {} ms, up again after {} ms", down.as_millis(), up.as_millis());
    }
}
