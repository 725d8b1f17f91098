//! Control's `/metrics`: one prometheus-client registry holding the
//! engine's counters and histogram ([`crate::engine::Metrics`]) and a
//! collector for the numbers read from the current snapshot at each scrape,
//! served by the shared responder ([`mesh_metrics::server`]).

use std::fmt;
use std::sync::Arc;

use mesh_metrics::{
    Format, Label, Limits, Scrape, Unavailable,
    family::{counters, gauge, gauges},
    prometheus_client::{collector::Collector, encoding::DescriptorEncoder, registry::Registry},
};
use tokio::net::TcpListener;

use crate::engine::{Engine, convert};
use crate::store::NodeState;

/// Control's registry: the engine's metrics and its snapshot's numbers.
#[must_use]
pub fn registry(engine: &Arc<Engine>) -> Registry {
    let mut registry = Registry::default();
    engine.metrics.register(&mut registry);
    engine.limits.register(&mut registry);
    registry.register_collector(Box::new(EngineState(engine.clone())));
    registry
}

/// The metrics text in `format`.
pub fn render(registry: &Registry, format: Format) -> Result<String, fmt::Error> {
    mesh_metrics::exposition::encode(registry, format)
}

/// Serves `/metrics` on `listener` until the task is dropped.
pub async fn serve(listener: TcpListener, engine: Arc<Engine>) {
    let endpoint = Endpoint(registry(&engine));
    mesh_metrics::server::serve(listener, Limits::default(), Arc::new(endpoint)).await;
}

#[derive(Debug)]
struct Endpoint(Registry);

impl Scrape for Endpoint {
    async fn scrape(&self, format: Format) -> Result<String, Unavailable> {
        render(&self.0, format).map_err(|_| Unavailable("the metrics could not be encoded".into()))
    }
}

/// Numbers read from the engine's current state at each scrape.
#[derive(Debug)]
struct EngineState(Arc<Engine>);

impl Collector for EngineState {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> fmt::Result {
        let engine = &self.0;
        let snap = engine.snapshot();
        let now = engine.now();
        let (mut pending, mut approved, mut expired, mut soon) = (0i64, 0i64, 0i64, 0i64);
        for n in &snap.nodes {
            if n.expired(now) {
                expired += 1;
            } else if n.state == NodeState::Pending {
                pending += 1;
            } else {
                approved += 1;
            }
            if !n.expired(now) && n.key_expiry - now < convert::EXPIRING_SOON_SECS {
                soon += 1;
            }
        }
        let e = &mut encoder;
        gauges(
            e,
            "mesh_control_nodes",
            "Nodes by state.",
            [("pending", pending), ("approved", approved), ("expired", expired)].map(|(s, v)| ([("state", s)], v)),
        )?;
        gauge(e, "mesh_control_agents_connected", "Open agent Sync streams.", engine.connected() as i64)?;
        gauge(e, "mesh_control_keys_expiring_soon", "Node keys expiring within 7 days.", soon)?;
        gauge(e, "mesh_control_policy_generation", "Active policy generation.", engine.policy().1)?;
        let (direct, relay) = engine.path_counts();
        gauges(
            e,
            "mesh_control_peer_paths",
            "Node-to-peer links by path, from the agents' latest health reports.",
            [("direct", direct), ("relay", relay)].map(|(p, v)| ([("path", p)], i64::try_from(v).unwrap_or(i64::MAX))),
        )?;
        let c = engine.counters_total();
        counters(
            e,
            "mesh_control_agent_packets",
            "Dataplane verdicts reported by agents.",
            [([("verdict", "accept")], c.accepted_packets), ([("verdict", "deny")], c.denied_packets)],
        )?;
        // Views agents could not fully apply: the number of nodes nacking
        // now, and one series per nacking node (an alert fires on
        // `mesh_control_node_view_nacked == 1`).
        let nacks = engine.nacks();
        gauge(e, "mesh_control_nodes_nacking", "Nodes whose last answer to a view was an error.", nacks.len() as i64)?;
        gauges(
            e,
            "mesh_control_node_view_nacked",
            "1 while the node's agent fails to apply its view.",
            nacks.keys().map(|id| {
                let name = snap.nodes.iter().find(|n| n.id == *id).map_or("", |n| n.name.as_str());
                ([("node", Label::from(name)), ("node_id", Label::new(id))], 1i64)
            }),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every family control exported before prometheus-client, by name and
    /// type, so that dashboards and alerts keep working.
    #[test]
    fn families_keep_their_names_and_types() {
        let mut registry = Registry::default();
        crate::engine::Metrics::default().register(&mut registry);
        let text = render(&registry, Format::Classic).unwrap();
        for family in [
            "mesh_control_pushes_total counter",
            "mesh_control_route_primary_changes_total counter",
            "mesh_control_push_latency_seconds histogram",
            "mesh_control_view_nacks_total counter",
        ] {
            assert!(text.contains(&format!("# TYPE {family}\n")), "{family}:\n{text}");
        }
        assert!(text.contains("mesh_control_push_latency_seconds_bucket{le=\"0.001\"} 0\n"), "{text}");
    }
}
