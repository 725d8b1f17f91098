//! The operations that change control's state: each one checks the request
//! against the current state, writes through the store (which audits the
//! change in the same transaction) and refreshes the views, so that the
//! gRPC services only translate requests and answers, and no caller can
//! forget a refresh or an audit entry.

use std::time::Duration;

use ipnet::IpNet;

use super::Engine;
use crate::policy::{self, Policy, Problem, ProblemKind};
use crate::route_check::{self, RouteConflict};
use crate::store::{KeyRecord, NodeRecord, StoreError, TokenRecord};

/// Why an operation changed nothing.
#[derive(Debug, thiserror::Error)]
pub enum OpError {
    /// The store refused or failed (not found, conflict, database).
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The request names something the policy does not declare.
    #[error("{0}")]
    Invalid(String),
    /// A policy that does not parse, fails its tests or exceeds a node's
    /// limits (one line per problem).
    #[error("policy rejected:\n{}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n"))]
    Policy(Vec<policy::Problem>),
    /// Not possible in the current state (a route that conflicts).
    #[error("{0}")]
    Refused(String),
}

/// An operation's result.
pub type OpResult<T> = Result<T, OpError>;

/// How long parsing, testing and compiling one candidate policy may take.
/// The parser's size and depth limits keep a real check far below this; the
/// budget bounds what an admin request can cost whatever the policy holds.
pub const POLICY_BUDGET: Duration = Duration::from_secs(10);

/// Runs policy work `f` on the blocking pool within [`POLICY_BUDGET`], so
/// that a large candidate never stalls the runtime's workers (which serve
/// every agent's stream). Past the budget the caller gets an error at once;
/// the work itself cannot be cancelled and finishes unobserved.
pub async fn off_workers<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, Vec<Problem>> + Send + 'static,
) -> Result<T, Vec<Problem>> {
    let budget = |why: String| vec![Problem { line: 0, kind: ProblemKind::Budget(why) }];
    match tokio::time::timeout(POLICY_BUDGET, tokio::task::spawn_blocking(f)).await {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => {
            tracing::error!(error = %e, "the policy checker failed");
            Err(budget(format!("the policy checker failed: {e}")))
        }
        Err(_) => Err(budget(format!("checking the policy took longer than {} s", POLICY_BUDGET.as_secs()))),
    }
}

impl Engine {
    /// `tags` must all be declared in the policy's `tagOwners`.
    fn check_tags(&self, tags: &[String]) -> OpResult<()> {
        let (policy, _) = self.policy();
        match tags.iter().find(|t| !t.starts_with("tag:") || !policy.tag_owners.contains_key(*t)) {
            Some(bad) => Err(OpError::Invalid(format!("{bad:?} is not a tag declared in tagOwners"))),
            None => Ok(()),
        }
    }

    /// Refreshes the views after a change to node `n`, and returns its
    /// record as the refreshed state has it.
    async fn node_changed(&self, n: NodeRecord) -> OpResult<NodeRecord> {
        self.refresh().await?;
        Ok(self.snapshot().nodes.iter().find(|x| x.id == n.id).cloned().unwrap_or(n))
    }

    /// Approves a node that enrolled with a key that was not preapproved.
    pub async fn approve_node(&self, id: u64, actor: &str) -> OpResult<NodeRecord> {
        let n = self.store().approve_node(id, actor, self.now()).await?;
        self.node_changed(n).await
    }

    /// Replaces a node's tags (each declared in `tagOwners`).
    pub async fn set_node_tags(&self, id: u64, tags: Vec<String>, actor: &str) -> OpResult<NodeRecord> {
        self.check_tags(&tags)?;
        let n = self.store().set_tags(id, tags, actor, self.now()).await?;
        let (policy, _) = self.policy();
        self.revoke_lapsed_auto_approvals(&policy, std::slice::from_ref(&n), actor).await?;
        self.refresh().await?;
        self.apply_auto_approvers(&policy, "policy:autoApprovers").await?;
        self.node_changed(n).await
    }

    /// Expires a node's key now: its peers drop it at once.
    pub async fn expire_node_key(&self, id: u64, actor: &str) -> OpResult<NodeRecord> {
        let n = self.store().expire_key(id, actor, self.now()).await?;
        self.node_changed(n).await
    }

    /// Asks a node to rotate its key.
    pub async fn rotate_node_key(&self, id: u64, actor: &str) -> OpResult<NodeRecord> {
        let n = self.store().request_rotation(id, actor, self.now()).await?;
        self.node_changed(n).await
    }

    /// Extends a node's key to expire `days` days from now (1-365).
    pub async fn extend_node_key(&self, id: u64, days: u32, actor: &str) -> OpResult<NodeRecord> {
        if !(1..=365).contains(&days) {
            return Err(OpError::Invalid(format!("days must be 1-365, not {days}")));
        }
        let expiry = self.now().saturating_add(i64::from(days) * 86_400);
        let n = self.store().extend_key(id, expiry, actor, self.now()).await?;
        self.node_changed(n).await
    }

    /// Creates an admin token valid for `lifetime_secs` (0: the default,
    /// [`crate::auth::ADMIN_TOKEN_LIFETIME_SECS`]); its record and text.
    pub async fn create_admin_token(
        &self,
        description: &str,
        lifetime_secs: i64,
        actor: &str,
    ) -> OpResult<(TokenRecord, String)> {
        let lifetime = match lifetime_secs {
            0 => crate::auth::ADMIN_TOKEN_LIFETIME_SECS,
            s if (1..=crate::auth::ADMIN_TOKEN_MAX_SECS).contains(&s) => s,
            s => {
                return Err(OpError::Invalid(format!(
                    "expires_in_seconds {s} is out of range: 1 to {} (2 years), or 0 for 90 days",
                    crate::auth::ADMIN_TOKEN_MAX_SECS
                )));
            }
        };
        if description.len() > 200 {
            return Err(OpError::Invalid("the description is longer than 200 bytes".into()));
        }
        let (id, token, hash) = crate::auth::new_admin_token();
        let now = self.now();
        let t = self.store().add_api_token(&id, &hash, description, now.saturating_add(lifetime), actor, now).await?;
        self.audit_changed();
        Ok((t, token))
    }

    /// Revokes an admin token; its record as revoked.
    pub async fn revoke_admin_token(&self, id: &str, actor: &str) -> OpResult<TokenRecord> {
        let t = self.store().revoke_api_token(id, actor, self.now()).await?;
        self.audit_changed();
        Ok(t)
    }

    /// Removes a node, its routes and its credentials.
    pub async fn remove_node(&self, id: u64, actor: &str) -> OpResult<()> {
        self.store().remove_node(id, actor, self.now()).await?;
        self.refresh().await?;
        Ok(())
    }

    /// Stores a new enrollment key (its tags declared in `tagOwners`).
    pub async fn create_enrollment_key(&self, key: &KeyRecord, actor: &str) -> OpResult<()> {
        self.check_tags(&key.tags)?;
        self.store().create_key(key, actor, self.now()).await?;
        self.audit_changed();
        Ok(())
    }

    /// Revokes an enrollment key; its record as revoked.
    pub async fn revoke_enrollment_key(&self, id: &str, actor: &str) -> OpResult<KeyRecord> {
        let k = self.store().revoke_key(id, actor, self.now()).await?;
        self.audit_changed();
        Ok(k)
    }

    /// An admin's approval of a route: the explicit one that overrides a
    /// soft conflict; a hard one (default route, overlay range) stays
    /// refused, and the refusal is audited.
    pub async fn approve_route(&self, node: u64, prefix: IpNet, actor: &str) -> OpResult<()> {
        if let Some(c) = route_check::conflict(&self.snapshot(), node, prefix) {
            if !c.overridable() {
                self.record_refusal(actor, node, &prefix, &c).await?;
                return Err(OpError::Refused(format!("route refused: {c}")));
            }
            tracing::warn!(node, %prefix, %actor, conflict = %c, "admin approves a route over a conflict");
        }
        self.store().approve_route(node, &prefix, actor, self.now()).await?;
        self.refresh().await?;
        Ok(())
    }

    /// Sets a route's priority (lower first in its prefix's order).
    pub async fn set_route_priority(&self, node: u64, prefix: IpNet, priority: i32, actor: &str) -> OpResult<()> {
        self.store().set_route_priority(node, &prefix, priority, actor, self.now()).await?;
        self.refresh().await?;
        Ok(())
    }

    /// Parses and tests a candidate policy against the current nodes, and
    /// checks that every node's compiled rules fit the limits its agent
    /// reported; the policy and the number of tests passed.
    pub async fn check_policy(&self, text: &str) -> Result<(Policy, u32), Vec<Problem>> {
        let inv = super::view::inventory(&self.snapshot(), self.now());
        let (_, generation) = self.policy();
        let limits = self.limits();
        let text = text.to_owned();
        off_workers(move || {
            let (policy, passed) = policy::check(&text, &inv)?;
            let problems = policy::check_limits(&policy, &inv, generation + 1, &limits);
            if problems.is_empty() { Ok((policy, passed)) } else { Err(problems) }
        })
        .await
    }

    /// Makes `text` the policy if it passes [`Self::check_policy`] (a bad
    /// candidate changes nothing), approves the routes its
    /// `autoApprovers` now cover, and pushes the result; the new policy
    /// generation.
    pub async fn set_policy(&self, text: &str, actor: &str) -> OpResult<u64> {
        let (policy, passed) = self.check_policy(text).await.map_err(OpError::Policy)?;
        let generation = self.store().set_policy(text, actor, self.now()).await?;
        tracing::info!(generation, tests_passed = passed, %actor, "policy set");
        self.revoke_lapsed_auto_approvals(&policy, &self.snapshot().nodes, "policy:autoApprovers").await?;
        self.apply_auto_approvers(&policy, "policy:autoApprovers").await?;
        self.refresh().await?;
        Ok(generation)
    }

    /// Withdraws the approval of `nodes`' routes that autoApprovers
    /// approved and `policy` no longer approves for them (an entry or a
    /// tag was removed). Routes an admin approved are left alone.
    async fn revoke_lapsed_auto_approvals(&self, policy: &Policy, nodes: &[NodeRecord], actor: &str) -> OpResult<()> {
        let snap = self.snapshot();
        for n in nodes {
            let inv = inventory_node(n);
            for r in snap.routes.iter().filter(|r| r.node_id == n.id && r.auto_approved) {
                if !policy::auto_approved(policy, &inv, r.prefix) {
                    tracing::warn!(node = n.id, prefix = %r.prefix, %actor, "autoApprovers no longer cover a route: approval withdrawn");
                    self.store().revoke_auto_approval(n.id, &r.prefix, actor, self.now()).await?;
                }
            }
        }
        Ok(())
    }

    /// Approves the waiting routes that `policy`'s autoApprovers cover
    /// (a conflicting one is refused and the refusal audited).
    async fn apply_auto_approvers(&self, policy: &Policy, actor: &str) -> OpResult<()> {
        let snap = self.snapshot();
        for r in snap.routes.iter().filter(|r| !r.approved) {
            let Some(n) = snap.nodes.iter().find(|n| n.id == r.node_id) else { continue };
            let inv = inventory_node(n);
            if policy::auto_approved(policy, &inv, r.prefix) {
                match route_check::conflict(&snap, r.node_id, r.prefix) {
                    None => {
                        self.store().auto_approve_route(r.node_id, &r.prefix, actor, self.now()).await?;
                    }
                    Some(c) => self.record_refusal(actor, r.node_id, &r.prefix, &c).await?,
                }
            }
        }
        Ok(())
    }

    /// Records in the audit log that `node`'s `prefix` was refused (action
    /// `route.refused`, the reason in `after`), and logs it.
    pub async fn record_refusal(
        &self,
        actor: &str,
        node: u64,
        prefix: &IpNet,
        conflict: &RouteConflict,
    ) -> Result<(), StoreError> {
        tracing::warn!(node, %prefix, %actor, reason = %conflict, "route refused");
        let after =
            serde_json::json!({ "node_id": node, "prefix": prefix.to_string(), "reason": conflict.to_string() });
        self.store()
            .record_event(
                actor,
                "route.refused",
                &format!("route/{node}/{prefix}"),
                String::new(),
                after.to_string(),
                self.now(),
            )
            .await?;
        self.audit_changed();
        Ok(())
    }
}

/// What autoApprovers look at of a node: its tags and owner.
fn inventory_node(n: &NodeRecord) -> policy::InventoryNode {
    policy::InventoryNode {
        id: n.id,
        name: n.name.clone(),
        addrs: Vec::new(),
        tags: n.tags.clone(),
        user: n.owner.clone(),
        routes: Vec::new(),
    }
}
