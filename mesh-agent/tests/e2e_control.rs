//! `mesh-agent run` against a real mesh-control: two gateways enroll with
//! one-off enrollment keys, their site routes are approved by the policy's
//! `autoApprovers`, the views control pushes are applied (userspace
//! WireGuard, eBPF enforcement) and the site hosts reach each other as the
//! policy allows. Then control stops: the mesh keeps forwarding and
//! enforcing; a policy change is written to control's store meanwhile;
//! control comes back, the agents reconnect and enforce the new policy. A
//! restarted agent uses its stored credential (its key is spent).
//!
//! Lab:
//! ```text
//!        ctl 192.0.2.100 (mesh-control)
//!              |  wan 192.0.2.0/24
//!   gw-nyc 192.0.2.1         gw-fsn 192.0.2.2
//!      | lan 198.18.10.0/24     | lan 198.18.20.0/24
//!   app 198.18.10.10          db 198.18.20.20 (listens on 5432 and 7000)
//! ```

use std::{
    fs::File,
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::Stdio,
    time::{Duration, Instant},
};

use mesh_control::client::connect_unix;
use mesh_lab::{Host, Lab, Process};
use mesh_proto::v1 as pb;
use mesh_proto::v1::admin_service_client::AdminServiceClient;

const BIN: &str = env!("CARGO_BIN_EXE_mesh-agent");
const CONTROL: &str = "192.0.2.100:7443";

const POLICY_V1: &str = r#"{
  "tagOwners": {"tag:gw": []},
  "hosts": {"app-nyc": "198.18.10.10/32", "db-fsn": "198.18.20.20/32"},
  "autoApprovers": {"routes": {"198.18.10.0/24": ["tag:gw"], "198.18.20.0/24": ["tag:gw"]}},
  "acls": [
    {"action": "accept", "src": ["198.18.10.0/24", "198.18.20.0/24"], "dst": ["198.18.10.0/24:*", "198.18.20.0/24:*"], "proto": "icmp"},
    {"action": "accept", "src": ["app-nyc"], "dst": ["db-fsn:5432"]},
  ],
}"#;

/// V1 plus TCP 7000: the change made while control is down.
const POLICY_V2: &str = r#"{
  "tagOwners": {"tag:gw": []},
  "hosts": {"app-nyc": "198.18.10.10/32", "db-fsn": "198.18.20.20/32"},
  "autoApprovers": {"routes": {"198.18.10.0/24": ["tag:gw"], "198.18.20.0/24": ["tag:gw"]}},
  "acls": [
    {"action": "accept", "src": ["198.18.10.0/24", "198.18.20.0/24"], "dst": ["198.18.10.0/24:*", "198.18.20.0/24:*"], "proto": "icmp"},
    {"action": "accept", "src": ["app-nyc"], "dst": ["db-fsn:5432", "db-fsn:7000"]},
  ],
}"#;

/// mesh-control running on its own thread inside the `ctl` namespace.
struct Control {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Control {
    fn start(host: &Host, dir: &Path) -> Self {
        let host = host.clone();
        let dir = dir.to_owned();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || {
            host.enter_current_thread().unwrap();
            let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
            rt.block_on(async move {
                let config = mesh_control::config::Config {
                    listen: CONTROL.parse().unwrap(),
                    tls_names: vec!["192.0.2.100".into()],
                    data_dir: dir.clone(),
                    metrics_listen: None,
                    admin_socket: Some(dir.join("admin.sock")),
                    poll_interval_ms: 100,
                    hold_down_secs: 2,
                    ..mesh_control::config::Config::default()
                };
                let running = mesh_control::run::start(&config).await.expect("control starts");
                ready_tx.send(()).unwrap();
                let _ = stopped.await;
                running.shutdown();
            });
            rt.shutdown_timeout(Duration::from_secs(2));
        });
        ready_rx.recv_timeout(Duration::from_secs(30)).expect("control ready");
        Self { stop: Some(stop), thread: Some(thread) }
    }

    fn stop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
    }
}

impl Drop for Control {
    fn drop(&mut self) {
        self.stop();
    }
}

type Admin = AdminServiceClient<tonic::transport::Channel>;

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
}

async fn admin(dir: &Path) -> Admin {
    AdminServiceClient::new(connect_unix(&dir.join("admin.sock")).await.unwrap())
}

/// A bpffs mounted outside /sys (`ip netns exec` remounts /sys, which
/// would hide pins under /sys/fs/bpf from the agents).
struct BpfFs(tempfile::TempDir);

impl BpfFs {
    fn mount() -> Self {
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

struct Gateway {
    host: Host,
    dir: tempfile::TempDir,
    agent: Option<Process>,
}

impl Gateway {
    fn new(host: Host, ifname: &str, bpf: &Path, key: &str, underlay: &str, lan: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("enroll.key"), key).unwrap();
        let config = format!(
            "interface = \"{ifname}\"\nbackend = \"userspace\"\nlisten_port = 51820\nstate_dir = \"{state}\"\n\
             enforcement = \"{enf}\"\nbpf_pin_dir = \"{bpf}\"\nkeep_dataplane_on_exit = false\n\
             reconcile_interval_secs = 1\nretry_interval_secs = 0.5\nlog = \"info,mesh_agent=debug\"\n\
             metrics_listen = \"127.0.0.1:9300\"\n\
             [control]\naddress = \"{CONTROL}\"\nenrollment_key_file = \"{key}\"\nhostname = \"{name}\"\n\
             advertise_routes = [\"{lan}\"]\nendpoints = [\"{underlay}:51820\"]\nhealth_interval_secs = 1\n\
             max_backoff_secs = 1\npersistent_keepalive = 5\n",
            state = dir.path().join("state").display(),
            bpf = bpf.display(),
            key = dir.path().join("enroll.key").display(),
            name = host.name(),
            enf = std::env::var("E2E_ENFORCEMENT").unwrap_or_else(|_| "ebpf".into()),
        );
        std::fs::write(dir.path().join("agent.toml"), config).unwrap();
        Self { host, dir, agent: None }
    }

    fn start(&mut self) {
        let log = File::options().create(true).append(true).open(self.dir.path().join("agent.log")).unwrap();
        let config = self.dir.path().join("agent.toml");
        let mut cmd = self.host.command(BIN, ["run", "--config", config.to_str().unwrap()]);
        cmd.stdin(Stdio::null()).stdout(log.try_clone().unwrap()).stderr(log);
        self.agent = Some(self.host.spawn_command(cmd).unwrap());
    }

    fn stop(&mut self) {
        if let Some(a) = self.agent.take() {
            let status = a.terminate().unwrap();
            assert!(status.success(), "agent on {} exited with {status}; log:\n{}", self.host.name(), self.log());
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("agent.log")).unwrap_or_default()
    }

    fn credential(&self) -> PathBuf {
        self.dir.path().join("state/control.json")
    }
}

fn wait_for(what: &str, logs: &dyn Fn() -> String, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < Duration::from_secs(40), "timed out waiting for {what}\n{}", logs());
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn ping(from: &Host, to: &str) -> bool {
    from.exec_unchecked("ping", ["-c", "1", "-W", "1", to]).unwrap().status.success()
}

/// A TCP exchange from `from` to `to`: connect (1 s), send, read the echo.
fn tcp(from: &Host, to: &str) -> bool {
    let addr: SocketAddr = to.parse().unwrap();
    from.run(move || {
        let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_secs(1)) else { return false };
        let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
        if s.write_all(b"ping").is_err() {
            return false;
        }
        let mut buf = [0u8; 4];
        s.read_exact(&mut buf).is_ok() && &buf == b"ping"
    })
    .unwrap()
}

/// Echo servers on `db` (threads that live as long as the test).
fn echo_servers(db: &Host, addrs: &[&'static str]) {
    for &addr in addrs {
        let listener = db.run(move || TcpListener::bind(addr).unwrap()).unwrap();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut s) = conn else { continue };
                std::thread::spawn(move || {
                    let mut buf = [0u8; 64];
                    while let Ok(n) = s.read(&mut buf) {
                        if n == 0 || s.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                });
            }
        });
    }
}

async fn one_off_key(a: &mut Admin) -> String {
    a.create_enrollment_key(pb::CreateEnrollmentKeyRequest {
        preapproved: true,
        tags: vec!["tag:gw".into()],
        ..Default::default()
    })
    .await
    .unwrap()
    .into_inner()
    .secret
}

#[test]
fn agents_follow_control_and_survive_its_restart() {
    let lab = Lab::new().unwrap();
    let ctl = lab.host("ctl").unwrap();
    let gw_nyc = lab.host("gwnyc").unwrap();
    let gw_fsn = lab.host("gwfsn").unwrap();
    let app = lab.host("app").unwrap();
    let db = lab.host("db").unwrap();
    let wan = lab.switch("wan").unwrap();
    for (h, a) in [(&ctl, "192.0.2.100"), (&gw_nyc, "192.0.2.1"), (&gw_fsn, "192.0.2.2")] {
        wan.plug(h, "eth0").unwrap();
        h.addr("eth0", &format!("{a}/24")).unwrap();
    }
    for (name, gw, h, gw_addr, h_addr) in
        [("lnyc", &gw_nyc, &app, "198.18.10.1", "198.18.10.10"), ("lfsn", &gw_fsn, &db, "198.18.20.1", "198.18.20.20")]
    {
        let lan = lab.switch(name).unwrap();
        lan.plug(gw, "lan0").unwrap();
        lan.plug(h, "eth0").unwrap();
        gw.addr("lan0", &format!("{gw_addr}/24")).unwrap();
        h.addr("eth0", &format!("{h_addr}/24")).unwrap();
        h.route_via("198.18.0.0/16", gw_addr).unwrap();
    }
    echo_servers(&db, &["198.18.20.20:5432", "198.18.20.20:7000"]);

    let ctl_dir = tempfile::tempdir().unwrap();
    let mut control = Control::start(&ctl, ctl_dir.path());
    let rt = rt();
    let (k_nyc, k_fsn) = rt.block_on(async {
        let mut a = admin(ctl_dir.path()).await;
        a.set_policy(pb::PolicyDocument { text: POLICY_V1.into(), generation: 0 }).await.unwrap();
        (one_off_key(&mut a).await, one_off_key(&mut a).await)
    });

    let bpf = BpfFs::mount();
    let mut nyc = Gateway::new(gw_nyc, &lab.unique_ifname("wg"), bpf.0.path(), &k_nyc, "192.0.2.1", "198.18.10.0/24");
    let mut fsn = Gateway::new(gw_fsn, &lab.unique_ifname("wg"), bpf.0.path(), &k_fsn, "192.0.2.2", "198.18.20.0/24");
    nyc.start();
    fsn.start();
    let (log_nyc, log_fsn) = (nyc.dir.path().join("agent.log"), fsn.dir.path().join("agent.log"));
    let (h_nyc, h_fsn) = (nyc.host.clone(), fsn.host.clone());
    let logs = || {
        let read = |p: &Path| std::fs::read_to_string(p).unwrap_or_default();
        let show = |h: &Host| {
            let out =
                |p: &str, a: &[&str]| String::from_utf8_lossy(&h.exec_unchecked(p, a).unwrap().stdout).into_owned();
            format!("{}{}{}", out("wg", &["show", "all"]), out("ip", &["route"]), out("ip", &["addr"]))
        };
        format!("--- nyc:\n{}\n{}\n--- fsn:\n{}\n{}", read(&log_nyc), show(&h_nyc), read(&log_fsn), show(&h_fsn))
    };

    // Enrolled, routes auto-approved, views applied: the policy holds.
    wait_for("app -> db ping through the mesh", &logs, || ping(&app, "198.18.20.20"));
    assert!(tcp(&app, "198.18.20.20:5432"), "app -> db:5432 is allowed\n{}", logs());
    assert!(!tcp(&app, "198.18.20.20:7000"), "app -> db:7000 is not in policy v1\n{}", logs());
    {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(nyc.credential()).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "the credential is private");
    }
    let routes =
        rt.block_on(async { admin(ctl_dir.path()).await.list_routes(pb::Empty {}).await.unwrap().into_inner().routes });
    assert_eq!(routes.len(), 2, "{routes:?}");
    assert!(routes.iter().all(|r| r.approved && r.auto_approved), "{routes:?}");
    // Health reports arrive: control marks both nodes online and has their acks.
    wait_for("acks at control", &logs, || {
        let nodes = rt.block_on(async {
            admin(ctl_dir.path()).await.list_nodes(pb::ListNodesRequest {}).await.unwrap().into_inner().nodes
        });
        nodes.len() == 2 && nodes.iter().all(|n| n.online && n.acked_generation > 0)
    });

    // The metrics endpoint: Prometheus text that promtool accepts.
    let body = nyc
        .host
        .run(|| {
            let mut s = TcpStream::connect("127.0.0.1:9300").unwrap();
            s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").unwrap();
            let mut out = String::new();
            s.read_to_string(&mut out).unwrap();
            out
        })
        .unwrap();
    let (head, metrics) = body.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    for m in [
        "mesh_agent_up 1",
        "mesh_agent_policy_enforced 1",
        "mesh_agent_peer_handshake_age_seconds{",
        "mesh_agent_wireguard_backend{",
        "mesh_agent_acl_verdict_packets_total{verdict=\"AcceptRule\"}",
        "mesh_agent_mss_events_total{",
        "mesh_agent_control_connected 1",
        "mesh_agent_key_expiry_timestamp_seconds ",
        "mesh_agent_route_primary{prefix=\"198.18.20.0/24\",gateway=\"gwfsn\"} 1",
    ] {
        assert!(metrics.contains(m), "{m} missing:\n{metrics}");
    }
    let mut promtool = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (xtask setup installs it)");
    promtool.stdin.take().unwrap().write_all(metrics.as_bytes()).unwrap();
    let out = promtool.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}\n{metrics}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    // Control goes away: forwarding and enforcement go on.
    control.stop();
    for _ in 0..3 {
        assert!(ping(&app, "198.18.20.20"), "forwarding continues without control\n{}", logs());
        std::thread::sleep(Duration::from_millis(300));
    }
    assert!(tcp(&app, "198.18.20.20:5432"));
    assert!(!tcp(&app, "198.18.20.20:7000"), "still enforced without control");
    // A restarted agent comes back on its persisted view, without control.
    nyc.stop();
    nyc.start();
    wait_for("restarted agent forwards without control", &logs, || ping(&app, "198.18.20.20"));

    // Meanwhile the policy changes at control's store.
    rt.block_on(async {
        let url = format!("sqlite://{}", ctl_dir.path().join("control.db").display());
        let store = mesh_control::store::Store::open(&url).await.unwrap();
        store.set_policy(POLICY_V2, "test", chrono_now()).await.unwrap();
    });
    let mut control = Control::start(&ctl, ctl_dir.path());
    wait_for("the agents converge on policy v2", &logs, || tcp(&app, "198.18.20.20:7000"));
    assert!(tcp(&app, "198.18.20.20:5432"));
    assert!(ping(&app, "198.18.20.20"));
    // The restarted agent used its credential (its one-off key is spent):
    // still two nodes.
    let nodes = rt.block_on(async {
        admin(ctl_dir.path()).await.list_nodes(pb::ListNodesRequest {}).await.unwrap().into_inner().nodes
    });
    assert_eq!(nodes.len(), 2, "{nodes:?}");

    nyc.stop();
    fsn.stop();
    control.stop();
}

fn chrono_now() -> i64 {
    i64::try_from(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs()).unwrap()
}
