//! A network-namespace lab for tests, the demo and benchmarks.
//!
//! A [`Lab`] owns hosts (network namespaces), the links between them (veth
//! pairs) and switches (a namespace holding a bridge: a site LAN). Every name
//! carries the lab's unique id, so labs of parallel tests never collide, and
//! everything is deleted when the last handle to the lab is dropped, panics
//! included. A lab namespace only ever has routes to other lab addresses: it
//! never gets a default route out of the lab.
//!
//! The lab drives iproute2 (`ip`), the tool operators already read; the
//! product itself programs the kernel over netlink.

mod cmd;
mod host;
mod lab;
pub mod traffic;
pub mod twoway;

pub use cmd::{CmdError, Process};
pub use host::Host;
pub use lab::{Lab, Switch, sweep_stale};

/// Errors of lab operations.
#[derive(Debug, thiserror::Error)]
pub enum LabError {
    /// A command exited unsuccessfully.
    #[error(transparent)]
    Command(#[from] CmdError),
    /// A system call failed.
    #[error("{what}: {source}")]
    Sys {
        /// What was being done.
        what: String,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A name does not fit (too long for an interface name, bad characters).
    #[error("invalid name {name:?}: {why}")]
    Name {
        /// The offending name.
        name: String,
        /// Why it was refused.
        why: &'static str,
    },
}

/// Result of lab operations.
pub type Result<T, E = LabError> = std::result::Result<T, E>;
