//! How meshctl takes the admin token (issue #14): from `--token-file`
//! (0600) or `MESHCTL_TOKEN`; `--token` on the command line, where every
//! local user can read it, still works but warns.

use std::os::unix::fs::PermissionsExt as _;
use std::process::Output;

use mesh_control::run::start;

const WARNING: &str = "visible to every local user";

async fn meshctl(addr: &str, pin: &str, args: &[&str], env_token: Option<&str>) -> Output {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_meshctl"));
    cmd.args(["--server", addr, "--ca-pin", pin]).args(args).arg("status");
    cmd.env_remove("MESHCTL_TOKEN").env_remove("MESHCTL_TOKEN_FILE").env_remove("MESHCTL_SOCKET");
    if let Some(t) = env_token {
        cmd.env("MESHCTL_TOKEN", t);
    }
    cmd.output().await.unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_from_a_private_file_or_the_environment_and_a_warning_on_argv() {
    let dir = tempfile::tempdir().unwrap();
    let c = start(&mesh_control::sim::loopback_config(dir.path())).await.expect("control starts");
    let token = c.bootstrap_admin_token.clone().unwrap();
    let (addr, pin) = (c.addr.to_string(), hex::encode(c.ca_pin));
    let file = dir.path().join("tlo-token");
    std::fs::write(&file, format!("{token}\n")).unwrap();
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let file_arg = file.to_str().unwrap();

    let o = meshctl(&addr, &pin, &["--token-file", file_arg], None).await;
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(!stderr(&o).contains(WARNING), "{}", stderr(&o));

    let o = meshctl(&addr, &pin, &[], Some(&token)).await;
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(!stderr(&o).contains(WARNING), "{}", stderr(&o));

    let o = meshctl(&addr, &pin, &["--token", &token], None).await;
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains(WARNING), "--token on argv warns: {}", stderr(&o));

    // Without a token, control refuses: the file really was what authorised.
    let o = meshctl(&addr, &pin, &[], None).await;
    assert!(!o.status.success());

    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
    let o = meshctl(&addr, &pin, &["--token-file", file_arg], None).await;
    assert!(!o.status.success());
    assert!(stderr(&o).contains(&format!("chmod 600 {file_arg}")), "{}", stderr(&o));
    c.shutdown();
}
