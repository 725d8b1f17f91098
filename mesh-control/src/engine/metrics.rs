//! Engine counters, rendered as Prometheus text by [`crate::metrics`].

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Upper bounds (seconds) of the push-latency histogram buckets.
pub const LATENCY_BUCKETS: [f64; 10] = [0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0];

/// Counters of the engine.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Views published (one per node whose view changed).
    pub pushes: AtomicU64,
    /// Refreshes run.
    pub refreshes: AtomicU64,
    /// Changes of a prefix's primary gateway.
    pub primary_changes: AtomicU64,
    /// Acks carrying an error (an agent could not fully apply a view).
    pub nacks: AtomicU64,
    latency: Mutex<Histogram>,
}

/// A cumulative histogram.
#[derive(Clone, Debug, Default)]
pub struct Histogram {
    /// Counts per bucket of [`LATENCY_BUCKETS`] (not cumulative).
    pub buckets: [u64; 10],
    /// Observations.
    pub count: u64,
    /// Sum of observations, seconds.
    pub sum: f64,
}

impl Metrics {
    pub(crate) fn record_refresh(&self, published: u64, _took: Duration) {
        self.pushes.fetch_add(published, Ordering::Relaxed);
        self.refreshes.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn observe_push_latency(&self, d: Duration) {
        let s = d.as_secs_f64();
        let mut h = self.latency.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(i) = LATENCY_BUCKETS.iter().position(|b| s <= *b) {
            h.buckets[i] += 1;
        }
        h.count += 1;
        h.sum += s;
    }

    /// The push-latency histogram (publish to the agent's ack).
    #[must_use]
    pub fn latency(&self) -> Histogram {
        self.latency.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }
}
