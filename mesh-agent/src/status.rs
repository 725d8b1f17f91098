//! What the agent reports about itself: `mesh-agent status` prints it (JSON
//! or Prometheus text, through [`crate::metrics`]), and the health report to
//! control will carry it.

use std::{
    collections::BTreeMap,
    fmt,
    net::SocketAddr,
    time::{SystemTime, UNIX_EPOCH},
};

use ipnet::IpNet;
use mesh_metrics::{
    Label,
    family::{counters, gauge, gauges, histograms},
    prometheus_client::encoding::DescriptorEncoder,
};
use serde::{Deserialize, Serialize};

use crate::{
    keys::PublicKey,
    reconcile::{Actual, DataplaneStats, Report},
    view::NodeView,
    wg::{Selection, handshake::HandshakeTimes},
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
    /// The handshake times of the running agent's peers (metrics only).
    #[serde(skip)]
    pub handshakes: Option<HandshakeTimes>,
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

    /// Writes the numbers operators watch as metric families (the agent's
    /// registry calls this on each scrape with the status of that moment).
    pub fn encode_metrics(&self, e: &mut DescriptorEncoder<'_>) -> fmt::Result {
        if let Some(b) = &self.backend {
            gauges(
                e,
                "mesh_agent_wireguard_backend",
                "WireGuard backend in use (1 for the active one).",
                [([("interface", Label::from(self.interface.as_str())), ("backend", Label::new(b.kind))], 1i64)],
            )?;
        }
        gauge(e, "mesh_agent_up", "Whether a running agent answered.", i64::from(self.running))?;
        gauge(
            e,
            "mesh_agent_policy_enforced",
            "Whether the compiled policy is enforced.",
            i64::from(self.policy_enforced),
        )?;
        if let Some(g) = self.applied_generation {
            gauge(e, "mesh_agent_applied_generation", "Generation of the last applied node view.", g)?;
        }
        gauge(
            e,
            "mesh_agent_reconcile_consecutive_failures",
            "Failed reconcile runs since the last success.",
            i64::from(self.consecutive_failures),
        )?;
        if let Some(r) = self.last_run.as_ref().and_then(|r| r.report.as_ref()) {
            gauge(
                e,
                "mesh_agent_reconcile_duration_seconds",
                "Duration of the last successful reconcile run.",
                r.duration.as_secs_f64(),
            )?;
        }
        gauge(e, "mesh_agent_peers", "WireGuard peers configured.", self.peers.len() as i64)?;
        // `peer` (the name, as on the probe series) lets Prometheus map
        // peers to sites; `public_key` identifies peers without a name.
        let key = |p: &PeerStatus| {
            [("public_key", Label::new(p.public_key)), ("peer", Label::from(p.name.as_deref().unwrap_or_default()))]
        };
        gauges(
            e,
            "mesh_agent_peer_rx_bytes",
            "Bytes received from the peer.",
            self.peers.iter().map(|p| (key(p), p.rx_bytes)),
        )?;
        gauges(
            e,
            "mesh_agent_peer_tx_bytes",
            "Bytes sent to the peer.",
            self.peers.iter().map(|p| (key(p), p.tx_bytes)),
        )?;
        gauges(
            e,
            "mesh_agent_peer_endpoint_info",
            "The peer's endpoint in use (1; the endpoint label changes when the peer roams).",
            self.peers.iter().filter_map(|p| {
                let [k, n] = key(p);
                Some(([k, n, ("endpoint", Label::new(p.endpoint?))], 1i64))
            }),
        )?;
        let now = unix_now();
        gauges(
            e,
            "mesh_agent_peer_handshake_age_seconds",
            "Seconds since the last handshake with the peer.",
            self.peers.iter().filter_map(|p| Some((key(p), (now - p.last_handshake_unix? as f64).max(0.0)))),
        )?;
        gauges(
            e,
            "mesh_agent_peer_last_handshake_seconds",
            "Time of the last handshake (seconds since the epoch).",
            self.peers.iter().filter_map(|p| Some((key(p), p.last_handshake_unix?))),
        )?;
        if let Some(h) = &self.handshakes {
            histograms(
                e,
                "mesh_agent_handshake_duration_seconds",
                "Time from a handshake being due (first contact, or 120 s after the last) until it completed.",
                self.peers.iter().filter_map(|p| Some((key(p), h.get(&p.public_key)?.buckets()))),
            )?;
        }
        if let Some(d) = &self.dataplane {
            let rows = |label: &'static str, rows: &[(String, u64)]| {
                rows.iter().map(move |(l, v)| ([(label, Label::from(l.as_str()))], *v)).collect::<Vec<_>>()
            };
            counters(
                e,
                "mesh_agent_acl_verdict_packets",
                "Packets per ACL verdict on the overlay interface.",
                rows("verdict", &d.verdicts),
            )?;
            counters(
                e,
                "mesh_agent_acl_rule_packets",
                "Packets accepted by each rule of the active policy (reset when a policy is installed).",
                d.rules.iter().map(|(id, v)| ([("rule", Label::new(id))], *v)),
            )?;
            counters(
                e,
                "mesh_agent_mss_events",
                "SYN and SYN-ACK segments per MSS clamp outcome.",
                rows("event", &d.mss),
            )?;
            counters(
                e,
                "mesh_agent_guard_packets",
                "Underlay frames per XDP guard verdict.",
                rows("verdict", &d.guard),
            )?;
        }
        Ok(())
    }
}
