//! The CA files in control's data directory.
//!
//! | file              | mode | what                                                        |
//! |-------------------|------|-------------------------------------------------------------|
//! | `ca.key`          | 0600 | the current CA: certificate then private key (PEM)          |
//! | `ca-next.key`     | 0600 | the next CA during a rotation (phase `introduced`)          |
//! | `ca-previous.crt` | 0644 | the previous CA's certificate (phase `switched`)            |
//! | `ca.pem`          | 0644 | every trusted CA certificate: what a standard client trusts |
//!
//! `ca.pem` is derived from the others and rewritten at every start and
//! rotation step. Each file is replaced atomically (temporary file, fsync,
//! rename), and every step writes the new file before removing the old one,
//! so a crash in the middle leaves a set that still loads.
//!
//! The directory itself must be 0700: it is created so, and tightened if it
//! is looser, unless it is world-writable or sticky (a shared directory such
//! as /tmp is never control's own: refused). A key file readable by group or
//! others is refused, never fixed: a key that was exposed must be replaced.

use std::fs;
use std::os::unix::fs::{DirBuilderExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

use super::TlsError;
use super::ca::{Ca, CaSet};

const CURRENT: &str = "ca.key";
const NEXT: &str = "ca-next.key";
const PREVIOUS: &str = "ca-previous.crt";
/// The trusted CA certificates, for standard TLS clients.
pub const BUNDLE: &str = "ca.pem";

fn io(path: &Path) -> impl Fn(std::io::Error) -> TlsError + '_ {
    move |source| TlsError::Io { path: path.display().to_string(), source }
}

/// Creates `dir` with mode 0700, or tightens an existing one to 0700.
pub fn prepare_dir(dir: &Path) -> Result<(), TlsError> {
    fs::DirBuilder::new().recursive(true).mode(0o700).create(dir).map_err(io(dir))?;
    let mode = fs::metadata(dir).map_err(io(dir))?.permissions().mode() & 0o7777;
    if mode & 0o1002 != 0 {
        return Err(TlsError::Insecure {
            path: dir.display().to_string(),
            why: format!("mode {mode:04o} is a shared directory; give control a directory of its own (mode 0700)"),
        });
    }
    if mode & 0o077 != 0 {
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(io(dir))?;
        tracing::warn!(dir = %dir.display(), was = format!("{mode:04o}"), "data directory tightened to 0700");
    }
    Ok(())
}

/// Replaces `path` with `bytes` atomically, the new file created with `mode`.
fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<(), TlsError> {
    mesh_local::atomic::write(path, bytes, mode).map_err(io(path))
}

fn remove(path: &Path) -> Result<(), TlsError> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io(path)(e)),
        _ => Ok(()),
    }
}

/// Reads `path` if it exists; a key file (`secret`) must not be readable by
/// group or others.
fn read(path: &Path, secret: bool) -> Result<Option<String>, TlsError> {
    let text = match fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io(path)(e)),
    };
    if secret {
        let mode = fs::metadata(path).map_err(io(path))?.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(TlsError::Insecure {
                path: path.display().to_string(),
                why: format!(
                    "mode {mode:04o}: the CA private key must not be readable by group or others \
                     (chmod 600, and rotate the CA if others may have read it)"
                ),
            });
        }
    }
    Ok(Some(text))
}

/// The CA files of one directory.
#[derive(Clone, Debug)]
pub struct CaDir {
    dir: PathBuf,
}

impl CaDir {
    /// The CA files in `dir`.
    #[must_use]
    pub fn new(dir: &Path) -> Self {
        Self { dir: dir.to_owned() }
    }

    /// The file holding the current CA's key.
    #[must_use]
    pub fn key_path(&self) -> PathBuf {
        self.dir.join(CURRENT)
    }

    /// The trusted-certificates bundle.
    #[must_use]
    pub fn bundle_path(&self) -> PathBuf {
        self.dir.join(BUNDLE)
    }

    fn ca(&self, name: &str) -> Result<Option<Ca>, TlsError> {
        let path = self.dir.join(name);
        read(&path, true)?
            .map(|t| {
                Ca::from_stored(&t).map_err(|e| TlsError::Bad { path: path.display().to_string(), why: e.to_string() })
            })
            .transpose()
    }

    /// The CA set, or `None` if there is no current CA file.
    pub fn load(&self) -> Result<Option<CaSet>, TlsError> {
        let Some(current) = self.ca(CURRENT)? else { return Ok(None) };
        let next = self.ca(NEXT)?;
        let previous = read(&self.dir.join(PREVIOUS), false)?;
        let mut set = CaSet { current, next, previous };
        // A crash between the steps of a switch leaves the current CA
        // twice, or the next one already current: both mean the same set.
        if set.previous.as_deref() == Some(set.current.cert_pem.as_str()) {
            set.previous = None;
        }
        if set.next.as_ref() == Some(&set.current) {
            set.next = None;
        }
        if set.next.is_some() && set.previous.is_some() {
            return Err(TlsError::Bad {
                path: self.dir.display().to_string(),
                why: format!("both {NEXT} and {PREVIOUS} exist: remove the one that does not belong to the rotation"),
            });
        }
        Ok(Some(set))
    }

    /// Writes `set`: new files first, then the removals, then `ca.pem`.
    pub fn save(&self, set: &CaSet) -> Result<(), TlsError> {
        if let Some(p) = &set.previous {
            write_atomic(&self.dir.join(PREVIOUS), p.as_bytes(), 0o644)?;
        }
        if let Some(n) = &set.next {
            write_atomic(&self.dir.join(NEXT), n.to_stored().as_bytes(), 0o600)?;
        }
        write_atomic(&self.key_path(), set.current.to_stored().as_bytes(), 0o600)?;
        if set.next.is_none() {
            remove(&self.dir.join(NEXT))?;
        }
        if set.previous.is_none() {
            remove(&self.dir.join(PREVIOUS))?;
        }
        self.write_bundle(set)
    }

    /// Rewrites `ca.pem` if it differs from `set`'s bundle.
    pub fn write_bundle(&self, set: &CaSet) -> Result<(), TlsError> {
        let bundle = set.bundle();
        if fs::read_to_string(self.bundle_path()).ok().as_deref() != Some(bundle.as_str()) {
            write_atomic(&self.bundle_path(), bundle.as_bytes(), 0o644)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_790_000_000;

    fn mode(p: &Path) -> u32 {
        fs::metadata(p).unwrap().permissions().mode() & 0o7777
    }

    #[test]
    fn data_dir_is_created_or_tightened_to_0700_and_shared_dirs_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("data");
        prepare_dir(&dir).unwrap();
        assert_eq!(mode(&dir), 0o700);
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).unwrap();
        prepare_dir(&dir).unwrap();
        assert_eq!(mode(&dir), 0o700);
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o1777)).unwrap();
        let e = prepare_dir(&dir).unwrap_err().to_string();
        assert!(e.contains("shared directory") && e.contains("data"), "{e}");
        assert_eq!(mode(&dir), 0o1777, "a shared directory is left alone");
    }

    #[test]
    fn every_phase_round_trips_through_the_files_with_their_modes() {
        let tmp = tempfile::tempdir().unwrap();
        let files = CaDir::new(tmp.path());
        assert!(files.load().unwrap().is_none());
        let (a, b) = (Ca::generate(NOW).unwrap(), Ca::generate(NOW).unwrap());
        let steady = CaSet::new(a);
        let introduced = steady.begin(b).unwrap();
        let switched = introduced.switch().unwrap();
        let retired = switched.retire().unwrap();
        for set in [&steady, &introduced, &switched, &retired] {
            files.save(set).unwrap();
            assert_eq!(files.load().unwrap().as_ref(), Some(set));
            assert_eq!(fs::read_to_string(files.bundle_path()).unwrap(), set.bundle());
            assert_eq!(mode(&files.key_path()), 0o600);
        }
        assert_eq!(mode(&tmp.path().join(BUNDLE)), 0o644);
        let mut names: Vec<_> = fs::read_dir(tmp.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        names.sort();
        assert_eq!(names, [CURRENT, BUNDLE], "retired rotation files are gone");
    }

    #[test]
    fn a_key_file_readable_by_others_is_refused_by_name() {
        let tmp = tempfile::tempdir().unwrap();
        let files = CaDir::new(tmp.path());
        files.save(&CaSet::new(Ca::generate(NOW).unwrap())).unwrap();
        fs::set_permissions(files.key_path(), fs::Permissions::from_mode(0o640)).unwrap();
        let e = files.load().unwrap_err().to_string();
        assert!(e.contains(&files.key_path().display().to_string()) && e.contains("0640"), "{e}");
    }

    #[test]
    fn a_crash_in_the_middle_of_a_switch_still_loads() {
        let tmp = tempfile::tempdir().unwrap();
        let files = CaDir::new(tmp.path());
        let (a, b) = (Ca::generate(NOW).unwrap(), Ca::generate(NOW).unwrap());
        let introduced = CaSet::new(a.clone()).begin(b.clone()).unwrap();
        files.save(&introduced).unwrap();
        // The switch wrote ca-previous.crt and died before replacing
        // ca.key: the switch did not happen.
        write_atomic(&tmp.path().join(PREVIOUS), a.cert_pem.as_bytes(), 0o644).unwrap();
        assert_eq!(files.load().unwrap().as_ref(), Some(&introduced));
        // It replaced ca.key and died before removing ca-next.key: it did.
        write_atomic(&files.key_path(), b.to_stored().as_bytes(), 0o600).unwrap();
        let switched = introduced.switch().unwrap();
        assert_eq!(files.load().unwrap(), Some(switched));
    }
}
