//! `relay`: what the relay costs against a direct path, in one run. Two
//! gateways (real mesh-control listing one mesh-relay, real agents with
//! userspace WireGuard) talk directly; then the right gateway's provider
//! drops UDP (nftables on its underlay) and their path moves to the relay
//! (TLS over TCP); the two alternate every run. Per path: iperf3 TCP
//! throughput both ways, ping RTT (average of 20), and the relay process's
//! CPU per Gbit/s (cores busy at 1 Gbit/s of WireGuard traffic through it).

use std::{fs::File, path::Path, process::Stdio, time::Duration};

use anyhow::{Context as _, bail};
use mesh_lab::{Host, Lab, Process, control::ControlInNs};
use mesh_proto::v1::{self as pb, admin_service_client::AdminServiceClient};

use super::tunnel::{Load, cpu_ticks, iperf3, ticks_per_second, wait_for_server};
use crate::{Ctx, Results, chart};

/// One line for the suite list.
pub const ABOUT: &str = "direct path against the relay (TLS/TCP): throughput, RTT and relay CPU per Gbit/s";

const SUITE: &str = "relay";
const CONTROL: &str = mesh_lab::control::ADDRESS;
const RELAY: &str = "192.0.2.50:443";
const REFLECTOR: &str = "192.0.2.50:3478";
const POLICY: &str = r#"{"tagOwners": {"tag:gw": []},
  "acls": [{"action": "accept", "src": ["tag:gw"], "dst": ["tag:gw:*"]}]}"#;
const LOADS: &[Load] = &[
    Load { param: "tcp1", streams: 1, reverse: false, udp: false },
    Load { param: "tcp1-rev", streams: 1, reverse: true, udp: false },
];

type Admin = AdminServiceClient<mesh_client::channel::Channel>;

fn admin<T>(
    rt: &tokio::runtime::Runtime,
    dir: &Path,
    f: impl AsyncFnOnce(&mut Admin) -> anyhow::Result<T>,
) -> anyhow::Result<T> {
    rt.block_on(async {
        let mut a = AdminServiceClient::new(mesh_client::channel::connect_unix(&dir.join("admin.sock")).await?);
        f(&mut a).await
    })
}

fn start(host: &Host, bin: &Path, args: &[&str], log: &Path) -> anyhow::Result<Process> {
    let log = File::create(log)?;
    let mut cmd = host.command(bin.to_str().context("path")?, args);
    cmd.stdin(Stdio::null()).stdout(log.try_clone()?).stderr(log);
    Ok(host.spawn_command(cmd)?)
}

/// Average RTT of 20 pings (ping's summary), milliseconds.
fn rtt(from: &Host, to: &str) -> anyhow::Result<f64> {
    let out = from.exec("ping", ["-c", "20", "-i", "0.05", "-q", to])?;
    let text = String::from_utf8_lossy(&out.stdout);
    // "rtt min/avg/max/mdev = 0.1/0.2/0.3/0.0 ms": the run's figure is the
    // average; the suite reports the median over runs.
    let line = text.lines().find(|l| l.contains("min/avg/max")).context("no ping summary")?;
    let nums = line.split('=').nth(1).context("ping summary")?;
    nums.trim().split('/').nth(1).context("ping avg")?.parse().context("ping avg")
}

/// Runs the suite.
#[expect(clippy::too_many_lines, reason = "lab set-up, then the alternating measurements")]
pub fn run(ctx: &Ctx) -> anyhow::Result<Results> {
    let (runs, seconds) = if ctx.quick { (2, 3) } else { (5, 10) };
    let agent = crate::util::agent_binary()?;
    let relay_bin = crate::util::binary("mesh-relay")?;
    let mut results = Results::new(SUITE, Some("direct"));
    results.higher_is_better("gbit_per_s", true);

    let lab = Lab::new()?;
    let work = tempfile::tempdir()?;
    let wan = lab.switch("wan")?;
    let mut hosts = Vec::new();
    for (name, addr) in [("ctl", "192.0.2.100"), ("relay", "192.0.2.50"), ("left", "192.0.2.1"), ("right", "192.0.2.2")]
    {
        let h = lab.host(name)?;
        wan.plug(&h, "eth0")?;
        h.addr("eth0", &format!("{addr}/24"))?;
        hosts.push(h);
    }
    let [ctl, relay_host, left, right] = [&hosts[0], &hosts[1], &hosts[2], &hosts[3]];

    // The relay's certificate, control (pinning it), then the relay
    // (trusting control's ticket key).
    let rdir = work.path().join("relay");
    std::fs::create_dir_all(&rdir)?;
    let relay_toml = |key: &str| {
        format!(
            "listen = \"{RELAY}\"\nreflector = \"{REFLECTOR}\"\ncert = \"relay.crt\"\nkey = \"relay.key\"\n\
             names = [\"192.0.2.50\"]\nregion = \"lab\"\ncontrol_keys = [\"{key}\"]\n"
        )
    };
    std::fs::write(rdir.join("relay.toml"), relay_toml(&mesh_relay::ticket::key_to_b64(&[0; 32])))?;
    let pin = crate::util::capture(
        std::process::Command::new(&relay_bin).arg("--config").arg(rdir.join("relay.toml")).arg("--print-pin"),
    )?;
    let cdir = work.path().join("ctl");
    std::fs::create_dir_all(&cdir)?;
    let config = mesh_control::config::Config {
        relays: vec![mesh_control::relay::RelayEntry {
            region: "lab".into(),
            address: RELAY.into(),
            server_name: None,
            cert_sha256: pin.trim().to_owned(),
            reflector: Some(REFLECTOR.into()),
        }],
        ..mesh_lab::control::lab_config(&cdir)
    };
    let _control = ControlInNs::start(ctl, config)?;
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let (key, ticket_key) = admin(&rt, &cdir, async |a| {
        a.set_policy(pb::PolicyDocument { text: POLICY.into(), generation: 0 }).await?;
        let k = a
            .create_enrollment_key(pb::CreateEnrollmentKeyRequest {
                reusable: true,
                preapproved: true,
                tags: vec!["tag:gw".into()],
                ..Default::default()
            })
            .await?
            .into_inner()
            .secret;
        let st = a.get_status(pb::GetStatusRequest {}).await?.into_inner();
        Ok((k, st.relay_ticket_key))
    })?;
    std::fs::write(rdir.join("relay.toml"), relay_toml(&ticket_key))?;
    let relay = start(
        relay_host,
        &relay_bin,
        &["--config", rdir.join("relay.toml").to_str().context("path")?],
        &rdir.join("relay.log"),
    )?;
    mesh_lab::wait_for("mesh-relay to listen", Duration::from_secs(10), || relay_host.tcp_listening(443))?;

    let mut agents = Vec::new();
    for (h, addr) in [(left, "192.0.2.1"), (right, "192.0.2.2")] {
        let dir = work.path().join(h.name());
        std::fs::create_dir_all(&dir)?;
        mesh_local::secret_file::write(&dir.join("enroll.key"), key.as_bytes())?;
        let config = format!(
            "interface = \"{ifname}\"\nbackend = \"userspace\"\nlisten_port = 51820\nstate_dir = \"{state}\"\n\
             enforcement = \"off\"\nkeep_dataplane_on_exit = false\nlog = \"info\"\n[probe]\nport = 0\n\
             [control]\naddress = \"{CONTROL}\"\nenrollment_key_file = \"{key}\"\nhostname = \"{name}\"\n\
             endpoints = [\"{addr}:51820\"]\nhealth_interval_secs = 0.5\nmax_backoff_secs = 1\n",
            ifname = lab.unique_ifname("wgr"),
            state = dir.join("state").display(),
            key = dir.join("enroll.key").display(),
            name = h.name(),
        );
        std::fs::write(dir.join("agent.toml"), config)?;
        agents.push(start(
            h,
            &agent,
            &["run", "--config", dir.join("agent.toml").to_str().context("path")?],
            &dir.join("agent.log"),
        )?);
    }
    let path = |from: &str, to: &str| -> String {
        admin(&rt, &cdir, async |a| {
            let st = a.get_status(pb::GetStatusRequest {}).await?.into_inner();
            Ok(st
                .peers
                .iter()
                .find(|l| l.from_name == from && l.to_name == to)
                .and_then(|l| l.health.as_ref())
                .map(|h| h.path.clone())
                .unwrap_or_default())
        })
        .unwrap_or_default()
    };
    let logs = || {
        ["left", "right"]
            .iter()
            .map(|n| std::fs::read_to_string(work.path().join(n).join("agent.log")).unwrap_or_default())
            .collect::<Vec<_>>()
            .join("\n---\n")
    };
    let on = |want: &str| path("left", "right") == want && path("right", "left") == want;
    mesh_lab::wait_for("a direct path", Duration::from_secs(60), || on("direct")).with_context(logs)?;
    let right_overlay = admin(&rt, &cdir, async |a| {
        let nodes = a.list_nodes(pb::ListNodesRequest {}).await?.into_inner().nodes;
        nodes.iter().find(|n| n.name == "right").map(|n| n.ipv4.clone()).context("no node right")
    })?;
    let _server = right.spawn("iperf3", ["-s", "-B", &right_overlay])?;
    wait_for_server(left, &right_overlay)?;

    for run in 0..runs {
        for (variant, blocked) in [("direct", false), ("relay", true)] {
            if blocked {
                right.block_udp("eth0", true)?;
            }
            mesh_lab::wait_for(&format!("the {variant} path"), Duration::from_secs(30), || on(variant))
                .with_context(logs)?;
            ctx.progress(SUITE, format_args!("run {}/{runs}: {variant}", run + 1));
            for load in LOADS {
                let before = cpu_ticks(relay.pid());
                let gbit =
                    iperf3(left, &right_overlay, load, seconds).with_context(|| format!("{variant} {}", load.param))?;
                let cpu_s = (cpu_ticks(relay.pid()) - before) as f64 / ticks_per_second();
                results.push(variant, load.param, "gbit_per_s", gbit, "Gbit/s", run);
                if blocked && gbit > 0.0 {
                    // Cores busy per Gbit/s through the relay.
                    let cores = cpu_s / f64::from(seconds);
                    results.push(variant, load.param, "relay_cpu_per_gbit_s", cores / gbit, "cores/(Gbit/s)", run);
                }
                ctx.progress(
                    SUITE,
                    format_args!("  {variant} {}: {gbit:.3} Gbit/s, relay CPU {cpu_s:.2} s", load.param),
                );
            }
            let ms = rtt(left, &right_overlay)?;
            results.push(variant, "ping", "rtt_ms", ms, "ms", run);
            if blocked {
                right.block_udp("eth0", false)?;
            }
        }
    }
    drop(agents);
    let summaries = results.summaries();
    chart::bar_chart(&ctx.out.join("relay.svg"), "Direct against relay (median)", "gbit_per_s", &summaries)?;
    if results.records().is_empty() {
        bail!("no measurement");
    }
    Ok(results)
}
