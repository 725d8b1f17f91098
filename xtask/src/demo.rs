//! `cargo xtask demo`: set-up, build, and run the demo lab (`mesh-demo`).

use std::path::Path;
use std::process::Command;

use anyhow::{Context as _, bail};

use crate::{cmd, setup};

/// Options of `cargo xtask demo`.
#[derive(clap::Args, Debug)]
pub(crate) struct Args {
    /// Run non-interactively, check every expectation, exit non-zero if one
    /// fails (part of `cargo xtask test`).
    #[arg(long)]
    pub(crate) check: bool,
    /// Run mesh-control, mesh-agent, mesh-relay and meshctl as installed from the
    /// Debian packages in DIR (what `cargo xtask dist` writes) instead of
    /// the build's; `cargo xtask test` runs its demo check this way.
    #[arg(long, value_name = "DIR")]
    pub(crate) packages: Option<std::path::PathBuf>,
}

/// The binaries the demo runs: the shipped ones, built in the demo's
/// profile next to `mesh-demo`, which looks for them there.
const BINARIES: [&str; 5] = ["mesh-demo", "mesh-control", "mesh-agent", "meshctl", "mesh-relay"];

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
    if let Some(debs) = &args.packages {
        let root = target.join("demo-packages");
        install(debs, &root)?;
        demo.env("MESH_BIN_DIR", root.join("usr/bin"));
    }
    cmd::run(&mut demo)
}

/// Unpacks every `.deb` in `debs` into `root` (emptied first): the files
/// the packages install, at their installed paths under `root`.
fn install(debs: &Path, root: &Path) -> anyhow::Result<()> {
    let _ = std::fs::remove_dir_all(root);
    std::fs::create_dir_all(root)?;
    let mut found = 0;
    for entry in std::fs::read_dir(debs).with_context(|| format!("reading {}", debs.display()))? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "deb") {
            cmd::run(Command::new("dpkg-deb").arg("-x").arg(&path).arg(root))?;
            found += 1;
        }
    }
    if found == 0 {
        bail!("no .deb in {} (cargo xtask dist writes them)", debs.display());
    }
    Ok(())
}
