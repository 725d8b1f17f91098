//! Root tests of the lab itself: real namespaces, links and packets.

use std::process::Command;

use mesh_lab::Lab;

fn root_links() -> String {
    String::from_utf8(Command::new("ip").args(["-o", "link"]).output().unwrap().stdout).unwrap()
}

fn lab_traces(id: &str) -> Vec<String> {
    let mut found = Vec::new();
    let marker = format!("ml-{id}-");
    for entry in std::fs::read_dir("/run/netns").into_iter().flatten().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with(&marker) {
            found.push(format!("namespace {name}"));
        }
    }
    for line in std::fs::read_to_string("/proc/self/mountinfo").unwrap().lines() {
        if line.contains(&marker) {
            found.push(format!("mount {line}"));
        }
    }
    found
}

#[test]
fn hosts_linked_by_veth_and_a_switch_exchange_packets() {
    let lab = Lab::new().unwrap();
    let a = lab.host("a").unwrap();
    let b = lab.host("b").unwrap();
    lab.link(&a, "eth0", &b, "eth0").unwrap();
    a.addr("eth0", "192.0.2.1/24").unwrap();
    b.addr("eth0", "192.0.2.2/24").unwrap();
    a.addr("eth0", "fd00:6d:1::1/64").unwrap();
    b.addr("eth0", "fd00:6d:1::2/64").unwrap();
    a.exec("ping", ["-c1", "-W2", "192.0.2.2"]).unwrap();
    a.exec("ping", ["-c1", "-W2", "fd00:6d:1::2"]).unwrap();

    // A site LAN: two hosts on one switch; pulling one's cable cuts it off.
    let lan = lab.switch("lan").unwrap();
    let c = lab.host("c").unwrap();
    lan.plug(&a, "lan0").unwrap();
    let c_port = lan.plug(&c, "eth0").unwrap();
    a.addr("lan0", "198.18.10.1/24").unwrap();
    c.addr("eth0", "198.18.10.10/24").unwrap();
    c.exec("ping", ["-c1", "-W2", "198.18.10.1"]).unwrap();
    lan.set_port(&c_port, false).unwrap();
    let out = c.exec_unchecked("ping", ["-c1", "-W1", "198.18.10.1"]).unwrap();
    assert!(!out.status.success(), "ping must fail with the cable pulled");

    // A closure inside the namespace sees the namespace's interfaces.
    let names = b.run(|| std::fs::read_dir("/sys/class/net").map(|d| d.count()).unwrap_or(0)).unwrap();
    assert!(names >= 1);
    let index = b.run(|| nix::net::if_::if_nametoindex("eth0").is_ok()).unwrap();
    assert!(index, "eth0 must be visible from a thread inside b");
}

#[test]
fn teardown_leaves_nothing_behind_even_on_panic() {
    let before = root_links();
    let id = std::sync::Mutex::new(String::new());
    let result = std::panic::catch_unwind(|| {
        let lab = Lab::new().unwrap();
        *id.lock().unwrap() = lab.id().to_owned();
        let a = lab.host("a").unwrap();
        let b = lab.host("b").unwrap();
        lab.link(&a, "eth0", &b, "eth0").unwrap();
        let lan = lab.switch("lan").unwrap();
        lan.plug(&b, "lan0").unwrap();
        let _sleeper = a.spawn("sleep", ["600"]).unwrap();
        // A process the lab did not start itself, still running in `b`.
        let mut detached = b.command("sleep", ["600"]);
        std::mem::forget(detached.spawn().unwrap());
        assert!(!lab_traces(lab.id()).is_empty(), "the lab must exist before the panic");
        panic!("test body panics");
    });
    assert!(result.is_err());
    let id = id.into_inner().unwrap();
    assert_eq!(lab_traces(&id), Vec::<String>::new(), "lab {id} left traces");
    assert_eq!(root_links(), before, "the root namespace's links changed");
}

#[test]
fn default_routes_are_refused() {
    let lab = Lab::new().unwrap();
    let a = lab.host("a").unwrap();
    assert!(a.route_dev("default", "lo").is_err());
    assert!(a.route_dev("::/0", "lo").is_err());
}

#[test]
fn unique_ifnames_fit_and_differ() {
    let lab = Lab::new().unwrap();
    let x = lab.unique_ifname("wgmesh");
    let y = lab.unique_ifname("wgmesh");
    assert_ne!(x, y);
    assert!(x.len() <= 15 && x.starts_with("wg"), "{x}");
}
