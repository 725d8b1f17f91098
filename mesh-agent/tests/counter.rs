//! The packet counter end to end: built by build.rs, verified by the kernel,
//! run on crafted packets (BPF_PROG_TEST_RUN) and on real traffic between two
//! lab hosts. Root only.

use mesh_agent::dataplane::{Counter, CounterAttach};
use mesh_common::counter::{CounterSlot, PacketCount};
use mesh_lab::Lab;

const XDP_PASS: u32 = 2;

fn frame(ethertype: u16, payload_len: usize) -> Vec<u8> {
    let mut f = vec![0u8; 14 + payload_len];
    f[0..6].copy_from_slice(&[0x02, 0, 0, 0, 0, 2]);
    f[6..12].copy_from_slice(&[0x02, 0, 0, 0, 0, 1]);
    f[12..14].copy_from_slice(&ethertype.to_be_bytes());
    f
}

#[test]
fn test_run_counts_crafted_frames_by_family() {
    mesh_lab::require_root!();
    let counter = Counter::load().expect("load the counter");
    let v4 = frame(0x0800, 46);
    let v6 = frame(0x86DD, 86);
    let arp = frame(0x0806, 28);
    // BPF_PROG_TEST_RUN refuses XDP input shorter than an Ethernet header, so
    // the shortest frame is a bare header of an unknown type.
    let runt = frame(0x88B5, 0);
    for f in [&v4, &v4, &v6, &arp, &runt] {
        assert_eq!(counter.test_run_xdp(f).unwrap(), XDP_PASS);
    }
    let t = counter.totals().unwrap();
    let len = |f: &Vec<u8>| f.len() as u64;
    assert_eq!(
        t[CounterSlot::All as usize],
        PacketCount { packets: 5, bytes: 2 * len(&v4) + len(&v6) + len(&arp) + len(&runt) }
    );
    assert_eq!(t[CounterSlot::Ipv4 as usize], PacketCount { packets: 2, bytes: 2 * len(&v4) });
    assert_eq!(t[CounterSlot::Ipv6 as usize], PacketCount { packets: 1, bytes: len(&v6) });
    assert_eq!(t[CounterSlot::Other as usize], PacketCount { packets: 2, bytes: len(&arp) + len(&runt) });
}

#[test]
fn real_pings_between_lab_hosts_are_counted_exactly() {
    mesh_lab::require_root!();
    const PINGS: u64 = 7;
    // 14 Ethernet + 20 IPv4 + 8 ICMP + 56 bytes of ping payload.
    const FRAME: u64 = 98;

    let lab = Lab::new().unwrap();
    let a = lab.host("a").unwrap();
    let b = lab.host("b").unwrap();
    lab.link(&a, "eth0", &b, "eth0").unwrap();
    a.addr("eth0", "192.0.2.1/24").unwrap();
    b.addr("eth0", "192.0.2.2/24").unwrap();

    // Ingress with XDP, egress with TC, each its own maps.
    let ingress = b
        .run(|| {
            let mut c = Counter::load().unwrap();
            c.attach("eth0", CounterAttach::Xdp).unwrap();
            c
        })
        .unwrap();
    let egress = b
        .run(|| {
            let mut c = Counter::load().unwrap();
            c.attach("eth0", CounterAttach::TcEgress).unwrap();
            c
        })
        .unwrap();

    let count = PINGS.to_string();
    a.exec("ping", ["-c", &count, "-i", "0.05", "-W", "2", "192.0.2.2"]).expect("pings answered");

    let got_in = ingress.totals().unwrap()[CounterSlot::Ipv4 as usize];
    let got_out = egress.totals().unwrap()[CounterSlot::Ipv4 as usize];
    assert_eq!(got_in, PacketCount { packets: PINGS, bytes: PINGS * FRAME }, "echo requests seen by XDP");
    assert_eq!(got_out, PacketCount { packets: PINGS, bytes: PINGS * FRAME }, "echo replies seen by TC egress");
    assert!(ingress.totals().unwrap()[CounterSlot::All as usize].packets >= PINGS);
}
