//! `AdminService`: the orchestration API behind meshctl.

use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use mesh_proto::v1 as pb;
use mesh_proto::v1::admin_service_server::AdminService;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use super::{ApiError, bearer, cidr};
use mesh_client::enrollment::EnrollmentKeyText;

use crate::auth;
use crate::engine::{
    Engine, convert,
    ops::{OpError, off_workers},
    view,
};
use crate::policy::{self, Policy, compile};
use crate::route_check;
use crate::store::{AuditFilter, KeyRecord, NodeRecord};

/// Default enrollment key lifetime: one day.
const DEFAULT_KEY_SECS: i64 = 86_400;
/// The longest an enrollment key may be valid: 10 years.
const MAX_KEY_SECS: i64 = 10 * 365 * 86_400;

/// The admin service. `trusted` is set on the local Unix socket, which only
/// root can open: calls there need no token.
#[derive(Debug, Clone)]
pub struct AdminApi {
    engine: Arc<Engine>,
    trusted: bool,
    ca_pin: [u8; 32],
    /// The CA, for `GetCa`, `RotateCa` and the pin of new enrollment keys.
    pub(super) ca: Option<Arc<crate::tls::Authority>>,
    /// The relay ticket key's public half, base64 (empty: none).
    relay_ticket_key: String,
}

type R<T> = Result<Response<T>, Status>;

impl AdminApi {
    /// A service over `engine`; `ca_pin` goes into new enrollment keys.
    #[must_use]
    pub const fn new(engine: Arc<Engine>, ca_pin: [u8; 32], trusted: bool) -> Self {
        Self { engine, trusted, ca_pin, ca: None, relay_ticket_key: String::new() }
    }

    /// Shows `key` (base64), the relay ticket key, in `GetStatus`.
    #[must_use]
    pub fn with_relay_ticket_key(self, key: String) -> Self {
        Self { relay_ticket_key: key, ..self }
    }

    /// Serves the CA calls from `ca`, whose signing CA's pin (which moves
    /// with a rotation) then goes into new enrollment keys.
    #[must_use]
    pub fn with_authority(self, ca: Arc<crate::tls::Authority>) -> Self {
        Self { ca: Some(ca), ..self }
    }

    fn ca_pin(&self) -> [u8; 32] {
        self.ca.as_ref().map_or(self.ca_pin, |a| a.signing_pin())
    }

    pub(crate) fn engine(&self) -> &Engine {
        &self.engine
    }

    /// The actor name for the audit log, or why the call is refused.
    async fn authorize<T>(&self, req: &Request<T>) -> Result<String, ApiError> {
        if self.trusted {
            return Ok("local-admin".into());
        }
        let token = bearer(req).ok_or(ApiError::Unauthenticated)?;
        self.authorize_token(&token).await
    }

    /// The actor name for an admin token, or why it is refused: the check
    /// behind every call with a bearer token, shared with the web page
    /// ([`crate::web`]) so that both accept exactly the same tokens.
    pub(crate) async fn authorize_token(&self, token: &str) -> Result<String, ApiError> {
        self.authorize_token_hash(&auth::sha256_hex(token.as_bytes())).await
    }

    /// [`Self::authorize_token`] by the token's hash (what a web session
    /// keeps instead of the token).
    pub(crate) async fn authorize_token_hash(&self, hash: &str) -> Result<String, ApiError> {
        if let Some(t) = self.engine.store().api_token(hash, self.engine.now()).await? {
            return Ok(format!("admin:{}", t.id));
        }
        if self.engine.node_by_credential(hash).await?.is_some_and(|(n, _)| !n.expired(self.engine.now())) {
            return Err(ApiError::PermissionDenied("node credentials cannot use the admin API".into()));
        }
        Err(ApiError::Unauthenticated)
    }

    fn find_node(&self, r: &pb::NodeRef) -> Result<NodeRecord, ApiError> {
        let snap = self.engine.snapshot();
        snap.nodes.iter().find(|n| if r.id != 0 { n.id == r.id } else { n.name == r.name }).cloned().ok_or_else(|| {
            ApiError::NotFound(format!("node {}", if r.id != 0 { r.id.to_string() } else { r.name.clone() }))
        })
    }

    /// A node as `ListNodes` answers it.
    pub(crate) fn node_msg(&self, n: &NodeRecord) -> pb::Node {
        let mut m = convert::node(n, self.engine.now(), true);
        m.acked_generation = self.engine.acked(n.id);
        m.backend = self.engine.backend(n.id).unwrap_or_default();
        if let Some((generation, error)) = self.engine.nacked(n.id) {
            m.view_error = error;
            m.view_error_generation = generation;
        }
        m.advertised_routes =
            self.engine.snapshot().routes.iter().filter(|r| r.node_id == n.id).map(|r| r.prefix.to_string()).collect();
        m
    }

    /// Every gateway's latest probe report on every peer, as `GetStatus`
    /// answers it.
    pub(crate) fn peer_links(&self) -> Vec<pb::PeerLink> {
        let snap = self.engine.snapshot();
        let name = |id: u64| snap.nodes.iter().find(|n| n.id == id).map(|n| n.name.clone()).unwrap_or_default();
        self.engine
            .health_reports()
            .into_iter()
            .flat_map(|(from, age, report)| {
                let from_name = name(from);
                let age = i64::try_from(age.as_secs()).unwrap_or(i64::MAX);
                report.peers.into_iter().map(move |h| (from, from_name.clone(), age, h))
            })
            .map(|(from, from_name, age, h)| pb::PeerLink {
                from_node: from,
                from_name,
                to_node: h.node_id,
                to_name: name(h.node_id),
                health: Some(h),
                report_age_secs: age,
            })
            .collect()
    }

    /// Every route with its order and owner, as `ListRoutes` answers it.
    pub(crate) fn routes(&self) -> Vec<pb::Route> {
        let snap = self.engine.snapshot();
        let order = self.engine.route_order();
        let conflicts = route_check::conflicts(&snap);
        snap.routes
            .iter()
            .map(|r| {
                let node = snap.nodes.iter().find(|n| n.id == r.node_id);
                // A gateway that went offline cannot say it gave the site
                // up: it owns nothing any more.
                let owner = r.owner && node.is_some_and(|n| n.online);
                pb::Route {
                    refusal: conflicts
                        .get(&(r.node_id, r.prefix))
                        .filter(|c| !route_check::usable(r, Some(c)))
                        .map(ToString::to_string)
                        .unwrap_or_default(),
                    prefix: r.prefix.to_string(),
                    node_id: r.node_id,
                    node_name: node.map(|n| n.name.clone()).unwrap_or_default(),
                    approved: r.approved,
                    auto_approved: r.auto_approved,
                    priority: r.priority,
                    healthy: r.healthy,
                    primary: order.get(&r.prefix).and_then(|g| g.first()) == Some(&r.node_id),
                    rank: order
                        .get(&r.prefix)
                        .and_then(|g| g.iter().position(|id| *id == r.node_id))
                        .and_then(|i| i32::try_from(i).ok())
                        .unwrap_or(-1),
                    virtual_addresses: r.virtual_addresses.clone(),
                    snat: r.snat,
                    lan_addresses: r.lan_addresses.clone(),
                    owner,
                    owner_since_unix: if owner { r.owner_since } else { 0 },
                }
            })
            .collect()
    }

    fn route_msg(&self, node: u64, prefix: &ipnet::IpNet) -> Result<pb::Route, ApiError> {
        self.routes()
            .into_iter()
            .find(|r| r.node_id == node && r.prefix == prefix.to_string())
            .ok_or_else(|| ApiError::NotFound("route".into()))
    }

    fn policy_text(&self) -> (String, u64) {
        let snap = self.engine.snapshot();
        snap.policy.as_ref().map_or((policy::DEFAULT_POLICY.to_owned(), 0), |p| (p.text.clone(), p.generation))
    }
}

fn filter(r: &pb::ListAuditRequest) -> AuditFilter {
    AuditFilter {
        after_id: r.after_id,
        action_prefix: r.action_prefix.clone(),
        actor: r.actor.clone(),
        subject: r.subject.clone(),
        limit: r.limit,
    }
}

fn matches(f: &AuditFilter, e: &crate::store::AuditRecord) -> bool {
    e.action.starts_with(&f.action_prefix)
        && (f.actor.is_empty() || e.actor == f.actor)
        && (f.subject.is_empty() || e.subject == f.subject)
}

#[tonic::async_trait]
impl AdminService for AdminApi {
    async fn get_status(&self, req: Request<pb::GetStatusRequest>) -> R<pb::Status> {
        self.authorize(&req).await?;
        let snap = self.engine.snapshot();
        let now = self.engine.now();
        let count = |f: &dyn Fn(&NodeRecord) -> bool| snap.nodes.iter().filter(|n| f(n)).count() as u64;
        Ok(Response::new(pb::Status {
            capabilities: Some(mesh_proto::capabilities("mesh-control")),
            nodes_total: snap.nodes.len() as u64,
            nodes_pending: count(&|n| n.state == crate::store::NodeState::Pending && !n.expired(now)),
            nodes_online: count(&|n| n.online),
            nodes_expired: count(&|n| n.expired(now)),
            nodes_expiring_soon: count(&|n| !n.expired(now) && n.key_expiry - now < convert::EXPIRING_SOON_SECS),
            agents_connected: self.engine.connected() as u64,
            policy_generation: self.engine.policy().1,
            routes_active: self.engine.route_order().len() as u64,
            store: self.engine.store().backend().into(),
            ca_pin: hex::encode(self.ca_pin()),
            peers: self.peer_links(),
            relay_ticket_key: self.relay_ticket_key.clone(),
        }))
    }

    async fn list_nodes(&self, req: Request<pb::ListNodesRequest>) -> R<pb::ListNodesResponse> {
        self.authorize(&req).await?;
        let nodes = self.engine.snapshot().nodes.iter().map(|n| self.node_msg(n)).collect();
        Ok(Response::new(pb::ListNodesResponse { nodes }))
    }

    async fn get_node(&self, req: Request<pb::NodeRef>) -> R<pb::Node> {
        self.authorize(&req).await?;
        Ok(Response::new(self.node_msg(&self.find_node(req.get_ref())?)))
    }

    async fn approve_node(&self, req: Request<pb::NodeRef>) -> R<pb::Node> {
        let actor = self.authorize(&req).await?;
        let n = self.find_node(req.get_ref())?;
        let n = self.engine.approve_node(n.id, &actor).await.map_err(ApiError::from)?;
        Ok(Response::new(self.node_msg(&n)))
    }

    async fn set_node_tags(&self, req: Request<pb::SetNodeTagsRequest>) -> R<pb::Node> {
        let actor = self.authorize(&req).await?;
        let r = req.into_inner();
        let n = self.find_node(&r.node.unwrap_or_default())?;
        let n = self.engine.set_node_tags(n.id, r.tags, &actor).await.map_err(ApiError::from)?;
        Ok(Response::new(self.node_msg(&n)))
    }

    async fn expire_node_key(&self, req: Request<pb::NodeRef>) -> R<pb::Node> {
        let actor = self.authorize(&req).await?;
        let n = self.find_node(req.get_ref())?;
        let n = self.engine.expire_node_key(n.id, &actor).await.map_err(ApiError::from)?;
        Ok(Response::new(self.node_msg(&n)))
    }

    async fn rotate_node_key(&self, req: Request<pb::NodeRef>) -> R<pb::Node> {
        let actor = self.authorize(&req).await?;
        let n = self.find_node(req.get_ref())?;
        let n = self.engine.rotate_node_key(n.id, &actor).await.map_err(ApiError::from)?;
        Ok(Response::new(self.node_msg(&n)))
    }

    async fn remove_node(&self, req: Request<pb::NodeRef>) -> R<pb::Empty> {
        let actor = self.authorize(&req).await?;
        let n = self.find_node(req.get_ref())?;
        self.engine.remove_node(n.id, &actor).await.map_err(ApiError::from)?;
        Ok(Response::new(pb::Empty {}))
    }

    async fn extend_node_key(&self, req: Request<pb::ExtendNodeKeyRequest>) -> R<pb::Node> {
        let actor = self.authorize(&req).await?;
        let r = req.into_inner();
        let n = self.find_node(&r.node.unwrap_or_default())?;
        let n = self.engine.extend_node_key(n.id, r.days, &actor).await.map_err(ApiError::from)?;
        Ok(Response::new(self.node_msg(&n)))
    }

    async fn create_admin_token(&self, req: Request<pb::CreateAdminTokenRequest>) -> R<pb::CreateAdminTokenResponse> {
        let actor = self.authorize(&req).await?;
        let r = req.into_inner();
        let (t, secret) = self
            .engine
            .create_admin_token(&r.description, r.expires_in_seconds, &actor)
            .await
            .map_err(ApiError::from)?;
        Ok(Response::new(pb::CreateAdminTokenResponse { token: Some(convert::admin_token(&t)), secret }))
    }

    async fn list_admin_tokens(&self, req: Request<pb::Empty>) -> R<pb::ListAdminTokensResponse> {
        self.authorize(&req).await?;
        let tokens = self.engine.store().list_api_tokens().await.map_err(ApiError::from)?;
        Ok(Response::new(pb::ListAdminTokensResponse { tokens: tokens.iter().map(convert::admin_token).collect() }))
    }

    async fn revoke_admin_token(&self, req: Request<pb::AdminTokenRef>) -> R<pb::AdminToken> {
        let actor = self.authorize(&req).await?;
        let t = self.engine.revoke_admin_token(&req.get_ref().id, &actor).await.map_err(ApiError::from)?;
        Ok(Response::new(convert::admin_token(&t)))
    }

    async fn create_enrollment_key(
        &self,
        req: Request<pb::CreateEnrollmentKeyRequest>,
    ) -> R<pb::CreateEnrollmentKeyResponse> {
        let actor = self.authorize(&req).await?;
        let r = req.into_inner();
        let now = self.engine.now();
        let secret = auth::secret(24);
        let text = EnrollmentKeyText { id: auth::secret(6), secret: secret.clone(), ca_pin: Some(self.ca_pin()) };
        let lifetime = match r.expires_in_seconds {
            0 => DEFAULT_KEY_SECS,
            s if (1..=MAX_KEY_SECS).contains(&s) => s,
            s => {
                return Err(ApiError::InvalidArgument(format!(
                    "expires_in_seconds {s} is out of range: 1 to {MAX_KEY_SECS} (10 years), or 0 for the default"
                ))
                .into());
            }
        };
        // In range, so this cannot overflow; checked all the same.
        let expires = now.checked_add(lifetime).ok_or_else(|| ApiError::InvalidArgument("expiry overflows".into()))?;
        let key = KeyRecord {
            id: text.id.clone(),
            reusable: r.reusable,
            ephemeral: r.ephemeral,
            preapproved: r.preapproved,
            tags: r.tags,
            owner: r.user,
            description: r.description,
            created: now,
            expires,
            revoked: false,
            uses: 0,
            secret_hash: auth::sha256_hex(secret.as_bytes()),
        };
        self.engine.create_enrollment_key(&key, &actor).await.map_err(ApiError::from)?;
        Ok(Response::new(pb::CreateEnrollmentKeyResponse { key: Some(convert::key(&key)), secret: text.to_text() }))
    }

    async fn list_enrollment_keys(&self, req: Request<pb::Empty>) -> R<pb::ListEnrollmentKeysResponse> {
        self.authorize(&req).await?;
        let keys = self.engine.store().list_keys().await.map_err(ApiError::from)?;
        Ok(Response::new(pb::ListEnrollmentKeysResponse { keys: keys.iter().map(convert::key).collect() }))
    }

    async fn revoke_enrollment_key(&self, req: Request<pb::RevokeEnrollmentKeyRequest>) -> R<pb::EnrollmentKey> {
        let actor = self.authorize(&req).await?;
        let k = self.engine.revoke_enrollment_key(&req.get_ref().id, &actor).await.map_err(ApiError::from)?;
        Ok(Response::new(convert::key(&k)))
    }

    async fn list_routes(&self, req: Request<pb::Empty>) -> R<pb::ListRoutesResponse> {
        self.authorize(&req).await?;
        Ok(Response::new(pb::ListRoutesResponse { routes: self.routes() }))
    }

    async fn approve_route(&self, req: Request<pb::RouteRef>) -> R<pb::Route> {
        let actor = self.authorize(&req).await?;
        let prefix = cidr(&req.get_ref().prefix)?;
        let node = req.get_ref().node_id;
        self.engine.approve_route(node, prefix, &actor).await.map_err(ApiError::from)?;
        Ok(Response::new(self.route_msg(node, &prefix)?))
    }

    async fn set_route_priority(&self, req: Request<pb::SetRoutePriorityRequest>) -> R<pb::Route> {
        let actor = self.authorize(&req).await?;
        let r = req.into_inner();
        let route = r.route.unwrap_or_default();
        let prefix = cidr(&route.prefix)?;
        self.engine.set_route_priority(route.node_id, prefix, r.priority, &actor).await.map_err(ApiError::from)?;
        Ok(Response::new(self.route_msg(route.node_id, &prefix)?))
    }

    async fn get_policy(&self, req: Request<pb::Empty>) -> R<pb::PolicyDocument> {
        self.authorize(&req).await?;
        let (text, generation) = self.policy_text();
        Ok(Response::new(pb::PolicyDocument { text, generation }))
    }

    async fn validate_policy(&self, req: Request<pb::PolicyDocument>) -> R<pb::ValidatePolicyResponse> {
        self.authorize(&req).await?;
        Ok(Response::new(match self.engine.check_policy(&req.get_ref().text).await {
            Ok((policy, passed)) => pb::ValidatePolicyResponse {
                ok: true,
                problems: Vec::new(),
                tests_passed: passed,
                warnings: policy_problems(&policy.warnings),
            },
            Err(problems) => pb::ValidatePolicyResponse {
                ok: false,
                problems: policy_problems(&problems),
                tests_passed: 0,
                warnings: Vec::new(),
            },
        }))
    }

    async fn diff_policy(&self, req: Request<pb::PolicyDocument>) -> R<pb::DiffPolicyResponse> {
        self.authorize(&req).await?;
        let text = req.into_inner().text;
        let snap = self.engine.snapshot();
        let inv = view::inventory(&snap, self.engine.now());
        let (current, generation) = self.engine.policy();
        let inv2 = inv.clone();
        let diff = off_workers(move || {
            let candidate = Policy::parse(&text)?;
            let old = compile(&current, &inv2, generation);
            let new = compile(&candidate, &inv2, generation + 1);
            Ok(policy::diff(&old, &new))
        })
        .await
        .map_err(|p| ApiError::from(OpError::Policy(p)))?;
        let nodes = diff
            .into_iter()
            .map(|(id, (added, removed))| pb::NodeRuleDiff {
                node_id: id,
                node_name: inv.iter().find(|n| n.id == id).map(|n| n.name.clone()).unwrap_or_default(),
                added,
                removed,
            })
            .collect();
        Ok(Response::new(pb::DiffPolicyResponse { nodes }))
    }

    async fn set_policy(&self, req: Request<pb::PolicyDocument>) -> R<pb::PolicyDocument> {
        let actor = self.authorize(&req).await?;
        let text = req.into_inner().text;
        let generation = self.engine.set_policy(&text, &actor).await.map_err(ApiError::from)?;
        Ok(Response::new(pb::PolicyDocument { text, generation }))
    }

    async fn list_audit(&self, req: Request<pb::ListAuditRequest>) -> R<pb::ListAuditResponse> {
        self.authorize(&req).await?;
        let entries = self.engine.store().audit(&filter(req.get_ref())).await.map_err(ApiError::from)?;
        Ok(Response::new(pb::ListAuditResponse { entries: entries.iter().map(convert::audit).collect() }))
    }

    type FollowAuditStream = Pin<Box<dyn Stream<Item = Result<pb::AuditEntry, Status>> + Send>>;

    async fn follow_audit(&self, req: Request<pb::ListAuditRequest>) -> R<Self::FollowAuditStream> {
        self.authorize(&req).await?;
        let f = filter(req.get_ref());
        let mut watch = self.engine.audit_watch();
        let store = self.engine.store().clone();
        let first = store.audit(&f).await.map_err(ApiError::from)?;
        let (tx, rx) = mpsc::channel(64);
        tokio::spawn(async move {
            let mut last = first.last().map_or(f.after_id, |e| e.id);
            for e in &first {
                if tx.send(Ok(convert::audit(e))).await.is_err() {
                    return;
                }
            }
            // Wake on local changes, and poll for other replicas' entries.
            loop {
                tokio::select! {
                    r = watch.changed() => if r.is_err() { return },
                    () = tokio::time::sleep(std::time::Duration::from_secs(1)) => {}
                }
                let Ok(more) = store.audit_after(last, 500).await else { return };
                for e in more {
                    last = e.id;
                    if matches(&f, &e) && tx.send(Ok(convert::audit(&e))).await.is_err() {
                        return;
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn get_ca(&self, req: Request<pb::Empty>) -> R<pb::CaInfo> {
        self.authorize(&req).await?;
        Ok(Response::new(super::ca::info(self.authority()?)))
    }

    async fn rotate_ca(&self, req: Request<pb::RotateCaRequest>) -> R<pb::CaInfo> {
        let actor = self.authorize(&req).await?;
        Ok(Response::new(self.rotate_ca_step(&actor, req.get_ref()).await?))
    }
}

fn policy_problems(problems: &[policy::Problem]) -> Vec<pb::PolicyProblem> {
    problems.iter().map(|p| pb::PolicyProblem { line: p.line, message: p.kind.to_string() }).collect()
}
