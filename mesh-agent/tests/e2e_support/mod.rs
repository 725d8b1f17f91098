//! What the end-to-end tests share: mesh-control on a thread inside a lab
//! namespace, gateways running `mesh-agent run` against it, a bpffs outside
//! /sys, and polling with the agents' logs on timeout.
#![allow(dead_code, unreachable_pub, reason = "each test file uses part of it")]

use std::{
    fs::File,
    path::{Path, PathBuf},
    process::Stdio,
    time::Duration,
};

use mesh_client::channel::connect_unix;
use mesh_lab::{Host, Process};
use mesh_proto::v1::{self as pb, admin_service_client::AdminServiceClient};

pub const BIN: &str = env!("CARGO_BIN_EXE_mesh-agent");
pub const CONTROL: &str = mesh_lab::control::ADDRESS;

/// Gateway settings that differ between the tests.
#[derive(Debug, Clone, Copy)]
pub struct Tuning {
    /// `metrics_listen` of the agent, if it serves metrics.
    pub metrics_listen: Option<&'static str>,
    /// Seconds between health reports to control.
    pub health_interval_secs: f64,
    /// More TOML appended to the agent's configuration (tables such as `[probe]`).
    pub extra: &'static str,
}

/// mesh-control running on its own thread inside the `ctl` namespace.
pub struct Control(mesh_lab::control::ControlInNs);

impl Control {
    /// Starts control with fail-back hold-down `hold_down_secs`.
    pub fn start(host: &Host, dir: &Path, hold_down_secs: i64) -> Self {
        Self::start_with_clock(host, dir, hold_down_secs, std::sync::Arc::new(mesh_control::engine::SystemClock))
    }

    /// [`Self::start`], with control's engine reading the time from `clock`.
    pub fn start_with_clock(
        host: &Host,
        dir: &Path,
        hold_down_secs: i64,
        clock: std::sync::Arc<dyn mesh_control::engine::Clock>,
    ) -> Self {
        let config = mesh_control::config::Config { hold_down_secs, ..mesh_lab::control::lab_config(dir) };
        Self(mesh_lab::control::ControlInNs::start_with_clock(host, config, clock).expect("control starts"))
    }

    pub fn stop(&mut self) {
        self.0.stop();
    }
}

/// Lab hosts `(name, address)` on one WAN switch, each with its address
/// (/24) on `eth0`.
pub fn wan(lab: &mesh_lab::Lab, hosts: &[(&str, &str)]) -> Vec<Host> {
    let wan = lab.switch("wan").unwrap();
    hosts
        .iter()
        .map(|(name, addr)| {
            let h = lab.host(name).unwrap();
            wan.plug(&h, "eth0").unwrap();
            h.addr("eth0", &format!("{addr}/24")).unwrap();
            h
        })
        .collect()
}

/// Gateways without probes (no local failover), reporting every second.
pub const NO_PROBES: Tuning = Tuning { metrics_listen: None, health_interval_secs: 1.0, extra: "[probe]\nport = 0\n" };

pub type Admin = AdminServiceClient<tonic::transport::Channel>;

pub fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
}

pub async fn admin(dir: &Path) -> Admin {
    AdminServiceClient::new(connect_unix(&dir.join("admin.sock")).await.unwrap())
}

/// Sets `policy` at the control in `dir` and makes `n` one-off gateway keys.
pub fn policy_and_keys(rt: &tokio::runtime::Runtime, dir: &Path, policy: &str, n: usize) -> Vec<String> {
    rt.block_on(async {
        let mut a = admin(dir).await;
        a.set_policy(pb::PolicyDocument { text: policy.into(), generation: 0 }).await.unwrap();
        let mut keys = Vec::new();
        for _ in 0..n {
            keys.push(gateway_key(&mut a, false).await);
        }
        keys
    })
}

/// A preapproved enrollment key for `tag:gw` gateways (one use, or
/// `reusable`); its secret text.
pub async fn gateway_key(a: &mut Admin, reusable: bool) -> String {
    let req = pb::CreateEnrollmentKeyRequest {
        reusable,
        preapproved: true,
        tags: vec!["tag:gw".into()],
        ..Default::default()
    };
    a.create_enrollment_key(req).await.unwrap().into_inner().secret
}

/// A bpffs mounted outside /sys (`ip netns exec` remounts /sys, which
/// would hide pins under /sys/fs/bpf from the agents).
pub struct BpfFs(pub tempfile::TempDir);

impl BpfFs {
    pub fn mount() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let out = std::process::Command::new("mount").args(["-t", "bpf", "bpf"]).arg(dir.path()).output().unwrap();
        assert!(out.status.success(), "mount bpffs: {}", String::from_utf8_lossy(&out.stderr));
        Self(dir)
    }
}

impl Drop for BpfFs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(self.0.path()).status();
    }
}

pub struct Gateway {
    pub host: Host,
    pub dir: tempfile::TempDir,
    pub agent: Option<Process>,
}

impl Gateway {
    /// Writes the agent's config advertising `lans`; `tuning` holds what the
    /// tests set differently.
    pub fn new(
        host: Host,
        ifname: &str,
        bpf: &Path,
        key: &str,
        underlay: &str,
        lans: &[&str],
        tuning: &Tuning,
    ) -> Self {
        let dir = tempfile::tempdir().unwrap();
        // 0600, or the agent refuses it.
        mesh_local::secret_file::write(&dir.path().join("enroll.key"), key.as_bytes()).unwrap();
        let config = format!(
            "interface = \"{ifname}\"\nbackend = \"userspace\"\nlisten_port = 51820\nstate_dir = \"{state}\"\n\
             enforcement = \"{enf}\"\nbpf_pin_dir = \"{bpf}\"\nkeep_dataplane_on_exit = false\n\
             reconcile_interval_secs = 1\nretry_interval_secs = 0.5\nlog = \"info,mesh_agent=debug\"\n\
             {metrics}\
             [control]\naddress = \"{CONTROL}\"\nenrollment_key_file = \"{key}\"\nhostname = \"{name}\"\n\
             advertise_routes = [{lans}]\nendpoints = [\"{underlay}:51820\"]\nhealth_interval_secs = {health}\n\
             max_backoff_secs = 1\npersistent_keepalive = 5\n{extra}",
            state = dir.path().join("state").display(),
            bpf = bpf.display(),
            key = dir.path().join("enroll.key").display(),
            name = host.name(),
            enf = std::env::var("E2E_ENFORCEMENT").unwrap_or_else(|_| "ebpf".into()),
            metrics = tuning.metrics_listen.map(|m| format!("metrics_listen = \"{m}\"\n")).unwrap_or_default(),
            health = tuning.health_interval_secs,
            extra = tuning.extra,
            lans = lans.iter().map(|l| format!("\"{l}\"")).collect::<Vec<_>>().join(", "),
        );
        std::fs::write(dir.path().join("agent.toml"), config).unwrap();
        Self { host, dir, agent: None }
    }

    /// Appends TOML to the agent's configuration (read at the next start).
    pub fn append_config(&self, toml: &str) {
        use std::io::Write as _;
        let mut f = File::options().append(true).open(self.dir.path().join("agent.toml")).unwrap();
        f.write_all(toml.as_bytes()).unwrap();
    }

    /// Turns the underlay guard on (XDP on `ifname`), as a production
    /// gateway runs: a top-level key, so it goes before the tables.
    pub fn guard_underlay(&self, ifname: &str) {
        self.prepend_config(&format!("underlay_interface = \"{ifname}\"\n"));
    }

    /// Puts top-level TOML keys before the configuration's tables.
    pub fn prepend_config(&self, toml: &str) {
        let path = self.dir.path().join("agent.toml");
        let config = std::fs::read_to_string(&path).unwrap();
        std::fs::write(&path, format!("{toml}{config}")).unwrap();
    }

    /// One metric's value from the agent's metrics endpoint at `addr`
    /// (inside its namespace), if it is there.
    pub fn metric(&self, addr: &str, name: &str) -> Option<f64> {
        use std::io::{Read as _, Write as _};
        let addr: std::net::SocketAddr = addr.parse().unwrap();
        let body = self
            .host
            .run(move || {
                let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
                s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n")?;
                let mut body = String::new();
                s.read_to_string(&mut body)?;
                Ok::<_, std::io::Error>(body)
            })
            .unwrap()
            .ok()?;
        body.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
    }

    /// The agent's status as JSON (`mesh-agent status --format json`).
    pub fn status_json(&self) -> serde_json::Value {
        let config = self.dir.path().join("agent.toml");
        let out = self.host.exec(BIN, ["status", "--config", config.to_str().unwrap(), "--format", "json"]).unwrap();
        serde_json::from_slice(&out.stdout).unwrap()
    }

    /// Frames the underlay guard counted with `verdict` (`"DropRateLimited"`).
    pub fn guard_count(&self, verdict: &str) -> u64 {
        let status = self.status_json();
        let guard = status["dataplane"]["guard"].as_array().cloned().unwrap_or_default();
        guard.iter().find(|e| e[0] == verdict).and_then(|e| e[1].as_u64()).unwrap_or(0)
    }

    pub fn start(&mut self) {
        let log = File::options().create(true).append(true).open(self.dir.path().join("agent.log")).unwrap();
        let config = self.dir.path().join("agent.toml");
        let mut cmd = self.host.command(BIN, ["run", "--config", config.to_str().unwrap()]);
        cmd.stdin(Stdio::null()).stdout(log.try_clone().unwrap()).stderr(log);
        self.agent = Some(self.host.spawn_command(cmd).unwrap());
    }

    pub fn stop(&mut self) {
        if let Some(a) = self.agent.take() {
            let status = a.terminate().unwrap();
            assert!(status.success(), "agent on {} exited with {status}; log:\n{}", self.host.name(), self.log());
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("agent.log")).unwrap_or_default()
    }

    pub fn credential(&self) -> PathBuf {
        self.dir.path().join("state/control.json")
    }
}

/// [`mesh_lab::wait_for`] for 40 s; a timeout fails the test with the logs.
pub fn wait_for(what: &str, logs: &dyn Fn() -> String, f: impl FnMut() -> bool) {
    if let Err(e) = mesh_lab::wait_for(what, Duration::from_secs(40), f) {
        panic!("{e}\n{}", logs());
    }
}

#[path = "../../../xtask/src/postgres.rs"]
mod postgres;

/// A fresh, empty schema on the test PostgreSQL, as a URL: from
/// `MESH_TEST_DATABASE_URL` (set by `cargo xtask test`, required under
/// CI), or a local cluster the xtask helper starts.
pub fn postgres_schema() -> String {
    let url = std::env::var("MESH_TEST_DATABASE_URL").unwrap_or_else(|_| {
        assert!(std::env::var("CI").map_or(true, |v| v != "true"), "MESH_TEST_DATABASE_URL is unset under CI");
        postgres::ensure_postgres().expect("a local PostgreSQL")
    });
    let port = url.rsplit_once(':').and_then(|(_, rest)| rest.split('/').next()).expect("a port in the URL");
    let schema = format!("e2e_{}_{}", std::process::id(), std::time::UNIX_EPOCH.elapsed().unwrap().as_micros());
    let out = std::process::Command::new("runuser")
        .args(["-u", "postgres", "--", "psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-p", port, "-d", "mesh_test"])
        .args(["-c", &format!("CREATE SCHEMA {schema} AUTHORIZATION mesh_test")])
        .output()
        .unwrap();
    assert!(out.status.success(), "creating schema {schema}: {}", String::from_utf8_lossy(&out.stderr));
    let sep = if url.contains('?') { '&' } else { '?' };
    format!("{url}{sep}options=-c%20search_path%3D{schema}")
}

/// Makes `target` (on this machine's loopback, outside the lab) reachable
/// at [`Relay::port`] on 127.0.0.1 inside `host`'s namespace: a listener
/// there, relayed by threads here. For the test PostgreSQL, which listens
/// on the host's loopback only; [`Relay::cut`] takes it away, as an outage.
pub struct Relay {
    pub port: u16,
    cut: std::sync::Arc<std::sync::atomic::AtomicBool>,
    open: std::sync::Arc<std::sync::Mutex<Vec<std::net::TcpStream>>>,
}

impl Relay {
    pub fn into(host: &Host, target: std::net::SocketAddr) -> Self {
        use std::{
            net::{TcpListener, TcpStream},
            sync::atomic::Ordering,
        };
        let listener = host.run(|| TcpListener::bind("127.0.0.1:0")).unwrap().unwrap();
        let port = listener.local_addr().unwrap().port();
        let relay = Self { port, cut: Default::default(), open: Default::default() };
        let (cut, open) = (relay.cut.clone(), relay.open.clone());
        std::thread::spawn(move || {
            for inner in listener.incoming().flatten() {
                if cut.load(Ordering::SeqCst) {
                    continue;
                }
                let Ok(outer) = TcpStream::connect(target) else { continue };
                open.lock().unwrap().extend([inner.try_clone().unwrap(), outer.try_clone().unwrap()]);
                for (mut from, mut to) in [(inner.try_clone().unwrap(), outer.try_clone().unwrap()), (outer, inner)] {
                    std::thread::spawn(move || {
                        let _ = std::io::copy(&mut from, &mut to);
                        let _ = to.shutdown(std::net::Shutdown::Write);
                    });
                }
            }
        });
        relay
    }

    /// Closes every relayed connection and refuses new ones.
    pub fn cut(&self) {
        self.cut.store(true, std::sync::atomic::Ordering::SeqCst);
        for s in self.open.lock().unwrap().drain(..) {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }
}
