//! The records the store keeps (plain serde types: their JSON is what the
//! audit log shows as before/after).

use std::net::{Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

/// Whether a node may take part in the mesh.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NodeState {
    /// Waiting for an admin's approval.
    Pending,
    /// In the mesh (unless its key has expired).
    Approved,
}

impl NodeState {
    pub(crate) const fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Approved => "approved",
        }
    }
}

/// A node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    /// Id, never reused.
    pub id: u64,
    /// Unique name (the hostname, with a suffix if taken).
    pub name: String,
    /// Hostname the agent reported.
    pub hostname: String,
    /// WireGuard public key, hex.
    pub public_key: String,
    /// Overlay IPv4 address.
    pub ipv4: Ipv4Addr,
    /// Overlay IPv6 address.
    pub ipv6: Ipv6Addr,
    /// Tags.
    pub tags: Vec<String>,
    /// Owner (from the enrollment key).
    pub owner: String,
    /// Approval state.
    pub state: NodeState,
    /// Removed after being offline for the ephemeral timeout.
    pub ephemeral: bool,
    /// Enrollment time, unix seconds.
    pub created: i64,
    /// Last time an agent stream opened or closed, unix seconds.
    pub last_seen: i64,
    /// Whether an agent stream is open (on any replica).
    pub online: bool,
    /// The replica holding the agent's stream (its host and listen
    /// address; empty while offline).
    pub replica: String,
    /// Node key and credential expiry, unix seconds.
    pub key_expiry: i64,
    /// An admin (or the automatic rotation) asked the agent to rotate its
    /// WireGuard key.
    pub rotation_requested: bool,
    /// When the node's current WireGuard key was set, unix seconds.
    pub key_created: i64,
    /// Underlay endpoints ("ip:port").
    pub endpoints: Vec<String>,
    /// SHA-256 of the node's credential, hex (never shown).
    #[serde(skip)]
    pub credential_hash: String,
    /// SHA-256 of the credential before the last renewal, valid until the
    /// new one is first used; empty when none (never shown).
    #[serde(skip)]
    pub prev_credential_hash: String,
}

/// Which of a node's credentials a request used.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CredentialMatch {
    /// The one issued last.
    Current,
    /// The one before it: the agent has not received (or not yet used) the
    /// renewed one.
    Previous,
}

impl NodeRecord {
    /// Whether the key has expired at `now`.
    #[must_use]
    pub const fn expired(&self, now: i64) -> bool {
        self.key_expiry <= now
    }

    /// Whether `hash` is this node's credential, or its previous one still
    /// in its grace period; compared in constant time.
    #[must_use]
    pub fn credential_matches(&self, hash: &str) -> Option<CredentialMatch> {
        if crate::auth::hash_eq(&self.credential_hash, hash) {
            Some(CredentialMatch::Current)
        } else if !self.prev_credential_hash.is_empty() && crate::auth::hash_eq(&self.prev_credential_hash, hash) {
            Some(CredentialMatch::Previous)
        } else {
            None
        }
    }

    /// Whether the node takes part in the mesh at `now`.
    #[must_use]
    pub const fn active(&self, now: i64) -> bool {
        matches!(self.state, NodeState::Approved) && !self.expired(now)
    }

    /// An approved, online node with a name and nothing else, for tests
    /// that set the fields they care about with struct update syntax.
    #[cfg(test)]
    #[must_use]
    pub fn for_test(id: u64, name: &str) -> Self {
        Self {
            id,
            name: name.into(),
            hostname: name.into(),
            public_key: String::new(),
            ipv4: std::net::Ipv4Addr::new(100, 64, 0, 1),
            ipv6: std::net::Ipv6Addr::LOCALHOST,
            tags: Vec::new(),
            owner: String::new(),
            state: NodeState::Approved,
            ephemeral: false,
            created: 0,
            last_seen: 0,
            online: true,
            key_expiry: i64::MAX,
            rotation_requested: false,
            key_created: 0,
            replica: String::new(),
            endpoints: Vec::new(),
            credential_hash: String::new(),
            prev_credential_hash: String::new(),
        }
    }
}

/// A site route advertised by a gateway.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouteRecord {
    /// The gateway.
    pub node_id: u64,
    /// The site CIDR.
    pub prefix: IpNet,
    /// Approved (by an admin or an autoApprovers entry).
    pub approved: bool,
    /// Approved by autoApprovers.
    pub auto_approved: bool,
    /// Lower is preferred.
    pub priority: i32,
    /// The gateway's last report says the route works.
    pub healthy: bool,
    /// Virtual gateway addresses the site's owner holds (as advertised).
    pub virtual_addresses: Vec<String>,
    /// The gateway masquerades overlay traffic into the prefix.
    pub snat: bool,
    /// The gateway's own addresses on the site LAN (as advertised): its
    /// site peers probe it there.
    pub lan_addresses: Vec<String>,
    /// The gateway says it owns the site side of the prefix.
    pub owner: bool,
    /// Since when (unix seconds; 0 when not the owner).
    pub owner_since: i64,
}

/// A route's options as its gateway advertises them (validated).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RouteOptionsRecord {
    /// See [`RouteRecord::virtual_addresses`].
    pub virtual_addresses: Vec<String>,
    /// See [`RouteRecord::snat`].
    pub snat: bool,
    /// See [`RouteRecord::lan_addresses`].
    pub lan_addresses: Vec<String>,
}

/// An enrollment key (its secret is only stored hashed).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyRecord {
    /// Public id (the part of the key before the secret).
    pub id: String,
    /// Usable more than once.
    pub reusable: bool,
    /// Enrolls ephemeral nodes.
    pub ephemeral: bool,
    /// Enrolls approved nodes.
    pub preapproved: bool,
    /// Tags the nodes get.
    pub tags: Vec<String>,
    /// Owner of the nodes.
    pub owner: String,
    /// Free text.
    pub description: String,
    /// Creation time.
    pub created: i64,
    /// Expiry time.
    pub expires: i64,
    /// Revoked by an admin.
    pub revoked: bool,
    /// Enrollments so far.
    pub uses: u64,
    /// SHA-256 of the secret, hex.
    #[serde(skip)]
    pub secret_hash: String,
}

/// One audit log entry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditRecord {
    /// Increasing id.
    pub id: u64,
    /// Time, unix seconds.
    pub at: i64,
    /// Who: `admin:<token id>`, `local-admin`, `node/<id>`, `control`.
    pub actor: String,
    /// What: `node.approve`, `policy.set`, ...
    pub action: String,
    /// About what: `node/3`, `key/abc`, `route/3/198.18.10.0/24`, `policy`.
    pub subject: String,
    /// JSON before (empty if none).
    pub before: String,
    /// JSON after (empty if none).
    pub after: String,
}

/// A filter over the audit log.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AuditFilter {
    /// Entries with a larger id only.
    pub after_id: u64,
    /// Action prefix.
    pub action_prefix: String,
    /// Exact actor.
    pub actor: String,
    /// Exact subject.
    pub subject: String,
    /// At most this many, newest last (0: 100).
    pub limit: u32,
}

/// The active policy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PolicyRecord {
    /// Generation (increases with every set).
    pub generation: u64,
    /// HuJSON text.
    pub text: String,
}

/// Everything the views are computed from.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    /// The store's change counter when this was read.
    pub version: i64,
    /// All nodes.
    pub nodes: Vec<NodeRecord>,
    /// All routes.
    pub routes: Vec<RouteRecord>,
    /// The active policy (None before the first set).
    pub policy: Option<PolicyRecord>,
    /// Each prefix's primary gateway as the lease holder decided it.
    pub primaries: std::collections::BTreeMap<IpNet, u64>,
}
