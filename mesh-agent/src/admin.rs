//! The admin socket: how `mesh-agent apply` and `mesh-agent status` talk to
//! the running agent (`<state_dir>/agent.sock`, mode 0600; only root and the
//! agent's own uid may connect). One JSON request line, one JSON response
//! line.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    os::unix::net::UnixStream,
    path::Path,
    time::Duration,
};

use serde::{Deserialize, Serialize};

use crate::{reconcile::Report, status::Status, view::NodeView};

/// A request to the agent.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "lowercase")]
pub enum Request {
    /// Make this view the desired state and reconcile now.
    Apply {
        /// The view.
        view: Box<NodeView>,
    },
    /// Reconcile the current desired state now.
    Reconcile,
    /// Report status.
    Status,
}

/// The agent's answer.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Response {
    /// The error, if the request failed.
    pub error: Option<String>,
    /// The reconcile report (`apply`, `reconcile`).
    pub report: Option<Report>,
    /// The status (`status`).
    pub status: Option<Box<Status>>,
}

/// Errors talking to the agent.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// No agent listens on the socket.
    #[error("no running agent at {path}: {source}")]
    NotRunning {
        /// The socket.
        path: String,
        /// The error.
        source: std::io::Error,
    },
    /// The exchange failed midway.
    #[error("talking to the agent: {0}")]
    Io(#[from] std::io::Error),
    /// The answer did not parse.
    #[error("bad answer from the agent: {0}")]
    Protocol(String),
}

/// Sends one request and waits for the answer (at most `timeout`).
pub fn request(socket: &Path, req: &Request, timeout: Duration) -> Result<Response, AdminError> {
    let mut stream = UnixStream::connect(socket)
        .map_err(|source| AdminError::NotRunning { path: socket.display().to_string(), source })?;
    stream.set_read_timeout(Some(timeout))?;
    let mut line = serde_json::to_vec(req).map_err(|e| AdminError::Protocol(e.to_string()))?;
    line.push(b'\n');
    stream.write_all(&line)?;
    let mut answer = String::new();
    BufReader::new(stream).read_line(&mut answer)?;
    serde_json::from_str(&answer).map_err(|e| AdminError::Protocol(format!("{e}: {answer:?}")))
}
