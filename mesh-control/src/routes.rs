//! Gateway ordering and failover for site routes: pure logic over health
//! observations, so it is tested with simulated reports.
//!
//! Order of the gateways serving one prefix: those up (online and reporting
//! the route healthy) first; among them lower `priority` first, then the one
//! up the longest (stability), then the lower node id. The primary is the
//! first, with two exceptions that prevent flapping:
//! - a healthy primary keeps its place until a better gateway has been up for
//!   the whole hold-down (fail back only after hold-down);
//! - when no gateway is up, the previous primary stays (nothing better to do).
//!
//! A primary that goes offline or reports the route unhealthy is replaced at
//! once (fail over is immediate).
//!
//! With several control replicas, one decides: the holder of the store's
//! housekeeping lease ([`RouteSelector::lead`]) stores its primaries, and
//! the others order each prefix with the stored primary first
//! ([`RouteSelector::follow`]), so agents on different replicas never
//! disagree on a primary and each change is made (and audited) once.

use std::collections::BTreeMap;

use ipnet::IpNet;

/// One gateway that serves (advertises, approved) a prefix.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Candidate {
    /// The gateway's node id.
    pub node: u64,
    /// Admin-set priority; lower is preferred.
    pub priority: i32,
    /// Since when (unix seconds) it has been online with the route healthy;
    /// `None` when it is not.
    pub up_since: Option<i64>,
}

impl Candidate {
    const fn up(&self) -> bool {
        self.up_since.is_some()
    }
}

/// The ordering of every prefix's gateways, with memory of the primaries.
#[derive(Clone, Debug, Default)]
pub struct RouteSelector {
    hold_down_secs: i64,
    primaries: BTreeMap<IpNet, u64>,
    /// Following stored decisions rather than making them.
    follow: bool,
}

impl RouteSelector {
    /// A selector that waits `hold_down_secs` before failing back.
    #[must_use]
    pub fn new(hold_down_secs: i64) -> Self {
        Self { hold_down_secs, primaries: BTreeMap::new(), follow: false }
    }

    /// Decides from now on (this replica holds the lease). It keeps its
    /// memory, and takes the stored primary of every prefix it has none
    /// for: a replica that just took the lease carries on from the previous
    /// holder's decisions instead of re-deciding (and flapping) them.
    pub fn lead(&mut self, stored: &BTreeMap<IpNet, u64>) {
        self.follow = false;
        for (prefix, node) in stored {
            self.primaries.entry(*prefix).or_insert(*node);
        }
    }

    /// Follows `stored`, the lease holder's decisions: a prefix's stored
    /// primary comes first for as long as it serves the prefix, whatever
    /// its health (the holder fails it over; agents' probes cover the
    /// moment until then). A prefix without one gets its best gateway.
    pub fn follow(&mut self, stored: &BTreeMap<IpNet, u64>) {
        self.follow = true;
        self.primaries.clone_from(stored);
    }

    /// Whether this selector follows stored decisions (see [`Self::follow`]).
    #[must_use]
    pub const fn follows(&self) -> bool {
        self.follow
    }

    /// The current primary of `prefix`, if one was chosen.
    #[must_use]
    pub fn primary(&self, prefix: &IpNet) -> Option<u64> {
        self.primaries.get(prefix).copied()
    }

    /// Orders the gateways of `prefix` at time `now`; the first is the
    /// primary. Remembers it for the next call.
    pub fn select(&mut self, prefix: IpNet, candidates: &[Candidate], now: i64) -> Vec<u64> {
        if candidates.is_empty() {
            self.primaries.remove(&prefix);
            return Vec::new();
        }
        let mut ranked: Vec<Candidate> = candidates.to_vec();
        ranked.sort_by_key(|c| (!c.up(), c.priority, c.up_since.unwrap_or(i64::MAX), c.node));
        let best = ranked[0];
        let current = self.primaries.get(&prefix).and_then(|p| ranked.iter().find(|c| c.node == *p)).copied();
        let primary = match current {
            Some(cur) if self.follow => cur,
            // The primary is down: fail over now, unless nobody is up.
            Some(cur) if !cur.up() => {
                if best.up() {
                    best
                } else {
                    cur
                }
            }
            // Healthy primary: give way only to a gateway that is better and
            // has been up for the whole hold-down.
            Some(cur) => {
                let settled = best.up_since.is_some_and(|since| now - since >= self.hold_down_secs);
                if best.node != cur.node && settled { best } else { cur }
            }
            None => best,
        };
        self.primaries.insert(prefix, primary.node);
        std::iter::once(primary.node).chain(ranked.iter().map(|c| c.node).filter(|n| *n != primary.node)).collect()
    }

    /// Forgets prefixes no longer served.
    pub fn retain(&mut self, live: impl Fn(&IpNet) -> bool) {
        self.primaries.retain(|p, _| live(p));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(node: u64, priority: i32, up_since: Option<i64>) -> Candidate {
        Candidate { node, priority, up_since }
    }

    fn nyc() -> IpNet {
        "198.18.10.0/24".parse().unwrap()
    }

    #[test]
    fn orders_by_priority_then_health_then_stability() {
        let mut s = RouteSelector::new(30);
        // Priority wins among healthy gateways.
        assert_eq!(s.select(nyc(), &[c(1, 10, Some(0)), c(2, 5, Some(50))], 100), vec![2, 1]);
        let mut s = RouteSelector::new(30);
        // An unhealthy gateway goes last whatever its priority.
        assert_eq!(s.select(nyc(), &[c(1, 10, Some(0)), c(2, 5, None), c(3, 10, Some(90))], 100), vec![1, 3, 2]);
        // Same priority: the one up longer first (1 since 0, 3 since 90).
    }

    #[test]
    fn fails_over_at_once_and_back_only_after_hold_down() {
        let mut s = RouteSelector::new(30);
        let p = nyc();
        assert_eq!(s.select(p, &[c(1, 0, Some(0)), c(2, 1, Some(0))], 10)[0], 1);
        // Gateway 1 reports the route unhealthy at t=20: immediate failover.
        assert_eq!(s.select(p, &[c(1, 0, None), c(2, 1, Some(0))], 20), vec![2, 1]);
        // Gateway 1 recovers at t=25: still in hold-down at t=25 and t=54.
        assert_eq!(s.select(p, &[c(1, 0, Some(25)), c(2, 1, Some(0))], 25)[0], 2);
        assert_eq!(s.select(p, &[c(1, 0, Some(25)), c(2, 1, Some(0))], 54)[0], 2);
        // It flaps down and up again: the hold-down restarts.
        assert_eq!(s.select(p, &[c(1, 0, None), c(2, 1, Some(0))], 56)[0], 2);
        assert_eq!(s.select(p, &[c(1, 0, Some(58)), c(2, 1, Some(0))], 80)[0], 2);
        // Up for the whole hold-down: fail back.
        assert_eq!(s.select(p, &[c(1, 0, Some(58)), c(2, 1, Some(0))], 88), vec![1, 2]);
        assert_eq!(s.primary(&p), Some(1));
    }

    #[test]
    fn a_follower_keeps_the_stored_primary_and_a_new_leader_carries_on() {
        let p = nyc();
        let stored = BTreeMap::from([(p, 2)]);
        let mut s = RouteSelector::new(30);
        s.follow(&stored);
        // The stored primary stays first even though it is down and 1 is
        // better: the lease holder decides the failover, not this replica.
        assert_eq!(s.select(p, &[c(1, 0, Some(0)), c(2, 1, None)], 100), vec![2, 1]);
        // A prefix with nothing stored: the best gateway.
        let q: IpNet = "198.18.20.0/24".parse().unwrap();
        assert_eq!(s.select(q, &[c(3, 1, Some(0)), c(4, 0, Some(0))], 100)[0], 4);
        // Taking the lease: the stored primary is the memory the hold-down
        // applies to. 1 has been up for only 10 s of 30: 2 stays, and it
        // fails over at once when 2 is down.
        s.lead(&stored);
        assert!(!s.follows());
        assert_eq!(s.select(p, &[c(1, 0, Some(90)), c(2, 1, Some(50))], 100)[0], 2);
        assert_eq!(s.select(p, &[c(1, 0, Some(90)), c(2, 1, None)], 101)[0], 1);
    }

    #[test]
    fn offline_primary_with_nobody_better_stays() {
        let mut s = RouteSelector::new(30);
        let p = nyc();
        assert_eq!(s.select(p, &[c(1, 0, Some(0)), c(2, 0, Some(5))], 10)[0], 1);
        assert_eq!(s.select(p, &[c(1, 0, None), c(2, 0, None)], 20)[0], 1);
        // Gateway 2 comes back first: take it at once (the primary is down).
        assert_eq!(s.select(p, &[c(1, 0, None), c(2, 0, Some(21))], 21)[0], 2);
        // Primary removed (gateway gone): next one takes over.
        assert_eq!(s.select(p, &[c(1, 0, Some(22))], 23), vec![1]);
        assert!(s.select(p, &[], 24).is_empty());
        assert_eq!(s.primary(&p), None);
    }

    #[test]
    fn simulated_health_reports_never_flap_faster_than_hold_down() {
        // Gateway 1 (preferred) flaps every 7 s for a while; gateway 2 is
        // steady. Count primary changes: each failback needs 30 s of health.
        let mut s = RouteSelector::new(30);
        let p = nyc();
        let mut last = 0;
        let mut changes = 0;
        let mut up_since = Some(0);
        for t in 1..300 {
            let flapping = t < 150;
            if flapping && t % 7 == 0 {
                up_since = if up_since.is_some() { None } else { Some(t) };
            } else if !flapping && up_since.is_none() {
                up_since = Some(t);
            }
            let order = s.select(p, &[c(1, 0, up_since), c(2, 5, Some(0))], t);
            if order[0] != last {
                changes += 1;
                last = order[0];
            }
        }
        // Initial pick of 1, one failover to 2 at t=7, then failback once
        // gateway 1 has been steady for 30 s after t=150.
        assert_eq!(changes, 3);
        assert_eq!(last, 1);
    }
}
