//! The demo's browser check of control's topology page (`web_listen`):
//! Debian's chromium, headless, driven over WebDriver (chromedriver and
//! fantoccini) from the `ctl` namespace, where the page's address is.
//!
//! It signs in with a fresh admin token, waits until every gateway is drawn
//! and up, takes a screenshot, kills one gateway (SIGKILL and its links
//! down: control's stream sees no FIN, only the other gateways' probes
//! notice) and measures how long the page takes to show it down, revives
//! it and waits for the page to show it up again, then revokes the token
//! and checks the page falls back to its login form.

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use fantoccini::{Client, ClientBuilder, Locator};
use mesh_lab::Host;

use crate::{Gateway, control::Control};

/// The page, as `control.toml` in the lab binds it.
pub(crate) const LISTEN: &str = "192.0.2.100:8080";
/// chromedriver's port, on the `ctl` namespace's loopback.
const DRIVER_PORT: u16 = 9515;
/// The bound for the page to show a killed gateway down.
pub(crate) const DOWN_BOUND: Duration = Duration::from_secs(2);

/// What the check saw.
#[derive(Debug)]
pub(crate) struct Outcome {
    /// Gateways drawn and up after signing in, of those expected.
    pub(crate) up: usize,
    /// The screenshot, in the lab directory.
    pub(crate) screenshot: PathBuf,
    /// From the kill to the page showing the gateway down.
    pub(crate) down_after: Duration,
    /// From the revival to the page showing every gateway up.
    pub(crate) up_after: Duration,
    /// After the token's revocation the page showed its login form.
    pub(crate) revoked_signs_out: bool,
    /// Rows of the peers table, and how many show an endpoint on the
    /// WireGuard port, a handshake and bytes both ways.
    pub(crate) paths: (usize, usize),
}

/// Runs the check; `victim` is killed and revived.
pub(crate) fn run(
    ctl: &Host,
    control: &Control,
    gateways: &mut [Gateway],
    victim: &str,
    lab_dir: &Path,
) -> anyhow::Result<Outcome> {
    let created =
        control.meshctl(["--json", "tokens", "create", "--expires", "1h", "--description", "demo web page"])?;
    let created: serde_json::Value = serde_json::from_str(&created).context("meshctl tokens create --json")?;
    let token = created["secret"].as_str().context("no secret from meshctl tokens create")?.to_owned();
    let token_id = created["id"].as_str().context("no id from meshctl tokens create")?.to_owned();

    let profile = tempfile::Builder::new().prefix("mesh-demo-chromium").tempdir()?;
    let log = lab_dir.join("ctl/var/log/chromedriver.log");
    let driver =
        ctl.spawn("chromedriver", [format!("--port={DRIVER_PORT}"), format!("--log-path={}", log.display())])?;
    let _driver = Kill(Some(driver));
    crate::wait_for("chromedriver", Duration::from_secs(10), || ctl.tcp_listening(DRIVER_PORT))?;

    // Control's node names are DNS labels: `nyc_gw1` enrolls as `nyc-gw1`.
    let names: Vec<String> = gateways.iter().map(|g| node_name(&g.name)).collect();
    let gw = gateways.iter_mut().find(|g| g.name == victim).with_context(|| format!("no gateway {victim}"))?;
    let screenshot = lab_dir.join("topology.png");
    std::thread::scope(|s| {
        s.spawn(|| -> anyhow::Result<Outcome> {
            // The WebDriver connection and the browser live in ctl.
            ctl.enter_current_thread()?;
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            rt.block_on(script(&names, gw, &token, &token_id, control, profile.path(), &screenshot))
        })
        .join()
        .map_err(|_| anyhow::anyhow!("the browser thread panicked"))?
    })
}

async fn script(
    names: &[String],
    gw: &mut Gateway,
    token: &str,
    token_id: &str,
    control: &Control,
    profile: &Path,
    screenshot: &Path,
) -> anyhow::Result<Outcome> {
    let mut caps = serde_json::Map::new();
    caps.insert(
        "goog:chromeOptions".into(),
        serde_json::json!({
            "binary": "/usr/bin/chromium",
            // Root needs --no-sandbox; a fresh profile per run.
            "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--window-size=1280,1500", format!("--user-data-dir={}", profile.display())],
        }),
    );
    let c = ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
        .capabilities(caps)
        .connect(&format!("http://127.0.0.1:{DRIVER_PORT}"))
        .await
        .context("a WebDriver session with chromedriver")?;
    let result = steps(&c, names, gw, token, token_id, control, screenshot).await;
    let _ = c.close().await;
    result
}

/// The node name a lab gateway enrolls as.
fn node_name(host: &str) -> String {
    host.replace('_', "-")
}

/// `[name, state]` of every gateway the page draws.
async fn states(c: &Client) -> anyhow::Result<Vec<(String, String)>> {
    let v = c
        .execute(
            "return Array.from(document.querySelectorAll('#topology [data-gateway]'))\
             .map(e => [e.dataset.gateway, e.dataset.state]);",
            vec![],
        )
        .await?;
    Ok(serde_json::from_value(v)?)
}

/// The peers table: (rows, rows with an endpoint on port 51820, a direct
/// path, a handshake, and bytes received and sent).
async fn paths(c: &Client) -> anyhow::Result<(usize, usize)> {
    let v = c
        .execute(
            "return Array.from(document.querySelectorAll('#links tbody tr'))\
             .map(tr => Array.from(tr.cells).map(td => td.textContent));",
            vec![],
        )
        .await?;
    let rows: Vec<Vec<String>> = serde_json::from_value(v)?;
    let good = rows
        .iter()
        .filter(|r| {
            r.len() == 8
                && r[2].ends_with(":51820")
                && r[3].starts_with("direct")
                && r[4] != "never"
                && r[5] != "0 B"
                && r[6] != "0 B"
        })
        .count();
    Ok((rows.len(), good))
}

async fn all_up(c: &Client, names: &[String]) -> bool {
    states(c).await.is_ok_and(|s| names.iter().all(|n| s.iter().any(|(g, st)| g == n && st == "up")))
}

async fn poll(what: &str, timeout: Duration, mut f: impl AsyncFnMut() -> bool) -> anyhow::Result<Duration> {
    let t = Instant::now();
    while t.elapsed() < timeout {
        if f().await {
            return Ok(t.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    bail!("{what}: not within {} s", timeout.as_secs())
}

async fn steps(
    c: &Client,
    names: &[String],
    gw: &mut Gateway,
    token: &str,
    token_id: &str,
    control: &Control,
    screenshot: &Path,
) -> anyhow::Result<Outcome> {
    let url = format!("http://{LISTEN}/");
    c.goto(&url).await?;
    c.find(Locator::Css("#token")).await?.send_keys(token).await?;
    c.find(Locator::Css("#sign-in")).await?.click().await?;
    let ready = poll("every gateway drawn and up", Duration::from_secs(20), async || all_up(c, names).await).await;
    // The screenshot either way: on a failure it shows what the page saw.
    std::fs::write(screenshot, c.screenshot().await?)?;
    if let Err(e) = ready {
        let seen = states(c).await.unwrap_or_default();
        return Err(e.context(format!("the page drew {seen:?}; screenshot {}", screenshot.display())));
    }
    let up = states(c).await?.iter().filter(|(_, s)| s == "up").count();
    let paths = paths(c).await?;

    println!("== kill {} (SIGKILL, links down) and watch the page", gw.name);
    let t = Instant::now();
    gw.kill()?;
    let victim = node_name(&gw.name);
    let down = poll(&format!("the page to show {victim} down"), Duration::from_secs(15), async || {
        states(c).await.is_ok_and(|s| s.iter().any(|(g, st)| *g == victim && st == "down"))
    })
    .await;
    let down_after = t.elapsed();
    let revived = gw.revive();
    down?;
    revived?;
    println!("  the page showed {victim} down {} ms after the kill", down_after.as_millis());
    let t = Instant::now();
    poll("the page to show every gateway up again", Duration::from_secs(60), async || all_up(c, names).await).await?;
    let up_after = t.elapsed();

    // `--`: a token id may start with `-`.
    control.meshctl(["tokens", "revoke", "--", token_id])?;
    let revoked_signs_out = poll("the login form after the revocation", Duration::from_secs(10), async || {
        c.find(Locator::Css("#login")).await.is_ok()
    })
    .await
    .is_ok();
    Ok(Outcome { up, screenshot: screenshot.to_owned(), down_after, up_after, revoked_signs_out, paths })
}

/// Stops chromedriver (and so its browser) when the check ends.
struct Kill(Option<mesh_lab::Process>);

impl Drop for Kill {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = p.terminate();
        }
    }
}

/// Where a copy of the screenshot goes for the README and CI artifacts:
/// `target/demo-artifacts/` (or under `CARGO_TARGET_DIR`).
pub(crate) fn artifact_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"), PathBuf::from)
        .join("demo-artifacts")
}
