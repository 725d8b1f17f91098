//! The fuzz stage (`cargo xtask fuzz`, and a stage of `cargo xtask test`):
//! builds the cargo-fuzz targets of `fuzz/` and runs each for a bounded
//! time from its committed seed corpus; a crash fails the stage and leaves
//! the crashing input under `fuzz/artifacts/<target>/`.
//!
//! The targets build only the pure parsers (mesh-control without its
//! `server` feature, mesh-agent-formats, mesh-proto's messages and
//! mesh-client's wire conversions without gRPC or TLS), so
//! that a cold build plus the runs add minutes, not tens of minutes, to CI
//! (README, "Fuzzing").

use std::process::Command;

use anyhow::{Context as _, bail};

use crate::cmd;

/// The fuzz targets of the stage, as named in `fuzz/Cargo.toml`.
pub(crate) const TARGETS: &[&str] = &["policy", "probe_wire", "agent_config", "view"];

/// Seconds each target runs in `cargo xtask test`.
pub(crate) const DEFAULT_SECONDS: u32 = 20;

/// Options of `cargo xtask fuzz`.
#[derive(clap::Args, Debug)]
pub(crate) struct Args {
    /// Seconds each target runs.
    #[arg(long, default_value_t = DEFAULT_SECONDS)]
    pub(crate) seconds: u32,
    /// Targets to run (default: the stage's).
    pub(crate) targets: Vec<String>,
}

/// `cargo xtask fuzz`: set-up, then the fuzz stage alone.
pub(crate) fn main(args: &Args) -> anyhow::Result<()> {
    crate::setup::run()?;
    let targets: Vec<&str> =
        if args.targets.is_empty() { TARGETS.to_vec() } else { args.targets.iter().map(String::as_str).collect() };
    let started = std::time::Instant::now();
    build()?;
    let mut failed = Vec::new();
    for t in &targets {
        if let Err(e) = run(t, args.seconds) {
            eprintln!("xtask: fuzz {t} failed: {e:#}");
            failed.push(*t);
        }
    }
    eprintln!("xtask: fuzz stage took {:.0?}", started.elapsed());
    if !failed.is_empty() {
        bail!("fuzz targets failed: {}", failed.join(", "));
    }
    Ok(())
}

/// `cargo fuzz` on nightly, building into the workspace's `target/fuzz`.
///
/// Without AddressSanitizer: the fuzzed code is safe Rust, whose bugs
/// (panics, overflows: the build keeps debug assertions, stack exhaustion)
/// libFuzzer catches without it, and ASan would make both the cold build
/// and every execution slower. `build` and `run` must pass the same flags,
/// or `run` rebuilds.
fn cargo_fuzz(sub: &str) -> Command {
    let mut c = Command::new("cargo");
    c.args(["+nightly", "fuzz", sub, "--fuzz-dir", "fuzz", "--target-dir", "target/fuzz", "--sanitizer", "none"]);
    c
}

/// Builds the targets (release with debug assertions, as `cargo fuzz`
/// does by default).
pub(crate) fn build() -> anyhow::Result<()> {
    cmd::run(&mut cargo_fuzz("build")).context("building the fuzz targets")
}

/// Runs one target for `seconds` from its committed corpus. New inputs go
/// to a scratch directory under `target/fuzz` (listed first, so libFuzzer
/// writes there), never into the committed seeds.
pub(crate) fn run(target: &str, seconds: u32) -> anyhow::Result<()> {
    let root = cmd::workspace_root();
    let seeds = root.join("fuzz/corpus").join(target);
    if !seeds.is_dir() {
        bail!("no seed corpus at {}", seeds.display());
    }
    let scratch = root.join("target/fuzz/corpus").join(target);
    let _ = std::fs::remove_dir_all(&scratch);
    std::fs::create_dir_all(&scratch).with_context(|| format!("creating {}", scratch.display()))?;
    cmd::run(
        cargo_fuzz("run")
            .arg(target)
            .arg(&scratch)
            .arg(&seeds)
            .arg("--")
            .arg(format!("-max_total_time={seconds}"))
            // A hang is a bug too (every input here is small).
            .arg("-timeout=10")
            // Crashes and the final stats only, not a line per new input.
            .args(["-verbosity=0", "-print_funcs=0", "-print_final_stats=1"]),
    )
    .with_context(|| format!("fuzz target {target} (a crashing input is kept under fuzz/artifacts/{target}/)"))
}
