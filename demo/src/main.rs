//! The demo lab: sites joined by gateways, real traffic, the data path's
//! counters. `--check` turns every expectation into a pass/fail and exits
//! non-zero on the first failure; without it the lab stays up until Ctrl-C.

use anyhow::{Context as _, ensure};
use clap::Parser;
use mesh_agent::dataplane::{Counter, CounterAttach};
use mesh_common::counter::CounterSlot;
use mesh_lab::{Host, Lab};

#[derive(Parser, Debug)]
#[command(about = "Bring up the mesh demo lab")]
struct Args {
    /// Check the expectations and exit instead of waiting for Ctrl-C.
    #[arg(long)]
    check: bool,
}

/// One site: its LAN, gateway and hosts.
struct Site {
    name: &'static str,
    lan: &'static str,
    gw_lan: &'static str,
    gw_wan: &'static str,
    host_addr: &'static str,
}

const SITES: [Site; 2] = [
    Site { name: "nyc", lan: "198.18.10.0/24", gw_lan: "198.18.10.1", gw_wan: "192.0.2.10", host_addr: "198.18.10.10" },
    Site { name: "fsn", lan: "198.18.20.0/24", gw_lan: "198.18.20.1", gw_wan: "192.0.2.20", host_addr: "198.18.20.20" },
];

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    tracing_subscriber::fmt().with_env_filter(tracing_subscriber::EnvFilter::from_default_env()).init();

    let lab = Lab::new()?;
    let internet = lab.switch("internet")?;
    let mut gateways = Vec::new();
    let mut hosts = Vec::new();
    for site in &SITES {
        let lan = lab.switch(&format!("{}_lan", site.name))?;
        let gw = lab.host(&format!("gw_{}", site.name))?;
        let host = lab.host(&format!("app_{}", site.name))?;
        internet.plug(&gw, "wan0")?;
        lan.plug(&gw, "lan0")?;
        lan.plug(&host, "eth0")?;
        gw.addr("wan0", &format!("{}/24", site.gw_wan))?;
        gw.addr("lan0", &format!("{}/24", site.gw_lan))?;
        gw.forwarding()?;
        host.addr("eth0", &format!("{}/24", site.host_addr))?;
        gateways.push(gw);
        hosts.push((host, lan));
    }
    // Each site reaches the other through its gateway.
    for (i, site) in SITES.iter().enumerate() {
        let other = &SITES[1 - i];
        gateways[i].route_via(other.lan, other.gw_wan)?;
        hosts[i].0.route_via(other.lan, site.gw_lan)?;
    }

    let nyc_gw = &gateways[0];
    let (rx, tx) = attach_counters(nyc_gw)?;
    const PINGS: u64 = 5;
    let out = hosts[0].0.exec("ping", ["-c", &PINGS.to_string(), "-i", "0.05", "-W", "2", SITES[1].host_addr])?;
    let ping = String::from_utf8_lossy(&out.stdout);
    let summary = ping.lines().rev().find(|l| l.contains("rtt") || l.contains("round-trip")).unwrap_or("");

    let ingress = rx.totals()?[CounterSlot::Ipv4 as usize];
    let egress = tx.totals()?[CounterSlot::Ipv4 as usize];
    println!("mesh demo lab {}: sites nyc {} and fsn {} joined by their gateways", lab.id(), SITES[0].lan, SITES[1].lan);
    println!();
    println!("| check | expected | seen |");
    println!("|---|---|---|");
    println!("| ping app_nyc -> app_fsn | {PINGS} replies | ok ({summary}) |");
    println!("| gw_nyc wan0 egress IPv4 packets (TC) | {PINGS} | {} |", egress.packets);
    println!("| gw_nyc wan0 ingress IPv4 packets (XDP) | {PINGS} | {} |", ingress.packets);
    ensure!(egress.packets == PINGS, "TC egress counted {} IPv4 packets, expected {PINGS}", egress.packets);
    ensure!(ingress.packets == PINGS, "XDP ingress counted {} IPv4 packets, expected {PINGS}", ingress.packets);

    if args.check {
        println!("\ndemo check passed");
        return Ok(());
    }
    println!("\nThe lab stays up; explore it, e.g.:");
    for h in gateways.iter().chain(hosts.iter().map(|(h, _)| h)) {
        println!("  ip netns exec {} ip -br addr", h.netns());
    }
    println!("Ctrl-C tears it down.");
    wait_for_signal()?;
    println!("tearing down");
    Ok(())
}

/// XDP on ingress and TC on egress of the gateway's WAN interface.
fn attach_counters(gw: &Host) -> anyhow::Result<(Counter, Counter)> {
    let attach = |at| {
        gw.run(move || -> anyhow::Result<Counter> {
            let mut c = Counter::load()?;
            c.attach("wan0", at)?;
            Ok(c)
        })
    };
    let rx = attach(CounterAttach::Xdp)?.context("XDP counter on gw_nyc")?;
    let tx = attach(CounterAttach::TcEgress)?.context("TC counter on gw_nyc")?;
    Ok((rx, tx))
}

fn wait_for_signal() -> anyhow::Result<()> {
    use nix::sys::signal::{SigSet, Signal};
    let mut set = SigSet::empty();
    set.add(Signal::SIGINT);
    set.add(Signal::SIGTERM);
    set.thread_block()?;
    set.wait()?;
    Ok(())
}
