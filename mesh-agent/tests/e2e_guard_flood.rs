//! The underlay guard under a flood, as deployed: two gateways with the
//! guard on (`underlay_interface = "eth0"`), joined through control. A
//! sender on the underlay switch floods nyc's WireGuard port with junk and
//! handshake-initiation-shaped packets (148-byte type-1 messages) from the
//! in-kernel generator, as fast as it goes. A checked two-way TCP stream
//! and a ping series from a nyc host to a fsn host, through the flooded
//! gateway, keep at least 70% of their unflooded rate (the median over
//! three rounds, each unflooded then flooded) with at most 5% loss.

mod e2e_support;

use std::{net::Ipv4Addr, path::PathBuf};

use e2e_support::{BpfFs, Control, Gateway, Tuning, admin, gateway_key, rt, wait_for};
use mesh_agent::dataplane::{
    Dataplane,
    flood::{Flood, self_addressed, wireguard_flood},
};
use mesh_lab::{
    Lab,
    traffic::{FLOOD_RATE_BOUND, Paired, echo_servers, path_quality},
};
use mesh_proto::v1 as pb;

const POLICY: &str = r#"{
  "tagOwners": {"tag:gw": []},
  "autoApprovers": {"routes": {"198.18.10.0/24": ["tag:gw"], "198.18.20.0/24": ["tag:gw"]}},
  "acls": [
    {"action": "accept", "src": ["198.18.10.0/24"], "dst": ["198.18.20.0/24:7000"], "proto": "tcp"},
    {"action": "accept", "src": ["198.18.10.0/24", "198.18.20.0/24"], "dst": ["198.18.10.0/24:*", "198.18.20.0/24:*"], "proto": "icmp"},
  ],
}"#;

const TUNING: Tuning = Tuning { metrics_listen: None, health_interval_secs: 1.0, extra: "" };
/// Seconds of each measurement.
const SECS: f64 = 2.0;
/// Rounds of unflooded then flooded measurements.
const ROUNDS: usize = 3;

#[test]
fn two_way_traffic_through_a_flooded_gateway_keeps_its_rate() {
    mesh_lab::require_root!();
    let lab = Lab::new().unwrap();
    let ctl = lab.host("ctl").unwrap();
    let nyc = lab.host("gwnyc").unwrap();
    let fsn = lab.host("gwfsn").unwrap();
    let flooder = lab.host("flood").unwrap();
    let app = lab.host("app").unwrap();
    let db = lab.host("db").unwrap();
    let wan = lab.switch("wan").unwrap();
    let mut flood_port = String::new();
    for (h, a) in [(&ctl, "192.0.2.100"), (&nyc, "192.0.2.11"), (&fsn, "192.0.2.21"), (&flooder, "192.0.2.66")] {
        let port = wan.plug(h, "eth0").unwrap();
        h.addr("eth0", &format!("{a}/24")).unwrap();
        if h.name() == flooder.name() {
            flood_port = port;
        }
    }
    for (gw, host, name, octet) in [(&nyc, &app, "lnyc", 10), (&fsn, &db, "lfsn", 20)] {
        let lan = lab.switch(name).unwrap();
        lan.plug(gw, "lan0").unwrap();
        lan.plug(host, "eth0").unwrap();
        gw.addr("lan0", &format!("198.18.{octet}.1/24")).unwrap();
        host.addr("eth0", &format!("198.18.{octet}.10/24")).unwrap();
        host.route_via("198.18.0.0/16", &format!("198.18.{octet}.1")).unwrap();
    }
    echo_servers(&db, &["198.18.20.10:7000".parse().unwrap()]).unwrap();

    let ctl_dir = tempfile::tempdir().unwrap();
    let _control = Control::start(&ctl, ctl_dir.path(), 3);
    let rt = rt();
    let key = rt.block_on(async {
        let mut a = admin(ctl_dir.path()).await;
        a.set_policy(pb::PolicyDocument { text: POLICY.into(), generation: 0 }).await.unwrap();
        gateway_key(&mut a, true).await
    });
    let bpf = BpfFs::mount();
    let mk = |h: &mesh_lab::Host, u: &str, lan: &str| {
        let g = Gateway::new(h.clone(), &lab.unique_ifname("wg"), bpf.0.path(), &key, u, &[lan], &TUNING);
        g.guard_underlay("eth0");
        g
    };
    let mut gn = mk(&nyc, "192.0.2.11", "198.18.10.0/24");
    let mut gf = mk(&fsn, "192.0.2.21", "198.18.20.0/24");
    let paths: Vec<PathBuf> = [&gn, &gf].iter().map(|g| g.dir.path().join("agent.log")).collect();
    let logs = || {
        paths
            .iter()
            .map(|p| format!("--- {}:\n{}\n", p.display(), std::fs::read_to_string(p).unwrap_or_default()))
            .collect::<String>()
    };
    gn.start();
    gf.start();
    wait_for("a ping from nyc to fsn through the guarded gateways", &logs, || {
        app.exec_unchecked("ping", ["-c", "1", "-W", "1", "198.18.20.10"]).unwrap().status.success()
    });
    assert!(gn.log().contains("guard: known endpoints updated"), "{}", logs());
    assert_eq!(gn.guard_count("DropRateLimited"), 0, "no honest packet is throttled");
    assert!(gn.guard_count("PassKnown") > 0, "the peer is known to the guard");

    // veth only takes frames sent by XDP when its receiving end runs an XDP
    // program: the empty one on the switch's port.
    let _port_xdp = wan
        .host()
        .run(move || -> Result<Dataplane, mesh_agent::dataplane::DataplaneError> {
            let mut dp = Dataplane::load_unpinned()?;
            dp.attach_xdp_pass_through(&flood_port)?;
            Ok(dp)
        })
        .unwrap()
        .unwrap();
    let echo = "198.18.20.10:7000".parse().unwrap();
    let idle = path_quality(&app, echo, "198.18.20.10", SECS).unwrap();

    let (gw_mac, tx_mac) = (nyc.mac("eth0").unwrap(), flooder.mac("eth0").unwrap());
    let frames = wireguard_flood(gw_mac, tx_mac, Ipv4Addr::new(192, 0, 2, 66), Ipv4Addr::new(192, 0, 2, 11), 51820);
    // The sender shares this machine's two CPUs with the tunnel: the
    // unflooded rate is measured while the generator sends the same frames
    // addressed back to itself (the switch drops them at its port), so both
    // runs pay the sender's CPU and the difference is what the flood costs
    // the gateway. The rate without any sender is printed too.
    let run = |frames: Vec<Vec<u8>>| {
        let host = flooder.clone();
        let enter = move || host.enter_current_thread().map_err(std::io::Error::other);
        let (q, sent) =
            Flood::during(enter, "eth0", frames, || path_quality(&app, echo, "198.18.20.10", SECS)).unwrap();
        (q.unwrap(), sent)
    };
    let before = gn.guard_count("DropRateLimited");
    let (mut sent, mut control) = (Vec::new(), Vec::new());
    let paired = Paired::measure::<std::convert::Infallible>(
        ROUNDS,
        || {
            let (q, s) = run(frames.iter().map(|f| self_addressed(f)).collect());
            control.push(s.pps() / 1e3);
            Ok(q)
        },
        || {
            let (q, s) = run(frames.clone());
            sent.push(s.pps() / 1e3);
            Ok(q)
        },
    )
    .unwrap();

    let limited = gn.guard_count("DropRateLimited") - before;
    let bad_type = gn.guard_count("DropBadType");
    println!(
        "flood at nyc's WireGuard port: {sent:.0?} kpps from the generator ({control:.0?} kpps in the control \
         runs); nyc's guard dropped {limited} initiations (rate limit) and {bad_type} junk frames"
    );
    let ((calm, stormy), (calm_loss, stormy_loss)) = (paired.rates(), paired.ping_losses());
    println!(
        "two-way TCP app-nyc <-> db-fsn, Mbit/s each way (medians of {ROUNDS} rounds): {calm:.0} unflooded ({:.0} \
         with no sender at all), {stormy:.0} flooded ({:.0}% by round); ping loss {:.1}% unflooded, {:.1}% \
         flooded",
        idle.tcp_mbps,
        100.0 * paired.rate_ratio(),
        calm_loss * 100.0,
        stormy_loss * 100.0,
    );
    assert!(limited > 0 && bad_type > 0, "the flood reached the guard\n{}", logs());
    assert!(calm > 0.0 && calm_loss <= 0.05, "the unflooded path works: {paired:?}");
    assert!(paired.rate_ratio() >= FLOOD_RATE_BOUND, "TCP under flood: {paired:?}");
    assert!(stormy_loss <= 0.05, "ping loss under flood: {paired:?}");
    gn.stop();
    gf.stop();
}
