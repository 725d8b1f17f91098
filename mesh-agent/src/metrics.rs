//! The agent's metrics endpoint: Prometheus text over plain HTTP on
//! `metrics_listen` (GET /metrics), rendered from the live status.

use std::net::SocketAddr;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use crate::{agent::WorkerHandle, control::SharedControlState, probe::SharedProbe};

/// Serves `GET /metrics` on `addr` until the runtime stops. With a control
/// session, its facts and the probes' statistics are included.
pub async fn serve(addr: SocketAddr, worker: WorkerHandle, control: Option<(SharedControlState, SharedProbe)>) {
    let listener = match tokio::net::TcpListener::bind(addr).await {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(%addr, error = %e, "metrics endpoint not available");
            return;
        }
    };
    tracing::info!(%addr, "metrics endpoint ready");
    loop {
        let Ok((mut stream, _)) = listener.accept().await else { continue };
        let worker = worker.clone();
        let control = control.clone();
        tokio::spawn(async move {
            let mut buf = [0u8; 1024];
            let n = stream.read(&mut buf).await.unwrap_or(0);
            let request = String::from_utf8_lossy(&buf[..n]);
            let (status, body) = if request.starts_with("GET /metrics") {
                match worker.status().await {
                    Some(s) => {
                        let mut text = s.prometheus();
                        if let Some((c, p)) = &control {
                            if let Ok(c) = c.lock() {
                                text.push_str(&c.prometheus());
                            }
                            if let Ok(p) = p.lock() {
                                text.push_str(&p.prometheus());
                            }
                        }
                        ("200 OK", text)
                    }
                    None => ("503 Service Unavailable", "the reconcile thread stopped\n".to_owned()),
                }
            } else {
                ("404 Not Found", "try /metrics\n".to_owned())
            };
            let head = format!(
                "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            let _ = stream.write_all(head.as_bytes()).await;
            let _ = stream.write_all(body.as_bytes()).await;
            let _ = stream.shutdown().await;
        });
    }
}
