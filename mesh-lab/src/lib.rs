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
#[cfg(feature = "control")]
pub mod control;
mod host;
mod lab;
#[cfg(feature = "relay")]
pub mod relay;
pub mod traffic;
pub mod twoway;
mod wait;

pub use cmd::{CmdError, Process};
pub use host::Host;
pub use lab::{Lab, Switch, sweep_stale};
pub use wait::wait_for;

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
    /// A condition did not come true in time.
    #[error("timed out after {after:?} waiting for {what}")]
    Timeout {
        /// What was waited for.
        what: String,
        /// How long.
        after: std::time::Duration,
    },
    /// A service run by the lab failed.
    #[error("{what}: {error}")]
    Service {
        /// Which service.
        what: String,
        /// Its error.
        error: String,
    },
}

/// Result of lab operations.
pub type Result<T, E = LabError> = std::result::Result<T, E>;

/// Whether a test that needs root (network namespaces, BPF, TUN) may run
/// here. As root, yes. Otherwise it is skipped, saying so on stderr, so a
/// plain non-root `cargo test` runs the unit layer green; but not when `CI`
/// is set: CI runs as root, and there a root test that cannot run is a
/// failure, never a skip.
///
/// # Panics
/// When not root and `CI` is set.
#[must_use]
pub fn root_or_skip(test: &str) -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    assert!(std::env::var_os("CI").is_none(), "{test} needs root, and CI must run it: run the tests as root");
    // Straight to stderr, not through `eprintln!`: the test harness
    // captures that for passing tests, and a skip must be seen.
    let _ = std::io::Write::write_all(
        &mut std::io::stderr(),
        format!("skipped {test}: needs root (namespaces, BPF); `cargo xtask test` runs it as root\n").as_bytes(),
    );
    false
}

/// Returns from the calling test, skipped, unless it may run (see
/// [`root_or_skip`]).
#[macro_export]
macro_rules! require_root {
    () => {
        if !$crate::root_or_skip(concat!(module_path!(), ", line ", line!())) {
            return;
        }
    };
}
