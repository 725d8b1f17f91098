//! What the agent reports about itself: `mesh-agent status` prints it (JSON
//! or Prometheus text), and the health report to control will carry it.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    net::SocketAddr,
    time::{SystemTime, UNIX_EPOCH},
};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::{
    keys::PublicKey,
    reconcile::{Actual, Report},
    view::NodeView,
    wg::Selection,
};

/// The outcome of the last reconcile run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LastRun {
    /// When it finished (seconds since the epoch).
    pub at_unix: f64,
    /// Its report if it succeeded.
    pub report: Option<Report>,
    /// Its error if it failed.
    pub error: Option<String>,
}

/// One peer in the status.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerStatus {
    /// Public key.
    pub public_key: PublicKey,
    /// Name from the node view.
    pub name: Option<String>,
    /// Current endpoint.
    pub endpoint: Option<SocketAddr>,
    /// Allowed IPs.
    pub allowed_ips: Vec<IpNet>,
    /// Last handshake (seconds since the epoch).
    pub last_handshake_unix: Option<u64>,
    /// Bytes received.
    pub rx_bytes: u64,
    /// Bytes sent.
    pub tx_bytes: u64,
}

/// The agent's status.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Status {
    /// Whether a running agent answered (false: read from the state file).
    pub running: bool,
    /// Overlay interface.
    pub interface: String,
    /// The WireGuard backend and why it was chosen.
    pub backend: Option<Selection>,
    /// This node's public key.
    pub public_key: Option<PublicKey>,
    /// Whether the policy is enforced (an enforcer is configured).
    pub policy_enforced: bool,
    /// Generation of the last view applied and confirmed.
    pub applied_generation: Option<u64>,
    /// Generation of the view the agent is converging to.
    pub desired_generation: Option<u64>,
    /// Failed runs since the last success.
    pub consecutive_failures: u32,
    /// The last run.
    pub last_run: Option<LastRun>,
    /// Link up.
    pub link_up: Option<bool>,
    /// Link MTU.
    pub mtu: Option<u32>,
    /// Addresses on the link.
    pub addresses: Vec<IpNet>,
    /// The agent's routes.
    pub routes: Vec<IpNet>,
    /// Peers as read back from WireGuard.
    pub peers: Vec<PeerStatus>,
    /// Why the actual state could not be read, if it could not.
    pub observe_error: Option<String>,
    /// The eBPF dataplane's counters (none without enforcement).
    #[serde(default)]
    pub dataplane: Option<DataplaneStats>,
}

/// The enforcement counters, as plain numbers (packets).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataplaneStats {
    /// Packets per ACL verdict (`AcceptRule`, `DropNoRule`, ...).
    pub verdicts: Vec<(String, u64)>,
    /// Packets decided by each rule of the active policy (rule id).
    pub rules: Vec<(u32, u64)>,
    /// SYN / SYN-ACK segments per MSS clamp event.
    pub mss: Vec<(String, u64)>,
    /// Underlay frames per guard verdict.
    pub guard: Vec<(String, u64)>,
}

/// Seconds since the epoch.
#[must_use]
pub fn unix_now() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_secs_f64()
}

impl Status {
    /// Fills the live part from an observed state, naming peers from `view`.
    pub fn set_actual(&mut self, actual: &Actual, view: Option<&NodeView>) {
        let names: BTreeMap<PublicKey, String> = view
            .map(|v| v.peers.iter().filter_map(|p| Some((p.public_key, p.name.clone()?))).collect())
            .unwrap_or_default();
        self.link_up = actual.link.map(|l| l.up);
        self.mtu = actual.link.map(|l| l.mtu);
        self.addresses = actual.addresses.iter().copied().collect();
        self.routes = actual.routes.iter().copied().collect();
        self.peers = actual
            .wg
            .peers
            .iter()
            .map(|(k, p)| PeerStatus {
                public_key: *k,
                name: names.get(k).cloned(),
                endpoint: p.endpoint,
                allowed_ips: p.allowed_ips.iter().copied().collect(),
                last_handshake_unix: p
                    .last_handshake
                    .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
                    .map(|d| d.as_secs()),
                rx_bytes: p.rx_bytes,
                tx_bytes: p.tx_bytes,
            })
            .collect();
    }

    /// Prometheus text exposition of the numbers operators watch.
    #[must_use]
    pub fn prometheus(&self) -> String {
        let mut s = String::new();
        let mut gauge = |name: &str, help: &str, rows: Vec<(String, f64)>| {
            let _ = writeln!(s, "# HELP {name} {help}\n# TYPE {name} gauge");
            for (labels, v) in rows {
                let _ = writeln!(s, "{name}{labels} {v}");
            }
        };
        let iface = &self.interface;
        if let Some(b) = &self.backend {
            gauge(
                "mesh_agent_wireguard_backend",
                "WireGuard backend in use (1 for the active one).",
                vec![(format!("{{interface=\"{iface}\",backend=\"{}\"}}", b.kind), 1.0)],
            );
        }
        gauge(
            "mesh_agent_up",
            "Whether a running agent answered.",
            vec![(String::new(), f64::from(u8::from(self.running)))],
        );
        gauge(
            "mesh_agent_policy_enforced",
            "Whether the compiled policy is enforced.",
            vec![(String::new(), f64::from(u8::from(self.policy_enforced)))],
        );
        if let Some(g) = self.applied_generation {
            gauge(
                "mesh_agent_applied_generation",
                "Generation of the last applied node view.",
                vec![(String::new(), g as f64)],
            );
        }
        gauge(
            "mesh_agent_reconcile_consecutive_failures",
            "Failed reconcile runs since the last success.",
            vec![(String::new(), f64::from(self.consecutive_failures))],
        );
        if let Some(r) = self.last_run.as_ref().and_then(|r| r.report.as_ref()) {
            gauge(
                "mesh_agent_reconcile_duration_seconds",
                "Duration of the last successful reconcile run.",
                vec![(String::new(), r.duration.as_secs_f64())],
            );
        }
        gauge("mesh_agent_peers", "WireGuard peers configured.", vec![(String::new(), self.peers.len() as f64)]);
        let per_peer = |f: &dyn Fn(&PeerStatus) -> Option<f64>| {
            self.peers
                .iter()
                .filter_map(|p| Some((format!("{{public_key=\"{}\"}}", p.public_key), f(p)?)))
                .collect::<Vec<_>>()
        };
        gauge("mesh_agent_peer_rx_bytes", "Bytes received from the peer.", per_peer(&|p| Some(p.rx_bytes as f64)));
        gauge("mesh_agent_peer_tx_bytes", "Bytes sent to the peer.", per_peer(&|p| Some(p.tx_bytes as f64)));
        let now = unix_now();
        gauge(
            "mesh_agent_peer_handshake_age_seconds",
            "Seconds since the last handshake with the peer.",
            per_peer(&|p| p.last_handshake_unix.map(|t| (now - t as f64).max(0.0))),
        );
        gauge(
            "mesh_agent_peer_last_handshake_seconds",
            "Time of the last handshake (seconds since the epoch).",
            per_peer(&|p| p.last_handshake_unix.map(|t| t as f64)),
        );
        if let Some(d) = &self.dataplane {
            let mut counter = |name: &str, help: &str, label: &str, rows: Vec<(String, u64)>| {
                let _ = writeln!(s, "# HELP {name} {help}\n# TYPE {name} counter");
                for (l, v) in rows {
                    let _ = writeln!(s, "{name}{{{label}=\"{l}\"}} {v}");
                }
            };
            counter(
                "mesh_agent_acl_verdict_packets_total",
                "Packets per ACL verdict on the overlay interface.",
                "verdict",
                d.verdicts.clone(),
            );
            counter(
                "mesh_agent_acl_rule_packets_total",
                "Packets accepted by each rule of the active policy (reset when a policy is installed).",
                "rule",
                d.rules.iter().map(|(id, v)| (id.to_string(), *v)).collect(),
            );
            counter(
                "mesh_agent_mss_events_total",
                "SYN and SYN-ACK segments per MSS clamp outcome.",
                "event",
                d.mss.clone(),
            );
            counter(
                "mesh_agent_guard_packets_total",
                "Underlay frames per XDP guard verdict.",
                "verdict",
                d.guard.clone(),
            );
        }
        s
    }
}
