//! `cargo xtask demo`: set-up, build, and run the demo lab (`mesh-demo`).

use std::process::Command;

use crate::{cmd, setup};

/// Options of `cargo xtask demo`.
#[derive(clap::Args, Debug)]
pub(crate) struct Args {
    /// Run non-interactively, check every expectation, exit non-zero if one
    /// fails (part of `cargo xtask test`).
    #[arg(long)]
    pub(crate) check: bool,
}

/// The binaries the demo runs: the shipped ones, built in the demo's
/// profile next to `mesh-demo`, which looks for them there.
const BINARIES: [&str; 4] = ["mesh-demo", "mesh-control", "mesh-agent", "meshctl"];

pub(crate) fn run(args: &Args) -> anyhow::Result<()> {
    if !args.check {
        setup::run()?;
    }
    // `--check` (the test run) uses the debug build CI has already made; the
    // interactive demo a release build.
    let profile = if args.check { "debug" } else { "release" };
    let mut build = Command::new("cargo");
    build.args(["build", "--quiet"]);
    if !args.check {
        build.arg("--release");
    }
    for b in BINARIES {
        build.args(["-p", b]);
    }
    cmd::run(&mut build)?;
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map_or_else(|| cmd::workspace_root().join("target"), std::path::PathBuf::from);
    let mut demo = Command::new(target.join(profile).join("mesh-demo"));
    if args.check {
        demo.arg("--check");
    }
    cmd::run(&mut demo)
}
