//! The smoke test's pings, run from inside lab hosts, with per-packet RTTs
//! for percentiles (TCP exchanges and the failover flow are
//! `mesh_lab::traffic`'s).

use mesh_lab::Host;

/// `count` pings 50 ms apart; the RTTs (ms) of those answered.
pub(crate) fn ping(from: &Host, to: &str, count: u32) -> Vec<f64> {
    let count = count.to_string();
    let Ok(out) = from.exec_unchecked("ping", ["-n", "-c", &count, "-i", "0.05", "-W", "1", to]) else {
        return Vec::new();
    };
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split("time=").nth(1)?.split_whitespace().next()?.parse().ok())
        .collect()
}

/// The `q` quantile (0..=1) of `v` (nearest rank); NaN when empty.
pub(crate) fn quantile(v: &[f64], q: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    #[expect(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        clippy::cast_precision_loss,
        reason = "small index"
    )]
    let i = ((q * s.len() as f64).ceil() as usize).clamp(1, s.len()) - 1;
    s[i]
}
