//! `mesh-relay --config relay.toml`: the relay server.

use std::path::PathBuf;

use anyhow::Context as _;
use clap::Parser;
use mesh_relay::{Relay, RelayConfig};

#[derive(Parser, Debug)]
#[command(version, about = "Relays encrypted WireGuard datagrams between mesh nodes")]
struct Cli {
    /// TOML configuration (see relay.example.toml).
    #[arg(long)]
    config: PathBuf,
    /// Print the certificate pin (hex SHA-256 of its DER), generating the
    /// certificate if missing, and exit.
    #[arg(long)]
    print_pin: bool,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // Logs on stderr, so that `--print-pin` prints the pin alone on stdout.
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let config = RelayConfig::load(&cli.config).with_context(|| format!("loading {}", cli.config.display()))?;
    if cli.print_pin {
        println!("{}", hex::encode(mesh_relay::server::certificate_pin(&config)?));
        return Ok(());
    }
    let relay = Relay::bind(config).await.context("starting mesh-relay")?;
    tracing::info!(
        listen = %relay.local_addr(),
        reflector = ?relay.reflector_addr(),
        metrics = ?relay.metrics_addr(),
        pin = %hex::encode(relay.cert_pin()),
        "mesh-relay listening"
    );
    // systemd and Kubernetes stop services with SIGTERM; a terminal with SIGINT.
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    relay
        .serve(async move {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        })
        .await;
    Ok(())
}
