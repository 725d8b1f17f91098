//! Checks of what operators deploy beside the binaries: the Kubernetes
//! manifests (`deploy/k8s/`), the gateway's nftables baseline
//! (`deploy/nftables/`) and the Prometheus rules and Grafana dashboard
//! (`deploy/monitoring/`). Each is a stage of `cargo xtask test`;
//! `cargo xtask deploy-check` runs them alone.

mod monitoring;

use std::{
    net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    path::Path,
    process::Command,
    time::Duration,
};

use anyhow::{Context as _, bail, ensure};

use crate::cmd::{self, workspace_root};

/// Options of `cargo xtask deploy-check`.
#[derive(clap::Args, Debug)]
pub(crate) struct Args {}

/// `cargo xtask deploy-check`: the deploy stages, failing on the first.
pub(crate) fn main(_args: &Args) -> anyhow::Result<()> {
    crate::setup::run()?;
    k8s().context("k8s manifests")?;
    nftables().context("nftables baseline")?;
    monitoring().context("monitoring rules")?;
    eprintln!("xtask: deploy checks passed");
    Ok(())
}

/// Validates every manifest in `deploy/k8s/` against the Kubernetes API
/// schemas and the project's own properties (`deploy/k8s/validate/validate.mjs`,
/// which also proves it rejects broken objects).
pub(crate) fn k8s() -> anyhow::Result<()> {
    let dir = workspace_root().join("deploy/k8s/validate");
    npm_ci(&dir)?;
    cmd::run(Command::new("node").arg("validate.mjs").current_dir(&dir))
}

/// `npm ci` when the installed packages are not those of the lock file: the
/// first run downloads them, later runs cost nothing.
fn npm_ci(dir: &Path) -> anyhow::Result<()> {
    let lock = std::fs::read(dir.join("package-lock.json")).context("reading deploy/k8s/validate/package-lock.json")?;
    let stamp = dir.join("node_modules/.meshgate-lock");
    if std::fs::read(&stamp).is_ok_and(|s| s == lock) {
        return Ok(());
    }
    cmd::run(Command::new("npm").args(["ci", "--no-audit", "--no-fund"]).current_dir(dir))?;
    std::fs::write(&stamp, lock).with_context(|| format!("writing {}", stamp.display()))
}

/// Checks `deploy/monitoring/` with promtool (rules, their unit tests, the
/// example scrape configuration), proves every alert has a firing and a
/// non-firing test, and that the rules and the dashboard name only real or
/// recorded series.
pub(crate) fn monitoring() -> anyhow::Result<()> {
    monitoring::check(&workspace_root().join("deploy/monitoring"))
}

/// The test's underlay: TEST-NET-1 and a documentation /64, on a veth
/// between two namespaces this check creates. Neither namespace has any
/// other interface or a default route, so no packet can leave them.
const SERVER4: &str = "192.0.2.1";
const CLIENT4: &str = "192.0.2.2";
const SERVER6: &str = "2001:db8:ffff::1";
const CLIENT6: &str = "2001:db8:ffff::2";

/// Loads `deploy/nftables/gateway-underlay.nft` (then `control-host.nft`)
/// in a fresh namespace and sends real packets at it from another one:
/// WireGuard UDP and SSH pass, other TCP and UDP are dropped (timeouts, and
/// the drop counter moves), ping and IPv6 neighbour discovery work, and
/// control's port opens only with the control host's file.
pub(crate) fn nftables() -> anyhow::Result<()> {
    let lab = Lab::new()?;
    let (s, c) = (lab.server.as_str(), lab.client.as_str());

    // Listeners on the "gateway", created inside its namespace (a socket
    // stays in the namespace it was made in, whichever thread uses it).
    let server = in_netns(s, || -> anyhow::Result<_> {
        let udp = |ip: &str, port| UdpSocket::bind(SocketAddr::new(ip.parse()?, port)).context("binding UDP");
        let tcp = |port| TcpListener::bind((SERVER4, port)).with_context(|| format!("listening on {port}"));
        Ok((udp(SERVER4, 51820)?, udp(SERVER6, 51820)?, udp(SERVER4, 5353)?, tcp(22)?, tcp(8080)?, tcp(7443)?))
    })??;
    let (wg4, wg6, other_udp, _ssh, _http, _control) = server;

    // Without the ruleset everything connects: what the ruleset drops
    // later is dropped by it, not by a broken lab.
    tcp_connect(c, SERVER4, 8080).context("TCP 8080 before the ruleset")?;

    let base = workspace_root().join("deploy/nftables");
    let nft_file = |file: &str| -> anyhow::Result<()> {
        cmd::run(Command::new("ip").args(["netns", "exec", s, "nft", "-f"]).arg(base.join(file)))
    };
    nft_file("gateway-underlay.nft")?;
    // Loading twice must replace, not duplicate (operators reload it).
    nft_file("gateway-underlay.nft")?;
    let ruleset = output(Command::new("ip").args(["netns", "exec", s, "nft", "list", "ruleset"]))?;
    for want in ["table inet mesh_underlay", "policy drop", "udp dport 51820 accept", "packet-too-big", "tcp dport 22"]
    {
        ensure!(ruleset.contains(want), "`nft list ruleset` lacks {want:?}:\n{ruleset}");
    }
    ensure!(ruleset.matches("table inet mesh_underlay").count() == 1, "reloading duplicated the table:\n{ruleset}");

    ping(c, SERVER4)?;
    // The first IPv6 packet needs neighbour discovery through the ruleset.
    ping(c, SERVER6)?;
    udp_arrives(c, &wg4, SERVER4, 51820).context("WireGuard over IPv4")?;
    udp_arrives(c, &wg6, SERVER6, 51820).context("WireGuard over IPv6")?;
    tcp_connect(c, SERVER4, 22).context("SSH")?;

    let drops_before = drop_count(s)?;
    tcp_dropped(c, SERVER4, 8080)?;
    tcp_dropped(c, SERVER4, 7443).context("control's port on a gateway")?;
    udp_dropped(c, &other_udp, SERVER4, 5353)?;
    let drops = drop_count(s)? - drops_before;
    ensure!(drops >= 3, "the ruleset's drop counter moved by {drops}, expected at least 3 (two SYNs and a datagram)");

    nft_file("control-host.nft")?;
    tcp_connect(c, SERVER4, 7443).context("control's port on the control host")?;
    tcp_dropped(c, SERVER4, 8080).context("8080 on the control host")?;
    eprintln!(
        "xtask: nftables baseline: UDP 51820 (v4, v6), SSH, ping and ND pass; TCP 8080, TCP 7443 (until control-host.nft) and UDP 5353 are dropped"
    );
    Ok(())
}

/// Two namespaces joined by a veth, deleted on drop (a failed check too).
struct Lab {
    server: String,
    client: String,
}

impl Lab {
    fn new() -> anyhow::Result<Self> {
        let pid = std::process::id();
        let lab = Self { server: format!("hops-nft-{pid}-gw"), client: format!("hops-nft-{pid}-peer") };
        let (s, c) = (lab.server.as_str(), lab.client.as_str());
        let ip = |args: &[&str]| cmd::run(Command::new("ip").args(args));
        ip(&["netns", "add", s])?;
        ip(&["netns", "add", c])?;
        // Created inside the namespaces: the host's own stack never sees it.
        let (vs, vc) = (format!("hnft{pid}s"), format!("hnft{pid}c"));
        ip(&["link", "add", &vs, "netns", s, "type", "veth", "peer", "name", &vc, "netns", c])?;
        // The ruleset names the underlay eth0; names are per namespace.
        ip(&["-n", s, "link", "set", &vs, "name", "eth0"])?;
        for (ns, dev, v4, v6) in [(s, "eth0", SERVER4, SERVER6), (c, vc.as_str(), CLIENT4, CLIENT6)] {
            ip(&["-n", ns, "addr", "add", &format!("{v4}/24"), "dev", dev])?;
            ip(&["-n", ns, "addr", "add", &format!("{v6}/64"), "dev", dev, "nodad"])?;
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
            ip(&["-n", ns, "link", "set", dev, "up"])?;
        }
        Ok(lab)
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for ns in [&self.server, &self.client] {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

/// Runs `f` on a thread that has joined namespace `ns` (network namespaces
/// are per thread; the caller's thread stays where it is).
fn in_netns<T: Send>(ns: &str, f: impl FnOnce() -> T + Send) -> anyhow::Result<T> {
    let path = format!("/run/netns/{ns}");
    let file = std::fs::File::open(&path).with_context(|| format!("opening {path}"))?;
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                use std::os::fd::AsRawFd as _;
                // SAFETY: setns on a valid namespace fd; it only changes this
                // thread's network namespace.
                if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    return Err(anyhow::anyhow!("setns({path}): {}", std::io::Error::last_os_error()));
                }
                Ok(f())
            })
            .join()
            .map_err(|_| anyhow::anyhow!("the thread in {ns} panicked"))?
    })
}

/// How long a packet that passes may take, and how long one that is
/// dropped is waited for: a veth delivers in microseconds.
const WAIT: Duration = Duration::from_secs(1);

fn addr(ip: &str, port: u16) -> SocketAddr {
    SocketAddr::new(ip.parse::<IpAddr>().expect("a constant address"), port)
}

fn tcp_connect(ns: &str, ip: &str, port: u16) -> anyhow::Result<()> {
    in_netns(ns, || TcpStream::connect_timeout(&addr(ip, port), WAIT))?
        .with_context(|| format!("TCP {ip}:{port} should connect"))?;
    Ok(())
}

/// A connection the ruleset drops times out; a refusal (RST) would mean the
/// SYN reached the stack, i.e. the ruleset let it through.
fn tcp_dropped(ns: &str, ip: &str, port: u16) -> anyhow::Result<()> {
    match in_netns(ns, || TcpStream::connect_timeout(&addr(ip, port), WAIT))? {
        Ok(_) => bail!("TCP {ip}:{port} connected; the ruleset should drop it"),
        Err(e) if e.kind() == std::io::ErrorKind::TimedOut => Ok(()),
        Err(e) => bail!("TCP {ip}:{port}: {e}; expected a timeout (dropped)"),
    }
}

fn send_datagram(ns: &str, ip: &str, port: u16, payload: &[u8]) -> anyhow::Result<()> {
    let target = addr(ip, port);
    let unspecified: SocketAddr = if target.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }.parse()?;
    let sock = in_netns(ns, || UdpSocket::bind(unspecified))??;
    sock.send_to(payload, target).with_context(|| format!("sending to {target}"))?;
    Ok(())
}

fn udp_arrives(ns: &str, listener: &UdpSocket, ip: &str, port: u16) -> anyhow::Result<()> {
    let payload = format!("hops {ip} {port}");
    send_datagram(ns, ip, port, payload.as_bytes())?;
    listener.set_read_timeout(Some(WAIT))?;
    let mut buf = [0u8; 64];
    let (n, _) = listener.recv_from(&mut buf).with_context(|| format!("UDP to {ip}:{port} did not arrive"))?;
    ensure!(&buf[..n] == payload.as_bytes(), "UDP to {ip}:{port}: got {:?}", &buf[..n]);
    Ok(())
}

fn udp_dropped(ns: &str, listener: &UdpSocket, ip: &str, port: u16) -> anyhow::Result<()> {
    send_datagram(ns, ip, port, b"should be dropped")?;
    listener.set_read_timeout(Some(WAIT))?;
    let mut buf = [0u8; 64];
    match listener.recv_from(&mut buf) {
        Ok(_) => bail!("UDP to {ip}:{port} arrived; the ruleset should drop it"),
        Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => Ok(()),
        Err(e) => bail!("UDP to {ip}:{port}: {e}"),
    }
}

fn ping(ns: &str, ip: &str) -> anyhow::Result<()> {
    cmd::run(Command::new("ip").args(["netns", "exec", ns, "ping", "-q", "-c", "1", "-W", "2", ip]))
        .with_context(|| format!("ping {ip}"))
}

/// Packets counted by the final `counter drop` of the underlay chain.
fn drop_count(ns: &str) -> anyhow::Result<u64> {
    let chain = output(Command::new("ip").args([
        "netns",
        "exec",
        ns,
        "nft",
        "list",
        "chain",
        "inet",
        "mesh_underlay",
        "underlay_in",
    ]))?;
    chain
        .lines()
        .find(|l| l.contains("counter") && l.trim_end().ends_with("drop"))
        .and_then(|l| l.split_whitespace().skip_while(|w| *w != "packets").nth(1))
        .and_then(|n| n.parse().ok())
        .with_context(|| format!("no `counter ... drop` in the underlay chain:\n{chain}"))
}

fn output(command: &mut Command) -> anyhow::Result<String> {
    let line = cmd::describe(command);
    let out = command.output().with_context(|| format!("could not start `{line}`"))?;
    ensure!(out.status.success(), "`{line}` failed: {}", String::from_utf8_lossy(&out.stderr));
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
