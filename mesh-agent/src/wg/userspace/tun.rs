//! The engine's TUN device, opened by hand so it can carry offloads:
//! `IFF_VNET_HDR` plus `TUNSETOFFLOAD(CSUM|TSO4|TSO6[|USO4|USO6])` lets the
//! kernel hand over 64 KiB TCP (and UDP GSO) super-packets, one read
//! instead of ~45, and take merged ones back: one write, and one walk of
//! the receiving stack, instead of ~45. Reads of ordinary packets land in
//! the engine's packet buffers directly (no copy), and one `recv` gathers
//! whatever is already queued. The packet surgery lives in [`super::gso`];
//! this file is the syscalls.
//!
//! When the kernel refuses the offloads, the device is opened plain and
//! behaves like gotatun's own TUN device (one packet per read and write);
//! when it refuses a merged UDP write (no USO), datagrams go one by one.

use std::{
    ffi::CString,
    io,
    os::fd::{AsRawFd, FromRawFd as _, OwnedFd, RawFd},
    sync::Arc,
    time::Duration,
};

use gotatun::{
    packet::{Ip, Packet, PacketBufPool},
    tun::{IpRecv, IpSend, MtuWatcher},
};
use tokio::{
    io::unix::AsyncFd,
    sync::{mpsc, watch},
};

use super::gso::{Coalescer, GSO_ECN, GSO_NONE, VNET_HDR_LEN, VnetHdr, segment};
use super::scratch::Scratch;

/// Largest read: a 64 KiB GSO packet, with room to spare.
const READ_BUF: usize = 1 << 17;
/// Packets gathered by one `recv` at most, when more are already queued.
const READ_BATCH: usize = 64;
/// Packets the writer takes off its queue at once (the merge window).
const WRITE_BATCH: usize = 512;
/// How often the MTU is polled (as gotatun's own TUN device does).
const MTU_POLL: Duration = Duration::from_secs(3);
const SIOCGIFMTU: libc::c_ulong = 0x8921;

/// How the device was opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Mode {
    /// vnet headers, checksum and TSO offloads: split on read, merge on write.
    Offload,
    /// One plain packet per read and write.
    Plain,
}

/// Opens (or re-attaches to) the persistent TUN device `name`, with
/// offloads when `offload` is asked for and the kernel takes them, and
/// starts its writer and MTU watcher on the current tokio runtime.
pub(super) fn open(name: &str, offload: bool) -> io::Result<(TunSend, TunRecv, Mode)> {
    let (fd, mode) = if offload {
        match open_fd(name, true).and_then(|fd| set_offload(&fd).map(|()| fd)) {
            Ok(fd) => (fd, Mode::Offload),
            Err(e) => {
                tracing::warn!(ifname = name, error = %e, "TUN offloads refused by the kernel: one packet per read and write");
                (open_fd(name, false)?, Mode::Plain)
            }
        }
    } else {
        (open_fd(name, false)?, Mode::Plain)
    };
    // SAFETY: an OwnedFd keeps its fd open and the same for its lifetime,
    // and the AsyncFd owns it.
    let fd = Arc::new(unsafe { AsyncFd::register(fd) }?);
    let mtu = mtu_watcher(name)?;
    let (tx, rx) = mpsc::channel(WRITE_BATCH * 4);
    tokio::spawn(writer(Arc::clone(&fd), rx, mode));
    let recv = TunRecv { fd, mode, big: vec![0; READ_BUF].into_boxed_slice(), out: Vec::new(), mtu };
    Ok((TunSend { tx }, recv, mode))
}

fn open_fd(name: &str, vnet: bool) -> io::Result<OwnedFd> {
    // SAFETY: a plain open(2) of a constant path; the fd is owned at once.
    let raw = unsafe { libc::open(c"/dev/net/tun".as_ptr(), libc::O_RDWR | libc::O_CLOEXEC | libc::O_NONBLOCK) };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `raw` is a fresh fd nobody else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    let mut req = ifreq(name)?;
    let mut flags = libc::IFF_TUN | libc::IFF_NO_PI;
    if vnet {
        flags |= libc::IFF_VNET_HDR;
    }
    req.ifr_ifru.ifru_flags = flags as libc::c_short;
    // SAFETY: TUNSETIFF reads and writes an ifreq we own.
    if unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETIFF, &mut req) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // Persistent: when the agent exits, the interface with its addresses
    // and routes stays, and traffic routed into it is dropped, not leaked.
    // SAFETY: TUNSETPERSIST takes an integer argument.
    if unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETPERSIST, 1 as libc::c_ulong) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(fd)
}

/// Asks for checksum and TSO offloads, and USO (Linux 6.2+) where the
/// kernel has it.
fn set_offload(fd: &OwnedFd) -> io::Result<()> {
    let base = libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6;
    let set = |features: libc::c_uint| {
        // SAFETY: TUNSETOFFLOAD takes an integer argument.
        if unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETOFFLOAD, libc::c_ulong::from(features)) } < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        }
    };
    set(base | libc::TUN_F_USO4 | libc::TUN_F_USO6).or_else(|e| {
        tracing::info!(error = %e, "no UDP segmentation offload on the TUN (Linux < 6.2?): TCP offloads only");
        set(base)
    })
}

fn ifreq(name: &str) -> io::Result<libc::ifreq> {
    let c = CString::new(name).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in interface name"))?;
    let bytes = c.as_bytes_with_nul();
    // SAFETY: ifreq is plain old data; all zeroes is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    if bytes.len() > req.ifr_name.len() {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "interface name too long"));
    }
    for (d, &s) in req.ifr_name.iter_mut().zip(bytes) {
        *d = s as libc::c_char;
    }
    Ok(req)
}

fn read_mtu(name: &str) -> io::Result<u16> {
    // SAFETY: a plain socket(2); the fd is owned at once.
    let raw = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `raw` is a fresh fd nobody else owns.
    let sock = unsafe { OwnedFd::from_raw_fd(raw) };
    let mut req = ifreq(name)?;
    // SAFETY: SIOCGIFMTU fills the ifreq we own.
    if unsafe { libc::ioctl(sock.as_raw_fd(), SIOCGIFMTU, &mut req) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: SIOCGIFMTU set the mtu member of the union.
    let mtu = unsafe { req.ifr_ifru.ifru_mtu };
    Ok(u16::try_from(mtu).unwrap_or(u16::MAX))
}

/// The MTU as gotatun wants it (it pads to it), polled while anyone looks.
fn mtu_watcher(name: &str) -> io::Result<MtuWatcher> {
    let (tx, rx) = watch::channel(read_mtu(name)?);
    let name = name.to_owned();
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(MTU_POLL).await;
            if tx.is_closed() {
                break;
            }
            if let Ok(mtu) = read_mtu(&name) {
                tx.send_if_modified(|old| std::mem::replace(old, mtu) != mtu);
            }
        }
    });
    Ok(rx.into())
}

/// The sending half: decrypted packets go to the writer task, which merges
/// what arrived together.
#[derive(Clone, Debug)]
pub(super) struct TunSend {
    tx: mpsc::Sender<Packet<Ip>>,
}

impl IpSend for TunSend {
    async fn send(&mut self, packet: Packet<Ip>) -> io::Result<()> {
        self.tx.send(packet).await.map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "TUN writer stopped"))
    }
}

async fn writer(fd: Arc<AsyncFd<OwnedFd>>, mut rx: mpsc::Receiver<Packet<Ip>>, mode: Mode) {
    let mut batch = Vec::with_capacity(WRITE_BATCH);
    let mut bytes: Vec<Packet<[u8]>> = Vec::with_capacity(WRITE_BATCH);
    let mut coalescer = Coalescer::default();
    let zero = [0u8; VNET_HDR_LEN];
    let mut udp_refused = false;
    let mut iov = Scratch::default();
    while rx.recv_many(&mut batch, WRITE_BATCH).await > 0 {
        coalescer.set_merge_udp(!udp_refused);
        bytes.extend(batch.drain(..).map(Packet::into_bytes));
        match mode {
            Mode::Plain => {
                for p in &bytes {
                    let _ = write_logged(&fd, &mut iov, [p.as_ref()]).await;
                }
            }
            Mode::Offload => {
                for g in coalescer.plan(&bytes) {
                    let Some(head) = g.head() else {
                        let _ = write_logged(&fd, &mut iov, [&zero[..], bytes[g.members[0]].as_ref()]).await;
                        continue;
                    };
                    let payloads = g.members.iter().map(|&m| &bytes[m].as_ref()[g.payload_offset()..]);
                    if let Err(e) = write_logged(&fd, &mut iov, [&g.vnet[..], head].into_iter().chain(payloads)).await
                        && e.raw_os_error() == Some(libc::EINVAL)
                    {
                        // The kernel refused the merged packet: deliver the
                        // segments one by one rather than lose them.
                        for &m in &g.members {
                            let _ = write_logged(&fd, &mut iov, [&zero[..], bytes[m].as_ref()]).await;
                        }
                        if g.is_udp() && !udp_refused {
                            tracing::warn!(error = %e, "the kernel refuses merged UDP (USO) on the TUN: writing datagrams one by one");
                            udp_refused = true;
                        }
                    }
                }
            }
        }
        bytes.clear();
    }
}

/// Writes one packet (gathered from `parts`), waiting while the queue is
/// full; errors are logged (a down interface refuses writes for a while).
/// The iovecs are built in `iov`, the writer's reused scratch.
async fn write_logged<'a>(
    fd: &AsyncFd<OwnedFd>,
    iov: &mut Scratch<libc::iovec>,
    parts: impl IntoIterator<Item = &'a [u8]>,
) -> io::Result<()> {
    iov.fill()
        .extend(parts.into_iter().map(|p| libc::iovec { iov_base: p.as_ptr() as *mut libc::c_void, iov_len: p.len() }));
    let result = loop {
        let mut guard = match fd.writable().await {
            Ok(g) => g,
            Err(e) => break Err(e),
        };
        match guard.try_io(|fd| {
            let (iovs, len) = iov.raw();
            // SAFETY: the iovecs point into `parts`, borrowed for this call.
            let n = unsafe { libc::writev(fd.as_raw_fd(), iovs, len as libc::c_int) };
            if n < 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
        }) {
            Ok(Ok(())) => break Ok(()),
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "TUN write failed");
                break Err(e);
            }
            Err(_would_block) => {}
        }
    };
    iov.clear();
    result
}

/// The receiving half: reads, split into the packets to encrypt.
pub(super) struct TunRecv {
    fd: Arc<AsyncFd<OwnedFd>>,
    mode: Mode,
    /// Where a read that does not fit a pool buffer lands (a GSO packet).
    big: Box<[u8]>,
    out: Vec<Packet<Ip>>,
    mtu: MtuWatcher,
}

fn iovec(buf: &mut [u8]) -> libc::iovec {
    libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() }
}

fn readv(fd: RawFd, iov: &[libc::iovec]) -> io::Result<usize> {
    // SAFETY: every iovec points into a buffer the caller owns mutably.
    let n = unsafe { libc::readv(fd, iov.as_ptr(), iov.len() as libc::c_int) };
    if n < 0 { Err(io::Error::last_os_error()) } else { Ok(n as usize) }
}

impl TunRecv {
    /// One nonblocking read into `self.out`: one packet, or the segments of
    /// a GSO packet. A packet that fits a pool buffer is read straight into
    /// it (no copy); only GSO packets go through `big`.
    fn read_one(&mut self, fd: RawFd, pool: &mut PacketBufPool) -> io::Result<()> {
        let mut p = pool.get();
        let buf = p.buf_mut();
        let cap = buf.len();
        let mut vnet = [0u8; VNET_HDR_LEN];
        let len = match self.mode {
            Mode::Plain => readv(fd, &[iovec(&mut buf[..])])?,
            Mode::Offload => {
                let n = readv(fd, &[iovec(&mut vnet), iovec(&mut buf[..]), iovec(&mut self.big[cap..])])?;
                n.saturating_sub(VNET_HDR_LEN)
            }
        };
        let hdr = VnetHdr::decode(&vnet).unwrap_or_default();
        let result = if len <= cap && hdr.gso_type & !GSO_ECN == GSO_NONE {
            // In place: at most a checksum to complete.
            buf.truncate(len);
            let r = segment(&hdr, &mut buf[..], |_, _| {});
            if r.is_ok()
                && let Ok(ip) = p.try_into_ip()
            {
                self.out.push(ip);
            }
            r
        } else {
            self.big[..cap].copy_from_slice(&buf[..cap]);
            drop(p);
            let out = &mut self.out;
            segment(&hdr, &mut self.big[..len], |head, payload| {
                let mut p = pool.get();
                let b = p.buf_mut();
                b.clear();
                b.extend_from_slice(head);
                b.extend_from_slice(payload);
                if let Ok(ip) = p.try_into_ip() {
                    out.push(ip);
                }
            })
        };
        if let Err(e) = result {
            tracing::debug!(error = %e, ?hdr, "dropped a packet from the TUN");
        }
        Ok(())
    }
}

impl IpRecv for TunRecv {
    async fn recv<'a>(
        &'a mut self,
        pool: &mut PacketBufPool,
    ) -> io::Result<impl Iterator<Item = Packet<Ip>> + Send + 'a> {
        self.out.clear();
        let fd = Arc::clone(&self.fd);
        loop {
            let mut guard = fd.readable().await?;
            match guard.try_io(|fd| self.read_one(fd.as_raw_fd(), pool)) {
                Ok(result) => break result?,
                Err(_would_block) => {}
            }
        }
        // Whatever else is already queued, without waiting: fewer trips
        // through the engine's queues per packet.
        while self.out.len() < READ_BATCH {
            if self.read_one(fd.as_raw_fd(), pool).is_err() {
                // Nothing more (EAGAIN), or an error the next call reports.
                break;
            }
        }
        Ok(self.out.drain(..))
    }

    fn mtu(&self) -> MtuWatcher {
        self.mtu.clone()
    }
}
