//! Limits on what one client can make control do.
//!
//! - Enrollment needs no authentication, so it is gated before it touches
//!   the database: a token bucket per source address (per /64 for IPv6,
//!   which one host can fill with addresses), one per enrollment key id,
//!   and a cap on enrollments checked at once, so that a flood of bad keys
//!   never holds more than a share of the database pool that renewals,
//!   presence updates and admin writes need.
//! - An authenticated agent gets a cap on its Sync streams, and its health
//!   and route reports are coalesced per stream (see
//!   [`LimitsConfig::report_interval_ms`]): a flapping gateway costs a
//!   bounded number of writes and recomputes per interval, whatever it sends.

use std::net::IpAddr;
use std::num::NonZeroU32;
use std::time::Duration;

use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::{counter::Counter, family::Family};
use serde::Deserialize;

/// A token-bucket rate: `per_second` on average, `burst` at once.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Rate {
    /// Sustained requests per second.
    pub per_second: u32,
    /// Requests allowed at once after a quiet period.
    pub burst: u32,
}

impl Rate {
    fn quota(self) -> Option<Quota> {
        Some(Quota::per_second(NonZeroU32::new(self.per_second)?).allow_burst(NonZeroU32::new(self.burst)?))
    }
}

/// The `[limits]` section of control's configuration.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Enrollment attempts per source address (IPv6: per /64).
    pub enroll_per_source: Rate,
    /// Enrollment attempts per enrollment key id.
    pub enroll_per_key: Rate,
    /// Enrollments checked against the database at once; the others wait
    /// up to [`ENROLL_WAIT`] and are then refused as busy.
    pub enroll_concurrency: u32,
    /// Sync streams one node may hold open at once (a restarting agent
    /// briefly holds two).
    pub streams_per_node: u32,
    /// An agent's health and route reports are applied at most once per
    /// this many milliseconds per stream; a report arriving sooner waits,
    /// and a newer one of the same kind replaces it.
    pub report_interval_ms: u64,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            // A whole site enrolling behind one NAT: 20 at once, then 5/s.
            enroll_per_source: Rate { per_second: 5, burst: 20 },
            enroll_per_key: Rate { per_second: 20, burst: 100 },
            enroll_concurrency: 2,
            streams_per_node: 4,
            report_interval_ms: 500,
        }
    }
}

impl LimitsConfig {
    /// Checks value ranges; the error names the field.
    pub fn check(&self) -> Result<(), String> {
        for (name, r) in [("enroll_per_source", self.enroll_per_source), ("enroll_per_key", self.enroll_per_key)] {
            if r.quota().is_none() {
                return Err(format!("limits.{name}: per_second and burst must be at least 1"));
            }
        }
        if !(1..=16).contains(&self.enroll_concurrency) {
            return Err("limits.enroll_concurrency must be 1-16".into());
        }
        if !(1..=64).contains(&self.streams_per_node) {
            return Err("limits.streams_per_node must be 1-64".into());
        }
        if self.report_interval_ms > 10_000 {
            return Err("limits.report_interval_ms must be at most 10000".into());
        }
        Ok(())
    }

    /// [`Self::report_interval_ms`] as a duration.
    #[must_use]
    pub const fn report_interval(&self) -> Duration {
        Duration::from_millis(self.report_interval_ms)
    }
}

/// How long an enrollment waits for a free check before it is refused.
pub const ENROLL_WAIT: Duration = Duration::from_secs(2);

/// Which limit refused a request (the `limit` label of
/// `mesh_control_limited`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, thiserror::Error)]
pub enum Limited {
    /// Too many enrollments from one source.
    #[error("too many enrollment attempts from this address; retry later")]
    EnrollSource,
    /// Too many enrollments with one key id.
    #[error("too many enrollment attempts with this key; retry later")]
    EnrollKey,
    /// Every enrollment check is busy.
    #[error("control is busy with other enrollments; retry later")]
    EnrollBusy,
    /// The node holds its maximum of Sync streams.
    #[error("this node already holds its maximum number of sync streams")]
    Streams,
}

impl Limited {
    const fn label(self) -> &'static str {
        match self {
            Self::EnrollSource => "enroll_source",
            Self::EnrollKey => "enroll_key",
            Self::EnrollBusy => "enroll_busy",
            Self::Streams => "streams",
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LimitLabel {
    limit: &'static str,
}

/// Entries kept per limiter before idle ones are dropped: a client cycling
/// through key ids or addresses cannot grow control's memory without bound.
const PRUNE_ABOVE: usize = 10_000;

/// The gates of [`LimitsConfig`], shared by the services.
#[derive(Debug)]
pub struct Limits {
    cfg: LimitsConfig,
    per_source: DefaultKeyedRateLimiter<IpAddr>,
    per_key: DefaultKeyedRateLimiter<String>,
    checks: tokio::sync::Semaphore,
    refused: Family<LimitLabel, Counter>,
}

impl Limits {
    /// Gates for `cfg` (checked with [`LimitsConfig::check`]; an invalid
    /// rate falls back to the default).
    #[must_use]
    pub fn new(cfg: &LimitsConfig) -> Self {
        let d = LimitsConfig::default();
        let quota =
            |r: Rate, d: Rate| r.quota().or_else(|| d.quota()).unwrap_or_else(|| Quota::per_second(NonZeroU32::MIN));
        Self {
            per_source: RateLimiter::keyed(quota(cfg.enroll_per_source, d.enroll_per_source)),
            per_key: RateLimiter::keyed(quota(cfg.enroll_per_key, d.enroll_per_key)),
            checks: tokio::sync::Semaphore::new(cfg.enroll_concurrency.max(1) as usize),
            cfg: cfg.clone(),
            refused: Family::default(),
        }
    }

    /// The settings.
    #[must_use]
    pub const fn config(&self) -> &LimitsConfig {
        &self.cfg
    }

    /// Counts a refusal by `limit` and returns it.
    pub fn refuse(&self, limit: Limited) -> Limited {
        self.refused.get_or_create(&LimitLabel { limit: limit.label() }).inc();
        limit
    }

    /// Admits one enrollment attempt from `source` (none: a local socket)
    /// with key id `key_id` by the rate limits, and then waits for one of the
    /// [`LimitsConfig::enroll_concurrency`] checks; the permit must be held
    /// while the enrollment reads and writes the store.
    pub async fn admit_enrollment(
        &self,
        source: Option<IpAddr>,
        key_id: &str,
    ) -> Result<tokio::sync::SemaphorePermit<'_>, Limited> {
        if let Some(ip) = source {
            prune(&self.per_source);
            if self.per_source.check_key(&source_key(ip)).is_err() {
                return Err(self.refuse(Limited::EnrollSource));
            }
        }
        prune(&self.per_key);
        if self.per_key.check_key(&key_id.to_owned()).is_err() {
            return Err(self.refuse(Limited::EnrollKey));
        }
        match tokio::time::timeout(ENROLL_WAIT, self.checks.acquire()).await {
            Ok(Ok(permit)) => Ok(permit),
            _ => Err(self.refuse(Limited::EnrollBusy)),
        }
    }

    /// Registers `mesh_control_limited` in `registry`.
    pub fn register(&self, registry: &mut prometheus_client::registry::Registry) {
        registry.register(
            "mesh_control_limited",
            "Requests refused by a limit of the [limits] configuration, by limit",
            self.refused.clone(),
        );
    }
}

/// The rate-limit key of a source address: the address itself for IPv4,
/// its /64 for IPv6 (IPv4-mapped addresses count as IPv4).
#[must_use]
pub fn source_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6((u128::from(v6) & !((1u128 << 64) - 1)).into()),
        },
    }
}

fn prune<K: std::hash::Hash + Eq + Clone>(limiter: &DefaultKeyedRateLimiter<K>) {
    if limiter.len() > PRUNE_ABOVE {
        limiter.retain_recent();
        limiter.shrink_to_fit();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv6_sources_share_their_64() {
        let a: IpAddr = "2001:db8:1:2:aaaa::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:bbbb::2".parse().unwrap();
        let c: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(source_key(a), source_key(b));
        assert_ne!(source_key(a), source_key(c));
        let mapped: IpAddr = "::ffff:192.0.2.1".parse().unwrap();
        assert_eq!(source_key(mapped), "192.0.2.1".parse::<IpAddr>().unwrap());
    }

    #[tokio::test]
    async fn enrollment_is_limited_per_source_then_per_key() {
        let cfg = LimitsConfig {
            enroll_per_source: Rate { per_second: 1, burst: 3 },
            enroll_per_key: Rate { per_second: 1, burst: 5 },
            ..LimitsConfig::default()
        };
        let l = Limits::new(&cfg);
        let one: IpAddr = "192.0.2.1".parse().unwrap();
        for _ in 0..3 {
            drop(l.admit_enrollment(Some(one), "k").await.unwrap());
        }
        assert_eq!(l.admit_enrollment(Some(one), "k").await.unwrap_err(), Limited::EnrollSource);
        // Other sources still get in, until the key's own bucket is empty.
        drop(l.admit_enrollment(Some("192.0.2.2".parse().unwrap()), "k").await.unwrap());
        drop(l.admit_enrollment(Some("192.0.2.3".parse().unwrap()), "k").await.unwrap());
        let e = l.admit_enrollment(Some("192.0.2.4".parse().unwrap()), "k").await.unwrap_err();
        assert_eq!(e, Limited::EnrollKey);
        drop(l.admit_enrollment(Some("192.0.2.4".parse().unwrap()), "other").await.unwrap());
    }

    #[tokio::test]
    async fn enrollment_checks_are_capped() {
        let cfg = LimitsConfig { enroll_concurrency: 1, ..LimitsConfig::default() };
        let l = Limits::new(&cfg);
        let held = l.admit_enrollment(None, "a").await.unwrap();
        assert_eq!(l.admit_enrollment(None, "b").await.unwrap_err(), Limited::EnrollBusy);
        drop(held);
        assert!(l.admit_enrollment(None, "c").await.is_ok());
    }

    #[test]
    fn config_ranges_are_checked() {
        assert!(LimitsConfig::default().check().is_ok());
        let bad = LimitsConfig { enroll_per_key: Rate { per_second: 0, burst: 1 }, ..LimitsConfig::default() };
        assert!(bad.check().unwrap_err().contains("enroll_per_key"));
        let bad = LimitsConfig { streams_per_node: 0, ..LimitsConfig::default() };
        assert!(bad.check().is_err());
    }
}
