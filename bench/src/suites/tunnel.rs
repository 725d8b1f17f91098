//! `tunnel`: throughput through a WireGuard tunnel between two gateway
//! namespaces joined by a veth, per engine, in one run: iperf3 TCP with 1
//! and 4 streams in both directions, and UDP. Engines are started as
//! processes serving the standard UAPI socket and configured with `wg`, so
//! every engine is set up the same way; the plain veth is the ceiling.
//!
//! Our engine (`mesh-agent`, userspace backend) is configured the product's
//! way instead: a node view applied to a running agent.
//!
//! Figures: Gbit/s received, and Gbit/s per CPU-second of the engine
//! processes on both ends (how much crypto and copying each bit costs).

use std::{path::Path, process::Command, time::Duration};

use anyhow::{Context as _, bail};
use mesh_lab::{Host, Lab, Process};
use serde_json::Value;

use crate::{Ctx, Results, chart};

pub(crate) mod ours;

/// Our engine's variants: the default (every fast-path step on) and, to
/// show what each step brings in the same run, the steps turned off one
/// after the other (the agent's `udp_gso` and `tun_offload` settings).
const OURS: &[(&str, &str)] = &[
    ("mesh-agent", ""),
    ("mesh-agent-no-udp-gso", "udp_gso = false\n"),
    ("mesh-agent-plain", "udp_gso = false\ntun_offload = false\n"),
];

const SUITE: &str = "tunnel";
pub(crate) const LEFT_UNDERLAY: &str = "192.0.2.1";
pub(crate) const RIGHT_UNDERLAY: &str = "192.0.2.2";
const LEFT_OVERLAY: &str = "100.64.0.1";
pub(crate) const RIGHT_OVERLAY: &str = "100.64.0.2";
const WG_PORT: u16 = 51820;

/// A WireGuard engine under test: how to start it on an interface name.
#[derive(Debug, Clone, Copy)]
struct Engine {
    name: &'static str,
    /// Program (looked up on PATH) and its arguments before the interface
    /// name; the engine must stay in the foreground.
    program: &'static str,
    args: &'static [&'static str],
    env: &'static [(&'static str, &'static str)],
}

/// The baseline engines. The plain veth ("veth") is measured too.
const ENGINES: &[Engine] = &[
    Engine {
        name: "wireguard-go",
        program: "wireguard-go",
        args: &["-f"],
        // wireguard-go refuses to start where it believes the kernel has
        // WireGuard; we want it as a baseline regardless.
        env: &[("WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD", "1")],
    },
    Engine {
        name: "boringtun",
        program: "boringtun-cli",
        args: &["-f", "--disable-drop-privileges"],
        env: &[("WG_SUDO", "1")],
    },
    Engine { name: "gotatun", program: "gotatun", args: &["-f", "--disable-drop-privileges"], env: &[] },
];

/// One iperf3 measurement.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Load {
    pub(crate) param: &'static str,
    pub(crate) streams: u32,
    pub(crate) reverse: bool,
    pub(crate) udp: bool,
}

const LOADS: &[Load] = &[
    Load { param: "tcp1", streams: 1, reverse: false, udp: false },
    Load { param: "tcp4", streams: 4, reverse: false, udp: false },
    Load { param: "tcp1-rev", streams: 1, reverse: true, udp: false },
    Load { param: "tcp4-rev", streams: 4, reverse: true, udp: false },
    Load { param: "udp", streams: 1, reverse: false, udp: true },
];

/// Runs the suite.
pub fn run(ctx: &Ctx) -> anyhow::Result<Results> {
    let (runs, seconds) = if ctx.quick { (2, 3) } else { (5, 10) };
    let engines: Vec<Engine> = ENGINES.iter().copied().filter(|e| on_path(e.program)).collect();
    if let Some(missing) = ENGINES.iter().find(|e| !on_path(e.program)) {
        bail!("engine {} needs `{}` on PATH (cargo xtask bench installs it)", missing.name, missing.program);
    }
    let mut results = Results::new(SUITE, Some("gotatun"));
    results.higher_is_better("gbit_per_s", true);
    results.higher_is_better("gbit_per_cpu_s", true);

    let lab = Lab::new()?;
    let left = lab.host("left")?;
    let right = lab.host("right")?;
    lab.link(&left, "eth0", &right, "eth0")?;
    left.addr("eth0", &format!("{LEFT_UNDERLAY}/24"))?;
    right.addr("eth0", &format!("{RIGHT_UNDERLAY}/24"))?;

    for run in 0..runs {
        // Interleaved: every variant once per run, so drift shows as spread.
        ctx.progress(SUITE, format_args!("run {}/{runs}: veth", run + 1));
        measure(ctx, &left, &right, "veth", RIGHT_UNDERLAY, &[], seconds, run, &mut results)?;
        for &(name, knobs) in OURS {
            ctx.progress(SUITE, format_args!("run {}/{runs}: {name}", run + 1));
            let ours = ours::up(&lab, &left, &right, knobs)?;
            let pids = ours.sides.each_ref().map(|(_, _, side)| side.agent.pid());
            measure(ctx, &left, &right, name, RIGHT_OVERLAY, &pids, seconds, run, &mut results)?;
        }
        for engine in &engines {
            ctx.progress(SUITE, format_args!("run {}/{runs}: {}", run + 1, engine.name));
            let tunnel = Tunnel::up(&lab, &left, &right, engine)?;
            let pids = [tunnel.left.pid(), tunnel.right.pid()];
            measure(ctx, &left, &right, engine.name, RIGHT_OVERLAY, &pids, seconds, run, &mut results)?;
        }
    }
    let summaries = results.summaries();
    chart::bar_chart(&ctx.out.join("tunnel.svg"), "Tunnel throughput (median)", "gbit_per_s", &summaries)?;
    Ok(results)
}

#[expect(clippy::too_many_arguments, reason = "one call site; a struct would only rename them")]
fn measure(
    ctx: &Ctx,
    left: &Host,
    right: &Host,
    variant: &str,
    server_addr: &str,
    engine_pids: &[u32],
    seconds: u32,
    run: u32,
    results: &mut Results,
) -> anyhow::Result<()> {
    let _server = right.spawn("iperf3", ["-s", "-B", server_addr])?;
    wait_for_server(left, server_addr)?;
    for load in LOADS {
        let cpu_before: u64 = engine_pids.iter().map(|&p| cpu_ticks(p)).sum();
        let gbit = iperf3(left, server_addr, load, seconds).with_context(|| format!("{variant} {}", load.param))?;
        let cpu_after: u64 = engine_pids.iter().map(|&p| cpu_ticks(p)).sum();
        results.push(variant, load.param, "gbit_per_s", gbit, "Gbit/s", run);
        if !engine_pids.is_empty() {
            let cpu_s = (cpu_after - cpu_before) as f64 / ticks_per_second();
            if cpu_s > 0.0 {
                results.push(
                    variant,
                    load.param,
                    "gbit_per_cpu_s",
                    gbit * f64::from(seconds) / cpu_s,
                    "Gbit/CPU-s",
                    run,
                );
            }
        }
        ctx.progress(SUITE, format_args!("  {variant} {}: {gbit:.3} Gbit/s", load.param));
    }
    Ok(())
}

/// Two engine processes, configured into a tunnel.
struct Tunnel {
    left: Process,
    right: Process,
}

impl Tunnel {
    fn up(lab: &Lab, left: &Host, right: &Host, engine: &Engine) -> anyhow::Result<Self> {
        let (lif, rif) = (lab.unique_ifname("wgb"), lab.unique_ifname("wgb"));
        let lp = start_engine(left, engine, &lif)?;
        let rp = start_engine(right, engine, &rif)?;
        let (lkey, rkey) = (genkey()?, genkey()?);
        let (lpub, rpub) = (pubkey(&lkey)?, pubkey(&rkey)?);
        configure(left, &lif, &lkey, &rpub, RIGHT_OVERLAY, RIGHT_UNDERLAY, LEFT_OVERLAY)?;
        configure(right, &rif, &rkey, &lpub, LEFT_OVERLAY, LEFT_UNDERLAY, RIGHT_OVERLAY)?;
        wait_ping(left, RIGHT_OVERLAY).context("the tunnel does not pass a ping")?;
        Ok(Self { left: lp, right: rp })
    }
}

fn start_engine(host: &Host, engine: &Engine, ifname: &str) -> anyhow::Result<Process> {
    let mut command = host.command(engine.program, engine.args.iter().copied().chain([ifname]));
    command.envs(engine.env.iter().copied());
    command.stdout(std::process::Stdio::null()).stderr(std::process::Stdio::null());
    let process = host.spawn_command(command)?;
    let sock = format!("/var/run/wireguard/{ifname}.sock");
    for _ in 0..100 {
        if Path::new(&sock).exists() {
            return Ok(process);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!("{} did not create {sock}", engine.name)
}

fn configure(
    host: &Host,
    ifname: &str,
    key: &str,
    peer_pub: &str,
    peer_overlay: &str,
    peer_endpoint: &str,
    own_overlay: &str,
) -> anyhow::Result<()> {
    let keyfile = tempfile_with(key)?;
    host.exec(
        "wg",
        [
            "set",
            ifname,
            "private-key",
            keyfile.to_str().unwrap(),
            "listen-port",
            &WG_PORT.to_string(),
            "peer",
            peer_pub,
            "allowed-ips",
            &format!("{peer_overlay}/32"),
            "endpoint",
            &format!("{peer_endpoint}:{WG_PORT}"),
        ],
    )?;
    let _ = std::fs::remove_file(&keyfile);
    host.addr(ifname, &format!("{own_overlay}/24"))?;
    host.ip(&["link", "set", ifname, "mtu", "1420", "up"])?;
    Ok(())
}

pub(crate) fn iperf3(client: &Host, server: &str, load: &Load, seconds: u32) -> anyhow::Result<f64> {
    let mut args: Vec<String> =
        ["-c", server, "-J", "-t", &seconds.to_string(), "-P", &load.streams.to_string()].map(str::to_owned).to_vec();
    if load.reverse {
        args.push("-R".into());
    }
    if load.udp {
        // Unlimited rate, datagrams that fit the tunnel's MTU.
        args.extend(["-u", "-b", "0", "-l", "1372"].map(str::to_owned));
    }
    let out = client.exec("iperf3", &args)?;
    let json: Value = serde_json::from_slice(&out.stdout).context("iperf3 -J output")?;
    let end = &json["end"];
    let bps = if load.udp {
        // Received rate: what was sent minus what was lost.
        let sum = &end["sum"];
        sum["bits_per_second"].as_f64().unwrap_or(0.0) * (1.0 - sum["lost_percent"].as_f64().unwrap_or(0.0) / 100.0)
    } else {
        end["sum_received"]["bits_per_second"].as_f64().context("iperf3: no sum_received")?
    };
    Ok(bps / 1e9)
}

/// Pings until a reply, for up to ~20 s: the first handshake initiation
/// may reach the peer before its socket is bound (then WireGuard retries
/// only after 5 s), more so on a loaded machine.
pub(super) fn wait_ping(host: &Host, addr: &str) -> anyhow::Result<()> {
    for _ in 0..10 {
        if host.exec_unchecked("ping", ["-c1", "-W2", addr])?.status.success() {
            return Ok(());
        }
    }
    bail!("no reply from {addr} through the tunnel")
}

pub(crate) fn wait_for_server(client: &Host, server: &str) -> anyhow::Result<()> {
    for _ in 0..100 {
        let out = client.exec_unchecked("bash", ["-c", &format!("exec 3<>/dev/tcp/{server}/5201")])?;
        if out.status.success() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!("iperf3 server on {server} did not start")
}

fn genkey() -> anyhow::Result<String> {
    let out = crate::util::capture(Command::new("wg").arg("genkey"))?;
    Ok(out.trim().to_owned())
}

fn pubkey(private: &str) -> anyhow::Result<String> {
    use std::io::Write as _;
    let mut child = Command::new("wg")
        .arg("pubkey")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()?;
    child.stdin.take().unwrap().write_all(private.as_bytes())?;
    let out = child.wait_with_output()?;
    Ok(String::from_utf8(out.stdout)?.trim().to_owned())
}

fn tempfile_with(content: &str) -> anyhow::Result<std::path::PathBuf> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let path = std::env::temp_dir().join(format!("mesh-bench-key-{}-{}", std::process::id(), rand_suffix()));
    let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&path)?;
    std::io::Write::write_all(&mut f, content.as_bytes())?;
    Ok(path)
}

fn rand_suffix() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

fn on_path(program: &str) -> bool {
    std::env::var_os("PATH").is_some_and(|paths| std::env::split_paths(&paths).any(|dir| dir.join(program).is_file()))
}

/// utime + stime of a process, in clock ticks (0 once it is gone).
pub(crate) fn cpu_ticks(pid: u32) -> u64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { return 0 };
    // Fields after the command name, which is in parentheses and may hold spaces.
    let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else { return 0 };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line: 12 and 13 here.
    let field = |i: usize| fields.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    field(11) + field(12)
}

pub(crate) fn ticks_per_second() -> f64 {
    match nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK) {
        Ok(Some(t)) if t > 0 => t as f64,
        _ => 100.0,
    }
}
