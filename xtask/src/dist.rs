//! `cargo xtask dist`: the release artifacts (issue #16), and the `dist`
//! stage of `cargo xtask test` that checks them (docs/packaging.md).
//!
//! Artifacts, all in one output directory (`dist/` by default):
//! - `mesh-agent-<v>-x86_64-linux.tar.gz` (mesh-agent, meshctl, unit,
//!   default config, README) and `mesh-control-<v>-x86_64-linux.tar.gz`
//!   (mesh-control, meshctl, unit, default config, README);
//! - the two Debian packages, made by cargo-deb from the crates'
//!   `[package.metadata.deb]`;
//! - two OCI images (`oci-archive`), FROM scratch with the binary and exactly
//!   the shared libraries it links (see [`image`] for why not static);
//! - `SHA256SUMS` over all of them.
//!
//! The stage builds with `--profile dev`: it packages the debug build that
//! the test run has already made (`cargo build --all-targets`), so it
//! compiles nothing.

use std::{
    fmt::Write as _,
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{Context as _, bail, ensure};

use crate::{cmd, setup};

/// `systemd-analyze security` exposure each unit must stay at or under
/// (0 is best, 10 worst). Measured: agent 2.8, control 1.2, relay 1.2 (docs/packaging.md);
/// the margin only absorbs a systemd version's reweighting.
const MAX_EXPOSURE: &[(&str, f64)] =
    &[("mesh-agent.service", 3.2), ("mesh-control.service", 1.5), ("mesh-relay.service", 1.5)];

/// Options of `cargo xtask dist`.
#[derive(clap::Args, Debug)]
pub(crate) struct Args {
    /// Cargo profile of the binaries: `release`, or `dev` to package the
    /// debug build as it is (what the test stage does: no compile).
    #[arg(long, default_value = "release")]
    profile: String,
    /// Output directory.
    #[arg(long, default_value = "dist")]
    out: PathBuf,
    /// Then check the artifacts as the test stage does.
    #[arg(long)]
    check: bool,
}

/// The two products: the Debian package / tarball / image name, its binary
/// and default config, and what else its tarball carries.
#[derive(Debug)]
struct Product {
    name: &'static str,
    config: &'static str,
    /// The image's CMD after the binary.
    cmd: &'static [&'static str],
}

const PRODUCTS: &[Product] = &[
    Product { name: "mesh-agent", config: "agent.toml", cmd: &["run", "--config", "/etc/mesh/agent.toml"] },
    Product { name: "mesh-control", config: "control.toml", cmd: &["serve", "--config", "/etc/mesh/control.toml"] },
];

/// `cargo xtask dist`: set-up, then the artifacts (and the check if asked).
pub(crate) fn main(args: &Args) -> anyhow::Result<()> {
    setup::run()?;
    let started = Instant::now();
    let out = cmd::workspace_root().join(&args.out);
    build(&args.profile, &out)?;
    if args.check {
        verify(&out)?;
    }
    eprintln!("xtask: dist took {:.0?}", started.elapsed());
    Ok(())
}

/// Where the test stage writes its artifacts (relative to the workspace);
/// the demo check then runs the packages' binaries from there.
pub(crate) const CHECK_OUT: &str = "target/dist-check/out";

/// The test stage: dev artifacts under `target/dist-check`, then the checks.
pub(crate) fn check() -> anyhow::Result<()> {
    let started = Instant::now();
    let out = cmd::workspace_root().join(CHECK_OUT);
    let result = build("dev", &out).and_then(|()| verify(&out));
    eprintln!("xtask: dist stage took {:.0?}", started.elapsed());
    if result.is_ok() {
        // Some 300 MB of staging, install root and unpacked images; kept
        // after a failure, to look at.
        let _ = std::fs::remove_dir_all(work_dir());
    }
    result
}

/// Scratch space of a run (staging, podman storage, the install root).
fn work_dir() -> PathBuf {
    cmd::workspace_root().join("target/dist-work")
}

fn profile_dir(profile: &str) -> &str {
    if profile == "dev" { "debug" } else { profile }
}

/// Builds every artifact into `out` (emptied first).
fn build(profile: &str, out: &Path) -> anyhow::Result<()> {
    let root = cmd::workspace_root();
    let version = workspace_version()?;
    let mut cargo = Command::new("cargo");
    if profile == "dev" {
        // Exactly the build `cargo xtask test` has made, so a no-op there:
        // building only the four packages would resolve other features
        // (control without bench's `test-support`) and recompile and relink
        // them. Such binaries are fine for a check, never for a release.
        cargo.args(["build", "--all-targets"]);
    } else {
        // The four packages alone: control without `test-support`.
        cargo.args(["build", "--profile", profile, "-p", "mesh-agent", "-p", "mesh-control", "-p", "meshctl"]);
        cargo.args(["-p", "mesh-relay", "--bin", "mesh-agent", "--bin", "mesh-control", "--bin", "meshctl"]);
        cargo.args(["--bin", "mesh-relay"]);
    }
    cmd::run(&mut cargo)?;
    let work = work_dir();
    reset_dir(&work)?;
    reset_dir(out)?;

    // Stripped copies: the tarballs and images ship no debug info (the
    // release profile keeps some for profiling), which also makes them a
    // fifth the size.
    let bin = work.join("bin");
    std::fs::create_dir_all(&bin)?;
    for name in ["mesh-agent", "mesh-control", "meshctl"] {
        let built = root.join("target").join(profile_dir(profile)).join(name);
        cmd::run(Command::new("strip").arg("--strip-debug").arg("-o").arg(bin.join(name)).arg(&built))?;
    }

    let mut files = Vec::new();
    for p in PRODUCTS {
        files.push(tarball(p, &version, &bin, &work, out)?);
    }
    files.extend(debs(profile, out)?);
    for p in PRODUCTS {
        files.push(image::build(p, &version, &bin, &work, out)?);
    }
    let names: Vec<String> =
        files.iter().map(|f| f.file_name().expect("a file").to_string_lossy().into_owned()).collect();
    let sums = cmd::output(Command::new("sha256sum").args(&names).current_dir(out))?;
    std::fs::write(out.join("SHA256SUMS"), sums)?;
    for f in files.iter().chain([&out.join("SHA256SUMS")]) {
        eprintln!("xtask: dist: {} ({:.1} MB)", f.display(), mb(f)?);
    }
    Ok(())
}

fn mb(f: &Path) -> anyhow::Result<f64> {
    #[expect(clippy::cast_precision_loss, reason = "a size for people to read")]
    Ok(std::fs::metadata(f)?.len() as f64 / 1e6)
}

fn reset_dir(dir: &Path) -> anyhow::Result<()> {
    match std::fs::remove_dir_all(dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(e).with_context(|| format!("removing {}", dir.display()));
        }
        _ => {}
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))
}

/// The workspace's version (every crate inherits it).
fn workspace_version() -> anyhow::Result<String> {
    let meta = cmd::output(Command::new("cargo").args(["metadata", "--no-deps", "--format-version", "1"]))?;
    let meta: serde_json::Value = serde_json::from_str(&meta)?;
    meta["packages"]
        .as_array()
        .and_then(|ps| ps.iter().find(|p| p["name"] == "mesh-agent"))
        .and_then(|p| p["version"].as_str())
        .map(str::to_owned)
        .context("no mesh-agent version in cargo metadata")
}

fn tarball_name(p: &Product, version: &str) -> String {
    format!("{}-{version}-x86_64-linux", p.name)
}

/// `<name>-<v>-x86_64-linux.tar.gz`, one directory of that name inside.
fn tarball(p: &Product, version: &str, bin: &Path, work: &Path, out: &Path) -> anyhow::Result<PathBuf> {
    let root = cmd::workspace_root();
    let name = tarball_name(p, version);
    let dir = work.join("tar").join(&name);
    std::fs::create_dir_all(&dir)?;
    for b in [p.name, "meshctl"] {
        std::fs::copy(bin.join(b), dir.join(b))?;
    }
    let unit = format!("{}.service", p.name);
    std::fs::copy(root.join("deploy/systemd").join(&unit), dir.join(&unit))?;
    std::fs::copy(root.join("deploy/config").join(p.config), dir.join(p.config))?;
    std::fs::write(dir.join("README"), tarball_readme(p, version))?;
    let file = out.join(format!("{name}.tar.gz"));
    // Owner and times fixed: the same inputs give the same archive.
    cmd::run(
        Command::new("tar")
            .args(["--sort=name", "--owner=0", "--group=0", "--numeric-owner", "--mtime=@0", "-czf"])
            .arg(&file)
            .arg("-C")
            .arg(dir.parent().expect("under tar/"))
            .arg(&name),
    )?;
    Ok(file)
}

fn tarball_readme(p: &Product, version: &str) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "{} {version} for x86_64 Linux (glibc 2.36 or later: Debian 12, Ubuntu 22.04+).\n", p.name);
    let _ = writeln!(s, "Installed layout (what the .deb does; see docs/packaging.md):\n");
    let _ = writeln!(s, "  install -m 0755 {} meshctl /usr/bin/", p.name);
    let _ = writeln!(s, "  install -D -m 0640 {} /etc/mesh/{}", p.config, p.config);
    let _ = writeln!(s, "  install -m 0644 {}.service /usr/lib/systemd/system/", p.name);
    if p.name == "mesh-control" {
        let _ = writeln!(s, "  useradd --system --user-group --no-create-home --shell /usr/sbin/nologin mesh");
        let _ = writeln!(s, "  chgrp mesh /etc/mesh/control.toml");
    } else {
        let _ = writeln!(s, "  # edit /etc/mesh/agent.toml (control.address is a placeholder), then");
        let _ = writeln!(s, "  # write the enrollment key to /etc/mesh/enroll.key, mode 0600");
    }
    let _ = writeln!(s, "  systemctl daemon-reload && systemctl enable --now {}", p.name);
    s
}

/// The Debian packages, with cargo-deb from the binaries already built.
fn debs(profile: &str, out: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for p in PRODUCTS {
        let mut c = Command::new("cargo");
        c.args(["deb", "--no-build", "--strip", "--profile", profile, "-p", p.name, "--output"]).arg(out);
        if profile == "dev" {
            // The check's packages are thrown away: gzip is ten times
            // faster than xz on a 40 MB binary.
            c.args(["--fast", "--quiet"]);
        }
        // cargo-deb prints the package's path.
        let said = cmd::output(&mut c)?;
        let deb = said.lines().rfind(|l| l.ends_with(".deb")).context("cargo deb named no package")?;
        files.push(PathBuf::from(deb.trim()));
    }
    Ok(files)
}

/// The images: FROM scratch, the binary, the libraries `ldd` names and the
/// default config; built with podman in storage of its own under target/.
///
/// Not static binaries: a static glibc build is a second full compile of
/// the workspace with other RUSTFLAGS (twice CI's compile time), and musl
/// would change the allocator and DNS behaviour from what the tests ran.
/// Not a debootstrap base: nothing but the loader and four libraries is
/// used. No CA bundle: control makes its own CA and agents pin it.
mod image {
    use super::*;

    pub(super) fn file_name(p: &Product, version: &str) -> String {
        format!("{}-{version}-x86_64-linux.oci.tar", p.name)
    }

    /// podman with its storage under `target/dist-work/podman` (vfs: no
    /// overlay mounts to leave behind), never the machine's.
    fn podman(work: &Path) -> Command {
        let store = work.join("podman");
        let mut c = Command::new("podman");
        c.arg("--root").arg(store.join("root")).arg("--runroot").arg(store.join("run"));
        c.args(["--storage-driver", "vfs", "--cgroup-manager", "cgroupfs", "--events-backend", "none"]);
        c
    }

    pub(super) fn build(p: &Product, version: &str, bin: &Path, work: &Path, out: &Path) -> anyhow::Result<PathBuf> {
        let ctx = work.join("image").join(p.name);
        let rootfs = ctx.join("rootfs");
        let target = rootfs.join("usr/bin").join(p.name);
        std::fs::create_dir_all(target.parent().expect("usr/bin"))?;
        std::fs::copy(bin.join(p.name), &target)?;
        for lib in libraries(&target)? {
            let dest = rootfs.join(lib.strip_prefix("/")?);
            std::fs::create_dir_all(dest.parent().expect("a library directory"))?;
            // The file, not the symlink ldd named.
            std::fs::copy(&lib, &dest).with_context(|| format!("copying {}", lib.display()))?;
        }
        let config = rootfs.join("etc/mesh").join(p.config);
        std::fs::create_dir_all(config.parent().expect("etc/mesh"))?;
        std::fs::copy(cmd::workspace_root().join("deploy/config").join(p.config), config)?;
        let cmd_json = serde_json::to_string(p.cmd)?;
        std::fs::write(
            ctx.join("Containerfile"),
            format!(
                "FROM scratch\nCOPY rootfs/ /\nENTRYPOINT [\"/usr/bin/{}\"]\nCMD {cmd_json}\n\
                 LABEL org.opencontainers.image.title=\"{}\" org.opencontainers.image.version=\"{version}\"\n",
                p.name, p.name
            ),
        )?;
        let tag = format!("localhost/{}:{version}", p.name);
        cmd::run(
            podman(work)
                .args(["build", "--quiet", "--format", "oci", "--network", "none", "--timestamp", "0", "-t", &tag])
                .arg("-f")
                .arg(ctx.join("Containerfile"))
                .arg(&ctx),
        )?;
        let file = out.join(file_name(p, version));
        cmd::run(podman(work).args(["save", "--quiet", "--format", "oci-archive", "-o"]).arg(&file).arg(&tag))?;
        // The storage is only a means to the archive.
        let _ = std::fs::remove_dir_all(work.join("podman"));
        Ok(file)
    }

    /// The shared libraries `ldd` resolves for `binary`, the loader included.
    fn libraries(binary: &Path) -> anyhow::Result<Vec<PathBuf>> {
        let text = cmd::output(Command::new("ldd").arg(binary))?;
        let mut libs = Vec::new();
        for line in text.lines() {
            // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)" or
            // "/lib64/ld-linux-x86-64.so.2 (0x...)"; the vDSO has no file.
            let path = line.split("=>").last().unwrap_or_default().split_whitespace().next().unwrap_or_default();
            if path.starts_with('/') {
                libs.push(PathBuf::from(path));
            } else if !line.contains("linux-vdso") {
                bail!("ldd {}: unexpected line {line:?}", binary.display());
            }
        }
        ensure!(libs.iter().any(|l| l.to_string_lossy().contains("ld-linux")), "ldd named no loader: {text}");
        Ok(libs)
    }

    /// Unpacks an `oci-archive` image's layers into `rootfs` (the archive
    /// as shipped, not podman's copy of it).
    pub(super) fn unpack(archive: &Path, dir: &Path) -> anyhow::Result<PathBuf> {
        let layout = dir.join("layout");
        let rootfs = dir.join("rootfs");
        std::fs::create_dir_all(&layout)?;
        std::fs::create_dir_all(&rootfs)?;
        cmd::run(Command::new("tar").arg("-xf").arg(archive).arg("-C").arg(&layout))?;
        let blob = |digest: &str| -> anyhow::Result<PathBuf> {
            let (alg, hex) = digest.split_once(':').context("a digest")?;
            Ok(layout.join("blobs").join(alg).join(hex))
        };
        let json = |path: PathBuf| -> anyhow::Result<serde_json::Value> {
            Ok(serde_json::from_str(&std::fs::read_to_string(&path).with_context(|| path.display().to_string())?)?)
        };
        let index = json(layout.join("index.json"))?;
        let digest = index["manifests"][0]["digest"].as_str().context("index.json names no manifest")?;
        let manifest = json(blob(digest)?)?;
        let layers = manifest["layers"].as_array().context("manifest without layers")?;
        for l in layers {
            let digest = l["digest"].as_str().context("layer without digest")?;
            // GNU tar recognises gzip or plain by itself.
            cmd::run(Command::new("tar").arg("-xf").arg(blob(digest)?).arg("-C").arg(&rootfs))?;
        }
        Ok(rootfs)
    }
}

/// The checks of the stage on the artifacts in `out`.
fn verify(out: &Path) -> anyhow::Result<()> {
    let version = workspace_version()?;
    cmd::run(Command::new("sha256sum").args(["--check", "--strict", "--quiet", "SHA256SUMS"]).current_dir(out))
        .context("SHA256SUMS does not verify")?;
    for p in PRODUCTS {
        check_tarball(p, &version, out)?;
    }
    let root = work_dir().join("root");
    install_debs(out, &root)?;
    check_layout(&root)?;
    check_units(&root)?;
    for p in PRODUCTS {
        let dir = work_dir().join("unpacked").join(p.name);
        let rootfs = image::unpack(&out.join(image::file_name(p, &version)), &dir)?;
        let said =
            cmd::output(Command::new("chroot").arg(&rootfs).arg(format!("/usr/bin/{}", p.name)).arg("--version"))
                .with_context(|| format!("{} --version in its image's root filesystem", p.name))?;
        ensure!(said.trim() == format!("{} {version}", p.name), "{} image: --version said {said:?}", p.name);
        eprintln!("xtask: dist: image {}: `{}`", p.name, said.trim());
    }
    eprintln!("xtask: dist: artifacts in {} check out", out.display());
    Ok(())
}

fn check_tarball(p: &Product, version: &str, out: &Path) -> anyhow::Result<()> {
    let name = tarball_name(p, version);
    let list = cmd::output(Command::new("tar").arg("-tzf").arg(out.join(format!("{name}.tar.gz"))))?;
    let mut got: Vec<&str> = list.lines().collect();
    got.sort_unstable();
    let mut want: Vec<String> = [
        String::new(),
        "README".into(),
        "meshctl".into(),
        p.name.into(),
        p.config.into(),
        format!("{}.service", p.name),
    ]
    .iter()
    .map(|f| format!("{name}/{f}"))
    .collect();
    want.sort_unstable();
    ensure!(got == want, "{name}.tar.gz holds {got:?}, expected {want:?}");
    Ok(())
}

/// Installs both packages into `root` with the real dpkg, maintainer
/// scripts included: `--root` with a dpkg database of its own, scripts run
/// outside a chroot (`--force-script-chrootless`, with `DPKG_ROOT` set, which
/// our postinsts and deb-systemd-helper honour). The host must be left
/// untouched: its passwd and systemd state are compared before and after.
fn install_debs(out: &Path, root: &Path) -> anyhow::Result<()> {
    reset_dir(root)?;
    for d in ["var/lib/dpkg/info", "var/lib/dpkg/updates", "var/lib/dpkg/triggers", "etc", "usr/sbin"] {
        std::fs::create_dir_all(root.join(d))?;
    }
    for f in ["var/lib/dpkg/status", "var/lib/dpkg/available"] {
        std::fs::write(root.join(f), "")?;
    }
    // The accounts files useradd --prefix edits; login.defs for its ranges.
    std::fs::write(root.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n")?;
    std::fs::write(root.join("etc/group"), "root:x:0:\n")?;
    std::fs::write(root.join("etc/shadow"), "root:*:19000:0:99999:7:::\n")?;
    std::fs::write(root.join("etc/gshadow"), "root:*::\n")?;
    std::fs::copy("/etc/login.defs", root.join("etc/login.defs"))?;

    let host_before = host_state()?;
    let debs: Vec<PathBuf> = std::fs::read_dir(out)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "deb"))
        .collect();
    ensure!(debs.len() == 2, "expected two .deb in {}, found {debs:?}", out.display());
    cmd::run(
        Command::new("dpkg")
            .arg(format!("--root={}", root.display()))
            .arg("--log=/dev/null")
            // libc6 is not in the scratch database; the postinsts' tools
            // (useradd, awk) are the host's.
            .args(["--force-script-chrootless", "--force-depends", "--force-not-root", "--install"])
            .args(&debs),
    )
    .context("installing the .deb into a scratch root")?;
    ensure!(
        host_state()? == host_before,
        "installing into the scratch root changed the host's accounts or systemd state"
    );
    Ok(())
}

/// What a stray maintainer script would change on the host.
fn host_state() -> anyhow::Result<Vec<String>> {
    let mut state = Vec::new();
    for f in ["/etc/passwd", "/etc/group"] {
        state.push(std::fs::read_to_string(f)?);
    }
    for d in ["/etc/systemd/system/multi-user.target.wants", "/var/lib/systemd/deb-systemd-helper-enabled"] {
        let mut names: Vec<String> = std::fs::read_dir(d)
            .map(|r| r.filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned())).collect())
            .unwrap_or_default();
        names.sort_unstable();
        state.extend(names);
    }
    Ok(state)
}

/// Files at the documented layout, with their modes and owners; conffiles
/// registered; the `mesh` user made once.
fn check_layout(root: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::MetadataExt as _;
    let passwd = std::fs::read_to_string(root.join("etc/passwd"))?;
    let mesh: Vec<&str> = passwd
        .lines()
        .find(|l| l.starts_with("mesh:"))
        .context("the postinst made no `mesh` user")?
        .split(':')
        .collect();
    let (uid, gid): (u32, u32) = (mesh[2].parse()?, mesh[3].parse()?);
    ensure!(uid < 1000 && mesh[6] == "/usr/sbin/nologin", "mesh is not a system user: {mesh:?}");
    let expect: &[(&str, u32, u32, u32)] = &[
        ("usr/bin/mesh-agent", 0o100_755, 0, 0),
        ("usr/bin/mesh-control", 0o100_755, 0, 0),
        ("usr/bin/meshctl", 0o100_755, 0, 0),
        ("usr/bin/mesh-relay", 0o100_755, 0, 0),
        ("etc/mesh/agent.toml", 0o100_640, 0, 0),
        ("etc/mesh/relay.toml", 0o100_644, 0, 0),
        ("usr/lib/systemd/system/mesh-relay.service", 0o100_644, 0, 0),
        ("etc/mesh/control.toml", 0o100_640, 0, gid),
        ("usr/lib/systemd/system/mesh-agent.service", 0o100_644, 0, 0),
        ("usr/lib/systemd/system/mesh-control.service", 0o100_644, 0, 0),
        ("var/lib/mesh-control", 0o040_700, uid, gid),
    ];
    for (path, mode, owner, group) in expect {
        let m = std::fs::symlink_metadata(root.join(path)).with_context(|| format!("/{path} not installed"))?;
        ensure!(
            (m.mode(), m.uid(), m.gid()) == (*mode, *owner, *group),
            "/{path}: mode {:o} owner {}:{}, expected {mode:o} {owner}:{group}",
            m.mode(),
            m.uid(),
            m.gid()
        );
    }
    for (package, conffile) in [
        ("mesh-agent", "/etc/mesh/agent.toml"),
        ("mesh-control", "/etc/mesh/control.toml"),
        ("mesh-control", "/etc/mesh/relay.toml"),
    ] {
        let c = cmd::output(Command::new("dpkg-query").arg(format!("--root={}", root.display())).args([
            "-W",
            "-f=${Conffiles}",
            package,
        ]))?;
        ensure!(c.lines().any(|l| l.trim_start().starts_with(conffile)), "{package}: {conffile} is no conffile: {c:?}");
    }
    // enable = false: installed, not enabled (the agent's config needs editing first).
    ensure!(
        !root.join("etc/systemd/system/multi-user.target.wants").exists(),
        "the packages enabled a unit on install"
    );
    // A second configure (an upgrade, a reconfigure) must neither fail nor
    // make a second user: run the postinst as dpkg would then.
    cmd::run(
        Command::new(root.join("var/lib/dpkg/info/mesh-control.postinst"))
            .args(["configure", "0.0.0"])
            .env("DPKG_ROOT", root)
            // What dpkg sets; deb-systemd-helper refuses to run without it.
            .env("DPKG_MAINTSCRIPT_PACKAGE", "mesh-control")
            .env("DPKG_MAINTSCRIPT_NAME", "postinst"),
    )?;
    let passwd = std::fs::read_to_string(root.join("etc/passwd"))?;
    ensure!(passwd.lines().filter(|l| l.starts_with("mesh:")).count() == 1, "the postinst is not idempotent");
    Ok(())
}

/// `systemd-analyze verify` of the installed units (against the installed
/// binaries, via `--root`), and their exposure scores.
fn check_units(root: &Path) -> anyhow::Result<()> {
    for (unit, max) in MAX_EXPOSURE {
        let installed = root.join("usr/lib/systemd/system").join(unit);
        let out = Command::new("systemd-analyze")
            .arg(format!("--root={}", root.display()))
            .args(["verify", "--man=no", "--recursive-errors=no"])
            .arg(&installed)
            .output()?;
        // verify exits 0 on some warnings: any output is a finding.
        let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        ensure!(out.status.success() && said.trim().is_empty(), "systemd-analyze verify {unit}:\n{said}");
        let report = cmd::output(
            Command::new("systemd-analyze")
                .arg(format!("--root={}", root.display()))
                .args(["security", "--offline=yes", "--no-pager"])
                .arg(&installed),
        )?;
        let score: f64 = report
            .lines()
            .find_map(|l| l.split_once("Overall exposure level for ")?.1.split_once(": ")?.1.split_whitespace().next())
            .context("no exposure level in systemd-analyze security's report")?
            .parse()?;
        ensure!(score <= *max, "{unit}: exposure {score} is above {max}: the hardening regressed\n{report}");
        eprintln!("xtask: dist: {unit} verifies; exposure {score} (at most {max})");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn stage_and_units_agree() {
        let root = crate::cmd::workspace_root();
        for (unit, _) in super::MAX_EXPOSURE {
            assert!(root.join("deploy/systemd").join(unit).is_file(), "{unit}");
        }
    }
}
