//! The gRPC services: [`agent`] (Enroll, Renew, Sync, RelayTicket) and [`admin`]
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

/// The most endpoints a node may advertise (every peer receives them):
/// configured and discovered `ip:port` candidates and its home relay.
pub const MAX_ENDPOINTS: usize = 16;

/// Checks the endpoints a node advertises before control stores them and
/// pushes them to every peer: at most [`MAX_ENDPOINTS`], each `ip:port` (a
/// unicast address and a port) or `relay:<region>` (capability 7; at most
/// one, its home relay; see [`crate::relay::valid_region`]). The error
/// names the bad entry.
pub(crate) fn endpoints(list: &[String]) -> Result<Vec<String>, ApiError> {
    if list.len() > MAX_ENDPOINTS {
        return Err(ApiError::InvalidArgument(format!("{} endpoints advertised; at most {MAX_ENDPOINTS}", list.len())));
    }
    let mut relay = None;
    list.iter()
        .map(|e| {
            if let Some(region) = e.strip_prefix(crate::relay::ENDPOINT_PREFIX) {
                if !crate::relay::valid_region(region) {
                    return Err(ApiError::InvalidArgument(format!(
                        "endpoint {e:?}: a relay region is 1-32 characters of a-z, 0-9 and -"
                    )));
                }
                if let Some(first) = relay.replace(e) {
                    return Err(ApiError::InvalidArgument(format!(
                        "endpoint {e:?}: only one home relay (already {first:?})"
                    )));
                }
                return Ok(e.clone());
            }
            let a: std::net::SocketAddr = e
                .parse()
                .map_err(|_| ApiError::InvalidArgument(format!("endpoint {e:?} is not IP:port or relay:<region>")))?;
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

    fn list(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn endpoints_may_name_one_home_relay() {
        let ok = endpoints(&list(&["192.0.2.1:51820", "relay:fsn", "[2001:db8::1]:51820"])).unwrap();
        assert_eq!(ok, ["192.0.2.1:51820", "relay:fsn", "[2001:db8::1]:51820"]);
        assert!(endpoints(&[]).unwrap().is_empty());
        let sixteen: Vec<String> = (0..16).map(|i| format!("192.0.2.{i}:51820")).collect();
        assert_eq!(endpoints(&sixteen).unwrap().len(), 16);
        let err = |v: &[String]| match endpoints(v) {
            Err(ApiError::InvalidArgument(m)) => m,
            other => panic!("{other:?}"),
        };
        let mut seventeen = sixteen.clone();
        seventeen.push("relay:fsn".into());
        assert!(err(&seventeen).contains("at most 16"));
        for (bad, want) in [
            ("relay:", "endpoint \"relay:\": a relay region"),
            ("relay:FSN", "endpoint \"relay:FSN\""),
            ("relay:fsn_1", "endpoint \"relay:fsn_1\""),
            ("relay:fsn.example", "endpoint \"relay:fsn.example\""),
            ("fsn", "endpoint \"fsn\" is not IP:port or relay:<region>"),
            ("gw.example:51820", "not IP:port"),
            ("0.0.0.0:51820", "not a unicast"),
        ] {
            let m = err(&list(&["192.0.2.1:51820", bad]));
            assert!(m.contains(want), "{bad}: {m}");
        }
        let m = err(&list(&["relay:fsn", "192.0.2.1:51820", "relay:nbg"]));
        assert!(m.contains("endpoint \"relay:nbg\": only one home relay (already \"relay:fsn\")"), "{m}");
    }

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
