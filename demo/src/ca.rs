//! Control's CA rotated with the mesh running: the new CA is trusted next
//! to the old one (every agent learns it over its stream), control switches
//! to it, an agent restarted then reconnects under the new CA, and the old
//! CA is retired everywhere.

use std::time::Duration;

use anyhow::Context as _;
use mesh_proto::v1 as pb;
use mesh_proto::v1::rotate_ca_request::Step;

use crate::{Gateway, control, wait_for};

/// What the rotation showed.
#[derive(Debug)]
pub(crate) struct Outcome {
    /// Every agent stored the new CA's pin after `begin`.
    pub learned: bool,
    /// The agent restarted after `switch` opened a new stream.
    pub reconnected: bool,
    /// After `retire`, every agent trusts the new CA only.
    pub retired: bool,
    /// Gateways online at control at the end.
    pub online: usize,
}

/// The CA pins an agent trusts, from its `control.json`.
fn pins(gw: &Gateway) -> Vec<String> {
    let text = std::fs::read_to_string(gw.state_dir().join("control.json")).unwrap_or_default();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
    v["ca_pins"]
        .as_array()
        .map(|a| a.iter().filter_map(|p| p.as_str().map(str::to_owned)).collect())
        .unwrap_or_default()
}

fn streams_opened(gw: &Gateway) -> usize {
    std::fs::read_to_string(gw.log()).unwrap_or_default().matches("sync stream open").count()
}

async fn step(ctl: &control::Control, step: Step) -> anyhow::Result<pb::CaInfo> {
    let mut a = control::admin(ctl).await?;
    Ok(a.rotate_ca(pb::RotateCaRequest { step: step.into() }).await?.into_inner())
}

/// Rotates control's CA  with `gateways` connected;
/// `gateways[restart]`'s agent is restarted between the switch and the
/// retirement.
pub(crate) fn rotate(
    rt: &tokio::runtime::Runtime,
    ctl: &control::Control,
    gateways: &mut [Gateway],
    restart: usize,
) -> anyhow::Result<Outcome> {
    let info = rt.block_on(step(ctl, Step::Begin))?;
    let new = info.certificates.iter().find(|c| c.role == "next").context("no next CA after begin")?.pin.clone();
    let learned = wait_for("every agent trusts the new CA", Duration::from_secs(15), || {
        gateways.iter().all(|g| pins(g).contains(&new))
    })
    .is_ok();
    rt.block_on(step(ctl, Step::Switch))?;
    let gw = &mut gateways[restart];
    let before = streams_opened(gw);
    if let Some(mut a) = gw.agent.take() {
        a.child().kill()?;
        let _ = a.child().wait();
    }
    gw.start()?;
    let reconnected = wait_for("the restarted agent reconnects under the new CA", Duration::from_secs(15), || {
        streams_opened(gw) > before
    })
    .is_ok();
    rt.block_on(step(ctl, Step::Retire))?;
    let retired = wait_for("every agent trusts the new CA only", Duration::from_secs(15), || {
        gateways.iter().all(|g| pins(g) == [new.clone()])
    })
    .is_ok();
    let online = rt.block_on(async {
        let mut a = control::admin(ctl).await?;
        let nodes = a.list_nodes(pb::ListNodesRequest {}).await?.into_inner().nodes;
        anyhow::Ok(nodes.iter().filter(|n| n.online).count())
    })?;
    Ok(Outcome { learned, reconnected, retired, online })
}
