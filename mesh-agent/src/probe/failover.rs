//! Local failover: which gateway this node routes each prefix through,
//! given control's order and what its own probes say. Pure: time and
//! health come in as arguments.
//!
//! Rules:
//! - a gateway that owns the site side of the prefix (it says so in its
//!   probe replies, see [`super::owner`]) is the effective gateway: the
//!   site's LAN answers through it, so routing through any other would
//!   break two-way traffic;
//! - otherwise control's order is the preference; the effective gateway is the first
//!   one the probes do not hold against (a gateway whose probes are lost, or
//!   which answers that it cannot serve the prefix, is skipped);
//! - a gateway that was skipped is eligible again only after it has been
//!   good for the hold-down, so a flapping gateway does not pull traffic
//!   back and forth (control applies its own hold-down on top);
//! - when no gateway is eligible, one that is good but still in its
//!   hold-down is used, else control's primary (nothing better is known);
//! - a change of the effective gateway is an [`Event`] when this node's own
//!   judgement is involved (before or after the change), not when it merely
//!   follows a new order from control (control audits those itself).

use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use ipnet::IpNet;

/// A switch of the effective gateway of a prefix.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Event {
    /// The prefix.
    pub prefix: IpNet,
    /// The gateway routed through before.
    pub from: u64,
    /// The gateway routed through now.
    pub to: u64,
    /// Why.
    pub reason: String,
}

#[derive(Clone, Debug)]
struct Bad {
    reason: String,
    /// When it became good again (the hold-down runs from here).
    recovered_at: Option<Instant>,
}

/// The outcome of one evaluation.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Decision {
    /// Prefixes routed through another gateway than control's primary.
    pub overrides: BTreeMap<IpNet, u64>,
    /// The effective gateway of every prefix.
    pub effective: BTreeMap<IpNet, u64>,
    /// Switches since the last evaluation.
    pub events: Vec<Event>,
}

/// The local failover state.
#[derive(Clone, Debug)]
pub struct Selector {
    hold: Duration,
    bad: BTreeMap<(u64, IpNet), Bad>,
    /// Per prefix: control's primary and the effective gateway last time.
    last: BTreeMap<IpNet, (u64, u64)>,
}

impl Selector {
    /// A selector whose skipped gateways wait `hold` before being preferred
    /// again.
    #[must_use]
    pub const fn new(hold: Duration) -> Self {
        Self { hold, bad: BTreeMap::new(), last: BTreeMap::new() }
    }

    /// Evaluates every route (`prefix`, control's gateway order).
    /// `problem(gateway, prefix)` says why the probes hold a gateway against
    /// a prefix, or `None` when nothing is known against it;
    /// `owner(prefix, order)` the gateway that owns the prefix's site side,
    /// if one does.
    pub fn evaluate(
        &mut self,
        now: Instant,
        routes: &[(IpNet, Vec<u64>)],
        problem: impl Fn(u64, &IpNet) -> Option<String>,
        owner: impl Fn(&IpNet, &[u64]) -> Option<u64>,
    ) -> Decision {
        let mut d = Decision::default();
        let mut seen = std::collections::BTreeSet::new();
        for (prefix, order) in routes {
            let Some(&primary) = order.first() else { continue };
            for &gw in order {
                seen.insert((gw, *prefix));
                match (problem(gw, prefix), self.bad.get_mut(&(gw, *prefix))) {
                    (Some(reason), Some(b)) => {
                        b.reason = reason;
                        b.recovered_at = None;
                    }
                    (Some(reason), None) => {
                        self.bad.insert((gw, *prefix), Bad { reason, recovered_at: None });
                    }
                    (None, Some(b)) => match b.recovered_at {
                        None => b.recovered_at = Some(now),
                        Some(t) if now.duration_since(t) >= self.hold => {
                            self.bad.remove(&(gw, *prefix));
                        }
                        Some(_) => {}
                    },
                    (None, None) => {}
                }
            }
            let state = |gw: u64| self.bad.get(&(gw, *prefix));
            let owned = owner(prefix, order);
            let effective = owned
                .or_else(|| order.iter().copied().find(|&gw| state(gw).is_none()))
                .or_else(|| order.iter().copied().find(|&gw| state(gw).is_some_and(|b| b.recovered_at.is_some())))
                .unwrap_or(primary);
            if let Some(&(last_primary, last_effective)) = self.last.get(prefix)
                && last_effective != effective
                && (last_effective != last_primary || effective != primary)
            {
                let reason = match state(last_effective) {
                    Some(b) if b.recovered_at.is_none() => b.reason.clone(),
                    _ if owned == Some(effective) => format!("node {effective} owns the site"),
                    _ if effective == primary => "back to the preferred gateway after the hold-down".into(),
                    _ => "control changed the order".into(),
                };
                d.events.push(Event { prefix: *prefix, from: last_effective, to: effective, reason });
            }
            self.last.insert(*prefix, (primary, effective));
            d.effective.insert(*prefix, effective);
            if effective != primary {
                d.overrides.insert(*prefix, effective);
            }
        }
        self.bad.retain(|k, _| seen.contains(k));
        self.last.retain(|p, _| d.effective.contains_key(p));
        d
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    fn p() -> IpNet {
        "198.18.20.0/24".parse().unwrap()
    }

    /// Runs the selector over time with a set of gateways held against.
    struct Sim {
        sel: Selector,
        t0: Instant,
    }

    impl Sim {
        fn new() -> Self {
            Self { sel: Selector::new(Duration::from_secs(10)), t0: Instant::now() }
        }
        fn at(&mut self, secs: u64, order: &[u64], bad: &[u64]) -> Decision {
            let bad: BTreeSet<u64> = bad.iter().copied().collect();
            let routes = [(p(), order.to_vec())];
            self.sel.evaluate(
                self.t0 + Duration::from_secs(secs),
                &routes,
                |gw, _| bad.contains(&gw).then(|| format!("probes to {gw} lost")),
                |_, _| None,
            )
        }
    }

    #[test]
    fn skips_a_lost_primary_and_waits_the_hold_down_to_fail_back() {
        let mut s = Sim::new();
        let d = s.at(0, &[1, 2], &[]);
        assert_eq!(d.effective[&p()], 1);
        assert!(d.overrides.is_empty() && d.events.is_empty());
        // Gateway 1 is lost: switch at once, locally.
        let d = s.at(1, &[1, 2], &[1]);
        assert_eq!(d.overrides[&p()], 2);
        assert_eq!(d.events, vec![Event { prefix: p(), from: 1, to: 2, reason: "probes to 1 lost".into() }]);
        // It answers again, but the hold-down has not passed.
        let d = s.at(2, &[1, 2], &[]);
        assert_eq!(d.effective[&p()], 2);
        assert!(d.events.is_empty());
        let d = s.at(11, &[1, 2], &[]);
        assert_eq!(d.effective[&p()], 2, "9 s of health is not enough");
        let d = s.at(12, &[1, 2], &[]);
        assert_eq!(d.effective[&p()], 1);
        assert!(d.overrides.is_empty());
        assert_eq!(d.events.len(), 1);
        assert_eq!(d.events[0].reason, "back to the preferred gateway after the hold-down");
    }

    #[test]
    fn control_confirming_the_switch_is_not_a_second_event() {
        let mut s = Sim::new();
        s.at(0, &[1, 2], &[]);
        assert_eq!(s.at(1, &[1, 2], &[1]).events.len(), 1);
        // Control re-orders: the same gateway, no override, no event.
        let d = s.at(2, &[2, 1], &[1]);
        assert!(d.overrides.is_empty() && d.events.is_empty());
        // 1 answers again; control fails back after its own hold-down, by
        // when 1 has been healthy locally for long enough too: following
        // control is not a local event.
        assert!(s.at(3, &[2, 1], &[]).events.is_empty());
        let d = s.at(30, &[1, 2], &[]);
        assert_eq!(d.effective[&p()], 1);
        assert!(d.events.is_empty());
    }

    #[test]
    fn a_flapping_gateway_restarts_its_hold_down() {
        let mut s = Sim::new();
        s.at(0, &[1, 2], &[]);
        s.at(1, &[1, 2], &[1]);
        s.at(2, &[1, 2], &[]);
        s.at(8, &[1, 2], &[1]);
        s.at(9, &[1, 2], &[]);
        assert_eq!(s.at(15, &[1, 2], &[]).effective[&p()], 2, "hold-down counts from the last recovery");
        assert_eq!(s.at(19, &[1, 2], &[]).effective[&p()], 1);
    }

    #[test]
    fn with_every_gateway_lost_keeps_control_primary_or_a_recovering_one() {
        let mut s = Sim::new();
        s.at(0, &[1, 2], &[]);
        let d = s.at(1, &[1, 2], &[1, 2]);
        assert_eq!(d.effective[&p()], 1, "nothing better than control's choice");
        assert!(d.events.is_empty());
        // 2 answers again (in hold-down), 1 does not: 2 is the best there is.
        let d = s.at(2, &[1, 2], &[1]);
        assert_eq!(d.effective[&p()], 2);
        assert_eq!(d.events.len(), 1);
    }

    #[test]
    fn the_site_owner_wins_over_the_local_hold_down() {
        let mut s = Sim::new();
        s.at(0, &[1, 2], &[]);
        s.at(1, &[1, 2], &[1]);
        // Gateway 1 is back and control fails back; the site hands its
        // address to gateway 1, which says so: follow it at once, not after
        // the local hold-down (the LAN answers through it now).
        let routes = [(p(), vec![1, 2])];
        let d = s.sel.evaluate(s.t0 + Duration::from_secs(3), &routes, |_, _| None, |_, _| Some(1));
        assert_eq!(d.effective[&p()], 1);
        assert_eq!(d.events.len(), 1);
        assert_eq!(d.events[0].reason, "node 1 owns the site");
        // And a claim by the backup beats control's order as well.
        let d = s.sel.evaluate(s.t0 + Duration::from_secs(4), &routes, |_, _| None, |_, _| Some(2));
        assert_eq!(d.overrides[&p()], 2);
    }

    #[test]
    fn unknown_gateways_and_removed_routes() {
        let mut s = Sim::new();
        // A backup that is lost does not matter while the primary serves.
        let d = s.at(0, &[1, 2], &[2]);
        assert_eq!(d.effective[&p()], 1);
        assert!(d.events.is_empty());
        // The route goes away: its state is forgotten.
        let d = s.sel.evaluate(s.t0, &[], |_, _| None, |_, _| None);
        assert!(d.effective.is_empty());
        assert!(s.sel.bad.is_empty() && s.sel.last.is_empty());
    }
}
