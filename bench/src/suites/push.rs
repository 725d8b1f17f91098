//! `push`: how fast a policy change reaches every agent.
//!
//! N simulated agents (N = 100, 1,000, 10,000; `--quick`: 100, 1,000) enroll
//! and hold real gRPC Sync streams over TLS to a control server in the same
//! process (SQLite store): one connection each while the open-file limit
//! allows (client and server ends both count here), else a few agents
//! share a connection, one HTTP/2 stream each. The policy puts them
//! in sites of 20 that may reach each other, and has one rule every node
//! installs ("the monitoring host may scrape port P"). Each of 20 changes
//! moves P, so every agent gets a new generation (a delta carrying its new
//! rules), applies it and acks over the stream.
//!
//! Metrics per change: milliseconds from the admin's SetPolicy call to the
//! last agent sending its ack; process CPU seconds during the change;
//! and the process RSS (control plus the simulated agents, which share the
//! process; `rss_control_only_mb` is measured after enrollment with the
//! agents' streams not yet open, as a bound on control's share).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use mesh_client::bearer::Bearer;
use mesh_client::channel::{Trust, connect};
use mesh_control::config::Config;
use mesh_control::sim::SimAgent;
use mesh_proto::v1 as pb;
use mesh_proto::v1::admin_service_client::AdminServiceClient;

use crate::{Ctx, Results, chart};

const SITE: usize = 20;
const CHANGES: usize = 20;
const BASE_PORT: u32 = 10_000;

fn policy(n: usize, port: u32) -> String {
    let sites = n.div_ceil(SITE);
    let owners: Vec<String> = (0..sites).map(|s| format!("\"tag:s{s}\": []")).collect();
    let acls: Vec<String> = (0..sites)
        .map(|s| format!("{{\"action\": \"accept\", \"src\": [\"tag:s{s}\"], \"dst\": [\"tag:s{s}:22\"]}}"))
        .collect();
    format!(
        "{{\"tagOwners\": {{{}}}, \"hosts\": {{\"monitoring\": \"192.0.2.50\"}},\n\"acls\": [{},\n{{\"action\": \"accept\", \"src\": [\"monitoring\"], \"dst\": [\"*:{port}\"]}}]}}",
        owners.join(", "),
        acls.join(",\n")
    )
}

fn proc_cpu_secs() -> f64 {
    let mut u = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: getrusage writes a rusage into the pointer we own.
    let ok = unsafe { libc::getrusage(libc::RUSAGE_SELF, u.as_mut_ptr()) } == 0;
    if !ok {
        return 0.0;
    }
    // SAFETY: initialised by the successful call above.
    let u = unsafe { u.assume_init() };
    let t = |tv: libc::timeval| tv.tv_sec as f64 + tv.tv_usec as f64 / 1e6;
    t(u.ru_utime) + t(u.ru_stime)
}

fn rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("VmRSS:")).map(str::to_owned))
        .and_then(|l| l.split_whitespace().nth(1).and_then(|kb| kb.parse::<f64>().ok()))
        .map_or(0.0, |kb| kb / 1024.0)
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

/// Per change: how many agents have acked it and when the last one did.
struct Progress {
    acked: Vec<AtomicUsize>,
    last: Vec<std::sync::Mutex<Option<Instant>>>,
}

async fn run_n(ctx: &Ctx, results: &mut Results, n: usize, fd_limit: u64) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let config = Config {
        listen: "127.0.0.1:0".parse()?,
        data_dir: dir.path().to_owned(),
        metrics_listen: None,
        admin_socket: None,
        limits: mesh_control::sim::loopback_limits(),
        ..Config::default()
    };
    let control = mesh_control::run::start(&config).await.context("starting control")?;
    let addr = control.addr.to_string();
    let ch = connect(&addr, &Trust::Pin(control.ca_pin)).await?;
    let mut admin = AdminServiceClient::with_interceptor(ch, Bearer(control.bootstrap_admin_token.clone()));
    admin.set_policy(pb::PolicyDocument { text: policy(n, BASE_PORT), generation: 0 }).await?;
    let sites = n.div_ceil(SITE);
    let mut keys = Vec::new();
    for s in 0..sites {
        let k = admin
            .create_enrollment_key(pb::CreateEnrollmentKeyRequest {
                reusable: true,
                preapproved: true,
                tags: vec![format!("tag:s{s}")],
                ..Default::default()
            })
            .await?
            .into_inner()
            .secret;
        keys.push(k);
    }
    ctx.progress("push", format!("N={n}: enrolling"));
    let started = Instant::now();
    let keys = Arc::new(keys);
    let mut agents = Vec::with_capacity(n);
    // One TLS connection per agent, unless that would pass the open-file
    // limit (each connection costs two descriptors here, client and
    // server): then agents share connections, one HTTP/2 stream each.
    let per_conn = (n as u64 * 2).div_ceil(fd_limit.saturating_sub(1000).max(1000)).max(1) as usize;
    let conns = n.div_ceil(per_conn);
    let mut channels = Vec::with_capacity(conns);
    for _ in 0..conns {
        channels.push(connect(&addr, &Trust::Pin(control.ca_pin)).await?);
    }
    ctx.progress("push", format!("N={n}: {conns} TLS connections ({per_conn} agents each)"));
    // Enroll in parallel waves.
    for chunk in (0..n).collect::<Vec<_>>().chunks(200) {
        let mut set = tokio::task::JoinSet::new();
        for &i in chunk {
            let (ch, keys) = (channels[i / per_conn].clone(), keys.clone());
            set.spawn(async move { SimAgent::enroll_on(ch, &keys[i / SITE], &format!("n{i}"), &[]).await });
        }
        while let Some(r) = set.join_next().await {
            agents.push(r??);
        }
    }
    ctx.progress("push", format!("N={n}: enrolled in {:.1}s", started.elapsed().as_secs_f64()));
    let rss_control = rss_mb();

    let progress = Arc::new(Progress {
        acked: (0..=CHANGES).map(|_| AtomicUsize::new(0)).collect(),
        last: (0..=CHANGES).map(|_| std::sync::Mutex::new(None)).collect(),
    });
    let connected = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::with_capacity(n);
    for a in agents {
        let (progress, connected) = (progress.clone(), connected.clone());
        tasks.push(tokio::spawn(async move {
            let mut s = a.sync().await?;
            connected.fetch_add(1, Ordering::Relaxed);
            loop {
                let Some(generation) = s.next(Duration::from_secs(3600)).await? else { continue };
                s.ack(generation).await?;
                let port = s
                    .view
                    .as_ref()
                    .and_then(|v| v.policy.as_ref())
                    .and_then(|p| p.rules.iter().map(|r| r.port_first).find(|p| *p >= BASE_PORT));
                if let Some(i) = port.map(|p| (p - BASE_PORT) as usize).filter(|i| *i >= 1 && *i <= CHANGES) {
                    *progress.last[i].lock().unwrap() = Some(Instant::now());
                    progress.acked[i].fetch_add(1, Ordering::Relaxed);
                }
            }
            #[expect(unreachable_code, reason = "the loop ends with an error when control goes away")]
            Ok::<(), mesh_control::sim::SimError>(())
        }));
    }
    while connected.load(Ordering::Relaxed) < n {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Let presence updates and the first snapshots settle.
    tokio::time::sleep(Duration::from_secs(2)).await;
    ctx.progress("push", format!("N={n}: {n} streams open; {CHANGES} policy changes"));
    for i in 1..=CHANGES {
        let cpu0 = proc_cpu_secs();
        let t0 = Instant::now();
        admin.set_policy(pb::PolicyDocument { text: policy(n, BASE_PORT + i as u32), generation: 0 }).await?;
        let deadline = Instant::now() + Duration::from_secs(600);
        while progress.acked[i].load(Ordering::Relaxed) < n {
            anyhow::ensure!(
                Instant::now() < deadline,
                "change {i}: only {} of {n} acked",
                progress.acked[i].load(Ordering::Relaxed)
            );
            tokio::time::sleep(Duration::from_micros(500)).await;
        }
        let last = progress.last[i].lock().unwrap().unwrap_or_else(Instant::now);
        let ms = last.duration_since(t0).as_secs_f64() * 1e3;
        let run = u32::try_from(i).unwrap_or(0);
        results.push("mesh-control", n, "change_to_last_ack_ms", ms, "ms", run);
        results.push("mesh-control", n, "cpu_per_change_s", proc_cpu_secs() - cpu0, "s", run);
        results.push("mesh-control", n, "rss_process_mb", rss_mb(), "MiB", run);
    }
    results.push("mesh-control", n, "rss_control_only_mb", rss_control, "MiB", 0);
    // p99 of 20 samples: the nearest-rank value (the 20th, i.e. the max).
    let mut lat: Vec<f64> = results
        .records()
        .iter()
        .filter(|r| r.metric == "change_to_last_ack_ms" && r.param == n.to_string())
        .map(|r| r.value)
        .collect();
    lat.sort_by(f64::total_cmp);
    if let Some(p99) = lat.get(((lat.len() as f64 * 0.99).ceil() as usize).saturating_sub(1)) {
        results.push("mesh-control", n, "change_to_last_ack_p99_ms", *p99, "ms", 0);
    }
    for t in tasks {
        t.abort();
    }
    control.shutdown();
    Ok(())
}

/// Runs the suite.
pub fn run(ctx: &Ctx) -> anyhow::Result<Results> {
    let fd_limit = raise_fd_limit();
    let mut results = Results::new("push", None);
    let sizes: &[usize] = if ctx.quick { &[100, 1_000] } else { &[100, 1_000, 10_000] };
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    for &n in sizes {
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
