//! `AgentService`: enrollment, credential renewal, the Sync stream and
//! relay tickets.

use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use mesh_proto::v1 as pb;
use mesh_proto::v1::agent_service_server::AgentService;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use super::{ApiError, bearer, cidr, endpoints};
use mesh_client::enrollment::EnrollmentKeyText;

use crate::auth;
use crate::capability;
use crate::engine::{Engine, convert};
use crate::limits::Limited;
use crate::policy::{self, InventoryNode};
use crate::route_check;
use crate::store::{CredentialMatch, KeyRecord, NewNode, NodeRecord, RouteOptionsRecord};

/// The agent-facing service.
#[derive(Debug, Clone)]
pub struct AgentApi {
    engine: Arc<Engine>,
    /// The CAs agents must trust, pushed on the Sync stream (capability 4).
    ca: Option<watch::Receiver<Vec<crate::tls::TrustedCa>>>,
    /// Each node's outstanding key rotation challenge (at most one).
    challenges: Arc<std::sync::Mutex<std::collections::HashMap<u64, Challenge>>>,
    /// The relays snapshots list, and the ticket signer (capability 7).
    relays: Arc<crate::relay::Relays>,
}

/// A key rotation challenge: control's ephemeral X25519 secret and the
/// nonce, until answered or [`CHALLENGE_TTL`] has passed.
#[derive(Debug)]
struct Challenge {
    secret: [u8; 32],
    nonce: [u8; 32],
    issued: std::time::Instant,
}

/// How long a key rotation challenge may be answered.
const CHALLENGE_TTL: std::time::Duration = std::time::Duration::from_secs(60);

impl AgentApi {
    /// A service over `engine`.
    #[must_use]
    pub fn new(engine: Arc<Engine>) -> Self {
        Self { engine, ca: None, challenges: Arc::default(), relays: Arc::default() }
    }

    /// Lists `relays` in every snapshot and signs tickets for them.
    #[must_use]
    pub fn with_relays(self, relays: Arc<crate::relay::Relays>) -> Self {
        Self { relays, ..self }
    }

    /// A relay ticket for an authenticated node: refused to a pending node
    /// (it may not reach anyone yet), and when control has no relays.
    fn relay_ticket(&self, node: &NodeRecord) -> Result<pb::RelayTicketResponse, ApiError> {
        if node.state != crate::store::NodeState::Approved {
            return Err(ApiError::PermissionDenied("the node is pending approval".into()));
        }
        let key = hex::decode(&node.public_key)
            .ok()
            .and_then(|k| <[u8; 32]>::try_from(k).ok())
            .ok_or_else(|| ApiError::Internal(format!("node {} has a malformed stored key", node.id)))?;
        let (ticket, expires_unix) = self
            .relays
            .ticket(node.id, key, node.key_expiry, self.engine.now())
            .map_err(|e| ApiError::FailedPrecondition(e.to_string()))?;
        tracing::debug!(node = node.id, expires_unix, "relay ticket issued");
        Ok(pb::RelayTicketResponse { ticket, expires_unix })
    }

    /// A fresh challenge for `node`, replacing any earlier one.
    fn key_challenge(&self, node: u64) -> pb::KeyChallengeResponse {
        use rand::RngCore as _;
        let mut c = Challenge { secret: [0; 32], nonce: [0; 32], issued: std::time::Instant::now() };
        rand::rng().fill_bytes(&mut c.secret);
        rand::rng().fill_bytes(&mut c.nonce);
        let resp = pb::KeyChallengeResponse {
            control_public_key: mesh_client::key_proof::public_key(&c.secret).to_vec(),
            nonce: c.nonce.to_vec(),
        };
        let mut all = self.challenges.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        all.retain(|_, c| c.issued.elapsed() < CHALLENGE_TTL);
        all.insert(node, c);
        resp
    }

    /// Checks a rotation's proof of possession of `new_key` against
    /// `node`'s challenge, which it uses up either way.
    fn check_proof(&self, node: u64, new_key: &[u8; 32], req: &pb::RenewRequest) -> Result<(), ApiError> {
        let c = self.challenges.lock().unwrap_or_else(std::sync::PoisonError::into_inner).remove(&node);
        let refused = |why: &str| Err(ApiError::PermissionDenied(format!("key rotation refused: {why}")));
        let Some(c) = c.filter(|c| c.issued.elapsed() < CHALLENGE_TTL) else {
            return refused("no current challenge from this control (ask KeyChallenge, then Renew within 60 s)");
        };
        if req.challenge_nonce != c.nonce {
            return refused("the proof answers another challenge");
        }
        if !mesh_client::key_proof::verify(&c.secret, new_key, node, &c.nonce, &req.key_proof) {
            return refused("no proof of possession of the new key");
        }
        Ok(())
    }

    /// Tells agents the CAs to trust, now and whenever `ca` changes.
    #[must_use]
    pub fn with_ca(self, ca: watch::Receiver<Vec<crate::tls::TrustedCa>>) -> Self {
        Self { ca: Some(ca), ..self }
    }

    /// The node a request's credential belongs to, if valid and unexpired,
    /// and which of its credentials it is. The first use of a renewed
    /// credential ends the previous one's grace period.
    async fn authenticate<T>(&self, req: &Request<T>) -> Result<(NodeRecord, CredentialMatch), ApiError> {
        let token = bearer(req).ok_or(ApiError::Unauthenticated)?;
        let (node, used) = self
            .engine
            .node_by_credential(&auth::sha256_hex(token.as_bytes()))
            .await?
            .ok_or(ApiError::Unauthenticated)?;
        if node.expired(self.engine.now()) {
            return Err(ApiError::Unauthenticated);
        }
        if used == CredentialMatch::Current && !node.prev_credential_hash.is_empty() {
            tracing::info!(node = node.id, "renewed credential used: the previous one is retired");
            let node = self.engine.store().retire_previous_credential(node.id, self.engine.now()).await?;
            self.engine.refresh().await?;
            return Ok((node, used));
        }
        Ok((node, used))
    }

    /// Which of `prefixes` autoApprovers approves for a node with `tags`
    /// and `owner`.
    /// A prefix with a conflict (see [`route_check`]) is never auto-approved.
    fn auto_approver(&self) -> impl Fn(&KeyRecord, &ipnet::IpNet) -> bool + use<> {
        let (policy, _) = self.engine.policy();
        let snap = self.engine.snapshot();
        move |key: &KeyRecord, prefix: &ipnet::IpNet| {
            // A node being enrolled has no id yet: every route is another node's.
            if route_check::conflict(&snap, 0, *prefix).is_some() {
                return false;
            }
            let node = InventoryNode {
                id: 0,
                name: String::new(),
                addrs: Vec::new(),
                tags: key.tags.clone(),
                user: key.owner.clone(),
                routes: Vec::new(),
            };
            policy::auto_approved(&policy, &node, *prefix)
        }
    }

    /// Enrolls a node. Everything that needs no database is checked first,
    /// then the rate limits, then the key with a read: only a request with
    /// a valid key opens a write transaction.
    async fn enroll(
        &self,
        source: Option<std::net::IpAddr>,
        req: pb::EnrollRequest,
    ) -> Result<pb::EnrollResponse, ApiError> {
        let key = EnrollmentKeyText::parse(&req.enrollment_key)
            // Control's own keys are far shorter: a longer id would only
            // grow the per-key rate limiter's memory.
            .filter(|k| k.id.len() <= 64 && k.secret.len() <= 128)
            .ok_or(ApiError::Unauthenticated)?;
        if req.wireguard_public_key.len() != 32 {
            return Err(ApiError::InvalidArgument("wireguard_public_key must be 32 bytes".into()));
        }
        if req.hostname.is_empty() || req.hostname.len() > 63 {
            return Err(ApiError::InvalidArgument("hostname must be 1-63 characters".into()));
        }
        let routes =
            req.advertised_routes.iter().map(|r| cidr(r).map(|n| (n, false))).collect::<Result<Vec<_>, _>>()?;
        let endpoints = endpoints(&req.endpoints)?;
        let check = self.engine.limits.admit_enrollment(source, &key.id).await?;
        let secret_hash = auth::sha256_hex(key.secret.as_bytes());
        if !self.engine.store().enrollment_key_admits(&key.id, &secret_hash, self.engine.now()).await? {
            tracing::info!(key = %key.id, ?source, "enrollment refused: key invalid, used, revoked or expired");
            return Err(ApiError::Unauthenticated);
        }
        let (token, hash) = auth::new_credential();
        if !req.previous_credential.is_empty() {
            return self.reauthenticate(&key, &secret_hash, &req, token, hash).await;
        }
        let new = NewNode {
            hostname: req.hostname.clone(),
            public_key: hex::encode(&req.wireguard_public_key),
            endpoints,
            routes,
            credential_hash: hash,
            key_lifetime: self.engine.config().key_lifetime_secs,
        };
        let node = match self
            .engine
            .store()
            .enroll(&key.id, &secret_hash, &new, self.auto_approver(), self.engine.now())
            .await
        {
            Ok(n) => n,
            // Every key problem looks the same from outside.
            Err(crate::store::StoreError::Conflict(why)) => {
                tracing::info!(key = %key.id, %why, "enrollment refused");
                return Err(ApiError::Unauthenticated);
            }
            Err(e) => return Err(e.into()),
        };
        tracing::info!(node = node.id, name = %node.name, state = ?node.state, "node enrolled");
        // The permit bounds the store work; the refresh is shared by every
        // enrollment waiting for one, so it does not hold a permit.
        drop(check);
        self.engine.refresh().await?;
        let snap = self.engine.snapshot();
        for r in snap.routes.iter().filter(|r| r.node_id == node.id) {
            if let Some(c) = route_check::conflict(&snap, node.id, r.prefix) {
                self.engine.record_refusal(&format!("node/{}", node.id), node.id, &r.prefix, &c).await?;
            }
        }
        Ok(pb::EnrollResponse {
            capabilities: Some(mesh_proto::capabilities("mesh-control")),
            node: Some(convert::node(&node, self.engine.now(), true)),
            credential: Some(pb::Credential { token, expires_unix: node.key_expiry }),
        })
    }

    /// Renews a node's credential (and WireGuard key, if given). The key's
    /// expiry stays: a node cannot extend its own authorisation.
    /// Re-authentication: a node whose key expired (or is about to) proves
    /// it is that node with its last credential, and that it may be in the
    /// mesh with a valid enrollment key; it keeps its identity and gets a
    /// new key expiry.
    async fn reauthenticate(
        &self,
        key: &EnrollmentKeyText,
        secret_hash: &str,
        req: &pb::EnrollRequest,
        token: String,
        hash: String,
    ) -> Result<pb::EnrollResponse, ApiError> {
        let old = auth::sha256_hex(req.previous_credential.as_bytes());
        let (node, _) = self.engine.node_by_credential(&old).await?.ok_or(ApiError::Unauthenticated)?;
        let node = self
            .engine
            .store()
            .reauthenticate(
                node.id,
                &key.id,
                secret_hash,
                hash,
                hex::encode(&req.wireguard_public_key),
                self.engine.config().key_lifetime_secs,
                self.engine.now(),
            )
            .await
            .map_err(|e| match e {
                crate::store::StoreError::Conflict(_) => ApiError::Unauthenticated,
                e => e.into(),
            })?;
        tracing::info!(node = node.id, name = %node.name, key = %key.id, "node re-authenticated");
        self.engine.refresh().await?;
        Ok(pb::EnrollResponse {
            capabilities: Some(mesh_proto::capabilities("mesh-control")),
            node: Some(convert::node(&node, self.engine.now(), true)),
            credential: Some(pb::Credential { token, expires_unix: node.key_expiry }),
        })
    }

    async fn renew(
        &self,
        node: NodeRecord,
        used: CredentialMatch,
        req: pb::RenewRequest,
    ) -> Result<pb::RenewResponse, ApiError> {
        let new_key = match <[u8; 32]>::try_from(req.new_wireguard_public_key.as_slice()) {
            _ if req.new_wireguard_public_key.is_empty() => None,
            Ok(k) => {
                self.check_proof(node.id, &k, &req)?;
                Some(hex::encode(k))
            }
            Err(_) => return Err(ApiError::InvalidArgument("new_wireguard_public_key must be 32 bytes".into())),
        };
        let (token, hash) = auth::new_credential();
        let node = self.engine.store().renew(node.id, hash, used, new_key, self.engine.now()).await?;
        self.engine.refresh().await?;
        Ok(pb::RenewResponse {
            credential: Some(pb::Credential { token, expires_unix: node.key_expiry }),
            node: Some(convert::node(&node, self.engine.now(), true)),
        })
    }

    /// Serves one Sync stream of `node` until either side ends it: sends
    /// each new view, and handles the agent's messages. Returns the error
    /// to end the stream with, if any.
    ///
    /// The stream stays authorised only while the node does: it ends as
    /// soon as the node is removed or its key expires (checked at every
    /// view change, every message, and at the expiry itself). Health and
    /// route reports and endpoint candidates go through a [`Reports`] gate.
    async fn serve_stream(
        &self,
        id: u64,
        version: u32,
        mut slot: crate::engine::Slot,
        mut ca: Option<watch::Receiver<Vec<crate::tls::TrustedCa>>>,
        mut inbound: Streaming<pb::SyncRequest>,
        tx: &mpsc::Sender<Result<pb::SyncResponse, Status>>,
    ) -> Result<(), ApiError> {
        use pb::sync_request::Msg;
        let mut sent = 0;
        // The trusted CAs go out after the first snapshot and on changes.
        let mut ca_due = true;
        let mut reports = Reports::new(self.engine.limits.config().report_interval());
        loop {
            let expires_in = self.authorised(id)?;
            let current = slot.borrow_and_update().clone();
            let Some(published) = current else { return Err(ApiError::Unauthenticated) };
            if let Some(msg) = next_message(&published, sent, version, self.relays.list()) {
                sent = published.view.generation;
                if tx.send(Ok(msg)).await.is_err() {
                    return Ok(());
                }
            }
            if let Some(rx) = ca.as_ref().filter(|_| ca_due && sent != 0) {
                ca_due = false;
                let msg = crate::tls::sync_message(&rx.borrow());
                if tx.send(Ok(msg)).await.is_err() {
                    return Ok(());
                }
            }
            tokio::select! {
                changed = slot.changed() => if changed.is_err() { return Ok(()) },
                () = async {
                    // No CA, or its sender gone: nothing more will come.
                    let open = match ca.as_mut() {
                        Some(rx) => rx.changed().await.is_ok(),
                        None => false,
                    };
                    if !open {
                        std::future::pending::<()>().await;
                    }
                } => ca_due = true,
                () = tokio::time::sleep(expires_in) => {}
                () = reports.due() => {
                    for m in reports.take_due() {
                        self.handle(id, version, m).await?;
                    }
                }
                msg = inbound.message() => match msg {
                    Ok(Some(pb::SyncRequest { msg: Some(m) })) => {
                        self.authorised(id)?;
                        let m = match m {
                            m @ (Msg::Health(_) | Msg::Routes(_) | Msg::Candidates(_)) => reports.offer(m),
                            m => Some(m),
                        };
                        if let Some(m) = m {
                            self.handle(id, version, m).await?;
                        }
                    }
                    Ok(Some(_)) => {}
                    Ok(None) | Err(_) => return Ok(()),
                },
            }
        }
    }

    /// Whether node `id` may still hold a stream: it exists and its key has
    /// not expired. Returns how long until it expires (at most an hour:
    /// the clock may be changed, and the check then runs again).
    fn authorised(&self, id: u64) -> Result<std::time::Duration, ApiError> {
        let snap = self.engine.snapshot();
        let now = self.engine.now();
        let node = snap.nodes.binary_search_by_key(&id, |n| n.id).ok().map(|i| &snap.nodes[i]);
        match node {
            Some(n) if !n.expired(now) => {
                let left = u64::try_from(n.key_expiry.saturating_sub(now)).unwrap_or(0).min(3600);
                Ok(std::time::Duration::from_secs(left))
            }
            _ => {
                tracing::info!(node = id, "closing a sync stream: the node's key expired or it was removed");
                Err(ApiError::Unauthenticated)
            }
        }
    }

    /// Audits the path changes a node's health report showed (already
    /// rate-limited: see [`crate::relay::paths`]), each as `peer.path`
    /// ("fsn-gw1 -> nbg-gw1: direct -> relay (fsn)").
    async fn audit_paths(
        &self,
        node: u64,
        changes: Vec<(crate::relay::paths::PathChange, u32)>,
    ) -> Result<(), ApiError> {
        let snap = self.engine.snapshot();
        let name =
            |id: u64| snap.nodes.iter().find(|n| n.id == id).map_or_else(|| format!("node {id}"), |n| n.name.clone());
        for (c, suppressed) in changes {
            let mut detail = format!("{} -> {}: {} -> {}", name(node), name(c.peer), c.from, c.to);
            if suppressed > 0 {
                detail.push_str(&format!(" ({suppressed} earlier path changes of this node not audited: rate limit)"));
            }
            tracing::info!(node, peer = c.peer, from = %c.from, to = %c.to, "peer path changed");
            let path = |p: &crate::relay::paths::Path| match p {
                crate::relay::paths::Path::Direct => serde_json::json!({ "path": "direct" }),
                crate::relay::paths::Path::Relay(r) => serde_json::json!({ "path": "relay", "relay_region": r }),
            };
            let mut after = path(&c.to);
            after["peer"] = c.peer.into();
            after["detail"] = detail.into();
            after["suppressed"] = suppressed.into();
            self.engine
                .store()
                .record_event(
                    &format!("node/{node}"),
                    "peer.path",
                    &format!("node/{node}"),
                    path(&c.from).to_string(),
                    after.to_string(),
                    self.engine.now(),
                )
                .await?;
        }
        self.engine.audit_changed();
        Ok(())
    }

    /// Handles one message of a Sync stream from an agent of capability
    /// `version`.
    async fn handle(&self, node: u64, version: u32, msg: pb::sync_request::Msg) -> Result<(), ApiError> {
        use pb::sync_request::Msg;
        match msg {
            Msg::Hello(_) => Err(ApiError::InvalidArgument("hello sent twice".into())),
            Msg::Ack(ack) => {
                if ack.error.is_empty() {
                    self.engine.ack(node, ack.generation);
                } else {
                    tracing::warn!(node, generation = ack.generation, error = %ack.error, "agent could not apply a view");
                    self.engine.nack(node, ack.generation, &ack.error);
                }
                Ok(())
            }
            Msg::Health(report) => {
                let report = capability::health(version, report);
                let snap = self.engine.snapshot();
                let mut changed = false;
                for rh in &report.routes {
                    let Ok(prefix) = cidr(&rh.prefix) else { continue };
                    let Some(known) = snap.routes.iter().find(|r| r.node_id == node && r.prefix == prefix) else {
                        continue;
                    };
                    if known.healthy != rh.healthy {
                        self.engine.store().set_route_health(node, &prefix, rh.healthy, self.engine.now()).await?;
                        changed = true;
                    }
                    // Ownership is shown and audited, not used for the
                    // order: the gateways decide it from control's order.
                    if known.owner != rh.owner {
                        let since = if rh.owner_since_unix > 0 {
                            rh.owner_since_unix.min(self.engine.now())
                        } else {
                            self.engine.now()
                        };
                        tracing::info!(node, %prefix, owner = rh.owner, "site ownership changed");
                        self.engine.store().set_route_owner(node, &prefix, rh.owner, since, self.engine.now()).await?;
                        changed = true;
                    }
                }
                let paths = self.engine.record_health(node, report);
                if changed {
                    self.engine.refresh().await?;
                }
                if !paths.is_empty() {
                    self.audit_paths(node, paths).await?;
                }
                Ok(())
            }
            Msg::Candidates(c) => {
                let list = endpoints(&c.endpoints)?;
                let stored = self.engine.snapshot().nodes.iter().find(|n| n.id == node).map(|n| n.endpoints.clone());
                // Agents resend their candidates on every rediscovery: only
                // a different list is a write and a recompute.
                if stored.as_ref() != Some(&list) {
                    tracing::info!(node, endpoints = ?list, "endpoint candidates changed");
                    self.engine.store().set_endpoints(node, list, self.engine.now()).await?;
                    self.engine.refresh().await?;
                }
                Ok(())
            }
            Msg::Routes(adv) => {
                let adv = capability::routes(version, adv);
                let record = self.engine.snapshot().nodes.iter().find(|n| n.id == node).cloned();
                let Some(record) = record else { return Err(ApiError::NotFound("node".into())) };
                let (policy, _) = self.engine.policy();
                let me = InventoryNode {
                    id: node,
                    name: record.name.clone(),
                    addrs: Vec::new(),
                    tags: record.tags.clone(),
                    user: record.owner.clone(),
                    routes: Vec::new(),
                };
                let snap = self.engine.snapshot();
                // autoApprovers never approve a refused prefix: it waits for
                // an admin (who may override a soft conflict).
                let mut refused = Vec::new();
                let mut prefixes = Vec::new();
                for p in &adv.prefixes {
                    let n = cidr(p)?;
                    let conflict = route_check::conflict(&snap, node, n);
                    let known = snap.routes.iter().any(|r| r.node_id == node && r.prefix == n);
                    prefixes.push((n, conflict.is_none() && policy::auto_approved(&policy, &me, n)));
                    if let Some(c) = conflict.filter(|_| !known) {
                        refused.push((n, c));
                    }
                }
                self.engine.store().set_advertised(node, &prefixes, self.engine.now()).await?;
                let stored = self.engine.store().snapshot().await?;
                for o in &adv.options {
                    let prefix = cidr(&o.prefix)?;
                    if !prefixes.iter().any(|(p, _)| *p == prefix) {
                        return Err(ApiError::InvalidArgument(format!(
                            "options for {prefix}, which is not advertised"
                        )));
                    }
                    let options = RouteOptionsRecord {
                        virtual_addresses: site_addresses(&prefix, &o.virtual_addresses, "virtual address")?,
                        snat: o.snat,
                        lan_addresses: site_addresses(&prefix, &o.lan_addresses, "LAN address")?,
                    };
                    let known = stored.routes.iter().find(|r| r.node_id == node && r.prefix == prefix);
                    if known.is_some_and(|r| {
                        r.virtual_addresses != options.virtual_addresses
                            || r.snat != options.snat
                            || r.lan_addresses != options.lan_addresses
                    }) {
                        self.engine.store().set_route_options(node, &prefix, options, self.engine.now()).await?;
                    }
                }
                for (n, c) in &refused {
                    self.engine.record_refusal(&format!("node/{node}"), node, n, c).await?;
                }
                self.engine.refresh().await?;
                Ok(())
            }
            Msg::Failover(f) => {
                let prefix = cidr(&f.prefix)?;
                let snap = self.engine.snapshot();
                let known = |id: u64| id == 0 || snap.nodes.binary_search_by_key(&id, |n| n.id).is_ok();
                let routed = snap.routes.iter().any(|r| r.prefix == prefix);
                if !routed || !known(f.from_node) || !known(f.to_node) {
                    tracing::warn!(
                        node, %prefix, from = f.from_node, to = f.to_node,
                        "failover report names an unknown route or node; ignored"
                    );
                    return Ok(());
                }
                if !self.engine.allow_failover_report(node) {
                    tracing::warn!(node, %prefix, "failover report over the rate limit; not audited");
                    return Ok(());
                }
                // The reason is the agent's text: bounded before it is stored.
                let reason: String = f.reason.chars().take(200).collect();
                tracing::info!(node, %prefix, from = f.from_node, to = f.to_node, %reason, "agent failed a route over locally");
                let before = serde_json::json!({ "gateway": f.from_node }).to_string();
                let after = serde_json::json!({ "gateway": f.to_node, "reason": reason, "at_unix_ms": f.at_unix_ms })
                    .to_string();
                self.engine
                    .store()
                    .record_event(
                        &format!("node/{node}"),
                        "route.failover",
                        &format!("route/{prefix}"),
                        before,
                        after,
                        self.engine.now(),
                    )
                    .await?;
                self.engine.audit_changed();
                Ok(())
            }
        }
    }
}

type SyncStream = Pin<Box<dyn Stream<Item = Result<pb::SyncResponse, Status>> + Send>>;

/// The per-stream gate of an agent's health and route reports: a token
/// bucket per kind, [`REPORT_BURST`] deep, refilled one token per
/// interval. A report with a token is applied at once (so a real change is
/// never delayed); without one it waits for the next token, and a newer
/// report of the same kind replaces it (each carries the whole state, so
/// only the latest matters). A flapping gateway thus costs at most one
/// write and one recompute per kind and interval, whatever it sends.
#[derive(Debug)]
struct Reports {
    interval: std::time::Duration,
    /// Routes, endpoint candidates, then health: a health report may name
    /// a route that the advertisement before it added.
    kinds: [Gate; 3],
}

/// Reports of one kind an agent may send at once before the gate holds
/// them back (a start sends several; so does a failover).
const REPORT_BURST: f64 = 4.0;

#[derive(Debug)]
struct Gate {
    tokens: f64,
    refilled: tokio::time::Instant,
    pending: Option<pb::sync_request::Msg>,
}

impl Reports {
    fn new(interval: std::time::Duration) -> Self {
        let gate = || Gate { tokens: REPORT_BURST, refilled: tokio::time::Instant::now(), pending: None };
        Self { interval, kinds: [gate(), gate(), gate()] }
    }

    const fn gate(m: &pb::sync_request::Msg) -> usize {
        match m {
            pb::sync_request::Msg::Routes(_) => 0,
            pb::sync_request::Msg::Candidates(_) => 1,
            _ => 2,
        }
    }

    /// Adds the tokens earned since the last refill.
    fn refill(interval: std::time::Duration, g: &mut Gate, now: tokio::time::Instant) {
        if interval.is_zero() {
            g.tokens = REPORT_BURST;
        } else {
            let earned = now.duration_since(g.refilled).as_secs_f64() / interval.as_secs_f64();
            g.tokens = (g.tokens + earned).min(REPORT_BURST);
        }
        g.refilled = now;
    }

    /// Offers a report: returns it if it may be applied now, or keeps it.
    fn offer(&mut self, m: pb::sync_request::Msg) -> Option<pb::sync_request::Msg> {
        let now = tokio::time::Instant::now();
        let g = &mut self.kinds[Self::gate(&m)];
        Self::refill(self.interval, g, now);
        if g.pending.is_none() && g.tokens >= 1.0 {
            g.tokens -= 1.0;
            Some(m)
        } else {
            g.pending = Some(m);
            None
        }
    }

    /// When the first kept report is due (never if none is kept).
    async fn due(&self) {
        let at = self
            .kinds
            .iter()
            .filter(|g| g.pending.is_some())
            .map(|g| g.refilled + self.interval.mul_f64((1.0 - g.tokens).max(0.0)))
            .min();
        match at {
            Some(at) => tokio::time::sleep_until(at).await,
            None => std::future::pending().await,
        }
    }

    /// The kept reports that are due, in gate order.
    fn take_due(&mut self) -> Vec<pb::sync_request::Msg> {
        let now = tokio::time::Instant::now();
        let mut out = Vec::new();
        for g in &mut self.kinds {
            Self::refill(self.interval, g, now);
            // A hair of float rounding must not leave a due report waiting.
            if g.tokens >= 1.0 - 1e-6
                && let Some(m) = g.pending.take()
            {
                g.tokens = (g.tokens - 1.0).max(0.0);
                out.push(m);
            }
        }
        out
    }
}

/// A route option's site addresses (`what`: "virtual address", "LAN
/// address"), checked: IP addresses inside the prefix, at most one per
/// family.
fn site_addresses(prefix: &ipnet::IpNet, list: &[String], what: &str) -> Result<Vec<String>, ApiError> {
    let mut out: Vec<String> = Vec::with_capacity(list.len());
    let mut families = (0, 0);
    for a in list {
        let ip: std::net::IpAddr = a
            .parse()
            .map_err(|_| ApiError::InvalidArgument(format!("{what} {a:?} of {prefix} is not an IP address")))?;
        let count = if ip.is_ipv4() { &mut families.0 } else { &mut families.1 };
        *count += 1;
        if !prefix.contains(&ip) || *count > 1 {
            return Err(ApiError::InvalidArgument(format!(
                "{what} {ip} of {prefix}: at most one IPv4 and one IPv6, inside the prefix"
            )));
        }
        out.push(ip.to_string());
    }
    Ok(out)
}

/// Sends the latest view if it is newer than `sent`: a delta when it
/// follows what the agent has, a snapshot (with the `relays`) otherwise,
/// in the form the agent's capability `version` reads.
fn next_message(
    p: &crate::engine::Published,
    sent: u64,
    version: u32,
    relays: &[pb::Relay],
) -> Option<pb::SyncResponse> {
    use pb::sync_response::Msg;
    if p.view.generation == sent {
        return None;
    }
    let msg = match &p.delta {
        Some(d) if sent != 0 && d.base_generation == sent => Msg::Delta(d.clone()),
        // The relays are configuration, fixed for the process's life, so
        // only snapshots carry them, and views and deltas never do.
        _ => Msg::Snapshot(pb::NodeView { relays: relays.to_vec(), ..p.view.clone() }),
    };
    Some(pb::SyncResponse { msg: Some(crate::capability::for_version(version, msg)) })
}

#[tonic::async_trait]
impl AgentService for AgentApi {
    async fn enroll(&self, req: Request<pb::EnrollRequest>) -> Result<Response<pb::EnrollResponse>, Status> {
        let source = req.remote_addr().map(|a| a.ip());
        Ok(Response::new(Self::enroll(self, source, req.into_inner()).await?))
    }

    async fn renew(&self, req: Request<pb::RenewRequest>) -> Result<Response<pb::RenewResponse>, Status> {
        let (node, used) = self.authenticate(&req).await?;
        Ok(Response::new(Self::renew(self, node, used, req.into_inner()).await?))
    }

    async fn key_challenge(
        &self,
        req: Request<pb::KeyChallengeRequest>,
    ) -> Result<Response<pb::KeyChallengeResponse>, Status> {
        let (node, _) = self.authenticate(&req).await?;
        Ok(Response::new(Self::key_challenge(self, node.id)))
    }

    async fn relay_ticket(
        &self,
        req: Request<pb::RelayTicketRequest>,
    ) -> Result<Response<pb::RelayTicketResponse>, Status> {
        let (node, _) = self.authenticate(&req).await?;
        Ok(Response::new(Self::relay_ticket(self, &node)?))
    }

    type SyncStream = SyncStream;

    async fn sync(&self, req: Request<Streaming<pb::SyncRequest>>) -> Result<Response<SyncStream>, Status> {
        let (node, _) = self.authenticate(&req).await?;
        let mut inbound = req.into_inner();
        let first = inbound.message().await?.ok_or_else(|| Status::invalid_argument("empty stream"))?;
        let Some(pb::sync_request::Msg::Hello(hello)) = first.msg else {
            return Err(Status::invalid_argument("the first message must be a hello"));
        };
        if hello.node_id != 0 && hello.node_id != node.id {
            return Err(ApiError::PermissionDenied("this credential belongs to another node".into()).into());
        }
        let id = node.id;
        let version = capability::version(hello.capabilities.as_ref());
        let endpoints = (!hello.endpoints.is_empty()).then(|| endpoints(&hello.endpoints)).transpose()?;
        let open = self.engine.stream_opened(id);
        if open > self.engine.limits.config().streams_per_node as usize {
            self.engine.stream_closed(id);
            tracing::warn!(node = id, open, "sync stream refused: over the per-node stream cap");
            return Err(ApiError::from(self.engine.limits.refuse(Limited::Streams)).into());
        }
        self.engine.set_limits(id, capability::limits(hello.capabilities.as_ref()));
        if open == 1 || endpoints.is_some() {
            self.engine
                .store()
                .set_presence(id, true, endpoints, &self.engine.config().replica, self.engine.now())
                .await
                .map_err(ApiError::from)?;
            let engine = self.engine.clone();
            // Presence matters for route failover only: do not hold up the stream.
            tokio::spawn(async move { engine.refresh().await });
        }
        tracing::info!(
            node = id,
            last_generation = hello.last_generation,
            capability_version = version,
            "sync stream opened"
        );
        let slot = self.engine.subscribe(id);
        let (tx, rx) = mpsc::channel(4);
        let this = self.clone();
        let ca = self.ca.clone().filter(|_| version >= capability::CA_ROTATION);
        tokio::spawn(async move {
            let why = this.serve_stream(id, version, slot, ca, inbound, &tx).await;
            if let Err(e) = why {
                let _ = tx.send(Err(e.into())).await;
            }
            if this.engine.stream_closed(id) == 0 {
                let _ = this
                    .engine
                    .store()
                    .set_presence(id, false, None, &this.engine.config().replica, this.engine.now())
                    .await;
                let _ = this.engine.refresh().await;
            }
            tracing::info!(node = id, "sync stream closed");
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}
