//! `mesh-agent`: the gateway agent.
//!
//! - `mesh-agent run --config FILE`: long-running; re-applies the last
//!   applied node view, reconciles periodically, serves `apply`/`status`.
//!   SIGTERM stops it, by default leaving the data path in place.
//! - `mesh-agent apply --config FILE --state VIEW`: applies a node view (JSON
//!   or TOML) through the running agent; with no agent running and the
//!   kernel backend, applies it directly.
//! - `mesh-agent status --config FILE [--format text|json|prometheus]`.
//! - `mesh-agent pubkey --config FILE`: the node's public key (generating
//!   the private key on first use), what the node registers.

use std::{
    path::{Path, PathBuf},
    process::ExitCode,
    time::Duration,
};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand, ValueEnum};
use mesh_agent::{
    admin::{self, AdminError, Request},
    agent::{self, Agent},
    config::Config,
    keys,
    state::StateStore,
    status::Status,
    view::NodeView,
    wg::BackendKind,
};

#[derive(Parser, Debug)]
#[command(name = "mesh-agent", version, about = "The mesh gateway agent")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Run the agent until SIGTERM.
    Run {
        /// Configuration file (TOML).
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Apply a node view from a file.
    Apply {
        /// Configuration file (TOML).
        #[arg(long, short)]
        config: PathBuf,
        /// The node view (`.json` or TOML).
        #[arg(long)]
        state: PathBuf,
        /// Seconds to wait for the agent's answer.
        #[arg(long, default_value_t = 120)]
        timeout: u64,
    },
    /// Show what is applied.
    Status {
        /// Configuration file (TOML).
        #[arg(long, short)]
        config: PathBuf,
        /// Output format.
        #[arg(long, value_enum, default_value_t = Format::Text)]
        format: Format,
    },
    /// Print the node's public key (generating its private key if needed).
    Pubkey {
        /// Configuration file (TOML).
        #[arg(long, short)]
        config: PathBuf,
    },
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Format {
    Text,
    Json,
    Prometheus,
}

fn init_logs(config: &Config) {
    use std::io::IsTerminal as _;
    // gotatun logs every UAPI connection at info: one per reconcile read.
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(format!("gotatun=warn,{}", config.log)));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .try_init();
}

fn load(config: &Path) -> anyhow::Result<Config> {
    let c = Config::load(config)?;
    init_logs(&c);
    Ok(c)
}

fn main() -> ExitCode {
    match real_main() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mesh-agent: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn real_main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Cmd::Run { config } => {
            let config = load(&config)?;
            Agent::new(config)?.run()?;
            Ok(())
        }
        Cmd::Apply { config, state, timeout } => apply(&load(&config)?, &state, Duration::from_secs(timeout)),
        Cmd::Status { config, format } => status(&load(&config)?, format),
        Cmd::Pubkey { config } => {
            let config = load(&config)?;
            let key = keys::load_or_generate(&config.private_key_path())?;
            println!("{}", key.public_key());
            Ok(())
        }
    }
}

fn apply(config: &Config, state: &Path, timeout: Duration) -> anyhow::Result<()> {
    let view = NodeView::load(state)?;
    let req = Request::Apply { view: Box::new(view.clone()) };
    match admin::request(&config.admin_socket(), &req, timeout) {
        Ok(resp) => {
            if let Some(e) = resp.error {
                bail!("apply failed (the agent keeps retrying): {e}");
            }
            let report = resp.report.context("the agent sent no report")?;
            println!("{}", serde_json::to_string(&report)?);
            Ok(())
        }
        Err(AdminError::NotRunning { path, .. }) => {
            // Without a running agent only the kernel backend can hold a
            // configuration: the userspace engine lives inside `run`.
            let selection = agent::choose_backend(config)?;
            if selection.kind != BackendKind::Kernel {
                bail!(
                    "no running agent at {path}, and the {} backend lives inside `mesh-agent run`: start it first",
                    selection.kind
                );
            }
            let mut agent = Agent::new(config.clone())?;
            let result = agent.apply(view);
            agent.shutdown();
            let report = result.map_err(|e| anyhow::anyhow!("apply failed: {e}"))?;
            println!("{}", serde_json::to_string(&report)?);
            Ok(())
        }
        Err(e) => Err(e.into()),
    }
}

fn status(config: &Config, format: Format) -> anyhow::Result<()> {
    let status = match admin::request(&config.admin_socket(), &Request::Status, Duration::from_secs(30)) {
        Ok(resp) => {
            if let Some(e) = resp.error {
                bail!("status failed: {e}");
            }
            *resp.status.context("the agent sent no status")?
        }
        Err(AdminError::NotRunning { .. }) => offline_status(config)?,
        Err(e) => return Err(e.into()),
    };
    match format {
        Format::Json => println!("{}", serde_json::to_string_pretty(&status)?),
        Format::Prometheus => print!("{}", mesh_agent::metrics::status_text(&status)),
        Format::Text => print_text(&status),
    }
    Ok(())
}

/// What can be said without a running agent: the persisted view.
fn offline_status(config: &Config) -> anyhow::Result<Status> {
    let applied = StateStore::open(&config.state_dir)?.load_applied()?;
    let public_key = keys::load_or_generate(&config.private_key_path()).ok().map(|k| k.public_key());
    Ok(Status {
        running: false,
        interface: config.interface.clone(),
        backend: None,
        public_key,
        policy_enforced: false,
        applied_generation: applied.as_ref().map(|v| v.generation),
        desired_generation: None,
        consecutive_failures: 0,
        last_run: None,
        link_up: None,
        mtu: None,
        addresses: applied.as_ref().map(|v| v.addresses.clone()).unwrap_or_default(),
        routes: applied.as_ref().map(|v| v.routes.clone()).unwrap_or_default(),
        peers: vec![],
        observe_error: None,
        dataplane: None,
        handshakes: None,
    })
}

fn print_text(s: &Status) {
    println!("agent: {}", if s.running { "running" } else { "NOT running (showing the persisted view)" });
    println!("interface: {}", s.interface);
    if let Some(b) = &s.backend {
        println!("backend: {} ({})", b.kind, b.reason);
    }
    if let Some(k) = &s.public_key {
        println!("public key: {k}");
    }
    println!("policy enforced: {}", s.policy_enforced);
    println!("applied generation: {}", s.applied_generation.map_or_else(|| "none".into(), |g| g.to_string()));
    if let Some(r) = &s.last_run {
        match (&r.report, &r.error) {
            (Some(rep), _) => {
                println!("last reconcile: ok in {:.1} ms, changes {:?}", rep.duration.as_secs_f64() * 1e3, rep.changes)
            }
            (_, Some(e)) => println!("last reconcile: FAILED ({} in a row): {e}", s.consecutive_failures),
            _ => {}
        }
    }
    if let Some(e) = &s.observe_error {
        println!("reading the actual state failed: {e}");
    }
    if let (Some(up), Some(mtu)) = (s.link_up, s.mtu) {
        println!("link: {} mtu {mtu}", if up { "up" } else { "DOWN" });
    }
    println!("addresses: {:?}", s.addresses);
    println!("routes: {:?}", s.routes);
    for p in &s.peers {
        println!(
            "peer {}{}: endpoint {} allowed {:?} handshake {} rx {} tx {}",
            p.public_key,
            p.name.as_ref().map(|n| format!(" ({n})")).unwrap_or_default(),
            p.endpoint.map_or_else(|| "-".into(), |e| e.to_string()),
            p.allowed_ips,
            p.last_handshake_unix.map_or_else(|| "never".into(), |t| t.to_string()),
            p.rx_bytes,
            p.tx_bytes
        );
    }
}
