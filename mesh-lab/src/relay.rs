//! mesh-relay in a lab namespace, on its own thread and runtime, for the
//! tests that relay WireGuard through it.

use std::time::Duration;

use crate::{Host, LabError, Result};

/// How long the relay may take to bind.
const START: Duration = Duration::from_secs(10);

/// A relay serving inside a lab host's namespace until dropped.
#[derive(Debug)]
pub struct RelayInNs {
    pin: [u8; 32],
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl RelayInNs {
    /// Binds `config` inside `host`'s namespace and serves it.
    pub fn start(host: &Host, config: mesh_relay::server::RelayConfig) -> Result<Self> {
        let host = host.clone();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<std::result::Result<[u8; 32], String>>();
        let thread = std::thread::Builder::new()
            .name("mesh-relay".into())
            .spawn(move || {
                let rt = host.enter_current_thread().map_err(|e| e.to_string()).and_then(|()| {
                    tokio::runtime::Builder::new_multi_thread()
                        .worker_threads(1)
                        .enable_all()
                        .build()
                        .map_err(|e| e.to_string())
                });
                let rt = match rt {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                rt.block_on(async move {
                    match mesh_relay::server::Relay::bind(config).await {
                        Ok(relay) => {
                            let _ = ready_tx.send(Ok(relay.cert_pin()));
                            relay
                                .serve(async {
                                    let _ = stopped.await;
                                })
                                .await;
                        }
                        Err(e) => {
                            let _ = ready_tx.send(Err(e.to_string()));
                        }
                    }
                });
            })
            .map_err(|source| LabError::Sys { what: "spawning the relay's thread".into(), source })?;
        let started = ready_rx
            .recv_timeout(START)
            .map_err(|_| LabError::Timeout { what: "mesh-relay to start".into(), after: START })?;
        let mut me = Self { pin: [0; 32], stop: Some(stop), thread: Some(thread) };
        match started {
            Ok(pin) => {
                me.pin = pin;
                Ok(me)
            }
            Err(e) => {
                me.stop();
                Err(LabError::Service { what: "mesh-relay".into(), error: e })
            }
        }
    }

    /// SHA-256 of the relay's certificate: what nodes pin.
    #[must_use]
    pub const fn pin(&self) -> [u8; 32] {
        self.pin
    }

    /// Stops the relay and waits for its thread.
    pub fn stop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for RelayInNs {
    fn drop(&mut self) {
        self.stop();
    }
}
