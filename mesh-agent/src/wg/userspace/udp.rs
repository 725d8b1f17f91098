//! The engine's UDP transport: gotatun's socket (recvmmsg on receive, with
//! UDP GRO turned off: see [`GsoUdpFactory`]'s bind), plus UDP GSO on send: a run of equal-size datagrams to one
//! peer leaves in one `sendmsg` with `UDP_SEGMENT`, so the underlay stack
//! is walked once per run instead of once per datagram. Buffers are sized
//! with `SO_*BUFFORCE` (we are root), past `net.core.[rw]mem_max`.

use std::{
    io,
    net::SocketAddr,
    os::fd::{AsFd as _, AsRawFd as _},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
};

use gotatun::{
    packet::Packet,
    udp::{
        UdpSend, UdpTransportFactory, UdpTransportFactoryParams,
        socket::{UdpSocket, UdpSocketFactory},
    },
};
use tokio::io::Interest;

use super::scratch::Scratch;

/// `UDP_SEGMENT` (linux/udp.h), missing from libc for glibc targets.
const UDP_SEGMENT: libc::c_int = 103;
/// `UDP_GRO` (linux/udp.h).
const UDP_GRO: libc::c_int = 104;
/// Most datagrams in one GSO send (the kernel's `UDP_MAX_SEGMENTS` is 64).
const MAX_SEGMENTS: usize = 64;
/// Most bytes in one GSO send (an IPv4 datagram's limit, with headers).
const MAX_GSO_BYTES: usize = 65000;
/// Datagrams handed to [`UdpSend::send_many_to`] at once.
const MAX_BATCH: usize = 256;

/// Binds [`GsoUdpSend`] sockets.
#[derive(Clone)]
pub struct GsoUdpFactory {
    /// `SO_RCVBUF(FORCE)`.
    pub recv_buffer: Option<usize>,
    /// `SO_SNDBUF(FORCE)`.
    pub send_buffer: Option<usize>,
    /// Use UDP GSO when the kernel has it.
    pub gso: bool,
    /// The sockets of the last bind, handed out again while the address
    /// and mark stay the same: see [`Self::bind`].
    bound: Option<Bound>,
}

impl GsoUdpFactory {
    /// A factory with these socket options.
    #[must_use]
    pub fn new(recv_buffer: Option<usize>, send_buffer: Option<usize>, gso: bool) -> Self {
        Self { recv_buffer, send_buffer, gso, bound: None }
    }
}

impl std::fmt::Debug for GsoUdpFactory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GsoUdpFactory")
            .field("recv_buffer", &self.recv_buffer)
            .field("send_buffer", &self.send_buffer)
            .field("gso", &self.gso)
            .field("bound_port", &self.bound.as_ref().map(|b| b.key.1))
            .finish()
    }
}

/// Sockets bound for one (address, port, fwmark).
#[derive(Clone)]
struct Bound {
    key: (Option<std::net::IpAddr>, u16, Option<u32>),
    tx: GsoUdpSend,
    rx: UdpSocket,
}

impl UdpTransportFactory for GsoUdpFactory {
    type Send = GsoUdpSend;
    type Recv = UdpSocket;

    /// Binds the WireGuard port, or hands out the sockets already bound to
    /// it. gotatun rebuilds its connection (and asks for a new bind) on
    /// every private key change, after stopping the old connection's tasks;
    /// but the old socket can outlive them for a moment, and the new bind
    /// then fails with EADDRINUSE, leaving the engine without a socket.
    /// Keeping the socket across rebuilds makes a key rotation cost no
    /// re-bind at all, and no datagram queued on the socket is lost.
    async fn bind(&mut self, params: &UdpTransportFactoryParams) -> io::Result<(GsoUdpSend, UdpSocket)> {
        let key = (params.addr, params.port, params.fwmark);
        if let Some(b) = &self.bound
            && params.port != 0
            && b.key == key
        {
            tracing::debug!(port = params.port, "reusing the bound WireGuard UDP socket");
            return Ok((b.tx.clone(), b.rx.clone()));
        }
        // Release the old port before binding another (or the same, after
        // a change of address or mark).
        self.bound = None;
        let mut inner = UdpSocketFactory { recv_buffer_size: self.recv_buffer, send_buffer_size: self.send_buffer };
        let (tx, rx) = inner.bind(params).await?;
        let fd = tx.as_fd().as_raw_fd();
        for (opt, size) in [(libc::SO_RCVBUFFORCE, self.recv_buffer), (libc::SO_SNDBUFFORCE, self.send_buffer)] {
            if let Some(size) = size
                && let Err(e) = setsockopt_int(fd, libc::SOL_SOCKET, opt, size as libc::c_int)
            {
                tracing::debug!(error = %e, opt, "cannot force the UDP buffer size (not root?): the capped size stays");
            }
        }
        // gotatun 0.10.2 turns UDP GRO on for its receive socket, but splits
        // a coalesced datagram over its whole 256 KiB receive buffer instead
        // of the bytes received: every GRO read then yields dozens of stale
        // "packets" (old handshakes, replays), and bulk TCP through the
        // tunnel stalls. GRO happens whenever the underlay interface
        // coalesces UDP (any NIC with GRO; a veth once an XDP program, such
        // as our guard, is attached). With the option off the kernel hands
        // the socket each datagram on its own.
        if let Err(e) = setsockopt_int(rx.as_fd().as_raw_fd(), libc::SOL_UDP, UDP_GRO, 0) {
            tracing::warn!(error = %e, "cannot turn UDP GRO off on the WireGuard socket");
        }
        let gso = self.gso && {
            // Probing the option tells whether the kernel knows it (4.18+).
            match getsockopt_int(fd, libc::SOL_UDP, UDP_SEGMENT) {
                Ok(_) => true,
                Err(e) => {
                    tracing::warn!(error = %e, "UDP GSO unavailable: one datagram per send");
                    false
                }
            }
        };
        let tx = GsoUdpSend { inner: tx, gso: Arc::new(AtomicBool::new(gso)) };
        let port = tx.inner.local_addr()?.port();
        self.bound = Some(Bound { key: (params.addr, port, params.fwmark), tx: tx.clone(), rx: rx.clone() });
        Ok((tx, rx))
    }
}

fn setsockopt_int(fd: libc::c_int, level: libc::c_int, opt: libc::c_int, value: libc::c_int) -> io::Result<()> {
    // SAFETY: passes a pointer to an int we own, with its size.
    let r = unsafe {
        libc::setsockopt(fd, level, opt, (&raw const value).cast(), size_of::<libc::c_int>() as libc::socklen_t)
    };
    if r < 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
}

fn getsockopt_int(fd: libc::c_int, level: libc::c_int, opt: libc::c_int) -> io::Result<libc::c_int> {
    let mut value: libc::c_int = 0;
    let mut len = size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: passes a pointer to an int we own, with its size.
    let r = unsafe { libc::getsockopt(fd, level, opt, (&raw mut value).cast(), &raw mut len) };
    if r < 0 { Err(io::Error::last_os_error()) } else { Ok(value) }
}

/// The sending half, with GSO when available.
#[derive(Clone)]
#[expect(missing_debug_implementations, reason = "gotatun's UdpSocket is not Debug")]
pub struct GsoUdpSend {
    inner: UdpSocket,
    /// Cleared for good if the kernel refuses a GSO send.
    gso: Arc<AtomicBool>,
}

/// Splits a batch into runs that can leave as one GSO send: same
/// destination, same size, except the last of a run which may be shorter;
/// at most [`MAX_SEGMENTS`] datagrams and [`MAX_GSO_BYTES`] bytes.
/// Puts the run lengths, in order, in `runs` (cleared first: it is the
/// sender's reused scratch).
pub fn gso_runs(packets: &[(usize, SocketAddr)], runs: &mut Vec<usize>) {
    runs.clear();
    let mut i = 0;
    while i < packets.len() {
        let (size, dst) = packets[i];
        let mut n = 1;
        let mut bytes = size;
        while i + n < packets.len() && n < MAX_SEGMENTS {
            let (s, d) = packets[i + n];
            if d != dst || s > size || bytes + s > MAX_GSO_BYTES || size == 0 {
                break;
            }
            n += 1;
            bytes += s;
            if s < size {
                break;
            }
        }
        runs.push(n);
        i += n;
    }
}

/// A socket address as the kernel takes it.
fn sockaddr(addr: &SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: sockaddr_storage is plain old data; all zeroes is valid.
    let mut ss: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let len = match addr {
        SocketAddr::V4(a) => {
            // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in.
            let sin = unsafe { &mut *(&raw mut ss).cast::<libc::sockaddr_in>() };
            sin.sin_family = libc::AF_INET as libc::sa_family_t;
            sin.sin_port = a.port().to_be();
            sin.sin_addr = libc::in_addr { s_addr: u32::from_ne_bytes(a.ip().octets()) };
            size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(a) => {
            // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in6.
            let sin6 = unsafe { &mut *(&raw mut ss).cast::<libc::sockaddr_in6>() };
            sin6.sin6_family = libc::AF_INET6 as libc::sa_family_t;
            sin6.sin6_port = a.port().to_be();
            sin6.sin6_addr = libc::in6_addr { s6_addr: a.ip().octets() };
            sin6.sin6_flowinfo = a.flowinfo();
            sin6.sin6_scope_id = a.scope_id();
            size_of::<libc::sockaddr_in6>()
        }
    };
    (ss, len as libc::socklen_t)
}

/// Room for one `cmsghdr` carrying a `u16`, aligned as the kernel wants.
#[repr(C, align(8))]
#[derive(Clone, Copy)]
struct CmsgBuf([u8; 24]);

/// What one `sendmmsg` needs besides the packets, kept between calls.
#[derive(Default)]
struct MsgScratch {
    addrs: Vec<(libc::sockaddr_storage, libc::socklen_t)>,
    cmsgs: Vec<CmsgBuf>,
    iovs: Scratch<libc::iovec>,
    msgs: Scratch<libc::mmsghdr>,
}

/// What [`GsoUdpSend`] reuses from batch to batch (gotatun keeps one per
/// sending task as [`UdpSend::SendManyBuf`]), so that sending a batch
/// allocates nothing once the vectors have grown to the batch size.
#[derive(Default)]
#[expect(missing_debug_implementations, reason = "holds libc and gotatun types without Debug")]
pub struct SendScratch {
    /// Each packet's size and destination.
    shape: Vec<(usize, SocketAddr)>,
    /// Run lengths ([`gso_runs`]).
    runs: Vec<usize>,
    io: MsgScratch,
    /// gotatun's own buffer and a chunk, for one datagram per send.
    plain: <UdpSocket as UdpSend>::SendManyBuf,
    chunk: Vec<(Packet, SocketAddr)>,
}

/// Sends runs `from..` of `packets` (split by `runs`) with one `sendmmsg`,
/// one message per run, `UDP_SEGMENT` on runs of two or more. Returns how
/// many runs the kernel took. Everything the kernel reads is built here in
/// `io`, and `io`'s pointers are dropped before returning, so no raw
/// pointer outlives the call.
fn sendmmsg_runs(
    fd: libc::c_int,
    packets: &[(Packet, SocketAddr)],
    runs: &[usize],
    from: usize,
    io: &mut MsgScratch,
) -> io::Result<usize> {
    let skip: usize = runs[..from].iter().sum();
    let packets = &packets[skip..];
    let runs = &runs[from..];
    let iovs = io.iovs.fill();
    iovs.extend(
        packets.iter().map(|(p, _)| libc::iovec { iov_base: p.as_ptr() as *mut libc::c_void, iov_len: p.len() }),
    );
    io.addrs.clear();
    io.cmsgs.clear();
    io.cmsgs.resize(runs.len(), CmsgBuf([0; 24]));
    // SAFETY: a pure size computation.
    let space = unsafe { libc::CMSG_SPACE(size_of::<u16>() as u32) } as usize;
    debug_assert!(space <= size_of::<CmsgBuf>());
    let mut first = 0;
    for (run, cm) in runs.iter().zip(&mut io.cmsgs) {
        io.addrs.push(sockaddr(&packets[first].1));
        if *run > 1 {
            let seg = packets[first].0.len() as u16;
            // SAFETY: CMSG_* walk a buffer we own, sized for one u16 cmsg.
            unsafe {
                let mut mh: libc::msghdr = std::mem::zeroed();
                mh.msg_control = cm.0.as_mut_ptr().cast();
                mh.msg_controllen = space;
                let c = libc::CMSG_FIRSTHDR(&mh);
                (*c).cmsg_level = libc::SOL_UDP;
                (*c).cmsg_type = UDP_SEGMENT;
                (*c).cmsg_len = libc::CMSG_LEN(size_of::<u16>() as u32) as usize;
                std::ptr::write_unaligned(libc::CMSG_DATA(c).cast::<u16>(), seg);
            }
        }
        first += run;
    }
    // `addrs` and `cmsgs` are complete: the pointers taken below stay valid.
    let msgs = io.msgs.fill();
    let mut first = 0;
    for (i, run) in runs.iter().enumerate() {
        // SAFETY: mmsghdr is plain old data; all zeroes is valid.
        let mut m: libc::mmsghdr = unsafe { std::mem::zeroed() };
        m.msg_hdr.msg_name = (&raw mut io.addrs[i].0).cast();
        m.msg_hdr.msg_namelen = io.addrs[i].1;
        m.msg_hdr.msg_iov = iovs[first..].as_ptr().cast_mut();
        m.msg_hdr.msg_iovlen = *run;
        if *run > 1 {
            m.msg_hdr.msg_control = io.cmsgs[i].0.as_mut_ptr().cast();
            m.msg_hdr.msg_controllen = space;
        }
        msgs.push(m);
        first += run;
    }
    // SAFETY: every pointer in `msgs` points into `iovs`, `addrs`, `cmsgs`
    // or `packets`, all alive and unchanged until we return.
    let n = unsafe { libc::sendmmsg(fd, msgs.as_mut_ptr(), msgs.len() as libc::c_uint, libc::MSG_DONTWAIT) };
    io.iovs.clear();
    io.msgs.clear();
    if n < 0 { Err(io::Error::last_os_error()) } else { Ok(n as usize) }
}

impl GsoUdpSend {
    /// Sends `packets` as GSO runs, with as few `sendmmsg` calls as the
    /// socket buffer allows.
    async fn send_gso(&self, scratch: &mut SendScratch, packets: &[(Packet, SocketAddr)]) -> io::Result<()> {
        scratch.shape.clear();
        scratch.shape.extend(packets.iter().map(|(p, a)| (p.len(), *a)));
        gso_runs(&scratch.shape, &mut scratch.runs);
        let (runs, io) = (&scratch.runs, &mut scratch.io);
        let socket = self.inner.socket();
        let fd = socket.as_raw_fd();
        let mut sent = 0;
        while sent < runs.len() {
            sent += socket.async_io(Interest::WRITABLE, || sendmmsg_runs(fd, packets, runs, sent, io)).await?;
        }
        Ok(())
    }
}

impl UdpSend for GsoUdpSend {
    type SendManyBuf = SendScratch;

    async fn send_to(&self, packet: Packet, destination: SocketAddr) -> io::Result<()> {
        self.inner.send_to(packet, destination).await
    }

    fn max_number_of_packets_to_send(&self) -> usize {
        MAX_BATCH
    }

    async fn send_many_to(&self, buf: &mut SendScratch, packets: &mut Vec<(Packet, SocketAddr)>) -> io::Result<()> {
        if self.gso.load(Ordering::Relaxed) {
            match self.send_gso(buf, packets).await {
                Ok(()) => {
                    packets.clear();
                    return Ok(());
                }
                Err(e) if matches!(e.raw_os_error(), Some(libc::EIO | libc::EINVAL | libc::ENOPROTOOPT)) => {
                    // Some of the batch may be gone already: resending it all
                    // duplicates a few datagrams, which WireGuard's replay
                    // window drops.
                    tracing::warn!(error = %e, "UDP GSO send refused: one datagram per send from now on");
                    self.gso.store(false, Ordering::Relaxed);
                }
                Err(e) => return Err(e),
            }
        }
        // gotatun's own sendmmsg takes at most 100 at a time.
        while !packets.is_empty() {
            // Emptied before and after: a cancelled send may have left some.
            buf.chunk.clear();
            buf.chunk.extend(packets.drain(..packets.len().min(100)));
            let sent = self.inner.send_many_to(&mut buf.plain, &mut buf.chunk).await;
            buf.chunk.clear();
            sent?;
        }
        Ok(())
    }

    fn local_addr(&self) -> io::Result<Option<SocketAddr>> {
        self.inner.local_addr().map(Some)
    }

    fn set_fwmark(&self, mark: u32) -> io::Result<()> {
        self.inner.set_fwmark(mark)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(port: u16) -> SocketAddr {
        SocketAddr::from(([192, 0, 2, 1], port))
    }

    fn gso_runs(packets: &[(usize, SocketAddr)]) -> Vec<usize> {
        // Reused scratch, as the sender does: a stale content must not leak.
        let mut runs = vec![99, 99];
        super::gso_runs(packets, &mut runs);
        runs
    }

    #[test]
    fn runs_break_on_destination_size_and_limits() {
        let p = |n: usize, port: u16| (n, a(port));
        // Equal sizes, then a shorter one ends the run.
        assert_eq!(gso_runs(&[p(100, 1), p(100, 1), p(60, 1), p(100, 1)]), [3, 1]);
        // A larger one starts a new run; another destination too.
        assert_eq!(gso_runs(&[p(100, 1), p(120, 1), p(120, 2)]), [1, 1, 1]);
        // At most 64 datagrams, and at most MAX_GSO_BYTES.
        assert_eq!(gso_runs(&vec![p(10, 1); 130]), [64, 64, 2]);
        let runs = gso_runs(&vec![p(1500, 1); 100]);
        assert!(runs.iter().all(|&n| n * 1500 <= MAX_GSO_BYTES), "{runs:?}");
        assert_eq!(runs.iter().sum::<usize>(), 100);
        assert_eq!(gso_runs(&[]), Vec::<usize>::new());
    }
}
