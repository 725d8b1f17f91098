//! Persistent state: SQLite by default (one file, WAL), PostgreSQL for
//! several control replicas sharing one database. Both run the same SQL
//! through sqlx's `Any` driver; only the schema's id column differs.
//!
//! Every change runs in one transaction that also writes its audit entry
//! and bumps the `state.version` counter; replicas poll that counter and
//! reload, which is how a change made on one replica reaches the agents
//! connected to another.
//!
//! One module per concern, each adding its methods to [`Store`]: [`keys`]
//! (enrollment keys), [`nodes`] (enrollment and node records), [`routes`]
//! (advertised site routes), [`policy`] (policy generations), [`audit`]
//! (the audit log and the writer every change goes through), [`tokens`]
//! (admin API tokens); `rows` maps rows to records.

mod audit;
mod keys;
mod leases;
mod nodes;
mod policy;
mod records;
mod routes;
mod rows;
mod schema;
mod tokens;

use std::net::{Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;
use sqlx::any::AnyPoolOptions;
use sqlx::{Any, AnyPool, Row, Transaction};

pub use nodes::NewNode;
pub use records::{
    AuditFilter, AuditRecord, CredentialMatch, KeyRecord, NodeRecord, NodeState, PolicyRecord, RouteOptionsRecord,
    RouteRecord, Snapshot,
};
use rows::{NODE_COLS, node_row, route_row, u};
pub use tokens::TokenRecord;

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

impl StoreError {
    /// The database could not be reached (down, unreachable, every
    /// connection busy past the acquire timeout): nothing was changed, and
    /// the same request may work later.
    #[must_use]
    pub const fn is_unreachable(&self) -> bool {
        matches!(
            self,
            Self::Db(
                sqlx::Error::Io(_)
                    | sqlx::Error::Tls(_)
                    | sqlx::Error::PoolTimedOut
                    | sqlx::Error::PoolClosed
                    | sqlx::Error::WorkerCrashed
            )
        )
    }
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

/// The database.
#[derive(Clone, Debug)]
pub struct Store {
    pool: AnyPool,
    backend: &'static str,
    /// Write transactions opened: on SQLite each one holds the whole
    /// database, so what may open one is a security question (see
    /// [`Store::enrollment_key_admits`]).
    writes: std::sync::Arc<std::sync::atomic::AtomicU64>,
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
            // With the database down, a request fails in seconds with a
            // clear error rather than after sqlx's default 30 s.
            .acquire_timeout(std::time::Duration::from_secs(5))
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
        let store = Self { pool, backend: if sqlite { "sqlite" } else { "postgres" }, writes: Default::default() };
        schema::migrate(&store.pool, sqlite).await?;
        Ok(store)
    }

    /// A transaction that will write. On SQLite it takes the write lock up
    /// front (`BEGIN IMMEDIATE`): a deferred transaction that reads and then
    /// writes fails with SQLITE_BUSY when another writer committed in
    /// between, and the busy timeout cannot help it.
    async fn write_tx(&self) -> Result<Transaction<'static, Any>> {
        self.writes.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(if self.backend == "sqlite" {
            self.pool.begin_with("BEGIN IMMEDIATE").await?
        } else {
            self.pool.begin().await?
        })
    }

    /// How many write transactions this store has opened.
    #[must_use]
    pub fn write_transactions(&self) -> u64 {
        self.writes.load(std::sync::atomic::Ordering::Relaxed)
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
        let primaries = sqlx::query("SELECT prefix, node_id FROM route_primaries")
            .fetch_all(&mut *tx)
            .await?
            .iter()
            .map(|r| -> Result<(IpNet, u64)> {
                let prefix: String = r.try_get(0)?;
                let prefix = prefix.parse().map_err(|_| StoreError::Corrupt(format!("primary's prefix {prefix}")))?;
                Ok((prefix, u(r.try_get(1)?)))
            })
            .collect::<Result<_>>()?;
        tx.commit().await?;
        Ok(Snapshot { version, nodes, routes, policy, primaries })
    }

    /// A value of the `meta` table, set to `init()` if absent (first caller
    /// wins, so replicas starting together agree on one CA's pin).
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

    /// A value of the `meta` table, if set.
    pub async fn meta_get(&self, key: &str) -> Result<Option<String>> {
        let row = sqlx::query("SELECT value FROM meta WHERE key = $1").bind(key).fetch_optional(&self.pool).await?;
        Ok(row.map(|r| r.try_get(0)).transpose()?)
    }

    /// Removes a value of the `meta` table (absent is fine). On SQLite the
    /// file is then vacuumed and the WAL checkpointed and truncated, so that
    /// the deleted value (a secret, when the CA key moves out) lingers
    /// neither in a free page nor in an old WAL frame.
    pub async fn meta_delete(&self, key: &str) -> Result<()> {
        sqlx::query("DELETE FROM meta WHERE key = $1").bind(key).execute(&self.pool).await?;
        if self.backend == "sqlite" {
            sqlx::query("VACUUM").execute(&self.pool).await?;
            sqlx::query("PRAGMA wal_checkpoint(TRUNCATE)").execute(&self.pool).await?;
        }
        Ok(())
    }
}

#[cfg(test)]
pub(crate) mod tests;
