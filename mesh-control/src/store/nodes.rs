//! Enrollment and node records.

use ipnet::IpNet;
use sqlx::{Any, Row, Transaction};

use super::audit::audit;
use super::records::{CredentialMatch, KeyRecord, NodeRecord, NodeState};
use super::routes::insert_route;
use super::rows::{NODE_COLS, b, i, json, key_row, node_row, u};
use super::{MAX_ADDR_INDEX, Result, Store, StoreError};

/// What a new node is enrolled with.
#[derive(Clone, Debug)]
pub struct NewNode {
    /// Hostname.
    pub hostname: String,
    /// WireGuard public key, hex.
    pub public_key: String,
    /// Underlay endpoints.
    pub endpoints: Vec<String>,
    /// Advertised site routes, with whether autoApprovers approves each.
    pub routes: Vec<(IpNet, bool)>,
    /// Credential hash.
    pub credential_hash: String,
    /// Key lifetime in seconds.
    pub key_lifetime: i64,
}

impl Store {
    /// Enrolls a node with key `key_id` whose secret hashes to
    /// `secret_hash`: checks and consumes the key, allocates addresses and a
    /// unique name, stores the node and its routes, all in one transaction.
    /// `auto_approve` says which advertised routes autoApprovers approves
    /// for a node with the key's tags and owner.
    pub async fn enroll(
        &self,
        key_id: &str,
        secret_hash: &str,
        node: &NewNode,
        auto_approve: impl Fn(&KeyRecord, &IpNet) -> bool,
        now: i64,
    ) -> Result<NodeRecord> {
        let mut last = None;
        // Two replicas may pick the same address index at once; the unique
        // index makes one fail, and it retries.
        for _ in 0..5 {
            match self.enroll_once(key_id, secret_hash, node, &auto_approve, now).await {
                Err(StoreError::Db(e)) if is_unique_violation(&e) => last = Some(e),
                other => return other,
            }
        }
        Err(StoreError::Db(last.unwrap_or(sqlx::Error::PoolClosed)))
    }

    /// Re-authenticates node `id` with an enrollment key: the node keeps its
    /// identity (id, name, addresses, tags, routes) and gets a new
    /// credential, WireGuard key and key expiry, as if it had enrolled.
    /// Consumes the key like an enrollment; refused (as a conflict) with a
    /// bad key.
    #[allow(clippy::too_many_arguments)]
    pub async fn reauthenticate(
        &self,
        id: u64,
        key_id: &str,
        secret_hash: &str,
        credential_hash: String,
        public_key: String,
        key_lifetime: i64,
        now: i64,
    ) -> Result<NodeRecord> {
        let expiry = now.checked_add(key_lifetime).ok_or_else(|| StoreError::Conflict("key lifetime".into()))?;
        let mut tx = self.write_tx().await?;
        consume_key(&mut tx, key_id, secret_hash, now).await?;
        let after = update_node_in(&mut tx, id, &format!("key/{key_id}"), "node.reauth", now, |n| {
            n.credential_hash = credential_hash;
            n.prev_credential_hash.clear();
            n.public_key = public_key;
            n.rotation_requested = false;
            n.key_expiry = expiry;
        })
        .await?;
        tx.commit().await?;
        Ok(after)
    }

    /// Whether key `key_id` with secret hash `secret_hash` would admit an
    /// enrollment now: a plain read, so that a wrong or used key is refused
    /// before any write transaction is opened (on SQLite a write holds the
    /// whole database). [`Store::enroll`] checks again inside its
    /// transaction, which is what makes a one-off key single-use.
    pub async fn enrollment_key_admits(&self, key_id: &str, secret_hash: &str, now: i64) -> Result<bool> {
        let key = sqlx::query("SELECT * FROM enrollment_keys WHERE id = $1")
            .bind(key_id)
            .fetch_optional(&self.pool)
            .await?
            .map(|r| key_row(&r))
            .transpose()?;
        Ok(key.is_some_and(|k| {
            crate::auth::hash_eq(&k.secret_hash, secret_hash)
                && !k.revoked
                && k.expires > now
                && (k.reusable || k.uses == 0)
        }))
    }

    async fn enroll_once(
        &self,
        key_id: &str,
        secret_hash: &str,
        node: &NewNode,
        auto_approve: &impl Fn(&KeyRecord, &IpNet) -> bool,
        now: i64,
    ) -> Result<NodeRecord> {
        let mut tx = self.write_tx().await?;
        let key = consume_key(&mut tx, key_id, secret_hash, now).await?;
        let idx: i64 =
            sqlx::query("SELECT COALESCE(MAX(addr_index), 0) + 1 FROM nodes").fetch_one(&mut *tx).await?.try_get(0)?;
        if idx > MAX_ADDR_INDEX {
            return Err(StoreError::Conflict("overlay address space exhausted".into()));
        }
        let name = unique_name(&mut tx, &node.hostname).await?;
        let state = if key.preapproved { NodeState::Approved } else { NodeState::Pending };
        let id: i64 = sqlx::query(
            "INSERT INTO nodes (name, hostname, public_key, addr_index, tags, owner, state, ephemeral, created, \
             last_seen, online, key_expiry, rotation_requested, endpoints, credential_hash, key_created) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $9, 0, $10, 0, $11, $12, $9) RETURNING id",
        )
        .bind(&name)
        .bind(&node.hostname)
        .bind(&node.public_key)
        .bind(idx)
        .bind(json(&key.tags))
        .bind(&key.owner)
        .bind(state.as_str())
        .bind(b(key.ephemeral))
        .bind(now)
        .bind(now.saturating_add(node.key_lifetime))
        .bind(json(&node.endpoints))
        .bind(&node.credential_hash)
        .fetch_one(&mut *tx)
        .await?
        .try_get(0)?;
        let id = u(id);
        for (prefix, _) in &node.routes {
            let auto = auto_approve(&key, prefix);
            insert_route(&mut tx, id, prefix, auto).await?;
        }
        let rec = node_in(&mut tx, id).await?;
        audit(&mut tx, now, &format!("key/{key_id}"), "node.enroll", &format!("node/{id}"), String::new(), json(&rec))
            .await?;
        tx.commit().await?;
        Ok(rec)
    }

    /// Finds the node whose credential hashes to `hash`.
    pub async fn node_by_credential(&self, hash: &str) -> Result<Option<NodeRecord>> {
        sqlx::query(&format!("SELECT {NODE_COLS} FROM nodes WHERE credential_hash = $1 OR prev_credential_hash = $1"))
            .bind(hash)
            .fetch_optional(&self.pool)
            .await?
            .map(|r| node_row(&r))
            .transpose()
    }

    /// One node.
    pub async fn node(&self, id: u64) -> Result<NodeRecord> {
        let mut tx = self.pool.begin().await?;
        let n = node_in(&mut tx, id).await?;
        tx.commit().await?;
        Ok(n)
    }

    /// Applies `change` to node `id`, auditing it as `action`.
    async fn update_node(
        &self,
        id: u64,
        actor: &str,
        action: &str,
        now: i64,
        change: impl FnOnce(&mut NodeRecord),
    ) -> Result<NodeRecord> {
        let mut tx = self.write_tx().await?;
        let after = update_node_in(&mut tx, id, actor, action, now, change).await?;
        tx.commit().await?;
        Ok(after)
    }

    /// Approves a pending node.
    pub async fn approve_node(&self, id: u64, actor: &str, now: i64) -> Result<NodeRecord> {
        self.update_node(id, actor, "node.approve", now, |n| n.state = NodeState::Approved).await
    }

    /// Replaces a node's tags.
    pub async fn set_tags(&self, id: u64, tags: Vec<String>, actor: &str, now: i64) -> Result<NodeRecord> {
        self.update_node(id, actor, "node.set_tags", now, |n| n.tags = tags).await
    }

    /// Expires a node's key (and so its credential) now.
    pub async fn expire_key(&self, id: u64, actor: &str, now: i64) -> Result<NodeRecord> {
        self.update_node(id, actor, "node.expire_key", now, |n| n.key_expiry = n.key_expiry.min(now)).await
    }

    /// Asks the node to rotate its key.
    pub async fn request_rotation(&self, id: u64, actor: &str, now: i64) -> Result<NodeRecord> {
        self.update_node(id, actor, "node.rotate_key", now, |n| n.rotation_requested = true).await
    }

    /// Renews a node's credential (and, with `new_public_key`, its
    /// WireGuard key). The key's expiry does not move: only an admin or a
    /// re-authentication with an enrollment key extends it. The credential
    /// the request used stays valid until the new one is first used
    /// ([`Store::retire_previous_credential`]), so an agent that never got
    /// the answer is not locked out; `used` says which one that was.
    pub async fn renew(
        &self,
        id: u64,
        credential_hash: String,
        used: CredentialMatch,
        new_public_key: Option<String>,
        now: i64,
    ) -> Result<NodeRecord> {
        // A new key is its own audit entry: the rotation operators look for.
        let action = if new_public_key.is_some() { "node.key_rotated" } else { "node.renew" };
        self.update_node(id, &format!("node/{id}"), action, now, |n| {
            if used == CredentialMatch::Current {
                n.prev_credential_hash = std::mem::take(&mut n.credential_hash);
            }
            n.credential_hash = credential_hash;
            if let Some(k) = new_public_key {
                n.public_key = k;
                n.rotation_requested = false;
            }
        })
        .await
    }

    /// Ends the grace period of a node's previous credential: the renewed
    /// one has been used.
    pub async fn retire_previous_credential(&self, id: u64, now: i64) -> Result<NodeRecord> {
        self.update_node(id, &format!("node/{id}"), "node.credential_confirmed", now, |n| {
            n.prev_credential_hash.clear();
        })
        .await
    }

    /// Extends a node's key to `expiry` (an admin's decision).
    pub async fn extend_key(&self, id: u64, expiry: i64, actor: &str, now: i64) -> Result<NodeRecord> {
        self.update_node(id, actor, "node.extend", now, |n| n.key_expiry = expiry).await
    }

    /// Records an agent stream opening or closing on `replica`, and its
    /// endpoints. A stream closing on a replica that no longer holds it
    /// (the agent already moved to another) changes nothing: the node is
    /// online there.
    pub async fn set_presence(
        &self,
        id: u64,
        online: bool,
        endpoints: Option<Vec<String>>,
        replica: &str,
        now: i64,
    ) -> Result<NodeRecord> {
        let action = if online { "node.online" } else { "node.offline" };
        self.update_node(id, &format!("node/{id}"), action, now, |n| {
            if !online && n.replica != replica {
                return;
            }
            n.online = online;
            n.replica = if online { replica.to_owned() } else { String::new() };
            n.last_seen = now;
            if let Some(e) = endpoints {
                n.endpoints = e;
            }
        })
        .await
    }

    /// Replaces a node's endpoints with the candidates its agent reported
    /// (capability 7). Audited as `node.endpoints` by the node; an
    /// unchanged list writes nothing.
    pub async fn set_endpoints(&self, id: u64, endpoints: Vec<String>, now: i64) -> Result<NodeRecord> {
        self.update_node(id, &format!("node/{id}"), "node.endpoints", now, |n| n.endpoints = endpoints).await
    }

    /// Removes a node and its routes.
    pub async fn remove_node(&self, id: u64, actor: &str, now: i64) -> Result<NodeRecord> {
        let mut tx = self.write_tx().await?;
        let before = node_in(&mut tx, id).await?;
        sqlx::query("DELETE FROM routes WHERE node_id = $1").bind(i(id)).execute(&mut *tx).await?;
        sqlx::query("DELETE FROM nodes WHERE id = $1").bind(i(id)).execute(&mut *tx).await?;
        audit(&mut tx, now, actor, "node.remove", &format!("node/{id}"), json(&before), String::new()).await?;
        tx.commit().await?;
        Ok(before)
    }
}

async fn node_in(tx: &mut Transaction<'_, Any>, id: u64) -> Result<NodeRecord> {
    let row = sqlx::query(&format!("SELECT {NODE_COLS} FROM nodes WHERE id = $1"))
        .bind(i(id))
        .fetch_optional(&mut **tx)
        .await?
        .ok_or_else(|| StoreError::NotFound(format!("node {id}")))?;
    node_row(&row)
}

async fn unique_name(tx: &mut Transaction<'_, Any>, hostname: &str) -> Result<String> {
    let base: String = hostname
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || c == '-' { c.to_ascii_lowercase() } else { '-' })
        .collect();
    let base = if base.is_empty() { "node".to_owned() } else { base };
    for n in 1.. {
        let name = if n == 1 { base.clone() } else { format!("{base}-{n}") };
        let taken = sqlx::query("SELECT 1 FROM nodes WHERE name = $1").bind(&name).fetch_optional(&mut **tx).await?;
        if taken.is_none() {
            return Ok(name);
        }
    }
    unreachable!("some suffix is free")
}

fn is_unique_violation(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(d) if d.is_unique_violation())
}

/// Checks enrollment key `key_id` against `secret_hash` inside `tx` and
/// counts one use (a one-off key only once: only one transaction sees
/// `uses = 0`).
async fn consume_key(
    tx: &mut Transaction<'static, Any>,
    key_id: &str,
    secret_hash: &str,
    now: i64,
) -> Result<KeyRecord> {
    let key = sqlx::query("SELECT * FROM enrollment_keys WHERE id = $1")
        .bind(key_id)
        .fetch_optional(&mut **tx)
        .await?
        .map(|r| key_row(&r))
        .transpose()?;
    // One answer for every refusal: nothing about which keys exist.
    let refuse = || StoreError::Conflict("enrollment key is invalid, used, revoked or expired".into());
    let key = key.ok_or_else(refuse)?;
    if !crate::auth::hash_eq(&key.secret_hash, secret_hash) || key.revoked || key.expires <= now {
        return Err(refuse());
    }
    let consumed =
        sqlx::query("UPDATE enrollment_keys SET uses = uses + 1 WHERE id = $1 AND (reusable = 1 OR uses = 0)")
            .bind(key_id)
            .execute(&mut **tx)
            .await?;
    if consumed.rows_affected() != 1 {
        return Err(refuse());
    }
    Ok(key)
}

/// Changes node `id` inside `tx` and audits the change (nothing when
/// `change` changes nothing).
async fn update_node_in(
    tx: &mut Transaction<'static, Any>,
    id: u64,
    actor: &str,
    action: &str,
    now: i64,
    change: impl FnOnce(&mut NodeRecord),
) -> Result<NodeRecord> {
    let before = node_in(tx, id).await?;
    let mut after = before.clone();
    change(&mut after);
    if after == before {
        return Ok(after);
    }
    if after.public_key != before.public_key {
        // Whatever changed the key (a rotation, a re-enrollment), its age starts now.
        after.key_created = now;
    }
    sqlx::query(
        "UPDATE nodes SET public_key = $2, tags = $3, state = $4, last_seen = $5, online = $6, key_expiry = $7, \
         rotation_requested = $8, endpoints = $9, credential_hash = $10, prev_credential_hash = $11, \
         key_created = $12, replica = $13 WHERE id = $1",
    )
    .bind(i(id))
    .bind(&after.public_key)
    .bind(json(&after.tags))
    .bind(after.state.as_str())
    .bind(after.last_seen)
    .bind(b(after.online))
    .bind(after.key_expiry)
    .bind(b(after.rotation_requested))
    .bind(json(&after.endpoints))
    .bind(&after.credential_hash)
    .bind(&after.prev_credential_hash)
    .bind(after.key_created)
    .bind(&after.replica)
    .execute(&mut **tx)
    .await?;
    audit(tx, now, actor, action, &format!("node/{id}"), json(&before), json(&after)).await?;
    Ok(after)
}
