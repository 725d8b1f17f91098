//! Per-peer probe statistics: a window of recent outcomes (loss ratio,
//! percentiles), a cumulative RTT histogram for Prometheus, and the peer's
//! reachability as the probes see it. Pure: time comes in as arguments.

use std::{collections::VecDeque, time::Duration};

use mesh_metrics::family::Buckets;

/// Upper bounds (seconds) of the RTT histogram buckets: from a LAN's
/// sub-millisecond to an intercontinental second.
pub const RTT_BUCKETS: [f64; 12] = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5];

/// What the probes say about a peer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reach {
    /// Not enough evidence yet (no answer and fewer losses than the limit).
    Unknown,
    /// Its last probe was answered.
    Up,
    /// Its last `down_after` probes were all lost, after it had answered
    /// before (a peer that never answered may simply not run the probe
    /// responder: that is no evidence against it).
    Down,
}

impl Reach {
    /// As a metrics gauge: 1 up, 0 down, -1 unknown.
    #[must_use]
    pub const fn gauge(self) -> i64 {
        match self {
            Self::Up => 1,
            Self::Down => 0,
            Self::Unknown => -1,
        }
    }
}

/// The statistics of one peer.
#[derive(Clone, Debug)]
pub struct PeerStats {
    window: usize,
    down_after: u32,
    /// Recent outcomes, oldest first: the RTT, or `None` for a lost probe.
    recent: VecDeque<Option<Duration>>,
    consecutive_lost: u32,
    reach: Reach,
    /// Cumulative counts per bucket of [`RTT_BUCKETS`] (not cumulative
    /// across buckets; summed when rendered).
    buckets: [u64; RTT_BUCKETS.len()],
    rtt_sum: f64,
    answered: u64,
    lost: u64,
    last_rtt: Option<Duration>,
}

impl PeerStats {
    /// Statistics over the last `window` probes; the peer is down after
    /// `down_after` consecutive losses.
    #[must_use]
    pub fn new(window: usize, down_after: u32) -> Self {
        Self {
            window: window.max(1),
            down_after: down_after.max(1),
            recent: VecDeque::new(),
            consecutive_lost: 0,
            reach: Reach::Unknown,
            buckets: [0; RTT_BUCKETS.len()],
            rtt_sum: 0.0,
            answered: 0,
            lost: 0,
            last_rtt: None,
        }
    }

    fn push(&mut self, outcome: Option<Duration>) {
        if self.recent.len() == self.window {
            self.recent.pop_front();
        }
        self.recent.push_back(outcome);
    }

    /// A probe was answered after `rtt`.
    pub fn answered(&mut self, rtt: Duration) {
        self.push(Some(rtt));
        self.consecutive_lost = 0;
        self.reach = Reach::Up;
        self.answered += 1;
        self.last_rtt = Some(rtt);
        let s = rtt.as_secs_f64();
        self.rtt_sum += s;
        if let Some(i) = RTT_BUCKETS.iter().position(|b| s <= *b) {
            self.buckets[i] += 1;
        }
    }

    /// A probe timed out.
    pub fn lost(&mut self) {
        self.push(None);
        self.lost += 1;
        self.consecutive_lost += 1;
        if self.consecutive_lost >= self.down_after && self.answered > 0 {
            self.reach = Reach::Down;
        }
    }

    /// Reachability.
    #[must_use]
    pub const fn reach(&self) -> Reach {
        self.reach
    }

    /// The RTT of the last answered probe.
    #[must_use]
    pub const fn last_rtt(&self) -> Option<Duration> {
        self.last_rtt
    }

    /// Share of lost probes in the window (0 with no probe yet).
    #[must_use]
    pub fn loss_ratio(&self) -> f64 {
        if self.recent.is_empty() {
            return 0.0;
        }
        let lost = self.recent.iter().filter(|o| o.is_none()).count();
        #[expect(clippy::cast_precision_loss, reason = "window sizes are small")]
        let r = lost as f64 / self.recent.len() as f64;
        r
    }

    /// The `q` quantile (0..=1, nearest rank) of the answered RTTs in the
    /// window.
    #[must_use]
    pub fn quantile(&self, q: f64) -> Option<Duration> {
        let mut v: Vec<Duration> = self.recent.iter().filter_map(|o| *o).collect();
        if v.is_empty() {
            return None;
        }
        v.sort_unstable();
        #[expect(
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss,
            clippy::cast_precision_loss,
            reason = "an index into a small window"
        )]
        let rank = ((q.clamp(0.0, 1.0) * v.len() as f64).ceil() as usize).clamp(1, v.len());
        Some(v[rank - 1])
    }

    /// The RTT histogram for Prometheus: per-bucket counts of
    /// [`RTT_BUCKETS`], the answers above the last bucket and the sum of
    /// observed seconds.
    #[must_use]
    pub fn rtt_buckets(&self) -> Buckets<'_> {
        let above = self.answered - self.buckets.iter().sum::<u64>();
        Buckets { bounds: &RTT_BUCKETS, counts: &self.buckets, above, sum: self.rtt_sum }
    }

    /// Probes answered and lost since the start.
    #[must_use]
    pub const fn totals(&self) -> (u64, u64) {
        (self.answered, self.lost)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn reach_follows_consecutive_losses() {
        let mut s = PeerStats::new(10, 2);
        assert_eq!(s.reach(), Reach::Unknown);
        for _ in 0..5 {
            s.lost();
        }
        assert_eq!(s.reach(), Reach::Unknown, "a peer that never answered is not held against");
        s.answered(3 * MS);
        assert_eq!(s.reach(), Reach::Up);
        s.lost();
        assert_eq!(s.reach(), Reach::Up, "one loss is not enough");
        s.lost();
        assert_eq!(s.reach(), Reach::Down);
        s.answered(3 * MS);
        assert_eq!(s.reach(), Reach::Up);
        s.lost();
        assert_eq!(s.reach(), Reach::Up, "the count restarts after an answer");
        s.lost();
        assert_eq!(s.reach(), Reach::Down);
    }

    #[test]
    fn loss_and_quantiles_over_the_window() {
        let mut s = PeerStats::new(4, 3);
        for ms in [10, 20, 30] {
            s.answered(ms * MS);
        }
        s.lost();
        assert!((s.loss_ratio() - 0.25).abs() < 1e-9);
        assert_eq!(s.quantile(0.5), Some(20 * MS));
        assert_eq!(s.quantile(0.95), Some(30 * MS));
        // The window slides: the 10 ms answer leaves.
        s.answered(40 * MS);
        assert_eq!(s.quantile(0.0), Some(20 * MS));
        assert_eq!(s.totals(), (4, 1));
    }

    #[test]
    fn histogram_buckets_and_overflow() {
        let mut s = PeerStats::new(8, 3);
        s.answered(Duration::from_micros(300));
        s.answered(2 * MS);
        s.answered(Duration::from_secs(5));
        let b = s.rtt_buckets();
        assert_eq!(b.counts[0], 1, "0.3 ms is in the 0.5 ms bucket");
        assert_eq!(b.counts[2], 1, "2 ms is in the 2.5 ms bucket");
        assert_eq!(b.counts.iter().sum::<u64>(), 2);
        assert_eq!(b.above, 1, "5 s is above the last bucket");
        assert!((b.sum - 5.0023).abs() < 1e-9);
    }
}
