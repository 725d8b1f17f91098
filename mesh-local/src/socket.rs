//! Private unix sockets: bound 0600 without a race, and a peer-uid check on
//! every connection.
//!
//! Why bind in a private directory and rename rather than chmod after bind
//! or set the umask: `bind(2)` creates the socket file with `0777 & !umask`,
//! so a chmod afterwards leaves a window in which anyone may connect, and
//! the umask is process-wide, so changing it around `bind` races with every
//! other thread creating files (the agent runs several runtimes). A socket
//! bound inside a fresh 0700 directory is unreachable by others whatever its
//! mode; it is chmodded to 0600 there and then renamed into place, which is
//! atomic and keeps the listening socket bound.

use std::{
    io,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
};

use futures::Stream;
use tokio::net::{UnixListener, UnixStream};

/// The mode of every private socket.
pub const SOCKET_MODE: u32 = 0o600;

/// Errors binding a private socket.
#[derive(Debug, thiserror::Error)]
#[error("{what} {path}: {source}")]
pub struct BindError {
    /// The step that failed.
    pub what: &'static str,
    /// The path it concerned.
    pub path: PathBuf,
    /// The error.
    #[source]
    pub source: io::Error,
}

/// Binds a unix socket at `path` that only the owner (and root) can
/// connect to: mode 0600 from the moment it is reachable, replacing a stale
/// socket atomically. Creates the parent directory (0755) if missing. Must
/// be called inside a tokio runtime.
pub fn bind_private(path: &Path) -> Result<PrivateListener, BindError> {
    let err = |what: &'static str| move |source| BindError { what, path: path.to_owned(), source };
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let name = path.file_name().ok_or_else(|| BindError {
        what: "no file name in",
        path: path.to_owned(),
        source: io::Error::from(io::ErrorKind::InvalidInput),
    })?;
    std::fs::create_dir_all(dir).map_err(err("creating the directory of"))?;
    // Same directory, so the rename stays on one filesystem; tempfile
    // creates it 0700 and removes it (now empty) on drop.
    let private = tempfile::Builder::new()
        .prefix(".sock-")
        .tempdir_in(dir)
        .map_err(err("creating a private directory next to"))?;
    let staged = private.path().join(name);
    let listener = UnixListener::bind(&staged).map_err(err("binding"))?;
    std::fs::set_permissions(&staged, std::fs::Permissions::from_mode(SOCKET_MODE))
        .map_err(err("setting the mode of"))?;
    std::fs::rename(&staged, path).map_err(err("moving into place"))?;
    Ok(PrivateListener { listener, path: path.to_owned(), own_uid: nix::unistd::geteuid().as_raw() })
}

/// A listener that hands out only connections from root or from the uid
/// this process runs as.
#[derive(Debug)]
pub struct PrivateListener {
    listener: UnixListener,
    path: PathBuf,
    own_uid: u32,
}

impl PrivateListener {
    /// Where it listens.
    #[must_use]
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The next connection from an allowed peer. Others are closed at once
    /// with a warning naming their uid and pid.
    pub async fn accept(&self) -> io::Result<UnixStream> {
        loop {
            let (stream, _) = self.listener.accept().await?;
            match stream.peer_cred() {
                Ok(cred) if allowed(cred.uid(), self.own_uid) => return Ok(stream),
                Ok(cred) => tracing::warn!(
                    socket = %self.path.display(),
                    uid = cred.uid(),
                    pid = cred.pid(),
                    "refused a connection from a uid that is neither root nor ours"
                ),
                Err(e) => tracing::warn!(
                    socket = %self.path.display(),
                    error = %e,
                    "refused a connection whose peer credentials cannot be read"
                ),
            }
        }
    }

    /// The allowed connections as a stream (for tonic's
    /// `serve_with_incoming`).
    pub fn into_stream(self) -> impl Stream<Item = io::Result<UnixStream>> {
        futures::stream::unfold(self, |l| async move {
            let next = l.accept().await;
            Some((next, l))
        })
    }
}

/// Root may always talk to a local admin socket; otherwise only the uid the
/// server runs as.
fn allowed(peer: u32, own: u32) -> bool {
    peer == 0 || peer == own
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::testing::{NOBODY, Outcome, connect_as};

    /// Serves `hello\n` to every allowed peer.
    fn serve(listener: PrivateListener) {
        tokio::spawn(async move {
            while let Ok(mut s) = listener.accept().await {
                use tokio::io::AsyncWriteExt as _;
                let _ = s.write_all(b"hello\n").await;
            }
        });
    }

    #[tokio::test]
    async fn socket_is_0600_even_with_a_permissive_umask_and_replaces_a_stale_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tlo-admin.sock");
        std::fs::write(&path, "stale").unwrap();
        // This test runs in its own process under nextest: the umask is ours.
        let old = nix::sys::stat::umask(nix::sys::stat::Mode::empty());
        let listener = bind_private(&path);
        nix::sys::stat::umask(old);
        let listener = listener.unwrap();
        let meta = std::fs::symlink_metadata(&path).unwrap();
        assert!(std::os::unix::fs::FileTypeExt::is_socket(&meta.file_type()));
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        // The private staging directory is gone.
        let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(left, [std::ffi::OsString::from("tlo-admin.sock")]);
        drop(listener);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn other_users_are_kept_out_by_the_mode_and_by_their_uid() {
        if !mesh_lab::root_or_skip("other_users_are_kept_out_by_the_mode_and_by_their_uid") {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let path = dir.path().join("tlo-admin.sock");
        serve(bind_private(&path).unwrap());
        let p = path.clone();
        let as_root = tokio::task::spawn_blocking(move || connect_as(0, &p, b"hi\n")).await.unwrap();
        assert_eq!(as_root, Outcome::Answered);
        let p = path.clone();
        let nobody = tokio::task::spawn_blocking(move || connect_as(NOBODY, &p, b"hi\n")).await.unwrap();
        assert_eq!(nobody, Outcome::Denied, "mode 0600 keeps nobody out");
        // Should the mode ever be loosened, the uid check still refuses.
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666)).unwrap();
        let p = path.clone();
        let nobody = tokio::task::spawn_blocking(move || connect_as(NOBODY, &p, b"hi\n")).await.unwrap();
        assert_eq!(nobody, Outcome::Closed, "the peer-uid check refuses nobody");
    }

    #[test]
    fn only_root_and_ourselves() {
        assert!(allowed(0, 1000));
        assert!(allowed(1000, 1000));
        assert!(!allowed(65534, 1000));
        assert!(!allowed(65534, 0));
    }
}
