//! Our engine in the tunnel suite: `mesh-agent run` with the userspace
//! backend on each side, the tunnel configured the product's way, by
//! applying a node view (`mesh-agent apply`). Enforcement is off so the
//! figure compares engines, not engines plus an ACL.

use std::{process::Stdio, time::Duration};

use anyhow::{Context as _, bail};
use mesh_lab::{Host, Lab, Process};

use super::{LEFT_OVERLAY, LEFT_UNDERLAY, RIGHT_OVERLAY, RIGHT_UNDERLAY, WG_PORT};

/// One side: the agent process and its files.
pub(super) struct Side {
    pub(super) agent: Process,
    dir: tempfile::TempDir,
}

impl Side {
    fn start(host: &Host, ifname: &str, knobs: &str) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let config = dir.path().join("agent.toml");
        std::fs::write(
            &config,
            format!(
                "interface = \"{ifname}\"\nbackend = \"userspace\"\nlisten_port = {WG_PORT}\nstate_dir = \"{}\"\n\
                 enforcement = \"off\"\nlog = \"warn\"\n{knobs}",
                dir.path().join("state").display()
            ),
        )?;
        let log = std::fs::File::create(dir.path().join("agent.log"))?;
        let mut command =
            host.command(crate::util::agent_binary()?.to_str().unwrap(), ["run", "--config", config.to_str().unwrap()]);
        command.stdin(Stdio::null()).stdout(log.try_clone()?).stderr(log);
        let agent = host.spawn_command(command)?;
        let sock = dir.path().join("state/agent.sock");
        for _ in 0..200 {
            if sock.exists() {
                return Ok(Self { agent, dir });
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        bail!("mesh-agent on {} did not open {}", host.name(), sock.display())
    }

    fn cli(&self, host: &Host, args: &[&str]) -> anyhow::Result<String> {
        let config = self.dir.path().join("agent.toml");
        let mut all = vec![args[0], "--config", config.to_str().unwrap()];
        all.extend_from_slice(&args[1..]);
        let out = host.exec(crate::util::agent_binary()?.to_str().unwrap(), &all)?;
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    }

    fn apply(&self, host: &Host, view: &serde_json::Value) -> anyhow::Result<()> {
        let path = self.dir.path().join("view.json");
        std::fs::write(&path, view.to_string())?;
        self.cli(host, &["apply", "--state", path.to_str().unwrap()]).map(drop)
    }
}

/// Both agents. Dropping it stops them and deletes their interfaces: the
/// agent keeps its TUN device across restarts on purpose, which here would
/// leave the overlay addresses behind for the next engine.
pub(crate) struct Ours {
    pub(super) sides: [(Host, String, Side); 2],
}

impl Drop for Ours {
    fn drop(&mut self) {
        for (host, ifname, side) in &mut self.sides {
            let child = side.agent.child();
            let _ = child.kill();
            let _ = child.wait();
            let _ = host.ip(&["link", "del", ifname]);
        }
    }
}

/// Starts both agents (with `knobs`: configuration lines that turn the
/// fast-path steps being measured off) and applies the two node views.
pub(crate) fn up(lab: &Lab, left: &Host, right: &Host, knobs: &str) -> anyhow::Result<Ours> {
    let (lif, rif) = (lab.unique_ifname("wgm"), lab.unique_ifname("wgm"));
    let l = Side::start(left, &lif, knobs).context("starting mesh-agent (left)")?;
    let r = Side::start(right, &rif, knobs).context("starting mesh-agent (right)")?;
    let lpub = l.cli(left, &["pubkey"])?;
    let rpub = r.cli(right, &["pubkey"])?;
    l.apply(left, &view(LEFT_OVERLAY, &rpub, RIGHT_UNDERLAY, RIGHT_OVERLAY))?;
    r.apply(right, &view(RIGHT_OVERLAY, &lpub, LEFT_UNDERLAY, LEFT_OVERLAY))?;
    let ours = Ours { sides: [(left.clone(), lif, l), (right.clone(), rif, r)] };
    super::wait_ping(left, RIGHT_OVERLAY).context("our tunnel does not pass a ping")?;
    Ok(ours)
}

fn view(own: &str, peer_key: &str, peer_underlay: &str, peer_overlay: &str) -> serde_json::Value {
    serde_json::json!({
        "generation": 1,
        "addresses": [format!("{own}/24")],
        // The same MTU as the other engines get.
        "mtu": 1420,
        "peers": [{
            "public_key": peer_key,
            "endpoint": format!("{peer_underlay}:{WG_PORT}"),
            "allowed_ips": [format!("{peer_overlay}/32")],
        }],
    })
}
