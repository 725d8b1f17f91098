//! The view feeder: control's last view combined with the local failover's
//! overrides, applied through the reconcile worker.

use std::{collections::BTreeMap, path::PathBuf};

use ipnet::IpNet;
use mesh_proto::v1 as pb;
use tokio::sync::{mpsc, oneshot, watch};

use super::{ControlState, SharedControlState, convert};
use crate::{probe, reconcile::worker::WorkerHandle, state::write_atomic};

/// A view from control for the feeder, with where to say how applying it went.
pub(super) struct Feed {
    pub(super) view: pb::NodeView,
    pub(super) reply: oneshot::Sender<Result<(), String>>,
}

/// The view feeder: owns the last view from control and the local
/// failover's overrides, and applies their combination through the
/// reconcile worker whenever either changes. It outlives sessions, so local
/// failover keeps working while control is away.
pub(super) struct Feeder {
    pub(super) worker: WorkerHandle,
    pub(super) local: convert::Local,
    pub(super) plan: watch::Sender<probe::Plan>,
    pub(super) shared: SharedControlState,
    /// Where the last view from control is kept, so that an agent restarted
    /// while control is away still knows each prefix's gateway order.
    pub(super) saved: PathBuf,
}

impl Feeder {
    async fn apply(&self, v: &pb::NodeView, overrides: &BTreeMap<IpNet, u64>) -> Result<(), String> {
        ControlState::update(&self.shared, v, overrides);
        let local = convert::Local { overrides: overrides.clone(), ..self.local.clone() };
        let nv = convert::node_view(v, &local).map_err(|e| e.to_string())?;
        self.worker.apply(nv).await.map(|_| ())
    }

    /// The view saved by the last run, if any (a broken file is logged and
    /// ignored: control sends a new one).
    fn load(&self) -> Option<pb::NodeView> {
        use prost::Message as _;
        let bytes = std::fs::read(&self.saved).ok()?;
        pb::NodeView::decode(bytes.as_slice())
            .inspect_err(
                |e| tracing::warn!(path = %self.saved.display(), error = %e, "ignoring the saved control view"),
            )
            .ok()
    }

    fn save(&self, v: &pb::NodeView) {
        use prost::Message as _;
        if let Err(e) = write_atomic(&self.saved, &v.encode_to_vec(), 0o600) {
            tracing::warn!(path = %self.saved.display(), error = %e, "could not save the control view");
        }
    }

    pub(super) async fn run(
        self,
        mut views: mpsc::Receiver<Feed>,
        mut overrides: watch::Receiver<BTreeMap<IpNet, u64>>,
    ) {
        // The worker re-applies the last applied view by itself; the saved
        // control view only feeds the prober and later overrides.
        let mut current = self.load();
        if let Some(v) = &current {
            self.plan.send_replace(convert::probe_plan(v, &self.local, false));
        }
        // False once the prober is gone (or was never started): then only
        // views from control come in.
        let mut prober = true;
        loop {
            tokio::select! {
                feed = views.recv() => {
                    let Some(Feed { view, reply }) = feed else { return };
                    self.plan.send_replace(convert::probe_plan(&view, &self.local, true));
                    let o = overrides.borrow_and_update().clone();
                    let result = self.apply(&view, &o).await;
                    if result.is_ok() {
                        self.save(&view);
                    }
                    let _ = reply.send(result);
                    current = Some(view);
                }
                r = overrides.changed(), if prober => {
                    if r.is_err() {
                        prober = false;
                        continue;
                    }
                    let o = overrides.borrow_and_update().clone();
                    if let Some(v) = &current {
                        match self.apply(v, &o).await {
                            Ok(()) => tracing::info!(generation = v.generation, overrides = ?o, "applied local failover"),
                            Err(e) => tracing::error!(error = %e, "local failover not applied"),
                        }
                    }
                }
            }
        }
    }
}
