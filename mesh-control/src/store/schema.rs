//! Schema migrations, in order, applied once each and recorded in
//! `schema_migrations`. The SQL is shared by SQLite and PostgreSQL except
//! for `{ID}` (an auto-increment id that is never reused). Integers are
//! BIGINT and booleans 0/1 so that sqlx's `Any` driver reads both alike.

use sqlx::{AnyPool, Row as _};

const MIGRATIONS: &[(i64, &str)] = &[
    (
        1,
        "CREATE TABLE state (id BIGINT PRIMARY KEY, version BIGINT NOT NULL);
     INSERT INTO state (id, version) VALUES (1, 0);
     CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
     CREATE TABLE nodes (
        id {ID},
        name TEXT NOT NULL UNIQUE,
        hostname TEXT NOT NULL,
        public_key TEXT NOT NULL,
        addr_index BIGINT NOT NULL UNIQUE,
        tags TEXT NOT NULL,
        owner TEXT NOT NULL,
        state TEXT NOT NULL,
        ephemeral BIGINT NOT NULL,
        created BIGINT NOT NULL,
        last_seen BIGINT NOT NULL,
        online BIGINT NOT NULL,
        key_expiry BIGINT NOT NULL,
        rotation_requested BIGINT NOT NULL,
        endpoints TEXT NOT NULL,
        credential_hash TEXT NOT NULL
     );
     CREATE INDEX nodes_credential ON nodes (credential_hash);
     CREATE TABLE routes (
        node_id BIGINT NOT NULL REFERENCES nodes (id) ON DELETE CASCADE,
        prefix TEXT NOT NULL,
        approved BIGINT NOT NULL,
        auto_approved BIGINT NOT NULL,
        priority BIGINT NOT NULL,
        healthy BIGINT NOT NULL,
        PRIMARY KEY (node_id, prefix)
     );
     CREATE TABLE enrollment_keys (
        id TEXT PRIMARY KEY,
        secret_hash TEXT NOT NULL,
        reusable BIGINT NOT NULL,
        ephemeral BIGINT NOT NULL,
        preapproved BIGINT NOT NULL,
        tags TEXT NOT NULL,
        owner TEXT NOT NULL,
        description TEXT NOT NULL,
        created BIGINT NOT NULL,
        expires BIGINT NOT NULL,
        revoked BIGINT NOT NULL,
        uses BIGINT NOT NULL
     );
     CREATE TABLE api_tokens (
        id TEXT PRIMARY KEY,
        token_hash TEXT NOT NULL UNIQUE,
        description TEXT NOT NULL,
        created BIGINT NOT NULL
     );
     CREATE TABLE policies (
        generation BIGINT PRIMARY KEY,
        text TEXT NOT NULL,
        created BIGINT NOT NULL,
        actor TEXT NOT NULL
     );
     CREATE TABLE audit (
        id {ID},
        at BIGINT NOT NULL,
        actor TEXT NOT NULL,
        action TEXT NOT NULL,
        subject TEXT NOT NULL,
        before_json TEXT NOT NULL,
        after_json TEXT NOT NULL
     );
     CREATE INDEX audit_subject ON audit (subject);",
    ),
    (
        // HA gateways (capability 3): a route's options as its gateway
        // advertises them, and which gateway owns the site side.
        2,
        "ALTER TABLE routes ADD COLUMN virtual_addresses TEXT NOT NULL DEFAULT '';
     ALTER TABLE routes ADD COLUMN snat BIGINT NOT NULL DEFAULT 0;
     ALTER TABLE routes ADD COLUMN owner BIGINT NOT NULL DEFAULT 0;
     ALTER TABLE routes ADD COLUMN owner_since BIGINT NOT NULL DEFAULT 0;",
    ),
    (
        // A site's gateways probe each other on the site LAN: each route
        // carries its gateway's LAN addresses as advertised.
        3,
        "ALTER TABLE routes ADD COLUMN lan_addresses TEXT NOT NULL DEFAULT '';",
    ),
    (
        // Credentials: a renewed node's previous credential stays valid
        // until the new one is first used (a lost renewal answer must not
        // lock the agent out); admin tokens expire (0: created before
        // expiries existed, never) and can be revoked.
        4,
        "ALTER TABLE nodes ADD COLUMN prev_credential_hash TEXT NOT NULL DEFAULT '';
     CREATE INDEX nodes_prev_credential ON nodes (prev_credential_hash);
     ALTER TABLE api_tokens ADD COLUMN expires BIGINT NOT NULL DEFAULT 0;
     ALTER TABLE api_tokens ADD COLUMN revoked BIGINT NOT NULL DEFAULT 0;",
    ),
    (
        // WireGuard key rotation: when the node's current key was set (its
        // age, for `meshctl nodes` and automatic rotation). Existing nodes
        // have had theirs since enrollment.
        5,
        "ALTER TABLE nodes ADD COLUMN key_created BIGINT NOT NULL DEFAULT 0;
     UPDATE nodes SET key_created = created;",
    ),
    (
        // Replicas: which one does the work that must happen once per mesh
        // (derived audit entries, housekeeping); see `Store::try_lease`.
        6,
        "CREATE TABLE leases (name TEXT PRIMARY KEY, holder TEXT NOT NULL, expires BIGINT NOT NULL);",
    ),
    (
        // Which replica holds each node's agent stream ('' when none).
        7,
        "ALTER TABLE nodes ADD COLUMN replica TEXT NOT NULL DEFAULT '';",
    ),
    (
        // Route primaries as the housekeeping lease's holder decided them:
        // the other replicas follow these, so a primary changes once per
        // mesh, not once per replica (see `RouteSelector::follow`).
        8,
        "CREATE TABLE route_primaries (prefix TEXT PRIMARY KEY, node_id BIGINT NOT NULL);",
    ),
];

/// Applies the migrations `pool` has not seen yet.
pub(super) async fn migrate(pool: &AnyPool, sqlite: bool) -> Result<(), sqlx::Error> {
    let id = if sqlite { "INTEGER PRIMARY KEY AUTOINCREMENT" } else { "BIGSERIAL PRIMARY KEY" };
    sqlx::query("CREATE TABLE IF NOT EXISTS schema_migrations (version BIGINT PRIMARY KEY)").execute(pool).await?;
    for (version, sql) in MIGRATIONS {
        let mut tx = pool.begin().await?;
        if !sqlite {
            // Replicas starting together must not both migrate.
            sqlx::query("LOCK TABLE schema_migrations IN EXCLUSIVE MODE").execute(&mut *tx).await?;
        }
        let done = sqlx::query("SELECT COUNT(*) FROM schema_migrations WHERE version = $1")
            .bind(version)
            .fetch_one(&mut *tx)
            .await?
            .try_get::<i64, _>(0)?;
        if done == 0 {
            for stmt in sql.split(';').map(str::trim).filter(|s| !s.is_empty()) {
                sqlx::query(&stmt.replace("{ID}", id)).execute(&mut *tx).await?;
            }
            sqlx::query("INSERT INTO schema_migrations (version) VALUES ($1)").bind(version).execute(&mut *tx).await?;
        }
        tx.commit().await?;
    }
    Ok(())
}
