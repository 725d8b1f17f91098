//! The gRPC services: [`agent`] (Enroll, Renew, Sync) and [`admin`]
//! (orchestration), with one error type that maps to the right gRPC code.
//!
//! Auth: `authorization: Bearer <token>` metadata. Unknown or expired
//! credentials get UNAUTHENTICATED with no detail; a valid caller asking for
//! what is not theirs gets PERMISSION_DENIED.

pub mod admin;
pub mod agent;
mod ca;

use tonic::Status;

use crate::engine::ops::OpError;
use crate::store::StoreError;

/// A service error; converts to the matching [`Status`].
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// No, unknown or expired credentials (no detail leaves the server).
    #[error("unauthenticated")]
    Unauthenticated,
    /// Authenticated, but not allowed.
    #[error("{0}")]
    PermissionDenied(String),
    /// No such object.
    #[error("{0}")]
    NotFound(String),
    /// A malformed request.
    #[error("{0}")]
    InvalidArgument(String),
    /// Not possible in the current state.
    #[error("{0}")]
    FailedPrecondition(String),
    /// Over a limit of [`crate::limits`]; the client should retry later.
    #[error(transparent)]
    Limited(#[from] crate::limits::Limited),
    /// The store (database) is unreachable: nothing was changed.
    #[error("the store is unreachable")]
    Unavailable(String),
    /// Our fault.
    #[error("internal error")]
    Internal(String),
}

impl From<OpError> for ApiError {
    fn from(e: OpError) -> Self {
        match e {
            OpError::Store(e) => e.into(),
            OpError::Invalid(why) => Self::InvalidArgument(why),
            e @ OpError::Policy(_) => Self::InvalidArgument(e.to_string()),
            OpError::Refused(why) => Self::FailedPrecondition(why),
        }
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::NotFound(what) => Self::NotFound(format!("{what} not found")),
            StoreError::Conflict(why) => Self::FailedPrecondition(why),
            other if other.is_unreachable() => Self::Unavailable(other.to_string()),
            other => Self::Internal(other.to_string()),
        }
    }
}

impl From<ApiError> for Status {
    fn from(e: ApiError) -> Self {
        match e {
            ApiError::Unauthenticated => Self::unauthenticated("unauthenticated"),
            ApiError::PermissionDenied(m) => Self::permission_denied(m),
            ApiError::NotFound(m) => Self::not_found(m),
            ApiError::InvalidArgument(m) => Self::invalid_argument(m),
            ApiError::FailedPrecondition(m) => Self::failed_precondition(m),
            ApiError::Limited(l) => Self::resource_exhausted(l.to_string()),
            ApiError::Unavailable(m) => {
                tracing::error!(error = %m, "the store is unreachable");
                Self::unavailable(
                    "control's database is unreachable: nothing was changed; agents keep their last views; retry later",
                )
            }
            ApiError::Internal(m) => {
                tracing::error!(error = %m, "internal error");
                Self::internal("internal error")
            }
        }
    }
}

/// The bearer token of a request, if any.
pub(crate) fn bearer<T>(req: &tonic::Request<T>) -> Option<String> {
    let v = req.metadata().get("authorization")?.to_str().ok()?;
    v.strip_prefix("Bearer ").map(|t| t.trim().to_owned())
}

/// The most UDP endpoints a node may advertise: every peer receives them.
pub const MAX_ENDPOINTS: usize = 8;

/// Checks the WireGuard endpoints a node advertises (`ip:port`, at most
/// [`MAX_ENDPOINTS`], a unicast address and a port) before control stores
/// them and pushes them to every peer.
pub(crate) fn endpoints(list: &[String]) -> Result<Vec<String>, ApiError> {
    if list.len() > MAX_ENDPOINTS {
        return Err(ApiError::InvalidArgument(format!("{} endpoints advertised; at most {MAX_ENDPOINTS}", list.len())));
    }
    list.iter()
        .map(|e| {
            let a: std::net::SocketAddr =
                e.parse().map_err(|_| ApiError::InvalidArgument(format!("endpoint {e:?} is not IP:port")))?;
            if a.port() == 0 || a.ip().is_unspecified() || a.ip().is_multicast() {
                return Err(ApiError::InvalidArgument(format!("endpoint {a} is not a unicast address and port")));
            }
            Ok(a.to_string())
        })
        .collect()
}

/// Parses a CIDR from a request.
pub(crate) fn cidr(s: &str) -> Result<ipnet::IpNet, ApiError> {
    crate::policy::model::parse_cidr(s).ok_or_else(|| ApiError::InvalidArgument(format!("bad CIDR {s:?}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unreachable_store_is_unavailable_with_a_clear_message() {
        for e in [sqlx::Error::PoolTimedOut, sqlx::Error::Io(std::io::ErrorKind::ConnectionRefused.into())] {
            let status = Status::from(ApiError::from(StoreError::Db(e)));
            assert_eq!(status.code(), tonic::Code::Unavailable);
            assert!(status.message().contains("database is unreachable: nothing was changed"), "{}", status.message());
        }
        let other = Status::from(ApiError::from(StoreError::Corrupt("x".into())));
        assert_eq!(other.code(), tonic::Code::Internal);
    }
}
