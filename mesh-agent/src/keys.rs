//! WireGuard keys: the node's private key (generated on the node, stored
//! 0600, never logged) and the public keys that name peers.

use std::{
    fmt,
    fs::{self, OpenOptions},
    io::Write as _,
    os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _, PermissionsExt as _},
    path::Path,
    str::FromStr,
};

use base64::{Engine as _, engine::general_purpose::STANDARD};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Errors of key handling.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// Not 32 bytes of standard base64.
    #[error("invalid WireGuard key: expected 32 bytes of base64")]
    Invalid,
    /// The key file could not be read or written.
    #[error("key file {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The error.
        source: std::io::Error,
    },
    /// The key file is readable by other users.
    #[error("key file {path} has mode {mode:o}: it must not be readable by group or others (chmod 600)")]
    TooOpen {
        /// The file.
        path: String,
        /// Its permission bits.
        mode: u32,
    },
}

fn decode32(s: &str) -> Result<[u8; 32], KeyError> {
    let bytes = STANDARD.decode(s.trim()).map_err(|_| KeyError::Invalid)?;
    bytes.try_into().map_err(|_| KeyError::Invalid)
}

/// A WireGuard public key. Orders and prints as its base64 form.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PublicKey(pub [u8; 32]);

impl PublicKey {
    /// The base64 form (`wg` prints this).
    #[must_use]
    pub fn to_base64(&self) -> String {
        STANDARD.encode(self.0)
    }
}

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_base64())
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({self})")
    }
}

impl FromStr for PublicKey {
    type Err = KeyError;
    fn from_str(s: &str) -> Result<Self, KeyError> {
        decode32(s).map(Self)
    }
}

impl Serialize for PublicKey {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_base64())
    }
}

impl<'de> Deserialize<'de> for PublicKey {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// 32 secret bytes (a private or preshared key). Its `Debug` never shows the
/// bytes, and they are wiped on drop.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretKey([u8; 32]);

impl SecretKey {
    /// A fresh random private key (clamped as X25519 requires).
    #[must_use]
    pub fn generate() -> Self {
        Self(wireguard_control::Key::generate_private().0)
    }

    /// Wraps raw bytes.
    #[must_use]
    pub const fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// Parses the base64 form.
    pub fn from_base64(s: &str) -> Result<Self, KeyError> {
        decode32(s).map(Self)
    }

    /// The public key of this private key.
    #[must_use]
    pub fn public_key(&self) -> PublicKey {
        PublicKey(wireguard_control::Key(self.0).get_public().0)
    }

    /// The raw bytes (for the WireGuard backends only).
    #[must_use]
    pub const fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// The base64 form, as the key file holds it.
    pub(crate) fn to_base64(&self) -> String {
        STANDARD.encode(self.0)
    }
}

impl fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SecretKey(<redacted>)")
    }
}

impl Drop for SecretKey {
    fn drop(&mut self) {
        for b in &mut self.0 {
            // Volatile so the wipe is not optimised away as a dead store.
            // SAFETY: `b` is a valid, aligned, exclusive reference.
            unsafe { std::ptr::write_volatile(b, 0) };
        }
    }
}

impl Serialize for SecretKey {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_base64())
    }
}

impl<'de> Deserialize<'de> for SecretKey {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Self::from_base64(&s).map_err(serde::de::Error::custom)
    }
}

/// Loads the private key from `path`, or generates one there (mode 0600, its
/// directory 0700) if the file does not exist. A key file readable by group
/// or others is refused rather than silently used.
pub fn load_or_generate(path: &Path) -> Result<SecretKey, KeyError> {
    let io = |source| KeyError::Io { path: path.display().to_string(), source };
    match fs::metadata(path) {
        Ok(meta) => {
            let mode = meta.permissions().mode() & 0o777;
            if mode & 0o077 != 0 {
                return Err(KeyError::TooOpen { path: path.display().to_string(), mode });
            }
            let text = fs::read_to_string(path).map_err(io)?;
            SecretKey::from_base64(&text)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                fs::DirBuilder::new().recursive(true).mode(0o700).create(dir).map_err(io)?;
            }
            let key = SecretKey::generate();
            // create_new: never overwrite a key another process just wrote.
            let mut file = OpenOptions::new().write(true).create_new(true).mode(0o600).open(path).map_err(io)?;
            file.write_all(format!("{}\n", key.to_base64()).as_bytes()).map_err(io)?;
            file.sync_all().map_err(io)?;
            tracing::info!(path = %path.display(), public_key = %key.public_key(), "generated a new WireGuard private key");
            Ok(key)
        }
        Err(e) => Err(io(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_key_is_private_and_stable() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/private.key");
        let a = load_or_generate(&path).unwrap();
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let b = load_or_generate(&path).unwrap();
        assert_eq!(a.public_key(), b.public_key());
        assert_eq!(format!("{a:?}"), "SecretKey(<redacted>)");
    }

    #[test]
    fn open_key_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k");
        load_or_generate(&path).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(load_or_generate(&path), Err(KeyError::TooOpen { .. })));
    }

    #[test]
    fn public_key_round_trip() {
        let k = SecretKey::generate().public_key();
        let s = k.to_base64();
        assert_eq!(s.parse::<PublicKey>().unwrap(), k);
        assert!("abc".parse::<PublicKey>().is_err());
    }
}
