//! The agent's persisted state: the last node view that was fully applied
//! and confirmed. A restarted agent re-applies it before anything else
//! (fail-static: the mesh and the policy stay up while control is away).
//!
//! Every state file (this view, control's credential and its last view) is
//! written by [`write_atomic`]: temporary file, fsync, rename, fsync of the
//! directory, so a crash leaves either the old or the new file, never a
//! torn or empty one.

use std::{
    fs,
    os::unix::fs::DirBuilderExt as _,
    path::{Path, PathBuf},
};

use crate::view::NodeView;

/// Errors of the state store.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// I/O on a state file.
    #[error("state file {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The error.
        source: std::io::Error,
    },
    /// A state file that does not parse.
    #[error("state file {path} is corrupt: {message}")]
    Corrupt {
        /// The file.
        path: String,
        /// The parser's message.
        message: String,
    },
}

/// The state directory.
#[derive(Clone, Debug)]
pub struct StateStore {
    dir: PathBuf,
}

impl StateStore {
    /// Opens (and creates, mode 0700) the state directory.
    pub fn open(dir: &Path) -> Result<Self, StateError> {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|source| StateError::Io { path: dir.display().to_string(), source })?;
        Ok(Self { dir: dir.to_owned() })
    }

    /// Path of the applied view.
    #[must_use]
    pub fn applied_path(&self) -> PathBuf {
        self.dir.join("applied.json")
    }

    /// The last applied view, if any.
    pub fn load_applied(&self) -> Result<Option<NodeView>, StateError> {
        let path = self.applied_path();
        match fs::read_to_string(&path) {
            Ok(text) => serde_json::from_str(&text)
                .map(Some)
                .map_err(|e| StateError::Corrupt { path: path.display().to_string(), message: e.to_string() }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(StateError::Io { path: path.display().to_string(), source }),
        }
    }

    /// Persists `view` as the last applied one, atomically. Mode 0600: it
    /// may hold preshared keys.
    pub fn save_applied(&self, view: &NodeView) -> Result<(), StateError> {
        let path = self.applied_path();
        let json = serde_json::to_vec_pretty(view).expect("a node view always serialises");
        write_atomic(&path, &json, 0o600).map_err(|source| StateError::Io { path: path.display().to_string(), source })
    }
}

/// Replaces a file atomically and durably (see [`mesh_local::atomic`]).
pub use mesh_local::atomic::write as write_atomic;

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;

    use super::*;

    #[test]
    fn round_trip_and_mode() {
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::open(&dir.path().join("s")).unwrap();
        assert!(store.load_applied().unwrap().is_none());
        let view: NodeView = serde_json::from_str(r#"{"generation": 4, "addresses": ["100.64.0.1/32"]}"#).unwrap();
        store.save_applied(&view).unwrap();
        store.save_applied(&view).unwrap();
        assert_eq!(store.load_applied().unwrap(), Some(view));
        let mode = fs::metadata(store.applied_path()).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }

    #[test]
    fn corrupt_file_is_an_error_not_an_empty_view() {
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::open(dir.path()).unwrap();
        fs::write(store.applied_path(), "{").unwrap();
        assert!(matches!(store.load_applied(), Err(StateError::Corrupt { .. })));
    }
}
