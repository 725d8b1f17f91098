//! `guard`: how fast the gateway sheds a flood of WireGuard-shaped packets
//! (handshake initiations, 148 bytes) from a source it does not know: the
//! XDP guard (rate limit per prefix, drop in the driver) against the
//! equivalent nftables rule (a per-source meter in the earliest hook,
//! netdev ingress), and no filter, in the same run.

use std::net::{Ipv4Addr, SocketAddr};

use anyhow::anyhow;
use mesh_agent::dataplane::{Dataplane, GuardSettings, GuardVerdict};
use mesh_lab::Lab;

use super::acl::{nft_flush, nft_load};
use crate::{Ctx, Results, chart};

/// One-line description.
pub const ABOUT: &str = "underlay guard: drop rate of an unknown-source WireGuard flood, XDP vs nftables";

const WG_PORT: u16 = 51820;

/// Runs the suite.
pub fn run(ctx: &Ctx) -> anyhow::Result<Results> {
    let (runs, secs) = if ctx.quick { (3, 1.5) } else { (7, 4.0) };
    let mut results = Results::new("guard", Some("none"));
    for m in ["offered_kpps", "dropped_kpps", "delivered_kpps"] {
        results.higher_is_better(m, m != "delivered_kpps");
    }
    let lab = Lab::new()?;
    let tx = lab.host("tx")?;
    let gw = lab.host("gw")?;
    lab.link(&tx, "eth0", &gw, "eth0")?;
    tx.addr("eth0", "192.0.2.10/24")?;
    gw.addr("eth0", "192.0.2.1/24")?;
    tx.exec("ping", ["-c", "1", "-W", "2", "192.0.2.1"]).ok();
    let dst = SocketAddr::from((Ipv4Addr::new(192, 0, 2, 1), WG_PORT));
    let nft = format!(
        "table netdev guard {{\n chain guard_in {{\n  type filter hook ingress device eth0 priority -500;\n  \
         udp dport {WG_PORT} meter flood {{ ip saddr limit rate over 20/second burst 40 packets }} counter drop\n }}\n}}\n"
    );
    for run in 0..runs {
        for variant in ["none", "xdp-guard", "nft-meter"] {
            let dp = match variant {
                "xdp-guard" => Some(
                    gw.run(|| -> anyhow::Result<Dataplane> {
                        let mut dp = Dataplane::load_unpinned()?;
                        dp.set_guard(&GuardSettings::default())?;
                        dp.attach_underlay("eth0", WG_PORT)?;
                        Ok(dp)
                    })
                    .map_err(|e| anyhow!("{e}"))??,
                ),
                "nft-meter" => {
                    nft_load(&gw, &nft)?;
                    None
                }
                _ => None,
            };
            let before = udp_in_datagrams(&gw)?;
            let (offered, _) =
                super::acl::flood(&tx, &gw, "eth0", Ipv4Addr::new(192, 0, 2, 10), dst, initiation(), secs)?;
            // What reached the UDP layer (and would reach the crypto).
            let delivered = (udp_in_datagrams(&gw)? - before) as f64 / secs;
            let dropped = match &dp {
                Some(dp) => {
                    let c = dp.counters()?;
                    let drops = [GuardVerdict::DropRateLimited, GuardVerdict::DropBadType, GuardVerdict::DropBadSize];
                    drops.iter().map(|v| c.guard(*v).packets).sum::<u64>() as f64 / secs
                }
                None if variant == "nft-meter" => nft_counter(&gw)? as f64 / secs,
                None => 0.0,
            };
            drop(dp);
            nft_flush(&gw)?;
            results.push(variant, "flood", "offered_kpps", offered / 1e3, "kpps", run);
            results.push(variant, "flood", "dropped_kpps", dropped / 1e3, "kpps", run);
            results.push(variant, "flood", "delivered_kpps", delivered / 1e3, "kpps", run);
            ctx.progress(
                "guard",
                format!(
                    "run {run} {variant}: offered {:.0} kpps, dropped {:.0}, reached UDP {:.1}",
                    offered / 1e3,
                    dropped / 1e3,
                    delivered / 1e3
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
