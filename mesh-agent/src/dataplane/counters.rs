//! What the data path counts, as plain structs for the agent's metrics.

use mesh_common::{
    acl::{AclVerdict, MssEvent},
    counter::PacketCount,
    guard::GuardVerdict,
};
use mesh_policy::RuleId;

/// Packets and bytes one rule accepted (new flows and non-reply packets;
/// replies, later fragments and related ICMP errors count as
/// [`AclVerdict::AcceptEstablished`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RuleCounter {
    /// The rule's id in the installed policy.
    pub rule_id: RuleId,
    /// Totals over all CPUs.
    pub count: PacketCount,
}

/// Every counter of the data path, summed over CPUs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// Generation of the active policy; `None` before the first install
    /// (everything IP is dropped then).
    pub generation: Option<u64>,
    /// Per-rule counters of the active policy (reset when a policy is
    /// installed), in policy order.
    pub rules: Vec<RuleCounter>,
    /// Per-verdict counters of the ACL, indexed by [`AclVerdict`] (see
    /// [`Counters::verdict`]); they survive policy swaps.
    pub verdicts: [PacketCount; AclVerdict::COUNT as usize],
    /// MSS clamp events, indexed by [`MssEvent`].
    pub mss: [u64; MssEvent::COUNT as usize],
    /// Underlay guard outcomes, indexed by [`GuardVerdict`].
    pub guard: [PacketCount; GuardVerdict::COUNT as usize],
}

impl Counters {
    /// Packets and bytes that got `verdict` from the ACL.
    #[must_use]
    pub fn verdict(&self, verdict: AclVerdict) -> PacketCount {
        self.verdicts[verdict as usize]
    }

    /// SYN / SYN-ACK segments that got `event` from the MSS clamp.
    #[must_use]
    pub fn mss(&self, event: MssEvent) -> u64 {
        self.mss[event as usize]
    }

    /// Frames that got `verdict` from the underlay guard.
    #[must_use]
    pub fn guard(&self, verdict: GuardVerdict) -> PacketCount {
        self.guard[verdict as usize]
    }

    /// The counter of rule `id`, if it is in the active policy.
    #[must_use]
    pub fn rule(&self, id: RuleId) -> Option<PacketCount> {
        self.rules.iter().find(|r| r.rule_id == id).map(|r| r.count)
    }
}
