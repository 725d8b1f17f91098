//! Advertised site routes: approval, priority, and what their gateways
//! report (health, options, site ownership).

use ipnet::IpNet;
use sqlx::{Any, Transaction};

use super::audit::audit;
use super::records::{RouteOptionsRecord, RouteRecord};
use super::rows::{b, i, json, route_row};
use super::{Result, Store, StoreError};

impl Store {
    /// Stores `prefix`'s primary gateway as the holder of lease `lease`
    /// decided it (`to`; none: no gateway serves it any more) and audits
    /// the change from `from`, in one transaction: a primary changes, and is
    /// audited, once per mesh. Refused (a conflict, nothing written) unless
    /// `holder` still holds the lease: a holder that stalled past its
    /// lease's expiry must not overwrite its successor's decisions. The
    /// check locks the lease's row until the commit, so a takeover waits.
    pub async fn set_primary(
        &self,
        (lease, holder): (&str, &str),
        prefix: &IpNet,
        from: Option<u64>,
        to: Option<u64>,
        now: i64,
    ) -> Result<()> {
        let mut tx = self.write_tx().await?;
        let held = sqlx::query("UPDATE leases SET expires = expires WHERE name = $1 AND holder = $2 AND expires >= $3")
            .bind(lease)
            .bind(holder)
            .bind(now)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        if held != 1 {
            return Err(StoreError::Conflict(format!("lease {lease} is not held by {holder}")));
        }
        match to {
            Some(node) => {
                sqlx::query(
                    "INSERT INTO route_primaries (prefix, node_id) VALUES ($1, $2) \
                     ON CONFLICT (prefix) DO UPDATE SET node_id = excluded.node_id",
                )
                .bind(prefix.to_string())
                .bind(i(node))
                .execute(&mut *tx)
                .await?;
            }
            None => {
                sqlx::query("DELETE FROM route_primaries WHERE prefix = $1")
                    .bind(prefix.to_string())
                    .execute(&mut *tx)
                    .await?;
            }
        }
        let json = |g: Option<u64>| g.map_or_else(|| "{}".to_owned(), |g| format!("{{\"primary\":{g}}}"));
        audit(&mut tx, now, "control", "route.primary", &format!("route/{prefix}"), json(from), json(to)).await?;
        tx.commit().await?;
        Ok(())
    }

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

    /// Withdraws the approval of a route that was approved by an
    /// autoApprovers entry that no longer covers it (the entry, or the
    /// node's tag, was removed). The route waits for an admin again.
    pub async fn revoke_auto_approval(&self, node: u64, prefix: &IpNet, actor: &str, now: i64) -> Result<RouteRecord> {
        self.update_route(node, prefix, actor, "route.auto_approval_revoked", now, |r| {
            r.approved = false;
            r.auto_approved = false;
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

pub(super) async fn insert_route(tx: &mut Transaction<'_, Any>, node: u64, prefix: &IpNet, auto: bool) -> Result<()> {
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
