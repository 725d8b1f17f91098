//! Small helpers shared by suites.

use std::process::Command;

use anyhow::{Context as _, bail};

/// Runs a command on the host and returns its stdout; a failure names it.
pub fn capture(command: &mut Command) -> anyhow::Result<String> {
    let out = command.output().with_context(|| format!("could not start {command:?}"))?;
    if !out.status.success() {
        bail!("{command:?} failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The `mesh-agent` binary next to this one, built once per process (same
/// profile, same target directory) so suites always run the current agent.
pub fn agent_binary() -> anyhow::Result<std::path::PathBuf> {
    binary("mesh-agent")
}

/// The `mesh-agent`, `mesh-control` or `mesh-relay` binary next to this one, built once
/// per process like [`agent_binary`].
pub fn binary(name: &str) -> anyhow::Result<std::path::PathBuf> {
    static BUILT: std::sync::OnceLock<Result<std::path::PathBuf, String>> = std::sync::OnceLock::new();
    let dir = BUILT.get_or_init(|| build().map_err(|e| format!("{e:#}"))).clone().map_err(|e| anyhow::anyhow!(e))?;
    let bin = dir.join(name);
    anyhow::ensure!(bin.is_file(), "{} not found after building", bin.display());
    Ok(bin)
}

/// Builds both binaries with the command `cargo xtask bench` uses: the same
/// packages give the same features, so this finds them fresh instead of
/// rebuilding them for another feature set.
fn build() -> anyhow::Result<std::path::PathBuf> {
    let exe = std::env::current_exe()?;
    let dir = exe.parent().context("bench binary has no directory")?;
    let mut cargo = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cargo.args(["build", "-q", "-p", "mesh-agent", "-p", "mesh-control", "-p", "mesh-relay"]);
    // Into this binary's target directory, wherever that is.
    if let Some(target_dir) = dir.parent() {
        cargo.arg("--target-dir").arg(target_dir);
    }
    if dir.file_name().is_some_and(|n| n == "release") {
        cargo.arg("--release");
    }
    if !cargo.status().context("running cargo to build mesh-agent and mesh-control")?.success() {
        bail!("building mesh-agent and mesh-control failed");
    }
    Ok(dir.to_owned())
}
