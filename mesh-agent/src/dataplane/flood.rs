//! A flood for tests, the demo and the benchmarks: frames sent out of a
//! lab interface by the in-kernel generator ([`Dataplane::transmit_frames`])
//! from a background thread, at the highest rate one CPU reaches, until
//! stopped. Never point it at anything outside a lab namespace.

use std::{
    net::Ipv4Addr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
        mpsc,
    },
    thread::JoinHandle,
    time::Duration,
};

use super::{Dataplane, DataplaneError};

/// Frames per generator run: long enough that the syscall is noise, short
/// enough that a stop is seen within milliseconds.
const CHUNK: u32 = 100_000;
/// Frames handed to the interface per batch.
const BATCH: u32 = 64;

/// An Ethernet + IPv4 + UDP frame the receiver's stack accepts: its MAC as
/// destination, a correct IPv4 header checksum, UDP checksum 0 (none),
/// source port 40000.
#[must_use]
pub fn udp4_frame(
    dst_mac: [u8; 6],
    src_mac: [u8; 6],
    src: Ipv4Addr,
    dst: Ipv4Addr,
    dport: u16,
    payload: &[u8],
) -> Vec<u8> {
    let mut f = Vec::with_capacity(42 + payload.len());
    f.extend(dst_mac);
    f.extend(src_mac);
    f.extend([0x08, 0x00]);
    let total = u16::try_from(20 + 8 + payload.len()).expect("a frame fits in an IPv4 packet");
    let mut ip = vec![0x45, 0];
    ip.extend(total.to_be_bytes());
    ip.extend([0, 0, 0x40, 0, 64, 17, 0, 0]);
    ip.extend(src.octets());
    ip.extend(dst.octets());
    let sum = ip.chunks(2).map(|w| u32::from(u16::from_be_bytes([w[0], w[1]]))).sum::<u32>();
    let sum = (sum & 0xffff) + (sum >> 16);
    let sum = !(((sum & 0xffff) + (sum >> 16)) as u16);
    ip[10..12].copy_from_slice(&sum.to_be_bytes());
    f.extend(ip);
    f.extend(40000u16.to_be_bytes());
    f.extend(dport.to_be_bytes());
    f.extend((total - 20).to_be_bytes());
    f.extend([0, 0]);
    f.extend(payload);
    f
}

/// The flood the tests, the demo and the benchmark send at a gateway's
/// WireGuard port `port` (`dst`, MAC `dst_mac`) from `src`: a
/// handshake-initiation-shaped message (type 1, 148 bytes: the guard's size
/// and type checks pass it, the rate limit must stop it) and 64 bytes of
/// junk (no message type: the type check drops it).
#[must_use]
pub fn wireguard_flood(dst_mac: [u8; 6], src_mac: [u8; 6], src: Ipv4Addr, dst: Ipv4Addr, port: u16) -> Vec<Vec<u8>> {
    let mut initiation = vec![0u8; 148];
    initiation[0] = 1;
    // The high bit is set in every byte: never a message type.
    let junk: Vec<u8> = (0..64u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8 | 0x80).collect();
    [initiation, junk].iter().map(|p| udp4_frame(dst_mac, src_mac, src, dst, port, p)).collect()
}

/// `frame` addressed back to its sender's MAC: a switch drops it at the
/// sender's own port. Flooding these costs the sender's CPU what the real
/// flood costs it (generation, the switch's receive and lookup) without
/// reaching anyone: the control run for "what does the flood cost the
/// gateway" on a machine where the sender shares the CPUs.
#[must_use]
pub fn self_addressed(frame: &[u8]) -> Vec<u8> {
    let mut f = frame.to_vec();
    f.copy_within(6..12, 0);
    f
}

/// What a flood sent.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct FloodReport {
    /// Frames sent.
    pub frames: u64,
    /// Time spent sending them.
    pub busy: Duration,
}

impl FloodReport {
    /// Frames per second while sending.
    #[must_use]
    pub fn pps(&self) -> f64 {
        self.frames as f64 / self.busy.as_secs_f64().max(1e-9)
    }
}

/// A running flood; [`Flood::stop`] ends it.
#[derive(Debug)]
pub struct Flood {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Result<FloodReport, DataplaneError>>>,
}

impl Flood {
    /// Starts sending `frames` in turn (a chunk of each) out of `ifname`.
    /// `enter` runs first on the flood's thread, to move it into the lab
    /// namespace that owns `ifname`. Returns once the generator is loaded
    /// and sending.
    pub fn start(
        enter: impl FnOnce() -> std::io::Result<()> + Send + 'static,
        ifname: &str,
        frames: Vec<Vec<u8>>,
    ) -> Result<Self, DataplaneError> {
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = mpsc::channel();
        let (flag, ifname) = (stop.clone(), ifname.to_owned());
        let thread = std::thread::spawn(move || {
            let setup = enter()
                .map_err(|source| DataplaneError::Io { what: "entering the flood's namespace".into(), source })
                .and_then(|()| Dataplane::load_unpinned());
            let mut dp = match setup {
                Ok(dp) => {
                    let _ = ready_tx.send(None);
                    dp
                }
                Err(e) => {
                    let _ = ready_tx.send(Some(e.to_string()));
                    return Err(e);
                }
            };
            let mut report = FloodReport { frames: 0, busy: Duration::ZERO };
            while !flag.load(Ordering::Relaxed) {
                for frame in &frames {
                    report.busy += dp.transmit_frames(&ifname, frame, CHUNK, BATCH)?;
                    report.frames += u64::from(CHUNK);
                }
            }
            Ok(report)
        });
        match ready_rx.recv() {
            Ok(None) => Ok(Self { stop, thread: Some(thread) }),
            _ => Err(thread.join().map_or_else(
                |_| DataplaneError::Usage("the flood thread panicked".into()),
                |r| r.err().unwrap_or_else(|| DataplaneError::Usage("the flood did not start".into())),
            )),
        }
    }

    /// Runs `measure` while `frames` flood out of `ifname` (see
    /// [`Flood::start`]); its result and what the flood sent.
    pub fn during<T>(
        enter: impl FnOnce() -> std::io::Result<()> + Send + 'static,
        ifname: &str,
        frames: Vec<Vec<u8>>,
        measure: impl FnOnce() -> T,
    ) -> Result<(T, FloodReport), DataplaneError> {
        let flood = Self::start(enter, ifname, frames)?;
        let result = measure();
        Ok((result, flood.stop()?))
    }

    /// Stops the flood; what it sent.
    pub fn stop(mut self) -> Result<FloodReport, DataplaneError> {
        self.stop.store(true, Ordering::Relaxed);
        let thread = self.thread.take().expect("joined once");
        thread.join().map_err(|_| DataplaneError::Usage("the flood thread panicked".into()))?
    }
}

impl Drop for Flood {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
