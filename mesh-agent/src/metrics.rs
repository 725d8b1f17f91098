//! The agent's `/metrics` on `metrics_listen`: one prometheus-client
//! registry with collectors over the live status (asked from the reconcile
//! worker at each scrape), the control session's facts and the probes'
//! statistics, served by the shared responder ([`mesh_metrics::server`]).

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex, PoisonError},
};

use mesh_metrics::{
    Format, Limits, Scrape, Unavailable,
    prometheus_client::{collector::Collector, encoding::DescriptorEncoder, registry::Registry},
};

use crate::{control::SharedControlState, probe::SharedProbe, reconcile::worker::WorkerHandle, status::Status};

/// Serves `GET /metrics` on `addr` until the runtime stops. With a control
/// session, its facts and the probes' statistics are included.
pub async fn serve(addr: SocketAddr, worker: WorkerHandle, control: Option<(SharedControlState, SharedProbe)>) {
    let listener = match tokio::net::TcpListener::bind(addr).await {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(%addr, error = %e, "metrics endpoint not available");
            return;
        }
    };
    tracing::info!(%addr, "metrics endpoint ready");
    let status = StatusSlot::default();
    let mut registry = Registry::default();
    registry.register_collector(Box::new(status.clone()));
    if let Some((control, probes)) = control {
        registry.register_collector(Box::new(ControlMetrics(control)));
        registry.register_collector(Box::new(ProbeMetrics(probes)));
    }
    let endpoint = Endpoint { worker, registry, status, scraping: tokio::sync::Mutex::new(()) };
    mesh_metrics::server::serve(listener, Limits::default(), Arc::new(endpoint)).await;
}

/// `status` as Prometheus text (`mesh-agent status --format prometheus`):
/// the classic format, which promtool and node_exporter's textfile
/// collector read.
#[must_use]
pub fn status_text(status: &Status) -> String {
    let slot = StatusSlot::default();
    slot.set(Some(status.clone()));
    let mut registry = Registry::default();
    registry.register_collector(Box::new(slot));
    // Writing into a String fails only if a collector does, and ours don't.
    mesh_metrics::exposition::encode(&registry, Format::Classic).unwrap_or_default()
}

#[derive(Debug)]
struct Endpoint {
    worker: WorkerHandle,
    registry: Registry,
    status: StatusSlot,
    /// One scrape at a time fills and encodes the status slot.
    scraping: tokio::sync::Mutex<()>,
}

impl Scrape for Endpoint {
    async fn scrape(&self, format: Format) -> Result<String, Unavailable> {
        let status = self.worker.status().await.ok_or_else(|| Unavailable("the reconcile thread stopped".into()))?;
        let _one = self.scraping.lock().await;
        self.status.set(Some(status));
        let text = mesh_metrics::exposition::encode(&self.registry, format);
        // No stale status is kept between scrapes.
        self.status.set(None);
        text.map_err(|_| Unavailable("the metrics could not be encoded".into()))
    }
}

/// The status of the scrape in progress. The registry's collectors are
/// synchronous, and the status comes from the worker asynchronously, so
/// the scrape puts it here first.
#[derive(Clone, Debug, Default)]
struct StatusSlot(Arc<Mutex<Option<Status>>>);

impl StatusSlot {
    fn set(&self, status: Option<Status>) {
        *self.0.lock().unwrap_or_else(PoisonError::into_inner) = status;
    }
}

impl Collector for StatusSlot {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> std::fmt::Result {
        match &*self.0.lock().unwrap_or_else(PoisonError::into_inner) {
            Some(s) => s.encode_metrics(&mut encoder),
            None => Ok(()),
        }
    }
}

#[derive(Debug)]
struct ControlMetrics(SharedControlState);

impl Collector for ControlMetrics {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> std::fmt::Result {
        // A poisoned lock leaves these families out, as before.
        match self.0.lock() {
            Ok(c) => c.encode_metrics(&mut encoder),
            Err(_) => Ok(()),
        }
    }
}

#[derive(Debug)]
struct ProbeMetrics(SharedProbe);

impl Collector for ProbeMetrics {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> std::fmt::Result {
        match self.0.lock() {
            Ok(p) => p.encode_metrics(&mut encoder),
            Err(_) => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::time::Duration;

    use super::*;
    use crate::{
        control::ControlState,
        keys::PublicKey,
        probe::{
            PeerEntry, ProbeState,
            owner::Owned,
            stats::{PeerStats, Reach},
        },
        reconcile::DataplaneStats,
        status::PeerStatus,
        wg::{BackendKind, Selection, handshake::HandshakeTimes},
    };

    fn status() -> Status {
        Status {
            running: true,
            interface: "mesh0".into(),
            backend: Some(Selection { kind: BackendKind::Userspace, reason: String::new() }),
            public_key: None,
            policy_enforced: true,
            applied_generation: Some(7),
            desired_generation: Some(7),
            consecutive_failures: 0,
            last_run: None,
            link_up: Some(true),
            mtu: Some(1420),
            addresses: vec![],
            routes: vec![],
            peers: vec![PeerStatus {
                public_key: PublicKey([7; 32]),
                name: Some("gw".into()),
                endpoint: Some("192.0.2.2:51820".parse().unwrap()),
                allowed_ips: vec![],
                last_handshake_unix: Some(1),
                rx_bytes: 10,
                tx_bytes: 20,
            }],
            observe_error: None,
            dataplane: Some(DataplaneStats {
                verdicts: vec![("AcceptRule".into(), 3)],
                rules: vec![(1, 3)],
                mss: vec![("Clamped".into(), 1)],
                guard: vec![("Pass".into(), 9)],
            }),
            handshakes: Some(handshakes()),
        }
    }

    /// One handshake of peer [7; 32] that took 40 ms after it was due.
    fn handshakes() -> HandshakeTimes {
        let t0 = std::time::SystemTime::UNIX_EPOCH + Duration::from_secs(1_000);
        let mut h = HandshakeTimes::default();
        h.observe(t0, [(PublicKey([7; 32]), None)]);
        h.observe(t0 + Duration::from_secs(1), [(PublicKey([7; 32]), Some(t0 + Duration::from_millis(40)))]);
        h
    }

    fn scrape_text() -> String {
        let slot = StatusSlot::default();
        slot.set(Some(status()));
        let control = ControlState {
            connected: true,
            replica: Some("192.0.2.101:7443".into()),
            key_expiry_unix: Some(1_900_000_000),
            primaries: vec![("198.18.20.0/24".into(), "gw\"fsn".into())],
            paths: Arc::new(Mutex::new(BTreeMap::from([(
                PublicKey([7; 32]),
                crate::path::PathInfo {
                    name: "gwfsn".into(),
                    path: "relay",
                    relay_region: "fra".into(),
                    switches: 3,
                    direct_secs: 10.0,
                    relay_secs: 2.5,
                },
            )]))),
        };
        let mut stats = PeerStats::new(8, 3);
        stats.answered(Duration::from_millis(2));
        let prefix = "198.18.10.0/24".parse().unwrap();
        let probes = ProbeState {
            peers: BTreeMap::from([(
                2,
                PeerEntry {
                    name: "gwfsn".into(),
                    addr: [100, 64, 0, 2].into(),
                    stats,
                    lan: Some(([198, 18, 10, 2].into(), Reach::Down)),
                },
            )]),
            switches: BTreeMap::from([(prefix, 1)]),
            owned: BTreeMap::from([(prefix, Owned { since_unix: 5, first: true })]),
            owner_changes: BTreeMap::from([(prefix, 1)]),
            site_prefixes: vec![prefix],
            requests_answered: 4,
            ..ProbeState::default()
        };
        let mut registry = Registry::default();
        registry.register_collector(Box::new(slot));
        registry.register_collector(Box::new(ControlMetrics(Arc::new(Mutex::new(control)))));
        registry.register_collector(Box::new(ProbeMetrics(Arc::new(Mutex::new(probes)))));
        mesh_metrics::exposition::encode(&registry, Format::Classic).unwrap()
    }

    /// Every family the hand-written text had, by name and type, so that
    /// dashboards, alerts, the demo and the tests keep working.
    #[test]
    fn families_keep_their_names_types_and_samples() {
        let text = scrape_text();
        for family in [
            "mesh_agent_wireguard_backend gauge",
            "mesh_agent_up gauge",
            "mesh_agent_policy_enforced gauge",
            "mesh_agent_applied_generation gauge",
            "mesh_agent_reconcile_consecutive_failures gauge",
            "mesh_agent_peers gauge",
            "mesh_agent_peer_rx_bytes gauge",
            "mesh_agent_peer_tx_bytes gauge",
            "mesh_agent_peer_endpoint_info gauge",
            "mesh_agent_peer_handshake_age_seconds gauge",
            "mesh_agent_peer_last_handshake_seconds gauge",
            "mesh_agent_handshake_duration_seconds histogram",
            "mesh_agent_acl_verdict_packets_total counter",
            "mesh_agent_acl_rule_packets_total counter",
            "mesh_agent_mss_events_total counter",
            "mesh_agent_guard_packets_total counter",
            "mesh_agent_control_connected gauge",
            "mesh_agent_control_replica gauge",
            "mesh_agent_key_expiry_timestamp_seconds gauge",
            "mesh_agent_route_primary gauge",
            "mesh_agent_peer_rtt_seconds histogram",
            "mesh_agent_peer_probe_loss_ratio gauge",
            "mesh_agent_peer_probe_up gauge",
            "mesh_agent_peer_lan_probe_up gauge",
            "mesh_agent_peer_probes_answered_total counter",
            "mesh_agent_peer_probes_lost_total counter",
            "mesh_agent_route_local_failovers_total counter",
            "mesh_agent_route_owner gauge",
            "mesh_agent_route_owner_since_timestamp_seconds gauge",
            "mesh_agent_route_owner_changes_total counter",
            "mesh_agent_probe_requests_answered_total counter",
            "mesh_agent_probe_bad_packets_total counter",
            "mesh_agent_peer_path gauge",
            "mesh_agent_peer_path_switches_total counter",
            "mesh_agent_peer_path_seconds_total counter",
        ] {
            assert!(text.contains(&format!("# TYPE {family}\n")), "{family}:\n{text}");
        }
        for sample in [
            "mesh_agent_up 1\n",
            "mesh_agent_wireguard_backend{interface=\"mesh0\",backend=\"userspace\"} 1\n",
            "mesh_agent_acl_verdict_packets_total{verdict=\"AcceptRule\"} 3\n",
            "mesh_agent_acl_rule_packets_total{rule=\"1\"} 3\n",
            "mesh_agent_route_primary{prefix=\"198.18.20.0/24\",gateway=\"gw\\\"fsn\"} 1\n",
            "mesh_agent_control_replica{address=\"192.0.2.101:7443\"} 1\n",
            "mesh_agent_peer_endpoint_info{public_key=\"BwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwc=\",peer=\"gw\",endpoint=\"192.0.2.2:51820\"} 1\n",
            "mesh_agent_peer_rtt_seconds_bucket{le=\"0.0025\",peer=\"gwfsn\"} 1\n",
            "mesh_agent_peer_rtt_seconds_bucket{le=\"+Inf\",peer=\"gwfsn\"} 1\n",
            "mesh_agent_peer_rtt_seconds_count{peer=\"gwfsn\"} 1\n",
            "mesh_agent_peer_probe_up{peer=\"gwfsn\"} 1\n",
            "mesh_agent_peer_lan_probe_up{peer=\"gwfsn\"} 0\n",
            "mesh_agent_route_owner{prefix=\"198.18.10.0/24\"} 1\n",
            "mesh_agent_probe_requests_answered_total 4\n",
            "mesh_agent_peer_path{peer=\"gwfsn\",path=\"relay\",relay_region=\"fra\"} 1\n",
            "mesh_agent_peer_path_switches_total{peer=\"gwfsn\"} 3\n",
            "mesh_agent_peer_path_seconds_total{peer=\"gwfsn\",path=\"relay\"} 2.5\n",
            "mesh_agent_handshake_duration_seconds_bucket{le=\"0.05\",public_key=\"BwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwc=\",peer=\"gw\"} 1\n",
            "mesh_agent_handshake_duration_seconds_count{public_key=\"BwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwc=\",peer=\"gw\"} 1\n",
        ] {
            assert!(text.contains(sample), "{sample}:\n{text}");
        }
    }

    #[test]
    fn status_text_is_the_status_families_only() {
        let text = status_text(&status());
        assert!(text.contains("# TYPE mesh_agent_up gauge\nmesh_agent_up 1\n"), "{text}");
        assert!(!text.contains("mesh_agent_control_connected"), "{text}");
    }
}
