//! The agent's side of mesh-control: enrollment (first start, with the
//! enrollment key) or the stored credential (later), the Sync stream, each
//! generation converted and applied through the reconcile worker then
//! acknowledged, health reports, and reconnection with backoff.
//!
//! While control is away nothing is torn down: the worker keeps the last
//! applied view (persisted, re-applied at restart), so forwarding and
//! enforcement go on (fail-static).

//!
//! The parts: [`credential`] (enrollment, the stored credential, renewal),
//! [`session`] (the Sync stream and the reconnect loop), [`feeder`] (views
//! and local failover overrides into the reconcile worker) and [`report`]
//! (what the agent tells control about itself).

pub mod convert;
mod credential;
mod feeder;
mod report;
mod rotation;
mod session;

use std::{
    collections::BTreeMap,
    time::{SystemTime, UNIX_EPOCH},
};

use ipnet::IpNet;
use mesh_metrics::{
    Label,
    family::{counters, gauge, gauges},
    prometheus_client::encoding::DescriptorEncoder,
};
use mesh_proto::v1 as pb;

pub use credential::Credential;
pub use report::health_report;
pub use session::run;

/// What the control session knows that the reconcile worker does not, for
/// the metrics endpoint.
#[derive(Clone, Debug, Default)]
pub struct ControlState {
    /// Whether the Sync stream is open.
    pub connected: bool,
    /// The control replica (its configured address) the stream is open to.
    pub replica: Option<String>,
    /// Expiry of this node's key at control (unix seconds).
    pub key_expiry_unix: Option<i64>,
    /// Each assigned prefix and its primary gateway's name.
    pub primaries: Vec<(String, String)>,
    /// The peers' paths (the path manager writes them).
    pub paths: crate::path::SharedPaths,
}

impl ControlState {
    /// Writes these facts as metric families (on each scrape).
    pub fn encode_metrics(&self, e: &mut DescriptorEncoder<'_>) -> std::fmt::Result {
        gauge(
            e,
            "mesh_agent_control_connected",
            "Whether the Sync stream to mesh-control is open.",
            i64::from(self.connected),
        )?;
        gauges(
            e,
            "mesh_agent_control_replica",
            "The control replica the Sync stream is open to (1; absent while disconnected).",
            self.replica.iter().map(|a| ([("address", Label::from(a.as_str()))], 1i64)),
        )?;
        if let Some(t) = self.key_expiry_unix {
            gauge(e, "mesh_agent_key_expiry_timestamp_seconds", "When this node's key expires at control.", t)?;
        }
        gauges(
            e,
            "mesh_agent_route_primary",
            "The primary gateway of each prefix in control's order (1 per prefix).",
            self.primaries.iter().map(|(prefix, gw)| {
                ([("prefix", Label::from(prefix.as_str())), ("gateway", Label::from(gw.as_str()))], 1i64)
            }),
        )?;
        let paths = self.paths.lock().map(|p| p.values().cloned().collect::<Vec<_>>()).unwrap_or_default();
        gauges(
            e,
            "mesh_agent_peer_path",
            "How packets to each peer travel (1 on the path in use: direct, or relay with its region).",
            paths.iter().map(|p| {
                let labels = [
                    ("peer", Label::from(p.name.as_str())),
                    ("path", Label::from(p.path)),
                    ("relay_region", Label::from(p.relay_region.as_str())),
                ];
                (labels, 1i64)
            }),
        )?;
        counters(
            e,
            "mesh_agent_peer_path_switches",
            "Path switches (direct to relay and back) per peer since the agent started.",
            paths.iter().map(|p| ([("peer", Label::from(p.name.as_str()))], p.switches)),
        )?;
        counters(
            e,
            "mesh_agent_peer_path_seconds",
            "Time spent on each path per peer since the agent started.",
            paths.iter().flat_map(|p| {
                [("direct", p.direct_secs), ("relay", p.relay_secs)]
                    .map(|(path, secs)| ([("peer", Label::from(p.name.as_str())), ("path", Label::from(path))], secs))
            }),
        )
    }

    /// Records the view's facts; `overrides` are the local failover's
    /// choices, which replace control's primary in the metric.
    fn update(shared: &SharedControlState, v: &pb::NodeView, overrides: &BTreeMap<IpNet, u64>) {
        let me = v.self_.as_ref();
        let name = |id: u64| {
            if me.is_some_and(|m| m.id == id) {
                return me.map(|m| m.name.clone()).unwrap_or_default();
            }
            v.peers.iter().find(|p| p.node_id == id).map_or_else(|| format!("node-{id}"), |p| p.name.clone())
        };
        if let Ok(mut st) = shared.lock() {
            st.key_expiry_unix = me.map(|m| m.key_expiry_unix).filter(|&t| t != 0);
            st.primaries = v
                .routes
                .iter()
                .filter_map(|r| {
                    let local = r.prefix.parse::<IpNet>().ok().and_then(|p| overrides.get(&p.trunc()).copied());
                    Some((r.prefix.clone(), name(local.or_else(|| r.gateways.first().copied())?)))
                })
                .collect();
        }
    }
}

/// [`ControlState`] shared between the session and the metrics endpoint.
pub type SharedControlState = std::sync::Arc<std::sync::Mutex<ControlState>>;

/// Why a session with control ended.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct SessionError(String);

/// Maps an error to a [`SessionError`] saying what failed, with the whole
/// source chain (transport errors hide the useful part in their sources).
fn err<E: Into<Box<dyn std::error::Error + Send + Sync>>>(what: &str) -> impl Fn(E) -> SessionError + '_ {
    move |e| {
        let e: Box<dyn std::error::Error + Send + Sync> = e.into();
        SessionError(format!("{what}: {}", mesh_client::channel::error_chain(&*e)))
    }
}

/// Seconds since the epoch, as an integer.
fn now_secs() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}
