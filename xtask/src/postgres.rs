//! A local PostgreSQL for the store tests: `ensure_postgres()` makes sure a
//! cluster runs (Debian's `pg_lsclusters` / `pg_ctlcluster` /
//! `pg_createcluster`), creates the test role and database, and returns a
//! URL on loopback (password auth, which Debian's default pg_hba.conf allows
//! for 127.0.0.1, so the tests need not run as a particular Unix user).
//! Idempotent; needs root (it runs psql as `postgres` through `runuser`).

use std::process::Command;

use anyhow::{Context as _, bail};

/// Role, password and database the tests use.
const ROLE: &str = "mesh_test";
const PASSWORD: &str = "mesh_test";
const DATABASE: &str = "mesh_test";

/// Runs a command, failing with its output if it fails.
fn run(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `psql` as the `postgres` superuser over the given socket port.
fn psql(port: &str, db: &str, sql: &str) -> anyhow::Result<String> {
    run(Command::new("runuser")
        .args(["-u", "postgres", "--", "psql", "-X", "-q", "-t", "-A", "-v", "ON_ERROR_STOP=1"])
        .args(["-p", port, "-d", db, "-c", sql]))
}

/// One line of `pg_lsclusters --no-header`: version, name, port, status.
fn clusters() -> anyhow::Result<Vec<(String, String, String, String)>> {
    let out = run(Command::new("pg_lsclusters").arg("--no-header"))?;
    Ok(out
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() >= 4).then(|| (f[0].to_owned(), f[1].to_owned(), f[2].to_owned(), f[3].to_owned()))
        })
        .collect())
}

/// Makes sure a local PostgreSQL runs with the test role and database, and
/// returns its URL (`postgres://mesh_test:...@127.0.0.1:<port>/mesh_test`).
pub(crate) fn ensure_postgres() -> anyhow::Result<String> {
    if Command::new("pg_lsclusters").arg("--help").output().is_err() {
        bail!("PostgreSQL is not installed (apt-get install postgresql)");
    }
    let mut list = clusters()?;
    if list.is_empty() {
        let versions: Vec<String> = std::fs::read_dir("/usr/lib/postgresql")
            .context("no /usr/lib/postgresql: is the postgresql package installed?")?
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .collect();
        let version = versions.iter().max_by_key(|v| v.parse::<u32>().unwrap_or(0)).context("no PostgreSQL version")?;
        run(Command::new("pg_createcluster").args([version.as_str(), "main"]))?;
        list = clusters()?;
    }
    let (version, name, port, status) = list.first().cloned().context("no cluster after pg_createcluster")?;
    if !status.starts_with("online") {
        run(Command::new("pg_ctlcluster").args([version.as_str(), name.as_str(), "start"]))?;
    }
    // Wait until it accepts connections.
    let mut ready = false;
    for _ in 0..50 {
        if psql(&port, "postgres", "SELECT 1").is_ok() {
            ready = true;
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    if !ready {
        bail!("PostgreSQL {version}/{name} on port {port} does not accept connections");
    }
    let has_role = psql(&port, "postgres", &format!("SELECT 1 FROM pg_roles WHERE rolname = '{ROLE}'"))?;
    if has_role.trim().is_empty() {
        psql(&port, "postgres", &format!("CREATE ROLE {ROLE} LOGIN CREATEDB PASSWORD '{PASSWORD}'"))?;
    }
    let has_db = psql(&port, "postgres", &format!("SELECT 1 FROM pg_database WHERE datname = '{DATABASE}'"))?;
    if has_db.trim().is_empty() {
        psql(&port, "postgres", &format!("CREATE DATABASE {DATABASE} OWNER {ROLE}"))?;
    }
    Ok(format!("postgres://{ROLE}:{PASSWORD}@127.0.0.1:{port}/{DATABASE}"))
}
