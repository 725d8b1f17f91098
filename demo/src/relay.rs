//! The relay in the demo: `mesh-relay --config relay.toml` on its own WAN
//! host, listed in control's `[[relays]]`, so every gateway discovers its
//! mapping from the reflector, checks its direct paths with disco pings and
//! keeps a relay attachment ready. The check blocks UDP at fsn's provider
//! (both fsn gateways' underlays, nftables) under a two-way conversation
//! app-nyc <-> db-fsn: the paths to fsn move to the relay, the policy still
//! holds there, and they come back to direct when UDP does.

use std::{
    fs::File,
    net::SocketAddr,
    path::PathBuf,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use mesh_lab::{Host, Process, twoway::Conversation};
use mesh_proto::v1 as pb;

use crate::control::{self, Root, bin};

/// The relay's TLS listener and reflector in the lab.
pub(crate) const ADDRESS: &str = "192.0.2.50:443";
const REFLECTOR: &str = "192.0.2.50:3478";
/// The relay's region.
pub(crate) const REGION: &str = "lab";
/// The bound of a move between direct and relay under two-way traffic.
pub(crate) const BOUND: Duration = Duration::from_secs(2);

/// mesh-relay as the demo runs it.
#[derive(Debug)]
pub(crate) struct Relay {
    root: Root,
    process: Option<Process>,
}

impl Relay {
    fn config(&self) -> PathBuf {
        self.root.etc().join("relay.toml")
    }

    pub(crate) fn log(&self) -> PathBuf {
        self.root.log("mesh-relay")
    }

    /// Writes `relay.toml` trusting `control_key` (base64).
    fn write_config(&self, control_key: &str) -> anyhow::Result<()> {
        let text = format!(
            "# mesh-relay in the demo lab (see deploy/config/relay.toml for every key).\n\
             listen = \"{ADDRESS}\"\nreflector = \"{REFLECTOR}\"\nmetrics = \"127.0.0.1:9480\"\n\
             cert = \"{cert}\"\nkey = \"{key}\"\nnames = [\"192.0.2.50\"]\nregion = \"{REGION}\"\n\
             # `mesh-control relay-key`: control's ticket-signing key.\ncontrol_keys = [\"{control_key}\"]\n",
            cert = self.root.var_lib("mesh-relay").join("relay.crt").display(),
            key = self.root.var_lib("mesh-relay").join("relay.key").display(),
        );
        std::fs::write(self.config(), text)?;
        Ok(())
    }

    /// Makes the relay's certificate (`mesh-relay --print-pin`) before
    /// control starts: control's `[[relays]]` entry pins it.
    pub(crate) fn prepare(root: Root) -> anyhow::Result<(Self, String)> {
        for dir in [root.etc(), root.var_lib("mesh-relay"), root.0.join("var/log")] {
            std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let relay = Self { root, process: None };
        // Control's key is not known yet: a placeholder for --print-pin.
        relay.write_config(&mesh_relay::ticket::key_to_b64(&[0; 32]))?;
        let out = Command::new(bin("mesh-relay")?).arg("--config").arg(relay.config()).arg("--print-pin").output()?;
        if !out.status.success() {
            bail!("mesh-relay --print-pin: {}", String::from_utf8_lossy(&out.stderr).trim());
        }
        let pin = String::from_utf8(out.stdout)?.trim().to_owned();
        Ok((relay, pin))
    }

    /// Control's `[[relays]]` entry for this relay.
    pub(crate) fn control_toml(pin: &str) -> String {
        format!(
            "# The relay gateways fall back to when no direct UDP path works.\n\
             [[relays]]\nregion = \"{REGION}\"\naddress = \"{ADDRESS}\"\ncert_sha256 = \"{pin}\"\nreflector = \"{REFLECTOR}\"\n"
        )
    }

    /// Starts the relay in `host`'s namespace trusting `control_key`, and
    /// waits for its listener.
    pub(crate) fn start(&mut self, host: &Host, control_key: &str) -> anyhow::Result<()> {
        self.write_config(control_key)?;
        let log = File::create(self.log())?;
        let exe = bin("mesh-relay")?;
        let config = self.config();
        let mut cmd =
            host.command(exe.to_str().context("mesh-relay's path")?, ["--config", config.to_str().context("path")?]);
        cmd.stdin(Stdio::null()).stdout(log.try_clone()?).stderr(log);
        self.process = Some(host.spawn_command(cmd)?);
        mesh_lab::wait_for("mesh-relay to listen", Duration::from_secs(10), || host.tcp_listening(443))
            .with_context(|| std::fs::read_to_string(self.log()).unwrap_or_default())?;
        Ok(())
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        if let Some(p) = self.process.take() {
            let _ = p.terminate();
        }
    }
}

/// What the relay check saw.
#[derive(Debug)]
pub(crate) struct Outcome {
    /// Gateway pairs that reported `direct` before the block, of all pairs.
    pub(crate) direct_before: (usize, usize),
    /// Longest two-way cut moving to the relay, and back to direct.
    pub(crate) to_relay: Duration,
    pub(crate) to_direct: Duration,
    /// Whether app-nyc reached db-fsn:5432 and was refused db-fsn:22 while relayed.
    pub(crate) policy_held: bool,
    /// The relayed pairs' lines (`from -> to: relay (lab)`).
    pub(crate) relayed: Vec<String>,
    /// Whether the TCP stream survived, checked end to end.
    pub(crate) stream_intact: bool,
}

fn links(rt: &tokio::runtime::Runtime, c: &control::Control) -> Vec<pb::PeerLink> {
    rt.block_on(async {
        let mut a = control::admin(c).await.ok()?;
        Some(a.get_status(pb::GetStatusRequest {}).await.ok()?.into_inner().peers)
    })
    .unwrap_or_default()
}

fn path_of(links: &[pb::PeerLink], from: &str, to: &str) -> String {
    links
        .iter()
        .find(|l| l.from_name == from && l.to_name == to)
        .and_then(|l| l.health.as_ref())
        .map(|h| h.path.clone())
        .unwrap_or_default()
}

/// The check (see the module's documentation): `pairs` is the number of
/// gateway pairs in the mesh; `blocked` are fsn's gateway hosts; `db_addr`
/// is db-fsn's address.
pub(crate) fn run(
    rt: &tokio::runtime::Runtime,
    c: &control::Control,
    pairs: usize,
    blocked: &[&Host],
    app: &Host,
    db: &Host,
    db_addr: &str,
) -> anyhow::Result<Outcome> {
    println!("== relay: UDP blocked at fsn's provider under two-way traffic app-nyc <-> db-fsn, then unblocked");
    let all = |l: &[pb::PeerLink]| {
        let with_path = l.iter().filter(|l| l.health.as_ref().is_some_and(|h| !h.path.is_empty())).count();
        let direct = l.iter().filter(|l| l.health.as_ref().is_some_and(|h| h.path == "direct")).count();
        (direct, with_path)
    };
    // Every pair, not only those reported so far: an agent restarted by the
    // step before has not reported all its peers' paths yet.
    let _ = mesh_lab::wait_for("every gateway pair direct", Duration::from_secs(20), || {
        let (d, n) = all(&links(rt, c));
        n == pairs && d == n
    });
    let direct_before = all(&links(rt, c));
    let others = ["nyc-gw1", "nyc-gw2", "gra-gw1", "gra-gw2"];
    let fsn = ["fsn-gw1", "fsn-gw2"];
    let paths_to_fsn = |want: &str| {
        let l = links(rt, c);
        others.iter().all(|f| fsn.iter().all(|t| path_of(&l, f, t) == want && path_of(&l, t, f) == want))
    };
    // The policy's conversation port (the HA check's, done by now).
    let conv = Conversation::start(app, db, &[format!("{db_addr}:9000").parse()?], Duration::from_millis(20))?;
    let server: SocketAddr = format!("{db_addr}:5432").parse()?;
    std::thread::sleep(Duration::from_secs(2));

    // Blocks (or unblocks) UDP at fsn, waits for the paths to be `want` and
    // the conversation to flow; the longest cut since the change.
    let switch = |block: bool, want: &str| -> anyhow::Result<Duration> {
        let t = Instant::now();
        for h in blocked {
            h.block_udp("eth0", block)?;
        }
        mesh_lab::wait_for(&format!("the paths to fsn {want}"), Duration::from_secs(20), || paths_to_fsn(want))?;
        mesh_lab::wait_for("the conversation flowing again", Duration::from_secs(10), || {
            conv.flowing_since(Instant::now() - Duration::from_millis(200))
        })?;
        std::thread::sleep(Duration::from_secs(1));
        Ok(conv.cuts(t).worst())
    };
    let to_relay = switch(true, "relay")?;
    let l = links(rt, c);
    let relayed = others
        .iter()
        .flat_map(|f| fsn.iter().map(move |g| (*f, *g)))
        .filter_map(|(f, g)| {
            let h = l.iter().find(|x| x.from_name == f && x.to_name == g)?.health.clone()?;
            Some(format!("{f} -> {g}: {} ({}), {} switches", h.path, h.relay_region, h.path_switches))
        })
        .collect();
    let policy_held =
        mesh_lab::traffic::tcp_echo(app, server) && !mesh_lab::traffic::tcp_echo(app, format!("{db_addr}:22").parse()?);

    let to_direct = switch(false, "direct")?;
    let stream_intact = conv.finish().is_ok();
    Ok(Outcome { direct_before, to_relay, to_direct, policy_held, relayed, stream_intact })
}
