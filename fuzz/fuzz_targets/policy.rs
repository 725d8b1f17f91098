//! The policy language end to end: HuJSON text, its typed model (whose
//! problems are reported, never panicked on), then compilation for a small
//! inventory and the policy's own tests. Any panic, overflow or stack
//! exhaustion is a bug: operators paste this text through meshctl.
#![no_main]

use std::net::IpAddr;

use mesh_control::policy::{self, Inventory, InventoryNode};

fn inventory() -> Vec<InventoryNode> {
    let node = |id: u64, name: &str, v4: &str, v6: &str, tags: &[&str], routes: &[&str]| InventoryNode {
        id,
        name: name.into(),
        addrs: vec![v4.parse::<IpAddr>().unwrap(), v6.parse::<IpAddr>().unwrap()],
        tags: tags.iter().map(|t| (*t).into()).collect(),
        user: if tags.is_empty() { "alice@example.com".into() } else { String::new() },
        routes: routes.iter().map(|r| r.parse().unwrap()).collect(),
    };
    vec![
        node(1, "nyc-gw1", "100.64.0.1", "fd7a:115c:a1e0::1", &["tag:gw"], &["198.18.10.0/24", "2001:db8:10::/64"]),
        node(2, "fsn-gw1", "100.64.0.2", "fd7a:115c:a1e0::2", &["tag:gw", "tag:eu"], &["198.18.20.0/24"]),
        node(3, "laptop", "100.64.0.3", "fd7a:115c:a1e0::3", &[], &[]),
    ]
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let _ = policy::hujson::parse(text);
    let Ok(p) = policy::Policy::parse(text) else { return };
    let inv = inventory();
    let inv: &Inventory = &inv;
    let _ = policy::compile_for_dataplane(&p, inv, 1);
    let _ = policy::connectivity(&p, inv);
    let _ = policy::run_tests(&p, inv);
});
