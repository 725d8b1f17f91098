//! The node's credential at control: enrollment with the enrollment key on
//! first start, the stored credential afterwards (`<state_dir>/control.json`,
//! 0600, written atomically), and its renewal at half its lifetime.

use std::path::Path;

use mesh_client::{
    bearer::Bearer,
    channel::{self as client, Channel, Trust},
    enrollment::EnrollmentKeyText,
};
use mesh_proto::v1::{self as pb, agent_service_client::AgentServiceClient};
use serde::{Deserialize, Serialize};

use super::{SessionError, err, now_secs};
use crate::{
    config::{Config, ControlConfig},
    keys::PublicKey,
    state::write_atomic,
};

/// The credential control gave at enrollment, kept in
/// `<state_dir>/control.json` (0600).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Credential {
    /// Our node id at control.
    pub node_id: u64,
    /// Node name control assigned.
    pub name: String,
    /// Bearer token.
    pub token: String,
    /// SHA-256 of control's CA certificate (hex), from the enrollment key.
    pub ca_pin: String,
    /// The CAs control said to trust (hex SHA-256 each; capability 4). When
    /// set, they replace `ca_pin`: after a CA rotation, the enrollment
    /// key's CA is no longer trusted.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ca_pins: Vec<String>,
    /// Expiry of the credential (unix seconds).
    pub expires_unix: i64,
    /// When it was issued or last renewed (unix seconds; 0: unknown).
    #[serde(default)]
    pub renewed_unix: i64,
}

impl Credential {
    /// Whether to renew (rotate) the credential now: once a day, or after
    /// half of what is left of the node key's lifetime if that is sooner,
    /// but never twice within an hour. Renewal does not move the key's
    /// expiry (control keeps it); at expiry the agent re-authenticates with
    /// an enrollment key, or an admin extends the key.
    #[must_use]
    pub fn renewal_due(&self, now: i64) -> bool {
        if self.renewed_unix <= 0 {
            return true;
        }
        let half_left = (self.expires_unix - self.renewed_unix) / 2;
        now - self.renewed_unix >= half_left.clamp(3600, 86_400) && now < self.expires_unix
    }

    /// The pins of the CAs to trust.
    pub(super) fn pins(&self) -> Result<Vec<[u8; 32]>, SessionError> {
        let texts = if self.ca_pins.is_empty() { std::slice::from_ref(&self.ca_pin) } else { &self.ca_pins[..] };
        texts
            .iter()
            .map(|t| {
                hex::decode(t)
                    .ok()
                    .and_then(|v| v.try_into().ok())
                    .ok_or_else(|| SessionError("bad CA pin in the credential".into()))
            })
            .collect()
    }

    /// Takes the CAs control says to trust (certificates, PEM) and stores
    /// them if they changed; returns whether they did. An empty or
    /// unparsable set is refused: trusting nothing would lock the agent
    /// out of control for good.
    pub(super) fn set_trusted(&mut self, pems: &[String], path: &Path) -> Result<bool, SessionError> {
        let pins: Option<Vec<String>> =
            pems.iter().map(|p| client::pem_der(p).map(|d| hex::encode(client::pin_of(&d)))).collect();
        let pins = pins.filter(|p| !p.is_empty()).ok_or_else(|| SessionError("control sent no usable CA".into()))?;
        if pins == self.ca_pins {
            return Ok(false);
        }
        let before = std::mem::replace(&mut self.ca_pins, pins);
        if let Err(e) = self.save(path) {
            self.ca_pins = before;
            return Err(e);
        }
        tracing::info!(node = self.node_id, pins = ?self.ca_pins, "trusting control's CAs");
        Ok(true)
    }

    /// Reads the stored credential, if any.
    pub fn load(path: &Path) -> Result<Option<Self>, SessionError> {
        match std::fs::read_to_string(path) {
            Ok(t) => serde_json::from_str(&t).map(Some).map_err(|e| SessionError(format!("{}: {e}", path.display()))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(SessionError(format!("{}: {e}", path.display()))),
        }
    }

    pub(super) fn save(&self, path: &Path) -> Result<(), SessionError> {
        let text = serde_json::to_vec_pretty(self).map_err(|e| SessionError(e.to_string()))?;
        write_atomic(path, &text, 0o600).map_err(err("writing the credential"))
    }
}

fn hostname(cc: &ControlConfig) -> String {
    cc.hostname.clone().unwrap_or_else(|| {
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map_or_else(|_| "mesh-agent".into(), |h| h.trim().to_owned())
    })
}

/// The enrollment key, and the file it came from (removed once enrolled).
/// A key file that group or others can read is refused: whoever read it
/// may enroll in our place.
fn enrollment_key(cc: &ControlConfig) -> Result<(String, Option<&Path>), SessionError> {
    if let Some(k) = &cc.enrollment_key {
        return Ok((k.trim().to_owned(), None));
    }
    let path = cc.enrollment_key_file.as_ref().ok_or_else(|| {
        SessionError("not enrolled yet and no control.enrollment_key or control.enrollment_key_file configured".into())
    })?;
    let key = mesh_local::secret_file::read(path).map_err(|e| SessionError(format!("enrollment key file: {e}")))?;
    Ok((key.trim().to_owned(), Some(path)))
}

/// The stored credential, or a new one from enrolling with the key.
pub(super) async fn credential(
    config: &Config,
    cc: &ControlConfig,
    public_key: PublicKey,
) -> Result<Credential, SessionError> {
    let path = config.control_credential_path();
    let mut previous = None;
    if let Some(c) = Credential::load(&path)? {
        // An expired node key needs an enrollment key to re-authenticate
        // (the node keeps its identity); without one, the stored
        // credential is all there is, and control's refusal says why.
        let has_key = cc.enrollment_key.is_some() || cc.enrollment_key_file.as_ref().is_some_and(|p| p.exists());
        if c.expires_unix > now_secs() || !has_key {
            return Ok(c);
        }
        tracing::warn!(
            node = c.node_id,
            expires_unix = c.expires_unix,
            "node key expired: re-authenticating with the enrollment key"
        );
        previous = Some(c.token);
    }
    let (key, key_file) = enrollment_key(cc)?;
    let parsed =
        EnrollmentKeyText::parse(&key).ok_or_else(|| SessionError("the enrollment key is malformed".into()))?;
    let pin = parsed.ca_pin.ok_or_else(|| SessionError("the enrollment key carries no CA pin".into()))?;
    let (channel, _) =
        client::connect_any(&cc.addresses(), 0, &Trust::Pin(pin)).await.map_err(err("connecting to control"))?;
    let resp = AgentServiceClient::new(channel)
        .enroll(pb::EnrollRequest {
            capabilities: Some(mesh_proto::capabilities("mesh-agent")),
            enrollment_key: key,
            wireguard_public_key: public_key.0.to_vec(),
            hostname: hostname(cc),
            advertised_routes: cc.advertise_routes.iter().map(ToString::to_string).collect(),
            endpoints: cc.endpoints.clone(),
            previous_credential: previous.unwrap_or_default(),
        })
        .await
        .map_err(err("enrolling"))?
        .into_inner();
    let node = resp.node.ok_or_else(|| SessionError("enrollment: no node in the answer".into()))?;
    let cred = resp.credential.ok_or_else(|| SessionError("enrollment: no credential in the answer".into()))?;
    let c = Credential {
        node_id: node.id,
        name: node.name,
        token: cred.token,
        ca_pin: hex::encode(pin),
        ca_pins: Vec::new(),
        expires_unix: cred.expires_unix,
        renewed_unix: now_secs(),
    };
    c.save(&path)?;
    tracing::info!(node = c.node_id, name = %c.name, state = ?node.state, "enrolled with control");
    // The credential replaces the key from now on: a key left on disk
    // would only be something to steal.
    if let Some(file) = key_file {
        match std::fs::remove_file(file) {
            Ok(()) => tracing::info!(file = %file.display(), "enrolled: removed the enrollment key file"),
            Err(e) => {
                tracing::warn!(file = %file.display(), error = %e, "enrolled, but the enrollment key file could not be removed: remove it by hand")
            }
        }
    }
    Ok(c)
}

/// Renews the credential with control (same WireGuard key) and stores it.
pub(super) async fn renew(channel: &Channel, cred: &mut Credential, path: &Path) -> Result<(), SessionError> {
    renew_with(channel, cred, path, pb::RenewRequest::default()).await
}

/// Renews the credential with `req` (which may carry a rotated key and its
/// proof) and stores the new one.
pub(super) async fn renew_with(
    channel: &Channel,
    cred: &mut Credential,
    path: &Path,
    req: pb::RenewRequest,
) -> Result<(), SessionError> {
    let mut client = AgentServiceClient::with_interceptor(channel.clone(), Bearer(Some(cred.token.clone())));
    let resp = client.renew(req).await.map_err(err("renewing the credential"))?.into_inner();
    let c = resp.credential.ok_or_else(|| SessionError("renewal: no credential in the answer".into()))?;
    cred.token = c.token;
    cred.expires_unix = c.expires_unix;
    cred.renewed_unix = now_secs();
    cred.save(path)?;
    tracing::info!(node = cred.node_id, expires_unix = cred.expires_unix, "credential renewed");
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;

    use mesh_client::bearer::Bearer;
    use mesh_proto::v1::admin_service_client::AdminServiceClient;

    use super::*;

    /// A control on loopback and a preapproved reusable key from it.
    async fn control(dir: &Path) -> (mesh_control::run::Running, String) {
        let config = mesh_control::config::Config {
            listen: std::net::SocketAddr::from(([127, 0, 0, 1], 0)),
            data_dir: dir.to_owned(),
            metrics_listen: None,
            admin_socket: None,
            ..mesh_control::config::Config::default()
        };
        let c = mesh_control::run::start(&config).await.expect("control starts");
        let ch = client::connect(&c.addr.to_string(), &Trust::CaPem(c.ca_pem.clone())).await.unwrap();
        let mut admin = AdminServiceClient::with_interceptor(ch, Bearer(c.bootstrap_admin_token.clone()));
        let req = pb::CreateEnrollmentKeyRequest { reusable: true, preapproved: true, ..Default::default() };
        let key = admin.create_enrollment_key(req).await.unwrap().into_inner().secret;
        (c, key)
    }

    fn agent(dir: &Path, cc: &ControlConfig) -> Config {
        Config { state_dir: dir.to_owned(), control: Some(cc.clone()), ..Config::default() }
    }

    /// A key file others can read is refused naming the file and the fix;
    /// at 0600 it enrolls and is removed. The inline key still works.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn enrollment_key_file_must_be_private_and_is_removed_after_enrolling() {
        let dir = tempfile::tempdir().unwrap();
        let (c, key) = control(&dir.path().join("control")).await;
        let key_file = dir.path().join("tlo-enroll.key");
        std::fs::write(&key_file, &key).unwrap();
        std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o644)).unwrap();
        let cc = ControlConfig {
            address: c.addr.to_string(),
            enrollment_key_file: Some(key_file.clone()),
            hostname: Some("tlo-gw1".into()),
            ..ControlConfig::default()
        };
        let state = dir.path().join("state1");
        std::fs::create_dir(&state).unwrap();
        let config = agent(&state, &cc);
        let public = PublicKey([1; 32]);
        let e = credential(&config, &cc, public).await.unwrap_err().to_string();
        assert!(e.contains(&key_file.display().to_string()) && e.contains("chmod 600"), "{e}");
        assert!(key_file.exists(), "a refused key file is left alone");

        std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o600)).unwrap();
        let cred = credential(&config, &cc, public).await.unwrap();
        assert!(!key_file.exists(), "the key file is removed once enrolled");
        assert_eq!(Credential::load(&config.control_credential_path()).unwrap().unwrap().node_id, cred.node_id);

        // The inline key (no file) enrolls a second node.
        let cc = ControlConfig {
            enrollment_key_file: None,
            enrollment_key: Some(key),
            hostname: Some("tlo-gw2".into()),
            ..cc
        };
        let state = dir.path().join("state2");
        std::fs::create_dir(&state).unwrap();
        let second = credential(&agent(&state, &cc), &cc, PublicKey([2; 32])).await.unwrap();
        assert_ne!(second.node_id, cred.node_id);
        c.shutdown();
    }

    #[test]
    fn renewal_at_half_life() {
        let c = |renewed_unix, expires_unix| Credential {
            node_id: 1,
            name: "n".into(),
            token: "t".into(),
            ca_pin: String::new(),
            ca_pins: Vec::new(),
            expires_unix,
            renewed_unix,
        };
        // A 90-day key: renewed daily.
        let day = 86_400;
        assert!(!c(1000, 1000 + 90 * day).renewal_due(1000 + day - 1));
        assert!(c(1000, 1000 + 90 * day).renewal_due(1000 + day));
        // A day left: after half of it; an hour left: not within the hour.
        assert!(!c(1000, 1000 + day).renewal_due(1000 + day / 2 - 1));
        assert!(c(1000, 1000 + day).renewal_due(1000 + day / 2));
        assert!(!c(1000, 1000 + 3000).renewal_due(3000));
        // Expired: nothing to renew (re-authentication instead).
        assert!(!c(1000, 1000 + 3000).renewal_due(1000 + 3000));
        // Unknown (older credential files): now.
        assert!(c(0, 100_000 + 86_401).renewal_due(100_000));
    }

    #[test]
    fn trusted_cas_replace_the_enrollment_pin_and_persist() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("control.json");
        // Two self-signed "CA" certificates, as control's would be.
        let pem = |n: u8| {
            use base64::Engine as _;
            let b64 = base64::engine::general_purpose::STANDARD.encode([n; 40]);
            format!("-----BEGIN CERTIFICATE-----\n{b64}\n-----END CERTIFICATE-----\n")
        };
        let pin = |n: u8| client::pin_of(&[n; 40]);
        let mut c = Credential {
            node_id: 1,
            name: "n".into(),
            token: "t".into(),
            ca_pin: hex::encode(pin(1)),
            ca_pins: Vec::new(),
            expires_unix: 0,
            renewed_unix: 0,
        };
        assert_eq!(c.pins().unwrap(), [pin(1)]);
        assert!(c.set_trusted(&[pem(1), pem(2)], &path).unwrap());
        assert!(!c.set_trusted(&[pem(1), pem(2)], &path).unwrap(), "unchanged: not written again");
        assert_eq!(Credential::load(&path).unwrap().unwrap().pins().unwrap(), [pin(1), pin(2)]);
        // Retirement: the enrollment key's CA is no longer trusted.
        assert!(c.set_trusted(&[pem(2)], &path).unwrap());
        assert_eq!(Credential::load(&path).unwrap().unwrap().pins().unwrap(), [pin(2)]);
        // Nothing usable: refused, the trusted set stays.
        assert!(c.set_trusted(&[], &path).is_err());
        assert!(c.set_trusted(&["junk".into()], &path).is_err());
        assert_eq!(c.pins().unwrap(), [pin(2)]);
    }

    /// An expired node key: with a new enrollment key the agent
    /// re-authenticates as the same node (control's key expiry is the
    /// authority; the test moves both clocks past it).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_expired_key_re_authenticates_as_the_same_node() {
        use mesh_control::engine::ManualClock;
        use mesh_proto::v1::admin_service_client::AdminServiceClient;
        let dir = tempfile::tempdir().unwrap();
        let clock = std::sync::Arc::new(ManualClock::at_wall_clock());
        let cfg = mesh_control::config::Config {
            listen: "127.0.0.1:0".parse().unwrap(),
            data_dir: dir.path().join("control"),
            metrics_listen: None,
            admin_socket: None,
            ..mesh_control::config::Config::default()
        };
        let c = mesh_control::run::start_with_clock(&cfg, clock.clone()).await.unwrap();
        let ch = client::connect(&c.addr.to_string(), &Trust::CaPem(c.ca_pem.clone())).await.unwrap();
        let admin = AdminServiceClient::with_interceptor(ch, Bearer(c.bootstrap_admin_token.clone()));
        let key = || {
            let mut admin = admin.clone();
            async move {
                let req = pb::CreateEnrollmentKeyRequest {
                    preapproved: true,
                    expires_in_seconds: 400 * 86_400,
                    ..Default::default()
                };
                admin.create_enrollment_key(req).await.unwrap().into_inner().secret
            }
        };
        let (first, second) = (key().await, key().await);
        let config = Config { state_dir: dir.path().join("agent"), ..Config::default() };
        std::fs::create_dir_all(&config.state_dir).unwrap();
        let cc = ControlConfig {
            address: c.addr.to_string(),
            enrollment_key: Some(first),
            hostname: Some("gw".into()),
            ..ControlConfig::default()
        };
        let enrolled = credential(&config, &cc, PublicKey([7; 32])).await.unwrap();
        // Not expired: the stored credential, no enrollment.
        let again = credential(&config, &cc, PublicKey([7; 32])).await.unwrap();
        assert_eq!(again.token, enrolled.token);
        // Past the key's expiry (at control and here), with a new key.
        clock.advance(enrolled.expires_unix - now_secs() + 60);
        let path = config.control_credential_path();
        let mut stored = Credential::load(&path).unwrap().unwrap();
        stored.expires_unix = now_secs() - 1;
        stored.save(&path).unwrap();
        let cc = ControlConfig { enrollment_key: Some(second), ..cc };
        let back = credential(&config, &cc, PublicKey([7; 32])).await.unwrap();
        assert_eq!((back.node_id, back.name.as_str()), (enrolled.node_id, enrolled.name.as_str()));
        assert_ne!(back.token, enrolled.token);
        assert!(back.expires_unix > enrolled.expires_unix);
        // (The bootstrap admin token expired with the skipped months.)
        let nodes = c.engine.snapshot().nodes.len();
        assert_eq!(nodes, 1, "the same node, not a second one");
    }
}
