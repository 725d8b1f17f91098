//! mesh-control, in-process, on its own thread inside the lab's `ctl`
//! namespace; and the admin client over its local socket.

use std::path::Path;

use mesh_lab::{Host, control::ControlInNs};
use mesh_proto::v1::admin_service_client::AdminServiceClient;

/// Control's gRPC address in the lab.
pub(crate) const ADDRESS: &str = "192.0.2.100:7443";
/// Control's metrics address in the lab.
pub(crate) const METRICS: &str = "192.0.2.100:9464";

/// Starts control with its data in `dir`; it stops when the returned
/// handle is dropped.
pub(crate) fn start(host: &Host, dir: &Path) -> anyhow::Result<ControlInNs> {
    let config = mesh_control::config::Config {
        listen: ADDRESS.parse()?,
        tls_names: vec!["192.0.2.100".into()],
        data_dir: dir.to_owned(),
        metrics_listen: METRICS.parse().ok(),
        admin_socket: Some(dir.join("admin.sock")),
        poll_interval_ms: 100,
        hold_down_secs: 5,
        ..mesh_control::config::Config::default()
    };
    Ok(ControlInNs::start(host, config)?)
}

/// An admin client over control's local socket (no token needed).
pub(crate) async fn admin(dir: &Path) -> anyhow::Result<AdminServiceClient<tonic::transport::Channel>> {
    Ok(AdminServiceClient::new(mesh_client::channel::connect_unix(&dir.join("admin.sock")).await?))
}
