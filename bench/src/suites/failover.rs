//! `failover`: outage seen by a continuous one-way UDP flow (a datagram
//! every 2 ms, app-nyc -> db-fsn) when fsn's primary gateway (1) is killed,
//! process and links, or (2) loses its LAN, or (3) is killed while control
//! is down (only the agents' own probes can react); the time from a policy
//! change at control to the first packet whose verdict flips on the
//! gateways (a flow to a denied port starts arriving); and (5) the cut a
//! two-way conversation sees (a TCP connection with a checked stream both
//! ways, and pings; fsn's hosts route through the site's virtual gateway
//! address) when fsn's primary is killed and when it comes back (fail-back),
//! the worst of its measures per event, the same connection throughout.
//! Real mesh-control, real agents (userspace WireGuard, eBPF ACL) in lab
//! namespaces.

use std::{
    fs::File,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use mesh_lab::{Host, Lab, Process, control::ControlInNs, traffic::UdpFlow, twoway::Conversation};
use mesh_proto::v1 as pb;
use mesh_proto::v1::admin_service_client::AdminServiceClient;

use crate::{Ctx, Results, chart};

/// One line for the suite list.
pub const ABOUT: &str = "gateway failover outage (primary killed / LAN lost), two-way cuts (kill, fail-back) and policy-change-to-enforcement time";

const SUITE: &str = "failover";
const CONTROL: &str = mesh_lab::control::ADDRESS;
const HOLD_DOWN_SECS: i64 = 2;

fn policy(extra_port: Option<u16>) -> String {
    let extra = extra_port.map_or_else(String::new, |p| format!(", \"db-fsn:{p}\""));
    format!(
        r#"{{
  "tagOwners": {{"tag:gw": []}},
  "hosts": {{"app-nyc": "198.18.10.10/32", "db-fsn": "198.18.20.20/32"}},
  "autoApprovers": {{"routes": {{"198.18.10.0/24": ["tag:gw"], "198.18.20.0/24": ["tag:gw"]}}}},
  "acls": [
    {{"action": "accept", "src": ["app-nyc"], "dst": ["db-fsn:9000"{extra}], "proto": "udp"}},
    {{"action": "accept", "src": ["app-nyc"], "dst": ["db-fsn:9100"], "proto": "tcp"}},
    {{"action": "accept", "src": ["198.18.10.0/24", "198.18.20.0/24"], "dst": ["198.18.10.0/24:*", "198.18.20.0/24:*"], "proto": "icmp"}},
  ],
}}"#
    )
}

/// mesh-control on a thread inside the `ctl` namespace.
fn start_control(host: &Host, dir: &Path) -> anyhow::Result<ControlInNs> {
    let config = mesh_control::config::Config { hold_down_secs: HOLD_DOWN_SECS, ..mesh_lab::control::lab_config(dir) };
    Ok(ControlInNs::start(host, config)?)
}

type Admin = AdminServiceClient<mesh_client::channel::Channel>;

struct Env {
    rt: tokio::runtime::Runtime,
    dir: PathBuf,
}

impl Env {
    fn admin<T>(&self, f: impl AsyncFnOnce(&mut Admin) -> anyhow::Result<T>) -> anyhow::Result<T> {
        self.rt.block_on(async {
            let mut a =
                AdminServiceClient::new(mesh_client::channel::connect_unix(&self.dir.join("admin.sock")).await?);
            f(&mut a).await
        })
    }

    fn primary(&self, prefix: &str) -> String {
        self.admin(async |a| {
            let routes = a.list_routes(pb::Empty {}).await?.into_inner().routes;
            Ok(routes.iter().find(|r| r.prefix == prefix && r.primary).map(|r| r.node_name.clone()).unwrap_or_default())
        })
        .unwrap_or_default()
    }
}

/// bpffs outside /sys (`ip netns exec` remounts /sys).
struct BpfFs(tempfile::TempDir);

impl Drop for BpfFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.0.path()).status();
    }
}

struct Gateway {
    host: Host,
    config: PathBuf,
    log: PathBuf,
    agent: Option<Process>,
}

impl Gateway {
    fn start(&mut self, bin: &Path) -> anyhow::Result<()> {
        let log = File::options().create(true).append(true).open(&self.log)?;
        let mut cmd = self
            .host
            .command(bin.to_str().context("path")?, ["run", "--config", self.config.to_str().context("path")?]);
        cmd.stdin(Stdio::null()).stdout(log.try_clone()?).stderr(log);
        self.agent = Some(self.host.spawn_command(cmd)?);
        Ok(())
    }
}

fn wait_for(what: &str, timeout: Duration, f: impl FnMut() -> bool) -> anyhow::Result<()> {
    mesh_lab::wait_for(what, timeout, f)?;
    Ok(())
}

/// Runs the suite.
#[expect(clippy::too_many_lines, reason = "lab set-up and five measured cases, in order")]
pub fn run(ctx: &Ctx) -> anyhow::Result<Results> {
    let runs: u32 = if ctx.quick { 3 } else { 10 };
    let bin = crate::util::agent_binary()?;
    let lab = Lab::new()?;
    let work = tempfile::tempdir()?;
    let ctl = lab.host("ctl")?;
    let wan = lab.switch("wan")?;
    let mut wan_ports = Vec::new();
    let names = ["nycgw1", "fsngw1", "fsngw2"];
    let mut gw_hosts = Vec::new();
    for (name, a) in
        [("ctl", "192.0.2.100"), ("nycgw1", "192.0.2.11"), ("fsngw1", "192.0.2.21"), ("fsngw2", "192.0.2.22")]
    {
        let h = if name == "ctl" { ctl.clone() } else { lab.host(name)? };
        wan_ports.push(wan.plug(&h, "eth0")?);
        h.addr("eth0", &format!("{a}/24"))?;
        if name != "ctl" {
            gw_hosts.push(h);
        }
    }
    let app = lab.host("app")?;
    let db = lab.host("db")?;
    let lnyc = lab.switch("lnyc")?;
    lnyc.plug(&gw_hosts[0], "lan0")?;
    lnyc.plug(&app, "eth0")?;
    gw_hosts[0].addr("lan0", "198.18.10.1/24")?;
    app.addr("eth0", "198.18.10.10/24")?;
    app.route_via("198.18.0.0/16", "198.18.10.1")?;
    let lfsn = lab.switch("lfsn")?;
    let f1_lan = lfsn.plug(&gw_hosts[1], "lan0")?;
    lfsn.plug(&gw_hosts[2], "lan0")?;
    lfsn.plug(&db, "eth0")?;
    gw_hosts[1].addr("lan0", "198.18.20.1/24")?;
    gw_hosts[2].addr("lan0", "198.18.20.2/24")?;
    db.addr("eth0", "198.18.20.20/24")?;
    // fsn's hosts answer through the site's virtual gateway address.
    db.route_via("198.18.0.0/16", "198.18.20.254")?;

    let env = Env {
        rt: tokio::runtime::Builder::new_current_thread().enable_all().build()?,
        dir: work.path().join("control"),
    };
    let mut control = Some(start_control(&ctl, &env.dir)?);
    let key = env.admin(async |a| {
        a.set_policy(pb::PolicyDocument { text: policy(None), generation: 0 }).await?;
        let k = a
            .create_enrollment_key(pb::CreateEnrollmentKeyRequest {
                reusable: true,
                preapproved: true,
                tags: vec!["tag:gw".into()],
                ..Default::default()
            })
            .await?;
        Ok(k.into_inner().secret)
    })?;
    let bpf = BpfFs(tempfile::tempdir()?);
    if !Command::new("mount").args(["-t", "bpf", "bpf"]).arg(bpf.0.path()).status()?.success() {
        bail!("mounting bpffs");
    }
    let mut gws = Vec::new();
    for (i, (name, h)) in names.iter().zip(&gw_hosts).enumerate() {
        let dir = work.path().join(name);
        std::fs::create_dir_all(&dir)?;
        // One key file per gateway: each agent removes its own once enrolled
        // (0600, or the agent refuses it).
        let key_file = dir.join("enroll.key");
        mesh_local::secret_file::write(&key_file, key.as_bytes())?;
        let (underlay, lan) =
            [("192.0.2.11", "198.18.10.0/24"), ("192.0.2.21", "198.18.20.0/24"), ("192.0.2.22", "198.18.20.0/24")][i];
        let config = format!(
            "interface = \"{ifname}\"\nbackend = \"userspace\"\nlisten_port = 51820\nstate_dir = \"{state}\"\n\
             enforcement = \"ebpf\"\nbpf_pin_dir = \"{bpf}\"\nkeep_dataplane_on_exit = false\n\
             reconcile_interval_secs = 5\nretry_interval_secs = 0.5\nlog = \"info\"\n\
             [control]\naddress = \"{CONTROL}\"\nenrollment_key_file = \"{key}\"\nhostname = \"{name}\"\n\
             advertise_routes = [\"{lan}\"]\nendpoints = [\"{underlay}:51820\"]\nhealth_interval_secs = 0.2\n\
             max_backoff_secs = 1\npersistent_keepalive = 5\n\
             [probe]\nfailback_hold_secs = {HOLD_DOWN_SECS}\n{site}",
            site = if lan == "198.18.20.0/24" {
                "[control.route_options.\"198.18.20.0/24\"]\nvirtual_addresses = [\"198.18.20.254\"]\n"
            } else {
                ""
            },
            ifname = lab.unique_ifname("wg"),
            state = dir.join("state").display(),
            bpf = bpf.0.path().display(),
            key = key_file.display(),
        );
        std::fs::write(dir.join("agent.toml"), config)?;
        let mut g =
            Gateway { host: h.clone(), config: dir.join("agent.toml"), log: dir.join("agent.log"), agent: None };
        g.start(&bin)?;
        if i == 1 {
            wait_for("fsngw1 primary", Duration::from_secs(30), || env.primary("198.18.20.0/24") == "fsngw1")?;
        }
        gws.push(g);
    }
    wait_for("three routes", Duration::from_secs(30), || {
        env.admin(async |a| Ok(a.list_routes(pb::Empty {}).await?.into_inner().routes.len())).unwrap_or(0) == 3
    })?;
    env.admin(async |a| {
        for r in a.list_routes(pb::Empty {}).await?.into_inner().routes {
            let priority = if r.node_name == "fsngw2" { 10 } else { 0 };
            a.set_route_priority(pb::SetRoutePriorityRequest {
                route: Some(pb::RouteRef { node_id: r.node_id, prefix: r.prefix }),
                priority,
            })
            .await?;
        }
        Ok(())
    })?;
    let flow = UdpFlow::start(&app, &db, "198.18.20.20:9000".parse()?)?;
    wait_for("the flow", Duration::from_secs(30), || flow.received() > 100)?;

    let mut results = Results::new(SUITE, None);
    let fail_back = |flow: &UdpFlow| -> anyhow::Result<()> {
        wait_for("fail-back", Duration::from_secs(30), || env.primary("198.18.20.0/24") == "fsngw1")?;
        // The nyc agent's own hold-down runs from its first answered probe,
        // about when control's starts: let it pass too, so the next case
        // really cuts the path the flow takes.
        std::thread::sleep(Duration::from_millis(u64::try_from(HOLD_DOWN_SECS).unwrap_or(2) * 1000 + 500));
        let n = flow.received();
        wait_for("the flow after fail-back", Duration::from_secs(30), || flow.received() > n + 100)
    };
    // Kills fsn's primary (process, WAN and LAN links); the outage in ms.
    let kill_primary = |gw: &mut Gateway| -> anyhow::Result<f64> {
        let cut = Instant::now();
        if let Some(mut a) = gw.agent.take() {
            a.child().kill()?;
            let _ = a.child().wait();
        }
        wan.set_port(&wan_ports[2], false)?;
        lfsn.set_port(&f1_lan, false)?;
        let n = flow.received();
        wait_for("the flow through the backup", Duration::from_secs(30), || flow.received() > n + 100)?;
        Ok(flow.longest_gap_since(cut).as_secs_f64() * 1e3)
    };
    let revive_primary = |gw: &mut Gateway| -> anyhow::Result<()> {
        wan.set_port(&wan_ports[2], true)?;
        lfsn.set_port(&f1_lan, true)?;
        gw.start(&bin)
    };
    for run in 0..runs {
        // 1. Primary killed, process and links.
        ctx.progress(SUITE, format!("run {run}: primary killed"));
        let gap = kill_primary(&mut gws[1])?;
        results.push("primary-killed", "fsn", "outage", gap, "ms", run);
        revive_primary(&mut gws[1])?;
        fail_back(&flow)?;

        // 2. Primary up, LAN lost.
        ctx.progress(SUITE, format!("run {run}: primary lost its LAN"));
        let cut = Instant::now();
        lfsn.set_port(&f1_lan, false)?;
        let n = flow.received();
        wait_for("the flow through the backup", Duration::from_secs(30), || flow.received() > n + 100)?;
        results.push("lan-lost", "fsn", "outage", flow.longest_gap_since(cut).as_secs_f64() * 1e3, "ms", run);
        lfsn.set_port(&f1_lan, true)?;
        fail_back(&flow)?;

        // 3. Primary killed while control is down: only the nyc agent's own
        // probes can move the prefix.
        ctx.progress(SUITE, format!("run {run}: primary killed, control down"));
        drop(control.take());
        let gap = kill_primary(&mut gws[1])?;
        results.push("primary-killed-control-down", "fsn", "outage", gap, "ms", run);
        revive_primary(&mut gws[1])?;
        control = Some(start_control(&ctl, &env.dir)?);
        fail_back(&flow)?;

        // 4. Policy change to enforcement: a flow to a denied port starts
        // arriving once the new policy is in force on both gateways.
        ctx.progress(SUITE, format!("run {run}: policy change"));
        let probe = UdpFlow::start(&app, &db, "198.18.20.20:9001".parse()?)?;
        std::thread::sleep(Duration::from_millis(200));
        anyhow::ensure!(probe.received() == 0, "port 9001 should be denied before the change");
        let t0 = Instant::now();
        env.admin(async |a| {
            Ok(a.set_policy(pb::PolicyDocument { text: policy(Some(9001)), generation: 0 }).await.map(|_| ())?)
        })?;
        wait_for("the new policy enforced", Duration::from_secs(30), || probe.received() > 0)?;
        let first = probe.first_since(t0).context("no arrival")?;
        results.push("policy-change", "allow", "enforcement", first.duration_since(t0).as_secs_f64() * 1e3, "ms", run);
        drop(probe);
        env.admin(async |a| {
            Ok(a.set_policy(pb::PolicyDocument { text: policy(None), generation: 0 }).await.map(|_| ())?)
        })?;
        std::thread::sleep(Duration::from_millis(500));

        // 5. Two-way: one conversation through the primary's death and its
        // return.
        ctx.progress(SUITE, format!("run {run}: two-way conversation"));
        let conv = Conversation::start(&app, &db, &["198.18.20.20:9100".parse()?], Duration::from_millis(10))?;
        let t = Instant::now();
        wait_for("the conversation", Duration::from_secs(30), || conv.flowing_since(t))?;
        let owner = |name: &str| {
            env.admin(async |a| {
                let routes = a.list_routes(pb::Empty {}).await?.into_inner().routes;
                Ok(mesh_lab::control::settled_on(&routes, "198.18.20.0/24", name))
            })
            .unwrap_or(false)
        };
        let settle = |conv: &Conversation| {
            let after = Instant::now() + Duration::from_millis(500);
            wait_for("the conversation after the switch", Duration::from_secs(30), || conv.flowing_since(after))
        };
        let t = Instant::now();
        if let Some(mut a) = gws[1].agent.take() {
            a.child().kill()?;
            let _ = a.child().wait();
        }
        wan.set_port(&wan_ports[2], false)?;
        lfsn.set_port(&f1_lan, false)?;
        wait_for("fsngw2 owning fsn", Duration::from_secs(30), || owner("fsngw2"))?;
        settle(&conv)?;
        results.push("two-way-primary-killed", "fsn", "cut", conv.cuts(t).worst().as_secs_f64() * 1e3, "ms", run);
        let t = Instant::now();
        revive_primary(&mut gws[1])?;
        wait_for("fsngw1 owning fsn again", Duration::from_secs(30), || owner("fsngw1"))?;
        settle(&conv)?;
        results.push("two-way-fail-back", "fsn", "cut", conv.cuts(t).worst().as_secs_f64() * 1e3, "ms", run);
        conv.finish().map_err(|e| anyhow::anyhow!("the two-way conversation broke: {e}"))?;
        fail_back(&flow)?;
    }
    drop(flow);
    drop(control);
    for g in &mut gws {
        if let Some(a) = g.agent.take() {
            let _ = a.terminate();
        }
    }
    // One bar per case (param), with the spread over the runs as a whisker.
    let by_case: Vec<crate::Summary> = results
        .summaries()
        .into_iter()
        .map(|s| crate::Summary { param: s.variant.clone(), variant: "mesh".into(), metric: "ms".into(), ..s })
        .collect();
    chart::bar_chart(
        &ctx.out.join("failover.svg"),
        "Failover outage and policy enforcement (median, min-max)",
        "ms",
        &by_case,
    )?;
    Ok(results)
}
