//! The kernel WireGuard backend. The probe decides what runs:
//!
//! - on a kernel without WireGuard (this build host) the probe must say
//!   "unsupported" (EOPNOTSUPP), `auto` must fall back to userspace and a
//!   forced `kernel` must fail with a clear error;
//! - on a kernel with WireGuard (the VM runner) the real kernel backend
//!   builds a tunnel between two namespaces through the applier, reads it
//!   back normalised, and `mesh-agent apply` works without a running agent.
//!
//! `MESH_EXPECT_KERNEL_WG=1` (set by the VM runner) turns a probe that finds
//! no kernel WireGuard into a failure instead of the host-side checks.

use std::time::{Duration, Instant, SystemTime};

use mesh_agent::{
    keys::SecretKey,
    net::rtnl::Rtnl,
    reconcile::{Applier, Local, Report},
    view::{DEFAULT_MTU, NodeView, PeerView},
    wg::{BackendKind, BackendMode, KernelProbe, kernel::KernelWg, probe_kernel, select, select::SelectError},
};
use mesh_lab::{Host, Lab, twoway::Conversation};

const BIN: &str = env!("CARGO_BIN_EXE_mesh-agent");

fn expect_kernel() -> bool {
    std::env::var("MESH_EXPECT_KERNEL_WG").is_ok_and(|v| v == "1")
}

#[test]
fn probe_drives_the_backend_choice() {
    mesh_lab::require_root!();
    let lab = Lab::new().unwrap();
    let host = lab.host("probe").unwrap();
    let probe = host.run(probe_kernel).unwrap();
    if expect_kernel() {
        assert_eq!(probe, KernelProbe::Available, "MESH_EXPECT_KERNEL_WG=1 but the probe found no kernel WireGuard");
    }
    match probe {
        KernelProbe::Available => {
            assert_eq!(select(BackendMode::Auto, || probe.clone()).unwrap().kind, BackendKind::Kernel);
            assert_eq!(select(BackendMode::Kernel, || probe.clone()).unwrap().kind, BackendKind::Kernel);
            // The probe cleaned up after itself.
            let links = host.ip(&["-br", "link"]).unwrap();
            assert!(!links.contains("wgp"), "probe link left behind: {links}");
        }
        KernelProbe::Unsupported => {
            assert_eq!(select(BackendMode::Auto, || probe.clone()).unwrap().kind, BackendKind::Userspace);
            assert_eq!(select(BackendMode::Kernel, || probe.clone()), Err(SelectError::KernelUnavailable));
            forced_kernel_fails_clearly(&lab, &host);
        }
        KernelProbe::Failed(e) => panic!("the kernel probe failed (are we root?): {e}"),
    }
}

/// `mesh-agent run` with `backend = "kernel"` on a kernel without WireGuard
/// exits with an error saying so.
fn forced_kernel_fails_clearly(lab: &Lab, host: &Host) {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "interface = \"{}\"\nbackend = \"kernel\"\nstate_dir = \"{}\"\nenforcement = \"off\"\n",
            lab.unique_ifname("wgk"),
            dir.path().display()
        ),
    )
    .unwrap();
    let out = host.exec_unchecked(BIN, ["run", "--config", config.to_str().unwrap()]).unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("kernel has no WireGuard"), "{err}");
}

fn view(own: &str, peer: &PeerView, routes: &[&str]) -> NodeView {
    NodeView {
        generation: 1,
        epoch: 0,
        public_key: None,
        addresses: vec![own.parse().unwrap()],
        mtu: DEFAULT_MTU,
        forwarding: false,
        peers: vec![peer.clone()],
        routes: routes.iter().map(|r| r.parse().unwrap()).collect(),
        policy: Default::default(),
    }
}

fn peer(key: &SecretKey, endpoint: &str, ips: &[&str]) -> PeerView {
    PeerView {
        public_key: key.public_key(),
        name: None,
        endpoint: Some(endpoint.parse().unwrap()),
        pin_endpoint: false,
        allowed_ips: ips.iter().map(|s| s.parse().unwrap()).collect(),
        persistent_keepalive: Some(5),
        preshared_key: Some(SecretKey::from_bytes([7; 32])),
    }
}

/// Runs `f` on a thread inside `host`'s namespace: wireguard-control opens
/// its generic-netlink socket per call, in the calling thread's namespace.
fn in_ns<T: Send + 'static>(host: &Host, f: impl FnOnce() -> T + Send + 'static) -> T {
    host.run(f).unwrap()
}

fn applier(host: &Host, ifname: String, key: SecretKey) -> Applier {
    in_ns(host, move || {
        let local = Local {
            private_key: key,
            listen_port: Some(51820),
            fwmark: Some(0x6d),
            enforce_policy: false,
            routing: Default::default(),
            control_addrs: vec![],
        };
        Applier::new(local, Box::new(KernelWg::new(&ifname).unwrap()), Box::new(Rtnl::new().unwrap()), None)
    })
}

fn reconcile(host: &Host, mut a: Applier, v: &NodeView) -> (Applier, Report) {
    let v = v.clone();
    let (a, r) = in_ns(host, move || {
        let r = a.reconcile(&v);
        (a, r)
    });
    (a, r.unwrap_or_else(|e| panic!("reconcile on {}: {e}", host.name())))
}

fn wait_for(what: &str, f: impl FnMut() -> bool) {
    mesh_lab::wait_for(what, Duration::from_secs(30), f).unwrap_or_else(|e| panic!("{e}"));
}

/// Only on a kernel with WireGuard (the VM): a real kernel tunnel through the
/// applier, read back normalised, repaired after tampering, and the one-shot
/// `mesh-agent apply` without a running agent. On a host without kernel
/// WireGuard, `probe_drives_the_backend_choice` covers the fallback instead.
#[test]
fn kernel_backend_tunnel() {
    mesh_lab::require_root!();
    let lab = Lab::new().unwrap();
    let gw1 = lab.host("k1").unwrap();
    if gw1.run(probe_kernel).unwrap() != KernelProbe::Available {
        assert!(!expect_kernel(), "MESH_EXPECT_KERNEL_WG=1 but no kernel WireGuard");
        eprintln!(
            "no kernel WireGuard here: the kernel tunnel runs in the VM (probe_drives_the_backend_choice covers this host)"
        );
        return;
    }
    let gw2 = lab.host("k2").unwrap();
    lab.link(&gw1, "eth0", &gw2, "eth0").unwrap();
    gw1.addr("eth0", "192.0.2.1/24").unwrap();
    gw2.addr("eth0", "192.0.2.2/24").unwrap();
    let (k1, k2) = (SecretKey::generate(), SecretKey::generate());
    let (pk1, pk2) = (k1.public_key(), k2.public_key());
    let (if1, if2) = (lab.unique_ifname("wgk"), lab.unique_ifname("wgk"));
    let v1 = view(
        "100.64.0.1/32",
        &peer(&k2, "192.0.2.2:51820", &["100.64.0.2/32", "198.18.20.0/24"]),
        &["100.64.0.2/32", "198.18.20.0/24"],
    );
    let v2 = view("100.64.0.2/32", &peer(&k1, "192.0.2.1:51820", &["100.64.0.1/32"]), &["100.64.0.1/32"]);

    let (a1, r1) = reconcile(&gw1, applier(&gw1, if1.clone(), k1), &v1);
    assert_eq!(r1.backend, BackendKind::Kernel);
    assert_eq!(r1.changes.peers_added, 1);
    let (a2, _) = reconcile(&gw2, applier(&gw2, if2, k2), &v2);
    wait_for("ping through the kernel tunnel", || {
        gw1.exec_unchecked("ping", ["-c", "1", "-W", "1", "100.64.0.2"]).unwrap().status.success()
    });

    // Read back, normalised.
    let (a1, actual) = in_ns(&gw1, move || {
        let mut a1 = a1;
        let actual = a1.observe();
        (a1, actual)
    });
    let actual = actual.unwrap();
    assert_eq!(actual.wg.public_key, Some(pk1));
    assert_eq!(actual.wg.listen_port, 51820);
    assert_eq!(actual.wg.fwmark, Some(0x6d));
    let p = &actual.wg.peers[&pk2];
    assert_eq!(p.endpoint, Some("192.0.2.2:51820".parse().unwrap()));
    assert_eq!(p.allowed_ips.len(), 2);
    assert_eq!(p.persistent_keepalive, Some(5));
    assert!(p.preshared_key.is_some());
    assert!(p.last_handshake.is_some_and(|t| t <= SystemTime::now()), "{:?}", p.last_handshake);
    assert!(p.rx_bytes > 0 && p.tx_bytes > 0);
    let link = actual.link.unwrap();
    assert!(link.up && link.mtu == DEFAULT_MTU);
    assert!(actual.routes.contains(&"198.18.20.0/24".parse().unwrap()));

    // Idempotent, and repairs tampering.
    let (a1b, again) = reconcile(&gw1, a1, &v1);
    assert!(again.changes.is_empty(), "{:?}", again.changes);
    gw1.ip(&["route", "del", "198.18.20.0/24", "dev", &if1, "table", "109"]).unwrap();
    gw1.exec("wg", ["set", &if1, "peer", &pk2.to_base64(), "remove"]).unwrap();
    let (mut a1, fixed) = reconcile(&gw1, a1b, &v1);
    assert_eq!((fixed.changes.routes_replaced, fixed.changes.peers_added), (1, 1), "{:?}", fixed.changes);

    // A key rotation under two-way traffic, in the product's order: the
    // peer gets the new key from control, then the node switches. The
    // longest cut of a checked TCP stream each way, and of pings, stays
    // under 1 s (at most one lost handshake).
    let conv =
        Conversation::start(&gw2, &gw1, &["100.64.0.1:9000".parse().unwrap()], Duration::from_millis(10)).unwrap();
    let flowing = Instant::now();
    wait_for("the two-way conversation to flow", || conv.flowing_since(flowing));
    let k1b = SecretKey::generate();
    let t = Instant::now();
    let v2b = view("100.64.0.2/32", &peer(&k1b, "192.0.2.1:51820", &["100.64.0.1/32"]), &["100.64.0.1/32"]);
    let (_a2, r) = reconcile(&gw2, a2, &v2b);
    assert_eq!((r.changes.peers_added, r.changes.peers_removed), (1, 1), "{:?}", r.changes);
    a1.set_private_key(k1b.clone());
    let (a1, _) = reconcile(&gw1, a1, &v1);
    let after = Instant::now() + Duration::from_millis(500);
    wait_for("the conversation to flow after the rotation", || conv.flowing_since(after));
    let cuts = conv.cuts(t);
    eprintln!("kernel key rotation: {cuts}");
    assert!(cuts.worst() < Duration::from_secs(1), "rotation cut: {cuts}");
    let streams = conv.finish().unwrap_or_else(|e| panic!("the conversation broke in the rotation: {e}"));
    assert!(streams.iter().all(|(_, o)| o.bytes.0 > 0 && o.bytes.1 > 0), "{streams:?}");
    assert_eq!(a1.public_key(), k1b.public_key());

    // `mesh-agent apply` with no agent running configures the kernel directly.
    let dir = tempfile::tempdir().unwrap();
    let if3 = lab.unique_ifname("wgk");
    let config = dir.path().join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "interface = \"{if3}\"\nbackend = \"auto\"\nlisten_port = 51821\nstate_dir = \"{}\"\nenforcement = \"off\"\n",
            dir.path().join("state").display()
        ),
    )
    .unwrap();
    let state = dir.path().join("view.json");
    std::fs::write(&state, serde_json::to_string(&v2).unwrap()).unwrap();
    let out =
        gw1.exec(BIN, ["apply", "--config", config.to_str().unwrap(), "--state", state.to_str().unwrap()]).unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("\"backend\":\"kernel\""));
    let shown = String::from_utf8(gw1.exec("wg", ["show", &if3, "allowed-ips"]).unwrap().stdout).unwrap();
    assert!(shown.contains(&pk1.to_base64()) && shown.contains("100.64.0.1/32"), "{shown}");
}

/// The relay's side of a node, inside `host`'s namespace: the agent's relay
/// links with a ticket for `own`, and a proxy for `peer` (what the path
/// manager keeps). Returns the proxy's address; stops on drop.
struct ProxyInNs {
    addr: std::net::SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ProxyInNs {
    fn start(host: &Host, relay: mesh_proto::v1::Relay, ticket: String, peer: mesh_agent::keys::PublicKey) -> Self {
        let host = host.clone();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let (tx, rx) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || {
            host.enter_current_thread().unwrap();
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async move {
                let (_tickets, tickets_rx) = tokio::sync::watch::channel(Some(ticket));
                let mut relays = mesh_agent::path::relay::Relays::new(51820, tickets_rx);
                let homes = std::collections::BTreeMap::from([(peer, Some(relay.region.clone()))]);
                relays.reconcile(&[relay], &homes).await;
                let deadline = Instant::now() + Duration::from_secs(10);
                while !relays.links().can_reach(&peer) {
                    assert!(Instant::now() < deadline, "not attached to the relay");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                tx.send(relays.proxy(&peer).unwrap()).unwrap();
                let _ = stopped.await;
            });
        });
        let addr = rx.recv_timeout(Duration::from_secs(15)).expect("the relay proxy is up");
        Self { addr, stop: Some(stop), thread: Some(thread) }
    }
}

impl Drop for ProxyInNs {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Only on a kernel with WireGuard (the VM): kernel WireGuard through a
/// relay, as the path manager sets it up when no direct path works. Each
/// side's peer endpoint is pinned to its local proxy, which carries the
/// kernel's datagrams to a mesh-relay in a third namespace (TLS over TCP).
/// And the side channel beside the kernel's socket: a disco ping sent from
/// k1's WireGuard port (a raw socket) reaches k2's, and its authenticated
/// pong comes back, while the kernel owns both ports.
#[test]
fn kernel_backend_through_the_relay() {
    use mesh_agent::path::{disco, raw::SideSocket};
    use mesh_relay::ticket::{Ticket, TicketSigner};

    mesh_lab::require_root!();
    let lab = Lab::new().unwrap();
    let k1 = lab.host("k1").unwrap();
    if k1.run(probe_kernel).unwrap() != KernelProbe::Available {
        assert!(!expect_kernel(), "MESH_EXPECT_KERNEL_WG=1 but no kernel WireGuard");
        eprintln!("no kernel WireGuard here: the relayed kernel tunnel runs in the VM");
        return;
    }
    let (k2, r) = (lab.host("k2").unwrap(), lab.host("r").unwrap());
    let wan = lab.switch("wan").unwrap();
    for (h, a) in [(&k1, "192.0.2.1"), (&k2, "192.0.2.2"), (&r, "192.0.2.50")] {
        wan.plug(h, "eth0").unwrap();
        h.addr("eth0", &format!("{a}/24")).unwrap();
    }
    for h in [&k1, &k2] {
        h.up("lo").unwrap();
    }
    let signer = TicketSigner::from_pkcs8(&TicketSigner::generate_pkcs8().unwrap()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let relay = mesh_lab::relay::RelayInNs::start(
        &r,
        mesh_relay::server::RelayConfig {
            listen: "192.0.2.50:443".parse().unwrap(),
            reflector: None,
            metrics: None,
            cert_path: dir.path().join("relay.pem"),
            key_path: dir.path().join("relay.key"),
            names: vec!["192.0.2.50".into()],
            trusted_keys: vec![signer.public_key()],
            region: "lab".into(),
            max_connections: 10,
        },
    )
    .unwrap();
    let entry = mesh_proto::v1::Relay {
        region: "lab".into(),
        address: "192.0.2.50:443".into(),
        cert_sha256: hex::encode(relay.pin()),
        ..Default::default()
    };
    let (s1, s2) = (SecretKey::generate(), SecretKey::generate());
    let (pk1, pk2) = (s1.public_key(), s2.public_key());
    let expires_unix =
        i64::try_from(SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs()).unwrap() + 3600;
    let ticket =
        |k: &SecretKey, node_id| signer.sign_b64(&Ticket { public_key: k.public_key().0, node_id, expires_unix });
    let p1 = ProxyInNs::start(&k1, entry.clone(), ticket(&s1, 1), pk2);
    let p2 = ProxyInNs::start(&k2, entry, ticket(&s2, 2), pk1);

    let (if1, if2) = (lab.unique_ifname("wgr"), lab.unique_ifname("wgr"));
    let pinned = |key: &SecretKey, proxy: std::net::SocketAddr, ips: &[&str]| PeerView {
        pin_endpoint: true,
        ..peer(key, &proxy.to_string(), ips)
    };
    let v1 = view("100.64.0.1/32", &pinned(&s2, p1.addr, &["100.64.0.2/32"]), &["100.64.0.2/32"]);
    let v2 = view("100.64.0.2/32", &pinned(&s1, p2.addr, &["100.64.0.1/32"]), &["100.64.0.1/32"]);
    let (a1, r1) = reconcile(&k1, applier(&k1, if1, s1.clone()), &v1);
    assert_eq!(r1.backend, BackendKind::Kernel);
    let (_a2, _) = reconcile(&k2, applier(&k2, if2, s2.clone()), &v2);
    wait_for("ping through the relayed kernel tunnel", || {
        k1.exec_unchecked("ping", ["-c", "1", "-W", "1", "100.64.0.2"]).unwrap().status.success()
    });
    let conv = Conversation::start(&k2, &k1, &["100.64.0.1:9000".parse().unwrap()], Duration::from_millis(10)).unwrap();
    let t = Instant::now();
    wait_for("a two-way conversation through the relay", || conv.flowing_since(t));
    std::thread::sleep(Duration::from_secs(2));
    let outcome = conv.finish().unwrap();
    eprintln!("relayed kernel tunnel: {outcome:?}");
    let (_a1, actual) = in_ns(&k1, move || {
        let mut a1 = a1;
        let actual = a1.observe();
        (a1, actual)
    });
    assert_eq!(actual.unwrap().wg.peers[&pk2].endpoint, Some(p1.addr), "the kernel sends to the proxy");

    // Disco beside the kernel's sockets on both ports.
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let (k2s, pk1b) = (s2.clone(), pk1);
    let answerer = std::thread::spawn({
        let k2 = k2.clone();
        move || {
            k2.enter_current_thread().unwrap();
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async move {
                let side = SideSocket::open(51820).unwrap();
                ready_tx.send(()).unwrap();
                let mut buf = vec![0u8; 2048];
                let (from, range) =
                    tokio::time::timeout(Duration::from_secs(10), side.recv(&mut buf)).await.unwrap().unwrap();
                let d = disco::parse(&buf[range]).unwrap();
                let key = disco::PairKey::new(&k2s, &pk1b);
                assert!(d.verify(&key) && !d.pong && d.sender == pk1b);
                side.send(from, &disco::encode(true, &d.txid, &k2s.public_key(), &key)).await.unwrap();
            });
        }
    });
    ready_rx.recv_timeout(Duration::from_secs(10)).unwrap();
    let pong = k1
        .run(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async move {
                let side = SideSocket::open(51820).unwrap();
                let key = disco::PairKey::new(&s1, &pk2);
                let txid = [9; disco::TXID_LEN];
                side.send("192.0.2.2:51820".parse().unwrap(), &disco::encode(false, &txid, &pk1, &key)).await.unwrap();
                let mut buf = vec![0u8; 2048];
                let (_, range) =
                    tokio::time::timeout(Duration::from_secs(10), side.recv(&mut buf)).await.unwrap().unwrap();
                let d = disco::parse(&buf[range]).unwrap();
                d.pong && d.txid == txid && d.verify(&key)
            })
        })
        .unwrap();
    answerer.join().unwrap();
    assert!(pong, "an authenticated pong from k2's WireGuard port");
    drop((p1, p2));
}
