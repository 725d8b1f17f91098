//! Two-way traffic for failover measurements: what a real application on
//! a site sees when a gateway switches. One-way flows hide a broken return
//! path; these do not.
//!
//! - [`TwoWayTcp`]: one long-lived TCP connection carrying a checked byte
//!   stream in both directions. Each side sends a deterministic
//!   pseudo-random stream in small chunks every few milliseconds and
//!   verifies every byte it receives as it arrives; at the end both streams
//!   are compared by SHA-256 as well. The longest gap between arrivals, per
//!   direction, is the cut an application saw. A reset, an error or a
//!   single wrong byte is a failure.
//! - [`Pinger`]: an ICMP/ICMPv6 echo series (raw socket), the longest gap
//!   between replies and the loss.

use std::{
    io::{ErrorKind, Read as _, Write as _},
    net::{IpAddr, Shutdown, SocketAddr, TcpListener, TcpStream},
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use sha2::{Digest as _, Sha256};
use socket2::{Domain, Protocol, Socket, Type};

use crate::{Host, LabError, Result};

const CHUNK: usize = 1000;
const CHUNK_GAP: Duration = Duration::from_millis(5);

fn sys(what: &str) -> impl FnOnce(std::io::Error) -> LabError + '_ {
    move |source| LabError::Sys { what: what.to_owned(), source }
}

/// The deterministic byte stream of one direction (xorshift64*).
#[derive(Debug, Clone)]
struct Stream(u64);

impl Stream {
    fn fill(&mut self, buf: &mut [u8]) {
        for b in buf {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            *b = (self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 56) as u8;
        }
    }
}

/// One direction's receiving end: arrivals, bytes, the digest, the first
/// problem.
#[derive(Debug, Default)]
struct Received {
    arrivals: Vec<Instant>,
    bytes: u64,
    sha: Option<[u8; 32]>,
    error: Option<String>,
}

/// What a writer sent: bytes and their SHA-256 (`None` if the stream broke).
type Sent = Option<(u64, [u8; 32])>;

/// One side of the connection: a writer thread and a reader thread.
#[derive(Debug)]
struct Side {
    writer: Option<JoinHandle<Sent>>,
    reader: Option<JoinHandle<()>>,
    received: Arc<Mutex<Received>>,
}

fn side(stream: TcpStream, send_seed: u64, recv_seed: u64, stop: Arc<AtomicBool>) -> Result<Side> {
    stream.set_nodelay(true).map_err(sys("TCP_NODELAY"))?;
    let mut w = stream.try_clone().map_err(sys("cloning a TCP stream"))?;
    let mut r = stream;
    let received = Arc::new(Mutex::new(Received::default()));
    let rec = received.clone();
    let writer = std::thread::spawn(move || {
        let mut stream = Stream(send_seed);
        let mut sha = Sha256::new();
        let mut sent = 0u64;
        let mut buf = [0u8; CHUNK];
        while !stop.load(Ordering::Relaxed) {
            stream.fill(&mut buf);
            if w.write_all(&buf).is_err() {
                return None;
            }
            sha.update(buf);
            sent += CHUNK as u64;
            std::thread::sleep(CHUNK_GAP);
        }
        // The peer's reader sees the end of the stream and finishes.
        let _ = w.shutdown(Shutdown::Write);
        Some((sent, sha.finalize().into()))
    });
    let reader = std::thread::spawn(move || {
        let mut stream = Stream(recv_seed);
        let mut sha = Sha256::new();
        let mut buf = [0u8; 16 * 1024];
        let mut want = [0u8; 16 * 1024];
        let fail = |e: String| rec.lock().unwrap_or_else(PoisonError::into_inner).error.get_or_insert(e).clone();
        loop {
            match r.read(&mut buf) {
                Ok(0) => {
                    rec.lock().unwrap_or_else(PoisonError::into_inner).sha = Some(sha.finalize().into());
                    return;
                }
                Ok(n) => {
                    stream.fill(&mut want[..n]);
                    let mut g = rec.lock().unwrap_or_else(PoisonError::into_inner);
                    if buf[..n] != want[..n] {
                        let checked = g.bytes;
                        drop(g);
                        fail(format!("wrong bytes in the stream after {} good ones", checked));
                        return;
                    }
                    sha.update(&buf[..n]);
                    g.bytes += n as u64;
                    g.arrivals.push(Instant::now());
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => {
                    fail(format!("the connection failed: {e}"));
                    return;
                }
            }
        }
    });
    Ok(Side { writer: Some(writer), reader: Some(reader), received })
}

fn longest_gap(arrivals: &[Instant], since: Instant, until: Instant) -> Duration {
    let mut prev = since;
    let mut worst = Duration::ZERO;
    for t in arrivals.iter().filter(|t| **t >= since && **t <= until) {
        worst = worst.max(t.duration_since(prev));
        prev = *t;
    }
    worst.max(until.saturating_duration_since(prev))
}

/// A long-lived TCP connection with a checked stream both ways.
#[derive(Debug)]
pub struct TwoWayTcp {
    stop: Arc<AtomicBool>,
    client: Side,
    server: Side,
}

/// What [`TwoWayTcp::finish`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TcpOutcome {
    /// Bytes client -> server, and server -> client, as received and checked.
    pub bytes: (u64, u64),
}

impl TwoWayTcp {
    /// Connects from `client` to a listener it starts on `server` at `addr`.
    pub fn start(client: &Host, server: &Host, addr: SocketAddr) -> Result<Self> {
        let listener = server.run(move || TcpListener::bind(addr))?.map_err(sys("binding the two-way server"))?;
        let accept = std::thread::spawn(move || listener.accept().map(|(s, _)| s));
        let conn = client
            .run(move || TcpStream::connect_timeout(&addr, Duration::from_secs(5)))?
            .map_err(sys("connecting the two-way stream"))?;
        let accepted = accept
            .join()
            .map_err(|_| LabError::Sys { what: "accept thread".into(), source: std::io::Error::other("panicked") })?
            .map_err(sys("accepting the two-way stream"))?;
        let stop = Arc::new(AtomicBool::new(false));
        let (c2s, s2c) = (0x9E37_79B9_7F4A_7C15, 0xD1B5_4A32_D192_ED03);
        Ok(Self { client: side(conn, c2s, s2c, stop.clone())?, server: side(accepted, s2c, c2s, stop.clone())?, stop })
    }

    /// Bytes checked so far (client -> server, server -> client).
    #[must_use]
    pub fn bytes(&self) -> (u64, u64) {
        let b = |s: &Side| s.received.lock().unwrap_or_else(PoisonError::into_inner).bytes;
        (b(&self.server), b(&self.client))
    }

    /// The first problem either side saw, if any.
    #[must_use]
    pub fn error(&self) -> Option<String> {
        let e = |s: &Side, dir: &str| {
            s.received.lock().unwrap_or_else(PoisonError::into_inner).error.clone().map(|e| format!("{dir}: {e}"))
        };
        e(&self.server, "client -> server").or_else(|| e(&self.client, "server -> client"))
    }

    /// The longest gap between arrivals from `since` until now, per
    /// direction (client -> server, server -> client).
    #[must_use]
    pub fn longest_gaps(&self, since: Instant) -> (Duration, Duration) {
        let now = Instant::now();
        let g = |s: &Side| longest_gap(&s.received.lock().unwrap_or_else(PoisonError::into_inner).arrivals, since, now);
        (g(&self.server), g(&self.client))
    }

    /// Stops sending, waits for both streams to end and compares their
    /// SHA-256 end to end. Fails on any error, short stream or mismatch.
    pub fn finish(mut self) -> std::result::Result<TcpOutcome, String> {
        self.stop.store(true, Ordering::Relaxed);
        let sent = |s: &mut Side| s.writer.take().and_then(|w| w.join().ok().flatten());
        let (c_sent, s_sent) = (sent(&mut self.client), sent(&mut self.server));
        for s in [&mut self.client, &mut self.server] {
            if let Some(r) = s.reader.take() {
                let _ = r.join();
            }
        }
        if let Some(e) = self.error() {
            return Err(e);
        }
        let got = |s: &Side| {
            let g = s.received.lock().unwrap_or_else(PoisonError::into_inner);
            g.sha.map(|sha| (g.bytes, sha))
        };
        for (dir, sent, got) in
            [("client -> server", c_sent, got(&self.server)), ("server -> client", s_sent, got(&self.client))]
        {
            match (sent, got) {
                (Some(a), Some(b)) if a == b => {}
                (a, b) => {
                    return Err(format!(
                        "{dir}: sent {} bytes, received {} (or their SHA-256 differ)",
                        a.map_or(0, |a| a.0),
                        b.map_or(0, |b| b.0)
                    ));
                }
            }
        }
        Ok(TcpOutcome { bytes: self.bytes() })
    }
}

impl Drop for TwoWayTcp {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn checksum(b: &[u8]) -> u16 {
    let mut sum: u32 = b.chunks(2).map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]))).sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An echo series from a lab host: a request every `interval`.
#[derive(Debug)]
pub struct Pinger {
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicU64>,
    replies: Arc<Mutex<Vec<Instant>>>,
}

impl Pinger {
    /// Starts pinging `to` from `from`.
    pub fn start(from: &Host, to: IpAddr, interval: Duration) -> Result<Self> {
        let v6 = to.is_ipv6();
        let sock = from
            .run(move || {
                let s = if v6 {
                    Socket::new(Domain::IPV6, Type::RAW, Some(Protocol::ICMPV6))?
                } else {
                    Socket::new(Domain::IPV4, Type::RAW, Some(Protocol::ICMPV4))?
                };
                s.set_read_timeout(Some(Duration::from_millis(100)))?;
                Ok::<_, std::io::Error>(s)
            })?
            .map_err(sys("opening an ICMP socket"))?;
        let rx = sock.try_clone().map_err(sys("cloning the ICMP socket"))?;
        let id: u16 = (std::process::id() as u16) ^ (Instant::now().elapsed().subsec_nanos() as u16) ^ 0x5a5a;
        let (stop, sent) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicU64::new(0)));
        let replies: Arc<Mutex<Vec<Instant>>> = Arc::default();
        let (s, n) = (stop.clone(), sent.clone());
        let dest: SocketAddr = SocketAddr::new(to, 0);
        std::thread::spawn(move || {
            let mut seq: u16 = 0;
            while !s.load(Ordering::Relaxed) {
                let mut p = [0u8; 16];
                p[0] = if v6 { 128 } else { 8 };
                p[4..6].copy_from_slice(&id.to_be_bytes());
                p[6..8].copy_from_slice(&seq.to_be_bytes());
                if !v6 {
                    // ICMPv6 checksums are the kernel's; ICMPv4 ones are ours.
                    let c = checksum(&p);
                    p[2..4].copy_from_slice(&c.to_be_bytes());
                }
                let _ = sock.send_to(&p, &dest.into());
                n.fetch_add(1, Ordering::Relaxed);
                seq = seq.wrapping_add(1);
                std::thread::sleep(interval);
            }
        });
        let (s, r) = (stop.clone(), Arc::clone(&replies));
        std::thread::spawn(move || {
            let mut buf = [std::mem::MaybeUninit::<u8>::uninit(); 2048];
            while !s.load(Ordering::Relaxed) {
                let Ok((len, src)) = rx.recv_from(&mut buf) else { continue };
                // SAFETY: recv_from initialised the first `len` bytes.
                let b: Vec<u8> = buf[..len].iter().map(|x| unsafe { x.assume_init() }).collect();
                // Raw IPv4 sockets deliver the IP header too.
                let icmp =
                    if v6 { &b[..] } else { b.get(usize::from(b.first().map_or(0, |v| v & 0xf)) * 4..).unwrap_or(&[]) };
                let from_target = src.as_socket().is_some_and(|a| a.ip() == to);
                let reply = if v6 { 129 } else { 0 };
                if from_target && icmp.len() >= 8 && icmp[0] == reply && icmp[4..6] == id.to_be_bytes() {
                    r.lock().unwrap_or_else(PoisonError::into_inner).push(Instant::now());
                }
            }
        });
        Ok(Self { stop, sent, replies })
    }

    /// Replies so far.
    #[must_use]
    pub fn replies(&self) -> usize {
        self.replies.lock().unwrap_or_else(PoisonError::into_inner).len()
    }

    /// Requests sent so far.
    #[must_use]
    pub fn sent(&self) -> u64 {
        self.sent.load(Ordering::Relaxed)
    }

    /// The longest gap between replies from `since` until now.
    #[must_use]
    pub fn longest_gap(&self, since: Instant) -> Duration {
        longest_gap(&self.replies.lock().unwrap_or_else(PoisonError::into_inner), since, Instant::now())
    }
}

impl Drop for Pinger {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// What one failover event cost a [`Conversation`]: the longest gap of
/// each of its measures.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cuts(pub Vec<(String, Duration)>);

impl Cuts {
    /// The longest of all.
    #[must_use]
    pub fn worst(&self) -> Duration {
        self.0.iter().map(|(_, d)| *d).max().unwrap_or_default()
    }

    /// The longest gap of the measures whose name contains `pat`.
    #[must_use]
    pub fn worst_of(&self, pat: &str) -> Duration {
        self.0.iter().filter(|(n, _)| n.contains(pat)).map(|(_, d)| *d).max().unwrap_or_default()
    }
}

impl std::fmt::Display for Cuts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let parts: Vec<String> = self.0.iter().map(|(n, d)| format!("{n} {} ms", d.as_millis())).collect();
        f.write_str(&parts.join(", "))
    }
}

/// What a site's application sees: for each server address, a
/// [`TwoWayTcp`] to it and a [`Pinger`] of its IP (so IPv4 and IPv6 are
/// measured side by side when both addresses are given).
#[derive(Debug)]
pub struct Conversation {
    tcp: Vec<(String, TwoWayTcp)>,
    pings: Vec<(String, Pinger)>,
}

impl Conversation {
    /// Starts the streams and ping series from `client` to `server`.
    pub fn start(client: &Host, server: &Host, addrs: &[SocketAddr], ping_every: Duration) -> Result<Self> {
        let family = |a: &SocketAddr| if a.is_ipv4() { "v4" } else { "v6" };
        let mut tcp = Vec::new();
        let mut pings = Vec::new();
        for a in addrs {
            tcp.push((format!("tcp {}", family(a)), TwoWayTcp::start(client, server, *a)?));
            pings.push((format!("ping {}", family(a)), Pinger::start(client, a.ip(), ping_every)?));
        }
        Ok(Self { tcp, pings })
    }

    /// Whether every measure has had an arrival after `t` (traffic flows
    /// both ways on every path since then).
    #[must_use]
    pub fn flowing_since(&self, t: Instant) -> bool {
        let after = |v: &[Instant]| v.last().is_some_and(|l| *l > t);
        self.tcp.iter().all(|(_, c)| {
            [&c.server, &c.client]
                .iter()
                .all(|s| after(&s.received.lock().unwrap_or_else(PoisonError::into_inner).arrivals))
        }) && self.pings.iter().all(|(_, p)| after(&p.replies.lock().unwrap_or_else(PoisonError::into_inner)))
    }

    /// The first error of any stream.
    #[must_use]
    pub fn error(&self) -> Option<String> {
        self.tcp.iter().find_map(|(n, c)| c.error().map(|e| format!("{n}: {e}")))
    }

    /// The longest gap of each measure since `since` (until now).
    #[must_use]
    pub fn cuts(&self, since: Instant) -> Cuts {
        let mut v = Vec::new();
        for (n, c) in &self.tcp {
            let (up, down) = c.longest_gaps(since);
            v.push((format!("{n} client->server"), up));
            v.push((format!("{n} server->client"), down));
        }
        for (n, p) in &self.pings {
            v.push((n.clone(), p.longest_gap(since)));
        }
        Cuts(v)
    }

    /// Loss of each ping series so far (share of requests unanswered).
    #[must_use]
    pub fn ping_loss(&self) -> Vec<(String, f64)> {
        self.pings
            .iter()
            .map(|(n, p)| {
                #[expect(clippy::cast_precision_loss, reason = "counts far below 2^52")]
                let loss = 1.0 - p.replies() as f64 / (p.sent().max(1) as f64);
                (n.clone(), loss.max(0.0))
            })
            .collect()
    }

    /// Ends every stream and checks it end to end (see [`TwoWayTcp::finish`]).
    pub fn finish(self) -> std::result::Result<Vec<(String, TcpOutcome)>, String> {
        self.tcp.into_iter().map(|(n, c)| c.finish().map(|o| (n.clone(), o)).map_err(|e| format!("{n}: {e}"))).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streams_are_deterministic_and_distinct() {
        let (mut a, mut b, mut c) = (Stream(1), Stream(1), Stream(2));
        let (mut x, mut y, mut z) = ([0u8; 64], [0u8; 64], [0u8; 64]);
        a.fill(&mut x);
        b.fill(&mut y[..10]);
        b.fill(&mut y[10..]);
        c.fill(&mut z);
        assert_eq!(x, y, "chunking does not change the stream");
        assert_ne!(x, z);
    }

    #[test]
    fn gaps_count_the_open_end() {
        let t0 = Instant::now();
        let a = [t0 + Duration::from_millis(10), t0 + Duration::from_millis(20), t0 + Duration::from_millis(520)];
        assert_eq!(longest_gap(&a, t0, t0 + Duration::from_millis(600)), Duration::from_millis(500));
        assert_eq!(longest_gap(&a, t0, t0 + Duration::from_millis(2000)), Duration::from_millis(1480));
    }

    #[test]
    fn icmp_checksum() {
        // An echo request with id 0x1234, seq 1: checksum over the header.
        let mut p = [8u8, 0, 0, 0, 0x12, 0x34, 0, 1];
        let c = checksum(&p);
        p[2..4].copy_from_slice(&c.to_be_bytes());
        assert_eq!(checksum(&p), 0);
    }
}
