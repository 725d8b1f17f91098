//! Finding the test binaries to run in the VM: cargo builds them (or finds
//! them fresh) and names them in its JSON messages. xtask never links the
//! workspace's crates, so it knows them only through cargo.

use std::{
    io::{BufRead as _, BufReader},
    path::PathBuf,
    process::{Command, Stdio},
};

use anyhow::{Context as _, bail};

use super::Selection;
use crate::cmd;

/// One test binary, as cargo built it.
#[derive(Debug, Clone)]
pub(crate) struct TestBinary {
    pub(crate) package: String,
    /// The test target's name (`counter` for `tests/counter.rs`).
    pub(crate) name: String,
    pub(crate) path: PathBuf,
}

/// What the VM needs from the build.
#[derive(Debug, Default)]
pub(crate) struct Built {
    pub(crate) tests: Vec<TestBinary>,
    /// The selected packages' own binaries: integration tests run them
    /// through `env!("CARGO_BIN_EXE_<name>")`, an absolute host path.
    pub(crate) bins: Vec<PathBuf>,
}

/// Builds (or finds fresh) the selected test targets.
///
/// No `-p`: cargo then resolves features for the workspace's default members
/// exactly as `cargo build --all-targets` does, so the binaries that build
/// already made are reused instead of rebuilt with other features.
pub(crate) fn build(selection: &[Selection]) -> anyhow::Result<Built> {
    let mut command = Command::new("cargo");
    command.args(["test", "--no-run", "--message-format=json-render-diagnostics"]);
    for s in selection {
        command.args(["--test", &s.test]);
    }
    command.stdout(Stdio::piped());
    let line = cmd::describe(&command);
    eprintln!("xtask: $ {line}");
    let mut child = command.spawn().with_context(|| format!("could not start `{line}`"))?;
    let stdout = child.stdout.take().context("cargo's stdout")?;
    let mut built = Built::default();
    for message in BufReader::new(stdout).lines() {
        let message = message.context("reading cargo's messages")?;
        let Some(artifact) = Artifact::parse(&message) else { continue };
        if artifact.kind == "test" && selection.iter().any(|s| s.matches(&artifact.package, &artifact.name)) {
            built.tests.push(TestBinary { package: artifact.package, name: artifact.name, path: artifact.executable });
        } else if artifact.kind == "bin" && selection.iter().any(|s| s.package == artifact.package) {
            built.bins.push(artifact.executable);
        }
    }
    let status = child.wait()?;
    if !status.success() {
        bail!("`{line}` failed ({status})");
    }
    for s in selection {
        if !built.tests.iter().any(|t| s.matches(&t.package, &t.name)) {
            bail!("no test target {}:{} was built (is the name right?)", s.package, s.test);
        }
    }
    // The order of the selection, then by name: stable output run to run.
    built.tests.sort_by_key(|t| (selection.iter().position(|s| s.matches(&t.package, &t.name)), t.name.clone()));
    built.bins.sort();
    built.bins.dedup();
    Ok(built)
}

/// The parts of a `compiler-artifact` message the VM needs.
#[derive(Debug, PartialEq)]
struct Artifact {
    package: String,
    name: String,
    kind: String,
    executable: PathBuf,
}

impl Artifact {
    fn parse(line: &str) -> Option<Self> {
        let v: serde_json::Value = serde_json::from_str(line).ok()?;
        if v["reason"] != "compiler-artifact" {
            return None;
        }
        Some(Self {
            package: package_name(v["package_id"].as_str()?)?,
            name: v["target"]["name"].as_str()?.to_owned(),
            kind: v["target"]["kind"][0].as_str()?.to_owned(),
            executable: v["executable"].as_str()?.into(),
        })
    }
}

/// The package name in a package ID spec: `path+file:///w/mesh-agent#0.1.0`
/// (directory named like the package) or `path+file:///w/proto#mesh-proto@0.1.0`.
fn package_name(id: &str) -> Option<String> {
    let (url, fragment) = id.rsplit_once('#')?;
    match fragment.split_once('@') {
        Some((name, _version)) => Some(name.to_owned()),
        None => Some(url.trim_end_matches('/').rsplit('/').next()?.to_owned()),
    }
}

#[cfg(test)]
mod tests {
    use super::{Artifact, package_name};

    #[test]
    fn package_names_from_ids() {
        assert_eq!(package_name("path+file:///work/main/mesh-agent#0.1.0").as_deref(), Some("mesh-agent"));
        assert_eq!(package_name("path+file:///work/main/proto#mesh-proto@0.1.0").as_deref(), Some("mesh-proto"));
        assert_eq!(
            package_name("registry+https://github.com/rust-lang/crates.io-index#anyhow@1.0.100").as_deref(),
            Some("anyhow")
        );
        assert_eq!(package_name("nonsense"), None);
    }

    #[test]
    fn artifacts_with_executables_only() {
        let test = r#"{"reason":"compiler-artifact","package_id":"path+file:///w/mesh-lab#0.1.0","target":{"kind":["test"],"name":"lab"},"executable":"/t/debug/deps/lab-1"}"#;
        assert_eq!(
            Artifact::parse(test),
            Some(Artifact {
                package: "mesh-lab".into(),
                name: "lab".into(),
                kind: "test".into(),
                executable: "/t/debug/deps/lab-1".into()
            })
        );
        let lib = r#"{"reason":"compiler-artifact","package_id":"path+file:///w/mesh-lab#0.1.0","target":{"kind":["lib"],"name":"mesh_lab"},"executable":null}"#;
        assert_eq!(Artifact::parse(lib), None);
        assert_eq!(Artifact::parse(r#"{"reason":"build-finished","success":true}"#), None);
    }
}
