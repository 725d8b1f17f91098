//! The reconcile worker's interface: the commands its thread serves (the
//! thread itself is the agent runtime's, [`crate::agent`]) and a cloneable
//! handle for in-process clients (the control session, the metrics
//! endpoint). Requests go through the same channel as the admin socket's,
//! so runs never overlap.
//!
//! It lives here rather than in the runtime so that those clients depend
//! on the reconcile layer only, not on the runtime that starts them.

use std::sync::mpsc;

use tokio::sync::oneshot;

use super::Report;
use crate::{status::Status, view::NodeView};

/// A request to the reconcile worker, with where to send its answer.
#[derive(Debug)]
pub enum Command {
    /// Make the view desired and reconcile it.
    Apply(Box<NodeView>, oneshot::Sender<Result<Report, String>>),
    /// Reconcile the current desired state now.
    Reconcile(oneshot::Sender<Result<Report, String>>),
    /// The status.
    Status(oneshot::Sender<Status>),
    /// Use this WireGuard private key from now on (a key rotation) and
    /// reconcile.
    /// Answers once the key is taken (the interface switches with the
    /// first view for it).
    SetPrivateKey(crate::keys::SecretKey, oneshot::Sender<Result<(), String>>),
    /// Stop the worker.
    Shutdown,
}

/// A handle on the reconcile worker for in-process clients.
#[derive(Clone, Debug)]
pub struct WorkerHandle(mpsc::Sender<Command>);

impl WorkerHandle {
    /// A handle sending on `tx` (the worker's channel).
    #[must_use]
    pub const fn new(tx: mpsc::Sender<Command>) -> Self {
        Self(tx)
    }

    /// Makes `view` desired and reconciles it; the worker's answer.
    pub async fn apply(&self, view: NodeView) -> Result<Report, String> {
        let (reply, rx) = oneshot::channel();
        self.0.send(Command::Apply(Box::new(view), reply)).map_err(|_| "the reconcile thread stopped".to_owned())?;
        rx.await.map_err(|_| "the reconcile thread stopped".to_owned())?
    }

    /// Switches the interface to a new private key (a key rotation).
    pub async fn set_private_key(&self, key: crate::keys::SecretKey) -> Result<(), String> {
        let (reply, rx) = oneshot::channel();
        self.0.send(Command::SetPrivateKey(key, reply)).map_err(|_| "the reconcile thread stopped".to_owned())?;
        rx.await.map_err(|_| "the reconcile thread stopped".to_owned())?
    }

    /// The status; `None` if the worker is gone.
    pub async fn status(&self) -> Option<Status> {
        let (reply, rx) = oneshot::channel();
        self.0.send(Command::Status(reply)).ok()?;
        rx.await.ok()
    }
}
