//! Persistent state: SQLite by default (one file, WAL), PostgreSQL for
//! several control replicas sharing one database. Both run the same SQL
//! through sqlx's `Any` driver; only the schema's id column differs.
//!
//! Every change runs in one transaction that also writes its audit entry
//! and bumps the `state.version` counter; replicas poll that counter and
//! reload, which is how a change made on one replica reaches the agents
//! connected to another.

mod records;
mod schema;

use std::net::{Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;
use serde::Serialize;
use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::{Any, AnyPool, Row, Transaction};

pub use records::{
    AuditFilter, AuditRecord, KeyRecord, NodeRecord, NodeState, PolicyRecord, RouteOptionsRecord, RouteRecord, Snapshot,
};

/// A store failure.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database said no.
    #[error("database: {0}")]
    Db(#[from] sqlx::Error),
    /// No such thing.
    #[error("{0} not found")]
    NotFound(String),
    /// The request conflicts with the state (a used one-off key...).
    #[error("{0}")]
    Conflict(String),
    /// A stored value does not parse (a bug or a hand-edited database).
    #[error("corrupt row: {0}")]
    Corrupt(String),
}

type Result<T, E = StoreError> = std::result::Result<T, E>;

/// First IPv4 overlay address (index 0 is never used).
const V4_BASE: u32 = u32::from_be_bytes([100, 64, 0, 0]);
/// Highest address index: stops below 100.127.255.0, which policy tests use
/// for stand-in nodes.
const MAX_ADDR_INDEX: i64 = 0x003f_feff;
/// The ULA /48 of the overlay.
const V6_BASE: u128 = 0xfd7a_6d65_7368_0000_0000_0000_0000_0000;

/// The overlay ranges every node address is allocated from: the shared
/// address space 100.64.0.0/10 and the overlay's ULA /48. Site routes may
/// not overlap them (see [`crate::route_check`]).
#[must_use]
pub fn overlay_ranges() -> [IpNet; 2] {
    [
        IpNet::new(Ipv4Addr::from(V4_BASE).into(), 10).expect("a /10 is a valid prefix"),
        IpNet::new(Ipv6Addr::from(V6_BASE).into(), 48).expect("a /48 is a valid prefix"),
    ]
}

/// The overlay addresses of address index `i`.
#[must_use]
pub fn overlay_addrs(i: u32) -> (Ipv4Addr, Ipv6Addr) {
    (Ipv4Addr::from(V4_BASE + i), Ipv6Addr::from(V6_BASE + u128::from(i)))
}

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

/// The database.
#[derive(Clone, Debug)]
pub struct Store {
    pool: AnyPool,
    backend: &'static str,
}

fn b(v: bool) -> i64 {
    i64::from(v)
}

fn json<T: Serialize>(v: &T) -> String {
    serde_json::to_string(v).unwrap_or_default()
}

fn list(s: &str) -> Vec<String> {
    serde_json::from_str(s).unwrap_or_default()
}

fn u(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

fn i(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

const NODE_COLS: &str = "id, name, hostname, public_key, addr_index, tags, owner, state, ephemeral, created, \
                         last_seen, online, key_expiry, rotation_requested, endpoints, credential_hash";

fn node_row(r: &AnyRow) -> Result<NodeRecord> {
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
    })
}

fn route_row(r: &AnyRow) -> Result<RouteRecord> {
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

fn key_row(r: &AnyRow) -> Result<KeyRecord> {
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

fn audit_row(r: &AnyRow) -> Result<AuditRecord> {
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

/// Writes an audit entry and bumps the change counter, inside `tx`.
async fn audit(
    tx: &mut Transaction<'_, Any>,
    now: i64,
    actor: &str,
    action: &str,
    subject: &str,
    before: String,
    after: String,
) -> Result<()> {
    sqlx::query(
        "INSERT INTO audit (at, actor, action, subject, before_json, after_json) VALUES ($1, $2, $3, $4, $5, $6)",
    )
    .bind(now)
    .bind(actor)
    .bind(action)
    .bind(subject)
    .bind(before)
    .bind(after)
    .execute(&mut **tx)
    .await?;
    sqlx::query("UPDATE state SET version = version + 1 WHERE id = 1").execute(&mut **tx).await?;
    Ok(())
}

async fn node_in(tx: &mut Transaction<'_, Any>, id: u64) -> Result<NodeRecord> {
    let row = sqlx::query(&format!("SELECT {NODE_COLS} FROM nodes WHERE id = $1"))
        .bind(i(id))
        .fetch_optional(&mut **tx)
        .await?
        .ok_or_else(|| StoreError::NotFound(format!("node {id}")))?;
    node_row(&row)
}

async fn route_in(tx: &mut Transaction<'_, Any>, node: u64, prefix: &IpNet) -> Result<RouteRecord> {
    let row = sqlx::query("SELECT * FROM routes WHERE node_id = $1 AND prefix = $2")
        .bind(i(node))
        .bind(prefix.to_string())
        .fetch_optional(&mut **tx)
        .await?
        .ok_or_else(|| StoreError::NotFound(format!("route {prefix} of node {node}")))?;
    route_row(&row)
}

impl Store {
    /// Opens (creating if needed) the database at `url` (`sqlite://PATH`,
    /// `postgres://...`) and brings its schema up to date.
    pub async fn open(url: &str) -> Result<Self> {
        sqlx::any::install_default_drivers();
        let sqlite = url.starts_with("sqlite:");
        let url = if sqlite && !url.contains('?') { format!("{url}?mode=rwc") } else { url.to_owned() };
        let pool = AnyPoolOptions::new()
            .max_connections(if sqlite { 4 } else { 8 })
            .after_connect(move |conn, _| {
                Box::pin(async move {
                    if sqlite {
                        // Writers wait for each other instead of failing.
                        sqlx::query("PRAGMA busy_timeout = 10000").execute(&mut *conn).await?;
                        sqlx::query("PRAGMA synchronous = NORMAL").execute(&mut *conn).await?;
                        sqlx::query("PRAGMA foreign_keys = ON").execute(&mut *conn).await?;
                    }
                    Ok(())
                })
            })
            .connect(&url)
            .await?;
        if sqlite {
            sqlx::query("PRAGMA journal_mode = WAL").execute(&pool).await?;
        }
        let store = Self { pool, backend: if sqlite { "sqlite" } else { "postgres" } };
        schema::migrate(&store.pool, sqlite).await?;
        Ok(store)
    }

    /// A transaction that will write. On SQLite it takes the write lock up
    /// front (`BEGIN IMMEDIATE`): a deferred transaction that reads and then
    /// writes fails with SQLITE_BUSY when another writer committed in
    /// between, and the busy timeout cannot help it.
    async fn write_tx(&self) -> Result<Transaction<'static, Any>> {
        Ok(if self.backend == "sqlite" {
            self.pool.begin_with("BEGIN IMMEDIATE").await?
        } else {
            self.pool.begin().await?
        })
    }

    /// `sqlite` or `postgres`.
    #[must_use]
    pub const fn backend(&self) -> &'static str {
        self.backend
    }

    /// The change counter.
    pub async fn version(&self) -> Result<i64> {
        Ok(sqlx::query("SELECT version FROM state WHERE id = 1").fetch_one(&self.pool).await?.try_get(0)?)
    }

    /// Reads everything views are computed from, consistently.
    pub async fn snapshot(&self) -> Result<Snapshot> {
        let mut tx = self.pool.begin().await?;
        let version = sqlx::query("SELECT version FROM state WHERE id = 1").fetch_one(&mut *tx).await?.try_get(0)?;
        let nodes = sqlx::query(&format!("SELECT {NODE_COLS} FROM nodes ORDER BY id"))
            .fetch_all(&mut *tx)
            .await?
            .iter()
            .map(node_row)
            .collect::<Result<_>>()?;
        let routes = sqlx::query("SELECT * FROM routes ORDER BY node_id, prefix")
            .fetch_all(&mut *tx)
            .await?
            .iter()
            .map(route_row)
            .collect::<Result<_>>()?;
        let policy = sqlx::query("SELECT generation, text FROM policies ORDER BY generation DESC LIMIT 1")
            .fetch_optional(&mut *tx)
            .await?
            .map(|r| -> Result<PolicyRecord> { Ok(PolicyRecord { generation: u(r.try_get(0)?), text: r.try_get(1)? }) })
            .transpose()?;
        tx.commit().await?;
        Ok(Snapshot { version, nodes, routes, policy })
    }

    /// A value of the `meta` table, set to `init()` if absent (first caller
    /// wins, so replicas starting together agree on one CA).
    pub async fn meta_get_or_init(&self, key: &str, init: impl FnOnce() -> String) -> Result<String> {
        if let Some(row) =
            sqlx::query("SELECT value FROM meta WHERE key = $1").bind(key).fetch_optional(&self.pool).await?
        {
            return Ok(row.try_get(0)?);
        }
        sqlx::query("INSERT INTO meta (key, value) VALUES ($1, $2) ON CONFLICT (key) DO NOTHING")
            .bind(key)
            .bind(init())
            .execute(&self.pool)
            .await?;
        Ok(sqlx::query("SELECT value FROM meta WHERE key = $1").bind(key).fetch_one(&self.pool).await?.try_get(0)?)
    }

    // ---- enrollment keys -------------------------------------------------

    /// Stores a new enrollment key.
    pub async fn create_key(&self, key: &KeyRecord, actor: &str, now: i64) -> Result<()> {
        let mut tx = self.write_tx().await?;
        sqlx::query(
            "INSERT INTO enrollment_keys (id, secret_hash, reusable, ephemeral, preapproved, tags, owner, description, \
             created, expires, revoked, uses) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, 0, 0)",
        )
        .bind(&key.id)
        .bind(&key.secret_hash)
        .bind(b(key.reusable))
        .bind(b(key.ephemeral))
        .bind(b(key.preapproved))
        .bind(json(&key.tags))
        .bind(&key.owner)
        .bind(&key.description)
        .bind(key.created)
        .bind(key.expires)
        .execute(&mut *tx)
        .await?;
        audit(&mut tx, now, actor, "key.create", &format!("key/{}", key.id), String::new(), json(key)).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Every enrollment key.
    pub async fn list_keys(&self) -> Result<Vec<KeyRecord>> {
        sqlx::query("SELECT * FROM enrollment_keys ORDER BY created, id")
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(key_row)
            .collect()
    }

    /// Revokes a key.
    pub async fn revoke_key(&self, id: &str, actor: &str, now: i64) -> Result<KeyRecord> {
        let mut tx = self.write_tx().await?;
        let before = sqlx::query("SELECT * FROM enrollment_keys WHERE id = $1")
            .bind(id)
            .fetch_optional(&mut *tx)
            .await?
            .ok_or_else(|| StoreError::NotFound(format!("key {id}")))?;
        let before = key_row(&before)?;
        sqlx::query("UPDATE enrollment_keys SET revoked = 1 WHERE id = $1").bind(id).execute(&mut *tx).await?;
        let after = KeyRecord { revoked: true, ..before.clone() };
        audit(&mut tx, now, actor, "key.revoke", &format!("key/{id}"), json(&before), json(&after)).await?;
        tx.commit().await?;
        Ok(after)
    }

    // ---- nodes -----------------------------------------------------------

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

    async fn enroll_once(
        &self,
        key_id: &str,
        secret_hash: &str,
        node: &NewNode,
        auto_approve: &impl Fn(&KeyRecord, &IpNet) -> bool,
        now: i64,
    ) -> Result<NodeRecord> {
        let mut tx = self.write_tx().await?;
        let key = sqlx::query("SELECT * FROM enrollment_keys WHERE id = $1")
            .bind(key_id)
            .fetch_optional(&mut *tx)
            .await?
            .map(|r| key_row(&r))
            .transpose()?;
        // One answer for every refusal: nothing about which keys exist.
        let refuse = || StoreError::Conflict("enrollment key is invalid, used, revoked or expired".into());
        let key = key.ok_or_else(refuse)?;
        if !crate::auth::hash_eq(&key.secret_hash, secret_hash) || key.revoked || key.expires <= now {
            return Err(refuse());
        }
        // Consume a one-off key atomically: only one enrollment sees uses = 0.
        let consumed =
            sqlx::query("UPDATE enrollment_keys SET uses = uses + 1 WHERE id = $1 AND (reusable = 1 OR uses = 0)")
                .bind(key_id)
                .execute(&mut *tx)
                .await?;
        if consumed.rows_affected() != 1 {
            return Err(refuse());
        }
        let idx: i64 =
            sqlx::query("SELECT COALESCE(MAX(addr_index), 0) + 1 FROM nodes").fetch_one(&mut *tx).await?.try_get(0)?;
        if idx > MAX_ADDR_INDEX {
            return Err(StoreError::Conflict("overlay address space exhausted".into()));
        }
        let name = unique_name(&mut tx, &node.hostname).await?;
        let state = if key.preapproved { NodeState::Approved } else { NodeState::Pending };
        let id: i64 = sqlx::query(
            "INSERT INTO nodes (name, hostname, public_key, addr_index, tags, owner, state, ephemeral, created, \
             last_seen, online, key_expiry, rotation_requested, endpoints, credential_hash) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $9, 0, $10, 0, $11, $12) RETURNING id",
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
        .bind(now + node.key_lifetime)
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
        sqlx::query(&format!("SELECT {NODE_COLS} FROM nodes WHERE credential_hash = $1"))
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
        let before = node_in(&mut tx, id).await?;
        let mut after = before.clone();
        change(&mut after);
        if after == before {
            tx.commit().await?;
            return Ok(after);
        }
        sqlx::query(
            "UPDATE nodes SET public_key = $2, tags = $3, state = $4, last_seen = $5, online = $6, key_expiry = $7, \
             rotation_requested = $8, endpoints = $9, credential_hash = $10 WHERE id = $1",
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
        .execute(&mut *tx)
        .await?;
        audit(&mut tx, now, actor, action, &format!("node/{id}"), json(&before), json(&after)).await?;
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

    /// A new credential (and maybe WireGuard key) for a node.
    pub async fn renew(
        &self,
        id: u64,
        credential_hash: String,
        new_public_key: Option<String>,
        expiry: i64,
        now: i64,
    ) -> Result<NodeRecord> {
        self.update_node(id, &format!("node/{id}"), "node.renew", now, |n| {
            n.credential_hash = credential_hash;
            n.key_expiry = expiry;
            if let Some(k) = new_public_key {
                n.public_key = k;
                n.rotation_requested = false;
            }
        })
        .await
    }

    /// Records an agent stream opening or closing, and its endpoints.
    pub async fn set_presence(
        &self,
        id: u64,
        online: bool,
        endpoints: Option<Vec<String>>,
        now: i64,
    ) -> Result<NodeRecord> {
        let action = if online { "node.online" } else { "node.offline" };
        self.update_node(id, &format!("node/{id}"), action, now, |n| {
            n.online = online;
            n.last_seen = now;
            if let Some(e) = endpoints {
                n.endpoints = e;
            }
        })
        .await
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

    // ---- routes ----------------------------------------------------------

    /// Replaces the set of prefixes node `id` advertises; new ones are
    /// approved when `auto` says so, kept ones keep their state.
    pub async fn set_advertised(&self, id: u64, prefixes: &[(IpNet, bool)], now: i64) -> Result<()> {
        let mut tx = self.write_tx().await?;
        let existing: Vec<RouteRecord> = sqlx::query("SELECT * FROM routes WHERE node_id = $1")
            .bind(i(id))
            .fetch_all(&mut *tx)
            .await?
            .iter()
            .map(route_row)
            .collect::<Result<_>>()?;
        let mut changed = false;
        for r in &existing {
            if !prefixes.iter().any(|(p, _)| *p == r.prefix) {
                sqlx::query("DELETE FROM routes WHERE node_id = $1 AND prefix = $2")
                    .bind(i(id))
                    .bind(r.prefix.to_string())
                    .execute(&mut *tx)
                    .await?;
                changed = true;
            }
        }
        for (p, auto) in prefixes {
            if !existing.iter().any(|r| r.prefix == *p) {
                insert_route(&mut tx, id, p, *auto).await?;
                changed = true;
            }
        }
        if changed {
            let after: Vec<String> = prefixes.iter().map(|(p, _)| p.to_string()).collect();
            let before: Vec<String> = existing.iter().map(|r| r.prefix.to_string()).collect();
            audit(
                &mut tx,
                now,
                &format!("node/{id}"),
                "route.advertise",
                &format!("node/{id}"),
                json(&before),
                json(&after),
            )
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn update_route(
        &self,
        node: u64,
        prefix: &IpNet,
        actor: &str,
        action: &str,
        now: i64,
        change: impl FnOnce(&mut RouteRecord),
    ) -> Result<RouteRecord> {
        let mut tx = self.write_tx().await?;
        let before = route_in(&mut tx, node, prefix).await?;
        let mut after = before.clone();
        change(&mut after);
        if after != before {
            sqlx::query(
                "UPDATE routes SET approved = $3, auto_approved = $4, priority = $5, healthy = $6, \
                 virtual_addresses = $7, snat = $8, owner = $9, owner_since = $10, lan_addresses = $11 \
                 WHERE node_id = $1 AND prefix = $2",
            )
            .bind(i(node))
            .bind(prefix.to_string())
            .bind(b(after.approved))
            .bind(b(after.auto_approved))
            .bind(i64::from(after.priority))
            .bind(b(after.healthy))
            .bind(json(&after.virtual_addresses))
            .bind(b(after.snat))
            .bind(b(after.owner))
            .bind(after.owner_since)
            .bind(json(&after.lan_addresses))
            .execute(&mut *tx)
            .await?;
            audit(&mut tx, now, actor, action, &format!("route/{node}/{prefix}"), json(&before), json(&after)).await?;
        }
        tx.commit().await?;
        Ok(after)
    }

    /// Approves a route explicitly (an admin): it is no longer marked
    /// auto-approved, which is what lets it override a soft conflict (see
    /// [`crate::route_check`]).
    pub async fn approve_route(&self, node: u64, prefix: &IpNet, actor: &str, now: i64) -> Result<RouteRecord> {
        self.update_route(node, prefix, actor, "route.approve", now, |r| {
            r.approved = true;
            r.auto_approved = false;
        })
        .await
    }

    /// Approves a route because an autoApprovers entry now covers it.
    pub async fn auto_approve_route(&self, node: u64, prefix: &IpNet, actor: &str, now: i64) -> Result<RouteRecord> {
        self.update_route(node, prefix, actor, "route.auto_approve", now, |r| {
            r.approved = true;
            r.auto_approved = true;
        })
        .await
    }

    /// Sets a route's priority.
    pub async fn set_route_priority(
        &self,
        node: u64,
        prefix: &IpNet,
        priority: i32,
        actor: &str,
        now: i64,
    ) -> Result<RouteRecord> {
        self.update_route(node, prefix, actor, "route.set_priority", now, |r| r.priority = priority).await
    }

    /// Records a gateway's report on a route's health.
    pub async fn set_route_health(&self, node: u64, prefix: &IpNet, healthy: bool, now: i64) -> Result<RouteRecord> {
        self.update_route(node, prefix, &format!("node/{node}"), "route.health", now, |r| r.healthy = healthy).await
    }

    /// Records a route's options as its gateway advertises them.
    pub async fn set_route_options(
        &self,
        node: u64,
        prefix: &IpNet,
        options: RouteOptionsRecord,
        now: i64,
    ) -> Result<RouteRecord> {
        self.update_route(node, prefix, &format!("node/{node}"), "route.options", now, |r| {
            r.virtual_addresses = options.virtual_addresses;
            r.snat = options.snat;
            r.lan_addresses = options.lan_addresses;
        })
        .await
    }

    /// Records a gateway's report that it took or gave up the site side of
    /// a prefix (audited as `route.owner`).
    pub async fn set_route_owner(
        &self,
        node: u64,
        prefix: &IpNet,
        owner: bool,
        since: i64,
        now: i64,
    ) -> Result<RouteRecord> {
        self.update_route(node, prefix, &format!("node/{node}"), "route.owner", now, |r| {
            r.owner = owner;
            r.owner_since = if owner { since } else { 0 };
        })
        .await
    }

    /// Records an event that changes no record (a prefix's primary gateway
    /// moved, an agent failed a route over locally) in the audit log.
    pub async fn record_event(
        &self,
        actor: &str,
        action: &str,
        subject: &str,
        before: String,
        after: String,
        now: i64,
    ) -> Result<()> {
        let mut tx = self.write_tx().await?;
        audit(&mut tx, now, actor, action, subject, before, after).await?;
        tx.commit().await?;
        Ok(())
    }

    // ---- policy ----------------------------------------------------------

    /// Makes `text` the active policy; returns its generation.
    pub async fn set_policy(&self, text: &str, actor: &str, now: i64) -> Result<u64> {
        let mut tx = self.write_tx().await?;
        let before = sqlx::query("SELECT generation, text FROM policies ORDER BY generation DESC LIMIT 1")
            .fetch_optional(&mut *tx)
            .await?;
        let (prev_gen, before_text): (i64, String) = match before {
            Some(r) => (r.try_get(0)?, r.try_get(1)?),
            None => (0, String::new()),
        };
        let generation = prev_gen + 1;
        sqlx::query("INSERT INTO policies (generation, text, created, actor) VALUES ($1, $2, $3, $4)")
            .bind(generation)
            .bind(text)
            .bind(now)
            .bind(actor)
            .execute(&mut *tx)
            .await?;
        audit(&mut tx, now, actor, "policy.set", "policy", json(&before_text), json(&text)).await?;
        tx.commit().await?;
        Ok(u(generation))
    }

    // ---- audit -----------------------------------------------------------

    /// Audit entries matching `f`, oldest first.
    pub async fn audit(&self, f: &AuditFilter) -> Result<Vec<AuditRecord>> {
        let limit = if f.limit == 0 { 100 } else { i64::from(f.limit) };
        let rows = sqlx::query(
            "SELECT * FROM (SELECT * FROM audit WHERE id > $1 AND action LIKE $2 AND ($3 = '' OR actor = $3) \
             AND ($4 = '' OR subject = $4) ORDER BY id DESC LIMIT $5) AS t ORDER BY id",
        )
        .bind(i(f.after_id))
        .bind(format!("{}%", f.action_prefix.replace('%', "")))
        .bind(&f.actor)
        .bind(&f.subject)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(audit_row).collect()
    }

    /// Audit entries after `id`, oldest first (for following).
    pub async fn audit_after(&self, id: u64, limit: u32) -> Result<Vec<AuditRecord>> {
        let rows = sqlx::query("SELECT * FROM audit WHERE id > $1 ORDER BY id LIMIT $2")
            .bind(i(id))
            .bind(i64::from(limit))
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(audit_row).collect()
    }

    // ---- admin API tokens ------------------------------------------------

    /// Stores an admin API token's hash.
    pub async fn add_api_token(&self, id: &str, hash: &str, description: &str, actor: &str, now: i64) -> Result<()> {
        let mut tx = self.write_tx().await?;
        sqlx::query("INSERT INTO api_tokens (id, token_hash, description, created) VALUES ($1, $2, $3, $4)")
            .bind(id)
            .bind(hash)
            .bind(description)
            .bind(now)
            .execute(&mut *tx)
            .await?;
        audit(&mut tx, now, actor, "token.create", &format!("token/{id}"), String::new(), json(&description)).await?;
        tx.commit().await?;
        Ok(())
    }

    /// The id of the admin token whose hash is `hash`.
    pub async fn api_token(&self, hash: &str) -> Result<Option<String>> {
        Ok(sqlx::query("SELECT id FROM api_tokens WHERE token_hash = $1")
            .bind(hash)
            .fetch_optional(&self.pool)
            .await?
            .map(|r| r.try_get(0))
            .transpose()?)
    }

    /// How many admin tokens exist.
    pub async fn api_token_count(&self) -> Result<i64> {
        Ok(sqlx::query("SELECT COUNT(*) FROM api_tokens").fetch_one(&self.pool).await?.try_get(0)?)
    }
}

async fn insert_route(tx: &mut Transaction<'_, Any>, node: u64, prefix: &IpNet, auto: bool) -> Result<()> {
    sqlx::query(
        "INSERT INTO routes (node_id, prefix, approved, auto_approved, priority, healthy) VALUES ($1, $2, $3, $3, 0, 1)",
    )
    .bind(i(node))
    .bind(prefix.to_string())
    .bind(b(auto))
    .execute(&mut **tx)
    .await?;
    Ok(())
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

#[cfg(test)]
mod tests;
