//! Which gateway owns the site side of a prefix: the one decision that the
//! virtual gateway address on the site LAN, the overlay route of every
//! remote agent and control's order all follow. Pure: what the probes and
//! the reachability check say comes in as arguments.
//!
//! **At a gateway of the site** ([`claims`]): it owns (claims) the prefix
//! when
//! 1. it is ready: it has a view from control in this run, or it has been
//!    running for the start-up grace (so a restarted gateway does not act on
//!    the order it saved before it died, which control has changed since);
//! 2. its own reachability check of the prefix passes; and
//! 3. every gateway ranked before it in control's order is unavailable to
//!    it: its probes are lost (or never answered within the start-up grace
//!    of that peer), or it reports the prefix unreachable.
//!
//! Control's order already carries control's hold-down: a recovered
//! gateway moves back up only after it has been healthy for the hold-down,
//! and then every gateway of the site (and every remote agent) sees the new
//! order at once. So a fail-back is one coordinated handover, never a
//! second, local timer.
//!
//! **At a remote agent** ([`claimant`]): the prefix goes through the first
//! gateway in control's order that claims it and answers probes. Only when
//! no gateway claims it does the agent fall back to its own judgement
//! ([`super::failover::Selector`]).
//!
//! **Split brain** (control away and the site's gateways unable to probe
//! each other): every gateway whose predecessors in the last known order
//! are all unreachable to it claims the prefix. Remote agents still pick
//! one, deterministically: the claimant ranked first among those they can
//! reach. On the LAN the claimant ranked first in the order re-announces
//! its address every second, while the others announce only when they take
//! over, so the LAN converges on the same gateway within a second.

use std::time::Duration;

use ipnet::IpNet;

use super::stats::Reach;

/// What a gateway's probes say about one other gateway of its site.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PeerSight {
    /// Probe reachability.
    pub reach: Reach,
    /// How long it has been a probe target (the start-up grace of a peer
    /// whose probes have not resolved yet).
    pub known_for: Duration,
    /// It reported the prefix unreachable in its last probe reply.
    pub reports_unhealthy: bool,
    /// It claimed the prefix in its last probe reply.
    pub claims: bool,
}

impl PeerSight {
    /// Whether the peer can serve the prefix, as far as this gateway knows.
    /// A peer whose probes are unresolved counts as available during the
    /// grace (it may be starting); after it, as unavailable.
    #[must_use]
    pub fn available(&self, grace: Duration) -> bool {
        !self.reports_unhealthy
            && match self.reach {
                Reach::Up => true,
                Reach::Down => false,
                Reach::Unknown => self.known_for < grace,
            }
    }
}

/// Whether gateway `me` claims a prefix whose gateways control ordered as
/// `order`. `healthy` is its own reachability check of the prefix; `ready`
/// whether it may act at all; `sight(gw)` what its probes say of another
/// gateway (`None`: not a probe target, i.e. unknown and unavailable).
#[must_use]
pub fn claims(
    me: u64,
    order: &[u64],
    healthy: bool,
    ready: bool,
    grace: Duration,
    sight: impl Fn(u64) -> Option<PeerSight>,
) -> bool {
    if !ready || !healthy {
        return false;
    }
    let Some(rank) = order.iter().position(|&g| g == me) else { return false };
    order[..rank].iter().all(|&g| !sight(g).is_some_and(|s| s.available(grace)))
}

/// The gateway a remote agent routes `prefix` through because it owns the
/// site: the first in `order` that claims it and whose probes are answered.
#[must_use]
pub fn claimant(order: &[u64], sight: impl Fn(u64) -> Option<PeerSight>) -> Option<u64> {
    order.iter().copied().find(|&g| sight(g).is_some_and(|s| s.claims && s.reach == Reach::Up))
}

/// An owned prefix, as the site module needs it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Owned {
    /// Since when (unix seconds).
    pub since_unix: i64,
    /// This gateway is first in control's order: it re-announces its
    /// address periodically (see the split-brain rule above).
    pub first: bool,
}

/// The prefixes a gateway owns, for the site module and the reports.
pub type Ownership = std::collections::BTreeMap<IpNet, Owned>;

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    const GRACE: Duration = Duration::from_secs(2);

    fn sight(reach: Reach, claims: bool) -> PeerSight {
        PeerSight { reach, known_for: Duration::from_secs(10), reports_unhealthy: false, claims }
    }

    fn with(peers: &[(u64, PeerSight)]) -> impl Fn(u64) -> Option<PeerSight> + use<> {
        let m: BTreeMap<u64, PeerSight> = peers.iter().copied().collect();
        move |g| m.get(&g).copied()
    }

    #[test]
    fn the_first_available_gateway_in_control_order_claims() {
        // gw1 (me) first and healthy: claim whatever gw2 does.
        assert!(claims(1, &[1, 2], true, true, GRACE, with(&[(2, sight(Reach::Up, true))])));
        // gw2 (me) behind an available gw1: no claim.
        assert!(!claims(2, &[1, 2], true, true, GRACE, with(&[(1, sight(Reach::Up, false))])));
        // gw1 lost: gw2 claims.
        assert!(claims(2, &[1, 2], true, true, GRACE, with(&[(1, sight(Reach::Down, true))])));
        // gw1 up but reports the prefix unreachable: gw2 claims.
        let lan_lost = PeerSight { reports_unhealthy: true, ..sight(Reach::Up, false) };
        assert!(claims(2, &[1, 2], true, true, GRACE, with(&[(1, lan_lost)])));
        // Own reachability failed, or not ready: never.
        assert!(!claims(1, &[1, 2], false, true, GRACE, with(&[])));
        assert!(!claims(1, &[1, 2], true, false, GRACE, with(&[])));
        // Not in the order at all (unapproved): never.
        assert!(!claims(3, &[1, 2], true, true, GRACE, with(&[])));
    }

    #[test]
    fn an_unresolved_peer_is_given_the_start_up_grace() {
        let young = PeerSight { known_for: Duration::from_millis(500), ..sight(Reach::Unknown, false) };
        assert!(!claims(2, &[1, 2], true, true, GRACE, with(&[(1, young)])), "it may be starting");
        let old = PeerSight { known_for: Duration::from_secs(3), ..young };
        assert!(claims(2, &[1, 2], true, true, GRACE, with(&[(1, old)])), "it never answered");
        // A gateway that is not even a probe target (no peer entry) is unknown.
        assert!(claims(2, &[1, 2], true, true, GRACE, with(&[])));
    }

    #[test]
    fn fail_back_follows_control_order() {
        // gw1 recovered but control still orders [2, 1] (its hold-down):
        // gw1 stays back, gw2 keeps the site.
        let peers = with(&[(2, sight(Reach::Up, true))]);
        assert!(!claims(1, &[2, 1], true, true, GRACE, &peers));
        assert!(claims(2, &[2, 1], true, true, GRACE, with(&[(1, sight(Reach::Up, false))])));
        // Control moves gw1 up: both sides switch on the same order.
        assert!(claims(1, &[1, 2], true, true, GRACE, &peers));
        assert!(!claims(2, &[1, 2], true, true, GRACE, with(&[(1, sight(Reach::Up, true))])));
    }

    #[test]
    fn split_brain_is_decided_by_rank() {
        // Neither gateway sees the other: both claim.
        assert!(claims(1, &[1, 2], true, true, GRACE, with(&[(2, sight(Reach::Down, true))])));
        assert!(claims(2, &[1, 2], true, true, GRACE, with(&[(1, sight(Reach::Down, true))])));
        // A remote agent that reaches both picks the first in the order...
        let both = with(&[(1, sight(Reach::Up, true)), (2, sight(Reach::Up, true))]);
        assert_eq!(claimant(&[1, 2], &both), Some(1));
        // ...and one that reaches only gw2 picks gw2.
        let one = with(&[(1, sight(Reach::Down, true)), (2, sight(Reach::Up, true))]);
        assert_eq!(claimant(&[1, 2], &one), Some(2));
        // Nobody claims: no claimant, the agent's own judgement applies.
        assert_eq!(claimant(&[1, 2], with(&[(1, sight(Reach::Up, false))])), None);
    }
}
