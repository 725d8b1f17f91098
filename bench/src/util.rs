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
