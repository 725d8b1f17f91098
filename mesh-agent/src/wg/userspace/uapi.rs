//! The engine's UAPI socket (`/var/run/wireguard/<ifname>.sock`), served by
//! us rather than by gotatun's `UapiServer::default_unix_socket`: a `get`
//! on it returns the private key, and gotatun binds it with whatever mode
//! the umask gives (0755 under the usual 022: any local user could connect).
//!
//! Here it is bound through [`mesh_local::socket::bind_private`]: staged in
//! a 0700 directory, chmodded 0600 there and renamed into place, so no
//! window exists in which it is reachable with a looser mode (a chmod after
//! bind leaves one; a umask change races with the agent's other threads,
//! the umask being process-wide). Every connection's peer uid is checked
//! too. Each allowed connection speaks the standard text protocol through
//! gotatun's [`UapiClient::wrap_read_write`] (a thread per connection; `wg`
//! and wireguard-control open short ones).

use std::path::Path;

use gotatun::device::uapi::{UapiClient, UapiServer};
use mesh_local::socket::{BindError, PrivateListener};

/// Binds the UAPI socket at `path` and serves it on the current tokio
/// runtime; the returned server goes to `DeviceBuilder::with_uapi`.
pub(super) fn serve(path: &Path) -> Result<UapiServer, BindError> {
    let listener = mesh_local::socket::bind_private(path)?;
    let (client, server) = UapiServer::new();
    tokio::spawn(accept(listener, client));
    Ok(server)
}

async fn accept(listener: PrivateListener, client: UapiClient) {
    loop {
        let stream = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(socket = %listener.path().display(), error = %e, "UAPI socket stopped accepting");
                return;
            }
        };
        // The protocol loop is blocking (a thread per connection).
        let stream = stream.into_std().and_then(|s| s.set_nonblocking(false).map(|()| s));
        match stream {
            Ok(s) => client.clone().wrap_read_write(s),
            Err(e) => tracing::warn!(socket = %listener.path().display(), error = %e, "UAPI connection dropped"),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;

    use mesh_local::testing::{NOBODY, Outcome, connect_as};

    use super::*;

    /// 0600 under a permissive umask (gotatun's own socket came out 0777
    /// there), and another uid is refused even when the mode is loosened.
    #[test]
    fn uapi_socket_is_0600_and_refuses_other_uids() {
        if !mesh_lab::root_or_skip("uapi_socket_is_0600_and_refuses_other_uids") {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let path = dir.path().join("tlo-wg0.sock");
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
        // Own process under nextest: the umask is this test's.
        let old = nix::sys::stat::umask(nix::sys::stat::Mode::empty());
        let server = rt.block_on(async { serve(&path) });
        nix::sys::stat::umask(old);
        let _server = server.unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(connect_as(NOBODY, &path, b"get=1\n\n"), Outcome::Denied);
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666)).unwrap();
        // Refused at once (an accepted connection would wait for the
        // device's answer instead).
        assert_eq!(connect_as(NOBODY, &path, b"get=1\n\n"), Outcome::Closed);
    }
}
