//! Secret files: tokens and keys, written 0600 and refused when group or
//! others can read them.

use std::{
    fs,
    io::{self, Write as _},
    os::unix::fs::{DirBuilderExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
};

/// Errors reading or writing a secret file.
#[derive(Debug, thiserror::Error)]
pub enum SecretFileError {
    /// Group or others may read it: someone else may already have it.
    #[error("{path} is readable by group or others (mode {mode:o}): run `chmod 600 {path}`", path = .path.display())]
    TooOpen {
        /// The file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// Reading or writing failed.
    #[error("{path}: {source}", path = .path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        #[source]
        source: io::Error,
    },
}

/// Writes `bytes` to `path` with mode 0600 whatever the umask, atomically
/// (a temporary file in the same directory, renamed), so that an existing
/// file with a looser mode is replaced rather than reused. Creates the
/// parent directory 0700 if missing.
pub fn write(path: &Path, bytes: &[u8]) -> Result<(), SecretFileError> {
    let io_err = |source| SecretFileError::Io { path: path.to_owned(), source };
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    if !dir.exists() {
        fs::DirBuilder::new().recursive(true).mode(0o700).create(dir).map_err(io_err)?;
    }
    // tempfile creates it 0600 (O_EXCL, never following a planted link).
    let mut tmp = tempfile::Builder::new().prefix(".secret-").tempfile_in(dir).map_err(io_err)?;
    tmp.as_file().set_permissions(fs::Permissions::from_mode(0o600)).map_err(io_err)?;
    tmp.write_all(bytes).map_err(io_err)?;
    tmp.as_file().sync_all().map_err(io_err)?;
    tmp.persist(path).map_err(|e| io_err(e.error))?;
    Ok(())
}

/// Reads a secret file, refusing one that group or others can read.
pub fn read(path: &Path) -> Result<String, SecretFileError> {
    let io_err = |source| SecretFileError::Io { path: path.to_owned(), source };
    let file = fs::File::open(path).map_err(io_err)?;
    let mode = file.metadata().map_err(io_err)?.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(SecretFileError::TooOpen { path: path.to_owned(), mode });
    }
    io::read_to_string(file).map_err(io_err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn written_0600_even_over_a_looser_file_and_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tlo-token");
        fs::write(&path, "old").unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        write(&path, b"secret\n").unwrap();
        assert_eq!(fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(read(&path).unwrap(), "secret\n");
    }

    #[test]
    fn a_group_or_world_readable_file_is_refused_with_the_fix() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tlo-key");
        for mode in [0o640, 0o604, 0o644] {
            fs::write(&path, "k").unwrap();
            fs::set_permissions(&path, fs::Permissions::from_mode(mode)).unwrap();
            let e = read(&path).unwrap_err();
            assert!(matches!(e, SecretFileError::TooOpen { .. }), "{mode:o}: {e}");
            assert!(e.to_string().contains(&format!("chmod 600 {}", path.display())), "{e}");
        }
    }
}
