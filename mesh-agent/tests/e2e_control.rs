//! `mesh-agent run` against a real mesh-control: two gateways enroll with
//! one-off enrollment keys, their site routes are approved by the policy's
//! `autoApprovers`, the views control pushes are applied (userspace
//! WireGuard, eBPF enforcement) and the site hosts reach each other as the
//! policy allows. Then control stops: the mesh keeps forwarding and
//! enforcing; a policy change is written to control's store meanwhile;
//! control comes back, the agents reconnect and enforce the new policy. A
//! restarted agent uses its stored credential (its key is spent). The
//! agents probe each other and control shows the figures. Finally a policy
//! change while a TCP conversation runs: the conversation (its rule stays)
//! goes on, new flows follow the new policy.
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
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    path::Path,
    process::Stdio,
    time::Duration,
};

use mesh_lab::{Host, Lab};
use mesh_proto::v1 as pb;

const POLICY_V1: &str = r#"{
  "tagOwners": {"tag:gw": []},
  "hosts": {"app-nyc": "198.18.10.10/32", "db-fsn": "198.18.20.20/32"},
  "autoApprovers": {"routes": {"198.18.10.0/24": ["tag:gw"], "198.18.20.0/24": ["tag:gw"]}},
  "acls": [
    {"action": "accept", "src": ["198.18.10.0/24", "198.18.20.0/24"], "dst": ["198.18.10.0/24:*", "198.18.20.0/24:*"], "proto": "icmp"},
    {"action": "accept", "src": ["app-nyc"], "dst": ["db-fsn:5432"]},
  ],
}"#;

/// V2 without ICMP and without TCP 7000: the change made while traffic
/// flows. (Without a `proto`, an entry with ports also admits ICMP, as in
/// Tailscale's policy language: TCP only, to see ICMP go.)
const POLICY_V3: &str = r#"{
  "tagOwners": {"tag:gw": []},
  "hosts": {"app-nyc": "198.18.10.10/32", "db-fsn": "198.18.20.20/32"},
  "autoApprovers": {"routes": {"198.18.10.0/24": ["tag:gw"], "198.18.20.0/24": ["tag:gw"]}},
  "acls": [
    {"action": "accept", "src": ["app-nyc"], "dst": ["db-fsn:5432"], "proto": "tcp"},
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

mod e2e_support;

use e2e_support::{BpfFs, Control, Gateway, NO_PROBES, Tuning, admin, gateway_key, rt, wait_for};

/// Agents serve metrics (checked with promtool); health every second.
const TUNING: Tuning = Tuning { metrics_listen: Some("127.0.0.1:9300"), health_interval_secs: 1.0, extra: "" };

fn ping(from: &Host, to: &str) -> bool {
    from.exec_unchecked("ping", ["-c", "1", "-W", "1", to]).unwrap().status.success()
}

/// A TCP echo exchange from `from` to `to`.
fn tcp(from: &Host, to: &str) -> bool {
    mesh_lab::traffic::tcp_echo(from, to.parse().unwrap())
}

/// One long TCP conversation: a message every 10 ms, each echo awaited;
/// counts round trips and keeps the first error.
struct Conversation {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    trips: std::sync::Arc<std::sync::atomic::AtomicU64>,
    error: std::sync::Arc<std::sync::Mutex<Option<String>>>,
}

impl Conversation {
    fn start(from: &Host, to: &str) -> Self {
        use std::sync::{Arc, Mutex, atomic::*};
        let addr: SocketAddr = to.parse().unwrap();
        let mut s = from.run(move || TcpStream::connect_timeout(&addr, Duration::from_secs(2)).unwrap()).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let (stop, trips, error) =
            (Arc::new(AtomicBool::new(false)), Arc::new(AtomicU64::new(0)), Arc::new(Mutex::new(None)));
        let (st, tr, er) = (stop.clone(), trips.clone(), error.clone());
        std::thread::spawn(move || {
            let mut buf = [0u8; 8];
            while !st.load(Ordering::Relaxed) {
                let r = s.write_all(b"12345678").and_then(|()| s.read_exact(&mut buf));
                if let Err(e) = r {
                    *er.lock().unwrap() = Some(e.to_string());
                    return;
                }
                tr.fetch_add(1, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(10));
            }
        });
        Self { stop, trips, error }
    }

    fn round_trips(&self) -> u64 {
        self.trips.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn error(&self) -> Option<String> {
        self.error.lock().unwrap().clone()
    }
}

impl Drop for Conversation {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

#[test]
fn agents_follow_control_and_survive_its_restart() {
    mesh_lab::require_root!();
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
    mesh_lab::traffic::echo_servers(&db, &["198.18.20.20:5432".parse().unwrap(), "198.18.20.20:7000".parse().unwrap()])
        .unwrap();

    let ctl_dir = tempfile::tempdir().unwrap();
    let mut control = Control::start(&ctl, ctl_dir.path(), 2);
    let rt = rt();
    let [k_nyc, k_fsn]: [String; 2] =
        e2e_support::policy_and_keys(&rt, ctl_dir.path(), POLICY_V1, 2).try_into().unwrap();

    let bpf = BpfFs::mount();
    let mut nyc =
        Gateway::new(gw_nyc, &lab.unique_ifname("wg"), bpf.0.path(), &k_nyc, "192.0.2.1", &["198.18.10.0/24"], &TUNING);
    let mut fsn =
        Gateway::new(gw_fsn, &lab.unique_ifname("wg"), bpf.0.path(), &k_fsn, "192.0.2.2", &["198.18.20.0/24"], &TUNING);
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

    // The agents probe each other over the overlay and report it: control
    // shows per-peer RTT and loss, the backend, and each route's role.
    wait_for("probe figures at control", &logs, || {
        let st = rt.block_on(async {
            admin(ctl_dir.path()).await.get_status(pb::GetStatusRequest {}).await.unwrap().into_inner()
        });
        st.peers.iter().any(|l| {
            let h = l.health.clone().unwrap_or_default();
            // The path facts: the endpoint nyc's WireGuard sends fsn's packets to.
            l.from_name == "gwnyc"
                && l.to_name == "gwfsn"
                && h.probe_up
                && h.probe_rtt_p50_ms >= 0.0
                && h.endpoint == "192.0.2.2:51820"
                && h.rx_bytes > 0
        })
    });
    let nodes = rt.block_on(async {
        admin(ctl_dir.path()).await.list_nodes(pb::ListNodesRequest {}).await.unwrap().into_inner().nodes
    });
    assert!(nodes.iter().all(|n| n.backend == "userspace"), "{nodes:?}");
    let routes =
        rt.block_on(async { admin(ctl_dir.path()).await.list_routes(pb::Empty {}).await.unwrap().into_inner().routes });
    assert!(routes.iter().all(|r| r.rank == 0 && r.primary), "one gateway per site: all primary\n{routes:?}");

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
    // An HTTP/1.0 request gets an HTTP/1.0 answer.
    assert!(head.starts_with("HTTP/1.0 200"), "{head}");
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
        // prometheus-client writes `le` first; label order carries no meaning.
        "mesh_agent_peer_rtt_seconds_bucket{le=\"+Inf\",peer=\"gwfsn\"}",
        "mesh_agent_peer_probe_loss_ratio{peer=\"gwfsn\"}",
        "mesh_agent_peer_probe_up{peer=\"gwfsn\"} 1",
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
    // Its credential is made to look past half its lifetime: it renews it
    // once control is back.
    nyc.stop();
    let mut cred: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(nyc.credential()).unwrap()).unwrap();
    let (old_token, expires) = (cred["token"].clone(), cred["expires_unix"].as_i64().unwrap());
    cred["renewed_unix"] = serde_json::json!(expires - 2 * (expires - chrono_now()) - 10);
    std::fs::write(nyc.credential(), cred.to_string()).unwrap();
    nyc.start();
    wait_for("restarted agent forwards without control", &logs, || ping(&app, "198.18.20.20"));

    // Meanwhile the policy changes at control's store.
    rt.block_on(async {
        let url = format!("sqlite://{}", ctl_dir.path().join("control.db").display());
        let store = mesh_control::store::Store::open(&url).await.unwrap();
        store.set_policy(POLICY_V2, "test", chrono_now()).await.unwrap();
    });
    let mut control = Control::start(&ctl, ctl_dir.path(), 2);
    wait_for("the agents converge on policy v2", &logs, || tcp(&app, "198.18.20.20:7000"));
    assert!(tcp(&app, "198.18.20.20:5432"));
    assert!(ping(&app, "198.18.20.20"));
    // The restarted agent used its credential (its one-off key is spent):
    // still two nodes.
    let nodes = rt.block_on(async {
        admin(ctl_dir.path()).await.list_nodes(pb::ListNodesRequest {}).await.unwrap().into_inner().nodes
    });
    assert_eq!(nodes.len(), 2, "{nodes:?}");
    wait_for("the nyc credential renewed", &logs, || {
        let cred: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(nyc.credential()).unwrap()).unwrap();
        cred["token"] != old_token
    });
    assert!(nyc.log().contains("credential renewed"));

    // A policy change while traffic flows: an established connection of a
    // rule that stays is not cut; new flows follow the new policy.
    let flow = Conversation::start(&app, "198.18.20.20:5432");
    wait_for("the conversation to run", &logs, || flow.round_trips() > 20);
    let changed = std::time::Instant::now();
    rt.block_on(async {
        admin(ctl_dir.path()).await.set_policy(pb::PolicyDocument { text: POLICY_V3.into(), generation: 0 }).await
    })
    .unwrap();
    wait_for("ICMP denied by policy v3", &logs, || !ping(&app, "198.18.20.20"));
    println!(
        "policy change to the first denied new flow: {} ms (ping timeout included)",
        changed.elapsed().as_millis()
    );
    assert!(!tcp(&app, "198.18.20.20:7000"), "TCP 7000 left the policy");
    assert!(tcp(&app, "198.18.20.20:5432"), "new flows of a kept rule pass");
    let before = flow.round_trips();
    wait_for("the established conversation to go on", &logs, || flow.round_trips() > before + 20);
    assert_eq!(flow.error(), None, "the established conversation was not cut");
    drop(flow);

    nyc.stop();
    fsn.stop();
    control.stop();
}

fn chrono_now() -> i64 {
    i64::try_from(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs()).unwrap()
}

/// With probing turned off (`probe.port = 0`) the agent still applies and
/// acknowledges what control sends.
#[test]
fn an_agent_without_probes_still_follows_control() {
    mesh_lab::require_root!();
    let lab = Lab::new().unwrap();
    let hosts = e2e_support::wan(&lab, &[("ctl", "192.0.2.100"), ("gwnyc", "192.0.2.1")]);
    let (ctl, gw) = (hosts[0].clone(), hosts[1].clone());
    let ctl_dir = tempfile::tempdir().unwrap();
    let mut control = Control::start(&ctl, ctl_dir.path(), 2);
    let rt = rt();
    let k = rt.block_on(async {
        let mut a = admin(ctl_dir.path()).await;
        a.set_policy(pb::PolicyDocument { text: POLICY_V1.into(), generation: 0 }).await.unwrap();
        gateway_key(&mut a, false).await
    });
    let bpf = BpfFs::mount();
    let mut g =
        Gateway::new(gw, &lab.unique_ifname("wg"), bpf.0.path(), &k, "192.0.2.1", &["198.18.10.0/24"], &NO_PROBES);
    g.start();
    let log = g.dir.path().join("agent.log");
    let logs = || std::fs::read_to_string(&log).unwrap_or_default();
    wait_for("the view applied and acknowledged", &logs, || {
        let nodes = rt.block_on(async {
            admin(ctl_dir.path()).await.list_nodes(pb::ListNodesRequest {}).await.unwrap().into_inner().nodes
        });
        nodes.iter().any(|n| n.acked_generation > 0)
    });
    assert!(logs().contains("no health probes"), "{}", logs());
    g.stop();
    control.stop();
}

/// Control's clock, `behind` seconds behind the wall clock: a control that
/// restarted after its clock stepped back (or another replica, started
/// earlier) numbers its views below what the agents already applied.
#[derive(Debug)]
struct Behind(i64);

impl mesh_control::engine::Clock for Behind {
    fn now(&self) -> i64 {
        chrono_now() - self.0
    }
}

/// Generations order views within one stream only: after control restarts
/// with its clock set back two minutes, its generations are lower than
/// those the agents applied, and the agents still take its views, including
/// a removal (a revocation must never be left unapplied).
#[test]
fn agents_take_views_from_a_control_whose_generations_went_back() {
    mesh_lab::require_root!();
    let lab = Lab::new().unwrap();
    let hosts = e2e_support::wan(&lab, &[("ctl", "192.0.2.100"), ("gwnyc", "192.0.2.1"), ("gwfsn", "192.0.2.2")]);
    let ctl = hosts[0].clone();
    let ctl_dir = tempfile::tempdir().unwrap();
    let mut control = Control::start(&ctl, ctl_dir.path(), 2);
    let rt = rt();
    let [k_nyc, k_fsn]: [String; 2] =
        e2e_support::policy_and_keys(&rt, ctl_dir.path(), POLICY_V1, 2).try_into().unwrap();
    let bpf = BpfFs::mount();
    let if_nyc = lab.unique_ifname("wg");
    let mut nyc =
        Gateway::new(hosts[1].clone(), &if_nyc, bpf.0.path(), &k_nyc, "192.0.2.1", &["198.18.10.0/24"], &NO_PROBES);
    let mut fsn = Gateway::new(
        hosts[2].clone(),
        &lab.unique_ifname("wg"),
        bpf.0.path(),
        &k_fsn,
        "192.0.2.2",
        &["198.18.20.0/24"],
        &NO_PROBES,
    );
    nyc.start();
    fsn.start();
    let log = nyc.dir.path().join("agent.log");
    let logs = || std::fs::read_to_string(&log).unwrap_or_default();
    let peers = || {
        // Fails (no lines) until the agent has made its interface.
        let out = nyc.host.exec_unchecked("wg", ["show", &if_nyc, "peers"]).unwrap();
        String::from_utf8_lossy(&out.stdout).lines().count()
    };
    let nodes = || {
        rt.block_on(async {
            admin(ctl_dir.path()).await.list_nodes(pb::ListNodesRequest {}).await.unwrap().into_inner().nodes
        })
    };
    wait_for("nyc has fsn as its peer", &logs, || peers() == 1);
    let before = nyc.status_json()["applied_generation"].as_u64().unwrap();

    control.stop();
    let mut control = Control::start_with_clock(&ctl, ctl_dir.path(), 2, std::sync::Arc::new(Behind(120)));
    // The new control's first views are numbered below `before`, and nyc
    // applies and acknowledges them.
    wait_for("nyc acknowledges the restarted control's lower generation", &logs, || {
        nodes().iter().any(|n| n.name == "gwnyc" && n.acked_generation > 0 && n.acked_generation < before)
    });
    let fsn_id = nodes().iter().find(|n| n.name == "gwfsn").unwrap().id;
    rt.block_on(async {
        admin(ctl_dir.path()).await.remove_node(pb::NodeRef { id: fsn_id, name: String::new() }).await.unwrap()
    });
    wait_for("nyc drops the removed fsn", &logs, || peers() == 0);
    assert!(!logs().contains("refusing generation"), "{}", logs());
    fsn.stop();
    nyc.stop();
    control.stop();
}

/// Two control replicas on one PostgreSQL (the test cluster, relayed into
/// each replica's namespace) and three gateways configured with both
/// addresses. The replica the agents are on
/// is stopped while a policy change is made through the other: every agent
/// reopens its stream to the other replica within 5 s and applies the new
/// policy.
#[test]
fn agents_fail_over_between_control_replicas() {
    mesh_lab::require_root!();
    const REPLICAS: Tuning = Tuning {
        metrics_listen: None,
        health_interval_secs: 1.0,
        extra: "addresses = [\"192.0.2.101:7443\"]\n[probe]\nport = 0\n",
    };
    let lab = Lab::new().unwrap();
    let hosts = e2e_support::wan(
        &lab,
        &[
            ("ctla", "192.0.2.100"),
            ("ctlb", "192.0.2.101"),
            ("gw1", "192.0.2.1"),
            ("gw2", "192.0.2.2"),
            ("gw3", "192.0.2.3"),
        ],
    );
    let dir = tempfile::tempdir().unwrap();
    let database = e2e_support::postgres_schema();
    let (pg_at, _) = database.rsplit_once('/').unwrap();
    let pg: std::net::SocketAddr = pg_at.rsplit_once('@').unwrap().1.parse().unwrap();
    let relays = [e2e_support::Relay::into(&hosts[0], pg), e2e_support::Relay::into(&hosts[1], pg)];
    let replica = |host: &Host, ip: &str, sock: &str| {
        // The same database through a relay inside the replica's namespace.
        let relay = &relays[usize::from(ip.ends_with(".101"))];
        let relayed = database.replacen(&pg.to_string(), &format!("127.0.0.1:{}", relay.port), 1);
        let config = mesh_control::config::Config {
            database_url: Some(relayed),
            listen: format!("{ip}:7443").parse().unwrap(),
            tls_names: vec!["192.0.2.100".into(), "192.0.2.101".into()],
            data_dir: dir.path().to_owned(),
            metrics_listen: None,
            admin_socket: Some(dir.path().join(sock)),
            poll_interval_ms: 100,
            ..mesh_control::config::Config::default()
        };
        mesh_lab::control::ControlInNs::start(host, config).expect("control starts")
    };
    let mut a = replica(&hosts[0], "192.0.2.100", "a.sock");
    let _b = replica(&hosts[1], "192.0.2.101", "b.sock");
    let admin_at = |sock: &str| {
        let path = dir.path().join(sock);
        async move {
            pb::admin_service_client::AdminServiceClient::new(mesh_client::channel::connect_unix(&path).await.unwrap())
        }
    };
    let rt = rt();
    let keys: Vec<String> = rt.block_on(async {
        let mut adm = admin_at("a.sock").await;
        let status = adm.get_status(pb::GetStatusRequest {}).await.unwrap().into_inner();
        assert!(status.store.starts_with("postgres"), "{}", status.store);
        adm.set_policy(pb::PolicyDocument { text: POLICY_V1.into(), generation: 0 }).await.unwrap();
        let mut keys = Vec::new();
        for _ in 0..3 {
            keys.push(gateway_key(&mut adm, false).await);
        }
        keys
    });
    let bpf = BpfFs::mount();
    let mut gws: Vec<Gateway> = (0..3)
        .map(|i| {
            // gw3 backs gw2 up for fsn's prefix: the policy change below
            // changes all three views.
            let lan = if i == 0 { "198.18.10.0/24" } else { "198.18.20.0/24" };
            Gateway::new(
                hosts[2 + i].clone(),
                &lab.unique_ifname("wg"),
                bpf.0.path(),
                &keys[i],
                &format!("192.0.2.{}", i + 1),
                &[lan],
                &REPLICAS,
            )
        })
        .collect();
    for g in &mut gws {
        g.start();
    }
    let logs = || gws.iter().map(|g| format!("--- {}:\n{}", g.host.name(), g.log())).collect::<String>();
    let streams_to = |g: &Gateway, ip: &str| {
        g.log().lines().filter(|l| l.contains("sync stream open") && l.contains(&format!("{ip}:7443"))).count()
    };
    let policy_of = |g: &Gateway| {
        let text = std::fs::read_to_string(g.dir.path().join("state/applied.json")).unwrap_or_default();
        serde_json::from_str::<serde_json::Value>(&text).ok().and_then(|v| v["policy"]["generation"].as_u64())
    };
    // All on the first replica (the first address), views applied.
    wait_for("three gateways on replica A with their views", &logs, || {
        gws.iter().all(|g| streams_to(g, "192.0.2.100") == 1 && policy_of(g).is_some())
    });
    assert!(gws.iter().all(|g| streams_to(g, "192.0.2.101") == 0), "{}", logs());
    // Both replicas saw the prefixes get their primaries; one wrote each
    // audit entry (the one holding the store's housekeeping lease).
    let primaries = rt.block_on(async {
        let req = pb::ListAuditRequest { action_prefix: "route.primary".into(), ..Default::default() };
        admin_at("b.sock").await.list_audit(req).await.unwrap().into_inner().entries
    });
    let mut seen = std::collections::BTreeSet::new();
    for e in &primaries {
        assert!(seen.insert((&e.subject, &e.before, &e.after)), "audited twice: {e:?}\n{primaries:?}");
    }
    assert!(!primaries.is_empty(), "no primary change audited");
    // Replica B learns presence from the shared store at its next poll.
    wait_for("replica B sees every node online on replica A", &logs, || {
        let nodes = rt.block_on(async {
            admin_at("b.sock").await.list_nodes(pb::ListNodesRequest {}).await.unwrap().into_inner().nodes
        });
        nodes.len() == 3 && nodes.iter().all(|n| n.online && n.replica.ends_with("/192.0.2.100:7443"))
    });

    // Replica A stops while the policy changes through replica B.
    let stopped = std::time::Instant::now();
    a.stop();
    let set = rt.block_on(async {
        admin_at("b.sock")
            .await
            .set_policy(pb::PolicyDocument { text: POLICY_V2.into(), generation: 0 })
            .await
            .unwrap()
            .into_inner()
    });
    wait_for("every agent on replica B with the new policy", &logs, || {
        gws.iter().all(|g| streams_to(g, "192.0.2.101") >= 1 && policy_of(g) == Some(set.generation))
    });
    let took = stopped.elapsed();
    eprintln!("every agent moved to replica B and applied policy {} in {} ms", set.generation, took.as_millis());
    assert!(took < Duration::from_secs(5), "took {} ms\n{}", took.as_millis(), logs());
    // Replica B's view of the mesh: all three online on B (as meshctl status
    // shows it) and acknowledging the new policy. An agent logs the policy
    // before its ack reaches B, so this is waited for, not read once.
    wait_for("replica B sees every node online and acknowledging", &logs, || {
        let nodes = rt.block_on(async {
            admin_at("b.sock").await.list_nodes(pb::ListNodesRequest {}).await.unwrap().into_inner().nodes
        });
        nodes.len() == 3
            && nodes.iter().all(|n| n.online && n.replica.ends_with("/192.0.2.101:7443") && n.acked_generation > 0)
    });

    // PostgreSQL goes away: a change is refused at once with a clear
    // error, and the agents keep their views (fail-static).
    relays[1].cut();
    let t = std::time::Instant::now();
    let refused = rt
        .block_on(async {
            admin_at("b.sock").await.set_policy(pb::PolicyDocument { text: POLICY_V1.into(), generation: 0 }).await
        })
        .unwrap_err();
    eprintln!("with the database gone, a policy change was refused after {} ms: {refused:?}", t.elapsed().as_millis());
    assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");
    assert!(refused.message().contains("database is unreachable: nothing was changed"), "{refused:?}");
    assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
    assert!(gws.iter().all(|g| policy_of(g) == Some(set.generation)), "{}", logs());
    for g in &mut gws {
        g.stop();
    }
}
