//! Two standalone gateways (`mesh-agent run` without control, views given
//! with `mesh-agent apply`), their site LANs and the node views that join
//! them: the set-up `agent_netns` and `tunnel_offload` share.

#![allow(dead_code, unreachable_pub, reason = "each test file uses part of it")]

use std::{fs::File, path::PathBuf, process::Stdio, time::Duration};

use mesh_lab::{Host, Lab, Process};

pub const BIN: &str = env!("CARGO_BIN_EXE_mesh-agent");

/// A gateway host with its agent's configuration and state.
pub struct Gateway {
    pub host: Host,
    pub ifname: String,
    pub dir: tempfile::TempDir,
    pub agent: Option<Process>,
}

impl Gateway {
    /// Userspace WireGuard, no enforcement, listening on 51820; `extra` is
    /// more top-level configuration (`log = "debug"`, `udp_gso = false`).
    pub fn new(host: Host, ifname: &str, extra: &str) -> Self {
        Self::with_enforcement(host, ifname, "enforcement = \"off\"\n", extra)
    }

    /// As [`Gateway::new`], with the eBPF ACL enforcing the views'
    /// policies. The pins go to a bpffs the agent mounts on /sys/fs/bpf in
    /// its own mount namespace (`ip netns exec` gives it one), so they go
    /// away with it.
    pub fn enforcing(host: Host, ifname: &str, extra: &str) -> Self {
        let settings =
            format!("enforcement = \"ebpf\"\nbpf_pin_dir = \"/sys/fs/bpf/{ifname}\"\nkeep_dataplane_on_exit = false\n");
        Self::with_enforcement(host, ifname, &settings, extra)
    }

    fn with_enforcement(host: Host, ifname: &str, enforcement: &str, extra: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let config = format!(
            "interface = \"{ifname}\"\nbackend = \"userspace\"\nlisten_port = 51820\nstate_dir = \"{}\"\n\
             {enforcement}{extra}",
            dir.path().join("state").display()
        );
        std::fs::write(dir.path().join("agent.toml"), config).unwrap();
        Self { host, ifname: ifname.to_owned(), dir, agent: None }
    }

    pub fn config(&self) -> PathBuf {
        self.dir.path().join("agent.toml")
    }

    /// Runs `mesh-agent <args[0]> --config ... <args[1..]>` in the host; its stdout.
    pub fn cli(&self, args: &[&str]) -> String {
        let config = self.config();
        let mut all = vec![args[0], "--config", config.to_str().unwrap()];
        all.extend_from_slice(&args[1..]);
        let out =
            self.host.exec(BIN, &all).unwrap_or_else(|e| panic!("mesh-agent {args:?} on {}: {e}", self.host.name()));
        String::from_utf8(out.stdout).unwrap()
    }

    pub fn pubkey(&self) -> String {
        self.cli(&["pubkey"]).trim().to_owned()
    }

    /// Starts `mesh-agent run` and waits for its admin socket.
    pub fn start(&mut self) {
        let log = File::options().create(true).append(true).open(self.dir.path().join("agent.log")).unwrap();
        let mut cmd = self.host.command(BIN, ["run", "--config", self.config().to_str().unwrap()]);
        cmd.stdin(Stdio::null()).stdout(log.try_clone().unwrap()).stderr(log);
        self.agent = Some(self.host.spawn_command(cmd).unwrap());
        let sock = self.dir.path().join("state/agent.sock");
        wait_for(&format!("{} agent socket", self.host.name()), || sock.exists());
    }

    /// Stops the agent; it must exit cleanly.
    pub fn stop(&mut self) {
        let status = self.agent.take().expect("agent running").terminate().unwrap();
        assert!(status.success(), "agent on {} exited with {status}; log:\n{}", self.host.name(), self.log());
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("agent.log")).unwrap_or_default()
    }

    /// `mesh-agent apply` of a view (JSON text); its report.
    pub fn apply(&self, view: &str) -> String {
        let path = self.dir.path().join("view.json");
        std::fs::write(&path, view).unwrap();
        self.cli(&["apply", "--state", path.to_str().unwrap()])
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        if let Some(agent) = self.agent.take() {
            let _ = agent.terminate();
        }
    }
}

/// [`mesh_lab::wait_for`] for up to 20 s (liveness, not a performance
/// assertion); a timeout fails the test.
pub fn wait_for(what: &str, f: impl FnMut() -> bool) {
    mesh_lab::wait_for(what, Duration::from_secs(20), f).unwrap_or_else(|e| panic!("{e}"));
}

/// The view of a gateway with overlay addresses `own` whose one peer (at
/// `peer_endpoint`, overlay addresses `peer`) serves `peer_site`.
pub fn view(own: (&str, &str), peer_key: &str, peer_endpoint: &str, peer: (&str, &str), peer_site: &str) -> String {
    serde_json::json!({
        "generation": 1,
        "addresses": [format!("{}/32", own.0), format!("{}/128", own.1)],
        "forwarding": true,
        "mtu": 1420,
        "peers": [{
            "public_key": peer_key,
            "name": "peer",
            "endpoint": peer_endpoint,
            "allowed_ips": [format!("{}/32", peer.0), format!("{}/128", peer.1), peer_site],
            "persistent_keepalive": 5,
        }],
        "routes": [format!("{}/32", peer.0), format!("{}/128", peer.1), peer_site],
    })
    .to_string()
}

/// Two gateways joined by a veth (192.0.2.1 and .2), each with a site LAN
/// and host (nyc 198.18.10.10, fsn 198.18.20.10): `(gw1, gw2, h1, h2)`.
pub fn two_sites(lab: &Lab) -> (Host, Host, Host, Host) {
    let gw1 = lab.host("gw1").unwrap();
    let gw2 = lab.host("gw2").unwrap();
    lab.link(&gw1, "eth0", &gw2, "eth0").unwrap();
    gw1.addr("eth0", "192.0.2.1/24").unwrap();
    gw2.addr("eth0", "192.0.2.2/24").unwrap();
    let h1 = site(lab, &gw1, "nyc", "198.18.10.1", "198.18.10.10", "198.18.20.0/24");
    let h2 = site(lab, &gw2, "fsn", "198.18.20.1", "198.18.20.10", "198.18.10.0/24");
    (gw1, gw2, h1, h2)
}

/// A site LAN behind `gw`: a switch, a host at `host_addr` routing
/// `remote_site` via the gateway at `gw_addr`.
pub fn site(lab: &Lab, gw: &Host, name: &str, gw_addr: &str, host_addr: &str, remote_site: &str) -> Host {
    let lan = lab.switch(&format!("lan_{name}")).unwrap();
    let h = lab.host(&format!("h_{name}")).unwrap();
    lan.plug(gw, "lan0").unwrap();
    lan.plug(&h, "eth0").unwrap();
    gw.addr("lan0", &format!("{gw_addr}/24")).unwrap();
    h.addr("eth0", &format!("{host_addr}/24")).unwrap();
    h.route_via(remote_site, gw_addr).unwrap();
    // Dropping the switch handle keeps its namespace: the lab owns it.
    drop(lan);
    h
}
