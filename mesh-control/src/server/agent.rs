//! `AgentService`: enrollment, credential renewal and the Sync stream.

use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use mesh_proto::v1 as pb;
use mesh_proto::v1::agent_service_server::AgentService;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use super::{ApiError, bearer, cidr};
use mesh_client::enrollment::EnrollmentKeyText;

use crate::auth;
use crate::capability;
use crate::engine::{Engine, convert};
use crate::policy::{self, InventoryNode};
use crate::route_check;
use crate::store::{KeyRecord, NewNode, NodeRecord, RouteOptionsRecord};

/// The agent-facing service.
#[derive(Debug, Clone)]
pub struct AgentApi {
    engine: Arc<Engine>,
    /// The CAs agents must trust, pushed on the Sync stream (capability 4).
    ca: Option<watch::Receiver<Vec<crate::tls::TrustedCa>>>,
}

impl AgentApi {
    /// A service over `engine`.
    #[must_use]
    pub const fn new(engine: Arc<Engine>) -> Self {
        Self { engine, ca: None }
    }

    /// Tells agents the CAs to trust, now and whenever `ca` changes.
    #[must_use]
    pub fn with_ca(self, ca: watch::Receiver<Vec<crate::tls::TrustedCa>>) -> Self {
        Self { ca: Some(ca), ..self }
    }

    /// The node a request's credential belongs to, if valid and unexpired.
    async fn authenticate<T>(&self, req: &Request<T>) -> Result<NodeRecord, ApiError> {
        let token = bearer(req).ok_or(ApiError::Unauthenticated)?;
        let node = self
            .engine
            .node_by_credential(&auth::sha256_hex(token.as_bytes()))
            .await?
            .ok_or(ApiError::Unauthenticated)?;
        if node.expired(self.engine.now()) {
            return Err(ApiError::Unauthenticated);
        }
        Ok(node)
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

    async fn enroll(&self, req: pb::EnrollRequest) -> Result<pb::EnrollResponse, ApiError> {
        let key = EnrollmentKeyText::parse(&req.enrollment_key).ok_or(ApiError::Unauthenticated)?;
        if req.wireguard_public_key.len() != 32 {
            return Err(ApiError::InvalidArgument("wireguard_public_key must be 32 bytes".into()));
        }
        if req.hostname.is_empty() || req.hostname.len() > 63 {
            return Err(ApiError::InvalidArgument("hostname must be 1-63 characters".into()));
        }
        let routes =
            req.advertised_routes.iter().map(|r| cidr(r).map(|n| (n, false))).collect::<Result<Vec<_>, _>>()?;
        let (token, hash) = auth::new_credential();
        let new = NewNode {
            hostname: req.hostname.clone(),
            public_key: hex::encode(&req.wireguard_public_key),
            endpoints: req.endpoints.clone(),
            routes,
            credential_hash: hash,
            key_lifetime: self.engine.config().key_lifetime_secs,
        };
        let secret_hash = auth::sha256_hex(key.secret.as_bytes());
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

    async fn renew(&self, node: NodeRecord, req: pb::RenewRequest) -> Result<pb::RenewResponse, ApiError> {
        let new_key = match req.new_wireguard_public_key.len() {
            0 => None,
            32 => Some(hex::encode(&req.new_wireguard_public_key)),
            _ => return Err(ApiError::InvalidArgument("new_wireguard_public_key must be 32 bytes".into())),
        };
        let (token, hash) = auth::new_credential();
        let expiry = self.engine.now() + self.engine.config().key_lifetime_secs;
        let node = self.engine.store().renew(node.id, hash, new_key, expiry, self.engine.now()).await?;
        self.engine.refresh().await?;
        Ok(pb::RenewResponse {
            credential: Some(pb::Credential { token, expires_unix: node.key_expiry }),
            node: Some(convert::node(&node, self.engine.now(), true)),
        })
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
                self.engine.record_health(node, report);
                if changed {
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

/// Sends the latest view if it is newer than `sent`: a delta when it
/// follows what the agent has, a snapshot otherwise.
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

fn next_message(p: &crate::engine::Published, sent: u64) -> Option<pb::SyncResponse> {
    use pb::sync_response::Msg;
    if p.view.generation == sent {
        return None;
    }
    let msg = match &p.delta {
        Some(d) if sent != 0 && d.base_generation == sent => Msg::Delta(d.clone()),
        _ => Msg::Snapshot(p.view.clone()),
    };
    Some(pb::SyncResponse { msg: Some(msg) })
}

#[tonic::async_trait]
impl AgentService for AgentApi {
    async fn enroll(&self, req: Request<pb::EnrollRequest>) -> Result<Response<pb::EnrollResponse>, Status> {
        Ok(Response::new(Self::enroll(self, req.into_inner()).await?))
    }

    async fn renew(&self, req: Request<pb::RenewRequest>) -> Result<Response<pb::RenewResponse>, Status> {
        let node = self.authenticate(&req).await?;
        Ok(Response::new(Self::renew(self, node, req.into_inner()).await?))
    }

    type SyncStream = SyncStream;

    async fn sync(&self, req: Request<Streaming<pb::SyncRequest>>) -> Result<Response<SyncStream>, Status> {
        let node = self.authenticate(&req).await?;
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
        self.engine.set_limits(id, capability::limits(hello.capabilities.as_ref()));
        let endpoints = (!hello.endpoints.is_empty()).then_some(hello.endpoints);
        if self.engine.stream_opened(id) == 1 || endpoints.is_some() {
            self.engine.store().set_presence(id, true, endpoints, self.engine.now()).await.map_err(ApiError::from)?;
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
        let mut slot = self.engine.subscribe(id);
        let (tx, rx) = mpsc::channel(4);
        let this = self.clone();
        let mut ca = self.ca.clone().filter(|_| version >= capability::CA_ROTATION);
        tokio::spawn(async move {
            let mut sent = 0;
            // The trusted CAs go out after the first snapshot and on changes.
            let mut ca_due = true;
            loop {
                let current = slot.borrow_and_update().clone();
                let Some(published) = current else {
                    let _ = tx.send(Err(Status::unauthenticated("unauthenticated"))).await;
                    break;
                };
                if let Some(msg) = next_message(&published, sent) {
                    sent = published.view.generation;
                    if tx.send(Ok(msg)).await.is_err() {
                        break;
                    }
                }
                if let Some(rx) = ca.as_ref().filter(|_| ca_due && sent != 0) {
                    ca_due = false;
                    let msg = crate::tls::sync_message(&rx.borrow());
                    if tx.send(Ok(msg)).await.is_err() {
                        break;
                    }
                }
                tokio::select! {
                    changed = slot.changed() => if changed.is_err() { break },
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
                    msg = inbound.message() => match msg {
                        Ok(Some(pb::SyncRequest { msg: Some(m) })) => {
                            if let Err(e) = this.handle(id, version, m).await {
                                let _ = tx.send(Err(e.into())).await;
                                break;
                            }
                        }
                        Ok(Some(_)) => {}
                        Ok(None) | Err(_) => break,
                    },
                }
            }
            if this.engine.stream_closed(id) == 0 {
                let _ = this.engine.store().set_presence(id, false, None, this.engine.now()).await;
                let _ = this.engine.refresh().await;
            }
            tracing::info!(node = id, "sync stream closed");
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}
