//! Starting a control server: store, engine, TLS, the gRPC listener (with
//! server reflection), the local admin socket and the metrics endpoint.
//! Used by `mesh-control serve`, the tests and the push benchmark.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use mesh_local::secret_file::SecretFileError;

use mesh_proto::v1::admin_service_server::AdminServiceServer;
use mesh_proto::v1::agent_service_server::AgentServiceServer;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::transport::{Identity, Server, ServerTlsConfig};

use crate::config::Config;
use crate::engine::{Clock, Engine, SystemClock};
use crate::server::{admin::AdminApi, agent::AgentApi};
use crate::store::Store;
use crate::tls;

/// A start-up failure.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// Store.
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    /// TLS material.
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    /// Sockets and files.
    #[error("{0}: {1}")]
    Io(String, std::io::Error),
    /// The local admin socket.
    #[error("admin socket: {0}")]
    AdminSocket(#[from] mesh_local::socket::BindError),
    /// gRPC transport.
    #[error("transport: {0}")]
    Transport(#[from] tonic::transport::Error),
    /// Reflection service.
    #[error("reflection: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
}

/// A running control server.
#[derive(Debug)]
pub struct Running {
    /// The engine (views, store, metrics).
    pub engine: Arc<Engine>,
    /// Where gRPC listens.
    pub addr: SocketAddr,
    /// Where `/metrics` listens.
    pub metrics_addr: Option<SocketAddr>,
    /// Control's CA certificate (PEM).
    pub ca_pem: String,
    /// Its SHA-256 pin.
    pub ca_pin: [u8; 32],
    /// The admin token created at first start (None if tokens existed).
    pub bootstrap_admin_token: Option<String>,
    tasks: Vec<JoinHandle<()>>,
}

impl Running {
    /// Stops every task of this server.
    pub fn shutdown(&self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Creates an admin API token, returning its text (shown once).
pub async fn create_admin_token(
    store: &Store,
    description: &str,
    actor: &str,
) -> Result<String, crate::store::StoreError> {
    let (id, token, hash) = crate::auth::new_admin_token();
    // Outside any engine: the token's creation is stamped by the wall clock.
    store.add_api_token(&id, &hash, description, actor, SystemClock.now()).await?;
    Ok(token)
}

/// Writes the bootstrap admin token to `<data_dir>/admin-token` (0600,
/// replacing any older file atomically) and returns that path. Used with
/// every store: the token is never written to a log or a terminal, where it
/// would outlive the first start in scrollback and log collectors.
pub fn write_bootstrap_token(config: &Config, token: &str) -> Result<PathBuf, SecretFileError> {
    let path = config.data_dir.join("admin-token");
    mesh_local::secret_file::write(&path, format!("{token}\n").as_bytes())?;
    Ok(path)
}

/// Starts everything `config` asks for.
pub async fn start(config: &Config) -> Result<Running, StartError> {
    start_with_clock(config, Arc::new(SystemClock)).await
}

/// [`start`], with the engine reading the time from `clock` (tests move a
/// [`crate::engine::ManualClock`] instead of sleeping).
pub async fn start_with_clock(config: &Config, clock: Arc<dyn Clock>) -> Result<Running, StartError> {
    if config.database_url.is_none() {
        std::fs::create_dir_all(&config.data_dir)
            .map_err(|e| StartError::Io(config.data_dir.display().to_string(), e))?;
    }
    let store = Store::open(&config.store_url()).await?;
    let bootstrap_admin_token = if store.api_token_count().await? == 0 {
        Some(create_admin_token(&store, "bootstrap", "control").await?)
    } else {
        None
    };
    let engine = Engine::new(store.clone(), crate::engine::EngineConfig { clock, ..config.engine() }).await?;
    let server_tls = tls::server_tls(&store, &config.tls_names).await?;
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(mesh_proto::v1::FILE_DESCRIPTOR_SET)
            .build_v1()
    };
    let mut tasks = Vec::new();

    let listener = TcpListener::bind(config.listen).await.map_err(|e| StartError::Io(config.listen.to_string(), e))?;
    let addr = listener.local_addr().map_err(|e| StartError::Io("local_addr".into(), e))?;
    let mut builder = Server::builder().http2_keepalive_interval(Some(std::time::Duration::from_secs(30)));
    if config.tls {
        builder = builder.tls_config(
            ServerTlsConfig::new().identity(Identity::from_pem(&server_tls.chain_pem, &server_tls.key_pem)),
        )?;
    }
    let router = builder
        .add_service(reflection()?)
        .add_service(AgentServiceServer::new(AgentApi::new(engine.clone())))
        .add_service(AdminServiceServer::new(AdminApi::new(engine.clone(), server_tls.ca_pin, false)));
    tasks.push(tokio::spawn(async move {
        if let Err(e) = router.serve_with_incoming(TcpListenerStream::new(listener)).await {
            tracing::error!(error = %e, "gRPC server stopped");
        }
    }));

    if let Some(path) = &config.admin_socket {
        // No token on this socket: 0600 from the start and a peer-uid check
        // (root or our uid) are what keep other local users out.
        let unix = mesh_local::socket::bind_private(path)?;
        let local = Server::builder().add_service(reflection()?).add_service(AdminServiceServer::new(AdminApi::new(
            engine.clone(),
            server_tls.ca_pin,
            true,
        )));
        tasks.push(tokio::spawn(async move {
            if let Err(e) = local.serve_with_incoming(unix.into_stream()).await {
                tracing::error!(error = %e, "admin socket stopped");
            }
        }));
    }

    let metrics_addr = match config.metrics_listen {
        Some(a) => {
            let l = TcpListener::bind(a).await.map_err(|e| StartError::Io(a.to_string(), e))?;
            let bound = l.local_addr().ok();
            tasks.push(tokio::spawn(crate::metrics::serve(l, engine.clone())));
            bound
        }
        None => None,
    };
    tasks.push(tokio::spawn(engine.clone().run_background()));
    tracing::info!(%addr, store = store.backend(), tls = config.tls, ca_pin = %hex::encode(server_tls.ca_pin), "mesh-control running");
    Ok(Running {
        engine,
        addr,
        metrics_addr,
        ca_pem: server_tls.ca_pem,
        ca_pin: server_tls.ca_pin,
        bootstrap_admin_token,
        tasks,
    })
}
