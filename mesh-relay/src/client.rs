//! The node's side: attach to a relay, then send and receive datagrams by
//! WireGuard public key.
//!
//! The relay is trusted by pin only (nodes get it from control); there is
//! no web PKI here. Sending never waits: a full queue drops the datagram,
//! as a full socket buffer would. One task per connection reads and writes;
//! it pings every [`PING_INTERVAL`] and gives the connection up when
//! nothing was read for [`DEAD_AFTER`], after which
//! [`RelaySender::is_closed`] is true and [`RelayReceiver::recv`] returns
//! `None`. Dropping the receiver closes the connection.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http_body_util::{BodyExt as _, Empty, Limited};
use hyper::{
    Method, Request, StatusCode,
    header::{AUTHORIZATION, CONNECTION, HOST, HeaderValue, UPGRADE},
    upgrade::Upgraded,
};
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt as _, BufReader};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::time::MissedTickBehavior;
use tokio_rustls::TlsConnector;

use crate::frame::{self, Frame, MAX_PAYLOAD};
use crate::server::{PATH, PROTOCOL};
use crate::tls;

/// Time for TCP, TLS and the upgrade together.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How often the client pings (keeps NAT state and proves liveness).
pub const PING_INTERVAL: Duration = Duration::from_secs(5);
/// A connection on which nothing was read for this long is dead.
pub const DEAD_AFTER: Duration = Duration::from_secs(15);
/// Datagrams queued in each direction before further ones are dropped.
pub const QUEUE_PACKETS: usize = 1024;
/// The most of a refusal's body kept for the error.
const MAX_ERROR_BODY: usize = 4096;
const WRITE_BATCH: usize = 64 * 1024;

/// Why connecting or sending failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Bad arguments (no pin, bad server name or ticket text).
    #[error("relay client configuration: {0}")]
    Config(String),
    /// TCP connect failed.
    #[error("connecting to relay {addr}: {source}")]
    Connect {
        /// The relay.
        addr: SocketAddr,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The TLS handshake failed (a wrong pin shows up here).
    #[error("TLS with relay {addr}: {source}")]
    Tls {
        /// The relay.
        addr: SocketAddr,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The HTTP exchange failed.
    #[error("relay HTTP: {0}")]
    Http(#[from] hyper::Error),
    /// The relay answered something other than 101.
    #[error("relay refused the attach: {status}: {body}")]
    Refused {
        /// The HTTP status.
        status: StatusCode,
        /// The (plain-text) reason.
        body: String,
    },
    /// Connecting took longer than [`CONNECT_TIMEOUT`].
    #[error("relay did not answer within {CONNECT_TIMEOUT:?}")]
    Timeout,
    /// A datagram bigger than a frame carries.
    #[error("datagram of {0} bytes exceeds {MAX_PAYLOAD}")]
    TooLarge(usize),
    /// The connection is closed.
    #[error("relay connection closed")]
    Closed,
}

/// Connects to relays.
#[derive(Debug)]
pub struct RelayClient;

impl RelayClient {
    /// Attaches to the relay at `addr` with `ticket_b64`, trusting only a
    /// certificate whose SHA-256 is `pin` (`None` is refused: no web PKI
    /// roots are available). `server_name` is sent as SNI and `Host`.
    pub async fn connect(
        addr: SocketAddr,
        server_name: &str,
        pin: Option<[u8; 32]>,
        ticket_b64: &str,
    ) -> Result<(RelaySender, RelayReceiver), ClientError> {
        let io = Self::connect_stream(addr, server_name, pin, ticket_b64).await?;
        let (send_tx, send_rx) = mpsc::channel(QUEUE_PACKETS);
        let (recv_tx, recv_rx) = mpsc::channel(QUEUE_PACKETS);
        let dropped_out = Arc::new(AtomicU64::new(0));
        let dropped_in = Arc::new(AtomicU64::new(0));
        tokio::spawn(run(io, send_rx, recv_tx, dropped_in.clone(), addr));
        Ok((RelaySender { tx: send_tx, dropped: dropped_out }, RelayReceiver { rx: recv_rx, dropped: dropped_in }))
    }

    /// The upgraded stream itself, before any framing: for tools and tests
    /// that speak frames directly ([`frame::read_frame`],
    /// [`frame::write_frame`]).
    pub async fn connect_stream(
        addr: SocketAddr,
        server_name: &str,
        pin: Option<[u8; 32]>,
        ticket_b64: &str,
    ) -> Result<TokioIo<Upgraded>, ClientError> {
        let pin = pin.ok_or_else(|| {
            ClientError::Config("a relay certificate pin is required (no web PKI roots are available)".into())
        })?;
        let config = tls::client_config(pin).map_err(|e| ClientError::Config(e.to_string()))?;
        let name = ServerName::try_from(server_name.to_owned())
            .map_err(|e| ClientError::Config(format!("server name {server_name:?}: {e}")))?;
        let host = HeaderValue::from_str(server_name).map_err(|e| ClientError::Config(e.to_string()))?;
        let auth = HeaderValue::from_str(&format!("Bearer {ticket_b64}"))
            .map_err(|_| ClientError::Config("the ticket is not valid header text".into()))?;
        let attach = async {
            let tcp = TcpStream::connect(addr).await.map_err(|source| ClientError::Connect { addr, source })?;
            let _ = tcp.set_nodelay(true);
            let tls = TlsConnector::from(config)
                .connect(name, tcp)
                .await
                .map_err(|source| ClientError::Tls { addr, source })?;
            let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls)).await?;
            // Drives the HTTP connection until it hands the stream over; the
            // guard stops it if the attach fails or times out.
            let _driver = AbortOnDrop(tokio::spawn(conn.with_upgrades()));
            let req = Request::builder()
                .method(Method::GET)
                .uri(PATH)
                .header(HOST, host)
                .header(CONNECTION, "upgrade")
                .header(UPGRADE, PROTOCOL)
                .header(AUTHORIZATION, auth)
                .body(Empty::<Bytes>::new())
                .map_err(|e| ClientError::Config(e.to_string()))?;
            let resp = sender.send_request(req).await?;
            let status = resp.status();
            if status != StatusCode::SWITCHING_PROTOCOLS {
                let body = match Limited::new(resp.into_body(), MAX_ERROR_BODY).collect().await {
                    Ok(b) => String::from_utf8_lossy(&b.to_bytes()).trim().to_owned(),
                    Err(e) => format!("(body unreadable: {e})"),
                };
                return Err(ClientError::Refused { status, body });
            }
            Ok(TokioIo::new(hyper::upgrade::on(resp).await?))
        };
        tokio::time::timeout(CONNECT_TIMEOUT, attach).await.map_err(|_| ClientError::Timeout)?
    }
}

#[derive(Debug)]
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Sends datagrams through the relay; cheap to clone.
#[derive(Clone, Debug)]
pub struct RelaySender {
    tx: mpsc::Sender<([u8; 32], Bytes)>,
    dropped: Arc<AtomicU64>,
}

impl RelaySender {
    /// Queues `payload` for the node attached as `dst`. Never waits: with
    /// the queue full the datagram is dropped (and counted) and this still
    /// succeeds, as a UDP send would.
    pub fn send(&self, dst: [u8; 32], payload: &[u8]) -> Result<(), ClientError> {
        if payload.len() > MAX_PAYLOAD {
            return Err(ClientError::TooLarge(payload.len()));
        }
        match self.tx.try_send((dst, Bytes::copy_from_slice(payload))) {
            Ok(()) => Ok(()),
            Err(mpsc::error::TrySendError::Full(_)) => {
                self.dropped.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
            Err(mpsc::error::TrySendError::Closed(_)) => Err(ClientError::Closed),
        }
    }

    /// Whether the connection is gone (every later send fails).
    #[must_use]
    pub fn is_closed(&self) -> bool {
        self.tx.is_closed()
    }

    /// Datagrams dropped because the send queue was full.
    #[must_use]
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

/// Receives datagrams from the relay.
#[derive(Debug)]
pub struct RelayReceiver {
    rx: mpsc::Receiver<([u8; 32], Bytes)>,
    dropped: Arc<AtomicU64>,
}

impl RelayReceiver {
    /// The next datagram and the key of the node that sent it (stamped by
    /// the relay); `None` once the connection is closed.
    pub async fn recv(&mut self) -> Option<([u8; 32], Vec<u8>)> {
        self.rx.recv().await.map(|(src, payload)| (src, payload.into()))
    }

    /// Datagrams dropped because this receiver fell behind.
    #[must_use]
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

async fn run(
    io: TokioIo<Upgraded>,
    outgoing: mpsc::Receiver<([u8; 32], Bytes)>,
    incoming: mpsc::Sender<([u8; 32], Bytes)>,
    dropped_in: Arc<AtomicU64>,
    relay: SocketAddr,
) {
    let (r, w) = tokio::io::split(io);
    let (pong_tx, pong_rx) = mpsc::channel(8);
    let why = tokio::select! {
        why = read_loop(BufReader::with_capacity(WRITE_BATCH, r), incoming, pong_tx, &dropped_in) => why,
        why = write_loop(w, outgoing, pong_rx) => why,
    };
    tracing::debug!(%relay, reason = %why, "relay connection closed");
}

async fn read_loop<R: AsyncRead + Unpin>(
    mut r: R,
    incoming: mpsc::Sender<([u8; 32], Bytes)>,
    pongs: mpsc::Sender<[u8; 8]>,
    dropped: &AtomicU64,
) -> String {
    // Dropped while the line is quiet: without this the pings would keep an
    // unused connection (and its attach) up for good. One waiter for the
    // whole connection, not one per frame.
    let dropped_receiver = incoming.closed();
    tokio::pin!(dropped_receiver);
    loop {
        let read = tokio::select! {
            r = tokio::time::timeout(DEAD_AFTER, frame::read_frame(&mut r)) => r,
            () = &mut dropped_receiver => return "receiver dropped".into(),
        };
        let f = match read {
            Err(_) => return format!("nothing read for {DEAD_AFTER:?}"),
            Ok(Err(e)) => return e.to_string(),
            Ok(Ok(None)) => return "closed by the relay".into(),
            Ok(Ok(Some(f))) => f,
        };
        match f {
            Frame::Recv { src, payload } => match incoming.try_send((src, payload)) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(_)) => {
                    dropped.fetch_add(1, Ordering::Relaxed);
                }
                Err(mpsc::error::TrySendError::Closed(_)) => return "receiver dropped".into(),
            },
            Frame::Ping(b) => {
                let _ = pongs.try_send(b);
            }
            Frame::Pong(_) => {}
            Frame::Send { .. } => return "protocol: the relay sent a Send frame".into(),
        }
    }
}

async fn write_loop<W: AsyncWrite + Unpin>(
    mut w: W,
    mut outgoing: mpsc::Receiver<([u8; 32], Bytes)>,
    mut pongs: mpsc::Receiver<[u8; 8]>,
) -> String {
    let mut ping = tokio::time::interval_at(tokio::time::Instant::now() + PING_INTERVAL, PING_INTERVAL);
    ping.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut seq = 0u64;
    // With every sender dropped, keep pinging: the receiver may still be
    // in use.
    let mut senders_gone = false;
    let mut buf = BytesMut::with_capacity(WRITE_BATCH);
    let send = |dst, payload| Frame::Send { dst, payload };
    loop {
        let f = tokio::select! {
            m = outgoing.recv(), if !senders_gone => match m {
                Some((dst, payload)) => send(dst, payload),
                None => {
                    senders_gone = true;
                    continue;
                }
            },
            Some(p) = pongs.recv() => Frame::Pong(p),
            _ = ping.tick() => {
                seq += 1;
                Frame::Ping(seq.to_be_bytes())
            }
        };
        // Sizes were checked in `send`.
        frame::encode(&f, &mut buf).expect("payload within bounds");
        while buf.len() < WRITE_BATCH {
            let Ok((dst, payload)) = outgoing.try_recv() else { break };
            frame::encode(&send(dst, payload), &mut buf).expect("payload within bounds");
        }
        let write = async {
            w.write_all(&buf).await?;
            w.flush().await
        };
        match tokio::time::timeout(DEAD_AFTER, write).await {
            Ok(Ok(())) => buf.clear(),
            Ok(Err(e)) => return format!("write: {e}"),
            Err(_) => return format!("write stalled for {DEAD_AFTER:?}"),
        }
    }
}
