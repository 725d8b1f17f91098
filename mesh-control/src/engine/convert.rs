//! Store records to their `mesh.v1` messages (compiled policies:
//! `mesh_client::policy`).

use mesh_proto::v1 as pb;

use crate::store::{AuditRecord, KeyRecord, NodeRecord, NodeState};

/// Seven days: a key closer than this to expiry is "expiring soon".
pub const EXPIRING_SOON_SECS: i64 = 7 * 86_400;

/// Limits as an agent reports them; a 0 (unset) field is no limit.
#[must_use]
pub fn limits(l: &pb::DataplaneLimits) -> mesh_policy::tables::Limits {
    let or_max = |v: u32| if v == 0 { u32::MAX } else { v };
    mesh_policy::tables::Limits {
        max_rules: or_max(l.max_rules),
        max_cidrs: or_max(l.max_cidrs),
        max_dst_entries: or_max(l.max_dst_entries),
        max_policy_entries: or_max(l.max_policy_entries),
    }
}

/// A node as the API shows it. `volatile` includes presence fields (left
/// out of agent views so presence changes do not push new generations).
#[must_use]
pub fn node(n: &NodeRecord, now: i64, volatile: bool) -> pb::Node {
    let state = if n.expired(now) {
        pb::NodeState::Expired
    } else if n.state == NodeState::Approved {
        pb::NodeState::Approved
    } else {
        pb::NodeState::Pending
    };
    pb::Node {
        id: n.id,
        name: n.name.clone(),
        hostname: n.hostname.clone(),
        wireguard_public_key: hex::decode(&n.public_key).unwrap_or_default(),
        ipv4: n.ipv4.to_string(),
        ipv6: n.ipv6.to_string(),
        tags: n.tags.clone(),
        state: state.into(),
        ephemeral: n.ephemeral,
        online: volatile && n.online,
        replica: if volatile { n.replica.clone() } else { String::new() },
        created_unix: n.created,
        key_created_unix: n.key_created,
        last_seen_unix: if volatile { n.last_seen } else { 0 },
        key_expiry_unix: n.key_expiry,
        key_expiring_soon: volatile && !n.expired(now) && n.key_expiry - now < EXPIRING_SOON_SECS,
        key_rotation_requested: n.rotation_requested,
        endpoints: n.endpoints.clone(),
        advertised_routes: Vec::new(),
        user: n.owner.clone(),
        acked_generation: 0,
        backend: String::new(),
        view_error: String::new(),
        view_error_generation: 0,
    }
}

/// An enrollment key as the API shows it.
#[must_use]
pub fn key(k: &KeyRecord) -> pb::EnrollmentKey {
    pb::EnrollmentKey {
        id: k.id.clone(),
        reusable: k.reusable,
        ephemeral: k.ephemeral,
        preapproved: k.preapproved,
        tags: k.tags.clone(),
        user: k.owner.clone(),
        description: k.description.clone(),
        created_unix: k.created,
        expires_unix: k.expires,
        revoked: k.revoked,
        uses: k.uses,
    }
}

/// An audit entry on the wire.
#[must_use]
pub fn audit(a: &AuditRecord) -> pb::AuditEntry {
    pb::AuditEntry {
        id: a.id,
        at_unix: a.at,
        actor: a.actor.clone(),
        action: a.action.clone(),
        subject: a.subject.clone(),
        before: a.before.clone(),
        after: a.after.clone(),
    }
}

/// An admin token as the API shows it (never its secret).
#[must_use]
pub fn admin_token(t: &crate::store::TokenRecord) -> pb::AdminToken {
    pb::AdminToken {
        id: t.id.clone(),
        description: t.description.clone(),
        created_unix: t.created,
        expires_unix: t.expires,
        revoked: t.revoked,
    }
}
