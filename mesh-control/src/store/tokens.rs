//! Admin API tokens (only their hashes are stored). Each has an expiry
//! (0: created before expiries existed, never) and can be revoked; every
//! change is audited.

use sqlx::Row;

use super::audit::audit;
use super::rows::json;
use super::{Result, Store, StoreError};

/// An admin token as listed (never its secret or hash).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct TokenRecord {
    /// The token's id (the part after `mat1.`).
    pub id: String,
    /// What it is for.
    pub description: String,
    /// Unix seconds.
    pub created: i64,
    /// Unix seconds; 0: never.
    pub expires: i64,
    /// Revoked tokens stay listed.
    pub revoked: bool,
}

impl TokenRecord {
    /// Whether the token may be used at `now`.
    #[must_use]
    pub const fn valid(&self, now: i64) -> bool {
        !self.revoked && (self.expires == 0 || self.expires > now)
    }
}

fn token_row(r: &sqlx::any::AnyRow) -> Result<TokenRecord> {
    Ok(TokenRecord {
        id: r.try_get("id")?,
        description: r.try_get("description")?,
        created: r.try_get("created")?,
        expires: r.try_get("expires")?,
        revoked: r.try_get::<i64, _>("revoked")? != 0,
    })
}

impl Store {
    /// Stores an admin API token's hash, valid until `expires` (unix
    /// seconds; 0: never).
    pub async fn add_api_token(
        &self,
        id: &str,
        hash: &str,
        description: &str,
        expires: i64,
        actor: &str,
        now: i64,
    ) -> Result<TokenRecord> {
        let mut tx = self.write_tx().await?;
        sqlx::query(
            "INSERT INTO api_tokens (id, token_hash, description, created, expires, revoked) \
             VALUES ($1, $2, $3, $4, $5, 0)",
        )
        .bind(id)
        .bind(hash)
        .bind(description)
        .bind(now)
        .bind(expires)
        .execute(&mut *tx)
        .await?;
        let t = TokenRecord {
            id: id.to_owned(),
            description: description.to_owned(),
            created: now,
            expires,
            revoked: false,
        };
        audit(&mut tx, now, actor, "token.create", &format!("token/{id}"), String::new(), json(&t)).await?;
        tx.commit().await?;
        Ok(t)
    }

    /// The admin token whose hash is `hash`, if it is valid at `now`.
    pub async fn api_token(&self, hash: &str, now: i64) -> Result<Option<TokenRecord>> {
        let row =
            sqlx::query("SELECT * FROM api_tokens WHERE token_hash = $1").bind(hash).fetch_optional(&self.pool).await?;
        Ok(row.map(|r| token_row(&r)).transpose()?.filter(|t| t.valid(now)))
    }

    /// Every admin token, oldest first.
    pub async fn list_api_tokens(&self) -> Result<Vec<TokenRecord>> {
        sqlx::query("SELECT * FROM api_tokens ORDER BY created, id")
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(token_row)
            .collect()
    }

    /// Revokes admin token `id`.
    pub async fn revoke_api_token(&self, id: &str, actor: &str, now: i64) -> Result<TokenRecord> {
        let mut tx = self.write_tx().await?;
        let before = sqlx::query("SELECT * FROM api_tokens WHERE id = $1")
            .bind(id)
            .fetch_optional(&mut *tx)
            .await?
            .map(|r| token_row(&r))
            .transpose()?
            .ok_or_else(|| StoreError::NotFound(format!("admin token {id}")))?;
        let after = TokenRecord { revoked: true, ..before.clone() };
        if !before.revoked {
            sqlx::query("UPDATE api_tokens SET revoked = 1 WHERE id = $1").bind(id).execute(&mut *tx).await?;
            audit(&mut tx, now, actor, "token.revoke", &format!("token/{id}"), json(&before), json(&after)).await?;
        }
        tx.commit().await?;
        Ok(after)
    }

    /// How many admin tokens exist.
    pub async fn api_token_count(&self) -> Result<i64> {
        Ok(sqlx::query("SELECT COUNT(*) FROM api_tokens").fetch_one(&self.pool).await?.try_get(0)?)
    }
}
