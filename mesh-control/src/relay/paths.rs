//! Path changes between health reports, and the per-node rate limit on
//! auditing them. Pure: the engine keeps the reports and the limiter, the
//! Sync handler writes the entries.
//!
//! A flapping link could switch path every few seconds, and every switch is
//! an audit row on every replica's disk, so each reporting node gets at
//! most [`PER_MINUTE`] entries a minute; the switches beyond are counted,
//! and the next entry written says how many were left out.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use mesh_proto::v1 as pb;

/// Path-change audit entries one node may cause per minute.
pub const PER_MINUTE: u32 = 6;
const WINDOW: Duration = Duration::from_secs(60);

/// How a node's packets reach a peer, as its agent reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Path {
    /// Straight to the peer's endpoint.
    Direct,
    /// Through the relay of this region.
    Relay(String),
}

impl Path {
    /// The path a peer entry reports (none: unknown, or an agent before
    /// capability 7).
    #[must_use]
    pub fn of(h: &pb::PeerHealth) -> Option<Self> {
        match h.path.as_str() {
            "direct" => Some(Self::Direct),
            "relay" => Some(Self::Relay(h.relay_region.clone())),
            _ => None,
        }
    }

    /// `direct` or `relay`, as metrics label it.
    #[must_use]
    pub const fn kind(&self) -> &'static str {
        match self {
            Self::Direct => "direct",
            Self::Relay(_) => "relay",
        }
    }
}

impl std::fmt::Display for Path {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Direct => f.write_str("direct"),
            Self::Relay(r) if r.is_empty() => f.write_str("relay"),
            Self::Relay(r) => write!(f, "relay ({r})"),
        }
    }
}

/// A peer whose path differs between two reports of one node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PathChange {
    /// The peer's node id.
    pub peer: u64,
    /// The path in the earlier report.
    pub from: Path,
    /// The path now.
    pub to: Path,
}

/// The peers whose known path in `new` differs from their known path in
/// `old`. A peer without a path in either report (new, or unknown) has
/// not changed path.
#[must_use]
pub fn changes(old: &pb::HealthReport, new: &pb::HealthReport) -> Vec<PathChange> {
    let before: HashMap<u64, Path> = old.peers.iter().filter_map(|h| Some((h.node_id, Path::of(h)?))).collect();
    new.peers
        .iter()
        .filter_map(|h| {
            let (from, to) = (before.get(&h.node_id)?, Path::of(h)?);
            (*from != to).then(|| PathChange { peer: h.node_id, from: from.clone(), to })
        })
        .collect()
}

/// Whether one more path change of a node is audited.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admit {
    /// Write it, saying that `suppressed` changes before it were not.
    Write {
        /// Changes left out since the last entry written.
        suppressed: u32,
    },
    /// Over the limit: counted, not written.
    Suppressed,
}

#[derive(Debug)]
struct Window {
    start: Instant,
    written: u32,
    suppressed: u32,
}

/// At most [`PER_MINUTE`] entries per node in each minute (a fixed window
/// from the node's first entry in it).
#[derive(Debug, Default)]
pub struct AuditLimiter {
    nodes: HashMap<u64, Window>,
}

impl AuditLimiter {
    /// Whether `node`'s next path change, at `now`, is written.
    pub fn admit(&mut self, node: u64, now: Instant) -> Admit {
        let w = self.nodes.entry(node).or_insert(Window { start: now, written: 0, suppressed: 0 });
        if now.saturating_duration_since(w.start) >= WINDOW {
            w.start = now;
            w.written = 0;
        }
        if w.written >= PER_MINUTE {
            w.suppressed = w.suppressed.saturating_add(1);
            return Admit::Suppressed;
        }
        w.written += 1;
        Admit::Write { suppressed: std::mem::take(&mut w.suppressed) }
    }

    /// Forgets a removed node.
    pub fn forget(&mut self, node: u64) {
        self.nodes.remove(&node);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(id: u64, path: &str, region: &str) -> pb::PeerHealth {
        pb::PeerHealth { node_id: id, path: path.into(), relay_region: region.into(), ..Default::default() }
    }

    fn report(peers: Vec<pb::PeerHealth>) -> pb::HealthReport {
        pb::HealthReport { peers, ..Default::default() }
    }

    #[test]
    fn only_known_paths_that_differ_are_changes() {
        let old = report(vec![peer(1, "direct", ""), peer(2, "relay", "fsn"), peer(3, "", ""), peer(4, "direct", "")]);
        let new = report(vec![
            peer(1, "relay", "fsn"),
            peer(2, "relay", "nbg"),
            peer(3, "direct", ""),
            peer(4, "direct", ""),
            peer(5, "relay", "fsn"),
        ]);
        let got = changes(&old, &new);
        assert_eq!(
            got,
            [
                PathChange { peer: 1, from: Path::Direct, to: Path::Relay("fsn".into()) },
                PathChange { peer: 2, from: Path::Relay("fsn".into()), to: Path::Relay("nbg".into()) },
            ]
        );
        assert_eq!(format!("{} -> {}", got[0].from, got[0].to), "direct -> relay (fsn)");
        assert_eq!(Path::Relay(String::new()).to_string(), "relay");
        assert!(changes(&new, &new).is_empty());
    }

    #[test]
    fn six_a_minute_per_node_then_the_next_entry_counts_the_rest() {
        let mut l = AuditLimiter::default();
        let t0 = Instant::now();
        for i in 0..PER_MINUTE {
            assert_eq!(l.admit(1, t0 + Duration::from_secs(u64::from(i))), Admit::Write { suppressed: 0 });
        }
        for _ in 0..3 {
            assert_eq!(l.admit(1, t0 + Duration::from_secs(30)), Admit::Suppressed);
        }
        assert_eq!(l.admit(2, t0 + Duration::from_secs(30)), Admit::Write { suppressed: 0 }, "per node");
        assert_eq!(l.admit(1, t0 + Duration::from_secs(59)), Admit::Suppressed);
        // A new minute: the first entry says four were left out, once.
        assert_eq!(l.admit(1, t0 + Duration::from_secs(60)), Admit::Write { suppressed: 4 });
        assert_eq!(l.admit(1, t0 + Duration::from_secs(61)), Admit::Write { suppressed: 0 });
        l.forget(1);
        assert_eq!(l.admit(1, t0 + Duration::from_secs(62)), Admit::Write { suppressed: 0 });
    }
}
