//! Waiting for a condition: the one readiness poll of tests, the demo and
//! the benchmarks (instead of sleeping "long enough").

use std::time::{Duration, Instant};

use crate::{LabError, Result};

/// How often a condition is polled: often enough not to add visible delay
/// to measured events, rare enough that a condition running a command
/// (`ip addr show`, a metrics scrape) does not load the machine.
const POLL: Duration = Duration::from_millis(50);

/// Polls `f` until it holds; fails with [`LabError::Timeout`] naming
/// `what` once `timeout` has passed. Returns how long it took.
pub fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) -> Result<Duration> {
    let start = Instant::now();
    loop {
        if f() {
            return Ok(start.elapsed());
        }
        if start.elapsed() >= timeout {
            return Err(LabError::Timeout { what: what.to_owned(), after: timeout });
        }
        std::thread::sleep(POLL);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn returns_once_the_condition_holds_and_names_what_timed_out() {
        let mut n = 0;
        wait_for("three polls", Duration::from_secs(5), || {
            n += 1;
            n == 3
        })
        .unwrap();
        assert_eq!(n, 3);
        let e = wait_for("never", Duration::from_millis(120), || false).unwrap_err();
        assert_eq!(e.to_string(), "timed out after 120ms waiting for never");
    }
}
