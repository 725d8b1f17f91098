//! `acl`: the eBPF overlay ACL's cost.
//!
//! 1. Per-packet cost through BPF_PROG_TEST_RUN at 10, 1,000 and 10,000
//!    rules (a packet hitting the first rule, the last rule, and a
//!    default-deny miss), next to the empty TC program (variant `none`) in
//!    the same run. A repeated accepted packet is a later packet of a
//!    remembered flow (`hit-*`: one flow-table lookup instead of the policy
//!    lookups); `new-flow-*` runs the same packets with zero flow timeouts,
//!    so each one is decided by the policy like the first of a flow, and
//!    `miss` always is.
//! 2. Forwarding rate of a UDP flood of small packets through a gateway
//!    namespace: no filter, the empty TC program where the ACL goes (the
//!    cost of the hook itself), our TC ACL, nftables one rule per line,
//!    nftables with a set; same rules, interleaved runs. The flood matches the *last*
//!    rule. nftables runs stateless in the forward hook (no conntrack), as
//!    our ACL evaluates every non-reply packet against the policy.
//!
//!    The flood comes from an in-kernel generator ([`xdp_flood`]): a socket
//!    sender on this machine tops out near 150 kpps, below what the gateway
//!    forwards, so it measured the sender. The generator hands frames to
//!    the veth in batches and the gateway forwards them on the same CPU
//!    before the next batch, so the rate is what one CPU sustains for
//!    generation plus forwarding, and the filter's cost shows in it. The
//!    gateway's receiving interface carries the empty XDP program in every
//!    variant (veth needs one to take frames sent by XDP).

use std::{net::Ipv4Addr, time::Duration};

use anyhow::{Context as _, anyhow};
use mesh_agent::dataplane::{CompiledPolicy, Dataplane, PROG_ACL_ETH, PROG_PASS_TC, PortRange, Proto, Rule};
use mesh_lab::{Host, Lab};

use crate::{Ctx, Results, chart};

/// One-line description.
pub const ABOUT: &str = "eBPF ACL: per-packet cost (BPF_PROG_TEST_RUN) and forwarding rate vs nftables";

const RULE_COUNTS: [usize; 3] = [10, 1_000, 10_000];
const DST_NET: &str = "198.18.20.0/24";
const RECEIVER: Ipv4Addr = Ipv4Addr::new(198, 18, 20, 10);
const PORT: u16 = 5000;

/// The overlay address of node `i` (100.64.0.0/10 has room for 4M).
pub(crate) fn node(i: usize) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(100, 64, 0, 0)) + 1 + i as u32)
}

/// `n` rules: node i may send UDP to the site on port PORT.
pub(crate) fn policy(n: usize) -> CompiledPolicy {
    CompiledPolicy {
        generation: n as u64,
        rules: (0..n)
            .map(|i| Rule {
                id: i as u32,
                src: vec![format!("{}/32", node(i)).parse().unwrap()],
                dst: vec![DST_NET.parse().unwrap()],
                proto: Proto::Udp,
                ports: PortRange::single(PORT),
            })
            .collect(),
    }
}

/// An Ethernet + IPv4 + UDP frame (checksums are not checked by the ACL).
fn udp_frame(src: Ipv4Addr, dst: Ipv4Addr, dport: u16) -> Vec<u8> {
    let mut f = vec![2, 0, 0, 0, 0, 2, 2, 0, 0, 0, 0, 1, 0x08, 0x00];
    let mut ip = vec![0x45, 0, 0, 20 + 8 + 18, 0, 0, 0, 0, 64, 17, 0, 0];
    ip.extend(src.octets());
    ip.extend(dst.octets());
    f.extend(ip);
    f.extend(40000u16.to_be_bytes());
    f.extend(dport.to_be_bytes());
    f.extend(26u16.to_be_bytes());
    f.extend([0, 0]);
    f.extend([0u8; 18]);
    f
}

/// Runs the suite.
pub fn run(ctx: &Ctx) -> anyhow::Result<Results> {
    // `none` is the baseline of both parts: the empty TC program for
    // `ns_per_packet`, no filter at all for `kpps`.
    let mut results = Results::new("acl", Some("none"));
    results.higher_is_better("kpps", true);
    results.higher_is_better("offered_kpps", true);
    test_run_cost(ctx, &mut results)?;
    forwarding(ctx, &mut results)?;
    let summaries = results.summaries();
    chart::line_chart(
        &ctx.out.join("acl.svg"),
        "eBPF ACL cost per packet (BPF_PROG_TEST_RUN)",
        "ns_per_packet",
        &summaries,
        true,
    )?;
    chart::line_chart(
        &ctx.out.join("acl-forwarding.svg"),
        "Forwarded UDP packets through the gateway",
        "kpps",
        &summaries,
        true,
    )?;
    Ok(results)
}

fn test_run_cost(ctx: &Ctx, results: &mut Results) -> anyhow::Result<()> {
    let (runs, repeat) = if ctx.quick { (3, 200_000) } else { (7, 1_000_000) };
    let mut planes = Vec::new();
    for n in RULE_COUNTS {
        let mut dp = Dataplane::load_unpinned().context("loading the dataplane")?;
        let report = dp.install_policy(&policy(n))?;
        ctx.progress(
            "acl",
            format!("{n} rules installed in {:.1} ms ({} entries)", report.elapsed.as_secs_f64() * 1e3, report.entries),
        );
        results.push("install", n, "install_ms", report.elapsed.as_secs_f64() * 1e3, "ms", 0);
        planes.push((n, dp));
    }
    let dst = RECEIVER;
    for run in 0..runs {
        for (n, dp) in &mut planes {
            let n = *n;
            let cases = [
                ("none", PROG_PASS_TC, udp_frame(node(0), dst, PORT)),
                ("ebpf-acl/hit-first", PROG_ACL_ETH, udp_frame(node(0), dst, PORT)),
                ("ebpf-acl/hit-last", PROG_ACL_ETH, udp_frame(node(n - 1), dst, PORT)),
                ("ebpf-acl/miss", PROG_ACL_ETH, udp_frame(node(0), dst, PORT + 1)),
            ];
            for (variant, prog, frame) in &cases {
                let ns = dp.time_per_run(prog, frame, repeat)?;
                results.push(variant, n, "ns_per_packet", ns, "ns", run);
            }
            // The same packets as the first of a flow: with zero timeouts
            // every remembered flow is stale at once, so each run goes
            // through the policy lookups (and writes the flow's entries).
            dp.set_flow_timeouts(0, 0)?;
            for (variant, _, frame) in &cases[1..3] {
                let variant = variant.replace("hit-", "new-flow-");
                let ns = dp.time_per_run(PROG_ACL_ETH, frame, repeat)?;
                results.push(&variant, n, "ns_per_packet", ns, "ns", run);
            }
            dp.set_flow_timeouts(600, 120)?;
        }
        ctx.progress("acl", format!("test-run round {} of {runs} done", run + 1));
    }
    Ok(())
}

/// The forwarding lab: `tx` (all nodes' addresses) -> `gw` -> `rx`.
struct ForwardLab {
    _lab: Lab,
    tx: Host,
    gw: Host,
    rx: Host,
}

fn forward_lab() -> anyhow::Result<ForwardLab> {
    let lab = Lab::new()?;
    let tx = lab.host("tx")?;
    let gw = lab.host("gw")?;
    let rx = lab.host("rx")?;
    lab.link(&tx, "eth0", &gw, "eth0")?;
    lab.link(&gw, "eth1", &rx, "eth0")?;
    tx.addr("eth0", "192.0.2.2/24")?;
    gw.addr("eth0", "192.0.2.1/24")?;
    gw.addr("eth1", "198.18.20.1/24")?;
    rx.addr("eth0", "198.18.20.10/24")?;
    gw.route_via("100.64.0.0/10", "192.0.2.2")?;
    rx.route_via("100.64.0.0/10", "198.18.20.1")?;
    gw.forwarding()?;
    Ok(ForwardLab { _lab: lab, tx, gw, rx })
}

pub(crate) fn rx_packets(host: &Host, ifname: &str) -> anyhow::Result<u64> {
    let out = host.exec("cat", [format!("/sys/class/net/{ifname}/statistics/rx_packets")])?;
    Ok(String::from_utf8_lossy(&out.stdout).trim().parse()?)
}

/// nftables rules, one per line.
fn nft_lines(p: &CompiledPolicy) -> String {
    let mut s =
        String::from("table ip bench {\n chain filter_fwd {\n  type filter hook forward priority 0; policy drop;\n");
    for r in &p.rules {
        s.push_str(&format!("  ip saddr {} ip daddr {} udp dport {} accept\n", r.src[0], r.dst[0], r.ports.first));
    }
    s.push_str(" }\n}\n");
    s
}

/// The same rules as one set lookup.
fn nft_set(p: &CompiledPolicy) -> String {
    let mut s = String::from(
        "table ip bench {\n set allowed {\n  type ipv4_addr . ipv4_addr . inet_service; flags interval;\n  elements = {\n",
    );
    let elems: Vec<String> =
        p.rules.iter().map(|r| format!("   {} . {} . {}", r.src[0], r.dst[0], r.ports.first)).collect();
    s.push_str(&elems.join(",\n"));
    s.push_str("\n  }\n }\n chain filter_fwd {\n  type filter hook forward priority 0; policy drop;\n  ip saddr . ip daddr . udp dport @allowed accept\n }\n}\n");
    s
}

pub(crate) fn nft_load(host: &Host, ruleset: &str) -> anyhow::Result<()> {
    let path = std::env::temp_dir().join(format!("mesh-bench-{}-{}.nft", std::process::id(), host.netns()));
    std::fs::write(&path, ruleset)?;
    let r = host.exec("nft", ["-f", path.to_str().unwrap_or_default()]);
    let _ = std::fs::remove_file(&path);
    r.context("loading the nftables ruleset")?;
    Ok(())
}

pub(crate) fn nft_flush(host: &Host) -> anyhow::Result<()> {
    host.exec("nft", ["flush", "ruleset"])?;
    Ok(())
}

/// Frames per generator call: long enough that the syscall's overhead
/// vanishes, short enough to stop close to the requested duration.
const GEN_CHUNK: u32 = 100_000;
/// Frames per generator round (the kernel's live-frames batch, at most 256;
/// below veth's 256-frame ring so that nothing is dropped on the way in).
const GEN_BATCH: u32 = 64;

/// The in-kernel generator, loaded in `host`'s namespace.
pub(crate) fn generator(host: &Host) -> anyhow::Result<Dataplane> {
    host.run(Dataplane::load_unpinned).map_err(|e| anyhow!("{e}"))?.context("loading the traffic generator")
}

/// Sends copies of `frame` out of `ifname` in `host` for `secs` seconds
/// with the in-kernel generator; returns it, the frames sent and the time
/// spent sending them (rates are over that time).
pub(crate) fn xdp_flood(
    host: &Host,
    mut gen_dp: Dataplane,
    ifname: &'static str,
    frame: Vec<u8>,
    secs: f64,
) -> anyhow::Result<(Dataplane, u64, f64)> {
    let (gen_dp, result) = host
        .run(move || {
            let mut run = || -> Result<(u64, f64), mesh_agent::dataplane::DataplaneError> {
                let (mut sent, mut busy) = (0u64, Duration::ZERO);
                while busy.as_secs_f64() < secs {
                    busy += gen_dp.transmit_frames(ifname, &frame, GEN_CHUNK, GEN_BATCH)?;
                    sent += u64::from(GEN_CHUNK);
                }
                Ok((sent, busy.as_secs_f64()))
            };
            let result = run();
            (gen_dp, result)
        })
        .map_err(|e| anyhow!("{e}"))?;
    let (sent, busy) = result.context("generating the flood")?;
    Ok((gen_dp, sent, busy))
}

/// The MAC address of `ifname` in `host`.
pub(crate) fn mac(host: &Host, ifname: &str) -> anyhow::Result<[u8; 6]> {
    Ok(host.mac(ifname)?)
}

/// An Ethernet + IPv4 + UDP frame the gateway's stack accepts (see
/// [`udp4_frame`]).
pub(crate) use mesh_agent::dataplane::flood::udp4_frame as wire_frame;

fn forwarding(ctx: &Ctx, results: &mut Results) -> anyhow::Result<()> {
    let (runs, secs) = if ctx.quick { (3, 1.0) } else { (5, 3.0) };
    let lab = forward_lab()?;
    lab.tx.route_via("198.18.20.0/24", "192.0.2.1")?;
    // The sender's route resolves the gateway's MAC; the gateway resolves
    // the receiver's while forwarding the ping.
    lab.tx.exec("ping", ["-c", "1", "-W", "2", "198.18.20.10"]).ok();
    let _gw_xdp = lab
        .gw
        .run(|| -> anyhow::Result<Dataplane> {
            let mut dp = Dataplane::load_unpinned()?;
            dp.attach_xdp_pass_through("eth0")?;
            Ok(dp)
        })
        .map_err(|e| anyhow!("{e}"))??;
    let (gw_mac, tx_mac) = (mac(&lab.gw, "eth0")?, mac(&lab.tx, "eth0")?);
    let mut gen_dp = generator(&lab.tx)?;
    for run in 0..runs {
        for n in RULE_COUNTS {
            let p = policy(n);
            let frame = wire_frame(gw_mac, tx_mac, node(n - 1), RECEIVER, PORT, &[0; 18]);
            for variant in ["none", "tc-empty", "ebpf-acl", "nft-rules", "nft-sets"] {
                let dp = match variant {
                    // The cost of a TC hook itself: the empty program where
                    // the ACL goes.
                    "tc-empty" => Some(
                        lab.gw
                            .run(move || -> anyhow::Result<Dataplane> {
                                let mut dp = Dataplane::load_unpinned()?;
                                dp.attach_pass_through("eth1")?;
                                Ok(dp)
                            })
                            .map_err(|e| anyhow!("{e}"))??,
                    ),
                    "ebpf-acl" => Some(
                        lab.gw
                            .run(move || -> anyhow::Result<Dataplane> {
                                let mut dp = Dataplane::load_unpinned()?;
                                dp.install_policy(&policy(n))?;
                                dp.attach_overlay("eth1")?;
                                Ok(dp)
                            })
                            .map_err(|e| anyhow!("{e}"))??,
                    ),
                    "nft-rules" => {
                        nft_load(&lab.gw, &nft_lines(&p))?;
                        None
                    }
                    "nft-sets" => {
                        nft_load(&lab.gw, &nft_set(&p))?;
                        None
                    }
                    _ => None,
                };
                let before = rx_packets(&lab.rx, "eth0")?;
                let (returned, sent, busy) = xdp_flood(&lab.tx, gen_dp, "eth0", frame.clone(), secs)?;
                gen_dp = returned;
                std::thread::sleep(Duration::from_millis(50));
                let got = (rx_packets(&lab.rx, "eth0")? - before) as f64 / busy;
                let offered = sent as f64 / busy;
                drop(dp);
                nft_flush(&lab.gw)?;
                results.push(variant, n, "kpps", got / 1e3, "kpps", run);
                results.push(variant, n, "offered_kpps", offered / 1e3, "kpps", run);
                ctx.progress(
                    "acl",
                    format!("run {run} {n} rules {variant}: {:.0} kpps of {:.0} offered", got / 1e3, offered / 1e3),
                );
            }
        }
    }
    Ok(())
}
