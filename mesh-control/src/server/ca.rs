//! The CA part of `AdminService`: showing the trusted CA certificates and
//! the audited rotation steps (see [`crate::tls::ca`]).

use mesh_proto::v1 as pb;

use super::ApiError;
use super::admin::AdminApi;
use crate::tls::{Authority, Step, TlsError, ca::CaError};

impl From<TlsError> for ApiError {
    fn from(e: TlsError) -> Self {
        match e {
            TlsError::Ca(CaError::Phase(why)) => Self::FailedPrecondition(why),
            TlsError::Store(e) => e.into(),
            other => Self::Internal(other.to_string()),
        }
    }
}

/// The API form of the authority's state.
pub(super) fn info(a: &Authority) -> pb::CaInfo {
    let (trusted, phase) = a.trusted();
    pb::CaInfo {
        certificates: trusted
            .into_iter()
            .map(|t| pb::CaCertificate { role: t.role.into(), pem: t.pem, pin: hex::encode(t.pin) })
            .collect(),
        phase: phase.name().into(),
    }
}

/// What the audit log records of a CA state: the phase and the pins (never
/// a key).
fn audit_json(i: &pb::CaInfo) -> String {
    let pins: Vec<_> = i.certificates.iter().map(|c| serde_json::json!({ "role": c.role, "pin": c.pin })).collect();
    serde_json::json!({ "phase": i.phase, "certificates": pins }).to_string()
}

impl AdminApi {
    pub(super) fn authority(&self) -> Result<&Authority, ApiError> {
        self.ca.as_deref().ok_or_else(|| ApiError::FailedPrecondition("this server has no CA".into()))
    }

    /// One rotation step by `actor`, audited as `ca.rotate.<step>`.
    pub(super) async fn rotate_ca_step(&self, actor: &str, req: &pb::RotateCaRequest) -> Result<pb::CaInfo, ApiError> {
        use pb::rotate_ca_request::Step as S;
        let (step, action) = match S::try_from(req.step) {
            Ok(S::Begin) => (Step::Begin, "ca.rotate.begin"),
            Ok(S::Switch) => (Step::Switch, "ca.rotate.switch"),
            Ok(S::Retire) => (Step::Retire, "ca.rotate.retire"),
            Ok(S::Unspecified) | Err(_) => return Err(ApiError::InvalidArgument("no such rotation step".into())),
        };
        let a = self.authority()?;
        let before = info(a);
        // Certificates are checked against the wall clock, not the engine's.
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
        a.rotate(step, now)?;
        let after = info(a);
        let engine = self.engine();
        engine.store().record_event(actor, action, "ca", audit_json(&before), audit_json(&after), engine.now()).await?;
        engine.audit_changed();
        Ok(after)
    }
}
