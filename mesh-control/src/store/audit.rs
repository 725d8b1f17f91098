//! The audit log: the writer every change goes through (in the change's
//! transaction), events that change no record, and reading the log.

use sqlx::{Any, Transaction};

use super::records::{AuditFilter, AuditRecord};
use super::rows::{audit_row, i};
use super::{Result, Store};

/// Writes an audit entry and bumps the change counter, inside `tx`.
pub(super) async fn audit(
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

impl Store {
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
}
