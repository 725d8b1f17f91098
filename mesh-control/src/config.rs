//! `mesh-control serve --config FILE`: the TOML configuration.

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::Deserialize;

/// A configuration problem.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// Unreadable file.
    #[error("reading {0}: {1}")]
    Read(PathBuf, std::io::Error),
    /// Bad TOML or field.
    #[error("parsing {0}: {1}")]
    Parse(PathBuf, toml::de::Error),
    /// A value out of range.
    #[error("{0}")]
    Invalid(String),
}

/// The configuration file.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// gRPC listen address (agents and meshctl).
    pub listen: SocketAddr,
    /// Directory for the SQLite database and the bootstrap admin token
    /// (`admin-token`, 0600, with either store).
    pub data_dir: PathBuf,
    /// PostgreSQL URL (`postgres://...`); when set, used instead of SQLite
    /// (several replicas may share it).
    pub database_url: Option<String>,
    /// TLS on the gRPC listener. On by default; turn off only for debugging.
    pub tls: bool,
    /// Extra names (DNS or IP) for the server certificate.
    pub tls_names: Vec<String>,
    /// Prometheus endpoint address (`/metrics`); none to disable.
    pub metrics_listen: Option<SocketAddr>,
    /// The live topology page ([`crate::web`]), plain HTTP behind an admin
    /// token; none (the default) to disable. Bind it to localhost or an
    /// admin network.
    pub web_listen: Option<SocketAddr>,
    /// Local admin socket (mode 0600, and only root or control's own uid
    /// may connect; no token needed); none to disable.
    pub admin_socket: Option<PathBuf>,
    /// Overlay MTU pushed to agents.
    pub mtu: u32,
    /// Seconds a recovered gateway must stay up before it is primary again.
    pub hold_down_secs: i64,
    /// Node key lifetime in days (30-180).
    pub key_lifetime_days: i64,
    /// Ask agents to rotate their WireGuard key when it is this many days
    /// old (0: only on `meshctl nodes rotate`). Must be shorter than
    /// `key_lifetime_days` when set.
    pub key_rotation_days: i64,
    /// Ephemeral nodes offline this many seconds are removed.
    pub ephemeral_offline_secs: i64,
    /// How often to look for changes made by other replicas (milliseconds).
    pub poll_interval_ms: u64,
    /// Rate limits and caps (see [`crate::limits`]).
    pub limits: crate::limits::LimitsConfig,
    /// The relays agents may use (`[[relays]]`, see [`crate::relay`]), in
    /// order of preference; none by default.
    pub relays: Vec<crate::relay::RelayEntry>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: "0.0.0.0:7443".parse().unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 7443))),
            data_dir: PathBuf::from("/var/lib/mesh-control"),
            database_url: None,
            tls: true,
            tls_names: Vec::new(),
            metrics_listen: Some(SocketAddr::from(([127, 0, 0, 1], 9464))),
            web_listen: None,
            admin_socket: Some(PathBuf::from("/run/mesh-control/admin.sock")),
            mtu: 1280,
            hold_down_secs: 30,
            key_lifetime_days: 90,
            key_rotation_days: 0,
            ephemeral_offline_secs: 600,
            poll_interval_ms: 500,
            limits: crate::limits::LimitsConfig::default(),
            relays: Vec::new(),
        }
    }
}

impl Config {
    /// Reads and checks a configuration file.
    pub fn load(path: &std::path::Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Read(path.to_owned(), e))?;
        let c: Self = toml::from_str(&text).map_err(|e| ConfigError::Parse(path.to_owned(), e))?;
        c.check()?;
        Ok(c)
    }

    /// Checks value ranges.
    pub fn check(&self) -> Result<(), ConfigError> {
        if !(30..=180).contains(&self.key_lifetime_days) {
            return Err(ConfigError::Invalid("key_lifetime_days must be 30-180".into()));
        }
        if self.key_rotation_days != 0 && !(1..self.key_lifetime_days).contains(&self.key_rotation_days) {
            return Err(ConfigError::Invalid(format!(
                "key_rotation_days must be 0 (off) or 1-{} (shorter than key_lifetime_days)",
                self.key_lifetime_days - 1
            )));
        }
        if !(576..=9000).contains(&self.mtu) {
            return Err(ConfigError::Invalid("mtu must be 576-9000".into()));
        }
        self.limits.check().map_err(ConfigError::Invalid)?;
        crate::relay::check(&self.relays).map_err(ConfigError::Invalid)
    }

    /// The store URL.
    #[must_use]
    pub fn store_url(&self) -> String {
        self.database_url.clone().unwrap_or_else(|| format!("sqlite://{}", self.data_dir.join("control.db").display()))
    }

    /// The engine settings.
    #[must_use]
    pub fn engine(&self) -> crate::engine::EngineConfig {
        crate::engine::EngineConfig {
            mtu: self.mtu,
            hold_down_secs: self.hold_down_secs,
            key_lifetime_secs: self.key_lifetime_days * 86_400,
            key_rotation_secs: self.key_rotation_days * 86_400,
            ephemeral_offline_secs: self.ephemeral_offline_secs,
            poll_interval: std::time::Duration::from_millis(self.poll_interval_ms),
            limits: self.limits.clone(),
            replica: format!("{}/{}", hostname(), self.listen),
            ..crate::engine::EngineConfig::default()
        }
    }
}

/// This machine's host name (the replica's name, with its listen address,
/// in the store's leases).
fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname").map_or_else(|_| "localhost".into(), |h| h.trim().to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The shipped default file (`deploy/config/control.toml`, installed as
    /// /etc/mesh/control.toml) loads with the real loader and sets exactly
    /// the built-in defaults (compared through `Debug`: `Config` has no
    /// `PartialEq`), so its comments cannot drift from the code.
    #[test]
    fn shipped_default_file() {
        let path = std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/config/control.toml"));
        let shipped = Config::load(path).unwrap();
        assert_eq!(format!("{shipped:?}"), format!("{:?}", Config::default()));
        // The packaged layout (systemd unit, docs/packaging.md) relies on these.
        assert_eq!(shipped.data_dir, PathBuf::from("/var/lib/mesh-control"));
        assert_eq!(shipped.admin_socket, Some(PathBuf::from("/run/mesh-control/admin.sock")));
    }

    #[test]
    fn parses_and_checks() {
        let c: Config = toml::from_str("listen = \"127.0.0.1:1\"\nkey_lifetime_days = 30\n").unwrap();
        c.check().unwrap();
        assert!(c.tls, "TLS is on by default");
        assert_eq!(c.web_listen, None, "the web page is opt-in");
        let c: Config = toml::from_str("web_listen = \"127.0.0.1:8080\"\n").unwrap();
        assert_eq!(c.web_listen, Some(SocketAddr::from(([127, 0, 0, 1], 8080))));
        let bad: Config = toml::from_str("key_lifetime_days = 200").unwrap();
        assert!(bad.check().is_err());
        assert!(toml::from_str::<Config>("lissen = \"x\"").is_err());
        let c: Config = toml::from_str("[limits]\nenroll_per_source = { per_second = 1, burst = 2 }\n").unwrap();
        assert_eq!(c.limits.enroll_per_source.burst, 2);
        let c: Config = toml::from_str("[limits]\nstreams_per_node = 0\n").unwrap();
        assert!(c.check().unwrap_err().to_string().contains("streams_per_node"));
    }

    #[test]
    fn relays_are_read_and_checked_by_entry() {
        let pin = "ab".repeat(32);
        let text = format!(
            "[[relays]]\nregion = \"fsn\"\naddress = \"relay-fsn.example.net:443\"\ncert_sha256 = \"{pin}\"\n\
             reflector = \"192.0.2.50:3478\"\n\n[[relays]]\nregion = \"nbg\"\naddress = \"192.0.2.60:443\"\n\
             server_name = \"relay-nbg.example.net\"\ncert_sha256 = \"{pin}\"\n"
        );
        let c: Config = toml::from_str(&text).unwrap();
        c.check().unwrap();
        assert_eq!(c.relays.len(), 2);
        assert_eq!(c.relays[0].reflector.as_deref(), Some("192.0.2.50:3478"));
        assert_eq!(c.relays[1].server_name.as_deref(), Some("relay-nbg.example.net"));
        let dup: Config = toml::from_str(&text.replace("\"nbg\"", "\"fsn\"")).unwrap();
        let e = dup.check().unwrap_err().to_string();
        assert!(e.contains("relays[1] (region \"fsn\")") && e.contains("twice"), "{e}");
        let bad: Config = toml::from_str(&text.replacen(&pin, "abc", 1)).unwrap();
        let e = bad.check().unwrap_err().to_string();
        assert!(e.contains("relays[0] (region \"fsn\"): cert_sha256"), "{e}");
        assert!(toml::from_str::<Config>(&text.replace("reflector", "reflectr")).is_err(), "unknown keys refused");
        assert!(toml::from_str::<Config>("[[relays]]\nregion = \"x\"\n").is_err(), "address is required");
    }
}
