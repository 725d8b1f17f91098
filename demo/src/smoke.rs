//! The smoke test's probes, run from inside lab hosts: TCP exchanges and
//! pings (with per-packet RTTs for percentiles).

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    time::Duration,
};

use mesh_lab::Host;

/// Echo servers on `host` at each address (threads for the demo's life).
pub(crate) fn echo_servers(host: &Host, addrs: Vec<SocketAddr>) -> anyhow::Result<()> {
    for addr in addrs {
        let listener = host.run(move || TcpListener::bind(addr))??;
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut s) = conn else { continue };
                std::thread::spawn(move || {
                    let mut buf = [0u8; 256];
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

/// A TCP exchange from `from`: connect (1 s), send, read the echo back.
pub(crate) fn tcp(from: &Host, to: SocketAddr) -> bool {
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

/// `count` pings 50 ms apart; the RTTs (ms) of those answered.
pub(crate) fn ping(from: &Host, to: &str, count: u32) -> Vec<f64> {
    let count = count.to_string();
    let Ok(out) = from.exec_unchecked("ping", ["-n", "-c", &count, "-i", "0.05", "-W", "1", to]) else {
        return Vec::new();
    };
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split("time=").nth(1)?.split_whitespace().next()?.parse().ok())
        .collect()
}

/// The `q` quantile (0..=1) of `v` (nearest rank); NaN when empty.
pub(crate) fn quantile(v: &[f64], q: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    #[expect(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        clippy::cast_precision_loss,
        reason = "small index"
    )]
    let i = ((q * s.len() as f64).ceil() as usize).clamp(1, s.len()) - 1;
    s[i]
}

/// A continuous one-way UDP flow (a datagram every 2 ms); the receiver
/// keeps arrival times, so an outage is the longest gap between two.
#[derive(Debug)]
pub(crate) struct Flow {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    arrivals: std::sync::Arc<std::sync::Mutex<Vec<std::time::Instant>>>,
}

impl Flow {
    /// Starts the flow from `from` to `to` (bound on `to_host`).
    pub(crate) fn start(from: &Host, to_host: &Host, to: SocketAddr) -> anyhow::Result<Self> {
        use std::sync::{
            Arc, Mutex,
            atomic::{AtomicBool, Ordering},
        };
        let stop = Arc::new(AtomicBool::new(false));
        let arrivals = Arc::new(Mutex::new(Vec::new()));
        let rx = to_host.run(move || std::net::UdpSocket::bind(to))??;
        rx.set_read_timeout(Some(Duration::from_millis(100)))?;
        let tx = from.run(|| std::net::UdpSocket::bind("0.0.0.0:0"))??;
        let (s, a) = (stop.clone(), arrivals.clone());
        std::thread::spawn(move || {
            let mut buf = [0u8; 64];
            while !s.load(Ordering::Relaxed) {
                if rx.recv(&mut buf).is_ok() {
                    a.lock().unwrap_or_else(std::sync::PoisonError::into_inner).push(std::time::Instant::now());
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
    pub(crate) fn received(&self) -> usize {
        self.arrivals.lock().map_or(0, |a| a.len())
    }

    /// The longest gap between two arrivals after `since`.
    pub(crate) fn longest_gap_since(&self, since: std::time::Instant) -> Duration {
        let Ok(a) = self.arrivals.lock() else { return Duration::MAX };
        let mut prev = since;
        let mut worst = Duration::ZERO;
        for t in a.iter().filter(|t| **t >= since) {
            worst = worst.max(t.duration_since(prev));
            prev = *t;
        }
        worst
    }
}

impl Drop for Flow {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}
