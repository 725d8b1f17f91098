//! Gateway failover driven by health: a continuous UDP flow from a nyc app
//! host to a fsn db host crosses fsn's primary gateway; (1) the primary is
//! killed (process and links) and (2) the primary stays up but loses its
//! LAN (its route is reported unhealthy). Both times control re-orders the
//! fsn prefix, the nyc gateway moves it to fsn's second gateway and the
//! flow resumes; the outage (longest gap at the receiver) is printed. When
//! the first gateway comes back, the route fails back only after control's
//! hold-down.
//!
//! The flow is one-way on purpose: the return path from a site LAN to its
//! gateways (a VIP or VRRP on the LAN) is not part of the mesh yet.

use std::{
    fs::File,
    net::{SocketAddr, UdpSocket},
    path::{Path, PathBuf},
    process::Stdio,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use mesh_control::client::connect_unix;
use mesh_lab::{Host, Lab, Process};
use mesh_proto::v1 as pb;
use mesh_proto::v1::admin_service_client::AdminServiceClient;

const BIN: &str = env!("CARGO_BIN_EXE_mesh-agent");
const CONTROL: &str = "192.0.2.100:7443";

const POLICY: &str = r#"{
  "tagOwners": {"tag:gw": []},
  "hosts": {"app-nyc": "198.18.10.10/32", "db-fsn": "198.18.20.20/32"},
  "autoApprovers": {"routes": {"198.18.10.0/24": ["tag:gw"], "198.18.20.0/24": ["tag:gw"]}},
  "acls": [
    {"action": "accept", "src": ["198.18.10.0/24", "198.18.20.0/24"], "dst": ["198.18.10.0/24:*", "198.18.20.0/24:*"], "proto": "icmp"},
    {"action": "accept", "src": ["app-nyc"], "dst": ["db-fsn:9000"], "proto": "udp"},
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
                    hold_down_secs: 3,
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
             [control]\naddress = \"{CONTROL}\"\nenrollment_key_file = \"{key}\"\nhostname = \"{name}\"\n\
             advertise_routes = [\"{lan}\"]\nendpoints = [\"{underlay}:51820\"]\nhealth_interval_secs = 0.2\n\
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
}

fn wait_for(what: &str, logs: &dyn Fn() -> String, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < Duration::from_secs(40), "timed out waiting for {what}\n{}", logs());
        std::thread::sleep(Duration::from_millis(200));
    }
}

async fn key(a: &mut Admin) -> String {
    a.create_enrollment_key(pb::CreateEnrollmentKeyRequest {
        reusable: true,
        preapproved: true,
        tags: vec!["tag:gw".into()],
        ..Default::default()
    })
    .await
    .unwrap()
    .into_inner()
    .secret
}

/// A continuous UDP flow (one datagram every 2 ms) from `from` to `to`;
/// the receiver keeps arrival times.
struct Flow {
    stop: Arc<AtomicBool>,
    arrivals: Arc<Mutex<Vec<Instant>>>,
}

impl Flow {
    fn start(from: &Host, to_host: &Host, to: SocketAddr) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let arrivals = Arc::new(Mutex::new(Vec::new()));
        let rx = to_host.run(move || UdpSocket::bind(to).unwrap()).unwrap();
        rx.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
        let tx = from.run(|| UdpSocket::bind("0.0.0.0:0").unwrap()).unwrap();
        {
            let (stop, arrivals) = (stop.clone(), arrivals.clone());
            std::thread::spawn(move || {
                let mut buf = [0u8; 64];
                while !stop.load(Ordering::Relaxed) {
                    if rx.recv(&mut buf).is_ok() {
                        arrivals.lock().unwrap().push(Instant::now());
                    }
                }
            });
        }
        {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut seq = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let _ = tx.send_to(&seq.to_be_bytes(), to);
                    seq += 1;
                    std::thread::sleep(Duration::from_millis(2));
                }
            });
        }
        Self { stop, arrivals }
    }

    fn received(&self) -> usize {
        self.arrivals.lock().unwrap().len()
    }

    /// The longest gap between two arrivals after `since`.
    fn longest_gap_since(&self, since: Instant) -> Duration {
        let a = self.arrivals.lock().unwrap();
        let mut prev = since;
        let mut worst = Duration::ZERO;
        for t in a.iter().filter(|t| **t >= since) {
            worst = worst.max(t.duration_since(prev));
            prev = *t;
        }
        worst
    }
}

impl Drop for Flow {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn primary(rt: &tokio::runtime::Runtime, dir: &Path, prefix: &str) -> String {
    rt.block_on(async {
        let routes = admin(dir).await.list_routes(pb::Empty {}).await.unwrap().into_inner().routes;
        routes.iter().find(|r| r.prefix == prefix && r.primary).map(|r| r.node_name.clone()).unwrap_or_default()
    })
}

/// Flow resumes after the break; returns the outage.
fn outage(flow: &Flow, cut: Instant, logs: &dyn Fn() -> String) -> Duration {
    let before = flow.received();
    wait_for("the flow to resume through the backup", logs, || flow.received() > before + 200);
    flow.longest_gap_since(cut)
}

#[test]
fn failover_on_gateway_loss_and_on_lan_loss_with_hold_down() {
    let lab = Lab::new().unwrap();
    let ctl = lab.host("ctl").unwrap();
    let nyc = lab.host("nycgw1").unwrap();
    let f1 = lab.host("fsngw1").unwrap();
    let f2 = lab.host("fsngw2").unwrap();
    let app = lab.host("app").unwrap();
    let db = lab.host("db").unwrap();
    let wan = lab.switch("wan").unwrap();
    let mut wan_ports = Vec::new();
    for (h, a) in [(&ctl, "192.0.2.100"), (&nyc, "192.0.2.11"), (&f1, "192.0.2.21"), (&f2, "192.0.2.22")] {
        wan_ports.push(wan.plug(h, "eth0").unwrap());
        h.addr("eth0", &format!("{a}/24")).unwrap();
    }
    let lnyc = lab.switch("lnyc").unwrap();
    lnyc.plug(&nyc, "lan0").unwrap();
    lnyc.plug(&app, "eth0").unwrap();
    nyc.addr("lan0", "198.18.10.1/24").unwrap();
    app.addr("eth0", "198.18.10.10/24").unwrap();
    app.route_via("198.18.0.0/16", "198.18.10.1").unwrap();
    let lfsn = lab.switch("lfsn").unwrap();
    let f1_lan = lfsn.plug(&f1, "lan0").unwrap();
    lfsn.plug(&f2, "lan0").unwrap();
    lfsn.plug(&db, "eth0").unwrap();
    f1.addr("lan0", "198.18.20.1/24").unwrap();
    f2.addr("lan0", "198.18.20.2/24").unwrap();
    db.addr("eth0", "198.18.20.20/24").unwrap();

    let ctl_dir = tempfile::tempdir().unwrap();
    let _control = Control::start(&ctl, ctl_dir.path());
    let rt = rt();
    let k = rt.block_on(async {
        let mut a = admin(ctl_dir.path()).await;
        a.set_policy(pb::PolicyDocument { text: POLICY.into(), generation: 0 }).await.unwrap();
        key(&mut a).await
    });
    let bpf = BpfFs::mount();
    let mk = |h: &Host, u: &str, lan: &str| Gateway::new(h.clone(), &lab.unique_ifname("wg"), bpf.0.path(), &k, u, lan);
    let mut gn = mk(&nyc, "192.0.2.11", "198.18.10.0/24");
    let mut g1 = mk(&f1, "192.0.2.21", "198.18.20.0/24");
    let mut g2 = mk(&f2, "192.0.2.22", "198.18.20.0/24");
    let paths: Vec<PathBuf> = [&gn, &g1, &g2].iter().map(|g| g.dir.path().join("agent.log")).collect();
    let logs = || {
        paths
            .iter()
            .map(|p| format!("--- {}:\n{}\n", p.display(), std::fs::read_to_string(p).unwrap_or_default()))
            .collect::<String>()
    };
    gn.start();
    g1.start();
    wait_for("fsn-gw1 primary", &logs, || primary(&rt, ctl_dir.path(), "198.18.20.0/24") == "fsngw1");
    g2.start();
    wait_for("three routes", &logs, || {
        rt.block_on(async {
            admin(ctl_dir.path()).await.list_routes(pb::Empty {}).await.unwrap().into_inner().routes.len()
        }) == 3
    });
    // fsn-gw1 is preferred (lower priority value), so fail-back happens.
    rt.block_on(async {
        let mut a = admin(ctl_dir.path()).await;
        for r in a.list_routes(pb::Empty {}).await.unwrap().into_inner().routes {
            let priority = if r.node_name == "fsngw2" { 10 } else { 0 };
            a.set_route_priority(pb::SetRoutePriorityRequest {
                route: Some(pb::RouteRef { node_id: r.node_id, prefix: r.prefix }),
                priority,
            })
            .await
            .unwrap();
        }
    });
    let flow = Flow::start(&app, &db, "198.18.20.20:9000".parse().unwrap());
    wait_for("the flow through fsn-gw1", &logs, || flow.received() > 100);

    // 1. fsn-gw1 dies: process killed, links down.
    let cut = Instant::now();
    g1.agent.take().unwrap().child().kill().unwrap();
    wan.set_port(&wan_ports[2], false).unwrap();
    lfsn.set_port(&f1_lan, false).unwrap();
    let out1 = outage(&flow, cut, &logs);
    assert_eq!(primary(&rt, ctl_dir.path(), "198.18.20.0/24"), "fsngw2");
    println!("failover outage, primary killed: {} ms", out1.as_millis());

    // It comes back: fail-back waits for the hold-down (3 s).
    wan.set_port(&wan_ports[2], true).unwrap();
    lfsn.set_port(&f1_lan, true).unwrap();
    g1.start();
    wait_for("fsn-gw1 online again", &logs, || {
        rt.block_on(async {
            let nodes =
                admin(ctl_dir.path()).await.list_nodes(pb::ListNodesRequest {}).await.unwrap().into_inner().nodes;
            nodes.iter().any(|n| n.name == "fsngw1" && n.online)
        })
    });
    assert_eq!(primary(&rt, ctl_dir.path(), "198.18.20.0/24"), "fsngw2", "no fail-back before the hold-down");
    wait_for("fail-back to fsn-gw1 after the hold-down", &logs, || {
        primary(&rt, ctl_dir.path(), "198.18.20.0/24") == "fsngw1"
    });
    let resumed = flow.received();
    wait_for("the flow through fsn-gw1 again", &logs, || flow.received() > resumed + 200);

    // 2. fsn-gw1 stays up but loses its LAN: it reports the route unhealthy.
    let cut = Instant::now();
    lfsn.set_port(&f1_lan, false).unwrap();
    let out2 = outage(&flow, cut, &logs);
    assert_eq!(primary(&rt, ctl_dir.path(), "198.18.20.0/24"), "fsngw2");
    let routes =
        rt.block_on(async { admin(ctl_dir.path()).await.list_routes(pb::Empty {}).await.unwrap().into_inner().routes });
    assert!(routes.iter().any(|r| r.node_name == "fsngw1" && !r.healthy), "{routes:?}");
    println!("failover outage, primary lost its LAN: {} ms", out2.as_millis());

    drop(flow);
    gn.stop();
    g2.stop();
    g1.stop();
}
