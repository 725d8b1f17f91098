//! The relay's TOML file (see `relay.example.toml`).
//!
//! Relative certificate and key paths are relative to the file's
//! directory, so a relay started from anywhere finds the same pair.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::server::{DEFAULT_MAX_CONNECTIONS, RelayConfig};
use crate::ticket;

/// Why the file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// Reading it failed.
    #[error("{path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// Not valid TOML for this schema.
    #[error("{0}")]
    Parse(#[from] toml::de::Error),
    /// A `control_keys` entry that is not a base64 32-byte key.
    #[error("control_keys[{index}]: {source}")]
    Key {
        /// Its position.
        index: usize,
        /// What is wrong with it.
        #[source]
        source: ticket::TicketError,
    },
}

/// The file's schema.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    listen: SocketAddr,
    reflector: Option<SocketAddr>,
    metrics: Option<SocketAddr>,
    cert: PathBuf,
    key: PathBuf,
    #[serde(default)]
    names: Vec<String>,
    #[serde(default)]
    region: String,
    control_keys: Vec<String>,
    max_connections: Option<usize>,
}

impl RelayConfig {
    /// Reads the configuration at `path`.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| ConfigError::Read { path: path.display().to_string(), source })?;
        Self::parse(&text, path.parent().unwrap_or(Path::new(".")))
    }

    /// Parses a configuration, resolving relative paths against `base`.
    pub fn parse(text: &str, base: &Path) -> Result<Self, ConfigError> {
        let f: File = toml::from_str(text)?;
        let trusted_keys = f
            .control_keys
            .iter()
            .enumerate()
            .map(|(index, k)| ticket::key_from_b64(k).map_err(|source| ConfigError::Key { index, source }))
            .collect::<Result<_, _>>()?;
        Ok(Self {
            listen: f.listen,
            reflector: f.reflector,
            metrics: f.metrics,
            cert_path: base.join(f.cert),
            key_path: base.join(f.key),
            names: f.names,
            trusted_keys,
            region: f.region,
            max_connections: f.max_connections.unwrap_or(DEFAULT_MAX_CONNECTIONS),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_example_parses() {
        let c = RelayConfig::parse(include_str!("../relay.example.toml"), Path::new("/etc/mesh-relay")).unwrap();
        assert_eq!(c.listen, "0.0.0.0:443".parse().unwrap());
        assert_eq!(c.reflector, Some("0.0.0.0:3478".parse().unwrap()));
        assert_eq!(c.cert_path, Path::new("/etc/mesh-relay/relay.crt"));
        assert_eq!(c.trusted_keys.len(), 1);
        assert_eq!(c.max_connections, DEFAULT_MAX_CONNECTIONS);
    }

    #[test]
    fn bad_files_are_refused() {
        let base = Path::new("/");
        let ok = "listen = \"127.0.0.1:1\"\ncert = \"c\"\nkey = \"k\"\n";
        let e = RelayConfig::parse(&format!("{ok}control_keys = [\"AAAA\"]\n"), base).unwrap_err();
        assert!(e.to_string().contains("control_keys[0]"), "{e}");
        let e = RelayConfig::parse(&format!("{ok}control_keys = []\nlisten_typo = 1\n"), base).unwrap_err();
        assert!(e.to_string().contains("listen_typo"), "{e}");
    }
}
