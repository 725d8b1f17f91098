//! `mesh-bench [SUITE...] [--quick] [--out DIR]`: runs suites and writes
//! their results. Usually run through `cargo xtask bench`.

use anyhow::{Context as _, bail};
use clap::Parser;
use mesh_bench::{Ctx, suites::SUITES};

#[derive(Parser, Debug)]
#[command(about = "Run the mesh benchmarks")]
struct Args {
    /// Suites to run (`all` for every one).
    #[arg(default_value = "all")]
    suites: Vec<String>,
    /// A smoke run of a few minutes.
    #[arg(long)]
    quick: bool,
    /// Output directory.
    #[arg(long, default_value = "bench/results")]
    out: std::path::PathBuf,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let wanted: Vec<&str> = if args.suites.iter().any(|s| s == "all") {
        SUITES.iter().map(|s| s.name).collect()
    } else {
        args.suites.iter().map(String::as_str).collect()
    };
    for name in &wanted {
        if !SUITES.iter().any(|s| s.name == *name) {
            let known: Vec<_> = SUITES.iter().map(|s| s.name).collect();
            bail!("unknown suite {name:?}; known suites: {known:?}");
        }
    }
    if wanted.is_empty() {
        bail!("no benchmark suites are built in yet");
    }
    // Suites draw their charts while running: the directory must exist first.
    std::fs::create_dir_all(&args.out).with_context(|| format!("creating {}", args.out.display()))?;
    let ctx = Ctx { quick: args.quick, out: args.out.clone() };
    for suite in SUITES.iter().filter(|s| wanted.contains(&s.name)) {
        ctx.progress(suite.name, suite.about);
        let results = (suite.run)(&ctx).with_context(|| format!("suite {}", suite.name))?;
        let md = results.write(&ctx.out).with_context(|| format!("writing {} results", suite.name))?;
        println!("{md}");
    }
    Ok(())
}
