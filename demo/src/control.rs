//! The shipped binaries as the demo runs them: `mesh-control serve` as a
//! process in the lab's `ctl` namespace with the `control.toml` an operator
//! would write, `meshctl` for the operator's steps, and an admin client over
//! control's local socket for the checks.
//!
//! Each lab machine's files mirror the Debian packages' installed layout
//! under its own directory (`etc/mesh/`, `var/lib/mesh-control/`,
//! `run/mesh-control/`): the namespaces share one filesystem, so the real
//! `/etc/mesh` cannot hold six gateways' configurations.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context as _, bail};
use mesh_lab::{Host, Process};
use mesh_proto::v1::admin_service_client::AdminServiceClient;

/// Control's gRPC address in the lab.
pub(crate) const ADDRESS: &str = "192.0.2.100:7443";
/// Control's metrics address in the lab.
pub(crate) const METRICS: &str = "192.0.2.100:9464";

/// A shipped binary: next to `mesh-demo` (the same cargo profile, which
/// `cargo xtask demo` builds), or in `MESH_BIN_DIR` (e.g. `/usr/bin` after
/// installing the packages).
pub(crate) fn bin(name: &str) -> anyhow::Result<PathBuf> {
    let dir = bin_dir()?;
    let path = dir.join(name);
    if !path.is_file() {
        bail!("{} not found (looked in {}; `cargo xtask demo` builds it, or set MESH_BIN_DIR)", name, dir.display());
    }
    Ok(path)
}

/// Where the shipped binaries are taken from (see [`bin`]).
pub(crate) fn bin_dir() -> anyhow::Result<PathBuf> {
    Ok(match std::env::var_os("MESH_BIN_DIR") {
        Some(d) => PathBuf::from(d),
        None => std::env::current_exe()?.parent().context("mesh-demo's directory")?.to_owned(),
    })
}

/// A machine's root in the lab: its files under the installed layout.
#[derive(Clone, Debug)]
pub(crate) struct Root(pub PathBuf);

impl Root {
    pub(crate) fn etc(&self) -> PathBuf {
        self.0.join("etc/mesh")
    }
    pub(crate) fn var_lib(&self, service: &str) -> PathBuf {
        self.0.join("var/lib").join(service)
    }
    pub(crate) fn run(&self, service: &str) -> PathBuf {
        self.0.join("run").join(service)
    }
    pub(crate) fn log(&self, service: &str) -> PathBuf {
        self.0.join("var/log").join(format!("{service}.log"))
    }
}

/// Control as the demo runs it.
#[derive(Debug)]
pub(crate) struct Control {
    pub(crate) root: Root,
    process: Option<Process>,
}

impl Control {
    /// The local admin socket (root only, no token needed).
    pub(crate) fn socket(&self) -> PathBuf {
        self.root.run("mesh-control").join("admin.sock")
    }

    pub(crate) fn config(&self) -> PathBuf {
        self.root.etc().join("control.toml")
    }

    pub(crate) fn log(&self) -> PathBuf {
        self.root.log("mesh-control")
    }

    /// Control's relay ticket key (base64), as `mesh-control relay-key`
    /// prints it for the relays' `control_keys`.
    pub(crate) fn relay_key(&self) -> anyhow::Result<String> {
        let out = Command::new(bin("mesh-control")?)
            .args(["relay-key", "--config"])
            .arg(self.config())
            .stdin(Stdio::null())
            .output()
            .context("running mesh-control relay-key")?;
        if !out.status.success() {
            bail!("mesh-control relay-key: {}", String::from_utf8_lossy(&out.stderr).trim());
        }
        Ok(String::from_utf8(out.stdout)?.trim().to_owned())
    }

    /// `meshctl --socket <control's socket> ARGS`, its stdout on success.
    pub(crate) fn meshctl<const N: usize>(&self, args: [&str; N]) -> anyhow::Result<String> {
        let out = Command::new(bin("meshctl")?)
            .arg("--socket")
            .arg(self.socket())
            .args(args)
            .stdin(Stdio::null())
            .output()
            .context("running meshctl")?;
        if !out.status.success() {
            bail!("meshctl {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
        }
        Ok(String::from_utf8(out.stdout)?)
    }
}

/// The `control.toml` of the lab: the shipped defaults except the lab's
/// address, and failover timings short enough for a demo.
fn config_text(root: &Root) -> String {
    format!(
        "# mesh-control in the demo lab (see deploy/config/control.toml for every key).\n\
         listen = \"{ADDRESS}\"\n\
         # The name agents dial, in control's certificate.\n\
         tls_names = [\"192.0.2.100\"]\n\
         data_dir = \"{data}\"\n\
         admin_socket = \"{sock}\"\n\
         metrics_listen = \"{METRICS}\"\n\
         # The topology page (plain HTTP, behind an admin token), on the lab's\n\
         # control address; the demo's browser check opens it.\n\
         web_listen = \"{web}\"\n\
         # How often control re-evaluates route health, and how long a recovered\n\
         # primary waits before it takes its routes back (the demo's HA check\n\
         # waits for this hold-down).\n\
         poll_interval_ms = 100\n\
         hold_down_secs = 5\n",
        web = crate::web::LISTEN,
        data = root.var_lib("mesh-control").display(),
        sock = root.run("mesh-control").join("admin.sock").display(),
    )
}

/// Writes control's configuration under `root` (with `extra` TOML at its
/// end) and starts `mesh-control serve` in `host`'s namespace; returns once
/// its admin socket answers.
pub(crate) async fn start(host: &Host, root: Root, extra: &str) -> anyhow::Result<Control> {
    for dir in [root.etc(), root.run("mesh-control"), root.0.join("var/log")] {
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let mut control = Control { root, process: None };
    std::fs::write(control.config(), config_text(&control.root) + extra)?;
    let log = File::create(control.log())?;
    let exe = bin("mesh-control")?;
    let config = control.config();
    let mut cmd = host.command(
        exe.to_str().context("mesh-control's path")?,
        ["serve", "--config", config.to_str().context("config path")?],
    );
    cmd.env("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()));
    cmd.stdin(Stdio::null()).stdout(log.try_clone()?).stderr(log);
    control.process = Some(host.spawn_command(cmd)?);
    let started = std::time::Instant::now();
    loop {
        if admin_at(&control.socket()).await.is_ok() {
            return Ok(control);
        }
        if let Some(status) = control.process.as_mut().and_then(|p| p.child().try_wait().ok().flatten()) {
            bail!("mesh-control exited ({status}):\n{}", std::fs::read_to_string(control.log()).unwrap_or_default());
        }
        if started.elapsed() > Duration::from_secs(30) {
            bail!("mesh-control did not open its admin socket within 30 s (log: {})", control.log().display());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

impl Drop for Control {
    fn drop(&mut self) {
        // SIGTERM: control shuts down as under systemd.
        if let Some(p) = self.process.take() {
            let _ = p.terminate();
        }
    }
}

async fn admin_at(socket: &Path) -> anyhow::Result<AdminServiceClient<tonic::transport::Channel>> {
    Ok(AdminServiceClient::new(mesh_client::channel::connect_unix(socket).await?))
}

/// An admin client over control's local socket (no token needed).
pub(crate) async fn admin(control: &Control) -> anyhow::Result<AdminServiceClient<tonic::transport::Channel>> {
    admin_at(&control.socket()).await
}
