//! `cargo xtask vm`: runs test binaries on a real WireGuard kernel.
//!
//! This machine's kernel has no WireGuard, so the kernel data path is tested
//! in a VM: Debian's cloud kernel package (6.1, WireGuard, veth, cls_bpf,
//! sch_ingress as modules, BTF) booted under qemu with TCG. The whole
//! userland is one initramfs built here in about a second (see
//! [`initramfs`]); `/init` runs the test binaries one after another and
//! the verdict comes back through qemu's isa-debug-exit port, with every
//! line of the console shown as it arrives.
//!
//! One VM at a time: TCG keeps both host cores busy. The VM checks
//! behaviour, never speed (TCG runs at emulation speed).

mod binaries;
mod cpio;
mod guest;
mod initramfs;
mod kernel;
mod qemu;
mod report;

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

pub(crate) use report::Tally;

use self::{
    guest::GuestTest,
    initramfs::{BUSYBOX_DIR, HOST_TOOLS, Tree},
    kernel::Kernel,
    report::Report,
};
use crate::{cmd, setup};

/// The tests `cargo xtask test` runs in the VM, in this order: `(package,
/// test target)`, globs allowed. The one list to extend.
pub(crate) const SUITE: &[(&str, &str)] = &[
    // BPF_PROG_TEST_RUN and XDP/TC on veth: proves the runner itself.
    ("mesh-agent", "counter"),
    // The namespace lab the other tests stand on.
    ("mesh-lab", "lab"),
    // The eBPF programs on the 6.1 verifier and their verdicts (ACL, MSS
    // clamp, guard): one load per binary, since each ACL verification takes
    // 20-30 s under TCG. The differential and netns dataplane tests add no
    // kernel-specific coverage and run on the host only.
    ("mesh-agent", "dataplane_acl"),
    ("mesh-agent", "dataplane_mss_guard"),
    // The kernel WireGuard backend: probe, tunnel, reconcile, read-back.
    ("mesh-agent", "agent_kernel"),
];

/// The environment of every test in the VM: the kernel there has
/// WireGuard, so a probe that finds none is a failure, not a fallback.
const GUEST_ENV: &[(&str, &str)] = &[("MESH_EXPECT_KERNEL_WG", "1")];

/// Default limit for one VM run; a hung guest fails instead of hanging CI.
const DEFAULT_TIMEOUT_SECS: u64 = 900;

/// Options of `cargo xtask vm`.
#[derive(clap::Args, Debug)]
pub(crate) struct Args {
    /// Test targets to run, as `TEST` (a target of the VM suite, or of
    /// mesh-agent) or `PACKAGE:TEST`; globs allowed. Default: the VM suite.
    #[arg(long = "test", value_name = "[PACKAGE:]TEST")]
    tests: Vec<String>,
    /// Kill the VM after this many seconds.
    #[arg(long, default_value_t = DEFAULT_TIMEOUT_SECS)]
    timeout: u64,
    /// Arguments for every test binary (name filters, --nocapture, ...).
    #[arg(last = true)]
    test_args: Vec<String>,
}

/// A test target to run: a package and a test name or glob.
#[derive(Debug, Clone)]
pub(crate) struct Selection {
    pub(crate) package: String,
    pub(crate) test: String,
}

impl Selection {
    fn parse(spec: &str) -> Self {
        if let Some((package, test)) = spec.split_once(':') {
            return Self { package: package.to_owned(), test: test.to_owned() };
        }
        let package = SUITE.iter().find(|(_, t)| glob(t, spec) || *t == spec).map_or("mesh-agent", |(p, _)| p);
        Self { package: package.to_owned(), test: spec.to_owned() }
    }

    fn matches(&self, package: &str, test: &str) -> bool {
        self.package == package && glob(&self.test, test)
    }
}

/// `cargo xtask vm`: set up, then run the chosen tests in one VM.
pub(crate) fn run(args: &Args) -> anyhow::Result<()> {
    setup::run()?;
    let selection: Vec<Selection> = if args.tests.is_empty() {
        suite_selection()
    } else {
        args.tests.iter().map(|t| Selection::parse(t)).collect()
    };
    let tally = run_tests(&selection, &args.test_args, Duration::from_secs(args.timeout))?;
    println!("vm: {} passed, {} failed", tally.passed, tally.failed);
    if tally.failed > 0 {
        bail!("{} VM test(s) failed", tally.failed);
    }
    Ok(())
}

/// The VM stage of `cargo xtask test`: the whole [`SUITE`].
pub(crate) fn suite() -> anyhow::Result<Tally> {
    run_tests(&suite_selection(), &[], Duration::from_secs(DEFAULT_TIMEOUT_SECS))
}

fn suite_selection() -> Vec<Selection> {
    SUITE.iter().map(|(p, t)| Selection { package: (*p).to_owned(), test: (*t).to_owned() }).collect()
}

/// Builds the selection, packs it, boots it, and tallies what the console
/// says. Errors are failures to get as far as booting.
fn run_tests(selection: &[Selection], test_args: &[String], timeout: Duration) -> anyhow::Result<Tally> {
    let started = Instant::now();
    let kernel = Kernel::find()?;
    let built = binaries::build(selection)?;
    let work = work_dir(&built)?;

    let packing = Instant::now();
    let initrd = work.join("initramfs.cpio");
    let tests = pack(&kernel, &built, &work, test_args, &initrd)?;
    let size = std::fs::metadata(&initrd)?.len();
    eprintln!(
        "xtask: vm: initramfs {} ({} MiB) for kernel {} in {:.1?}",
        initrd.display(),
        size >> 20,
        kernel.release,
        packing.elapsed()
    );

    let booting = Instant::now();
    let mut report = Report::default();
    let exit = qemu::boot(&kernel.vmlinuz, &initrd, timeout, |line| {
        println!("[vm] {line}");
        report.line(line, booting.elapsed());
    })?;
    let mut tally = report.tally(exit);
    // A binary the guest never reached (the VM died first) failed too.
    for test in &tests {
        if !report.binaries.iter().any(|b| b.name == test.name) {
            tally.failed += 1;
            tally.problems.push(format!("{} never ran", test.name));
        }
    }
    for b in &report.binaries {
        let exit = match (b.exit, b.took) {
            (Some(code), Some(took)) => format!("exit {code} after {took:.1?}"),
            _ => "did not finish".to_owned(),
        };
        eprintln!("xtask: vm: {}: {} passed, {} failed ({exit})", b.name, b.passed, b.failed);
    }
    for problem in &tally.problems {
        eprintln!("xtask: vm: FAILED {problem}");
    }
    if tally.passed + tally.failed == 0 {
        tally.failed += 1;
        tally.problems.push("no test ran in the VM".to_owned());
        eprintln!("xtask: vm: FAILED no test ran in the VM");
    }
    eprintln!(
        "xtask: vm: {} passed, {} failed; VM {:.1?} (init after {:.1?}, {exit:?}), whole stage {:.1?}",
        tally.passed,
        tally.failed,
        booting.elapsed(),
        report.booted_at.unwrap_or_default(),
        started.elapsed()
    );
    Ok(tally)
}

/// `<target>/xtask-vm`, next to the binaries it packs.
fn work_dir(built: &binaries::Built) -> anyhow::Result<PathBuf> {
    // <target>/<profile>/deps/<test>-<hash>
    let target = built.tests.first().and_then(|t| t.path.ancestors().nth(3)).context("no test binary")?;
    let work = target.join("xtask-vm");
    std::fs::create_dir_all(&work).with_context(|| format!("creating {}", work.display()))?;
    Ok(work)
}

/// Writes the initramfs and returns the tests in the order `/init` runs them.
fn pack(
    kernel: &Kernel,
    built: &binaries::Built,
    work: &Path,
    test_args: &[String],
    out: &Path,
) -> anyhow::Result<Vec<GuestTest>> {
    let mut tree = Tree::default();
    for dir in ["/proc", "/sys", "/dev", "/run", "/tmp", "/root", "/var/lib", "/etc"] {
        tree.dir(dir);
    }
    tree.symlink("/var/run", "../run");
    tree.symlink("/var/tmp", "../tmp");
    tree.data("/etc/passwd", "root:x:0:0:root:/root:/busybox/sh\n", 0o644);
    tree.data("/etc/group", "root:x:0:\n", 0o644);

    // Busybox: the shell, mount, insmod, poweroff, and every other applet.
    let busybox = initramfs::which("busybox")?;
    tree.file_from(format!("{BUSYBOX_DIR}/busybox"), &busybox)?;
    tree.with_libraries(&busybox)?;
    let applets = Command::new(&busybox).arg("--list").output().context("busybox --list")?;
    for applet in String::from_utf8_lossy(&applets.stdout).split_whitespace() {
        if applet != "busybox" {
            tree.symlink(format!("{BUSYBOX_DIR}/{applet}"), "busybox");
        }
    }

    for tool in HOST_TOOLS {
        let path = initramfs::which(tool)?;
        tree.host_path(&path)?;
        tree.with_libraries(&path)?;
    }

    let modules = kernel.module_closure(kernel::MODULES)?;
    for module in &modules {
        tree.file_from(Path::new("/lib/modules").join(&kernel.release).join(module), kernel.modules_dir.join(module))?;
    }

    let outb = guest::build_outb(&work.join("outb"))?;
    tree.file_from(guest::OUTB, outb)?;

    // The binaries at their host paths (tests find their package's binaries
    // by absolute path), without debug info: a tenth of the size, and
    // backtraces still name functions.
    let stripped_dir = work.join("stripped");
    for binary in built.tests.iter().map(|t| &t.path).chain(&built.bins) {
        tree.file_from(binary, strip(binary, &stripped_dir)?)?;
        tree.with_libraries(binary)?;
    }

    let tests: Vec<GuestTest> = built
        .tests
        .iter()
        .map(|t| GuestTest { name: format!("{}:{}", t.package, t.name), path: t.path.clone() })
        .collect();
    let script = guest::init_script(&guest::Plan {
        release: &kernel.release,
        modules: &modules,
        tests: &tests,
        test_args,
        env: GUEST_ENV,
    });
    tree.data("/init", script, 0o755);
    tree.write(out)?;
    Ok(tests)
}

/// A copy of `binary` without debug info in `dir`, remade only when the
/// binary is newer.
fn strip(binary: &Path, dir: &Path) -> anyhow::Result<PathBuf> {
    std::fs::create_dir_all(dir)?;
    let name = binary.file_name().context("binary without a file name")?;
    let out = dir.join(name);
    let modified = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    if modified(&out).is_some() && modified(&out) >= modified(binary) {
        return Ok(out);
    }
    cmd::run(Command::new("strip").arg("--strip-debug").arg("-o").arg(&out).arg(binary))
        .context("stripping debug info (binutils)")?;
    Ok(out)
}

/// Matches `name` against `pattern`, where `*` stands for any run of
/// characters (cargo's `--test` globs as used in [`SUITE`]).
fn glob(pattern: &str, name: &str) -> bool {
    match pattern.split_once('*') {
        None => pattern == name,
        Some((head, rest)) => {
            let Some(tail) = name.strip_prefix(head) else { return false };
            (0..=tail.len()).any(|i| tail.is_char_boundary(i) && glob(rest, &tail[i..]))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{Selection, glob};

    #[test]
    fn globs() {
        assert!(glob("dataplane*", "dataplane_acl"));
        assert!(glob("dataplane*", "dataplane"));
        assert!(glob("*kernel", "agent_kernel"));
        assert!(glob("a*c*e", "abcde"));
        assert!(!glob("dataplane*", "counter"));
        assert!(!glob("lab", "labs"));
    }

    #[test]
    fn selections_find_their_package() {
        let s = Selection::parse("lab");
        assert_eq!((s.package.as_str(), s.test.as_str()), ("mesh-lab", "lab"));
        assert!(Selection::parse("dataplane_acl").matches("mesh-agent", "dataplane_acl"));
        let s = Selection::parse("mesh-lab:l*");
        assert!(s.matches("mesh-lab", "lab") && !s.matches("mesh-agent", "lab"));
        assert_eq!(Selection::parse("agent_netns").package, "mesh-agent");
    }
}
