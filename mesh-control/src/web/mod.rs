//! The live topology page (opt-in: `web_listen`): sites, gateways, the
//! links between them with their probe figures, routes, the audit log and
//! keys near expiry, refreshed in the browser every 400 ms.
//!
//! Read-only, behind an admin token: the login form takes the token, checked
//! exactly as `AdminService` checks its bearer token, and answers with a
//! session cookie ([`session`]); `/api/snapshot` also takes `Authorization:
//! Bearer` for scripts. The data comes from the calls the `AdminService`
//! handlers make ([`Web::inputs`]), shaped by a pure function
//! ([`snapshot::build`]); [`http`] is the I/O. Plain HTTP: bind it to
//! localhost or an admin network.

mod http;
pub mod page;
pub mod session;
pub mod snapshot;

pub use http::serve;

use crate::engine::convert;
use crate::server::{ApiError, admin::AdminApi};
use crate::store::AuditFilter;

/// What the page's handlers share.
#[derive(Debug)]
pub struct Web {
    api: AdminApi,
    sessions: session::Sessions,
}

impl Web {
    /// The page over `api` (an [`AdminApi`] that is not the trusted local
    /// socket's: every request needs a token).
    #[must_use]
    pub fn new(api: AdminApi) -> Self {
        Self { api, sessions: session::Sessions::default() }
    }

    fn now(&self) -> i64 {
        self.api.engine().now()
    }

    /// The snapshot's inputs, from the same calls as `ListNodes`,
    /// `ListRoutes`, `GetStatus` and `ListAudit`.
    pub async fn inputs(&self) -> Result<snapshot::Inputs, ApiError> {
        let engine = self.api.engine();
        let filter = AuditFilter { limit: snapshot::AUDIT_ENTRIES, ..AuditFilter::default() };
        let audit = engine.store().audit(&filter).await?;
        Ok(snapshot::Inputs {
            now: engine.now(),
            nodes: engine.snapshot().nodes.iter().map(|n| self.api.node_msg(n)).collect(),
            routes: self.api.routes(),
            peers: self.api.peer_links(),
            audit: audit.iter().map(convert::audit).collect(),
        })
    }

    /// Whether `token` is a valid admin token; its hash if so.
    async fn check_token(&self, token: &str) -> Option<String> {
        let hash = crate::auth::sha256_hex(token.as_bytes());
        self.api.authorize_token_hash(&hash).await.ok().map(|_| hash)
    }

    /// Whether session `id` is live and its token still valid (a revoked
    /// or expired token ends the session here).
    async fn check_session(&self, id: &str) -> bool {
        let Some(hash) = self.sessions.token_hash(id, self.now()) else { return false };
        if self.api.authorize_token_hash(&hash).await.is_ok() {
            return true;
        }
        self.sessions.close(id);
        false
    }
}
