//! Announcing that a virtual address moved: a gratuitous ARP request for
//! IPv4 and an unsolicited neighbour advertisement (override flag set) for
//! IPv6, broadcast on the LAN interface, as keepalived, kube-vip and
//! MetalLB's L2 mode do. The site's hosts (and switches) update their
//! caches to the new owner's MAC at once instead of when their entry goes
//! stale.

use std::{
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddrV6},
};

use socket2::{Domain, Protocol, Socket, Type};

const ETH_P_ARP: u16 = 0x0806;

/// The ARP payload of a gratuitous request: sender and target are both the
/// announced address, the sender's hardware address is `mac`.
#[must_use]
pub fn garp(mac: [u8; 6], ip: Ipv4Addr) -> [u8; 28] {
    let mut p = [0u8; 28];
    p[0..2].copy_from_slice(&1u16.to_be_bytes()); // Ethernet
    p[2..4].copy_from_slice(&0x0800u16.to_be_bytes()); // IPv4
    p[4] = 6;
    p[5] = 4;
    p[6..8].copy_from_slice(&1u16.to_be_bytes()); // request
    p[8..14].copy_from_slice(&mac);
    p[14..18].copy_from_slice(&ip.octets());
    // Target hardware address stays zero.
    p[24..28].copy_from_slice(&ip.octets());
    p
}

/// An unsolicited neighbour advertisement for `target` (override set,
/// solicited clear, as RFC 4861 7.2.6 asks) with the target link-layer
/// address option. The checksum is left zero: the kernel fills it in on
/// ICMPv6 raw sockets.
#[must_use]
pub fn unsolicited_na(mac: [u8; 6], target: Ipv6Addr) -> [u8; 32] {
    let mut p = [0u8; 32];
    p[0] = 136; // neighbour advertisement
    p[4] = 0x20; // override
    p[8..24].copy_from_slice(&target.octets());
    p[24] = 2; // target link-layer address
    p[25] = 1; // 8 bytes
    p[26..32].copy_from_slice(&mac);
    p
}

/// Announces `addr` as living at `mac` on interface `ifindex`.
pub fn announce(ifindex: u32, mac: [u8; 6], addr: IpAddr) -> io::Result<()> {
    match addr {
        IpAddr::V4(ip) => send_arp(ifindex, &garp(mac, ip)),
        IpAddr::V6(ip) => {
            let sock = Socket::new(Domain::IPV6, Type::RAW, Some(Protocol::ICMPV6))?;
            // Receivers drop neighbour discovery that crossed a router.
            sock.set_multicast_hops_v6(255)?;
            sock.set_multicast_if_v6(ifindex)?;
            let all_nodes = SocketAddrV6::new(Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1), 0, 0, ifindex);
            sock.send_to(&unsolicited_na(mac, ip), &all_nodes.into()).map(|_| ())
        }
    }
}

fn send_arp(ifindex: u32, payload: &[u8]) -> io::Result<()> {
    // SAFETY: plain socket(2); the descriptor is owned by `Socket` below.
    let fd =
        unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, i32::from(ETH_P_ARP.to_be())) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor nobody else owns.
    let sock = unsafe { <Socket as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    // SAFETY: sockaddr_ll is plain old data; all-zero is a valid start.
    let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sll.sll_family = libc::AF_PACKET as u16;
    sll.sll_protocol = ETH_P_ARP.to_be();
    sll.sll_ifindex = i32::try_from(ifindex).map_err(|_| io::Error::other("interface index out of range"))?;
    sll.sll_halen = 6;
    sll.sll_addr[..6].copy_from_slice(&[0xff; 6]);
    // SAFETY: the buffer and the address are valid for the lengths given.
    let n = unsafe {
        libc::sendto(
            std::os::fd::AsRawFd::as_raw_fd(&sock),
            payload.as_ptr().cast(),
            payload.len(),
            0,
            (&raw const sll).cast(),
            u32::try_from(std::mem::size_of::<libc::sockaddr_ll>()).unwrap_or(u32::MAX),
        )
    };
    if n < 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x42];

    #[test]
    fn garp_is_a_request_for_itself() {
        let p = garp(MAC, Ipv4Addr::new(198, 18, 10, 254));
        assert_eq!(&p[0..8], &[0, 1, 8, 0, 6, 4, 0, 1]);
        assert_eq!(&p[8..14], &MAC);
        assert_eq!(&p[14..18], &[198, 18, 10, 254]);
        assert_eq!(&p[18..24], &[0; 6]);
        assert_eq!(&p[24..28], &[198, 18, 10, 254]);
    }

    #[test]
    fn na_overrides_and_carries_the_mac() {
        let ip: Ipv6Addr = "2001:db8:10::254".parse().unwrap();
        let p = unsolicited_na(MAC, ip);
        assert_eq!((p[0], p[1], p[4]), (136, 0, 0x20), "type, code, override without solicited");
        assert_eq!(&p[8..24], &ip.octets());
        assert_eq!(&p[24..26], &[2, 1]);
        assert_eq!(&p[26..32], &MAC);
    }
}
