//! mesh-control, in process, on its own thread inside a lab host's network
//! namespace (feature `control`): the control plane of the e2e tests, the
//! demo and the failover benchmark, each with its own configuration.

use std::time::Duration;

use crate::{Host, LabError, Result};

/// How long control may take to open its listeners.
const START: Duration = Duration::from_secs(30);

/// Where the lab's control serves gRPC (its host is 192.0.2.100).
pub const ADDRESS: &str = "192.0.2.100:7443";

/// The lab's control configuration: gRPC on [`ADDRESS`] with a certificate
/// for 192.0.2.100, its data and admin socket in `dir`, no metrics, the
/// store polled every 100 ms. Callers set what their test varies on top.
#[must_use]
pub fn lab_config(dir: &std::path::Path) -> mesh_control::config::Config {
    mesh_control::config::Config {
        listen: ADDRESS.parse().expect("a socket address"),
        tls_names: vec!["192.0.2.100".into()],
        data_dir: dir.to_owned(),
        metrics_listen: None,
        admin_socket: Some(dir.join("admin.sock")),
        poll_interval_ms: 100,
        ..mesh_control::config::Config::default()
    }
}

/// A running control; stopped (its listeners closed, its runtime shut
/// down) by [`Self::stop`] or on drop.
#[derive(Debug)]
pub struct ControlInNs {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ControlInNs {
    /// Starts control with `config` inside `host`'s namespace and waits
    /// until it serves.
    pub fn start(host: &Host, config: mesh_control::config::Config) -> Result<Self> {
        Self::start_with_clock(host, config, std::sync::Arc::new(mesh_control::engine::SystemClock))
    }

    /// [`Self::start`], with control's engine reading the time from `clock`
    /// (a test sets it back, as after a clock step).
    pub fn start_with_clock(
        host: &Host,
        config: mesh_control::config::Config,
        clock: std::sync::Arc<dyn mesh_control::engine::Clock>,
    ) -> Result<Self> {
        let host = host.clone();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<(), String>>();
        let thread = std::thread::Builder::new()
            .name("mesh-control".into())
            .spawn(move || {
                let run = || -> Result<tokio::runtime::Runtime, String> {
                    host.enter_current_thread().map_err(|e| e.to_string())?;
                    tokio::runtime::Builder::new_multi_thread()
                        .worker_threads(2)
                        .enable_all()
                        .build()
                        .map_err(|e| e.to_string())
                };
                let rt = match run() {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                rt.block_on(async move {
                    match mesh_control::run::start_with_clock(&config, clock).await {
                        Ok(running) => {
                            let _ = ready_tx.send(Ok(()));
                            let _ = stopped.await;
                            running.shutdown();
                        }
                        Err(e) => {
                            let _ = ready_tx.send(Err(format!("{e:#}")));
                        }
                    }
                });
                rt.shutdown_timeout(Duration::from_secs(2));
            })
            .map_err(|source| LabError::Sys { what: "spawning control's thread".into(), source })?;
        let started = ready_rx
            .recv_timeout(START)
            .map_err(|_| LabError::Timeout { what: "mesh-control to start".into(), after: START })?;
        let mut me = Self { stop: Some(stop), thread: Some(thread) };
        if let Err(e) = started {
            me.stop();
            return Err(LabError::Service { what: "mesh-control".into(), error: e });
        }
        Ok(me)
    }

    /// Stops control and waits for its thread.
    pub fn stop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for ControlInNs {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Whether, in control's route list, gateway `node` is the primary of
/// `prefix` and the only gateway owning its site side: a site switch has
/// settled on it at control.
#[must_use]
pub fn settled_on(routes: &[mesh_proto::v1::Route], prefix: &str, node: &str) -> bool {
    routes.iter().any(|r| r.prefix == prefix && r.node_name == node && r.primary && r.owner)
        && !routes.iter().any(|r| r.prefix == prefix && r.node_name != node && r.owner)
}
