//! The userspace engine's fast path (TUN with TSO/checksum offloads, UDP
//! GSO/GRO) carries real traffic intact: bulk TCP both ways over IPv4 and
//! IPv6 (gateway to gateway, where the kernel hands the engine 64 KiB TSO
//! packets, and site to site, forwarded), UDP datagrams of many sizes, and
//! ICMP, large pings included. Each transfer is checked byte for byte with
//! a SHA-256. Run once with both ends on the fast path and once against an
//! end with every offload off, so the two paths interoperate.
//!
//! Lab:
//! ```text
//! h1 198.18.10.10 --lan-- gw1 [192.0.2.1 eth0]====[192.0.2.2 eth0] gw2 --lan-- h2 198.18.20.10
//!                         overlay 100.64.0.1 / fd7a:6d65:7368::1   100.64.0.2 / ...::2
//! ```

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream, UdpSocket},
    time::Duration,
};

use mesh_lab::{Host, Lab};
use sha2::{Digest as _, Sha256};

mod standalone_support;

use standalone_support::{Gateway, two_sites, view, wait_for};

fn ping(from: &Host, to: &str, size: usize) -> bool {
    let v6 = if to.contains(':') { "-6" } else { "-4" };
    from.exec_unchecked("ping", [v6, "-c", "1", "-W", "2", "-s", &size.to_string(), to]).unwrap().status.success()
}

/// Deterministic bytes that are not a repeating short pattern (so a
/// misplaced segment cannot go unnoticed).
fn data(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Sends `len` bytes from `client` to `addr` served on `server`; the server
/// hashes what it reads to EOF, and sends its hash back.
fn tcp_bulk(server: &Host, client: &Host, addr: &'static str, len: usize) {
    let listener = server.run(move || TcpListener::bind(addr).unwrap()).unwrap();
    let payload = data(len, len as u64);
    let expect: [u8; 32] = Sha256::digest(&payload).into();
    let sink = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut hash = Sha256::new();
        let mut buf = vec![0u8; 1 << 16];
        let mut total = 0;
        loop {
            let n = s.read(&mut buf).unwrap();
            if n == 0 {
                break;
            }
            total += n;
            hash.update(&buf[..n]);
        }
        let digest: [u8; 32] = hash.finalize().into();
        s.write_all(&digest).unwrap();
        total
    });
    let echoed = client
        .run(move || {
            let mut s = TcpStream::connect_timeout(&addr.parse().unwrap(), Duration::from_secs(5)).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
            // Large writes: the kernel builds 64 KiB TSO packets from them.
            for chunk in payload.chunks(256 << 10) {
                s.write_all(chunk).unwrap();
            }
            s.shutdown(std::net::Shutdown::Write).unwrap();
            let mut digest = [0u8; 32];
            s.read_exact(&mut digest).unwrap();
            digest
        })
        .unwrap();
    let received = sink.join().unwrap();
    assert_eq!(received, len, "bytes received over {addr}");
    assert_eq!(echoed, expect, "SHA-256 of what {addr} received");
}

/// Datagrams of many sizes (tiny, around the tunnel MTU, fragmented), each
/// echoed back: every one must come back exactly.
fn udp_echo(server: &Host, client: &Host, addr: &'static str) {
    let sock = server.run(move || UdpSocket::bind(addr).unwrap()).unwrap();
    let sizes = [1usize, 7, 100, 512, 1000, 1232, 1372, 1392, 2000, 4000, 8000];
    let echo = std::thread::spawn(move || {
        let mut buf = vec![0u8; 65536];
        sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        while let Ok((n, from)) = sock.recv_from(&mut buf) {
            if &buf[..n] == b"bye" {
                break;
            }
            sock.send_to(&buf[..n], from).unwrap();
        }
    });
    client
        .run(move || {
            let target: SocketAddr = addr.parse().unwrap();
            let bind = if target.is_ipv6() { "[::]:0" } else { "0.0.0.0:0" };
            let s = UdpSocket::bind(bind).unwrap();
            s.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
            let mut buf = vec![0u8; 65536];
            for (i, &size) in sizes.iter().enumerate() {
                let msg = data(size, i as u64 + 1);
                // A lost datagram is retried: the check is integrity, not loss.
                let ok = (0..5).any(|_| {
                    s.send_to(&msg, target).unwrap();
                    matches!(s.recv_from(&mut buf), Ok((n, _)) if buf[..n] == msg[..])
                });
                assert!(ok, "a {size}-byte datagram to {addr} did not come back intact");
            }
            s.send_to(b"bye", target).unwrap();
        })
        .unwrap();
    echo.join().unwrap();
}

fn traffic_through_the_tunnel(knobs1: &str, knobs2: &str) {
    let lab = Lab::new().unwrap();
    let (gw1h, gw2h, h1, h2) = two_sites(&lab);

    let mut gw1 = Gateway::new(gw1h, &lab.unique_ifname("wg"), &format!("log = \"info\"\n{knobs1}"));
    let mut gw2 = Gateway::new(gw2h, &lab.unique_ifname("wg"), &format!("log = \"info\"\n{knobs2}"));
    let (k1, k2) = (gw1.pubkey(), gw2.pubkey());
    let o1 = ("100.64.0.1", "fd7a:6d65:7368::1");
    let o2 = ("100.64.0.2", "fd7a:6d65:7368::2");
    gw1.start();
    gw2.start();
    gw1.apply(&view(o1, &k2, "192.0.2.2:51820", o2, "198.18.20.0/24"));
    gw2.apply(&view(o2, &k1, "192.0.2.1:51820", o1, "198.18.10.0/24"));
    wait_for("overlay ping", || ping(&gw1.host, "100.64.0.2", 56));
    let logs = || format!("--- gw1:\n{}\n--- gw2:\n{}", gw1.log(), gw2.log());
    // The path under test is the one that was asked for (the kernel took
    // the offloads, or they were turned off).
    for (gw, knobs) in [(&gw1, knobs1), (&gw2, knobs2)] {
        let mode = if knobs.is_empty() { "mode=Offload" } else { "mode=Plain" };
        assert!(gw.log().contains(mode), "{} is not in {mode}\n{}", gw.host.name(), logs());
    }

    // ICMP: small, at the MTU, and fragmented, both families.
    for (to, size) in [("100.64.0.2", 56), ("100.64.0.2", 1392), ("100.64.0.2", 4000), ("fd7a:6d65:7368::2", 1000)] {
        assert!(ping(&gw1.host, to, size), "ping -s {size} {to}\n{}", logs());
    }
    assert!(ping(&h1, "198.18.20.10", 3000), "site ping\n{}", logs());

    // Bulk TCP, gateway to gateway (TSO on the sender's TUN), both ways and
    // both families, then site to site (forwarded through both gateways).
    tcp_bulk(&gw2.host, &gw1.host, "100.64.0.2:7001", 8 << 20);
    tcp_bulk(&gw1.host, &gw2.host, "100.64.0.1:7002", 8 << 20);
    tcp_bulk(&gw2.host, &gw1.host, "[fd7a:6d65:7368::2]:7003", 8 << 20);
    tcp_bulk(&gw1.host, &gw2.host, "[fd7a:6d65:7368::1]:7004", 4 << 20);
    tcp_bulk(&h2, &h1, "198.18.20.10:7005", 4 << 20);

    udp_echo(&gw2.host, &gw1.host, "100.64.0.2:7006");
    udp_echo(&gw2.host, &gw1.host, "[fd7a:6d65:7368::2]:7007");
    udp_echo(&h2, &h1, "198.18.20.10:7008");
}

#[test]
fn fast_path_carries_tcp_udp_and_icmp_intact() {
    mesh_lab::require_root!();
    traffic_through_the_tunnel("", "");
}

#[test]
fn fast_path_interoperates_with_the_plain_path() {
    mesh_lab::require_root!();
    traffic_through_the_tunnel("", "tun_offload = false\nudp_gso = false\n");
}
