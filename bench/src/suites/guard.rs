//! `guard`: how fast the gateway sheds a flood of WireGuard-shaped packets
//! (handshake initiations, 148 bytes) from a source it does not know: the
//! XDP guard (rate limit per prefix, drop in the driver) against the
//! equivalent nftables rule (a per-source meter in the earliest hook,
//! netdev ingress), and no filter, in the same run.
//!
//! The flood comes from the in-kernel generator (`acl::xdp_flood`), which
//! outruns the gateway; a socket sender (about 200 kpps here) did not, so
//! both filters dropped all of it and looked alike. The generator hands
//! frames to the veth in batches and the gateway processes each batch on the
//! same CPU before the next, so `offered_kpps` is the rate one CPU sustains
//! for generating plus shedding, and `ns_per_frame` (its inverse) is the CPU
//! time a flood frame costs with each filter. veth needs an XDP program on
//! the receiving side to take frames sent by XDP: `none` and `nft-meter` run
//! the empty XDP program there, `xdp-guard` the guard.
//!
//! Second part, legit throughput under flood: two gateways running our
//! agents (a tunnel as in the `tunnel` suite) and the flooder on one
//! underlay switch. A checked two-way TCP stream through the tunnel (Mbit/s
//! each way) and a ping series (loss, %): with no sender (`legit-idle`),
//! with the generator sending frames the switch drops at its own port
//! (`legit-calm`: the sender's CPU cost without the flood, since it shares
//! the machine's CPUs), and while it floods the receiving gateway's
//! WireGuard port with 148-byte initiations and junk (`legit-flood`);
//! without a guard (`none`) and with the XDP guard knowing the peer's
//! endpoint (`xdp-guard`).

use std::net::Ipv4Addr;

use anyhow::anyhow;
use mesh_agent::dataplane::{Dataplane, GuardSettings, GuardVerdict};
use mesh_lab::Lab;

use super::acl::{generator, mac, nft_flush, nft_load, wire_frame, xdp_flood};
use crate::{Ctx, Results, chart};

/// One-line description.
pub const ABOUT: &str =
    "underlay guard: drop rate of an unknown-source WireGuard flood, XDP vs nftables; legit throughput under flood";

const WG_PORT: u16 = 51820;

/// Runs the suite.
pub fn run(ctx: &Ctx) -> anyhow::Result<Results> {
    let (runs, secs): (u32, f64) = if ctx.quick { (3, 1.0) } else { (7, 3.0) };
    let mut results = Results::new("guard", Some("none"));
    for m in ["offered_kpps", "dropped_kpps", "delivered_kpps", "ns_per_frame", "legit_mbps", "ping_loss_pct"] {
        results.higher_is_better(m, !matches!(m, "delivered_kpps" | "ns_per_frame" | "ping_loss_pct"));
    }
    legit_under_flood(ctx, &mut results, runs, secs.max(2.0))?;
    let lab = Lab::new()?;
    let tx = lab.host("tx")?;
    let gw = lab.host("gw")?;
    lab.link(&tx, "eth0", &gw, "eth0")?;
    tx.addr("eth0", "192.0.2.10/24")?;
    gw.addr("eth0", "192.0.2.1/24")?;
    tx.exec("ping", ["-c", "1", "-W", "2", "192.0.2.1"]).ok();
    let frame = wire_frame(
        mac(&gw, "eth0")?,
        mac(&tx, "eth0")?,
        Ipv4Addr::new(192, 0, 2, 10),
        Ipv4Addr::new(192, 0, 2, 1),
        WG_PORT,
        &initiation(),
    );
    let mut gen_dp = generator(&tx)?;
    let nft = format!(
        "table netdev guard {{\n chain guard_in {{\n  type filter hook ingress device eth0 priority -500;\n  \
         udp dport {WG_PORT} meter flood {{ ip saddr limit rate over 20/second burst 40 packets }} counter drop\n }}\n}}\n"
    );
    for run in 0..runs {
        for variant in ["none", "xdp-guard", "nft-meter"] {
            let guard = variant == "xdp-guard";
            let dp = gw
                .run(move || -> anyhow::Result<Dataplane> {
                    let mut dp = Dataplane::load_unpinned()?;
                    if guard {
                        dp.set_guard(&GuardSettings::default())?;
                        dp.attach_underlay("eth0", WG_PORT)?;
                    } else {
                        dp.attach_xdp_pass_through("eth0")?;
                    }
                    Ok(dp)
                })
                .map_err(|e| anyhow!("{e}"))??;
            if variant == "nft-meter" {
                nft_load(&gw, &nft)?;
            }
            let before = udp_in_datagrams(&gw)?;
            let (returned, sent, busy) = xdp_flood(&tx, gen_dp, "eth0", frame.clone(), secs)?;
            gen_dp = returned;
            // What reached the UDP layer (and would reach the crypto).
            let delivered = (udp_in_datagrams(&gw)? - before) as f64 / busy;
            let dropped = match variant {
                "xdp-guard" => {
                    let c = dp.counters()?;
                    let drops = [GuardVerdict::DropRateLimited, GuardVerdict::DropBadType, GuardVerdict::DropBadSize];
                    drops.iter().map(|v| c.guard(*v).packets).sum::<u64>() as f64 / busy
                }
                "nft-meter" => nft_counter(&gw)? as f64 / busy,
                _ => 0.0,
            };
            drop(dp);
            nft_flush(&gw)?;
            let offered = sent as f64 / busy;
            results.push(variant, "flood", "offered_kpps", offered / 1e3, "kpps", run);
            results.push(variant, "flood", "dropped_kpps", dropped / 1e3, "kpps", run);
            results.push(variant, "flood", "delivered_kpps", delivered / 1e3, "kpps", run);
            results.push(variant, "flood", "ns_per_frame", 1e9 / offered, "ns", run);
            ctx.progress(
                "guard",
                format!(
                    "run {run} {variant}: offered {:.0} kpps, dropped {:.0}, reached UDP {:.1}, {:.0} ns per frame",
                    offered / 1e3,
                    dropped / 1e3,
                    delivered / 1e3,
                    1e9 / offered
                ),
            );
        }
    }
    chart::line_chart(
        &ctx.out.join("guard.svg"),
        "Unknown-source WireGuard flood",
        "dropped_kpps",
        &results.summaries(),
        false,
    )?;
    Ok(results)
}

/// Legit two-way traffic through a tunnel to the flooded gateway, guard on
/// and off (see the module doc).
fn legit_under_flood(ctx: &Ctx, results: &mut Results, runs: u32, secs: f64) -> anyhow::Result<()> {
    use mesh_agent::dataplane::flood::{Flood, self_addressed, wireguard_flood};
    use mesh_lab::traffic::{echo_servers, path_quality};

    use super::tunnel::{LEFT_UNDERLAY, RIGHT_OVERLAY, RIGHT_UNDERLAY, ours};

    let lab = Lab::new()?;
    let (left, right, tx) = (lab.host("left")?, lab.host("right")?, lab.host("tx")?);
    let wan = lab.switch("wan")?;
    let mut tx_port = String::new();
    for (h, a) in [(&left, LEFT_UNDERLAY), (&right, RIGHT_UNDERLAY), (&tx, "192.0.2.10")] {
        let port = wan.plug(h, "eth0")?;
        h.addr("eth0", &format!("{a}/24"))?;
        if h.name() == tx.name() {
            tx_port = port;
        }
    }
    // veth takes frames sent by XDP only when its receiving end runs XDP.
    let _port_xdp = wan
        .host()
        .run(move || -> anyhow::Result<Dataplane> {
            let mut dp = Dataplane::load_unpinned()?;
            dp.attach_xdp_pass_through(&tx_port)?;
            Ok(dp)
        })
        .map_err(|e| anyhow!("{e}"))??;
    let _tunnel = ours::up(&lab, &left, &right, "")?;
    let echo = format!("{RIGHT_OVERLAY}:7000").parse()?;
    echo_servers(&right, &[echo])?;
    let frames = wireguard_flood(
        right.mac("eth0")?,
        tx.mac("eth0")?,
        Ipv4Addr::new(192, 0, 2, 10),
        RIGHT_UNDERLAY.parse()?,
        WG_PORT,
    );
    let peer: std::net::IpAddr = LEFT_UNDERLAY.parse()?;
    for run in 0..runs {
        for variant in ["none", "xdp-guard"] {
            let guard = (variant == "xdp-guard")
                .then(|| {
                    right.run(move || -> anyhow::Result<Dataplane> {
                        let mut dp = Dataplane::load_unpinned()?;
                        dp.set_guard(&GuardSettings::default())?;
                        dp.attach_underlay("eth0", WG_PORT)?;
                        dp.set_known_endpoints(&[peer])?;
                        Ok(dp)
                    })
                })
                .transpose()
                .map_err(|e| anyhow!("{e}"))?
                .transpose()?;
            let idle = path_quality(&left, echo, RIGHT_OVERLAY, secs)?;
            // As in the demo's check: the control run pays the sender's CPU
            // (frames the switch drops at the sender's port), the flood run
            // the same plus what reaches the gateway.
            let run_with = |frames: Vec<Vec<u8>>| -> anyhow::Result<(mesh_lab::traffic::PathQuality, f64)> {
                let host = tx.clone();
                let enter = move || host.enter_current_thread().map_err(std::io::Error::other);
                let (q, sent) =
                    Flood::during(enter, "eth0", frames, || path_quality(&left, echo, RIGHT_OVERLAY, secs))?;
                Ok((q?, sent.pps()))
            };
            let (calm, _) = run_with(frames.iter().map(|f| self_addressed(f)).collect())?;
            let (stormy, pps) = run_with(frames.clone())?;
            drop(guard);
            for (scenario, q) in [("idle", idle), ("calm", calm), ("flood", stormy)] {
                results.push(variant, format!("legit-{scenario}"), "legit_mbps", q.tcp_mbps, "Mbit/s", run);
                results.push(variant, format!("legit-{scenario}"), "ping_loss_pct", q.ping_loss * 100.0, "%", run);
            }
            ctx.progress(
                "guard",
                format!(
                    "run {run} legit traffic, {variant}: {:.0} Mbit/s two-way and {:.1}% ping loss unflooded, \
                     {:.0} Mbit/s and {:.1}% under a {:.0} kpps flood",
                    calm.tcp_mbps,
                    calm.ping_loss * 100.0,
                    stormy.tcp_mbps,
                    stormy.ping_loss * 100.0,
                    pps / 1e3
                ),
            );
        }
    }
    Ok(())
}

/// A handshake initiation's shape: type 1, three zero bytes, 148 bytes.
fn initiation() -> Vec<u8> {
    let mut m = vec![0u8; 148];
    m[0] = 1;
    m
}

/// UDP datagrams the namespace's stack received (including those with no
/// socket: `InDatagrams + NoPorts`).
fn udp_in_datagrams(host: &mesh_lab::Host) -> anyhow::Result<u64> {
    let out = host.exec("cat", ["/proc/net/snmp"])?;
    let text = String::from_utf8_lossy(&out.stdout);
    let mut lines = text.lines().filter(|l| l.starts_with("Udp:"));
    let (names, values) = (lines.next().unwrap_or_default(), lines.next().unwrap_or_default());
    let get = |field: &str| -> u64 {
        names
            .split_whitespace()
            .position(|n| n == field)
            .and_then(|i| values.split_whitespace().nth(i))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    Ok(get("InDatagrams") + get("NoPorts"))
}

fn nft_counter(host: &mesh_lab::Host) -> anyhow::Result<u64> {
    let out = host.exec("nft", ["list", "chain", "netdev", "guard", "guard_in"])?;
    let text = String::from_utf8_lossy(&out.stdout);
    // "... counter packets N bytes M drop" (the meter's "40 packets" comes first).
    let packets = text
        .split_whitespace()
        .skip_while(|w| *w != "counter")
        .skip_while(|w| *w != "packets")
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    Ok(packets)
}
