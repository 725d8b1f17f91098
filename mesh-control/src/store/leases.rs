//! Leases: a named right held by one replica until it expires, so that
//! work that must happen once per mesh (the audit entries control derives
//! from what it sees, such as a route's primary changing or a key expiring;
//! removing ephemeral nodes; asking for rotations by age) is done by one
//! replica, not by each. The holder renews its lease well within its
//! lifetime; another replica takes it over once it has expired.
//!
//! Expiry is judged by each replica's clock (the engine's): replicas are
//! expected to run NTP, and an offset well under the lease's few seconds
//! only moves a takeover by that much.

use super::{Result, Store};

impl Store {
    /// Takes or renews lease `name` for `holder` until `now + ttl_secs`.
    /// True while `holder` holds it: nobody held it, its holder let it
    /// expire (before `now`), or `holder` already held it. Does not count as
    /// a change (views are not recomputed for it).
    pub async fn try_lease(&self, name: &str, holder: &str, now: i64, ttl_secs: i64) -> Result<bool> {
        let done = sqlx::query(
            "INSERT INTO leases (name, holder, expires) VALUES ($1, $2, $3) \
             ON CONFLICT (name) DO UPDATE SET holder = excluded.holder, expires = excluded.expires \
             WHERE leases.holder = excluded.holder OR leases.expires < $4",
        )
        .bind(name)
        .bind(holder)
        .bind(now + ttl_secs)
        .bind(now)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }
}
