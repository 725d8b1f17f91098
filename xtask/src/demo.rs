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

pub(crate) fn run(args: &Args) -> anyhow::Result<()> {
    if !args.check {
        setup::run()?;
    }
    let mut command = Command::new("cargo");
    command.args(["run", "--quiet", "-p", "mesh-demo"]);
    if args.check {
        // The test run's debug build: no second, release build of everything.
        command.args(["--", "--check"]);
    } else {
        command.args(["--release", "--"]);
    }
    cmd::run(&mut command)
}
