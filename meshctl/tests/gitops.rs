//! Policy as code (issue #16): the example CI workflow's command sequence
//! and the pre-commit hook under `examples/gitops/`, run as shipped against
//! a real control over TLS with an admin token and control's `ca.pem`. A
//! policy whose tests fail, or that uses a refused Tailscale section, fails
//! the gate and changes nothing; a good one is applied on "push".

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use mesh_control::run::start;

fn repo_file(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(rel)
}

/// The workflow's gate steps: (its `if:` condition, its `run:` command).
fn gate_steps() -> Vec<(String, String)> {
    let text = std::fs::read_to_string(repo_file("examples/gitops/github-workflow.yml")).unwrap();
    let mut cond = String::new();
    let mut steps = Vec::new();
    for line in text.lines().map(str::trim) {
        if line.starts_with("- name:") {
            cond.clear();
        } else if let Some(c) = line.strip_prefix("if: ") {
            c.clone_into(&mut cond);
        } else if let Some(run) = line.strip_prefix("run: ")
            && run.contains("policy-gate.sh")
        {
            steps.push((cond.clone(), run.to_owned()));
        }
    }
    steps
}

fn out(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

/// A command with only the given meshctl environment.
fn command(program: &str, dir: &Path, env: &[(&str, String)]) -> Command {
    let mut c = Command::new(program);
    c.current_dir(dir);
    for v in
        ["MESHCTL_SERVER", "MESHCTL_SOCKET", "MESHCTL_TOKEN", "MESHCTL_TOKEN_FILE", "MESHCTL_CA_FILE", "MESHCTL_CA_PIN"]
    {
        c.env_remove(v);
    }
    c.env("MESHCTL", env!("CARGO_BIN_EXE_meshctl"));
    for (k, v) in env {
        c.env(k, v);
    }
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_workflow_gates_and_applies_the_policy_and_the_hook_refuses_bad_commits() {
    let steps = gate_steps();
    let pr = steps.iter().find(|(c, _)| c.contains("pull_request")).expect("a pull_request gate step").1.clone();
    let push = steps.iter().find(|(c, _)| c.contains("'push'")).expect("a push apply step").1.clone();
    assert!(pr.contains(" plan ") && push.contains(" apply "), "{steps:?}");

    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("control");
    std::fs::create_dir(&data).unwrap();
    let c = start(&mesh_control::sim::loopback_config(&data)).await.expect("control starts");
    let token = tmp.path().join("ci-token");
    std::fs::write(&token, c.bootstrap_admin_token.clone().unwrap()).unwrap();
    std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o600)).unwrap();
    let env = [
        ("MESHCTL_SERVER", c.addr.to_string()),
        ("MESHCTL_TOKEN_FILE", token.display().to_string()),
        ("MESHCTL_CA_FILE", data.join("ca.pem").display().to_string()),
    ];
    // The policy repository: the demo's policy and the gate script.
    let repo = tmp.path().join("repo");
    std::fs::create_dir(&repo).unwrap();
    std::fs::copy(repo_file("examples/gitops/policy-gate.sh"), repo.join("policy-gate.sh")).unwrap();
    let good = std::fs::read_to_string(repo_file("demo/policy.hujson")).unwrap();
    let policy = repo.join("policy.hujson");
    let run = |step: &str| command("sh", &repo, &env).args(["-c", step]).output().unwrap();
    let active = || {
        let o = command(env!("CARGO_BIN_EXE_meshctl"), &repo, &env).args(["--json", "policy", "get"]).output().unwrap();
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("{e}: {}", out(&o)));
        (v["generation"].as_u64().unwrap(), v["text"].as_str().unwrap().to_owned())
    };
    let (gen0, text0) = active();

    // A pull request with a good policy: checked, validated, diffed; nothing set.
    std::fs::write(&policy, &good).unwrap();
    let o = run(&pr);
    assert!(o.status.success(), "{}", out(&o));
    let text = out(&o);
    assert!(text.contains("ok: ") && text.contains("test checks passed"), "{text}");
    assert!(text.contains("== meshctl policy diff"), "{text}");
    assert_eq!(active(), (gen0, text0.clone()), "a pull request applies nothing");

    // A change that breaks one of the policy's tests fails both steps.
    let broken = good.replace(r#""deny": ["db-fsn:22", "db-gra:22"]"#, r#""deny": ["db-fsn:5432", "db-gra:22"]"#);
    assert_ne!(broken, good, "the demo policy has the test this edits");
    std::fs::write(&policy, &broken).unwrap();
    for step in [&pr, &push] {
        let o = run(step);
        assert!(!o.status.success(), "{step}: {}", out(&o));
        assert!(
            out(&o).contains("policy.hujson:") && out(&o).contains("test failed: app-nyc -> db-fsn:5432"),
            "{}",
            out(&o)
        );
    }
    // A refused Tailscale section too, with its one clear message.
    std::fs::write(&policy, good.replacen("\"acls\": [", "\"grants\": [],\n  \"acls\": [", 1)).unwrap();
    let o = run(&push);
    assert!(!o.status.success() && out(&o).contains("not supported by this mesh: \"grants\""), "{}", out(&o));
    assert_eq!(active(), (gen0, text0), "nothing failing was applied");

    // The merged good policy is applied; `ssh` is accepted with a warning.
    let with_ssh = good.replacen(
        "\"acls\": [",
        "\"ssh\": [{\"action\": \"check\", \"src\": [\"group:netops\"], \"dst\": [\"tag:gw\"], \"users\": [\"root\"]}],\n  \"acls\": [",
        1,
    );
    std::fs::write(&policy, &with_ssh).unwrap();
    let o = run(&push);
    assert!(o.status.success(), "{}", out(&o));
    assert!(out(&o).contains("warning: not supported by this mesh: \"ssh\""), "{}", out(&o));
    assert!(out(&o).contains("applied: generation"), "{}", out(&o));
    let (gen1, text1) = active();
    assert!(gen1 > gen0);
    assert_eq!(text1, with_ssh);

    // The pre-commit hook, offline (no control in its environment).
    let git = |args: &[&str]| {
        let o = command("git", &repo, &[]).args(args).output().unwrap();
        assert!(o.status.success(), "git {args:?}: {}", out(&o));
    };
    git(&["init", "-q"]);
    git(&["config", "user.email", "ci@example.com"]);
    git(&["config", "user.name", "ci"]);
    let hook = repo_file("examples/gitops/pre-commit");
    let hook = hook.to_str().unwrap();
    std::fs::write(&policy, &good).unwrap();
    git(&["add", "policy.hujson"]);
    let o = command(hook, &repo, &[]).output().unwrap();
    assert!(o.status.success(), "{}", out(&o));
    git(&["commit", "-q", "-m", "good policy"]);
    // A broken staged policy is refused, even when the working tree is good.
    std::fs::write(&policy, &broken).unwrap();
    git(&["add", "policy.hujson"]);
    std::fs::write(&policy, &good).unwrap();
    let o = command(hook, &repo, &[]).output().unwrap();
    assert!(!o.status.success(), "{}", out(&o));
    assert!(out(&o).contains("policy.hujson:") && out(&o).contains("test failed"), "{}", out(&o));
}
