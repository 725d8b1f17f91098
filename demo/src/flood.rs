//! The demo's flood check: with the guard on every gateway, a sender on the
//! underlay switch floods nyc's primary gateway's WireGuard port with junk
//! and handshake-initiation-shaped packets (148-byte type-1 messages) from
//! the in-kernel generator, at the highest rate it reaches. A checked
//! two-way TCP stream (app-nyc <-> db-fsn's echo server on 5432, which the
//! policy allows) and a ping series through that gateway must keep at least
//! 70% of their unflooded rate (the median over three rounds, each
//! unflooded then flooded) with at most 5% loss. Traffic stays inside the
//! lab's namespaces.

use std::net::{Ipv4Addr, SocketAddr};

use anyhow::{Context as _, anyhow};
use mesh_agent::dataplane::{
    Dataplane,
    flood::{Flood, self_addressed, wireguard_flood},
};
use mesh_lab::{
    Host, Lab, Switch,
    traffic::{FLOOD_RATE_BOUND, Paired, PathQuality, median, path_quality},
};

/// Seconds of each measurement.
const SECS: f64 = 2.0;
/// Rounds of unflooded then flooded measurements.
const ROUNDS: usize = 3;
/// The flooding host's underlay address.
const FLOODER: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 66);

/// The measurements, and what the flood sent.
#[derive(Debug)]
pub(crate) struct FloodCheck {
    /// No sender at all.
    pub(crate) idle: PathQuality,
    /// Unflooded (the sender running, its frames discarded by the switch)
    /// and flooded, in alternating rounds.
    pub(crate) paired: Paired,
    /// The flood's rate (median over the rounds).
    pub(crate) flood_kpps: f64,
}

impl FloodCheck {
    /// Whether the path kept its bounds under the flood.
    pub(crate) fn passed(&self) -> bool {
        self.paired.rates().0 > 0.0
            && self.paired.rate_ratio() >= FLOOD_RATE_BOUND
            && self.paired.ping_losses().1 <= 0.05
    }

    /// Both rates, for the demo's output.
    pub(crate) fn summary(&self) -> String {
        let ((calm, stormy), (calm_loss, stormy_loss)) = (self.paired.rates(), self.paired.ping_losses());
        format!(
            "two-way TCP app-nyc <-> db-fsn, Mbit/s each way (medians of {ROUNDS} rounds): {calm:.0} unflooded \
             ({:.0} with no sender), {stormy:.0} flooded ({:.0}% by round, bound {:.0}%); ping loss {:.1}% \
             unflooded, {:.1}% flooded (bound 5%); flood {:.0} kpps",
            self.idle.tcp_mbps,
            100.0 * self.paired.rate_ratio(),
            100.0 * FLOOD_RATE_BOUND,
            calm_loss * 100.0,
            stormy_loss * 100.0,
            self.flood_kpps
        )
    }
}

/// Floods `gw` (its `eth0` at `gw_ip`) from a new host on `wan` while
/// measuring the path from `app` to the echo server at `echo` (pinging
/// `echo`'s host).
pub(crate) fn check(
    lab: &Lab,
    wan: &Switch,
    gw: &Host,
    gw_ip: Ipv4Addr,
    app: &Host,
    echo: SocketAddr,
) -> anyhow::Result<FloodCheck> {
    let flooder = lab.host("flood")?;
    let port = wan.plug(&flooder, "eth0")?;
    flooder.addr("eth0", &format!("{FLOODER}/24"))?;
    // veth only takes frames sent by XDP when its receiving end runs an XDP
    // program: the empty one on the switch's port.
    let _port_xdp = wan
        .host()
        .run(move || -> anyhow::Result<Dataplane> {
            let mut dp = Dataplane::load_unpinned()?;
            dp.attach_xdp_pass_through(&port)?;
            Ok(dp)
        })
        .map_err(|e| anyhow!("{e}"))??;
    let ping_to = echo.ip().to_string();
    let idle = path_quality(app, echo, &ping_to, SECS).context("measuring the path without a sender")?;

    let frames = wireguard_flood(gw.mac("eth0")?, flooder.mac("eth0")?, FLOODER, gw_ip, 51820);
    // The sender shares the lab machine's CPUs with the tunnel: the
    // unflooded rate is measured while it sends the same frames addressed
    // back to itself (the switch drops them), so both runs pay the sender's
    // CPU and the difference is what the flood costs the gateway.
    let run = |frames: Vec<Vec<u8>>| -> anyhow::Result<(PathQuality, f64)> {
        let host = flooder.clone();
        let enter = move || host.enter_current_thread().map_err(std::io::Error::other);
        let (q, sent) = Flood::during(enter, "eth0", frames, || path_quality(app, echo, &ping_to, SECS))?;
        Ok((q?, sent.pps() / 1e3))
    };
    let mut kpps = Vec::new();
    let paired = Paired::measure(
        ROUNDS,
        || run(frames.iter().map(|f| self_addressed(f)).collect()).map(|(q, _)| q),
        || {
            let (q, k) = run(frames.clone())?;
            kpps.push(k);
            anyhow::Ok(q)
        },
    )
    .context("measuring the path with and without the flood")?;
    Ok(FloodCheck { idle, paired, flood_kpps: median(&kpps) })
}
