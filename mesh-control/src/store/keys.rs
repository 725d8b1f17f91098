//! Enrollment keys.

use super::audit::audit;
use super::records::KeyRecord;
use super::rows::{b, json, key_row};
use super::{Result, Store, StoreError};

impl Store {
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
}
