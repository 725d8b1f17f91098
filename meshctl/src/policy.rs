//! `meshctl policy`: the ACL policy as code.
//!
//! `check` runs offline: the same parser, compiler and tests as control,
//! with no node enrolled. Policy tests name hosts, addresses, tags, groups
//! and users, which stand-ins represent, never enrolled nodes, so a
//! pre-commit hook or a CI job needs no control to gate a change. `validate`
//! (also `apply --check-only`) asks control, which adds the enrolled nodes'
//! data path limits; `diff` shows what each enrolled node gains and loses;
//! `apply` validates, then sets. Every check exits 1 on any problem or
//! failing test, after printing them as `FILE:LINE: message`.

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use clap::Subcommand;
use mesh_proto::v1 as pb;
use serde_json::json;

use super::Admin;

/// What `meshctl policy` does.
#[derive(Subcommand, Debug)]
pub(crate) enum PolicyCmd {
    /// Print the active policy.
    Get,
    /// Check a policy file offline, without control (syntax, names, tests):
    /// for pre-commit hooks and CI.
    Check { file: PathBuf },
    /// Check a policy file at control (also against the enrolled nodes'
    /// data path limits).
    Validate { file: PathBuf },
    /// Run a policy file's tests at control (same check as validate).
    Test { file: PathBuf },
    /// Show per node which rules a policy file adds (+) and removes (-).
    Diff { file: PathBuf },
    /// Make a policy file the active policy; it is validated first and
    /// nothing is set if any check fails.
    Apply {
        file: PathBuf,
        /// Validate at control and stop: set nothing.
        #[arg(long)]
        check_only: bool,
    },
}

fn read(path: &Path) -> anyhow::Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))
}

/// The outcome of a check, printed the same way offline and at control.
struct Verdict {
    problems: Vec<pb::PolicyProblem>,
    warnings: Vec<pb::PolicyProblem>,
    tests_passed: u32,
}

impl Verdict {
    /// Prints the verdict; exits 1 if the policy has a problem.
    fn report(&self, file: &Path, json: bool, quiet_ok: bool) {
        let ok = self.problems.is_empty();
        if json {
            let list = |v: &[pb::PolicyProblem]| -> Vec<serde_json::Value> {
                v.iter().map(|p| json!({"line": p.line, "message": p.message})).collect()
            };
            if !quiet_ok || !ok {
                println!(
                    "{}",
                    json!({"ok": ok, "tests_passed": self.tests_passed, "problems": list(&self.problems),
                        "warnings": list(&self.warnings)})
                );
            }
        } else {
            for p in &self.warnings {
                eprintln!("{}:{}: warning: {}", file.display(), p.line, p.message);
            }
            for p in &self.problems {
                eprintln!("{}:{}: {}", file.display(), p.line, p.message);
            }
            if ok && !quiet_ok {
                println!("ok: {} test checks passed", self.tests_passed);
            }
        }
        if !ok {
            std::process::exit(1);
        }
    }
}

/// `meshctl policy check FILE`: no connection to control.
pub(crate) fn check_offline(file: &Path, json: bool) -> anyhow::Result<()> {
    let text = read(file)?;
    let to_pb = |v: &[mesh_control::policy::Problem]| -> Vec<pb::PolicyProblem> {
        v.iter().map(|p| pb::PolicyProblem { line: p.line, message: p.kind.to_string() }).collect()
    };
    let verdict = match mesh_control::policy::check(&text, &[]) {
        Ok((policy, passed)) => {
            Verdict { problems: Vec::new(), warnings: to_pb(&policy.warnings), tests_passed: passed }
        }
        Err(problems) => Verdict { problems: to_pb(&problems), warnings: Vec::new(), tests_passed: 0 },
    };
    verdict.report(file, json, false);
    Ok(())
}

async fn validate(a: &mut Admin, file: &Path) -> anyhow::Result<Verdict> {
    let r = a.validate_policy(pb::PolicyDocument { text: read(file)?, generation: 0 }).await?.into_inner();
    Ok(Verdict { problems: r.problems, warnings: r.warnings, tests_passed: r.tests_passed })
}

/// The commands that ask control.
pub(crate) async fn run(a: &mut Admin, cmd: &PolicyCmd, json: bool) -> anyhow::Result<()> {
    match cmd {
        PolicyCmd::Get => {
            let p = a.get_policy(pb::Empty {}).await?.into_inner();
            if json {
                println!("{}", json!({"generation": p.generation, "text": p.text}));
            } else {
                print!("{}", p.text);
            }
        }
        PolicyCmd::Check { file } => check_offline(file, json)?,
        PolicyCmd::Validate { file } | PolicyCmd::Test { file } | PolicyCmd::Apply { file, check_only: true } => {
            validate(a, file).await?.report(file, json, false);
        }
        PolicyCmd::Diff { file } => {
            let d = a.diff_policy(pb::PolicyDocument { text: read(file)?, generation: 0 }).await?.into_inner();
            if json {
                let v: Vec<_> = d
                    .nodes
                    .iter()
                    .map(|n| json!({"node_id": n.node_id, "node": n.node_name, "added": n.added, "removed": n.removed}))
                    .collect();
                println!("{}", serde_json::Value::Array(v));
            } else if d.nodes.is_empty() {
                println!("no node's rules change");
            } else {
                for n in &d.nodes {
                    println!("{} ({}): gains {}, loses {}", n.node_name, n.node_id, n.added.len(), n.removed.len());
                    for r in &n.removed {
                        println!("  - {r}");
                    }
                    for r in &n.added {
                        println!("  + {r}");
                    }
                }
            }
        }
        PolicyCmd::Apply { file, check_only: false } => {
            // Validate first: its problems and warnings are printed the same
            // way as `validate`'s, and nothing is set if one fails.
            validate(a, file).await?.report(file, json, true);
            let p = a.set_policy(pb::PolicyDocument { text: read(file)?, generation: 0 }).await?.into_inner();
            if json {
                println!("{}", json!({"generation": p.generation}));
            } else {
                println!("applied: generation {}", p.generation);
            }
        }
    }
    Ok(())
}
