//! Traffic between lab hosts for tests, the demo and benchmarks: a
//! continuous one-way UDP flow that measures outages, TCP echo servers and
//! a one-shot TCP echo exchange. Sockets are made inside the hosts'
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
