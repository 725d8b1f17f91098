//! `push`: how fast changes reach every agent, and what they cost control.
//!
//! A real `mesh-control` process (release build, SQLite store) and N
//! simulated agents (N = 100, 1,000, 10,000) in this process, each on its
//! own gRPC+TLS connection while the open-file limit allows (else a few
//! share one, an HTTP/2 stream each). The policy puts the agents in sites
//! of 20 that may reach each other, and has one rule every node installs
//! ("the monitoring host may scrape port P"). Site 0's first two nodes are
//! the gateways of a site prefix (auto-approved), which site 0 may reach.
//!
//! Per N, in one run:
//! - **enrollment**: all N agents enroll at once (retrying when control
//!   says it is busy, as agents do), open their Sync stream and get their
//!   first view; seconds from the start to the last first view;
//! - **policy changes**: each change moves P, so every agent gets a new
//!   generation (a delta with its new rules), applies it and acks;
//!   milliseconds from the admin's SetPolicy call to the last ack;
//! - **route flips**: the prefix's primary gateway reports the route down
//!   (the other one reporting it up), so the primary moves; milliseconds
//!   from the report to the last ack of a view with the new primary by
//!   the nodes that route to the prefix, and how many views the whole mesh
//!   received for it (only those nodes should get one);
//! - control's CPU seconds per change and per flip, and its RSS, read
//!   from `/proc` for the control process alone.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use mesh_client::channel::{Channel, Trust, connect, connect_unix};
use mesh_client::enrollment::EnrollmentKeyText;
use mesh_control::sim::{SimAgent, SimError, SyncSession};
use mesh_proto::v1 as pb;
use mesh_proto::v1::admin_service_client::AdminServiceClient;
use tokio::sync::mpsc;

use crate::{Ctx, Results, chart};

const SITE: usize = 20;
const BASE_PORT: u32 = 10_000;
/// Site 0's prefix; its gateways are agents 0 and 1.
const PREFIX: &str = "10.99.0.0/24";

fn policy(n: usize, port: u32) -> String {
    let sites = n.div_ceil(SITE);
    let owners: Vec<String> = (0..sites).map(|s| format!("\"tag:s{s}\": []")).collect();
    let acls: Vec<String> = (0..sites)
        .map(|s| {
            let site = if s == 0 { format!(", \"{PREFIX}:*\"") } else { String::new() };
            format!("{{\"action\": \"accept\", \"src\": [\"tag:s{s}\"], \"dst\": [\"tag:s{s}:22\"{site}]}}")
        })
        .collect();
    format!(
        "{{\"tagOwners\": {{{}}}, \"hosts\": {{\"monitoring\": \"192.0.2.50\"}},\n\
         \"autoApprovers\": {{\"routes\": {{\"{PREFIX}\": [\"tag:s0\"]}}}},\n\
         \"acls\": [{},\n{{\"action\": \"accept\", \"src\": [\"monitoring\"], \"dst\": [\"*:{port}\"]}}]}}",
        owners.join(", "),
        acls.join(",\n")
    )
}

/// Raises the open-file limit to its hard maximum; returns the new limit.
fn raise_fd_limit() -> u64 {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: plain syscalls on a value we own; failure leaves the old limit.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
    lim.rlim_cur
}

/// The mesh-control process under test (killed on drop).
struct Control {
    child: std::process::Child,
    dir: tempfile::TempDir,
    addr: String,
}

impl Control {
    fn start() -> anyhow::Result<Self> {
        // `MESH_BENCH_CONTROL=PATH` measures another build (an older
        // commit's, say) against the same simulated agents.
        let bin = match std::env::var_os("MESH_BENCH_CONTROL") {
            Some(path) => path.into(),
            None => crate::util::binary("mesh-control")?,
        };
        let dir = tempfile::tempdir()?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let addr = format!("127.0.0.1:{port}");
        let config = dir.path().join("control.toml");
        // Enrollment from one address as fast as the agents ask for it.
        std::fs::write(
            &config,
            format!(
                "listen = \"{addr}\"\ndata_dir = \"{d}\"\nadmin_socket = \"{d}/admin.sock\"\n\
                 metrics_listen = \"127.0.0.1:0\"\n[limits]\n\
                 enroll_per_source = {{ per_second = 100000, burst = 100000 }}\n\
                 enroll_per_key = {{ per_second = 100000, burst = 100000 }}\nenroll_concurrency = 4\n",
                d = dir.path().display()
            ),
        )?;
        let log = std::fs::File::create(dir.path().join("control.log"))?;
        let child = std::process::Command::new(bin)
            .args(["serve", "--config"])
            .arg(&config)
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting mesh-control")?;
        Ok(Self { child, dir, addr })
    }

    async fn admin(&self) -> anyhow::Result<AdminServiceClient<Channel>> {
        let sock = self.dir.path().join("admin.sock");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(ch) = connect_unix(&sock).await {
                return Ok(AdminServiceClient::new(ch));
            }
            anyhow::ensure!(Instant::now() < deadline, "mesh-control did not start: {}", self.log());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("control.log")).unwrap_or_default()
    }

    /// User plus system CPU seconds so far.
    fn cpu_secs(&self) -> f64 {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.child.id())).unwrap_or_default();
        // Fields after the command name (which may hold spaces): utime is
        // the 14th field of the line, stime the 15th.
        let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
        let f: Vec<f64> = rest.split_whitespace().skip(11).take(2).filter_map(|x| x.parse().ok()).collect();
        // SAFETY: sysconf has no preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
        f.iter().sum::<f64>() / hz.max(1.0)
    }

    /// Resident set size, MiB.
    fn rss_mb(&self) -> f64 {
        std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .ok()
            .and_then(|s| s.lines().find(|l| l.starts_with("VmRSS:")).map(str::to_owned))
            .and_then(|l| l.split_whitespace().nth(1).and_then(|kb| kb.parse::<f64>().ok()))
            .map_or(0.0, |kb| kb / 1024.0)
    }
}

impl Drop for Control {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What the agents report back, shared by their tasks.
#[derive(Default)]
struct Progress {
    /// Agents holding their first view, and when the last one got it.
    first: AtomicUsize,
    first_last: Mutex<Option<Instant>>,
    /// Per policy change (index = port - BASE_PORT): acks, last ack.
    acked: Vec<AtomicUsize>,
    last: Vec<Mutex<Option<Instant>>>,
    /// The primary the current flip moves the prefix to; agents that ack a
    /// view with it, and when the last one did.
    flip_to: AtomicU64,
    flip_acked: AtomicUsize,
    flip_last: Mutex<Option<Instant>>,
    /// Every view (snapshot or delta) any agent received.
    views: AtomicUsize,
}

fn stamp(at: &Mutex<Option<Instant>>) {
    *at.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(Instant::now());
}

fn stamped(at: &Mutex<Option<Instant>>) -> Instant {
    at.lock().unwrap_or_else(std::sync::PoisonError::into_inner).unwrap_or_else(Instant::now)
}

/// Enrolls, retrying as an agent does while control is busy.
async fn enroll(ch: Channel, key: &str, name: &str, routes: &[&str]) -> Result<SimAgent, SimError> {
    let mut wait = Duration::from_millis(50);
    loop {
        match SimAgent::enroll_on(ch.clone(), key, name, routes).await {
            Err(SimError::Status(s))
                if matches!(s.code(), tonic::Code::ResourceExhausted | tonic::Code::Unavailable) =>
            {
                // Backoff with jitter, so retries do not arrive in waves.
                let jitter = u64::from(rand::random::<u16>() % 100);
                tokio::time::sleep(wait + Duration::from_millis(jitter)).await;
                wait = (wait * 2).min(Duration::from_secs(2));
            }
            r => return r,
        }
    }
}

fn route_report(healthy: bool) -> pb::HealthReport {
    pb::HealthReport {
        routes: vec![pb::RouteHealth { prefix: PREFIX.into(), healthy, ..Default::default() }],
        ..Default::default()
    }
}

/// One agent: enroll, sync, then apply and ack every view, reporting the
/// route's health when told to (gateways only).
async fn agent(
    ch: Channel,
    key: String,
    i: usize,
    progress: Arc<Progress>,
    mut health: Option<mpsc::UnboundedReceiver<bool>>,
) -> Result<(), SimError> {
    let routes: &[&str] = if health.is_some() { &[PREFIX] } else { &[] };
    let a = enroll(ch, &key, &format!("n{i}"), routes).await?;
    let mut s: SyncSession = a.sync().await?;
    let mut first = true;
    let mut primary = 0;
    // The policy change last counted (by its port).
    let mut counted = BASE_PORT;
    // Gateways look for health orders between views.
    let poll = if health.is_some() { Duration::from_millis(5) } else { Duration::from_secs(3600) };
    loop {
        if let Some(rx) = health.as_mut() {
            while let Ok(healthy) = rx.try_recv() {
                s.health(route_report(healthy)).await?;
            }
        }
        let Some(generation) = s.next(poll).await? else { continue };
        s.ack(generation).await?;
        progress.views.fetch_add(1, Ordering::Relaxed);
        let Some(view) = s.view.as_ref() else { continue };
        if first {
            first = false;
            stamp(&progress.first_last);
            progress.first.fetch_add(1, Ordering::Relaxed);
        }
        let port = view.policy.as_ref().and_then(|p| p.rules.iter().map(|r| r.port_first).find(|p| *p > BASE_PORT));
        if let Some(p) = port.filter(|p| *p != counted) {
            counted = p;
            let i = (p - BASE_PORT) as usize;
            if let (Some(c), Some(at)) = (progress.acked.get(i), progress.last.get(i)) {
                stamp(at);
                c.fetch_add(1, Ordering::Relaxed);
            }
        }
        let now = view.routes.iter().find(|r| r.prefix == PREFIX).and_then(|r| r.gateways.first().copied());
        if let Some(p) = now.filter(|p| *p != primary) {
            primary = p;
            if p == progress.flip_to.load(Ordering::SeqCst) {
                stamp(&progress.flip_last);
                progress.flip_acked.fetch_add(1, Ordering::SeqCst);
            }
        }
    }
}

async fn wait_until(what: &str, limit: Duration, mut done: impl FnMut() -> bool) -> anyhow::Result<()> {
    let deadline = Instant::now() + limit;
    while !done() {
        anyhow::ensure!(Instant::now() < deadline, "{what}: not done after {limit:?}");
        tokio::time::sleep(Duration::from_micros(500)).await;
    }
    Ok(())
}

/// Nearest-rank p99 of `v`.
fn p99(mut v: Vec<f64>) -> Option<f64> {
    v.sort_by(f64::total_cmp);
    v.get(((v.len() as f64 * 0.99).ceil() as usize).saturating_sub(1)).copied()
}

#[expect(clippy::too_many_lines, reason = "one scenario, step by step")]
async fn run_n(ctx: &Ctx, results: &mut Results, n: usize, fd_limit: u64) -> anyhow::Result<()> {
    // Fewer samples at 10,000 in a quick run.
    let (changes, flips) = if ctx.quick && n >= 10_000 { (5, 5) } else { (20, 10) };
    let control = Control::start()?;
    let mut admin = control.admin().await?;
    admin.set_policy(pb::PolicyDocument { text: policy(n, BASE_PORT), generation: 0 }).await?;
    let sites = n.div_ceil(SITE);
    let mut keys = Vec::new();
    for s in 0..sites {
        let req = pb::CreateEnrollmentKeyRequest {
            reusable: true,
            preapproved: true,
            tags: vec![format!("tag:s{s}")],
            ..Default::default()
        };
        keys.push(admin.create_enrollment_key(req).await?.into_inner().secret);
    }
    let pin = EnrollmentKeyText::parse(&keys[0]).and_then(|k| k.ca_pin).context("the key carries no CA pin")?;

    let progress = Arc::new(Progress {
        acked: (0..=changes).map(|_| AtomicUsize::new(0)).collect(),
        last: (0..=changes).map(|_| Mutex::new(None)).collect(),
        ..Progress::default()
    });
    // One TLS connection per agent, unless that would pass the open-file
    // limit: then agents share connections, one HTTP/2 stream each.
    let per_conn = (n as u64).div_ceil(fd_limit.saturating_sub(1000).max(1000)).max(1) as usize;
    ctx.progress("push", format!("N={n}: {n} agents enroll at once ({per_conn} per TLS connection)"));
    let started = Instant::now();
    let mut gateways = Vec::new();
    let mut tasks = Vec::with_capacity(n);
    let mut ch = None;
    for i in 0..n {
        if i % per_conn == 0 {
            ch = Some(connect(&control.addr, &Trust::Pin(pin)).await?);
        }
        let health = (i < 2).then(|| {
            let (tx, rx) = mpsc::unbounded_channel();
            gateways.push(tx);
            rx
        });
        let (ch, key, progress) = (ch.clone().context("no channel")?, keys[i / SITE].clone(), progress.clone());
        tasks.push(tokio::spawn(agent(ch, key, i, progress, health)));
    }
    let check_tasks = |tasks: &[tokio::task::JoinHandle<Result<(), SimError>>]| tasks.iter().any(|t| t.is_finished());
    wait_until(&format!("{n} agents with their first view"), Duration::from_secs(900), || {
        progress.first.load(Ordering::Relaxed) >= n || check_tasks(&tasks)
    })
    .await?;
    if let Some(t) = tasks.iter_mut().find(|t| t.is_finished()) {
        let r = t.await?;
        anyhow::bail!("an agent stopped: {r:?}\n{}", control.log());
    }
    let enrolled = stamped(&progress.first_last).duration_since(started).as_secs_f64();
    results.push("mesh-control", n, "enroll_to_first_view_s", enrolled, "s", 0);
    ctx.progress("push", format!("N={n}: every agent had its first view after {enrolled:.1}s"));
    // Both gateways report the route up; presence and routes settle.
    for g in &gateways {
        g.send(true)?;
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    results.push("mesh-control", n, "control_rss_mb", control.rss_mb(), "MiB", 0);

    ctx.progress("push", format!("N={n}: {changes} policy changes"));
    let mut lat = Vec::new();
    for i in 1..=changes {
        let cpu0 = control.cpu_secs();
        let t0 = Instant::now();
        let text = policy(n, BASE_PORT + u32::try_from(i)?);
        admin.set_policy(pb::PolicyDocument { text, generation: 0 }).await?;
        wait_until(&format!("change {i} acked by all {n}"), Duration::from_secs(600), || {
            progress.acked[i].load(Ordering::Relaxed) >= n
        })
        .await?;
        let ms = stamped(&progress.last[i]).duration_since(t0).as_secs_f64() * 1e3;
        let run = u32::try_from(i)?;
        lat.push(ms);
        results.push("mesh-control", n, "change_to_last_ack_ms", ms, "ms", run);
        // The last ack is in; give control a moment to account for it.
        tokio::time::sleep(Duration::from_millis(100)).await;
        results.push("mesh-control", n, "control_cpu_per_change_s", control.cpu_secs() - cpu0, "s", run);
    }
    if let Some(p) = p99(lat) {
        results.push("mesh-control", n, "change_to_last_ack_p99_ms", p, "ms", 0);
    }

    ctx.progress("push", format!("N={n}: {flips} route flips"));
    let mut lat = Vec::new();
    let nodes = admin.list_nodes(pb::ListNodesRequest {}).await?.into_inner().nodes;
    let id = |name: &str| nodes.iter().find(|x| x.name == name).map(|x| x.id).context("gateway not enrolled");
    let ids = [id("n0")?, id("n1")?];
    let routes = admin.list_routes(pb::Empty {}).await?.into_inner().routes;
    let up = routes.iter().filter(|r| r.prefix == PREFIX && r.healthy).count();
    anyhow::ensure!(up == 2, "{PREFIX}: {up} healthy gateways of 2 before the flips: {routes:?}");
    for f in 1..=flips {
        // Each flip moves the primary to the other gateway: that one is
        // reported up, then the primary down.
        let routes = admin.list_routes(pb::Empty {}).await?.into_inner().routes;
        let primary = routes.iter().find(|r| r.prefix == PREFIX && r.primary).map(|r| r.node_id);
        let from = usize::from(primary == Some(ids[1]));
        let to = 1 - from;
        gateways[to].send(true)?;
        // Past the per-stream report interval, so both reports count.
        tokio::time::sleep(Duration::from_millis(1200)).await;
        progress.flip_to.store(ids[to], Ordering::SeqCst);
        progress.flip_acked.store(0, Ordering::SeqCst);
        let views0 = progress.views.load(Ordering::SeqCst);
        let cpu0 = control.cpu_secs();
        let t0 = Instant::now();
        gateways[from].send(false)?;
        wait_until(&format!("flip {f}: site {PREFIX} on its new primary"), Duration::from_secs(60), || {
            progress.flip_acked.load(Ordering::SeqCst) >= SITE.min(n)
        })
        .await?;
        let ms = stamped(&progress.flip_last).duration_since(t0).as_secs_f64() * 1e3;
        tokio::time::sleep(Duration::from_millis(300)).await;
        let run = u32::try_from(f)?;
        lat.push(ms);
        results.push("mesh-control", n, "flip_to_last_ack_ms", ms, "ms", run);
        results.push("mesh-control", n, "control_cpu_per_flip_s", control.cpu_secs() - cpu0, "s", run);
        let views = progress.views.load(Ordering::SeqCst) - views0;
        results.push("mesh-control", n, "views_per_flip", views as f64, "views", run);
    }
    if let Some(p) = p99(lat) {
        results.push("mesh-control", n, "flip_to_last_ack_p99_ms", p, "ms", 0);
    }
    results.push("mesh-control", n, "control_rss_after_mb", control.rss_mb(), "MiB", 0);
    for t in tasks {
        t.abort();
    }
    Ok(())
}

/// Runs the suite.
pub fn run(ctx: &Ctx) -> anyhow::Result<Results> {
    let fd_limit = raise_fd_limit();
    let mut results = Results::new("push", None);
    // `MESH_BENCH_PUSH_SIZES=2000,5000` runs other sizes (for profiling).
    let sizes: Vec<usize> = match std::env::var("MESH_BENCH_PUSH_SIZES") {
        Ok(list) => {
            list.split(',').map(|s| s.trim().parse().context("MESH_BENCH_PUSH_SIZES")).collect::<Result<_, _>>()?
        }
        Err(_) => vec![100, 1_000, 10_000],
    };
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    for &n in &sizes {
        rt.block_on(run_n(ctx, &mut results, n, fd_limit))?;
    }
    let summaries = results.summaries();
    std::fs::create_dir_all(&ctx.out)?;
    chart::line_chart(
        &ctx.out.join("push.svg"),
        "policy change to last agent ack",
        "change_to_last_ack_ms",
        &summaries,
        true,
    )?;
    Ok(results)
}

#[cfg(test)]
mod tests {
    #[test]
    fn bench_policy_is_valid() {
        let p = mesh_control::policy::Policy::parse(&super::policy(45, 10_001)).unwrap();
        assert_eq!(p.acls.len(), 4);
    }
}
