//! Choosing the backend: `auto` probes the kernel and falls back to the
//! userspace engine; `kernel` and `userspace` force one.

use std::{
    fmt,
    sync::atomic::{AtomicU32, Ordering},
};

use serde::{Deserialize, Serialize};

use crate::net::rtnl::Rtnl;

pub use mesh_agent_formats::config::BackendMode;

/// The implementation in use.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    /// The kernel module.
    Kernel,
    /// gotatun inside the agent.
    Userspace,
}

impl fmt::Display for BackendKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Kernel => "kernel",
            Self::Userspace => "userspace",
        })
    }
}

/// What the kernel probe found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KernelProbe {
    /// A WireGuard link could be created.
    Available,
    /// The kernel refused the link type with `EOPNOTSUPP`: no WireGuard.
    Unsupported,
    /// The probe itself failed for another reason (no privilege, ...).
    Failed(String),
}

/// The backend chosen and why (logged at startup and shown by `status`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Selection {
    /// The backend.
    pub kind: BackendKind,
    /// Why, in a sentence.
    pub reason: String,
}

/// A backend that cannot be used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SelectError {
    /// `kernel` was forced but the kernel has no WireGuard.
    #[error("backend \"kernel\" was requested but the kernel has no WireGuard (EOPNOTSUPP)")]
    KernelUnavailable,
    /// The probe failed in a way that says nothing about WireGuard support.
    #[error("probing kernel WireGuard failed: {0}")]
    ProbeFailed(String),
}

/// Decides the backend from the mode and, unless forced to userspace, the
/// probe (called at most once).
pub fn select(mode: BackendMode, probe: impl FnOnce() -> KernelProbe) -> Result<Selection, SelectError> {
    let sel = |kind, reason: &str| Ok(Selection { kind, reason: reason.to_owned() });
    match mode {
        BackendMode::Userspace => sel(BackendKind::Userspace, "userspace was requested"),
        BackendMode::Kernel => match probe() {
            KernelProbe::Available => sel(BackendKind::Kernel, "kernel was requested and the kernel has WireGuard"),
            KernelProbe::Unsupported => Err(SelectError::KernelUnavailable),
            KernelProbe::Failed(e) => Err(SelectError::ProbeFailed(e)),
        },
        BackendMode::Auto => match probe() {
            KernelProbe::Available => sel(BackendKind::Kernel, "auto: the kernel has WireGuard"),
            KernelProbe::Unsupported => {
                sel(BackendKind::Userspace, "auto: no kernel WireGuard (EOPNOTSUPP), using the userspace engine")
            }
            // Not knowing is not "no WireGuard": an agent without
            // CAP_NET_ADMIN could not run userspace WireGuard either.
            KernelProbe::Failed(e) => Err(SelectError::ProbeFailed(e)),
        },
    }
}

static PROBE_SEQ: AtomicU32 = AtomicU32::new(0);

/// Probes kernel WireGuard in the calling thread's network namespace by
/// creating (and deleting again) a WireGuard link with a throwaway name.
#[must_use]
pub fn probe_kernel() -> KernelProbe {
    const EOPNOTSUPP: i32 = 95;
    let name =
        format!("wgp{:x}{:x}", std::process::id() & 0xff_ffff, PROBE_SEQ.fetch_add(1, Ordering::Relaxed) & 0xfff);
    let mut rtnl = match Rtnl::new() {
        Ok(r) => r,
        Err(e) => return KernelProbe::Failed(e.to_string()),
    };
    let result = match rtnl.create_wireguard(&name) {
        Ok(()) => KernelProbe::Available,
        Err(e) if e.errno() == Some(EOPNOTSUPP) => KernelProbe::Unsupported,
        Err(e) => KernelProbe::Failed(e.to_string()),
    };
    if result == KernelProbe::Available
        && let Err(e) = rtnl.delete_link(&name)
    {
        tracing::warn!(link = %name, error = %e, "could not delete the WireGuard probe link");
    }
    tracing::debug!(?result, "kernel WireGuard probe");
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_probe_drives_auto() {
        let auto = |p: KernelProbe| select(BackendMode::Auto, || p).map(|s| s.kind);
        assert_eq!(auto(KernelProbe::Available), Ok(BackendKind::Kernel));
        assert_eq!(auto(KernelProbe::Unsupported), Ok(BackendKind::Userspace));
        assert!(matches!(auto(KernelProbe::Failed("EPERM".into())), Err(SelectError::ProbeFailed(_))));
    }

    #[test]
    fn forced_modes() {
        assert_eq!(select(BackendMode::Kernel, || KernelProbe::Available).map(|s| s.kind), Ok(BackendKind::Kernel));
        assert_eq!(select(BackendMode::Kernel, || KernelProbe::Unsupported), Err(SelectError::KernelUnavailable));
        let never = || -> KernelProbe { unreachable!("userspace does not probe") };
        assert_eq!(select(BackendMode::Userspace, never).map(|s| s.kind), Ok(BackendKind::Userspace));
    }
}
