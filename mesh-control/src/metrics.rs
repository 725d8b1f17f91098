//! `/metrics`: Prometheus text over a minimal HTTP/1.1 responder (one GET
//! per connection; nothing else is served).

use std::fmt::Write as _;
use std::sync::Arc;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpListener;

use crate::engine::metrics::LATENCY_BUCKETS;
use crate::engine::{Engine, convert};
use crate::store::NodeState;

/// The metrics text.
#[must_use]
pub fn render(engine: &Engine) -> String {
    let snap = engine.snapshot();
    let now = engine.now();
    let mut s = String::new();
    let (mut pending, mut approved, mut expired, mut soon) = (0, 0, 0, 0);
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
    let _ = writeln!(s, "# HELP mesh_control_nodes Nodes by state.\n# TYPE mesh_control_nodes gauge");
    for (state, v) in [("pending", pending), ("approved", approved), ("expired", expired)] {
        let _ = writeln!(s, "mesh_control_nodes{{state=\"{state}\"}} {v}");
    }
    let _ = writeln!(
        s,
        "# HELP mesh_control_agents_connected Open agent Sync streams.\n# TYPE mesh_control_agents_connected gauge"
    );
    let _ = writeln!(s, "mesh_control_agents_connected {}", engine.connected());
    let _ = writeln!(
        s,
        "# HELP mesh_control_keys_expiring_soon Node keys expiring within 7 days.\n# TYPE mesh_control_keys_expiring_soon gauge"
    );
    let _ = writeln!(s, "mesh_control_keys_expiring_soon {soon}");
    let _ = writeln!(
        s,
        "# HELP mesh_control_policy_generation Active policy generation.\n# TYPE mesh_control_policy_generation gauge"
    );
    let _ = writeln!(s, "mesh_control_policy_generation {}", engine.policy().1);
    let pushes = engine.metrics.pushes.load(std::sync::atomic::Ordering::Relaxed);
    let _ = writeln!(
        s,
        "# HELP mesh_control_pushes_total Node view generations published.\n# TYPE mesh_control_pushes_total counter"
    );
    let _ = writeln!(s, "mesh_control_pushes_total {pushes}");
    let _ = writeln!(
        s,
        "# HELP mesh_control_route_primary_changes_total Changes of a prefix's primary gateway.\n# TYPE mesh_control_route_primary_changes_total counter"
    );
    let _ = writeln!(
        s,
        "mesh_control_route_primary_changes_total {}",
        engine.metrics.primary_changes.load(std::sync::atomic::Ordering::Relaxed)
    );
    let h = engine.metrics.latency();
    let _ = writeln!(
        s,
        "# HELP mesh_control_push_latency_seconds From publishing a view to the agent's ack.\n# TYPE mesh_control_push_latency_seconds histogram"
    );
    let mut cumulative = 0;
    for (b, c) in LATENCY_BUCKETS.iter().zip(h.buckets) {
        cumulative += c;
        let _ = writeln!(s, "mesh_control_push_latency_seconds_bucket{{le=\"{b}\"}} {cumulative}");
    }
    let _ = writeln!(s, "mesh_control_push_latency_seconds_bucket{{le=\"+Inf\"}} {}", h.count);
    let _ = writeln!(s, "mesh_control_push_latency_seconds_sum {}", h.sum);
    let _ = writeln!(s, "mesh_control_push_latency_seconds_count {}", h.count);
    let c = engine.counters_total();
    let _ = writeln!(
        s,
        "# HELP mesh_control_agent_packets_total Dataplane verdicts reported by agents.\n# TYPE mesh_control_agent_packets_total counter"
    );
    let _ = writeln!(s, "mesh_control_agent_packets_total{{verdict=\"accept\"}} {}", c.accepted_packets);
    let _ = writeln!(s, "mesh_control_agent_packets_total{{verdict=\"deny\"}} {}", c.denied_packets);
    render_nacks(&mut s, engine, &snap);
    s
}

/// Views agents could not fully apply: a counter of nacks, the number of
/// nodes nacking now, and one series per nacking node (an alert fires on
/// `mesh_control_node_view_nacked == 1`).
fn render_nacks(s: &mut String, engine: &Engine, snap: &crate::store::Snapshot) {
    let nacks = engine.nacks();
    let _ = writeln!(
        s,
        "# HELP mesh_control_view_nacks_total Acks carrying an error: an agent could not fully apply a view.\n# TYPE mesh_control_view_nacks_total counter"
    );
    let _ = writeln!(
        s,
        "mesh_control_view_nacks_total {}",
        engine.metrics.nacks.load(std::sync::atomic::Ordering::Relaxed)
    );
    let _ = writeln!(
        s,
        "# HELP mesh_control_nodes_nacking Nodes whose last answer to a view was an error.\n# TYPE mesh_control_nodes_nacking gauge"
    );
    let _ = writeln!(s, "mesh_control_nodes_nacking {}", nacks.len());
    let _ = writeln!(
        s,
        "# HELP mesh_control_node_view_nacked 1 while the node's agent fails to apply its view.\n# TYPE mesh_control_node_view_nacked gauge"
    );
    for id in nacks.keys() {
        let name = snap.nodes.iter().find(|n| n.id == *id).map_or("", |n| n.name.as_str());
        let _ = writeln!(s, "mesh_control_node_view_nacked{{node=\"{}\",node_id=\"{id}\"}} 1", escape(name));
    }
}

/// A Prometheus label value: backslash, quote and newline escaped.
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

/// Serves `/metrics` on `listener` until the task is dropped.
pub async fn serve(listener: TcpListener, engine: Arc<Engine>) {
    loop {
        let Ok((mut sock, _)) = listener.accept().await else { continue };
        let engine = engine.clone();
        tokio::spawn(async move {
            let mut buf = [0u8; 2048];
            let n = sock.read(&mut buf).await.unwrap_or(0);
            let req = String::from_utf8_lossy(&buf[..n]);
            let (status, body) = if req.starts_with("GET /metrics") {
                ("200 OK", render(&engine))
            } else {
                ("404 Not Found", "not found\n".to_owned())
            };
            let resp = format!(
                "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = sock.write_all(resp.as_bytes()).await;
        });
    }
}
