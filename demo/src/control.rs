//! mesh-control, in-process, on its own thread inside the lab's `ctl`
//! namespace; and the admin client over its local socket.

use std::{path::Path, time::Duration};

use anyhow::Context as _;
use mesh_lab::Host;
use mesh_proto::v1::admin_service_client::AdminServiceClient;

/// Control's gRPC address in the lab.
pub(crate) const ADDRESS: &str = "192.0.2.100:7443";
/// Control's metrics address in the lab.
pub(crate) const METRICS: &str = "192.0.2.100:9464";

/// A running control; stopped on drop.
#[derive(Debug)]
pub(crate) struct Control {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Control {
    /// Starts control with its data in `dir`.
    pub(crate) fn start(host: &Host, dir: &Path) -> anyhow::Result<Self> {
        let host = host.clone();
        let dir = dir.to_owned();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<(), String>>();
        let thread = std::thread::spawn(move || {
            if let Err(e) = host.enter_current_thread() {
                let _ = ready_tx.send(Err(e.to_string()));
                return;
            }
            let Ok(rt) = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() else {
                let _ = ready_tx.send(Err("runtime".into()));
                return;
            };
            rt.block_on(async move {
                let config = mesh_control::config::Config {
                    listen: ADDRESS.parse().unwrap_or_else(|_| unreachable!()),
                    tls_names: vec!["192.0.2.100".into()],
                    data_dir: dir.clone(),
                    metrics_listen: METRICS.parse().ok(),
                    admin_socket: Some(dir.join("admin.sock")),
                    poll_interval_ms: 100,
                    hold_down_secs: 5,
                    ..mesh_control::config::Config::default()
                };
                match mesh_control::run::start(&config).await {
                    Ok(running) => {
                        let _ = ready_tx.send(Ok(()));
                        let _ = stopped.await;
                        running.shutdown();
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e.to_string()));
                    }
                }
            });
            rt.shutdown_timeout(Duration::from_secs(2));
        });
        ready_rx
            .recv_timeout(Duration::from_secs(30))
            .context("mesh-control did not start in 30 s")?
            .map_err(|e| anyhow::anyhow!("mesh-control: {e}"))?;
        Ok(Self { stop: Some(stop), thread: Some(thread) })
    }
}

impl Drop for Control {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// An admin client over control's local socket (no token needed).
pub(crate) async fn admin(dir: &Path) -> anyhow::Result<AdminServiceClient<tonic::transport::Channel>> {
    Ok(AdminServiceClient::new(mesh_client::channel::connect_unix(&dir.join("admin.sock")).await?))
}
