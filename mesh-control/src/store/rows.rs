//! Rows to records, and the value encodings the schema uses (booleans as
//! integers, lists as JSON text, ids as signed integers).

use serde::Serialize;
use sqlx::Row;
use sqlx::any::AnyRow;

use super::records::{AuditRecord, KeyRecord, NodeRecord, NodeState, RouteRecord};
use super::{Result, StoreError, overlay_addrs};

pub(super) fn b(v: bool) -> i64 {
    i64::from(v)
}

pub(super) fn json<T: Serialize>(v: &T) -> String {
    serde_json::to_string(v).unwrap_or_default()
}

pub(super) fn list(s: &str) -> Vec<String> {
    serde_json::from_str(s).unwrap_or_default()
}

pub(super) fn u(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

pub(super) fn i(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

pub(super) const NODE_COLS: &str = "id, name, hostname, public_key, addr_index, tags, owner, state, ephemeral, created, \
                         last_seen, online, key_expiry, rotation_requested, endpoints, credential_hash, \
                         prev_credential_hash, key_created, replica";

pub(super) fn node_row(r: &AnyRow) -> Result<NodeRecord> {
    let idx: i64 = r.try_get("addr_index")?;
    let (ipv4, ipv6) = overlay_addrs(u32::try_from(idx).map_err(|_| StoreError::Corrupt("addr_index".into()))?);
    let state: String = r.try_get("state")?;
    Ok(NodeRecord {
        id: u(r.try_get("id")?),
        name: r.try_get("name")?,
        hostname: r.try_get("hostname")?,
        public_key: r.try_get("public_key")?,
        ipv4,
        ipv6,
        tags: list(&r.try_get::<String, _>("tags")?),
        owner: r.try_get("owner")?,
        state: if state == "approved" { NodeState::Approved } else { NodeState::Pending },
        ephemeral: r.try_get::<i64, _>("ephemeral")? != 0,
        created: r.try_get("created")?,
        last_seen: r.try_get("last_seen")?,
        online: r.try_get::<i64, _>("online")? != 0,
        key_expiry: r.try_get("key_expiry")?,
        rotation_requested: r.try_get::<i64, _>("rotation_requested")? != 0,
        endpoints: list(&r.try_get::<String, _>("endpoints")?),
        credential_hash: r.try_get("credential_hash")?,
        prev_credential_hash: r.try_get("prev_credential_hash")?,
        key_created: r.try_get("key_created")?,
        replica: r.try_get("replica")?,
    })
}

pub(super) fn route_row(r: &AnyRow) -> Result<RouteRecord> {
    let prefix: String = r.try_get("prefix")?;
    Ok(RouteRecord {
        node_id: u(r.try_get("node_id")?),
        prefix: prefix.parse().map_err(|_| StoreError::Corrupt(format!("route prefix {prefix}")))?,
        approved: r.try_get::<i64, _>("approved")? != 0,
        auto_approved: r.try_get::<i64, _>("auto_approved")? != 0,
        priority: i32::try_from(r.try_get::<i64, _>("priority")?).unwrap_or(0),
        healthy: r.try_get::<i64, _>("healthy")? != 0,
        virtual_addresses: list(&r.try_get::<String, _>("virtual_addresses")?),
        snat: r.try_get::<i64, _>("snat")? != 0,
        lan_addresses: list(&r.try_get::<String, _>("lan_addresses")?),
        owner: r.try_get::<i64, _>("owner")? != 0,
        owner_since: r.try_get("owner_since")?,
    })
}

pub(super) fn key_row(r: &AnyRow) -> Result<KeyRecord> {
    Ok(KeyRecord {
        id: r.try_get("id")?,
        reusable: r.try_get::<i64, _>("reusable")? != 0,
        ephemeral: r.try_get::<i64, _>("ephemeral")? != 0,
        preapproved: r.try_get::<i64, _>("preapproved")? != 0,
        tags: list(&r.try_get::<String, _>("tags")?),
        owner: r.try_get("owner")?,
        description: r.try_get("description")?,
        created: r.try_get("created")?,
        expires: r.try_get("expires")?,
        revoked: r.try_get::<i64, _>("revoked")? != 0,
        uses: u(r.try_get("uses")?),
        secret_hash: r.try_get("secret_hash")?,
    })
}

pub(super) fn audit_row(r: &AnyRow) -> Result<AuditRecord> {
    Ok(AuditRecord {
        id: u(r.try_get("id")?),
        at: r.try_get("at")?,
        actor: r.try_get("actor")?,
        action: r.try_get("action")?,
        subject: r.try_get("subject")?,
        before: r.try_get("before_json")?,
        after: r.try_get("after_json")?,
    })
}
