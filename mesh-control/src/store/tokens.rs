//! Admin API tokens (only their hashes are stored).

use sqlx::Row;

use super::audit::audit;
use super::rows::json;
use super::{Result, Store};

impl Store {
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
