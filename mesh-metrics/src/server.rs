//! The one HTTP responder behind both binaries' `/metrics`.
//!
//! hyper's HTTP/1 server rather than hand-written parsing: hyper is already
//! in the tree (tonic serves gRPC with it), parses requests properly and has
//! a header-read timer. axum, also in the tree, would add only a router for
//! a single path.
//!
//! What it guards against (the endpoint is often reachable by more than the
//! scraper, and shares the process's descriptors with netlink, probes and
//! the control stream):
//! - a client that connects and sends nothing, or sends its request slowly:
//!   [`Limits::header_timeout`];
//! - one that reads the answer slowly: a deadline on the whole connection,
//!   [`Limits::connection_timeout`];
//! - many connections at once: at most [`Limits::max_connections`] are
//!   served, and none is accepted while at the cap, so the others wait in
//!   the kernel's backlog and cost no descriptor here;
//! - accept errors such as EMFILE, which repeat at once: the loop backs off
//!   (up to [`Limits::max_accept_backoff`]) instead of spinning.

use std::{convert::Infallible, future::Future, io, net::SocketAddr, sync::Arc, time::Duration};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{
    Method, Request, Response, StatusCode,
    header::{ACCEPT, ALLOW, CONTENT_TYPE, HeaderValue},
    server::conn::http1,
    service::service_fn,
};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::{
    net::{TcpListener, TcpStream},
    sync::{OwnedSemaphorePermit, Semaphore},
};

use crate::exposition::Format;

/// What a binary serves on `/metrics`.
pub trait Scrape: Send + Sync + 'static {
    /// The current metrics in `format` (from the binary's registry).
    fn scrape(&self, format: Format) -> impl Future<Output = Result<String, Unavailable>> + Send;
}

/// Why there are no metrics right now (answered with 503).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Unavailable(pub String);

/// The responder's limits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Connections served at once.
    pub max_connections: usize,
    /// Time a client has to send its request head.
    pub header_timeout: Duration,
    /// Time a connection may take in all (request, scrape and answer).
    pub connection_timeout: Duration,
    /// Longest pause after repeated accept errors.
    pub max_accept_backoff: Duration,
}

impl Default for Limits {
    /// A scraper or two and an operator's curl, with plenty of room.
    fn default() -> Self {
        Self {
            max_connections: 16,
            header_timeout: Duration::from_secs(5),
            connection_timeout: Duration::from_secs(30),
            max_accept_backoff: Duration::from_secs(1),
        }
    }
}

/// The first pause after an accept error (doubled on each repeat).
const MIN_ACCEPT_BACKOFF: Duration = Duration::from_millis(10);

/// A source of connections: a [`TcpListener`], or a fake in tests.
trait Accept: Send {
    fn accept(&mut self) -> impl Future<Output = io::Result<(TcpStream, SocketAddr)>> + Send;
}

impl Accept for TcpListener {
    fn accept(&mut self) -> impl Future<Output = io::Result<(TcpStream, SocketAddr)>> + Send {
        TcpListener::accept(self)
    }
}

/// Serves `GET /metrics` from `source` on `listener` until the task is
/// dropped.
pub async fn serve<S: Scrape>(listener: TcpListener, limits: Limits, source: Arc<S>) {
    run(listener, limits, source).await;
}

async fn run<A: Accept, S: Scrape>(mut listener: A, limits: Limits, source: Arc<S>) {
    let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let mut backoff = Duration::ZERO;
    loop {
        // A slot before accepting: at the cap, clients wait in the backlog.
        let Ok(slot) = slots.clone().acquire_owned().await else { return };
        match listener.accept().await {
            Ok((stream, _)) => {
                backoff = Duration::ZERO;
                tokio::spawn(connection(stream, limits, source.clone(), slot));
            }
            Err(e) => {
                backoff = (backoff * 2).clamp(MIN_ACCEPT_BACKOFF, limits.max_accept_backoff.max(MIN_ACCEPT_BACKOFF));
                tracing::warn!(error = %e, backoff_ms = backoff.as_millis(), "metrics endpoint: accept failed");
                tokio::time::sleep(backoff).await;
            }
        }
    }
}

/// Serves one connection (one request: no keep-alive), holding `_slot`.
async fn connection<S: Scrape>(stream: TcpStream, limits: Limits, source: Arc<S>, _slot: OwnedSemaphorePermit) {
    let service = service_fn(move |req| {
        let source = source.clone();
        async move { Ok::<_, Infallible>(respond(&*source, &req).await) }
    });
    let conn = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .keep_alive(false)
        .serve_connection(TokioIo::new(stream), service);
    match tokio::time::timeout(limits.connection_timeout, conn).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::debug!(error = %e, "metrics endpoint: connection failed"),
        Err(_) => tracing::debug!("metrics endpoint: connection timed out"),
    }
}

async fn respond<S: Scrape, B>(source: &S, req: &Request<B>) -> Response<Full<Bytes>> {
    if req.uri().path() != "/metrics" {
        return text(StatusCode::NOT_FOUND, "try /metrics\n".into());
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut r = text(StatusCode::METHOD_NOT_ALLOWED, "GET only\n".into());
        r.headers_mut().insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
        return r;
    }
    let format = Format::negotiate(req.headers().get(ACCEPT).and_then(|v| v.to_str().ok()));
    match source.scrape(format).await {
        Ok(body) => {
            let mut r = Response::new(Full::new(Bytes::from(body)));
            r.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static(format.content_type()));
            r
        }
        Err(e) => text(StatusCode::SERVICE_UNAVAILABLE, format!("{e}\n")),
    }
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    r
}

#[cfg(test)]
mod tests;
