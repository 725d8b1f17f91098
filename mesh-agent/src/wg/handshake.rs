//! How long WireGuard handshakes take, from the backends' last-handshake
//! timestamps (`mesh_agent_handshake_duration_seconds`).
//!
//! Neither backend says when a handshake starts: kernel WireGuard (netlink)
//! and the userspace engine (UAPI) expose only the time the last one
//! completed. So each peer's handshake is timed from when it became *due*:
//! - a peer observed with no handshake yet: due since that observation;
//! - after a handshake completed at `t`: due at `t + REKEY_AFTER_TIME`
//!   (120 s), when WireGuard's initiator starts the next one with the next
//!   packet it sends to the peer (the responder rekeys only later).
//!
//! When the timestamp advances to `t'` at or after the due time, `t' - due`
//! is one observation. It includes the wait for the next packet to the peer
//! (the probes send one at least every few seconds, to gateways several
//! times a second), the retries after lost initiations (REKEY_TIMEOUT, 5 s
//! each) and the handshake's round trip: it is the time a rekey or a first
//! contact left the peer waiting, not the cryptography alone. A handshake
//! completed before it was due (the peer rekeyed first, a re-handshake
//! after the peer changed) is not recorded: nothing was waiting for it.
//!
//! The timestamps are the engine's own, so how often the agent looks (each
//! status read: scrapes, health reports) does not blur the value; it only
//! has to be more often than every 120 s, or the handshakes in between go
//! uncounted. Their resolution is the backend's: nanoseconds from kernel
//! WireGuard's netlink, but whole seconds from the userspace engine, whose
//! UAPI reads go through wireguard-control 2.0, which drops
//! `last_handshake_time_nsec`. With the userspace backend a rekey is thus
//! measured to the second (one completed within a second of being due
//! reads 0), and a first contact, timed from an observation, to within a
//! second. Pure: the caller passes the time and the timestamps.

use std::{
    collections::BTreeMap,
    time::{Duration, SystemTime},
};

use mesh_metrics::family::Buckets;

use crate::keys::PublicKey;

/// WireGuard's REKEY_AFTER_TIME: the initiator's next handshake is due this
/// long after the last.
pub const REKEY_AFTER_TIME: Duration = Duration::from_secs(120);

/// A timestamp within this of the last one is the same handshake read
/// again: gotatun derives it from the time elapsed since the handshake, so
/// it moves by microseconds between reads, and by a second when that
/// crosses a whole second (see the resolution above). WireGuard starts no
/// new handshake with a peer this soon after one.
const SAME_HANDSHAKE: Duration = Duration::from_secs(1);

/// Upper bounds of the histogram's buckets (seconds).
pub const HANDSHAKE_BUCKETS: [f64; 13] = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0];

/// One peer's timer and histogram.
#[derive(Clone, Debug, PartialEq)]
pub struct PeerTimer {
    /// The last handshake seen.
    last: Option<SystemTime>,
    /// Since when a handshake has been due.
    due: SystemTime,
    /// Observations per bucket of [`HANDSHAKE_BUCKETS`] (not cumulative).
    counts: [u64; HANDSHAKE_BUCKETS.len()],
    /// Observations above the last bucket.
    above: u64,
    /// Sum of the observations (seconds).
    sum: f64,
}

impl PeerTimer {
    fn new(now: SystemTime, last: Option<SystemTime>) -> Self {
        Self {
            last,
            due: last.map_or(now, |t| t + REKEY_AFTER_TIME),
            counts: [0; HANDSHAKE_BUCKETS.len()],
            above: 0,
            sum: 0.0,
        }
    }

    /// Feeds the peer's last-handshake time observed at `now`; the handshake
    /// time recorded, if one was.
    fn observe(&mut self, now: SystemTime, last: Option<SystemTime>) -> Option<Duration> {
        let Some(t) = last else {
            // No handshake any more: the peer was configured anew.
            if self.last.is_some() {
                self.last = None;
                self.due = now;
            }
            return None;
        };
        if self.last.is_some_and(|l| t <= l + SAME_HANDSHAKE) {
            return None;
        }
        let waited = t.duration_since(self.due).ok();
        self.last = Some(t);
        self.due = t + REKEY_AFTER_TIME;
        let d = waited?;
        let s = d.as_secs_f64();
        self.sum += s;
        match HANDSHAKE_BUCKETS.iter().position(|b| s <= *b) {
            Some(i) => self.counts[i] += 1,
            None => self.above += 1,
        }
        Some(d)
    }

    /// The histogram for Prometheus.
    #[must_use]
    pub fn buckets(&self) -> Buckets<'_> {
        Buckets { bounds: &HANDSHAKE_BUCKETS, counts: &self.counts, above: self.above, sum: self.sum }
    }
}

/// The timers of the configured peers.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct HandshakeTimes(BTreeMap<PublicKey, PeerTimer>);

impl HandshakeTimes {
    /// Feeds the peers' last-handshake times observed at `now`. Peers no
    /// longer configured are forgotten (their histograms with them).
    pub fn observe(&mut self, now: SystemTime, peers: impl IntoIterator<Item = (PublicKey, Option<SystemTime>)>) {
        let mut next = BTreeMap::new();
        for (key, last) in peers {
            let timer = match self.0.remove(&key) {
                Some(mut t) => {
                    t.observe(now, last);
                    t
                }
                None => PeerTimer::new(now, last),
            };
            next.insert(key, timer);
        }
        self.0 = next;
    }

    /// The peer's timer.
    #[must_use]
    pub fn get(&self, key: &PublicKey) -> Option<&PeerTimer> {
        self.0.get(key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);
    const MS: Duration = Duration::from_millis(1);

    fn at(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000 + secs)
    }

    fn count(t: &PeerTimer) -> u64 {
        t.counts.iter().sum::<u64>() + t.above
    }

    #[test]
    fn a_first_handshake_is_timed_from_the_first_observation_without_one() {
        let mut t = PeerTimer::new(at(0), None);
        assert_eq!(t.observe(at(1), None), None);
        assert_eq!(t.observe(at(2), Some(at(0) + 30 * MS)), Some(30 * MS));
        assert_eq!(t.counts[HANDSHAKE_BUCKETS.iter().position(|b| *b == 0.05).unwrap()], 1);
        assert!((t.sum - 0.03).abs() < 1e-9);
    }

    #[test]
    fn a_rekey_is_timed_from_rekey_after_time() {
        let mut t = PeerTimer::new(at(0), Some(at(0)));
        // Observed many times between handshakes: nothing recorded.
        assert_eq!(t.observe(at(60), Some(at(0))), None);
        assert_eq!(t.observe(at(130), Some(at(120) + 400 * MS)), Some(400 * MS));
        // The next one is due 120 s after that one, whenever it is observed.
        assert_eq!(t.observe(at(300), Some(at(240) + 400 * MS + 7 * S)), Some(7 * S));
        assert_eq!(count(&t), 2);
    }

    #[test]
    fn a_handshake_before_it_was_due_is_not_recorded() {
        let mut t = PeerTimer::new(at(0), Some(at(0)));
        assert_eq!(t.observe(at(50), Some(at(40))), None);
        assert_eq!(count(&t), 0);
        // But it moves the next due time.
        assert_eq!(t.observe(at(200), Some(at(161))), Some(S));
    }

    #[test]
    fn the_same_handshake_read_a_second_later_is_not_a_new_one() {
        let mut t = PeerTimer::new(at(0), Some(at(10)));
        assert_eq!(t.observe(at(20), Some(at(11))), None);
        // Still due 120 s after the first reading.
        assert_eq!(t.observe(at(200), Some(at(131))), Some(S));
    }

    #[test]
    fn a_peer_configured_anew_waits_from_then() {
        let mut t = PeerTimer::new(at(0), Some(at(0)));
        assert_eq!(t.observe(at(10), None), None);
        assert_eq!(t.observe(at(20), Some(at(12))), Some(2 * S));
    }

    #[test]
    fn slow_handshakes_land_above_the_last_bucket() {
        let mut t = PeerTimer::new(at(0), None);
        t.observe(at(100), Some(at(90)));
        assert_eq!((t.above, count(&t)), (1, 1));
        let b = t.buckets();
        assert_eq!((b.above, b.counts.len(), b.bounds.len()), (1, 13, 13));
    }

    #[test]
    fn removed_peers_are_forgotten() {
        let (a, b) = (PublicKey([1; 32]), PublicKey([2; 32]));
        let mut h = HandshakeTimes::default();
        h.observe(at(0), [(a, None), (b, None)]);
        h.observe(at(5), [(a, Some(at(1)))]);
        assert_eq!(h.get(&a).map(count), Some(1));
        assert!(h.get(&b).is_none());
    }
}
