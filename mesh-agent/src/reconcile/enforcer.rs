//! The policy enforcer: what the applier calls to put a compiled policy in
//! force on the overlay interface. The eBPF dataplane implements it; tests
//! use [`super::fake::FakeEnforcer`].

use std::{collections::BTreeSet, fmt, net::IpAddr};

use mesh_policy::CompiledPolicy;
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

/// A fingerprint of a compiled policy (SHA-256 of its JSON form): what
/// reconcile compares to decide whether the policy in force is the desired one.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct PolicyDigest(pub [u8; 32]);

impl PolicyDigest {
    /// The digest of `policy`.
    #[must_use]
    pub fn of(policy: &CompiledPolicy) -> Self {
        let json = serde_json::to_vec(policy).expect("a compiled policy always serialises");
        Self(Sha256::digest(&json).into())
    }
}

impl fmt::Display for PolicyDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(&self.0[..8]))
    }
}

impl fmt::Debug for PolicyDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PolicyDigest({self})")
    }
}

/// The enforcement counters, as plain numbers (packets): what an enforcer
/// reports through [`PolicyEnforcer::stats`] and the status shows.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataplaneStats {
    /// Packets per ACL verdict (`AcceptRule`, `DropNoRule`, ...).
    pub verdicts: Vec<(String, u64)>,
    /// Packets decided by each rule of the active policy (rule id).
    pub rules: Vec<(u32, u64)>,
    /// SYN / SYN-ACK segments per MSS clamp event.
    pub mss: Vec<(String, u64)>,
    /// Underlay frames per guard verdict.
    pub guard: Vec<(String, u64)>,
}

/// An enforcer failure, with the implementation's own error inside.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct EnforcerError(pub Box<dyn std::error::Error + Send + Sync>);

/// Puts policies in force on the overlay interface.
///
/// Contract: [`enforce`](Self::enforce) is atomic (no packet sees a mix of
/// the old and the new policy) and idempotent; once it returned `Ok`, the
/// interface is default-deny plus `policy`, and stays so across an agent
/// restart until another policy is enforced. The applier calls it before it
/// adds peers or sets the interface up, so a new interface never passes
/// traffic unfiltered.
pub trait PolicyEnforcer: Send {
    /// The digest of the policy in force on `overlay_if`, or `None` if
    /// nothing is (or it is unknown, e.g. after a restart: reconcile then
    /// enforces again, which is harmless).
    fn in_force(&mut self, overlay_if: &str) -> Result<Option<PolicyDigest>, EnforcerError>;

    /// Attaches to `overlay_if` if needed and installs `policy`.
    fn enforce(&mut self, overlay_if: &str, policy: &CompiledPolicy, mtu: u32) -> Result<(), EnforcerError>;

    /// Makes the underlay guard's known endpoints exactly `endpoints` (see
    /// [`super::known_endpoints`]): adding before removing, so an endpoint
    /// that stays known is never briefly unknown. Enforcers without a guard
    /// ignore it.
    fn set_known_endpoints(&mut self, endpoints: &BTreeSet<IpAddr>) -> Result<(), EnforcerError> {
        let _ = endpoints;
        Ok(())
    }

    /// The enforcement counters (verdicts, rules, MSS clamp, guard), if the
    /// enforcer keeps any.
    fn stats(&self) -> Option<DataplaneStats> {
        None
    }
}
