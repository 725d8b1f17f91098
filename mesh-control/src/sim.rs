//! A simulated agent: the client side of enrollment and the Sync stream,
//! in-process. The tests and the push benchmark drive control with it, and
//! it documents what a real agent does.

use std::time::Duration;

use mesh_client::bearer::{Authed, Bearer};
use mesh_client::channel::{self, Channel, Trust};
use mesh_client::enrollment::EnrollmentKeyText;
use mesh_client::view;
use mesh_proto::v1 as pb;
use mesh_proto::v1::agent_service_client::AgentServiceClient;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Status, Streaming};

/// An agent client with a credential.
pub type AgentClient = AgentServiceClient<Authed>;

/// An enrolled simulated agent.
#[derive(Debug, Clone)]
pub struct SimAgent {
    /// The node as control returned it at enrollment.
    pub node: pb::Node,
    /// The credential.
    pub token: String,
    /// The channel to control.
    pub channel: Channel,
}

/// A simulated-agent failure.
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    /// Could not connect.
    #[error(transparent)]
    Connect(#[from] channel::ConnectError),
    /// Control said no.
    #[error("{0}")]
    Status(#[from] Status),
    /// Bad input.
    #[error("{0}")]
    Bad(String),
}

/// A fresh random 32-byte "public key" (the simulator does no crypto).
#[must_use]
pub fn fake_public_key() -> Vec<u8> {
    use rand::RngCore as _;
    let mut k = vec![0; 32];
    rand::rng().fill_bytes(&mut k);
    k
}

impl SimAgent {
    /// Connects to `addr` trusting the CA pinned in `key` and enrolls.
    pub async fn enroll(addr: &str, key: &str, hostname: &str, routes: &[&str]) -> Result<Self, SimError> {
        let parsed = EnrollmentKeyText::parse(key).ok_or_else(|| SimError::Bad("not an enrollment key".into()))?;
        let pin = parsed.ca_pin.ok_or_else(|| SimError::Bad("the key carries no CA pin".into()))?;
        let ch = channel::connect(addr, &Trust::Pin(pin)).await?;
        Self::enroll_on(ch, key, hostname, routes).await
    }

    /// Enrolls over an existing channel.
    pub async fn enroll_on(channel: Channel, key: &str, hostname: &str, routes: &[&str]) -> Result<Self, SimError> {
        let mut c = AgentServiceClient::new(channel.clone());
        let resp = c
            .enroll(pb::EnrollRequest {
                capabilities: Some(mesh_proto::capabilities("mesh-sim-agent")),
                enrollment_key: key.to_owned(),
                wireguard_public_key: fake_public_key(),
                hostname: hostname.to_owned(),
                advertised_routes: routes.iter().map(|r| (*r).to_owned()).collect(),
                endpoints: vec!["192.0.2.10:51820".into()],
                previous_credential: String::new(),
            })
            .await?
            .into_inner();
        let node = resp.node.ok_or_else(|| SimError::Bad("no node in response".into()))?;
        let token = resp.credential.ok_or_else(|| SimError::Bad("no credential".into()))?.token;
        Ok(Self { node, token, channel })
    }

    /// A client that sends this agent's credential.
    #[must_use]
    pub fn client(&self) -> AgentClient {
        AgentServiceClient::with_interceptor(self.channel.clone(), Bearer(Some(self.token.clone())))
    }

    /// Opens the Sync stream claiming to be `node_id` (0: say nothing).
    pub async fn sync_as(&self, node_id: u64) -> Result<SyncSession, SimError> {
        self.sync_with(node_id, mesh_proto::capabilities("mesh-sim-agent")).await
    }

    /// Opens the Sync stream reporting data path `limits` in the hello.
    pub async fn sync_with_limits(&self, limits: pb::DataplaneLimits) -> Result<SyncSession, SimError> {
        let caps = pb::Capabilities { limits: Some(limits), ..mesh_proto::capabilities("mesh-sim-agent") };
        self.sync_with(self.node.id, caps).await
    }

    /// Opens the Sync stream as an agent of capability `version` (an older
    /// agent than this build).
    pub async fn sync_as_version(&self, version: u32) -> Result<SyncSession, SimError> {
        let caps = pb::Capabilities { capability_version: version, ..mesh_proto::capabilities("mesh-sim-agent") };
        self.sync_with(self.node.id, caps).await
    }

    async fn sync_with(&self, node_id: u64, capabilities: pb::Capabilities) -> Result<SyncSession, SimError> {
        let (tx, rx) = mpsc::channel(16);
        tx.send(pb::SyncRequest {
            msg: Some(pb::sync_request::Msg::Hello(pb::SyncHello {
                capabilities: Some(capabilities),
                last_generation: 0,
                endpoints: Vec::new(),
                node_id,
            })),
        })
        .await
        .map_err(|_| SimError::Bad("channel closed".into()))?;
        let stream = self.client().sync(ReceiverStream::new(rx)).await?.into_inner();
        Ok(SyncSession { tx, stream, view: None, received: Vec::new(), trusted_cas: Vec::new() })
    }

    /// Opens the Sync stream.
    pub async fn sync(&self) -> Result<SyncSession, SimError> {
        self.sync_as(self.node.id).await
    }
}

/// An open Sync stream and the view it has built.
#[derive(Debug)]
pub struct SyncSession {
    tx: mpsc::Sender<pb::SyncRequest>,
    stream: Streaming<pb::SyncResponse>,
    /// The view so far (snapshot plus deltas).
    pub view: Option<pb::NodeView>,
    /// What each message was: `true` for snapshots, `false` for deltas.
    pub received: Vec<bool>,
    /// The CA certificates control last said to trust (capability 4).
    pub trusted_cas: Vec<String>,
}

impl SyncSession {
    /// Waits up to `timeout` for the next message, applies it and returns
    /// the new generation; `Ok(None)` on timeout. Trusted-CA messages on
    /// the way are recorded in [`SyncSession::trusted_cas`].
    pub async fn next(&mut self, timeout: Duration) -> Result<Option<u64>, SimError> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let msg = match tokio::time::timeout_at(deadline, self.stream.message()).await {
                Err(_) => return Ok(None),
                Ok(r) => r?.ok_or_else(|| SimError::Bad("stream ended".into()))?,
            };
            if let Some(pb::sync_response::Msg::TrustedCas(t)) = msg.msg {
                self.trusted_cas = t.certificates_pem;
                continue;
            }
            return self.take(msg);
        }
    }

    fn take(&mut self, msg: pb::SyncResponse) -> Result<Option<u64>, SimError> {
        match msg.msg {
            Some(pb::sync_response::Msg::Snapshot(v)) => {
                self.received.push(true);
                let g = v.generation;
                self.view = Some(v);
                Ok(Some(g))
            }
            Some(pb::sync_response::Msg::Delta(d)) => {
                self.received.push(false);
                let view = self.view.as_mut().ok_or_else(|| SimError::Bad("delta before snapshot".into()))?;
                view::apply(view, &d).map_err(|e| SimError::Bad(e.to_string()))?;
                Ok(Some(d.generation))
            }
            Some(pb::sync_response::Msg::TrustedCas(_)) | None => Err(SimError::Bad("empty message".into())),
        }
    }

    /// Acknowledges a generation.
    pub async fn ack(&self, generation: u64) -> Result<(), SimError> {
        self.send(pb::sync_request::Msg::Ack(pb::Ack { generation, error: String::new() })).await
    }

    /// Answers a generation with an error: the agent could not apply it.
    pub async fn nack(&self, generation: u64, error: &str) -> Result<(), SimError> {
        self.send(pb::sync_request::Msg::Ack(pb::Ack { generation, error: error.to_owned() })).await
    }

    /// Sends a health report.
    pub async fn health(&self, report: pb::HealthReport) -> Result<(), SimError> {
        self.send(pb::sync_request::Msg::Health(report)).await
    }

    /// Replaces the advertised routes.
    pub async fn advertise(&self, prefixes: &[&str]) -> Result<(), SimError> {
        let prefixes = prefixes.iter().map(|p| (*p).to_owned()).collect();
        self.send(pb::sync_request::Msg::Routes(pb::RouteAdvertisement { prefixes, options: Vec::new() })).await
    }

    /// Replaces the advertised routes, with options.
    pub async fn advertise_with(&self, advertisement: pb::RouteAdvertisement) -> Result<(), SimError> {
        self.send(pb::sync_request::Msg::Routes(advertisement)).await
    }

    /// Replaces the node's endpoints with `endpoints` (capability 7).
    pub async fn candidates(&self, endpoints: &[&str]) -> Result<(), SimError> {
        let endpoints = endpoints.iter().map(|e| (*e).to_owned()).collect();
        self.send(pb::sync_request::Msg::Candidates(pb::EndpointCandidates { endpoints })).await
    }

    /// Reports a local failover.
    pub async fn failover(&self, report: pb::FailoverReport) -> Result<(), SimError> {
        self.send(pb::sync_request::Msg::Failover(report)).await
    }

    async fn send(&self, msg: pb::sync_request::Msg) -> Result<(), SimError> {
        self.tx.send(pb::SyncRequest { msg: Some(msg) }).await.map_err(|_| SimError::Bad("stream closed".into()))
    }
}

/// A plain HTTP/1.1 GET (a metrics scrape, as a test sees it): the whole
/// response, status line and headers included.
///
/// # Panics
/// On a connection or I/O error.
pub async fn http_get(addr: std::net::SocketAddr, path: &str) -> String {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .expect("write");
    let mut out = String::new();
    s.read_to_string(&mut out).await.expect("read");
    out
}

/// The default limits, but with enrollment from one address as fast as
/// many simulated agents on loopback need it.
#[must_use]
pub fn loopback_limits() -> crate::limits::LimitsConfig {
    let many = crate::limits::Rate { per_second: 100_000, burst: 100_000 };
    crate::limits::LimitsConfig {
        enroll_per_source: many,
        enroll_per_key: many,
        enroll_concurrency: 4,
        ..crate::limits::LimitsConfig::default()
    }
}

/// A control configuration for in-process tests: gRPC and metrics on
/// loopback ports the kernel picks, the admin socket and data in `dir`.
#[must_use]
pub fn loopback_config(dir: &std::path::Path) -> crate::config::Config {
    crate::config::Config {
        listen: std::net::SocketAddr::from(([127, 0, 0, 1], 0)),
        data_dir: dir.to_owned(),
        metrics_listen: Some(std::net::SocketAddr::from(([127, 0, 0, 1], 0))),
        admin_socket: Some(dir.join("admin.sock")),
        poll_interval_ms: 100,
        // Every simulated agent enrolls from loopback.
        limits: loopback_limits(),
        ..crate::config::Config::default()
    }
}
