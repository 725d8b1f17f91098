//! WireGuard key rotation without a cut: with a two-way conversation
//! between app-nyc and db-fsn (one TCP connection per family with a checked
//! stream both ways, plus pings) running through fsn's primary gateway, an
//! operator runs `meshctl nodes rotate fsn-gw1`, [`ROTATIONS`] times in a
//! row. Each time the agent makes a new key, proves it to control, control
//! pushes it to every peer; the longest cut of every measure is what the
//! rotation cost. Several rotations, because a lost handshake shows in one
//! rotation of several, not in each (one did, in one of fifteen, until the
//! userspace engine restarted its peers' handshakes after a key change).

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use mesh_lab::twoway::{Conversation, Cuts};
use mesh_proto::v1 as pb;

use crate::{REGIONS, control, wait_for};

/// How many rotations the step makes, one after the other.
pub(crate) const ROTATIONS: usize = 5;

/// What the rotations showed.
#[derive(Debug)]
pub(crate) struct Outcome {
    /// Per rotation, the longest cut of each measure since its `meshctl
    /// nodes rotate`.
    pub(crate) cuts: Vec<Cuts>,
    /// The longest time until control had a new key.
    pub(crate) took: Duration,
    /// The audit log has the rotation.
    pub(crate) audited: bool,
    /// `meshctl nodes` shows the key's age as minutes.
    pub(crate) key_age_shown: bool,
    /// Views an agent refused during the rotations, as control logged them
    /// (a view made for the retired key must be skipped, not refused).
    pub(crate) nacks: usize,
}

/// Rotates `node`'s key under the conversation; see the module doc.
pub(crate) fn run(
    rt: &tokio::runtime::Runtime,
    ctl: &control::Control,
    app: &mesh_lab::Host,
    db: &mesh_lab::Host,
    node: &str,
) -> anyhow::Result<Outcome> {
    let fsn = &REGIONS[1];
    let addrs: Vec<SocketAddr> = vec![format!("{}:9000", fsn.db()).parse()?, format!("[{}]:9000", fsn.db6()).parse()?];
    let conv = Conversation::start(app, db, &addrs, Duration::from_millis(10))?;
    let start = Instant::now();
    wait_for("the conversation to flow", Duration::from_secs(20), || conv.flowing_since(start))?;
    let key_of = || {
        rt.block_on(async {
            let nodes = control::admin(ctl).await?.list_nodes(pb::ListNodesRequest {}).await?.into_inner().nodes;
            let n = nodes.into_iter().find(|n| n.name == node).with_context(|| format!("no node {node}"))?;
            anyhow::Ok((n.wireguard_public_key, n.key_rotation_requested, n.id))
        })
    };
    let nacks_in_log =
        || std::fs::read_to_string(ctl.log()).map(|l| l.matches("agent could not apply a view").count()).unwrap_or(0);
    let nacks_before = nacks_in_log();
    let (mut before, _, id) = key_of()?;
    let mut cuts = Vec::new();
    let mut took = Duration::ZERO;
    for i in 1..=ROTATIONS {
        println!(
            "== meshctl nodes rotate {node}: {i} of {ROTATIONS} (at {})",
            humantime::format_rfc3339_millis(std::time::SystemTime::now())
        );
        let t = Instant::now();
        ctl.meshctl(["nodes", "rotate", node])?;
        wait_for(&format!("{node}'s new key at control"), Duration::from_secs(20), || {
            key_of().is_ok_and(|(k, pending, _)| k != before && !pending)
        })?;
        took = took.max(t.elapsed());
        cuts.push(crate::ha::cuts_since(&conv, t, &format!("rotation {i}"))?);
        before = key_of()?.0;
    }
    let streams = conv.finish().map_err(|e| anyhow::anyhow!("the conversation did not survive the rotation: {e}"))?;
    for (n, o) in streams {
        println!("   {n}: {} / {} bytes checked both ways (SHA-256 equal)", o.bytes.0, o.bytes.1);
    }
    let audit = ctl.meshctl(["--json", "audit", "--action", "node.key_rotated", "--subject", &format!("node/{id}")])?;
    let nodes = ctl.meshctl(["nodes"])?;
    print!("{nodes}");
    let key_age_shown = nodes.lines().any(|l| {
        l.contains(node) && l.split_whitespace().any(|w| w.ends_with('m') && w[..w.len() - 1].parse::<u32>().is_ok())
    });
    let nacks = nacks_in_log() - nacks_before;
    Ok(Outcome { cuts, took, audited: audit.contains("node.key_rotated"), key_age_shown, nacks })
}
