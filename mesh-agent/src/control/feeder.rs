//! The view feeder: control's last view combined with the local failover's
//! overrides and the path manager's endpoints, applied through the
//! reconcile worker.

use std::{collections::BTreeMap, net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use ipnet::IpNet;
use mesh_proto::v1 as pb;
use tokio::sync::{mpsc, oneshot, watch};

use super::{ControlState, SharedControlState, convert};
use crate::{keys::PublicKey, probe, reconcile::worker::WorkerHandle, state::write_atomic};

/// How long a new view from control waits for the prober's decision on its
/// gateway order before it is applied with the previous decision.
const DECISION_WAIT: Duration = Duration::from_millis(250);

/// The path manager's endpoint per peer (see [`convert::Local::paths`]).
pub(crate) type Paths = BTreeMap<PublicKey, SocketAddr>;

/// What the feeder applies with a view: the failover's overrides and the
/// path manager's endpoints.
type Chosen = (BTreeMap<IpNet, u64>, Paths);

/// A view from control for the feeder, with where to say how applying it went.
pub(super) struct Feed {
    pub(super) view: pb::NodeView,
    /// The stream's epoch (see [`crate::view::NodeView::epoch`]).
    pub(super) epoch: u64,
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
    /// Control's last view, for the path manager (peers' candidates, relays).
    pub(super) paths_plan: watch::Sender<Option<Arc<pb::NodeView>>>,
    pub(super) shared: SharedControlState,
    /// Where the last view from control is kept, so that an agent restarted
    /// while control is away still knows each prefix's gateway order.
    pub(super) saved: PathBuf,
}

impl Feeder {
    async fn apply(&self, v: &pb::NodeView, epoch: u64, o: &Chosen) -> Result<(), String> {
        ControlState::update(&self.shared, v, &o.0);
        let local = convert::Local { overrides: o.0.clone(), paths: o.1.clone(), ..self.local.clone() };
        let mut nv = convert::node_view(v, &local).map_err(|e| e.to_string())?;
        nv.epoch = epoch;
        self.worker.apply(nv).await.map(|_| ())
    }

    /// Applies the current view again with `o` (a new local failover
    /// decision or path choice, `what`), unless that is what is applied.
    async fn reapply(
        &self,
        current: Option<&(pb::NodeView, u64)>,
        applied: &mut Option<Chosen>,
        o: Chosen,
        what: &str,
    ) {
        // A decision on a new plan that changes nothing.
        if applied.as_ref() == Some(&o) {
            return;
        }
        let Some((v, epoch)) = current else { return };
        match self.apply(v, *epoch, &o).await {
            Ok(()) => {
                tracing::info!(generation = v.generation, overrides = ?o.0, paths = ?o.1, "applied {what}");
                *applied = Some(o);
            }
            Err(e) => {
                tracing::error!(error = %e, "{what} not applied");
                *applied = None;
            }
        }
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
        mut overrides: watch::Receiver<probe::Overrides>,
        mut paths: watch::Receiver<Paths>,
    ) {
        // The worker re-applies the last applied view by itself; the saved
        // control view only feeds the prober and later overrides.
        // With the epoch it came in (0: saved by an earlier run).
        let mut current = self.load().map(|v| (v, 0));
        let mut version = 0u64;
        if let Some((v, _)) = &current {
            version += 1;
            self.plan.send_replace(probe::Plan { version, ..convert::probe_plan(v, &self.local, false) });
            self.paths_plan.send_replace(Some(Arc::new(v.clone())));
        }
        // The overrides and paths applied with `current` (None: not applied
        // yet, or the last apply failed).
        let mut applied: Option<Chosen> = None;
        // False once the path manager is gone (or was never started).
        let mut path_manager = true;
        // False once the prober is gone (or was never started): then only
        // views from control come in.
        let mut prober = true;
        loop {
            tokio::select! {
                feed = views.recv() => {
                    let Some(Feed { view, epoch, reply }) = feed else { return };
                    version += 1;
                    self.plan.send_replace(probe::Plan { version, ..convert::probe_plan(&view, &self.local, true) });
                    self.paths_plan.send_replace(Some(Arc::new(view.clone())));
                    // Applied with the prober's decision on this view's
                    // gateway order, not on the previous one: otherwise a
                    // handover flaps (to control's new primary first, back
                    // to the owner the prober still sees, then forward again
                    // when the new one claims the site), a reconcile and a
                    // cut each time.
                    if prober {
                        match tokio::time::timeout(DECISION_WAIT, overrides.wait_for(|o| o.plan >= version)).await {
                            Ok(Ok(_)) => {}
                            Ok(Err(_)) => prober = false,
                            Err(_) => tracing::warn!(
                                wait_ms = DECISION_WAIT.as_millis(),
                                "the prober did not decide on the new view in time; applying its last decision"
                            ),
                        }
                    }
                    let o = (overrides.borrow_and_update().routes.clone(), paths.borrow_and_update().clone());
                    let result = self.apply(&view, epoch, &o).await;
                    if result.is_ok() {
                        self.save(&view);
                    }
                    applied = result.is_ok().then_some(o);
                    let _ = reply.send(result);
                    current = Some((view, epoch));
                }
                r = overrides.changed(), if prober => {
                    if r.is_err() {
                        prober = false;
                        continue;
                    }
                    let o = (overrides.borrow_and_update().routes.clone(), paths.borrow().clone());
                    self.reapply(current.as_ref(), &mut applied, o, "local failover").await;
                }
                r = paths.changed(), if path_manager => {
                    if r.is_err() {
                        path_manager = false;
                        continue;
                    }
                    let o = (overrides.borrow().routes.clone(), paths.borrow_and_update().clone());
                    self.reapply(current.as_ref(), &mut applied, o, "path change").await;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc as std_mpsc;

    use super::*;
    use crate::reconcile::{Changes, Report, worker::Command};

    /// A feeder with a stand-in prober that routes 198.18.20.0/24 through
    /// gateway 3 on every plan; returns the reconcile worker's end.
    fn feeder(dir: &std::path::Path) -> (mpsc::Sender<Feed>, std_mpsc::Receiver<Command>) {
        let (tx, rx) = std_mpsc::channel();
        let (plan_tx, mut plan_rx) = watch::channel(probe::Plan::default());
        let (overrides_tx, overrides_rx) = watch::channel(probe::Overrides::default());
        let feeder = Feeder {
            worker: WorkerHandle::new(tx),
            local: convert::Local::default(),
            plan: plan_tx,
            paths_plan: watch::channel(None).0,
            shared: SharedControlState::default(),
            saved: dir.join("control-view.pb"),
        };
        let (feed_tx, feed_rx) = mpsc::channel(4);
        let (paths_tx, paths_rx) = watch::channel(Paths::new());
        tokio::spawn(async move {
            feeder.run(feed_rx, overrides_rx, paths_rx).await;
            drop(paths_tx);
        });
        tokio::spawn(async move {
            while plan_rx.changed().await.is_ok() {
                let version = plan_rx.borrow_and_update().version;
                // A prober that takes a moment to decide.
                tokio::time::sleep(Duration::from_millis(20)).await;
                let routes = BTreeMap::from([("198.18.20.0/24".parse().unwrap(), 3)]);
                overrides_tx.send_replace(probe::Overrides { plan: version, routes });
            }
        });
        (feed_tx, rx)
    }

    #[tokio::test]
    async fn a_new_view_is_applied_once_with_the_probers_decision_on_it() {
        let dir = tempfile::tempdir().unwrap();
        let (feed, worker) = feeder(dir.path());
        let applied = std::thread::spawn(move || {
            // Every apply in the next second, answered as a converged run.
            let mut views = Vec::new();
            while let Ok(Command::Apply(view, reply)) = worker.recv_timeout(Duration::from_secs(1)) {
                let report = Report {
                    generation: view.generation,
                    backend: crate::wg::BackendKind::Userspace,
                    changes: Changes::default(),
                    duration: Duration::ZERO,
                };
                let _ = reply.send(Ok(report));
                views.push(view);
            }
            views
        });
        let (reply, answer) = oneshot::channel();
        feed.send(Feed { view: convert::tests::two_gateways(), epoch: 1, reply }).await.unwrap();
        answer.await.unwrap().unwrap();
        let views = tokio::task::spawn_blocking(move || applied.join().unwrap()).await.unwrap();
        // Once, and already through gateway 3: not through control's
        // primary first and then moved by the decision.
        assert_eq!(views.len(), 1, "{views:?}");
        let p: IpNet = "198.18.20.0/24".parse().unwrap();
        let through: Vec<&str> =
            views[0].peers.iter().filter(|x| x.allowed_ips.contains(&p)).filter_map(|x| x.name.as_deref()).collect();
        assert_eq!(through, ["fsn-gw2"]);
        assert!(dir.path().join("control-view.pb").exists(), "the applied view is saved");
    }
}
