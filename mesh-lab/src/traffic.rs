//! Traffic between lab hosts for tests, the demo and benchmarks: a
//! continuous one-way UDP flow that measures outages, TCP echo servers, a
//! one-shot TCP echo exchange, and a path's quality (a checked two-way TCP
//! stream through an echo server with a ping series beside it). Sockets are made inside the hosts'
//! namespaces and served from plain threads.

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream, UdpSocket},
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use crate::{Host, LabError, Result};

fn sys(what: &str) -> impl FnOnce(std::io::Error) -> LabError + '_ {
    move |source| LabError::Sys { what: what.to_owned(), source }
}

/// A continuous one-way UDP flow (a datagram every 2 ms); the receiver
/// keeps arrival times, so an outage is the longest gap between two. It is
/// one-way on purpose: it needs no return path, and measures the direction
/// whose path is being broken.
#[derive(Debug)]
pub struct UdpFlow {
    stop: Arc<AtomicBool>,
    arrivals: Arc<Mutex<Vec<Instant>>>,
}

impl UdpFlow {
    /// Starts a flow from `from` to `to`, received on `to_host`.
    pub fn start(from: &Host, to_host: &Host, to: SocketAddr) -> Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let arrivals = Arc::new(Mutex::new(Vec::new()));
        let rx = to_host.run(move || UdpSocket::bind(to))?.map_err(sys("binding the flow receiver"))?;
        rx.set_read_timeout(Some(Duration::from_millis(100))).map_err(sys("setting a read timeout"))?;
        let tx = from.run(|| UdpSocket::bind("0.0.0.0:0"))?.map_err(sys("binding the flow sender"))?;
        let (s, a) = (stop.clone(), arrivals.clone());
        std::thread::spawn(move || {
            let mut buf = [0u8; 64];
            while !s.load(Ordering::Relaxed) {
                if rx.recv(&mut buf).is_ok() {
                    a.lock().unwrap_or_else(PoisonError::into_inner).push(Instant::now());
                }
            }
        });
        let s = stop.clone();
        std::thread::spawn(move || {
            let mut seq = 0u64;
            while !s.load(Ordering::Relaxed) {
                let _ = tx.send_to(&seq.to_be_bytes(), to);
                seq += 1;
                std::thread::sleep(Duration::from_millis(2));
            }
        });
        Ok(Self { stop, arrivals })
    }

    /// Datagrams received so far.
    #[must_use]
    pub fn received(&self) -> usize {
        self.arrivals.lock().unwrap_or_else(PoisonError::into_inner).len()
    }

    /// The first arrival at or after `since`.
    #[must_use]
    pub fn first_since(&self, since: Instant) -> Option<Instant> {
        self.arrivals.lock().unwrap_or_else(PoisonError::into_inner).iter().copied().find(|t| *t >= since)
    }

    /// The longest gap between two arrivals after `since` (counting from
    /// `since` itself).
    #[must_use]
    pub fn longest_gap_since(&self, since: Instant) -> Duration {
        let a = self.arrivals.lock().unwrap_or_else(PoisonError::into_inner);
        let mut prev = since;
        let mut worst = Duration::ZERO;
        for t in a.iter().filter(|t| **t >= since) {
            worst = worst.max(t.duration_since(prev));
            prev = *t;
        }
        worst
    }
}

impl Drop for UdpFlow {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// TCP echo servers on `host` at each address (threads that live as long
/// as the process).
pub fn echo_servers(host: &Host, addrs: &[SocketAddr]) -> Result<()> {
    for &addr in addrs {
        let listener = host.run(move || TcpListener::bind(addr))?.map_err(sys("binding an echo server"))?;
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut s) = conn else { continue };
                std::thread::spawn(move || {
                    // Large enough that a two-way stream through it is
                    // limited by the path, not by the echo loop.
                    let mut buf = vec![0u8; 64 * 1024];
                    while let Ok(n) = s.read(&mut buf) {
                        if n == 0 || s.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                });
            }
        });
    }
    Ok(())
}

/// A TCP exchange from `from`: connect (1 s), send, read the echo back (2 s).
#[must_use]
pub fn tcp_echo(from: &Host, to: SocketAddr) -> bool {
    from.run(move || {
        let Ok(mut s) = TcpStream::connect_timeout(&to, Duration::from_secs(1)) else { return false };
        let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
        if s.write_all(b"mesh").is_err() {
            return false;
        }
        let mut buf = [0u8; 4];
        s.read_exact(&mut buf).is_ok() && &buf == b"mesh"
    })
    .unwrap_or(false)
}

/// What [`path_quality`] measured.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PathQuality {
    /// Rate of the checked two-way TCP stream, Mbit/s in each direction
    /// (every byte sent comes back through the echo server).
    pub tcp_mbps: f64,
    /// Fraction of the ping series lost (0..=1).
    pub ping_loss: f64,
    /// Pings sent.
    pub pings: u32,
}

/// The share of its unflooded TCP rate that a path through a guarded
/// gateway must keep under a flood, in the lab (the median over paired
/// rounds, [`Paired::rate_ratio`]). On a 2-core lab machine, where the
/// debug build's userspace tunnel is CPU-bound, the guard's dropping of
/// ~250 kpps costs it about 10% (median; single rounds range 80-110%).
/// Without the guard the same flood leaves about a third of the rate
/// (`cargo xtask bench guard`), so the bound still tells the two apart.
pub const FLOOD_RATE_BOUND: f64 = 0.7;

/// A path measured without and with a disturbance (a flood, say) in
/// alternating rounds, so that the machine's own noise (other jobs, CPU
/// frequency) falls on both alike; compared by medians over the rounds.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Paired {
    /// Without the disturbance, one per round.
    pub calm: Vec<PathQuality>,
    /// With it, one per round.
    pub stormy: Vec<PathQuality>,
}

impl Paired {
    /// Runs `rounds` rounds of `calm` then `stormy`.
    pub fn measure<E>(
        rounds: usize,
        mut calm: impl FnMut() -> std::result::Result<PathQuality, E>,
        mut stormy: impl FnMut() -> std::result::Result<PathQuality, E>,
    ) -> std::result::Result<Self, E> {
        let mut out = Self::default();
        for _ in 0..rounds {
            out.calm.push(calm()?);
            out.stormy.push(stormy()?);
        }
        Ok(out)
    }

    /// The median over the rounds of the disturbed TCP rate as a share of
    /// the same round's undisturbed one (0 if a calm round moved nothing).
    #[must_use]
    pub fn rate_ratio(&self) -> f64 {
        let ratios: Vec<f64> = self
            .calm
            .iter()
            .zip(&self.stormy)
            .map(|(c, s)| if c.tcp_mbps > 0.0 { s.tcp_mbps / c.tcp_mbps } else { 0.0 })
            .collect();
        median(&ratios)
    }

    /// The median undisturbed and disturbed TCP rates, Mbit/s.
    #[must_use]
    pub fn rates(&self) -> (f64, f64) {
        let rate = |v: &[PathQuality]| median(&v.iter().map(|q| q.tcp_mbps).collect::<Vec<_>>());
        (rate(&self.calm), rate(&self.stormy))
    }

    /// The share of all pings lost without and with the disturbance.
    #[must_use]
    pub fn ping_losses(&self) -> (f64, f64) {
        let loss = |v: &[PathQuality]| {
            let sent: f64 = v.iter().map(|q| f64::from(q.pings)).sum();
            let lost: f64 = v.iter().map(|q| q.ping_loss * f64::from(q.pings)).sum();
            if sent > 0.0 { lost / sent } else { 1.0 }
        };
        (loss(&self.calm), loss(&self.stormy))
    }
}

/// The median (the mean of the middle two for an even count; 0 if empty).
#[must_use]
pub fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// Measures the path from `from` for `secs` seconds: a TCP stream to the
/// echo server at `echo` (see [`echo_servers`]) whose bytes, a known
/// pattern, are checked as they come back, and meanwhile a ping series to
/// `ping_to` (one every 20 ms). A corrupted stream is an error.
pub fn path_quality(from: &Host, echo: SocketAddr, ping_to: &str, secs: f64) -> Result<PathQuality> {
    let pings = (secs / 0.02) as u32;
    let count = pings.to_string();
    let ping = from.spawn("ping", ["-n", "-q", "-c", count.as_str(), "-i", "0.02", "-W", "1", ping_to])?;
    let stream = from.run(move || duplex_echo(echo, Duration::from_secs_f64(secs)))?;
    let out = ping.wait_with_output().map_err(sys("waiting for ping"))?;
    let bytes = stream.map_err(sys("the two-way TCP stream"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    // "20 packets transmitted, 19 received, 5% packet loss, time ..."
    let received: u32 = text
        .lines()
        .find(|l| l.contains("packets transmitted"))
        .and_then(|l| l.split(", ").nth(1)?.split_whitespace().next()?.parse().ok())
        .unwrap_or(0);
    Ok(PathQuality {
        tcp_mbps: bytes as f64 * 8.0 / secs / 1e6,
        ping_loss: 1.0 - f64::from(received.min(pings)) / f64::from(pings.max(1)),
        pings,
    })
}

/// The byte at offset `i` of the stream.
fn pattern(i: u64) -> u8 {
    (i % 251) as u8
}

/// Streams the pattern to the echo server at `to` for `time` from one
/// thread and checks what comes back on this one; the bytes that came
/// back within `time`.
fn duplex_echo(to: SocketAddr, time: Duration) -> std::io::Result<u64> {
    let mut rx = TcpStream::connect_timeout(&to, Duration::from_secs(2))?;
    let mut tx = rx.try_clone()?;
    let deadline = Instant::now() + time;
    let writer = std::thread::spawn(move || -> std::io::Result<()> {
        let mut chunk = vec![0u8; 64 * 1024];
        let mut at = 0u64;
        while Instant::now() < deadline {
            for b in &mut chunk {
                *b = pattern(at);
                at += 1;
            }
            tx.write_all(&chunk)?;
        }
        tx.shutdown(std::net::Shutdown::Write)
    });
    rx.set_read_timeout(Some(Duration::from_millis(100)))?;
    let mut buf = vec![0u8; 64 * 1024];
    let mut got = 0u64;
    while Instant::now() < deadline {
        match rx.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                if let Some(bad) = buf[..n].iter().enumerate().position(|(k, b)| *b != pattern(got + k as u64)) {
                    return Err(std::io::Error::other(format!("stream corrupted at byte {}", got + bad as u64)));
                }
                got += n as u64;
            }
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
            Err(e) => return Err(e),
        }
    }
    // Unblock the writer (it may wait on a full window) and collect it.
    let _ = rx.shutdown(std::net::Shutdown::Both);
    let _ = writer.join();
    Ok(got)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(tcp_mbps: f64, ping_loss: f64) -> PathQuality {
        PathQuality { tcp_mbps, ping_loss, pings: 100 }
    }

    #[test]
    fn paired_rounds_compare_by_median_and_pool_losses() {
        let p = Paired {
            // The machine slowed down in the second round: its ratio is
            // still fair, and one odd round does not decide.
            calm: vec![q(60.0, 0.0), q(30.0, 0.0), q(58.0, 0.0)],
            stormy: vec![q(54.0, 0.0), q(27.0, 0.1), q(20.0, 0.02)],
        };
        assert!((p.rate_ratio() - 0.9).abs() < 1e-9, "{}", p.rate_ratio());
        assert_eq!(p.rates(), (58.0, 27.0));
        let (calm, stormy) = p.ping_losses();
        assert!(calm.abs() < 1e-9 && (stormy - 0.04).abs() < 1e-9, "{stormy}");
        assert!(Paired::default().rate_ratio().abs() < 1e-9);
        assert!((Paired::default().ping_losses().1 - 1.0).abs() < 1e-9, "no pings is no evidence");
    }
}
