//! Which path each peer's packets take (pure): direct to one of the peer's
//! candidates while disco pongs come back from it, else through a relay.
//!
//! - A candidate is *alive* while its last pong is younger than
//!   [`DEAD_AFTER`], or while fewer than [`MISSED`] pings went unanswered
//!   since (an agent that stalled, and sent none, does not declare its
//!   peers dead on waking). It becomes *usable* after [`UP_AFTER`]
//!   consecutive pongs, so one stray pong does not pull a relayed session
//!   onto a path that then fails.
//! - On a direct path that stops answering, the peer moves to another usable
//!   candidate, else to the relay (if there is one). With pings every
//!   250 ms the move comes about 0.75 s after the path broke: before a TCP
//!   flow's third retransmission (1.4 s after the loss), so its cut stays
//!   under 2 s.
//! - On the relay, the first usable candidate (in the peer's order:
//!   configured endpoints first) takes it back to direct.
//! - Without a relay, a peer stays on its first candidate, as before relays
//!   existed.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    time::{Duration, Instant},
};

/// A direct candidate without a pong for this long (and [`MISSED`] pings)
/// is dead.
pub const DEAD_AFTER: Duration = Duration::from_millis(600);
/// Unanswered pings, the last just sent, that make a silent candidate dead.
pub const MISSED: u32 = 3;
/// Unanswered pings after which a candidate is only pinged at the slow
/// rate (about 5 s of fast pings): a peer that lives on the relay, behind
/// a UDP block, does not cost four pings a second per candidate forever.
pub const SILENT_AFTER: u32 = 20;
/// Consecutive pongs that make a candidate usable.
pub const UP_AFTER: u32 = 2;
/// Pongs at most this far apart are consecutive (candidates off the path
/// in use are pinged once a second).
const STREAK_GAP: Duration = Duration::from_millis(1500);

/// Where a peer's packets go.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Path {
    /// Straight to this endpoint.
    Direct(SocketAddr),
    /// Through the relay.
    Relay,
}

impl Path {
    /// `direct` or `relay`, for metrics and reports.
    #[must_use]
    pub const fn kind(self) -> &'static str {
        match self {
            Self::Direct(_) => "direct",
            Self::Relay => "relay",
        }
    }
}

#[derive(Clone, Debug, Default)]
struct Candidate {
    last_pong: Option<Instant>,
    streak: u32,
    /// Pings sent since the last pong.
    unanswered: u32,
}

/// One peer's path state.
#[derive(Clone, Debug)]
pub struct PeerPath {
    order: Vec<SocketAddr>,
    candidates: BTreeMap<SocketAddr, Candidate>,
    path: Option<Path>,
    since: Instant,
    /// Switches so far.
    pub switches: u64,
    /// Time on each path before the current stretch.
    direct: Duration,
    relay: Duration,
}

/// A path change, for logs, audit and metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Switch {
    /// The path before (`None`: none chosen yet).
    pub from: Option<Path>,
    /// The path now.
    pub to: Path,
}

impl PeerPath {
    /// A peer with these direct candidates, nothing heard yet.
    #[must_use]
    pub fn new(candidates: &[SocketAddr], now: Instant) -> Self {
        let mut p = Self {
            order: Vec::new(),
            candidates: BTreeMap::new(),
            path: None,
            since: now,
            switches: 0,
            direct: Duration::ZERO,
            relay: Duration::ZERO,
        };
        p.set_candidates(candidates);
        p
    }

    /// Replaces the candidates (a new view), keeping what was heard from
    /// those that stay.
    pub fn set_candidates(&mut self, candidates: &[SocketAddr]) {
        self.order = candidates.to_vec();
        self.candidates.retain(|a, _| candidates.contains(a));
        for a in candidates {
            self.candidates.entry(*a).or_default();
        }
    }

    /// The candidates, in the peer's order.
    #[must_use]
    pub fn candidates(&self) -> &[SocketAddr] {
        &self.order
    }

    /// A pong came back from `from`: a candidate, or an address that is not
    /// one (ignored).
    pub fn pong(&mut self, from: SocketAddr, now: Instant) {
        if let Some(c) = self.candidates.get_mut(&from) {
            let fresh = c.last_pong.is_some_and(|t| now.duration_since(t) < STREAK_GAP);
            c.streak = if fresh { c.streak.saturating_add(1) } else { 1 };
            c.last_pong = Some(now);
            c.unanswered = 0;
        }
    }

    /// A ping went to candidate `to`.
    pub fn pinged(&mut self, to: SocketAddr) {
        if let Some(c) = self.candidates.get_mut(&to) {
            c.unanswered = c.unanswered.saturating_add(1);
        }
    }

    /// Whether `a` has not answered [`SILENT_AFTER`] pings in a row (or is
    /// no candidate): it gets the slow rate.
    #[must_use]
    pub fn silent(&self, a: &SocketAddr) -> bool {
        self.candidates.get(a).is_none_or(|c| c.unanswered >= SILENT_AFTER)
    }

    fn alive(&self, a: &SocketAddr, now: Instant) -> bool {
        self.candidates
            .get(a)
            .is_some_and(|c| c.last_pong.is_some_and(|t| now.duration_since(t) < DEAD_AFTER || c.unanswered < MISSED))
    }

    fn usable(&self, now: Instant) -> Option<SocketAddr> {
        self.order.iter().copied().find(|a| self.alive(a, now) && self.candidates[a].streak >= UP_AFTER)
    }

    /// Whether the path in use is a direct one that answers: then the other
    /// candidates need only occasional pings.
    #[must_use]
    pub fn direct_alive(&self, now: Instant) -> bool {
        matches!(self.path, Some(Path::Direct(a)) if self.alive(&a, now))
    }

    /// The current path (`None` before the first decision).
    #[must_use]
    pub const fn path(&self) -> Option<Path> {
        self.path
    }

    /// Time spent directly and through the relay so far.
    #[must_use]
    pub fn times(&self, now: Instant) -> (Duration, Duration) {
        let current = now.saturating_duration_since(self.since);
        match self.path {
            Some(Path::Direct(_)) => (self.direct + current, self.relay),
            Some(Path::Relay) => (self.direct, self.relay + current),
            None => (self.direct, self.relay),
        }
    }

    /// Decides the path now; `relay` says whether a relay can carry this
    /// peer's packets. Returns the switch, if the path changed.
    pub fn decide(&mut self, relay: bool, now: Instant) -> Option<Switch> {
        let grace = now.saturating_duration_since(self.since) < DEAD_AFTER;
        let next = match self.path {
            None => match self.order.first() {
                Some(first) => Path::Direct(self.usable(now).unwrap_or(*first)),
                None if relay => Path::Relay,
                None => return None,
            },
            Some(Path::Direct(a)) => {
                if self.alive(&a, now) || grace {
                    Path::Direct(a)
                } else if let Some(b) = self.usable(now) {
                    Path::Direct(b)
                } else if relay {
                    Path::Relay
                } else {
                    // Nothing better: keep the first candidate (WireGuard's
                    // own roaming may still find the peer).
                    Path::Direct(self.order.first().copied().unwrap_or(a))
                }
            }
            Some(Path::Relay) => match self.usable(now) {
                Some(b) => Path::Direct(b),
                None if relay => Path::Relay,
                None => match self.order.first() {
                    Some(first) => Path::Direct(*first),
                    None => Path::Relay,
                },
            },
        };
        if Some(next) == self.path {
            return None;
        }
        let (direct, relay_time) = self.times(now);
        self.direct = direct;
        self.relay = relay_time;
        self.since = now;
        let from = self.path.replace(next);
        if from.is_some() {
            self.switches += 1;
        }
        Some(Switch { from, to: next })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn starts_direct_and_falls_back_to_the_relay_when_pongs_stop() {
        let t0 = Instant::now();
        let mut p = PeerPath::new(&[a("192.0.2.1:51820")], t0);
        assert_eq!(p.decide(true, t0).unwrap().to, Path::Direct(a("192.0.2.1:51820")));
        // Pongs keep it direct.
        for i in 1..10 {
            let now = t0 + Duration::from_millis(250 * i);
            p.pinged(a("192.0.2.1:51820"));
            p.pong(a("192.0.2.1:51820"), now);
            assert_eq!(p.decide(true, now), None);
        }
        // Silence: direct until DEAD_AFTER after the last pong and MISSED
        // unanswered pings, then relay.
        let last = t0 + Duration::from_millis(2250);
        for _ in 0..MISSED {
            p.pinged(a("192.0.2.1:51820"));
        }
        assert_eq!(p.decide(true, last + DEAD_AFTER - Duration::from_millis(10)), None);
        let s = p.decide(true, last + DEAD_AFTER).unwrap();
        assert_eq!((s.from, s.to), (Some(Path::Direct(a("192.0.2.1:51820"))), Path::Relay));
        assert_eq!(p.switches, 1);
        // One pong is not enough to go back; two in a row are.
        let t1 = last + Duration::from_secs(5);
        p.pong(a("192.0.2.1:51820"), t1);
        assert_eq!(p.decide(true, t1), None);
        p.pong(a("192.0.2.1:51820"), t1 + Duration::from_millis(250));
        assert_eq!(p.decide(true, t1 + Duration::from_millis(250)).unwrap().to, Path::Direct(a("192.0.2.1:51820")));
        assert_eq!(p.switches, 2);
        let (direct, relay) = p.times(t1 + Duration::from_secs(1));
        assert!(relay >= Duration::from_secs(4) && direct >= Duration::from_secs(3), "{direct:?} {relay:?}");
    }

    #[test]
    fn an_agent_that_sent_no_pings_does_not_call_its_peer_dead() {
        let t0 = Instant::now();
        let c = a("192.0.2.1:51820");
        let mut p = PeerPath::new(&[c], t0);
        p.decide(true, t0);
        p.pong(c, t0);
        // Seconds without a pong, but only one ping sent (a stalled agent).
        p.pinged(c);
        assert_eq!(p.decide(true, t0 + Duration::from_secs(3)), None);
        p.pinged(c);
        p.pinged(c);
        assert_eq!(p.decide(true, t0 + Duration::from_secs(3)).unwrap().to, Path::Relay);
    }

    #[test]
    fn a_candidate_that_never_answers_goes_quiet_until_it_does() {
        let c = a("192.0.2.1:51820");
        let mut p = PeerPath::new(&[c], Instant::now());
        for _ in 0..SILENT_AFTER - 1 {
            p.pinged(c);
        }
        assert!(!p.silent(&c));
        p.pinged(c);
        assert!(p.silent(&c));
        p.pong(c, Instant::now());
        assert!(!p.silent(&c), "an answer brings the fast rate back");
        assert!(p.silent(&a("203.0.113.1:1")), "no candidate");
    }

    #[test]
    fn without_a_relay_a_dead_direct_path_stays() {
        let t0 = Instant::now();
        let mut p = PeerPath::new(&[a("192.0.2.1:51820")], t0);
        p.decide(false, t0);
        assert_eq!(p.decide(false, t0 + Duration::from_secs(10)), None);
        assert_eq!(p.path(), Some(Path::Direct(a("192.0.2.1:51820"))));
    }

    #[test]
    fn no_candidates_means_relay_and_another_live_candidate_beats_the_relay() {
        let t0 = Instant::now();
        let mut none = PeerPath::new(&[], t0);
        assert_eq!(none.decide(true, t0).unwrap().to, Path::Relay);
        assert_eq!(none.decide(false, t0), None, "stays where it is");

        let (c1, c2) = (a("10.0.0.1:51820"), a("198.51.100.9:40000"));
        let mut p = PeerPath::new(&[c1, c2], t0);
        p.decide(true, t0);
        // Only the discovered candidate answers.
        for i in 1..8 {
            p.pong(c2, t0 + Duration::from_millis(250 * i));
        }
        let s = p.decide(true, t0 + Duration::from_secs(2)).unwrap();
        assert_eq!(s.to, Path::Direct(c2), "{s:?}");
        // A pong from an address that is no candidate changes nothing.
        p.pong(a("203.0.113.1:1"), t0 + Duration::from_secs(2));
        // The candidates change: the chosen one goes, so the path dies at once.
        p.set_candidates(&[c1]);
        assert_eq!(p.decide(true, t0 + Duration::from_secs(3)).unwrap().to, Path::Relay);
    }
}
