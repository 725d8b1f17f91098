//! `cargo xtask`: the project's one entry point for set-up, tests, the demo
//! and benchmarks. Every command installs what it needs first (idempotently),
//! so a fresh machine needs nothing but this repository.

mod cmd;
mod demo;
mod deploy;
mod dist;
mod fuzz;
mod postgres;
mod setup;
mod test;
mod vm;

use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(about = "Project tasks: setup, test, demo, bench")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand, Debug)]
enum Task {
    /// Install the toolchain components, bpf-linker and Debian packages the
    /// build, tests, demo and benchmarks need. Idempotent and fast when all
    /// is there.
    Setup,
    /// Set up, then run every test: unit, BPF_PROG_TEST_RUN, namespace
    /// tests, the VM kernel-path tests and the demo check.
    Test(test::Args),
    /// Set up, build, and bring up the demo lab.
    Demo(demo::Args),
    /// Set up, then run benchmark suites (see bench/README.md).
    Bench(BenchArgs),
    /// Set up, then run test binaries in a VM on Debian's kernel with
    /// WireGuard (default: the VM suite that `test` runs).
    Vm(vm::Args),
    /// Set up, then build the fuzz targets and run each for a bounded time
    /// from its seed corpus (the fuzz stage of `test`, alone).
    Fuzz(fuzz::Args),
    /// Set up, then check the Kubernetes manifests, the nftables baseline
    /// and the monitoring rules under deploy/ (the deploy stages of `test`,
    /// alone).
    DeployCheck(deploy::Args),
    /// Set up, then build the release artifacts into dist/: tarballs,
    /// Debian packages, OCI images, SHA256SUMS (docs/packaging.md).
    Dist(dist::Args),
}

#[derive(clap::Args, Debug)]
struct BenchArgs {
    /// Suites to run: acl, guard, agent, push, failover, tunnel, or all.
    #[arg(default_value = "all")]
    suites: Vec<String>,
    /// A smoke run of a few minutes.
    #[arg(long)]
    quick: bool,
    /// Output directory (default bench/results).
    #[arg(long)]
    out: Option<std::path::PathBuf>,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    std::env::set_current_dir(cmd::workspace_root())?;
    match cli.task {
        Task::Setup => setup::run(),
        Task::Test(args) => test::run(&args),
        Task::Demo(args) => demo::run(&args),
        Task::Bench(args) => bench(&args),
        Task::Vm(args) => vm::run(&args),
        Task::Fuzz(args) => fuzz::main(&args),
        Task::DeployCheck(args) => deploy::main(&args),
        Task::Dist(args) => dist::main(&args),
    }
}

fn bench(args: &BenchArgs) -> anyhow::Result<()> {
    setup::run()?;
    setup::bench_tools()?;
    // Suites run the agent and control binaries as processes.
    cmd::run(std::process::Command::new("cargo").args([
        "build",
        "--release",
        "-p",
        "mesh-agent",
        "-p",
        "mesh-control",
    ]))?;
    let out = args.out.clone().unwrap_or_else(|| "bench/results".into());
    let mut command = std::process::Command::new("cargo");
    command.args(["run", "--release", "--quiet", "-p", "mesh-bench", "--"]).args(&args.suites);
    if args.quick {
        command.arg("--quick");
    }
    command.arg("--out").arg(out);
    cmd::run(&mut command)
}
