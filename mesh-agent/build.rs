//! Builds the eBPF programs (mesh-ebpf) for the BPF target with aya-build and
//! leaves the object in OUT_DIR, where `include_bytes_aligned!` embeds it.
use anyhow::{Context as _, anyhow};

fn main() -> anyhow::Result<()> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../mesh-ebpf");
    let root = root.to_str().ok_or_else(|| anyhow!("non-UTF-8 path {}", root.display()))?;
    let package = aya_build::Package { name: "mesh-ebpf", root_dir: root, ..Default::default() };
    aya_build::build_ebpf([package], aya_build::Toolchain::default()).context(
        "building the eBPF programs (needs the nightly toolchain with rust-src and bpf-linker 0.10.2: run `cargo xtask setup`)",
    )
}
