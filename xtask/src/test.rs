//! `cargo xtask test`: set-up, then every test of the project, then one
//! closing summary line.
//!
//! Stages: the workspace's tests under cargo-nextest (unit tests, eBPF
//! programs through BPF_PROG_TEST_RUN, namespace tests), then the fuzz
//! targets, each for a bounded time from its seed corpus (see `fuzz`;
//! `cargo xtask fuzz` runs that stage alone), then the deploy checks (the
//! Kubernetes manifests and the nftables baseline, see `deploy`), then the
//! release artifacts from the debug build, installed and checked (see
//! `dist`), then the VM stage
//! (the kernel-path tests on a WireGuard kernel, see `vm`), then the demo check
//! (`cargo xtask demo --check`). All run as root in CI; a root test that
//! cannot run fails.

use std::process::Command;

use anyhow::{Context as _, bail};

use crate::{cmd, demo, deploy, dist, fuzz, postgres, setup, vm};

/// Options of `cargo xtask test`.
#[derive(clap::Args, Debug)]
pub(crate) struct Args {
    /// Skip the demo check (for quick iterations; CI runs everything).
    #[arg(long)]
    no_demo: bool,
    /// Extra arguments for cargo-nextest (test name filters, ...).
    #[arg(last = true)]
    nextest_args: Vec<String>,
}

#[derive(Debug, Default)]
struct Tally {
    passed: u64,
    failed: u64,
    failures: Vec<String>,
}

pub(crate) fn run(args: &Args) -> anyhow::Result<()> {
    setup::run()?;
    let started = std::time::Instant::now();
    // Build first so a compile error is reported as one, not as failed tests.
    cmd::run(Command::new("cargo").args(["build", "--all-targets"]))?;

    // The control plane's store tests run against a real PostgreSQL too.
    let database_url = postgres::ensure_postgres().context("starting the local PostgreSQL for the store tests")?;

    let mut tally = Tally::default();
    nextest(args, &database_url, &mut tally)?;
    fuzz_stage(&mut tally);
    stage(&mut tally, "k8s manifests", deploy::k8s);
    stage(&mut tally, "nftables baseline", deploy::nftables);
    stage(&mut tally, "monitoring rules", deploy::monitoring);
    stage(&mut tally, "dist", dist::check);
    vm_stage(&mut tally);
    if !args.no_demo {
        // With the binaries the dist stage packaged: the demo checks what ships.
        let packages = cmd::workspace_root().join(dist::CHECK_OUT);
        stage(&mut tally, "demo --check", || demo::run(&demo::Args { check: true, packages: Some(packages) }));
    }

    eprintln!("xtask: tests took {:.0?}", started.elapsed());
    for failure in &tally.failures {
        eprintln!("xtask: FAILED {failure}");
    }
    // The one closing line CI reads.
    println!("summary: {} passed, {} failed", tally.passed, tally.failed);
    if tally.failed > 0 {
        bail!("{} test(s) failed", tally.failed);
    }
    Ok(())
}

fn stage(tally: &mut Tally, name: &str, f: impl FnOnce() -> anyhow::Result<()>) {
    match f() {
        Ok(()) => tally.passed += 1,
        Err(e) => {
            eprintln!("xtask: {name} failed: {e:#}");
            tally.failed += 1;
            tally.failures.push(name.to_owned());
        }
    }
}

/// The stage's fuzz targets (`fuzz::TARGETS`) for `fuzz::DEFAULT_SECONDS`,
/// one count per target (a failed build fails them all).
fn fuzz_stage(tally: &mut Tally) {
    if let Err(e) = fuzz::build() {
        for t in fuzz::TARGETS {
            stage(tally, &format!("fuzz {t}"), || Err(anyhow::anyhow!("{e:#}")));
        }
        return;
    }
    for t in fuzz::TARGETS {
        stage(tally, &format!("fuzz {t}"), || fuzz::run(t, fuzz::DEFAULT_SECONDS));
    }
}

/// The kernel-path tests in the VM (`vm::SUITE`), counted test by test.
fn vm_stage(tally: &mut Tally) {
    match vm::suite() {
        Ok(vm) => {
            tally.passed += vm.passed;
            tally.failed += vm.failed;
            tally.failures.extend(vm.problems.into_iter().map(|p| format!("vm: {p}")));
        }
        Err(e) => stage(tally, "vm", || Err(e)),
    }
}

fn nextest(args: &Args, database_url: &str, tally: &mut Tally) -> anyhow::Result<()> {
    let junit = cmd::workspace_root().join("target/nextest/ci/junit.xml");
    let _ = std::fs::remove_file(&junit);
    let mut command = Command::new("cargo");
    command
        .args(["nextest", "run", "--profile", "ci", "--no-fail-fast"])
        .args(&args.nextest_args)
        .env("MESH_TEST_DATABASE_URL", database_url);
    let line = cmd::describe(&command);
    eprintln!("xtask: $ {line}");
    let status = command.status().with_context(|| format!("could not start `{line}`"))?;
    let xml = std::fs::read_to_string(&junit)
        .with_context(|| format!("`{line}` ({status}) wrote no report at {}", junit.display()))?;
    let (tests, failed) = junit_counts(&xml).context("reading the nextest JUnit report")?;
    if tests == 0 {
        bail!("nextest ran no test");
    }
    tally.passed += tests - failed;
    tally.failed += failed;
    if failed > 0 {
        tally.failures.push(format!("{failed} nextest test(s), see above"));
    } else if !status.success() {
        bail!("`{line}` failed ({status}) although its report shows no failed test");
    }
    Ok(())
}

/// Reads `tests`, `failures` and `errors` of the report's root element.
fn junit_counts(xml: &str) -> Option<(u64, u64)> {
    let start = xml.find("<testsuites")?;
    let root = &xml[start..start + xml[start..].find('>')?];
    let attr = |name: &str| -> Option<u64> {
        let at = root.find(&format!(" {name}=\""))? + name.len() + 3;
        root[at..].split('"').next()?.parse().ok()
    };
    Some((attr("tests")?, attr("failures")? + attr("errors").unwrap_or(0)))
}

#[cfg(test)]
mod tests {
    #[test]
    fn junit_root_counts() {
        let xml = r#"<?xml version="1.0"?><testsuites name="nextest-run" tests="12" failures="2" errors="1" uuid="x"><testsuite/></testsuites>"#;
        assert_eq!(super::junit_counts(xml), Some((12, 3)));
        assert_eq!(super::junit_counts("<nope/>"), None);
    }
}
