//! `mesh-control serve --config FILE`: the control plane server.

use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use mesh_control::config::Config;

#[derive(Parser, Debug)]
#[command(version, about = "The mesh control plane")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Run the server.
    Serve {
        /// TOML configuration (see mesh_control::config::Config); defaults
        /// apply when absent.
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Create an admin API token (printed once) in the configured store.
    CreateAdminToken {
        /// TOML configuration.
        #[arg(long)]
        config: Option<PathBuf>,
        /// What it is for.
        #[arg(long, default_value = "")]
        description: String,
    },
    /// Print the public key control signs relay tickets with (base64): put
    /// it in each relay's `control_keys`. Reads the key file in data_dir,
    /// or the database; creates nothing.
    RelayKey {
        /// TOML configuration.
        #[arg(long)]
        config: Option<PathBuf>,
    },
}

fn load(path: Option<&PathBuf>) -> anyhow::Result<Config> {
    match path {
        Some(p) => Ok(Config::load(p)?),
        None => Ok(Config::default()),
    }
}

/// mimalloc rather than glibc's malloc: recomputing thousands of views is
/// allocation-heavy, and with glibc the allocator was ~40% of control's CPU
/// and freed memory stayed spread over per-thread arenas (`cargo xtask
/// bench push`, 1,000 agents: RSS 401 MiB, 217 MiB with two arenas).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    serve().await
}

async fn serve() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .init();
    match Cli::parse().cmd {
        Cmd::Serve { config } => {
            let config = load(config.as_ref())?;
            let running = mesh_control::run::start(&config).await.context("starting mesh-control")?;
            if let Some(token) = &running.bootstrap_admin_token {
                // Shown nowhere, stored only hashed in the store and in this
                // 0600 file for root, whichever store is used.
                let path = mesh_control::run::write_bootstrap_token(&config, token)
                    .context("writing the bootstrap admin token")?;
                tracing::info!(path = %path.display(), "first start: bootstrap admin token written (mode 0600)");
            }
            println!("mesh-control listening on {} (CA pin {})", running.addr, hex::encode(running.ca_pin));
            // systemd and Kubernetes stop services with SIGTERM; a terminal with SIGINT.
            let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
            tokio::select! {
                r = tokio::signal::ctrl_c() => r?,
                _ = term.recv() => {}
            }
            tracing::info!("shutting down");
            running.shutdown();
            Ok(())
        }
        Cmd::CreateAdminToken { config, description } => {
            let config = load(config.as_ref())?;
            let store = mesh_control::store::Store::open(&config.store_url()).await?;
            let token = mesh_control::run::create_admin_token(
                &store,
                &description,
                mesh_control::auth::ADMIN_TOKEN_LIFETIME_SECS,
                "local-admin",
            )
            .await?;
            println!("{token}");
            Ok(())
        }
        Cmd::RelayKey { config } => {
            use mesh_control::relay::key;
            let config = load(config.as_ref())?;
            let mut public = key::public_key(None, &config.data_dir).await?;
            // Only a shared database can know a key this directory lacks; a
            // SQLite file is not created here, owned by whoever runs this.
            if public.is_none() && config.database_url.is_some() {
                let store = mesh_control::store::Store::open(&config.store_url()).await?;
                public = key::public_key(Some(&store), &config.data_dir).await?;
            }
            let public = public.with_context(|| {
                format!(
                    "no relay ticket key yet: mesh-control serve creates {} at its first start",
                    key::path(&config.data_dir).display()
                )
            })?;
            println!("{}", mesh_relay::ticket::key_to_b64(&public));
            Ok(())
        }
    }
}
