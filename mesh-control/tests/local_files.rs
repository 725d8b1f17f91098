//! Control's local files and sockets (issue #14): the admin socket (no
//! token) lets in only root and control's own uid, and is 0600 whatever the
//! umask; the bootstrap admin token goes to a 0600 file, never to the
//! output.

use std::os::unix::fs::PermissionsExt as _;
use std::time::{Duration, Instant};

use mesh_local::testing::{NOBODY, Outcome, connect_as};

fn mode(path: &std::path::Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_socket_refuses_other_uids_and_is_0600_under_a_permissive_umask() {
    if !mesh_lab::root_or_skip("admin_socket_refuses_other_uids_and_is_0600_under_a_permissive_umask") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // Others may traverse the directory: only the socket itself protects it.
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    // Own process under nextest: the umask is this test's.
    let old = nix::sys::stat::umask(nix::sys::stat::Mode::empty());
    // Control keeps its data dir 0700: the socket sits outside it here.
    let config = mesh_control::config::Config {
        admin_socket: Some(dir.path().join("admin.sock")),
        ..mesh_control::sim::loopback_config(&dir.path().join("data"))
    };
    let c = mesh_control::run::start(&config).await;
    nix::sys::stat::umask(old);
    let _c = c.expect("control starts");
    let sock = dir.path().join("admin.sock");
    assert_eq!(mode(&sock), 0o600);

    let call = |uid| {
        let sock = sock.clone();
        // The HTTP/2 client preface; a served connection answers with the
        // server's SETTINGS frame.
        tokio::task::spawn_blocking(move || connect_as(uid, &sock, b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"))
    };
    assert_eq!(call(0).await.unwrap(), Outcome::Answered);
    assert_eq!(call(NOBODY).await.unwrap(), Outcome::Denied);
    // Loosened by hand, the socket still refuses another uid.
    std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o666)).unwrap();
    assert_eq!(call(NOBODY).await.unwrap(), Outcome::Closed);
    assert_eq!(call(0).await.unwrap(), Outcome::Answered);
}

#[test]
fn bootstrap_token_goes_to_a_0600_file_and_never_to_the_output() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    // A stale world-readable file from an older version must not keep its mode.
    let token_file = data.join("admin-token");
    std::fs::write(&token_file, "old\n").unwrap();
    std::fs::set_permissions(&token_file, std::fs::Permissions::from_mode(0o644)).unwrap();
    let config = dir.path().join("control.toml");
    std::fs::write(
        &config,
        format!(
            "listen = \"127.0.0.1:0\"\ndata_dir = \"{}\"\nmetrics_listen = \"127.0.0.1:0\"\nadmin_socket = \"{}\"\n",
            data.display(),
            dir.path().join("admin.sock").display()
        ),
    )
    .unwrap();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_mesh-control"))
        .args(["serve", "--config"])
        .arg(&config)
        .env("RUST_LOG", "info")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let token = loop {
        let t = std::fs::read_to_string(&token_file).unwrap_or_default();
        if t != "old\n" && !t.is_empty() {
            break t.trim().to_owned();
        }
        assert!(Instant::now() < deadline, "no token written to {}", token_file.display());
        assert!(child.try_wait().unwrap().is_none(), "mesh-control exited");
        std::thread::sleep(Duration::from_millis(50));
    };
    // The log (stdout) says where the token is before "listening": wait
    // for that line.
    let mut stdout = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut head = String::new();
    while !head.contains("mesh-control listening on") {
        let n = std::io::BufRead::read_line(&mut stdout, &mut head).unwrap();
        assert!(n > 0, "mesh-control closed its output:\n{head}");
    }
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id().try_into().unwrap()), nix::sys::signal::SIGINT)
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let mut rest = head;
    std::io::Read::read_to_string(&mut stdout, &mut rest).unwrap();
    let (stdout, stderr) = (rest, String::from_utf8_lossy(&out.stderr));
    assert_eq!(mode(&token_file), 0o600);
    assert!(token.len() > 16, "{token:?}");
    assert!(!stdout.contains(&token) && !stderr.contains(&token), "token leaked:\n{stdout}\n{stderr}");
    assert!(stdout.contains("admin-token"), "the log says where the token is:\n{stdout}");
}
