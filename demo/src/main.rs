//! The demo lab: three regions (nyc, fsn, gra) with two gateways each and
//! an app and a db host on each dual-stack site LAN, one mesh-control. The
//! gateways enroll with an enrollment key, their site routes (an IPv4 /24
//! and an IPv6 /64 per site) are approved by the policy's `autoApprovers`,
//! a default-deny policy allows app -> db on TCP 5432 and ICMP between
//! sites (enforced by the eBPF ACL on every gateway), and the smoke test
//! runs from the app hosts. The site hosts route the mesh through their
//! site's virtual gateway addresses (.254 and ::254), which the site's
//! owning gateway holds. `--check` then runs the HA check (`ha`) and exits
//! non-zero if an expectation fails; without it the lab stays up until
//! Ctrl-C.
//!
//! It runs the shipped binaries with the files an operator writes: `mesh-control
//! serve --config control.toml` in the `ctl` namespace, `mesh-agent run
//! --config agent.toml` in each gateway namespace, `meshctl` to create the
//! enrollment key and apply `demo/policy.hujson`. Each machine's files sit
//! under its own directory in the packages' layout (see [`control::Root`]).

mod ca;
mod control;
mod flood;
mod ha;
mod hostile;
mod relay;
mod rotate;
mod smoke;
mod web;

use std::{
    fs::File,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Stdio,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};
use mesh_lab::{Host, Lab, Process};
use mesh_proto::v1 as pb;

#[derive(Parser, Debug)]
#[command(about = "Bring up the mesh demo lab")]
struct Args {
    /// Check the expectations and exit instead of waiting for Ctrl-C.
    #[arg(long)]
    check: bool,
    #[command(subcommand)]
    cmd: Option<Cmd>,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Flood control with wrong enrollment keys (what the demo's `mallory`
    /// host runs), then print the answers' counts.
    Flood {
        /// Control's gRPC address.
        #[arg(long)]
        addr: String,
        /// SHA-256 pin of control's CA (hex).
        #[arg(long)]
        pin: String,
        /// How long to flood.
        #[arg(long, default_value_t = 4)]
        secs: u64,
    },
}

/// One region.
#[derive(Debug)]
struct Region {
    name: &'static str,
    /// Third octet of the site LAN 198.18.X.0/24 (and X of the gateways'
    /// underlay addresses 192.0.2.X1 / .X2).
    octet: u8,
}

const REGIONS: [Region; 3] =
    [Region { name: "nyc", octet: 10 }, Region { name: "fsn", octet: 20 }, Region { name: "gra", octet: 30 }];

impl Region {
    fn lan(&self) -> String {
        format!("198.18.{}.0/24", self.octet)
    }
    fn lan6(&self) -> String {
        format!("2001:db8:{}::/64", self.octet)
    }
    fn app(&self) -> String {
        format!("198.18.{}.10", self.octet)
    }
    fn app6(&self) -> String {
        format!("2001:db8:{}::10", self.octet)
    }
    fn db(&self) -> String {
        format!("198.18.{}.20", self.octet)
    }
    fn db6(&self) -> String {
        format!("2001:db8:{}::20", self.octet)
    }
    /// The site's virtual gateway addresses.
    fn vip(&self) -> String {
        format!("198.18.{}.254", self.octet)
    }
    fn vip6(&self) -> String {
        format!("2001:db8:{}::254", self.octet)
    }
}

/// The demo's policy, a file in the repository.
fn policy_file() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("policy.hujson")
}

/// A gateway: its namespace, overlay interface, files and agent process.
#[derive(Debug)]
struct Gateway {
    name: String,
    region: usize,
    host: Host,
    ifname: String,
    /// Its files, in the packages' layout.
    root: control::Root,
    agent: Option<Process>,
    /// Its IPv6 LAN address (the kernel flushes IPv6 addresses when a link
    /// goes down, so a revived gateway gets it again, as a rebooted one would).
    lan6: String,
}

impl Gateway {
    fn config(&self) -> PathBuf {
        self.root.etc().join("agent.toml")
    }

    fn key_file(&self) -> PathBuf {
        self.root.etc().join("enroll.key")
    }

    fn state_dir(&self) -> PathBuf {
        self.root.var_lib("mesh-agent")
    }

    fn log(&self) -> PathBuf {
        self.root.log("mesh-agent")
    }

    fn start(&mut self) -> anyhow::Result<()> {
        let log = File::options().create(true).append(true).open(self.log())?;
        let exe = control::bin("mesh-agent")?;
        let mut cmd = self.host.command(
            exe.to_str().context("mesh-agent's path")?,
            ["run", "--config", self.config().to_str().context("path")?],
        );
        cmd.stdin(Stdio::null()).stdout(log.try_clone()?).stderr(log);
        self.agent = Some(self.host.spawn_command(cmd)?);
        Ok(())
    }

    /// Kills the agent (SIGKILL: nothing is cleaned up) and takes the
    /// gateway's links down, as a machine that dies would.
    fn kill(&mut self) -> anyhow::Result<()> {
        if let Some(mut a) = self.agent.take() {
            a.child().kill()?;
            let _ = a.child().wait();
        }
        self.host.down("eth0")?;
        self.host.down("lan0")?;
        Ok(())
    }

    /// Brings the links back and starts the agent again.
    fn revive(&mut self) -> anyhow::Result<()> {
        self.host.up("eth0")?;
        self.host.up("lan0")?;
        self.host.addr("lan0", &self.lan6)?;
        self.start()
    }
}

/// bpffs mounted outside /sys (`ip netns exec` remounts /sys, hiding pins
/// under /sys/fs/bpf from the agents); unmounted on drop.
#[derive(Debug)]
struct BpfFs(tempfile::TempDir);

impl BpfFs {
    fn mount() -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new().prefix("mesh-demo-bpf").tempdir()?;
        let out = std::process::Command::new("mount").args(["-t", "bpf", "bpf"]).arg(dir.path()).output()?;
        if !out.status.success() {
            bail!("mount -t bpf: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(Self(dir))
    }
}

impl Drop for BpfFs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(self.0.path()).status();
    }
}

/// The `agent.toml` of a lab gateway: what an operator writes for a
/// gateway (see deploy/config/agent.toml), with the lab's addresses.
fn agent_config(gw: &Gateway, bpf: &Path, underlay: &str, r: &Region) -> String {
    format!(
        "# mesh-agent on {name} in the demo lab (see deploy/config/agent.toml for every key).\n\
         interface = \"{ifname}\"\nbackend = \"userspace\"\nlisten_port = 51820\nstate_dir = \"{state}\"\n\
         enforcement = \"ebpf\"\nbpf_pin_dir = \"{bpf}\"\nkeep_dataplane_on_exit = false\n\
         underlay_interface = \"eth0\"\n\
         reconcile_interval_secs = 5\nretry_interval_secs = 0.5\nlog = \"info\"\n\
         metrics_listen = \"127.0.0.1:9300\"\n\
         [control]\naddress = \"{ctl}\"\nenrollment_key_file = \"{key}\"\nhostname = \"{name}\"\n\
         advertise_routes = [\"{lan}\", \"{lan6}\"]\nendpoints = [\"{underlay}:51820\"]\nhealth_interval_secs = 2\n\
         max_backoff_secs = 1\npersistent_keepalive = 10\n\
         [control.route_options.\"{lan}\"]\nvirtual_addresses = [\"{vip}\"]\n\
         [control.route_options.\"{lan6}\"]\nvirtual_addresses = [\"{vip6}\"]\n",
        lan = r.lan(),
        lan6 = r.lan6(),
        vip = r.vip(),
        vip6 = r.vip6(),
        ifname = gw.ifname,
        state = gw.state_dir().display(),
        bpf = bpf.display(),
        ctl = control::ADDRESS,
        key = gw.key_file().display(),
        name = gw.name,
    )
}

fn wait_for(what: &str, timeout: Duration, f: impl FnMut() -> bool) -> anyhow::Result<()> {
    mesh_lab::wait_for(what, timeout, f)?;
    Ok(())
}

/// The gateways' probe RTT medians (ms) as a matrix, from control's status.
fn print_probe_matrix(links: &[pb::PeerLink]) {
    let mut names: Vec<&str> = links.iter().flat_map(|l| [l.from_name.as_str(), l.to_name.as_str()]).collect();
    names.sort_unstable();
    names.dedup();
    println!("gateway probe RTT p50 in ms (row probes column; from the agents' reports to control):");
    print!("{:<9}", "");
    for n in &names {
        print!(" {n:>8}");
    }
    println!();
    for from in &names {
        print!("{from:<9}");
        for to in &names {
            let cell = links
                .iter()
                .find(|l| l.from_name == *from && l.to_name == *to)
                .and_then(|l| l.health.as_ref())
                .map_or_else(|| "-".to_owned(), |h| format!("{:.2}", h.probe_rtt_p50_ms));
            print!(" {cell:>8}");
        }
        println!();
    }
    println!();
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let result = match &args.cmd {
        Some(Cmd::Flood { addr, pin, secs }) => hostile::flood(addr, pin, *secs),
        None => demo(&args),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mesh-demo: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// One line of the summary table.
#[derive(Debug)]
struct Row {
    from: &'static str,
    to: &'static str,
    path: String,
    p50: f64,
    p95: f64,
    loss: f64,
    db_5432: bool,
    db_22: bool,
}

#[expect(clippy::too_many_lines, reason = "the demo's script, step by step")]
fn demo(args: &Args) -> anyhow::Result<()> {
    let started = Instant::now();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let lab = Lab::new()?;
    let work = tempfile::Builder::new().prefix("mesh-demo").tempdir()?;
    println!("== building the lab: 3 regions x (2 gateways, app, db) + control");
    let ctl = lab.host("ctl")?;
    let wan = lab.switch("wan")?;
    wan.plug(&ctl, "eth0")?;
    ctl.addr("eth0", "192.0.2.100/24")?;
    // A stranger on the WAN: it floods control with wrong enrollment keys.
    let mallory = lab.host("mallory")?;
    wan.plug(&mallory, "eth0")?;
    mallory.addr("eth0", "192.0.2.200/24")?;
    // The relay gateways fall back to, on the WAN.
    let relay_host = lab.host("relay")?;
    wan.plug(&relay_host, "eth0")?;
    relay_host.addr("eth0", "192.0.2.50/24")?;
    let mut gateways = Vec::new();
    let mut apps = Vec::new();
    let mut dbs = Vec::new();
    for (ri, r) in REGIONS.iter().enumerate() {
        let lan = lab.switch(&format!("lan{}", r.name))?;
        for n in 1..=2u8 {
            let name = format!("{}_gw{n}", r.name);
            let host = lab.host(&name)?;
            wan.plug(&host, "eth0")?;
            host.addr("eth0", &format!("192.0.2.{}{n}/24", r.octet / 10))?;
            lan.plug(&host, "lan0")?;
            host.addr("lan0", &format!("198.18.{}.{n}/24", r.octet))?;
            let lan6 = format!("2001:db8:{}::{n}/64", r.octet);
            host.addr("lan0", &lan6)?;
            let root = control::Root(work.path().join(&name));
            for dir in [root.etc(), root.0.join("var/log")] {
                std::fs::create_dir_all(dir)?;
            }
            gateways.push(Gateway { name, region: ri, host, ifname: lab.unique_ifname("wg"), root, agent: None, lan6 });
        }
        for (role, addr, addr6, list) in [("app", r.app(), r.app6(), &mut apps), ("db", r.db(), r.db6(), &mut dbs)] {
            let h = lab.host(&format!("{}_{role}", r.name))?;
            lan.plug(&h, "eth0")?;
            h.addr("eth0", &format!("{addr}/24"))?;
            h.addr("eth0", &format!("{addr6}/64"))?;
            // The site's virtual gateway addresses are the LAN's way to the
            // other sites: whichever gateway owns the site holds them.
            h.route_via("198.18.0.0/16", &r.vip())?;
            h.route_via("2001:db8::/32", &r.vip6())?;
            list.push(h);
        }
    }
    for (r, db) in REGIONS.iter().zip(&dbs) {
        let addrs = [5432, 22]
            .iter()
            .flat_map(|p| [format!("{}:{p}", r.db()), format!("[{}]:{p}", r.db6())])
            .map(|a| a.parse())
            .collect::<Result<Vec<SocketAddr>, _>>()?;
        mesh_lab::traffic::echo_servers(db, &addrs)?;
    }

    let policy = policy_file();
    let policy_text =
        std::fs::read_to_string(&policy).with_context(|| format!("reading the demo's policy {}", policy.display()))?;
    println!("== mesh-control, mesh-agent and meshctl from {}", control::bin_dir()?.display());
    println!("== mesh-control serve --config {}", work.path().join("ctl/etc/mesh/control.toml").display());
    println!("== mesh-relay --print-pin: the relay's certificate, which control's [[relays]] entry pins");
    let (mut relay, pin) = relay::Relay::prepare(control::Root(work.path().join("relay")))?;
    let control =
        rt.block_on(control::start(&ctl, control::Root(work.path().join("ctl")), &relay::Relay::control_toml(&pin)))?;
    // The relay trusts tickets signed with control's key.
    let ticket_key = control.relay_key()?;
    println!("== mesh-relay --config relay.toml on {} (control's ticket key {ticket_key})", relay::ADDRESS);
    relay.start(&relay_host, &ticket_key)?;
    let p = policy.to_str().context("policy path")?;
    println!("== meshctl policy check {p} (offline), then meshctl policy apply");
    print!("  {}", control.meshctl(["policy", "check", p])?);
    print!("  {}", control.meshctl(["policy", "apply", p])?);
    let key = control.meshctl([
        "--json",
        "keys",
        "create",
        "--reusable",
        "--preapproved",
        "--tag",
        "tag:gw",
        "--expires",
        "1h",
        "--description",
        "demo gateways",
    ])?;
    let key: serde_json::Value = serde_json::from_str(&key).context("meshctl keys create --json")?;
    let key = key["secret"].as_str().context("no secret from meshctl keys create")?.to_owned();

    let bpf = BpfFs::mount()?;
    println!("== enrolling 6 gateways with one enrollment key (eBPF enforcement, userspace WireGuard)");
    // First gateways first, so they are the primaries (and priorities say so too).
    for n in [1u8, 2] {
        for gw in gateways.iter_mut().filter(|g| g.name.ends_with(&format!("gw{n}"))) {
            let r = &REGIONS[gw.region];
            let underlay = format!("192.0.2.{}{n}", r.octet / 10);
            // One key file per gateway: each agent removes its own once enrolled
            // (0600, or the agent refuses it).
            mesh_local::secret_file::write(&gw.key_file(), key.as_bytes())?;
            std::fs::write(gw.config(), agent_config(gw, bpf.0.path(), &underlay, r))?;
            gw.start()?;
        }
        let want = 6 * usize::from(n);
        wait_for("routes at control", Duration::from_secs(30), || {
            rt.block_on(async {
                let mut a = control::admin(&control).await.ok()?;
                Some(a.list_routes(pb::Empty {}).await.ok()?.into_inner().routes.len())
            }) == Some(want)
        })?;
    }
    // The first gateway of each site is preferred: `meshctl routes priority`.
    for r in rt
        .block_on(async { anyhow::Ok(control::admin(&control).await?.list_routes(pb::Empty {}).await?.into_inner()) })?
        .routes
    {
        let priority = if r.node_name.ends_with("gw1") { "0" } else { "10" };
        control.meshctl(["routes", "priority", &r.node_id.to_string(), &r.prefix, priority])?;
    }
    let routes = rt.block_on(async {
        anyhow::Ok(control::admin(&control).await?.list_routes(pb::Empty {}).await?.into_inner().routes)
    })?;
    let ok = std::cell::Cell::new(true);
    let check = |what: &str, pass: bool| {
        println!("  [{}] {what}", if pass { "ok" } else { "FAIL" });
        ok.set(ok.get() && pass);
    };
    check(
        "every site route (IPv4 and IPv6) approved by autoApprovers",
        routes.len() == 12 && routes.iter().all(|r| r.approved && r.auto_approved),
    );
    let primary = |prefix: &str| {
        routes.iter().find(|r| r.prefix == prefix && r.primary).map_or_else(|| "?".to_owned(), |r| r.node_name.clone())
    };

    // Converged: every app host reaches every other region's db host.
    wait_for("the mesh to converge (ping app -> every db)", Duration::from_secs(60), || {
        apps.iter().enumerate().all(|(i, app)| {
            REGIONS.iter().enumerate().filter(|(j, _)| *j != i).all(|(_, r)| !smoke::ping(app, &r.db(), 1).is_empty())
        })
    })
    .inspect_err(|_| {
        for g in &gateways {
            eprintln!("--- {} log:\n{}", g.name, std::fs::read_to_string(g.log()).unwrap_or_default());
        }
    })?;
    println!("== converged after {:.1} s; smoke test", started.elapsed().as_secs_f64());
    let mut rows = Vec::new();
    for (i, app) in apps.iter().enumerate() {
        for (j, r) in REGIONS.iter().enumerate() {
            if i == j {
                continue;
            }
            let rtts = smoke::ping(app, &r.db(), 20);
            let db = |p: u16| format!("{}:{p}", r.db()).parse::<SocketAddr>();
            let row = Row {
                from: REGIONS[i].name,
                to: r.name,
                path: format!("{} -> {}", primary(&REGIONS[i].lan()), primary(&r.lan())),
                p50: smoke::quantile(&rtts, 0.5),
                p95: smoke::quantile(&rtts, 0.95),
                loss: 1.0 - f64::from(u32::try_from(rtts.len()).unwrap_or(0)) / 20.0,
                db_5432: mesh_lab::traffic::tcp_echo(app, db(5432)?),
                db_22: mesh_lab::traffic::tcp_echo(app, db(22)?),
            };
            if i == 0 {
                let db6 = |p: u16| format!("[{}]:{p}", r.db6()).parse::<SocketAddr>();
                check(
                    &format!("app-nyc -> db-{} over IPv6: 5432 allowed, 22 denied, ping", r.name),
                    mesh_lab::traffic::tcp_echo(app, db6(5432)?)
                        && !mesh_lab::traffic::tcp_echo(app, db6(22)?)
                        && !smoke::ping(app, &r.db6(), 3).is_empty(),
                );
                check(&format!("app-nyc -> db-{}:5432 succeeds", r.name), row.db_5432);
                check(&format!("app-nyc -> db-{}:22 refused by policy", r.name), !row.db_22);
                check(&format!("app-nyc -> db-{} ping works", r.name), row.loss < 0.5);
            } else {
                check(
                    &format!("app-{} -> db-{}: 5432 allowed, 22 denied, ping", REGIONS[i].name, r.name),
                    row.db_5432 && !row.db_22 && row.loss < 0.5,
                );
            }
            rows.push(row);
        }
    }

    // The gateways probe each other over the overlay and report to control:
    // every gateway sees every other one up (what `meshctl status` shows).
    let links = |rt: &tokio::runtime::Runtime| {
        rt.block_on(async {
            let st = control::admin(&control).await?.get_status(pb::GetStatusRequest {}).await?.into_inner();
            anyhow::Ok(st.peers)
        })
    };
    let all_up = wait_for("every gateway's probes to see every other gateway", Duration::from_secs(20), || {
        links(&rt).is_ok_and(|l| {
            l.iter().filter(|l| l.health.as_ref().is_some_and(|h| h.probe_up && h.probe_rtt_p50_ms >= 0.0)).count()
                >= gateways.len() * (gateways.len() - 1)
        })
    })
    .is_ok();
    check("every gateway's probes see every other gateway up", all_up);
    print_probe_matrix(&links(&rt)?);

    // The underlay guard (on on every gateway) under a flood at nyc_gw1.
    println!(
        "== flood: junk and handshake-initiation-shaped packets at nyc_gw1's WireGuard port, two-way traffic through it"
    );
    let nyc_gw1 = &gateways.iter().find(|g| g.name == "nyc_gw1").context("nyc_gw1")?.host;
    let echo = format!("{}:5432", REGIONS[1].db()).parse()?;
    match flood::check(&lab, &wan, nyc_gw1, std::net::Ipv4Addr::new(192, 0, 2, 11), &apps[0], echo) {
        Ok(f) => {
            println!("  {}", f.summary());
            check(
                &format!(
                    "traffic through a flooded gateway keeps >= {:.0}% of its rate, <= 5% ping loss",
                    100.0 * mesh_lab::traffic::FLOOD_RATE_BOUND
                ),
                f.passed(),
            );
        }
        Err(e) => check(&format!("the flood check ran ({e:#})"), false),
    }

    // Every site prefix has one owner, its primary, holding the address.
    let routes_now = || {
        rt.block_on(async {
            anyhow::Ok(control::admin(&control).await?.list_routes(pb::Empty {}).await?.into_inner().routes)
        })
    };
    let owned = wait_for("one owner per site prefix, its primary", Duration::from_secs(20), || {
        routes_now().is_ok_and(|rs| {
            REGIONS.iter().flat_map(|r| [r.lan(), r.lan6()]).all(|p| {
                let owners: Vec<_> = rs.iter().filter(|r| r.prefix == p && r.owner).collect();
                owners.len() == 1 && owners[0].primary
            })
        })
    });
    check("every site prefix has one owner (its primary) holding the virtual address", owned.is_ok());

    // HA under two-way traffic: the four events.
    let ha = ha::run(&mut gateways, &apps[0], &dbs[1], &routes_now);
    let ha = match ha {
        Ok(out) => Some(out),
        Err(e) => {
            check(&format!("the HA check ran: {e:#}"), false);
            for g in gateways.iter().filter(|g| g.region < 2) {
                let log = std::fs::read_to_string(g.log()).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(30).collect();
                eprintln!("--- {} log (last lines):", g.name);
                for l in tail.iter().rev() {
                    eprintln!("{l}");
                }
            }
            None
        }
    };
    if let Some(out) = &ha {
        for o in out {
            check(
                &format!(
                    "{}: longest two-way cut {} ms < {} ms",
                    o.event,
                    o.cuts.worst().as_millis(),
                    ha::BOUND.as_millis()
                ),
                o.cuts.worst() < ha::BOUND,
            );
        }
        check("the same TCP connections (IPv4 and IPv6) survived all four events, streams intact", true);
    }

    // The topology page in a real browser: every gateway up, then one
    // killed (a backup: no failover report, only its peers' probes tell).
    println!("== control's topology page in headless chromium (http://{}/)", web::LISTEN);
    match web::run(&ctl, &control, &mut gateways, "fsn_gw2", work.path()) {
        Ok(w) => {
            let copy = web::artifact_dir().join("topology.png");
            let copied =
                std::fs::create_dir_all(web::artifact_dir()).and_then(|()| std::fs::copy(&w.screenshot, &copy));
            println!(
                "  screenshot: {} (copy: {})",
                w.screenshot.display(),
                match copied {
                    Ok(_) => copy.display().to_string(),
                    Err(e) => format!("failed: {e}"),
                }
            );
            check(&format!("signed in with an admin token: {} of 6 gateways drawn and up", w.up), w.up == 6);
            check(
                &format!(
                    "the peers table: {} of {} gateway pairs show the endpoint in use, a direct path, a handshake and bytes both ways",
                    w.paths.1, w.paths.0
                ),
                w.paths.0 > 0 && w.paths.1 == w.paths.0,
            );
            check(
                &format!(
                    "the page showed killed fsn_gw2 down {} ms after the kill (< {} ms)",
                    w.down_after.as_millis(),
                    web::DOWN_BOUND.as_millis()
                ),
                w.down_after < web::DOWN_BOUND,
            );
            println!("  every gateway up again on the page {} ms after fsn_gw2's revival", w.up_after.as_millis());
            check("revoking the token signed the page out", w.revoked_signs_out);
        }
        Err(e) => check(&format!("the topology page check ran: {e:#}"), false),
    }

    // A WireGuard key rotated under two-way traffic through the gateway.
    match rotate::run(&rt, &control, &apps[0], &dbs[1], "fsn-gw1") {
        Ok(o) => {
            check(
                &format!(
                    "{} key rotations of fsn-gw1 (new key at control after at most {} ms): longest two-way cut of each {:?} ms, all < {} ms, streams intact",
                    o.cuts.len(),
                    o.took.as_millis(),
                    o.cuts.iter().map(|c| c.worst().as_millis()).collect::<Vec<_>>(),
                    ha::BOUND.as_millis()
                ),
                o.cuts.len() == rotate::ROTATIONS && o.cuts.iter().all(|c| c.worst() < ha::BOUND),
            );
            check("the rotation is in the audit log (node.key_rotated)", o.audited);
            check(&format!("no agent refused a view during the rotations ({} did)", o.nacks), o.nacks == 0);
            check("meshctl nodes shows the new key's age", o.key_age_shown);
        }
        Err(e) => check(&format!("the key rotation ran: {e:#}"), false),
    }

    // Control under hostile input, with the mesh running.
    println!("== control under hostile input: a flood of wrong enrollment keys from the WAN, a crafted policy");
    let pin =
        mesh_client::enrollment::EnrollmentKeyText::parse(&key).and_then(|k| k.ca_pin).context("the key's pin")?;
    match hostile::run(&rt, &mallory, &control, &pin, &policy_text) {
        Ok(h) => {
            let f = &h.flood;
            check(
                &format!(
                    "{} wrong enrollments from one host in 4 s ({} rate-limited) were all refused",
                    f.sent, f.limited
                ),
                f.sent > 100 && f.other == 0 && f.limited > 0,
            );
            check(
                &format!("policy changes during the flood took at most {} ms (< 1000)", h.slowest_write.as_millis()),
                h.slowest_write < Duration::from_secs(1),
            );
            check(&format!("{} of 6 gateways kept their streams through the flood", h.online), h.online == 6);
            check(
                &format!("a 200 KB policy of nested '[' is refused ({}); control stays up", h.deep_policy),
                h.deep_policy.contains("nested deeper"),
            );
            check("every admin token has an expiry", h.tokens_without_expiry == 0);
        }
        Err(e) => check(&format!("the hostile-input step ran: {e:#}"), false),
    }

    // The CA rotated under the running mesh.
    println!("== rotating control's CA with the gateways connected: begin, switch, restart gra_gw2's agent, retire");
    let restart = gateways.iter().position(|g| g.name == "gra_gw2").context("gra_gw2")?;
    match ca::rotate(&rt, &control, &mut gateways, restart) {
        Ok(o) => {
            check("every agent learned the new CA over its stream", o.learned);
            check("an agent restarted after the switch reconnected under the new CA", o.reconnected);
            check("after the old CA's retirement every agent trusts the new CA only", o.retired);
            check(&format!("{} of 6 gateways online after the rotation", o.online), o.online == 6);
        }
        Err(e) => check(&format!("the CA rotation ran: {e:#}"), false),
    }

    // Through the relay when UDP is blocked, and back.
    let fsn_gws: Vec<&Host> = gateways.iter().filter(|g| g.region == 1).map(|g| &g.host).collect();
    let pairs = gateways.len() * (gateways.len() - 1);
    match relay::run(&rt, &control, pairs, &fsn_gws, &apps[0], &dbs[1], &REGIONS[1].db()) {
        Ok(o) => {
            check(
                &format!(
                    "with relays on, {} of {} gateway pairs report a direct path (disco from the WireGuard port)",
                    o.direct_before.0, o.direct_before.1
                ),
                o.direct_before.1 == pairs && o.direct_before.0 == o.direct_before.1,
            );
            for line in &o.relayed {
                println!("  {line}");
            }
            check(
                &format!(
                    "UDP blocked at fsn: paths to fsn moved to the relay, longest two-way cut {} ms < {} ms",
                    o.to_relay.as_millis(),
                    relay::BOUND.as_millis()
                ),
                o.to_relay < relay::BOUND,
            );
            check("through the relay app-nyc -> db-fsn: 5432 allowed, 22 denied", o.policy_held);
            check(
                &format!(
                    "UDP unblocked: paths to fsn direct again, longest two-way cut {} ms < {} ms",
                    o.to_direct.as_millis(),
                    relay::BOUND.as_millis()
                ),
                o.to_direct < relay::BOUND,
            );
            check("the same TCP connection survived both switches, stream intact", o.stream_intact);
        }
        Err(e) => check(&format!("the relay check ran: {e:#}"), false),
    }
    drop(relay);

    println!();
    println!(
        "{:<11} {:<22} {:>9} {:>9} {:>6} {:>9} {:>9}",
        "site pair", "path (gateways)", "rtt p50", "rtt p95", "loss", "tcp/5432", "tcp/22"
    );
    for r in &rows {
        let verdict = |v: bool| if v { "allowed" } else { "denied" };
        println!(
            "{:<11} {:<22} {:>6.2} ms {:>6.2} ms {:>5.0}% {:>9} {:>9}",
            format!("{}->{}", r.from, r.to),
            r.path,
            r.p50,
            r.p95,
            r.loss * 100.0,
            verdict(r.db_5432),
            verdict(r.db_22)
        );
    }
    println!("(expected: tcp/5432 allowed, tcp/22 denied, no loss, on every pair)");
    println!();
    if let Some(out) = &ha {
        ha::print(out);
        println!();
    }

    if args.check {
        for g in &mut gateways {
            if let Some(a) = g.agent.take() {
                let _ = a.terminate();
            }
        }
        // The logs of every gateway and of control, for the post-mortem
        // (or on request: MESH_DEMO_KEEP=1).
        if !ok.get() || std::env::var_os("MESH_DEMO_KEEP").is_some() {
            let kept = work.keep();
            println!("the lab's logs are kept in {}", kept.display());
        }
        if !ok.get() {
            bail!("some expectations failed");
        }
        println!("all expectations met in {:.1} s", started.elapsed().as_secs_f64());
        return Ok(());
    }
    println!("== the lab is up; explore it (Ctrl-C tears everything down):");
    let meshctl = control::bin("meshctl")?;
    println!("  {} --socket {} status", meshctl.display(), control.socket().display());
    println!("  {} --socket {} routes", meshctl.display(), control.socket().display());
    println!("  control: config {}, log {}", control.config().display(), control.log().display());
    println!("  control metrics: ip netns exec {} curl -s http://{}/metrics", ctl.netns(), control::METRICS);
    for g in &gateways {
        println!("  {}: config {}, log {}", g.name, g.config().display(), g.log().display());
        println!("      metrics: ip netns exec {} curl -s http://127.0.0.1:9300/metrics", g.host.netns());
    }
    println!("  e.g. ip netns exec {} ping {}", apps[0].netns(), REGIONS[1].db());
    rt.block_on(tokio::signal::ctrl_c())?;
    println!("tearing down");
    for g in &mut gateways {
        if let Some(a) = g.agent.take() {
            let _ = a.terminate();
        }
    }
    Ok(())
}
