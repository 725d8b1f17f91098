//! The relay's `/metrics`: one prometheus-client registry, served by the
//! shared responder ([`mesh_metrics::server`]).
//!
//! prometheus-client ends each help text with a period itself. Label
//! values are fixed words, never text from a client, so they need no
//! escaping. Per-packet counters are looked up once here, not in their
//! family on every packet.

use std::sync::Arc;

use mesh_metrics::{
    Format, Limits, Scrape, Unavailable,
    prometheus_client::{
        metrics::{counter::Counter, family::Family, gauge::Gauge},
        registry::Registry,
    },
};
use tokio::net::TcpListener;

use crate::reflect::ReflectorStats;

type ByResult = Family<[(&'static str, &'static str); 1], Counter>;

/// The relay's counters and gauges.
#[derive(Debug)]
pub(crate) struct Metrics {
    registry: Registry,
    pub(crate) clients: Gauge,
    pub(crate) forwarded: Counter,
    pub(crate) no_peer: Counter,
    pub(crate) queue_full: Counter,
    pub(crate) bytes: Counter,
    attach_results: ByResult,
    pub(crate) reflector: ReflectorStats,
}

impl Metrics {
    pub(crate) fn new() -> Self {
        let mut registry = Registry::default();
        let clients = Gauge::default();
        registry.register("mesh_relay_clients", "Nodes attached now", clients.clone());
        let packets = ByResult::default();
        registry.register("mesh_relay_packets", "Packets received from nodes, by what became of them", packets.clone());
        let bytes = Counter::default();
        registry.register("mesh_relay_bytes", "Payload bytes forwarded", bytes.clone());
        let attach = ByResult::default();
        registry.register("mesh_relay_attach", "Attach attempts by result", attach.clone());
        let reflect = ByResult::default();
        registry.register("mesh_relay_reflector_requests", "Reflector datagrams by result", reflect.clone());
        let get = |f: &ByResult, v| f.get_or_create(&[("result", v)]).clone();
        Self {
            clients,
            forwarded: get(&packets, "forwarded"),
            no_peer: get(&packets, "no_peer"),
            queue_full: get(&packets, "queue_full"),
            bytes,
            reflector: ReflectorStats { answered: get(&reflect, "answered"), ignored: get(&reflect, "ignored") },
            attach_results: attach,
            registry,
        }
    }

    /// Counts an attach attempt (`result` is `ok` or a refusal's kind).
    pub(crate) fn attach(&self, result: &'static str) {
        self.attach_results.get_or_create(&[("result", result)]).inc();
    }

    /// The metrics text in `format`.
    pub(crate) fn render(&self, format: Format) -> Result<String, std::fmt::Error> {
        mesh_metrics::exposition::encode(&self.registry, format)
    }
}

#[derive(Debug)]
struct Endpoint(Arc<Metrics>);

impl Scrape for Endpoint {
    async fn scrape(&self, format: Format) -> Result<String, Unavailable> {
        self.0.render(format).map_err(|_| Unavailable("the metrics could not be encoded".into()))
    }
}

/// Serves `/metrics` on `listener` until the task is dropped.
pub(crate) async fn serve(listener: TcpListener, metrics: Arc<Metrics>) {
    mesh_metrics::server::serve(listener, Limits::default(), Arc::new(Endpoint(metrics))).await;
}
