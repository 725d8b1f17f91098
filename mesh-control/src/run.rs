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
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::transport::Server;

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
    /// The relay ticket key.
    #[error(transparent)]
    RelayKey(#[from] crate::relay::key::KeyError),
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
    /// Where the topology page listens.
    pub web_addr: Option<SocketAddr>,
    /// Control's CA certificate at start (PEM).
    pub ca_pem: String,
    /// Its SHA-256 pin.
    pub ca_pin: [u8; 32],
    /// The CA: its files, rotation, the served certificate.
    pub authority: Arc<tls::Authority>,
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

/// Creates an admin API token valid for `lifetime_secs`, returning its
/// text (shown once).
pub async fn create_admin_token(
    store: &Store,
    description: &str,
    lifetime_secs: i64,
    actor: &str,
) -> Result<String, crate::store::StoreError> {
    let (id, token, hash) = crate::auth::new_admin_token();
    // Outside any engine: the token's creation is stamped by the wall clock.
    let now = SystemClock.now();
    let expires = now.saturating_add(lifetime_secs);
    store.add_api_token(&id, &hash, description, expires, actor, now).await?;
    Ok(token)
}

/// Unix seconds by the wall clock (certificates are checked against it).
fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// Accepted TCP connections after their TLS handshake. Each handshake runs
/// on its own task (with a deadline), so a slow or silent client holds up
/// no one else; failed handshakes are dropped, never handed to the server.
/// The returned task owns the listener: aborting it closes the port.
fn tls_incoming(
    listener: TcpListener,
    config: Arc<rustls::ServerConfig>,
) -> (ReceiverStream<Result<tokio_rustls::server::TlsStream<tokio::net::TcpStream>, std::io::Error>>, JoinHandle<()>) {
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    let task = tokio::spawn(async move {
        loop {
            let (tcp, peer) = match listener.accept().await {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            };
            let (acceptor, conn_tx) = (acceptor.clone(), tx.clone());
            tokio::spawn(async move {
                let _ = tcp.set_nodelay(true);
                match tokio::time::timeout(std::time::Duration::from_secs(10), acceptor.accept(tcp)).await {
                    Ok(Ok(tls)) => {
                        let _ = conn_tx.send(Ok(tls)).await;
                    }
                    Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                    Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                }
            });
            if tx.is_closed() {
                break;
            }
        }
    });
    (ReceiverStream::new(rx), task)
}

/// Every 10 s: CA files another replica's operator copied here, and the
/// server certificate's renewal at half its life.
async fn refresh_ca(authority: Arc<tls::Authority>) {
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(10));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if let Err(e) = authority.refresh(unix_now()) {
            tracing::error!(error = %e, "CA refresh failed; serving the CA in memory");
        }
    }
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

/// The configured relays and the ticket key (see [`crate::relay::key`]).
/// Without relays, a replica that lacks the key file another replica
/// created still starts (an upgraded pair of replicas must not stop over a
/// key not in use yet), and says what to copy before relays are added.
async fn relays(config: &Config, store: &Store) -> Result<crate::relay::Relays, StartError> {
    use crate::relay::{Relays, key};
    let list = crate::relay::to_proto(&config.relays);
    match key::open(store, &config.data_dir).await {
        Ok(signer) => {
            let public = signer.public_key();
            Ok(Relays::new(list, Some(signer), Some(public)))
        }
        Err(e) if config.relays.is_empty() && !matches!(e, key::KeyError::Store(_)) => {
            tracing::warn!(error = %e, "no relay ticket key on this replica: fix this before configuring relays");
            let public = store.meta_get(key::META).await?.and_then(|b| mesh_relay::ticket::key_from_b64(&b).ok());
            Ok(Relays::new(list, None, public))
        }
        Err(e) => Err(e.into()),
    }
}

/// Starts everything `config` asks for.
pub async fn start(config: &Config) -> Result<Running, StartError> {
    start_with_clock(config, Arc::new(SystemClock)).await
}

/// [`start`], with the engine reading the time from `clock` (tests move a
/// [`crate::engine::ManualClock`] instead of sleeping).
pub async fn start_with_clock(config: &Config, clock: Arc<dyn Clock>) -> Result<Running, StartError> {
    // Always: PostgreSQL replicas keep their CA files here too.
    tls::files::prepare_dir(&config.data_dir)?;
    let store = Store::open(&config.store_url()).await?;
    let bootstrap_admin_token = if store.api_token_count().await? == 0 {
        Some(create_admin_token(&store, "bootstrap", crate::auth::ADMIN_TOKEN_LIFETIME_SECS, "control").await?)
    } else {
        None
    };
    let engine = Engine::new(store.clone(), crate::engine::EngineConfig { clock, ..config.engine() }).await?;
    let authority = tls::Authority::open(&store, &config.data_dir, &config.tls_names, unix_now()).await?;
    let ca_pin = authority.signing_pin();
    let relays = Arc::new(relays(config, &store).await?);
    // Both reflection versions: grpcurl and current tools ask v1, Python's
    // grpcio-reflection and older tools v1alpha.
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(mesh_proto::v1::FILE_DESCRIPTOR_SET)
            .build_v1()
    };
    let reflection_v1alpha = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(mesh_proto::v1::FILE_DESCRIPTOR_SET)
            .build_v1alpha()
    };
    let mut tasks = Vec::new();

    let listener = TcpListener::bind(config.listen).await.map_err(|e| StartError::Io(config.listen.to_string(), e))?;
    let addr = listener.local_addr().map_err(|e| StartError::Io("local_addr".into(), e))?;
    let router = Server::builder()
        .http2_keepalive_interval(Some(std::time::Duration::from_secs(30)))
        .add_service(reflection()?)
        .add_service(reflection_v1alpha()?)
        .add_service(AgentServiceServer::new(
            AgentApi::new(engine.clone()).with_ca(authority.watch()).with_relays(relays.clone()),
        ))
        .add_service(AdminServiceServer::new(
            AdminApi::new(engine.clone(), ca_pin, false)
                .with_authority(authority.clone())
                .with_relay_ticket_key(relays.public_key_b64()),
        ));
    if config.tls {
        let (incoming, accept) = tls_incoming(listener, authority.server_config()?);
        tasks.push(accept);
        tasks.push(tokio::spawn(async move {
            if let Err(e) = router.serve_with_incoming(incoming).await {
                tracing::error!(error = %e, "gRPC server stopped");
            }
        }));
    } else {
        tasks.push(tokio::spawn(async move {
            if let Err(e) = router.serve_with_incoming(TcpListenerStream::new(listener)).await {
                tracing::error!(error = %e, "gRPC server stopped");
            }
        }));
    }
    tasks.push(tokio::spawn(refresh_ca(authority.clone())));

    if let Some(path) = &config.admin_socket {
        // No token on this socket: 0600 from the start and a peer-uid check
        // (root or our uid) are what keep other local users out.
        let unix = mesh_local::socket::bind_private(path)?;
        let local = Server::builder().add_service(reflection()?).add_service(reflection_v1alpha()?).add_service(
            AdminServiceServer::new(
                AdminApi::new(engine.clone(), ca_pin, true)
                    .with_authority(authority.clone())
                    .with_relay_ticket_key(relays.public_key_b64()),
            ),
        );
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
    let web_addr = match config.web_listen {
        Some(a) => {
            let l = TcpListener::bind(a).await.map_err(|e| StartError::Io(a.to_string(), e))?;
            let bound = l.local_addr().ok();
            // Not the trusted API: every request needs an admin token.
            let api = AdminApi::new(engine.clone(), ca_pin, false)
                .with_authority(authority.clone())
                .with_relay_ticket_key(relays.public_key_b64());
            tasks.push(tokio::spawn(crate::web::serve(l, Arc::new(crate::web::Web::new(api)))));
            tracing::info!(addr = ?bound, "topology page on plain HTTP");
            bound
        }
        None => None,
    };
    tasks.push(tokio::spawn(engine.clone().run_background()));
    tracing::info!(%addr, store = store.backend(), tls = config.tls, ca_pin = %hex::encode(ca_pin), ca_key = %authority.key_path().display(), relays = config.relays.len(), relay_ticket_key = %relays.public_key_b64(), "mesh-control running");
    Ok(Running {
        engine,
        addr,
        metrics_addr,
        web_addr,
        ca_pem: authority.trusted().0.first().map(|t| t.pem.clone()).unwrap_or_default(),
        ca_pin,
        authority,
        bootstrap_admin_token,
        tasks,
    })
}
