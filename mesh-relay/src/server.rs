//! The relay server: TLS, one HTTP/1.1 upgrade authenticated by a ticket,
//! then frames forwarded by WireGuard public key.
//!
//! A node attaches as the key its ticket names and can only ever send as
//! that key: the relay stamps the source on every [`Frame::Recv`] it
//! delivers, and a client that sends a `Recv` frame is disconnected.
//! Delivery has UDP semantics: a packet for a key that is not attached, or
//! whose queue is full, is dropped and counted, and never slows the sender.
//! A newer attach of the same key replaces (and closes) the older one, so a
//! node that reconnects after a network change does not wait for the dead
//! connection's timeout. A session ends when its ticket expires: a node
//! control stopped issuing tickets to (removed, or its key expired) is
//! off the relay within a ticket's lifetime, connected or not.
//!
//! HTTP answers:
//!
//! | request                              | answer                          |
//! |--------------------------------------|---------------------------------|
//! | `GET /healthz`                       | 200                             |
//! | `GET /mesh-relay` without the upgrade | 426                            |
//! | no or unreadable bearer ticket       | 401 (malformed, bad version)    |
//! | well-formed ticket, refused          | 403 (bad signature, expired)    |
//! | valid ticket                         | 101, then frames                |

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::{Bytes, BytesMut};
use http_body_util::Full;
use hyper::{
    Method, Request, Response, StatusCode,
    body::Incoming,
    header::{AUTHORIZATION, CONNECTION, CONTENT_TYPE, HeaderMap, HeaderName, HeaderValue, UPGRADE, WWW_AUTHENTICATE},
    server::conn::http1,
    service::service_fn,
    upgrade::{OnUpgrade, Upgraded},
};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt as _, BufReader};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot};
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;

use crate::frame::{self, Frame, FrameError};
use crate::metrics::{self, Metrics};
use crate::ticket::{self, Ticket, TicketError};
use crate::{reflect, tls};

/// The upgrade path.
pub const PATH: &str = "/mesh-relay";
/// The `Upgrade` protocol token.
pub const PROTOCOL: &str = "mesh-relay/1";
/// The response header naming the relay's region.
pub const REGION_HEADER: &str = "mesh-relay-region";
/// Connections served at once unless configured.
pub const DEFAULT_MAX_CONNECTIONS: usize = 10_000;
/// Time from accepting a connection to the end of the upgrade.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// An attached node that sent nothing for this long is gone: clients ping
/// every 5 s, so this is several missed pings.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// A write to a node that does not complete in this long (the node stopped
/// reading) ends its connection.
const WRITE_TIMEOUT: Duration = Duration::from_secs(15);
/// Packets queued for one node before further ones are dropped.
pub const QUEUE_PACKETS: usize = 1024;
/// Bytes gathered into one TLS write.
const WRITE_BATCH: usize = 64 * 1024;
/// The first pause after an accept error (doubled on each repeat).
const MIN_ACCEPT_BACKOFF: Duration = Duration::from_millis(10);
const MAX_ACCEPT_BACKOFF: Duration = Duration::from_secs(1);

/// The relay's configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RelayConfig {
    /// TCP address for TLS connections from nodes.
    pub listen: SocketAddr,
    /// UDP address of the reflector, if any.
    pub reflector: Option<SocketAddr>,
    /// TCP address for `/metrics`, if any.
    pub metrics: Option<SocketAddr>,
    /// The certificate (PEM). With the key, generated if both are missing.
    pub cert_path: PathBuf,
    /// The private key (PEM, mode 0600).
    pub key_path: PathBuf,
    /// The names a generated certificate is issued for.
    pub names: Vec<String>,
    /// Control's ticket-signing public keys (more than one during a
    /// rotation).
    pub trusted_keys: Vec<[u8; 32]>,
    /// The region this relay serves (logs and a response header).
    pub region: String,
    /// Connections served at once; more wait in the kernel's backlog.
    pub max_connections: usize,
}

/// Why the relay could not start.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    /// Binding a socket failed.
    #[error("binding the {what} address {addr}: {source}")]
    Bind {
        /// Which socket.
        what: &'static str,
        /// Its address.
        addr: SocketAddr,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The certificate or the TLS configuration.
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    /// A configuration that cannot work.
    #[error("configuration: {0}")]
    Config(String),
}

/// The pin of the configured certificate, generating the pair if neither
/// file exists (so that it can be published before the first start).
pub fn certificate_pin(config: &RelayConfig) -> Result<[u8; 32], RelayError> {
    let (chain, _) = tls::load_or_generate(&config.cert_path, &config.key_path, &config.names)?;
    Ok(tls::pin_of(&chain[0]))
}

/// A bound relay, ready to [`serve`](Relay::serve).
pub struct Relay {
    listener: TcpListener,
    reflector: Option<UdpSocket>,
    metrics_listener: Option<TcpListener>,
    acceptor: TlsAcceptor,
    pin: [u8; 32],
    max_connections: usize,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Relay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Relay")
            .field("listen", &self.listener.local_addr().ok())
            .field("reflector", &self.reflector_addr())
            .field("pin", &hex::encode(self.pin))
            .field("region", &self.shared.region)
            .finish_non_exhaustive()
    }
}

impl Relay {
    /// Loads (or generates) the certificate and binds every socket.
    pub async fn bind(config: RelayConfig) -> Result<Self, RelayError> {
        if config.trusted_keys.is_empty() {
            return Err(RelayError::Config("no control keys: no ticket could ever be accepted".into()));
        }
        let identity = tls::load_or_generate(&config.cert_path, &config.key_path, &config.names)?;
        let pin = tls::pin_of(&identity.0[0]);
        let acceptor = TlsAcceptor::from(tls::server_config(identity)?);
        let bind_err = |what, addr| move |source| RelayError::Bind { what, addr, source };
        let listener = TcpListener::bind(config.listen).await.map_err(bind_err("relay", config.listen))?;
        let reflector = match config.reflector {
            Some(a) => Some(UdpSocket::bind(a).await.map_err(bind_err("reflector", a))?),
            None => None,
        };
        let metrics_listener = match config.metrics {
            Some(a) => Some(TcpListener::bind(a).await.map_err(bind_err("metrics", a))?),
            None => None,
        };
        let shared = Arc::new(Shared {
            trusted: config.trusted_keys,
            region: config.region,
            clients: RwLock::default(),
            next_id: AtomicU64::new(0),
            metrics: Arc::new(Metrics::new()),
        });
        Ok(Self {
            listener,
            reflector,
            metrics_listener,
            acceptor,
            pin,
            max_connections: config.max_connections.max(1),
            shared,
        })
    }

    /// The bound relay address (useful with port 0).
    #[must_use]
    pub fn local_addr(&self) -> SocketAddr {
        self.listener.local_addr().expect("a bound listener has an address")
    }

    /// The bound reflector address.
    #[must_use]
    pub fn reflector_addr(&self) -> Option<SocketAddr> {
        self.reflector.as_ref().and_then(|s| s.local_addr().ok())
    }

    /// The bound metrics address.
    #[must_use]
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_listener.as_ref().and_then(|s| s.local_addr().ok())
    }

    /// SHA-256 of the leaf certificate's DER: what nodes pin.
    #[must_use]
    pub fn cert_pin(&self) -> [u8; 32] {
        self.pin
    }

    /// Serves until `shutdown` completes, then closes every connection.
    pub async fn serve(self, shutdown: impl Future<Output = ()>) {
        let mut tasks = JoinSet::new();
        if let Some(socket) = self.reflector {
            tasks.spawn(reflect::serve(socket, self.shared.metrics.reflector.clone()));
        }
        if let Some(listener) = self.metrics_listener {
            tasks.spawn(metrics::serve(listener, self.shared.metrics.clone()));
        }
        let slots = Arc::new(Semaphore::new(self.max_connections));
        let mut backoff = Duration::ZERO;
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                () = &mut shutdown => break,
                // Reap finished connections so the set does not grow.
                Some(_) = tasks.join_next() => {}
                accepted = accept(&self.listener, &slots) => match accepted {
                    Ok((stream, peer, slot)) => {
                        backoff = Duration::ZERO;
                        tasks.spawn(connection(self.shared.clone(), self.acceptor.clone(), stream, peer, slot));
                    }
                    Err(e) => {
                        // EMFILE and friends repeat at once: back off, never spin.
                        backoff = (backoff * 2).clamp(MIN_ACCEPT_BACKOFF, MAX_ACCEPT_BACKOFF);
                        tracing::warn!(error = %e, backoff_ms = backoff.as_millis(), "relay: accept failed");
                        tokio::time::sleep(backoff).await;
                    }
                },
            }
        }
        tracing::info!("relay shutting down");
        tasks.shutdown().await;
    }
}

/// Waits for a free slot, then for a connection: at the cap, clients wait
/// in the kernel's backlog and cost no descriptor here.
async fn accept(
    listener: &TcpListener,
    slots: &Arc<Semaphore>,
) -> std::io::Result<(TcpStream, SocketAddr, OwnedSemaphorePermit)> {
    let slot = slots.clone().acquire_owned().await.expect("the semaphore is never closed");
    let (stream, peer) = listener.accept().await?;
    Ok((stream, peer, slot))
}

/// An attached node's delivery queue.
#[derive(Debug)]
struct Attached {
    /// Tells this attachment from a later one of the same key.
    id: u64,
    tx: mpsc::Sender<([u8; 32], Bytes)>,
    /// Dropped with the entry: closes the connection when replaced.
    _kick: oneshot::Sender<()>,
}

#[derive(Debug)]
struct Shared {
    trusted: Vec<[u8; 32]>,
    region: String,
    clients: RwLock<HashMap<[u8; 32], Attached>>,
    next_id: AtomicU64,
    metrics: Arc<Metrics>,
}

impl Shared {
    /// Registers `a` as `key`'s attachment; returns the one it replaces.
    fn attach(&self, key: [u8; 32], a: Attached) -> Option<Attached> {
        // A panic while holding the lock leaves a consistent map: every
        // writer does a single insert or remove.
        let mut map = self.clients.write().unwrap_or_else(PoisonError::into_inner);
        let old = map.insert(key, a);
        self.metrics.clients.set(map.len() as i64);
        old
    }

    /// Removes `key`'s attachment if it is still attachment `id`.
    fn detach(&self, key: &[u8; 32], id: u64) {
        let mut map = self.clients.write().unwrap_or_else(PoisonError::into_inner);
        if map.get(key).is_some_and(|a| a.id == id) {
            map.remove(key);
        }
        self.metrics.clients.set(map.len() as i64);
    }

    /// Queues `payload` from `src` for `dst`, or drops and counts it.
    fn forward(&self, src: [u8; 32], dst: [u8; 32], payload: Bytes) {
        let len = payload.len() as u64;
        let map = self.clients.read().unwrap_or_else(PoisonError::into_inner);
        let m = &self.metrics;
        match map.get(&dst).map(|a| a.tx.try_send((src, payload))) {
            Some(Ok(())) => {
                m.forwarded.inc();
                m.bytes.inc_by(len);
            }
            Some(Err(mpsc::error::TrySendError::Full(_))) => {
                m.queue_full.inc();
            }
            // Closed: the destination's connection is ending.
            None | Some(Err(mpsc::error::TrySendError::Closed(_))) => {
                m.no_peer.inc();
            }
        }
    }
}

type Upgrade = (OnUpgrade, Ticket);

/// One TCP connection: TLS, one HTTP request, then (if attached) the
/// frame session.
async fn connection(
    shared: Arc<Shared>,
    acceptor: TlsAcceptor,
    stream: TcpStream,
    peer: SocketAddr,
    _slot: OwnedSemaphorePermit,
) {
    // Datagrams are latency-sensitive and already small.
    let _ = stream.set_nodelay(true);
    let (up_tx, mut up_rx) = oneshot::channel::<Upgrade>();
    let for_service = shared.clone();
    let handshake = async {
        let tls = acceptor.accept(stream).await.map_err(|e| e.to_string())?;
        let up_tx = Arc::new(Mutex::new(Some(up_tx)));
        let service = service_fn(move |req| {
            let (shared, up_tx) = (for_service.clone(), up_tx.clone());
            async move { Ok::<_, Infallible>(respond(&shared, peer, req, &up_tx)) }
        });
        http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(HANDSHAKE_TIMEOUT)
            .keep_alive(false)
            .serve_connection(TokioIo::new(tls), service)
            .with_upgrades()
            .await
            .map_err(|e| e.to_string())
    };
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            tracing::debug!(%peer, error = %e, "relay: handshake failed");
            return;
        }
        Err(_) => {
            tracing::debug!(%peer, "relay: handshake timed out");
            return;
        }
    }
    let Ok((on_upgrade, ticket)) = up_rx.try_recv() else { return };
    match on_upgrade.await {
        Ok(upgraded) => session(&shared, upgraded, ticket, peer).await,
        Err(e) => tracing::debug!(%peer, error = %e, "relay: upgrade failed"),
    }
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    r
}

/// Whether the comma-separated header `name` holds `token`.
fn has_token(headers: &HeaderMap, name: HeaderName, token: &str) -> bool {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

fn respond(
    shared: &Shared,
    peer: SocketAddr,
    mut req: Request<Incoming>,
    up_tx: &Mutex<Option<oneshot::Sender<Upgrade>>>,
) -> Response<Full<Bytes>> {
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/healthz") => return text(StatusCode::OK, "ok\n".into()),
        (&Method::GET, PATH) => {}
        (_, "/healthz" | PATH) => return text(StatusCode::METHOD_NOT_ALLOWED, "GET only\n".into()),
        _ => return text(StatusCode::NOT_FOUND, "not found\n".into()),
    }
    let h = req.headers();
    if !has_token(h, CONNECTION, "upgrade") || !has_token(h, UPGRADE, PROTOCOL) {
        shared.metrics.attach("bad_request");
        let mut r = text(StatusCode::UPGRADE_REQUIRED, format!("upgrade to {PROTOCOL} required\n"));
        r.headers_mut().insert(UPGRADE, HeaderValue::from_static(PROTOCOL));
        return r;
    }
    let bearer = h
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, t)| t);
    let Some(bearer) = bearer else {
        shared.metrics.attach("missing");
        tracing::warn!(%peer, "relay attach refused: no bearer ticket");
        return refuse(StatusCode::UNAUTHORIZED, "missing bearer ticket");
    };
    let ticket = match ticket::verify_b64(bearer, &shared.trusted, now_unix()) {
        Ok(t) => t,
        Err(e) => {
            shared.metrics.attach(e.kind());
            tracing::warn!(%peer, reason = %e, "relay attach refused");
            let status = match e {
                TicketError::Signature | TicketError::Expired { .. } => StatusCode::FORBIDDEN,
                _ => StatusCode::UNAUTHORIZED,
            };
            return refuse(status, &format!("ticket refused: {e}"));
        }
    };
    let Some(tx) = up_tx.lock().unwrap_or_else(PoisonError::into_inner).take() else {
        // keep_alive(false) allows one request per connection.
        return text(StatusCode::BAD_REQUEST, "one upgrade per connection\n".into());
    };
    shared.metrics.attach("ok");
    let _ = tx.send((hyper::upgrade::on(&mut req), ticket));
    let mut r = Response::new(Full::default());
    *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    r.headers_mut().insert(CONNECTION, HeaderValue::from_static("upgrade"));
    r.headers_mut().insert(UPGRADE, HeaderValue::from_static(PROTOCOL));
    if let Ok(v) = HeaderValue::from_str(&shared.region) {
        r.headers_mut().insert(REGION_HEADER, v);
    }
    r
}

fn refuse(status: StatusCode, why: &str) -> Response<Full<Bytes>> {
    let mut r = text(status, format!("{why}\n"));
    r.headers_mut().insert(WWW_AUTHENTICATE, HeaderValue::from_static("Bearer realm=\"mesh-relay\""));
    r
}

fn now_unix() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64)
}

/// Why an attached session ended.
#[derive(Debug, thiserror::Error)]
enum End {
    #[error("closed by the node")]
    Closed,
    #[error("replaced by a newer attach of the same key")]
    Replaced,
    #[error("idle for {IDLE_TIMEOUT:?}")]
    Idle,
    #[error("the ticket expired")]
    Expired,
    #[error("frame: {0}")]
    Frame(#[from] FrameError),
    #[error("write: {0}")]
    Write(String),
    #[error("protocol: {0}")]
    Protocol(&'static str),
}

async fn session(shared: &Shared, upgraded: Upgraded, ticket: Ticket, peer: SocketAddr) {
    let key = ticket.public_key;
    let (tx, rx) = mpsc::channel(QUEUE_PACKETS);
    let (kick_tx, kick_rx) = oneshot::channel();
    let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
    let replaced = shared.attach(key, Attached { id, tx, _kick: kick_tx }).is_some();
    let node = ticket::key_to_b64(&key);
    tracing::info!(%peer, node_id = ticket.node_id, key = %node, replaced, region = %shared.region, "node attached");
    let (r, w) = tokio::io::split(TokioIo::new(upgraded));
    let (pong_tx, pong_rx) = mpsc::channel(8);
    let end = tokio::select! {
        e = read_loop(shared, key, BufReader::with_capacity(WRITE_BATCH, r), pong_tx) => e,
        e = write_loop(w, rx, pong_rx) => e,
        _ = kick_rx => End::Replaced,
        () = tokio::time::sleep(until_unix(ticket.expires_unix)) => End::Expired,
    };
    shared.detach(&key, id);
    tracing::info!(%peer, node_id = ticket.node_id, key = %node, reason = %end, "node detached");
}

/// How long until the wall-clock time `unix` (zero if it has passed).
fn until_unix(unix: i64) -> Duration {
    Duration::from_secs(u64::try_from(unix.saturating_sub(now_unix())).unwrap_or(0))
}

async fn read_loop<R: AsyncRead + Unpin>(shared: &Shared, me: [u8; 32], mut r: R, pongs: mpsc::Sender<[u8; 8]>) -> End {
    loop {
        let f = match tokio::time::timeout(IDLE_TIMEOUT, frame::read_frame(&mut r)).await {
            Err(_) => return End::Idle,
            Ok(Err(e)) => return e.into(),
            Ok(Ok(None)) => return End::Closed,
            Ok(Ok(Some(f))) => f,
        };
        match f {
            Frame::Send { dst, payload } => shared.forward(me, dst, payload),
            // A ping flood gets some of its pongs dropped, nothing more.
            Frame::Ping(b) => {
                let _ = pongs.try_send(b);
            }
            Frame::Pong(_) => {}
            Frame::Recv { .. } => return End::Protocol("a node sent a Recv frame (nodes send only as themselves)"),
        }
    }
}

async fn write_loop<W: AsyncWrite + Unpin>(
    mut w: W,
    mut packets: mpsc::Receiver<([u8; 32], Bytes)>,
    mut pongs: mpsc::Receiver<[u8; 8]>,
) -> End {
    let mut buf = BytesMut::with_capacity(WRITE_BATCH);
    let recv = |src, payload| Frame::Recv { src, payload };
    loop {
        let f = tokio::select! {
            Some((src, payload)) = packets.recv() => recv(src, payload),
            Some(p) = pongs.recv() => Frame::Pong(p),
            else => return End::Closed,
        };
        // Payloads came from frames, so they are within bounds.
        frame::encode(&f, &mut buf).expect("payload within bounds");
        // Gather what is already queued into one TLS record run and syscall.
        while buf.len() < WRITE_BATCH {
            let Ok((src, payload)) = packets.try_recv() else { break };
            frame::encode(&recv(src, payload), &mut buf).expect("payload within bounds");
        }
        let write = async {
            w.write_all(&buf).await?;
            w.flush().await
        };
        match tokio::time::timeout(WRITE_TIMEOUT, write).await {
            Ok(Ok(())) => buf.clear(),
            Ok(Err(e)) => return End::Write(e.to_string()),
            Err(_) => return End::Write(format!("stalled for {WRITE_TIMEOUT:?}")),
        }
    }
}
