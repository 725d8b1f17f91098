//! Side-channel messages on the WireGuard port, whichever engine owns it:
//! a raw IPv4 UDP socket sends them with the WireGuard port as source port
//! (so they share the tunnel's NAT mapping), and receives copies of the
//! UDP packets to that port that carry the side-channel magic (a classic
//! BPF filter in the kernel: the tunnel's own traffic is never copied up).
//!
//! The kernel's WireGuard owns the port's UDP socket and the userspace
//! engine binds it too; a raw socket works beside both, which is why this
//! is not done inside the userspace engine. IPv4 only for now.

use std::{
    io,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
};

use tokio::io::unix::AsyncFd;

/// A raw UDP socket for the side channel of WireGuard port `port`.
#[derive(Debug)]
pub struct SideSocket {
    fd: AsyncFd<OwnedFd>,
    port: u16,
}

/// The classic BPF program: accept UDP to `port` whose payload bytes 4..8
/// are the side-channel magic; drop everything else.
fn filter(port: u16) -> [libc::sock_filter; 7] {
    let magic = u32::from_be_bytes(mesh_relay::wire::MAGIC);
    let op = |code: u32, jt: u8, jf: u8, k: u32| libc::sock_filter { code: code as u16, jt, jf, k };
    [
        // X = IPv4 header length.
        op(libc::BPF_LDX | libc::BPF_B | libc::BPF_MSH, 0, 0, 0),
        // A = UDP destination port.
        op(libc::BPF_LD | libc::BPF_H | libc::BPF_IND, 0, 0, 2),
        op(libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K, 0, 3, u32::from(port)),
        // A = payload bytes 4..8 (UDP header is 8 bytes).
        op(libc::BPF_LD | libc::BPF_W | libc::BPF_IND, 0, 0, 12),
        op(libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K, 0, 1, magic),
        op(libc::BPF_RET | libc::BPF_K, 0, 0, 0xffff),
        op(libc::BPF_RET | libc::BPF_K, 0, 0, 0),
    ]
}

impl SideSocket {
    /// Opens the socket for WireGuard port `port` (needs CAP_NET_RAW), in
    /// the calling thread's network namespace.
    pub fn open(port: u16) -> io::Result<Self> {
        // SAFETY: plain socket(2); the descriptor is owned right after.
        let raw = unsafe {
            libc::socket(libc::AF_INET, libc::SOCK_RAW | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC, libc::IPPROTO_UDP)
        };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `raw` is a fresh descriptor nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let mut prog = filter(port);
        let fprog = libc::sock_fprog { len: prog.len() as u16, filter: prog.as_mut_ptr() };
        // SAFETY: `fprog` points at `prog`, alive for the call; the kernel copies it.
        let rc = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_ATTACH_FILTER,
                (&raw const fprog).cast(),
                std::mem::size_of::<libc::sock_fprog>() as libc::socklen_t,
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: the OwnedFd keeps its descriptor open and unchanged for
        // its lifetime, and the AsyncFd owns it.
        Ok(Self { fd: unsafe { AsyncFd::register(fd) }?, port })
    }

    /// Sends `payload` from the WireGuard port to `to` (IPv4; an IPv6
    /// destination is refused).
    pub async fn send(&self, to: SocketAddr, payload: &[u8]) -> io::Result<()> {
        let SocketAddr::V4(to) = to else {
            return Err(io::Error::new(io::ErrorKind::Unsupported, "side channel over IPv6"));
        };
        let packet = udp(self.port, to.port(), payload);
        let addr = libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: 0,
            sin_addr: libc::in_addr { s_addr: u32::from(*to.ip()).to_be() },
            sin_zero: [0; 8],
        };
        loop {
            let mut guard = self.fd.writable().await?;
            // SAFETY: buffer and address are valid for the call.
            let r = guard.try_io(|fd| {
                let n = unsafe {
                    libc::sendto(
                        fd.as_raw_fd(),
                        packet.as_ptr().cast(),
                        packet.len(),
                        0,
                        (&raw const addr).cast(),
                        std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
                    )
                };
                if n < 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
            });
            match r {
                Ok(r) => return r,
                Err(_would_block) => {}
            }
        }
    }

    /// The next side-channel message: its source and UDP payload.
    pub async fn recv(&self, buf: &mut [u8]) -> io::Result<(SocketAddr, std::ops::Range<usize>)> {
        loop {
            let mut guard = self.fd.readable().await?;
            // SAFETY: `buf` is valid for writes of its length.
            let r = guard.try_io(|fd| {
                let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
                if n < 0 { Err(io::Error::last_os_error()) } else { Ok(n as usize) }
            });
            let n = match r {
                Ok(r) => r?,
                Err(_would_block) => continue,
            };
            if let Some(got) = parse_ipv4_udp(&buf[..n]) {
                return Ok(got);
            }
        }
    }
}

/// A UDP header (checksum 0: none, which IPv4 allows) and `payload`.
fn udp(src: u16, dst: u16, payload: &[u8]) -> Vec<u8> {
    let len = u16::try_from(8 + payload.len()).unwrap_or(u16::MAX);
    let mut p = Vec::with_capacity(8 + payload.len());
    p.extend_from_slice(&src.to_be_bytes());
    p.extend_from_slice(&dst.to_be_bytes());
    p.extend_from_slice(&len.to_be_bytes());
    p.extend_from_slice(&[0, 0]);
    p.extend_from_slice(payload);
    p
}

/// The source and the payload's range of an IPv4 UDP packet.
fn parse_ipv4_udp(p: &[u8]) -> Option<(SocketAddr, std::ops::Range<usize>)> {
    let ihl = usize::from(*p.first()? & 0x0f) * 4;
    if p[0] >> 4 != 4 || ihl < 20 || p.len() < ihl + 8 {
        return None;
    }
    let src = Ipv4Addr::new(p[12], p[13], p[14], p[15]);
    let sport = u16::from_be_bytes([p[ihl], p[ihl + 1]]);
    let ulen = usize::from(u16::from_be_bytes([p[ihl + 4], p[ihl + 5]]));
    let end = (ihl + ulen).min(p.len());
    (ulen >= 8).then(|| (SocketAddr::V4(SocketAddrV4::new(src, sport)), ihl + 8..end))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_what_it_would_receive() {
        let mut ip = vec![0x45, 0, 0, 0, 0, 0, 0, 0, 64, 17, 0, 0, 192, 0, 2, 7, 192, 0, 2, 1];
        ip.extend(udp(40000, 51820, b"hello"));
        let (src, range) = parse_ipv4_udp(&ip).unwrap();
        assert_eq!(src, "192.0.2.7:40000".parse().unwrap());
        assert_eq!(&ip[range], b"hello");
        assert!(parse_ipv4_udp(&ip[..24]).is_none());
        assert!(parse_ipv4_udp(&[0x65; 40]).is_none());
    }
}
