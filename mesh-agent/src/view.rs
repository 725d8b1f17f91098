//! The node view: the declarative desired state of one node, as mesh-control
//! sends it (and as `mesh-agent apply --state FILE` reads it).
//!
//! A plain serde type (JSON or TOML) so that the control protocol's message
//! converts into it field by field. Secrets that never leave the node (the
//! private key) are not part of it.

use std::{collections::BTreeSet, net::SocketAddr, path::Path};

use ipnet::IpNet;
use mesh_policy::CompiledPolicy;
use serde::{Deserialize, Serialize};

use crate::keys::{PublicKey, SecretKey};

/// MTU of the overlay interface when the view does not say: 1500 minus the
/// WireGuard overhead over IPv6 (80 bytes), as wg-quick does.
pub const DEFAULT_MTU: u32 = 1420;

/// The desired state of one node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeView {
    /// Generation of this view at control (monotonic within one epoch); 0
    /// for a hand-written view.
    #[serde(default)]
    pub generation: u64,
    /// The stream from control this view came in (a random number per
    /// stream; 0 for a hand-written view). Generations order views only
    /// within one epoch: another replica, or control restarted with its
    /// clock set back, numbers its views from elsewhere, and the first
    /// snapshot of each stream is control's whole current state.
    #[serde(default)]
    pub epoch: u64,
    /// The node's own public key as registered at control. When present it
    /// must match the local private key (a view meant for another node is
    /// refused).
    #[serde(default)]
    pub public_key: Option<PublicKey>,
    /// Overlay addresses of the node on the WireGuard interface, with their
    /// prefix (`100.64.0.1/32`, `fd7a:6d65:7368::1/128`).
    #[serde(default)]
    pub addresses: Vec<IpNet>,
    /// MTU of the WireGuard interface.
    #[serde(default = "default_mtu")]
    pub mtu: u32,
    /// The node is a subnet router: IPv4 and IPv6 forwarding are turned on.
    /// `false` leaves the sysctls as they are (never turns them off).
    #[serde(default)]
    pub forwarding: bool,
    /// The peers.
    #[serde(default)]
    pub peers: Vec<PeerView>,
    /// Destinations routed into the overlay interface (remote site subnets,
    /// the overlay range).
    #[serde(default)]
    pub routes: Vec<IpNet>,
    /// The node's compiled ACL policy (default deny plus these rules).
    #[serde(default)]
    pub policy: CompiledPolicy,
}

fn default_mtu() -> u32 {
    DEFAULT_MTU
}

/// One peer of the node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeerView {
    /// The peer's public key.
    pub public_key: PublicKey,
    /// A readable name for logs and status (the peer's node name).
    #[serde(default)]
    pub name: Option<String>,
    /// Where to send the first handshake (`192.0.2.1:51820`). A peer without
    /// an endpoint waits to be contacted.
    #[serde(default)]
    pub endpoint: Option<SocketAddr>,
    /// The endpoint is the agent's own path choice (direct or through a
    /// relay's local proxy): it is set even on a live session, which
    /// WireGuard would otherwise keep at the address it roamed to.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub pin_endpoint: bool,
    /// Source addresses accepted from and destinations routed to this peer.
    #[serde(default)]
    pub allowed_ips: Vec<IpNet>,
    /// Persistent keepalive interval in seconds (through NAT).
    #[serde(default)]
    pub persistent_keepalive: Option<u16>,
    /// Preshared key (base64), an extra symmetric layer.
    #[serde(default)]
    pub preshared_key: Option<SecretKey>,
}

/// A node view that cannot be applied.
#[derive(Debug, thiserror::Error)]
pub enum ViewError {
    /// Unreadable file.
    #[error("reading {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// The error.
        source: std::io::Error,
    },
    /// Neither valid JSON nor valid TOML.
    #[error("parsing {path}: {message}")]
    Parse {
        /// The file.
        path: String,
        /// The parser's message.
        message: String,
    },
    /// A semantic error.
    #[error("invalid node view: {0}")]
    Invalid(String),
}

impl NodeView {
    /// Reads a view from a JSON (`.json`) or TOML (anything else) file.
    pub fn load(path: &Path) -> Result<Self, ViewError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| ViewError::Read { path: path.display().to_string(), source })?;
        let parsed = if path.extension().is_some_and(|e| e == "json") {
            serde_json::from_str(&text).map_err(|e| e.to_string())
        } else {
            toml::from_str(&text).map_err(|e| e.to_string())
        };
        let view: Self = parsed.map_err(|message| ViewError::Parse { path: path.display().to_string(), message })?;
        Ok(view)
    }

    /// Checks what would make reconcile fail or never converge. `own` is the
    /// local public key.
    pub fn validate(&self, own: &PublicKey) -> Result<(), ViewError> {
        let bad = |m: String| Err(ViewError::Invalid(m));
        if let Some(pk) = &self.public_key
            && pk != own
        {
            return bad(format!("the view is for public key {pk}, this node's key is {own}"));
        }
        if !(1280..=9000).contains(&self.mtu) {
            return bad(format!("mtu {} is outside 1280..=9000", self.mtu));
        }
        let mut keys = BTreeSet::new();
        let mut allowed = BTreeSet::new();
        for peer in &self.peers {
            if peer.public_key == *own {
                return bad(format!("peer {} is this node itself", peer.public_key));
            }
            if !keys.insert(peer.public_key) {
                return bad(format!("peer {} appears twice", peer.public_key));
            }
            for ip in &peer.allowed_ips {
                // WireGuard moves an allowed IP to the last peer that claims
                // it: a view giving one to two peers would never converge.
                if !allowed.insert(ip.trunc()) {
                    return bad(format!("allowed IP {ip} is given to more than one peer"));
                }
            }
        }
        self.policy.validate().map_err(|e| ViewError::Invalid(format!("policy: {e}")))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> PublicKey {
        SecretKey::generate().public_key()
    }

    #[test]
    fn parses_toml_with_defaults() {
        let k = key();
        let text = format!(
            r#"
            addresses = ["100.64.0.1/32"]
            routes = ["198.18.20.0/24"]
            [[peers]]
            public_key = "{k}"
            endpoint = "192.0.2.2:51820"
            allowed_ips = ["100.64.0.2/32", "198.18.20.0/24"]
            "#
        );
        let v: NodeView = toml::from_str(&text).unwrap();
        assert_eq!(v.mtu, DEFAULT_MTU);
        assert_eq!(v.peers[0].public_key, k);
        assert!(v.policy.rules.is_empty());
        v.validate(&key()).unwrap();
    }

    #[test]
    fn shared_allowed_ip_is_refused() {
        let p = |k| PeerView {
            public_key: k,
            name: None,
            endpoint: None,
            pin_endpoint: false,
            allowed_ips: vec!["198.18.20.0/24".parse().unwrap()],
            persistent_keepalive: None,
            preshared_key: None,
        };
        let v = NodeView {
            generation: 1,
            epoch: 0,
            public_key: None,
            addresses: vec![],
            mtu: DEFAULT_MTU,
            forwarding: false,
            peers: vec![p(key()), p(key())],
            routes: vec![],
            policy: CompiledPolicy::default(),
        };
        assert!(v.validate(&key()).is_err());
    }

    #[test]
    fn foreign_view_is_refused() {
        let v: NodeView = serde_json::from_str(&format!(r#"{{"public_key":"{}"}}"#, key())).unwrap();
        assert!(v.validate(&key()).is_err());
    }
}
