//! The engine's counters and push-latency histogram: prometheus-client
//! metrics, registered in control's registry by [`crate::metrics`].

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use prometheus_client::{
    metrics::{counter::Counter, histogram::Histogram},
    registry::Registry,
};

/// Upper bounds (seconds) of the push-latency histogram buckets.
pub const LATENCY_BUCKETS: [f64; 10] = [0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0];

/// Counters of the engine.
#[derive(Debug)]
pub struct Metrics {
    /// Views published (one per node whose view changed).
    pub pushes: Counter,
    /// Refreshes run.
    pub refreshes: AtomicU64,
    /// Changes of a prefix's primary gateway.
    pub primary_changes: Counter,
    /// Acks carrying an error (an agent could not fully apply a view).
    pub nacks: Counter,
    /// From publishing a view to the agent's ack.
    pub push_latency: Histogram,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            pushes: Counter::default(),
            refreshes: AtomicU64::new(0),
            primary_changes: Counter::default(),
            nacks: Counter::default(),
            push_latency: Histogram::new(LATENCY_BUCKETS),
        }
    }
}

impl Metrics {
    pub(crate) fn record_refresh(&self, published: u64, _took: Duration) {
        self.pushes.inc_by(published);
        self.refreshes.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn observe_push_latency(&self, d: Duration) {
        self.push_latency.observe(d.as_secs_f64());
    }

    /// Registers the exported metrics (handles to the same values) in
    /// `registry`. Help texts have no final period: prometheus-client adds it.
    pub fn register(&self, registry: &mut Registry) {
        registry.register("mesh_control_pushes", "Node view generations published", self.pushes.clone());
        registry.register(
            "mesh_control_route_primary_changes",
            "Changes of a prefix's primary gateway",
            self.primary_changes.clone(),
        );
        registry.register(
            "mesh_control_push_latency_seconds",
            "From publishing a view to the agent's ack",
            self.push_latency.clone(),
        );
        registry.register(
            "mesh_control_view_nacks",
            "Acks carrying an error: an agent could not fully apply a view",
            self.nacks.clone(),
        );
    }
}
