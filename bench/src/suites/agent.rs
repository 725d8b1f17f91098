//! `agent`: time to apply a node view with 1, 100 and 1,000 peers (first
//! apply and a no-op re-apply), and the agent's resident memory, with the
//! userspace WireGuard backend (the one this machine has).
//!
//! Each sample starts a fresh `mesh-agent run` in a lab namespace and applies
//! a generated view through `mesh-agent apply`: every peer has an endpoint,
//! an overlay /32 as allowed IP and a route. Two durations per apply: the
//! agent's own (diff, apply, confirming re-read) and the CLI's wall time
//! (process start and the admin socket included). RSS is read from
//! /proc/<pid>/status after the first apply.

use std::{
    path::{Path, PathBuf},
    process::Stdio,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use mesh_agent::keys::SecretKey;
use mesh_lab::{Host, Lab};

use crate::{Ctx, Results, chart};

/// One line for the suite list.
pub const ABOUT: &str = "mesh-agent: apply time (first and no-op) and RSS vs peer count";

const SUITE: &str = "agent";

fn view(peers: usize) -> String {
    let peers: Vec<serde_json::Value> = (0..peers)
        .map(|i| {
            let ip = format!("100.64.{}.{}/32", 1 + i / 250, 1 + i % 250);
            serde_json::json!({
                "public_key": SecretKey::generate().public_key().to_base64(),
                "endpoint": format!("192.0.2.{}:51820", 2 + i % 250),
                "allowed_ips": [ip],
            })
        })
        .collect();
    let routes: Vec<&serde_json::Value> = peers.iter().map(|p| &p["allowed_ips"][0]).collect();
    serde_json::json!({
        "generation": 1,
        "addresses": ["100.64.0.1/32"],
        "peers": peers,
        "routes": routes,
    })
    .to_string()
}

struct Sample {
    first_cli_ms: f64,
    first_agent_ms: f64,
    noop_cli_ms: f64,
    noop_agent_ms: f64,
    rss_mib: f64,
}

fn apply(bin: &Path, host: &Host, config: &Path, state: &Path) -> anyhow::Result<(f64, f64)> {
    let start = Instant::now();
    let out = host.exec(
        bin.to_str().unwrap(),
        ["apply", "--config", config.to_str().unwrap(), "--state", state.to_str().unwrap()],
    )?;
    let cli_ms = start.elapsed().as_secs_f64() * 1e3;
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).context("apply report")?;
    let agent_ms = report["duration"].as_f64().context("no duration in report")? * 1e3;
    Ok((cli_ms, agent_ms))
}

fn rss_mib(pid: u32) -> anyhow::Result<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .context("no VmRSS")?;
    Ok(kb / 1024.0)
}

fn sample(bin: &Path, peers: usize) -> anyhow::Result<Sample> {
    let lab = Lab::new()?;
    let gw = lab.host("gw")?;
    let far = lab.host("far")?;
    lab.link(&gw, "eth0", &far, "eth0")?;
    gw.addr("eth0", "192.0.2.1/24")?;
    let dir = tempfile_dir()?;
    let config = dir.join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "interface = \"{}\"\nbackend = \"userspace\"\nstate_dir = \"{}\"\nenforcement = \"off\"\n\
             reconcile_interval_secs = 3600\nlog = \"warn\"\n",
            lab.unique_ifname("wgb"),
            dir.join("state").display()
        ),
    )?;
    let state = dir.join("view.json");
    std::fs::write(&state, view(peers))?;
    let mut cmd = gw.command(bin.to_str().unwrap(), ["run", "--config", config.to_str().unwrap()]);
    cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null());
    let agent = gw.spawn_command(cmd)?;
    let sock = dir.join("state/agent.sock");
    let start = Instant::now();
    while !sock.exists() {
        anyhow::ensure!(start.elapsed() < Duration::from_secs(20), "agent did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    let (first_cli_ms, first_agent_ms) = apply(bin, &gw, &config, &state)?;
    let rss = rss_mib(agent.pid())?;
    let (noop_cli_ms, noop_agent_ms) = apply(bin, &gw, &config, &state)?;
    agent.terminate()?;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(Sample { first_cli_ms, first_agent_ms, noop_cli_ms, noop_agent_ms, rss_mib: rss })
}

fn tempfile_dir() -> anyhow::Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("mesh-bench-agent-{}-{}", std::process::id(), rand_suffix()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

fn rand_suffix() -> u64 {
    use std::hash::{BuildHasher as _, RandomState};
    RandomState::new().hash_one(Instant::now())
}

/// Runs the suite.
pub fn run(ctx: &Ctx) -> anyhow::Result<Results> {
    let bin = crate::util::agent_binary()?;
    let runs = if ctx.quick { 2 } else { 5 };
    let mut results = Results::new(SUITE, None);
    for run in 0..runs {
        for peers in [1usize, 100, 1000] {
            ctx.progress(SUITE, format!("run {run}: {peers} peers"));
            let s = sample(&bin, peers).with_context(|| format!("{peers} peers"))?;
            let r = run as u32;
            results.push("first-apply", peers, "agent_ms", s.first_agent_ms, "ms", r);
            results.push("first-apply", peers, "cli_ms", s.first_cli_ms, "ms", r);
            results.push("noop-apply", peers, "agent_ms", s.noop_agent_ms, "ms", r);
            results.push("noop-apply", peers, "cli_ms", s.noop_cli_ms, "ms", r);
            results.push("userspace", peers, "rss_mib", s.rss_mib, "MiB", r);
        }
    }
    let summaries = results.summaries();
    std::fs::create_dir_all(&ctx.out)?;
    chart::line_chart(
        &ctx.out.join("agent.svg"),
        "mesh-agent: time to apply a node view",
        "agent_ms",
        &summaries,
        true,
    )?;
    chart::line_chart(&ctx.out.join("agent-rss.svg"), "mesh-agent: RSS after applying", "rss_mib", &summaries, true)?;
    Ok(results)
}
