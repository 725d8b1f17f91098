//! Large UDP and path-MTU discovery through an ACL-enforced mesh (issue
//! 13): two standalone gateways with the eBPF ACL on their overlay
//! interfaces, a policy that lets site nyc reach UDP 9000 at site fsn and
//! allows no ICMP towards the sites. fsn's LAN has a smaller MTU (1280)
//! than the overlay (1420), so gw2 answers nyc's too-big packets with
//! "fragmentation needed" / "packet too big", which cross both gateways'
//! ACLs on the way back and pass only as errors related to the flow. The
//! 4000-byte datagrams cross as fragments (and their echoes come back as
//! fragments), which pass only because their first fragment did. Root only.
//!
//! ```text
//! h1 198.18.10.10 --lan 1500-- gw1 ==overlay 1420== gw2 --lan 1280-- h2 198.18.20.10
//!    2001:db8:10::10                                                 2001:db8:20::10
//! ```

use std::{
    net::{SocketAddr, UdpSocket},
    os::fd::AsRawFd as _,
    time::Duration,
};

use mesh_lab::{Host, Lab};
use mesh_policy::{CompiledPolicy, PortRange, Proto, Rule};

mod standalone_support;

use standalone_support::{Gateway, two_sites, view, wait_for};

const FAR_MTU: u32 = 1280;

/// Overlay to overlay anything (the gateways' own traffic), each site's
/// hosts to the other site's UDP 9000, both families. No ICMP towards a
/// site: errors reach the hosts only as related to a flow.
fn policy() -> CompiledPolicy {
    let rule = |id, src: &str, dst: &str, proto, ports| Rule {
        id,
        src: vec![src.parse().unwrap()],
        dst: vec![dst.parse().unwrap()],
        proto,
        ports,
    };
    CompiledPolicy {
        generation: 1,
        rules: vec![
            rule(1, "100.64.0.0/24", "100.64.0.0/24", Proto::Any, PortRange::ANY),
            rule(2, "fd7a:6d65:7368::/64", "fd7a:6d65:7368::/64", Proto::Any, PortRange::ANY),
            rule(3, "198.18.10.0/24", "198.18.20.0/24", Proto::Udp, PortRange::single(9000)),
            rule(4, "2001:db8:10::/64", "2001:db8:20::/64", Proto::Udp, PortRange::single(9000)),
        ],
    }
}

/// [`view`] with the peer's IPv6 site and the policy added.
fn enforced_view(own: (&str, &str), key: &str, endpoint: &str, peer: (&str, &str), sites: (&str, &str)) -> String {
    let mut v: serde_json::Value = serde_json::from_str(&view(own, key, endpoint, peer, sites.0)).unwrap();
    v["peers"][0]["allowed_ips"].as_array_mut().unwrap().push(sites.1.into());
    v["routes"].as_array_mut().unwrap().push(sites.1.into());
    v["policy"] = serde_json::to_value(policy()).unwrap();
    v.to_string()
}

/// A dual-stack address on a lab interface, usable at once (no DAD).
fn addr6(host: &Host, dev: &str, cidr: &str) {
    host.ip(&["-6", "addr", "add", cidr, "dev", dev, "nodad"]).unwrap();
}

/// An echo server on `host` for each address: every datagram goes back.
fn echo_servers(host: &Host, addrs: &[&'static str]) -> Vec<std::thread::JoinHandle<()>> {
    addrs
        .iter()
        .map(|&addr| {
            let sock = host.run(move || UdpSocket::bind(addr).unwrap()).unwrap();
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 65536];
                sock.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
                while let Ok((n, from)) = sock.recv_from(&mut buf) {
                    if &buf[..n] == b"bye" {
                        break;
                    }
                    let _ = sock.send_to(&buf[..n], from);
                }
            })
        })
        .collect()
}

/// Sends `msg` to `to` and waits up to half a second for it to come back
/// intact.
fn round_trip(s: &UdpSocket, to: SocketAddr, msg: &[u8]) -> bool {
    let mut buf = vec![0u8; 65536];
    if s.send_to(msg, to).is_err() {
        return false;
    }
    matches!(s.recv_from(&mut buf), Ok((n, _)) if buf[..n] == *msg)
}

fn payload(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7 + i / 251) as u8).collect()
}

/// Sets the "don't fragment" policy of `s` to "always" (IPv4
/// `IP_PMTUDISC_DO`, IPv6 `IPV6_PMTUDISC_DO`): a datagram above the known
/// path MTU fails with EMSGSIZE instead of being fragmented.
fn always_df(s: &UdpSocket, v6: bool) {
    let (level, name, value) = if v6 {
        (libc::IPPROTO_IPV6, libc::IPV6_MTU_DISCOVER, libc::IPV6_PMTUDISC_DO)
    } else {
        (libc::IPPROTO_IP, libc::IP_MTU_DISCOVER, libc::IP_PMTUDISC_DO)
    };
    // SAFETY: a valid socket and an int option of the right size.
    let rc = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            level,
            name,
            (&raw const value).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0, "setsockopt MTU_DISCOVER: {}", std::io::Error::last_os_error());
}

/// The path MTU `host` has cached towards `dst` (`ip route get`), if any.
fn cached_mtu(host: &Host, dst: &str) -> Option<u32> {
    let out = host.ip(&["route", "get", dst]).unwrap();
    let words: Vec<&str> = out.split_whitespace().collect();
    words.windows(2).find(|w| w[0] == "mtu").and_then(|w| w[1].parse().ok())
}

#[test]
fn large_udp_and_pmtu_discovery_cross_the_acl_on_v4_and_v6() {
    mesh_lab::require_root!();
    let lab = Lab::new().unwrap();
    let (gw1h, gw2h, h1, h2) = two_sites(&lab);
    addr6(&gw1h, "lan0", "2001:db8:10::1/64");
    addr6(&h1, "eth0", "2001:db8:10::10/64");
    h1.route_via("2001:db8:20::/64", "2001:db8:10::1").unwrap();
    addr6(&gw2h, "lan0", "2001:db8:20::1/64");
    addr6(&h2, "eth0", "2001:db8:20::10/64");
    h2.route_via("2001:db8:10::/64", "2001:db8:20::1").unwrap();
    for (host, dev) in [(&gw2h, "lan0"), (&h2, "eth0")] {
        host.ip(&["link", "set", dev, "mtu", &FAR_MTU.to_string()]).unwrap();
    }

    let mut gw1 = Gateway::enforcing(gw1h, &lab.unique_ifname("wg"), "log = \"info\"\n");
    let mut gw2 = Gateway::enforcing(gw2h, &lab.unique_ifname("wg"), "log = \"info\"\n");
    let (k1, k2) = (gw1.pubkey(), gw2.pubkey());
    let o1 = ("100.64.0.1", "fd7a:6d65:7368::1");
    let o2 = ("100.64.0.2", "fd7a:6d65:7368::2");
    gw1.start();
    gw2.start();
    gw1.apply(&enforced_view(o1, &k2, "192.0.2.2:51820", o2, ("198.18.20.0/24", "2001:db8:20::/64")));
    gw2.apply(&enforced_view(o2, &k1, "192.0.2.1:51820", o1, ("198.18.10.0/24", "2001:db8:10::/64")));
    let logs = || format!("--- gw1:\n{}\n--- gw2:\n{}", gw1.log(), gw2.log());
    wait_for("overlay ping", || {
        gw1.host.exec_unchecked("ping", ["-c", "1", "-W", "1", "100.64.0.2"]).unwrap().status.success()
    });

    let servers = echo_servers(&h2, &["198.18.20.10:9000", "[2001:db8:20::10]:9000"]);
    // Port 9001 has a server too, which the policy keeps out of reach.
    let _shut = echo_servers(&h2, &["198.18.20.10:9001"]);
    for (to, v6) in [("198.18.20.10", false), ("2001:db8:20::10", true)] {
        let target: SocketAddr = if v6 { format!("[{to}]:9000") } else { format!("{to}:9000") }.parse().unwrap();
        // Bound inside h1: the socket stays in h1's namespace.
        let s = h1.run(move || UdpSocket::bind(if v6 { "[::]:0" } else { "0.0.0.0:0" }).unwrap()).unwrap();
        s.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
        if !v6 {
            let shut: SocketAddr = "198.18.20.10:9001".parse().unwrap();
            assert!(!round_trip(&s, shut, b"closed?"), "UDP 9001 is not allowed: the ACL is in force");
        }
        // 4000 bytes: fragments both ways (IPv4: by h1, again by gw1 into
        // the overlay, by h2 for the echo; IPv6: by h1 at the path MTU,
        // which its first tries teach it).
        let big = payload(4000);
        wait_for(&format!("a 4000-byte datagram to {target} and back\n{}", logs()), || round_trip(&s, target, &big));

        // Path-MTU discovery across the ACL: with DF, a datagram that fits
        // the overlay but not fsn's LAN, until gw2's error (relayed through
        // both ACLs) teaches h1 the smaller MTU.
        always_df(&s, v6);
        let header = if v6 { 48 } else { 28 };
        let fits_overlay = payload(1380 - header);
        wait_for(&format!("h1 learns the path MTU to {to}\n{}", logs()), || {
            let _ = s.send_to(&fits_overlay, target);
            cached_mtu(&h1, to) == Some(FAR_MTU)
        });
        let err = s.send_to(&fits_overlay, target).expect_err("above the learnt path MTU");
        assert_eq!(err.raw_os_error(), Some(libc::EMSGSIZE), "{err}");
        let fits_path = payload(FAR_MTU as usize - header);
        wait_for(&format!("a {}-byte DF datagram to {target} and back", fits_path.len()), || {
            round_trip(&s, target, &fits_path)
        });
        let _ = s.send_to(b"bye", target);
    }
    for server in servers {
        server.join().unwrap();
    }
    gw1.stop();
    gw2.stop();
}
