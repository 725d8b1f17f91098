//! The benchmark harness: every performance figure of the project comes from
//! a suite here, run by `cargo xtask bench [SUITE...] [--quick] [--out DIR]`.
//!
//! A suite measures its variants interleaved (A B A B ...) over several runs,
//! so a noisy machine shows up as spread rather than as a false ratio, and
//! reports every sample as a [`Record`]. The harness writes them as JSON
//! lines plus a Markdown summary (median, min-max, ratio to the suite's
//! baseline variant) and an SVG chart.

pub mod chart;
pub mod results;
pub mod suites;
pub mod util;

pub use results::{Record, Results, Summary};

/// What a suite is given.
#[derive(Debug)]
pub struct Ctx {
    /// A run of a few minutes rather than the full one.
    pub quick: bool,
    /// Where results go.
    pub out: std::path::PathBuf,
}

impl Ctx {
    /// Prints a progress line (benchmarks run long; show they are alive).
    pub fn progress(&self, suite: &str, what: impl std::fmt::Display) {
        eprintln!("[bench {suite}] {what}");
    }
}
