//! Policy generations.

use sqlx::Row;

use super::audit::audit;
use super::rows::{json, u};
use super::{Result, Store};

impl Store {
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
}
