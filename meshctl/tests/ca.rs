//! `meshctl ca` against a real control in-process: it prints the same CA
//! bundle as control's `ca.pem`, and walks a rotation step by step.

use mesh_control::run::start;

async fn meshctl(dir: &std::path::Path, args: &[&str]) -> (bool, String) {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_meshctl"))
        .arg("--socket")
        .arg(dir.join("admin.sock"))
        .args(args)
        .output()
        .await
        .unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

#[tokio::test]
async fn meshctl_ca_prints_the_bundle_and_rotates() {
    let tmp = tempfile::tempdir().unwrap();
    let c = start(&mesh_control::sim::loopback_config(tmp.path())).await.expect("control starts");
    let bundle = || std::fs::read_to_string(tmp.path().join("ca.pem")).unwrap();
    let (ok, pem) = meshctl(tmp.path(), &["ca"]).await;
    assert!(ok, "{pem}");
    assert_eq!(pem, bundle());
    assert_eq!(pem.matches("BEGIN CERTIFICATE").count(), 1);

    let (ok, out) = meshctl(tmp.path(), &["ca", "rotate", "switch"]).await;
    assert!(!ok && out.contains("no rotation has begun"), "{out}");
    let (ok, out) = meshctl(tmp.path(), &["ca", "rotate", "begin"]).await;
    assert!(ok && out.contains("phase: introduced"), "{out}");
    let (_, pem) = meshctl(tmp.path(), &["ca"]).await;
    assert_eq!(pem.matches("BEGIN CERTIFICATE").count(), 2);
    assert_eq!(pem, bundle());
    let (ok, out) = meshctl(tmp.path(), &["ca", "rotate", "switch"]).await;
    assert!(ok && out.contains("phase: switched"), "{out}");
    let (ok, out) = meshctl(tmp.path(), &["--json", "ca", "status"]).await;
    let v: serde_json::Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert_eq!(v["certificates"][1]["role"], "previous");
    assert_eq!(v["certificates"][1]["pin"], hex::encode(c.ca_pin));
    assert!(ok);
    let (ok, out) = meshctl(tmp.path(), &["ca", "rotate", "retire"]).await;
    assert!(ok && out.contains("phase: steady"), "{out}");
    assert!(!out.contains(&hex::encode(c.ca_pin)), "the old CA is gone: {out}");
    let (_, out) = meshctl(tmp.path(), &["audit", "--action", "ca."]).await;
    assert_eq!(out.matches("ca.rotate.").count(), 3, "{out}");
}
