//! `cargo xtask setup`: installs what the build and the tests need, and only
//! what is missing. Prints each thing it installs; fails naming what could
//! not be installed.

use std::process::Command;

use anyhow::{Context as _, bail};

use crate::cmd::{self, probe};

/// Debian packages the tests, demo and benchmarks use.
const DEBIAN_PACKAGES: &[&str] = &[
    "iproute2",                // ip, tc: the lab and the checks
    "iputils-ping",            // ping through tunnels and policies
    "procps",                  // sysctl inside lab namespaces
    "nftables",                // deploy/nftables checks; the nftables baselines of the acl/guard benchmarks
    "iperf3",                  // throughput benchmarks and traffic in tests
    "wireguard-tools",         // `wg show` against our UAPI socket
    "wireguard-go",            // a peer engine in the tunnel benchmark
    "tcpdump",                 // debugging captures
    "postgresql",              // the control plane's PostgreSQL store tests
    "prometheus",              // promtool checks the metrics output
    "qemu-system-x86",         // the VM with a WireGuard kernel
    "linux-image-cloud-amd64", // that kernel (6.1, WireGuard as a module)
    "busybox-static",          // the VM's initramfs userland
    "podman",                  // `cargo xtask dist`: the OCI images
    "buildah",                 // podman build's engine
    "systemd",                 // systemd-analyze verify / security on the units
    "chromium",                // the demo's check of control's topology page, headless
    "chromium-driver",         // chromedriver: the demo drives chromium over WebDriver
];

/// The bpf-linker that works with nightly's LLVM here (0.11+ needs a system
/// LLVM 21 that Debian 12 does not ship).
const BPF_LINKER_VERSION: &str = "0.10.2";

/// Installs everything that is missing.
pub(crate) fn run() -> anyhow::Result<()> {
    nightly_rust_src()?;
    bpf_linker()?;
    debian_packages()?;
    nextest()?;
    cargo_fuzz()?;
    node()?;
    python_grpc()?;
    cargo_deb()?;
    eprintln!("xtask: setup complete");
    Ok(())
}

fn nightly_rust_src() -> anyhow::Result<()> {
    let Some(toolchains) = probe("rustup", &["toolchain", "list"]) else {
        bail!("rustup is not on PATH: the eBPF programs need `rustup run nightly` (install rustup first)");
    };
    if !toolchains.lines().any(|l| l.starts_with("nightly")) {
        eprintln!("xtask: installing the nightly toolchain (eBPF programs need -Z build-std)");
        cmd::run(Command::new("rustup").args(["toolchain", "install", "nightly", "--profile", "minimal"]))
            .context("installing the nightly toolchain")?;
    }
    let installed =
        probe("rustup", &["component", "list", "--installed", "--toolchain", "nightly"]).unwrap_or_default();
    if !installed.lines().any(|l| l.starts_with("rust-src")) {
        eprintln!("xtask: installing rust-src for nightly (build-std=core for the BPF target)");
        cmd::run(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]))
            .context("adding rust-src to nightly")?;
    }
    Ok(())
}

fn bpf_linker() -> anyhow::Result<()> {
    cargo_tool("bpf-linker", BPF_LINKER_VERSION, "bpf-linker", &["--version"])
}

fn debian_packages() -> anyhow::Result<()> {
    let missing: Vec<&str> = DEBIAN_PACKAGES.iter().copied().filter(|p| !dpkg_installed(p)).collect();
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("xtask: installing Debian packages: {}", missing.join(" "));
    if !nix_is_root() {
        bail!("Debian packages missing ({}) and not root: run `sudo cargo xtask setup`", missing.join(" "));
    }
    cmd::run(Command::new("apt-get").args(["update", "-q"]).env("DEBIAN_FRONTEND", "noninteractive"))
        .context("apt-get update")?;
    cmd::run(
        Command::new("apt-get")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
    .with_context(|| format!("installing {}", missing.join(" ")))?;
    let still: Vec<&str> = missing.into_iter().filter(|p| !dpkg_installed(p)).collect();
    if !still.is_empty() {
        bail!("apt-get did not install: {}", still.join(" "));
    }
    Ok(())
}

/// The peer WireGuard engines the `tunnel` benchmark compares against
/// (crate, version, the binary it installs). Built from crates.io.
const BENCH_ENGINES: &[(&str, &str, &str)] =
    &[("boringtun-cli", "0.7.1", "boringtun-cli"), ("gotatun-cli", "0.10.2", "gotatun")];

/// Installs what the benchmarks need beyond the tests' set-up.
pub(crate) fn bench_tools() -> anyhow::Result<()> {
    for (krate, version, binary) in BENCH_ENGINES {
        cargo_tool(krate, version, binary, &["--version"])?;
    }
    Ok(())
}

fn nextest() -> anyhow::Result<()> {
    if probe("cargo", &["nextest", "--version"]).is_some() {
        return Ok(());
    }
    eprintln!("xtask: installing cargo-nextest (the test runner)");
    cmd::run(Command::new("cargo").args(["install", "cargo-nextest", "--locked"])).context("installing cargo-nextest")
}

/// The cargo-fuzz the fuzz stage was written against.
const CARGO_FUZZ_VERSION: &str = "0.13.2";

/// cargo-fuzz, for the fuzz stage (its targets build on nightly).
fn cargo_fuzz() -> anyhow::Result<()> {
    cargo_tool("cargo-fuzz", CARGO_FUZZ_VERSION, "cargo", &["fuzz", "--version"])
}

/// node and npm, for the offline validation of the Kubernetes manifests
/// (`deploy/k8s/validate`). Debian's when there is none: a node from
/// elsewhere (with its own npm) is kept, and installing Debian's npm beside
/// it would conflict.
fn node() -> anyhow::Result<()> {
    if probe("node", &["--version"]).is_some() && probe("npm", &["--version"]).is_some() {
        return Ok(());
    }
    eprintln!("xtask: installing node and npm (Debian's nodejs, npm)");
    cmd::run(Command::new("apt-get").args(["update", "-q"]).env("DEBIAN_FRONTEND", "noninteractive"))
        .context("apt-get update")?;
    cmd::run(
        Command::new("apt-get")
            .args(["install", "-y", "-q", "--no-install-recommends", "nodejs", "npm"])
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
    .context("installing nodejs and npm")
}

/// The generic gRPC client of control's reflection test
/// (mesh-control/tests/generic_client.py): Python grpcio with
/// grpcio-reflection, from PyPI.
const PYTHON_GRPC: &[&str] = &["grpcio==1.85.3", "grpcio-reflection==1.85.1", "protobuf==7.36.2"];

fn python_grpc() -> anyhow::Result<()> {
    let want = PYTHON_GRPC[0].trim_start_matches("grpcio==");
    let found = probe(
        "python3",
        &["-c", "import grpc, grpc_reflection.v1alpha.proto_reflection_descriptor_database; print(grpc.__version__)"],
    )
    .unwrap_or_default();
    if found.trim() == want {
        return Ok(());
    }
    eprintln!("xtask: installing {} from PyPI (found grpcio {:?})", PYTHON_GRPC.join(" "), found.trim());
    cmd::run(
        Command::new("python3")
            .args(["-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--root-user-action=ignore"])
            .args(PYTHON_GRPC),
    )
    .context("installing Python grpcio and grpcio-reflection (python3 -m pip)")
}

/// The cargo-deb `cargo xtask dist` was written against (its
/// `[package.metadata.deb]` keys, its `systemd-units` scripts).
const CARGO_DEB_VERSION: &str = "3.8.0";

/// cargo-deb, for the Debian packages of `cargo xtask dist`.
fn cargo_deb() -> anyhow::Result<()> {
    cargo_tool("cargo-deb", CARGO_DEB_VERSION, "cargo", &["deb", "--version"])
}

/// Installs `krate` at `version` from crates.io (`--locked`) unless
/// `program probe_args` already prints that version.
fn cargo_tool(krate: &str, version: &str, program: &str, probe_args: &[&str]) -> anyhow::Result<()> {
    let found = probe(program, probe_args).unwrap_or_default();
    if found.split_whitespace().any(|w| w == version) {
        return Ok(());
    }
    eprintln!("xtask: installing {krate} {version} (found: {:?})", found.trim());
    cmd::run(Command::new("cargo").args(["install", &format!("{krate}@{version}"), "--locked", "--force"]))
        .with_context(|| format!("installing {krate}"))
}

fn dpkg_installed(package: &str) -> bool {
    probe("dpkg-query", &["-W", "-f=${Status}", package]).is_some_and(|s| s.contains("install ok installed"))
}

fn nix_is_root() -> bool {
    probe("id", &["-u"]).is_some_and(|s| s.trim() == "0")
}
