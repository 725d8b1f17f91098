//! Standard gRPC tooling against control (issue #16): Python grpcio with
//! grpcio-reflection (installed by `cargo xtask setup`) lists control's
//! services through reflection v1alpha, trusts control with `ca.pem` alone,
//! and calls `AdminService/GetStatus` with an admin token from descriptors
//! it fetched, not generated code. A missing Python module fails the test.

use std::os::unix::fs::PermissionsExt as _;

use mesh_control::run::start;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_grpcio_lists_services_and_calls_get_status_with_a_token() {
    let dir = tempfile::tempdir().unwrap();
    let c = start(&mesh_control::sim::loopback_config(dir.path())).await.expect("control starts");
    let token = dir.path().join("py-token");
    std::fs::write(&token, c.bootstrap_admin_token.clone().unwrap()).unwrap();
    std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o600)).unwrap();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/generic_client.py");
    let out = tokio::process::Command::new("python3")
        .arg(script)
        .args(["--addr", &c.addr.to_string()])
        .arg("--ca")
        .arg(dir.path().join("ca.pem"))
        .arg("--token-file")
        .arg(&token)
        .output()
        .await
        .expect("python3 runs (cargo xtask setup installs grpcio)");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "generic client failed: {stderr}");
    let v: serde_json::Value =
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)));
    let services: Vec<&str> = v["services"].as_array().unwrap().iter().filter_map(|s| s.as_str()).collect();
    // (v1alpha's service lists itself; v1 is checked in grpc.rs.)
    for s in ["mesh.v1.AdminService", "mesh.v1.AgentService", "grpc.reflection.v1alpha.ServerReflection"] {
        assert!(services.contains(&s), "{s} missing from {services:?}");
    }
    assert_eq!(v["without_token"], "UNAUTHENTICATED", "{v}");
    // The status control really has: its CA pin and store, as meshctl shows them.
    assert_eq!(v["status"]["ca_pin"], hex::encode(c.ca_pin), "{v}");
    assert!(v["status"]["store"].as_str().is_some_and(|s| s.starts_with("sqlite")), "{v}");
}
