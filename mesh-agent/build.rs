//! Builds the eBPF programs (mesh-ebpf) for the BPF target with aya-build and
//! leaves the object in OUT_DIR, where `include_bytes_aligned!` embeds it.
//!
//! Each feature resolution of mesh-agent (a `cargo build`, a `cargo test` of
//! another package set, nextest, the dist stage) gets its own build-script
//! OUT_DIR, and aya-build keeps its nested cargo's target directory inside
//! it: every one of them rebuilt `core` and the programs from scratch (over
//! a minute each, three times in `cargo xtask test`). The nested target
//! directory is therefore a link to one directory per profile
//! (`<target>/<profile>/mesh-ebpf-build`), where the nested cargo is
//! incremental and takes a lock when two builds run at once.
use std::path::{Path, PathBuf};

use anyhow::{Context as _, anyhow};

/// The nested target directory aya-build 0.2 uses for `package`.
fn aya_target_dir(out_dir: &Path, package: &str) -> PathBuf {
    out_dir.join("aya-build").join("target").join(package)
}

/// Points this OUT_DIR's nested target directory at the shared one.
fn share_target_dir(out_dir: &Path, package: &str) -> anyhow::Result<()> {
    // OUT_DIR is <target>/<profile>/build/mesh-agent-<hash>/out.
    let profile_dir = out_dir.ancestors().nth(3).context("OUT_DIR is not <profile>/build/<unit>/out")?;
    let shared = profile_dir.join("mesh-ebpf-build");
    std::fs::create_dir_all(&shared).with_context(|| format!("creating {}", shared.display()))?;
    let link = aya_target_dir(out_dir, package);
    if link.symlink_metadata().is_ok() {
        return Ok(());
    }
    let parent = link.parent().context("no parent")?;
    std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    std::os::unix::fs::symlink(&shared, &link).with_context(|| format!("linking {}", link.display()))
}

fn main() -> anyhow::Result<()> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../mesh-ebpf");
    let root = root.to_str().ok_or_else(|| anyhow!("non-UTF-8 path {}", root.display()))?;
    let out_dir = PathBuf::from(std::env::var_os("OUT_DIR").context("OUT_DIR not set")?);
    share_target_dir(&out_dir, "mesh-ebpf")?;
    let package = aya_build::Package { name: "mesh-ebpf", root_dir: root, ..Default::default() };
    aya_build::build_ebpf([package], aya_build::Toolchain::default()).context(
        "building the eBPF programs (needs the nightly toolchain with rust-src and bpf-linker 0.10.2: run `cargo xtask setup`)",
    )
}
