//! The credential on every call: `authorization: Bearer <token>` (a node
//! credential for AgentService, an admin token for AdminService).

use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::{Request, Status};

use crate::channel::Channel;

/// Adds `authorization: Bearer <token>` to every call; `None` sends no
/// credential (control's local admin socket needs none).
#[derive(Clone, Debug)]
pub struct Bearer(pub Option<String>);

impl Interceptor for Bearer {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        if let Some(t) = &self.0 {
            let v = format!("Bearer {t}").parse().map_err(|_| Status::invalid_argument("bad token"))?;
            req.metadata_mut().insert("authorization", v);
        }
        Ok(req)
    }
}

/// A channel that sends a credential with every call, for generated clients
/// (`AgentServiceClient<Authed>`).
pub type Authed = InterceptedService<Channel, Bearer>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adds_the_header_only_with_a_token() {
        let req = Bearer(Some("mnc1.x".into())).call(Request::new(())).unwrap();
        assert_eq!(req.metadata().get("authorization").unwrap(), "Bearer mnc1.x");
        let req = Bearer(None).call(Request::new(())).unwrap();
        assert!(req.metadata().get("authorization").is_none());
        assert!(Bearer(Some("bad\ntoken".into())).call(Request::new(())).is_err());
    }
}
