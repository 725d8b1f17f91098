//! The page's HTTP side: hyper's HTTP/1 server with the limits of the
//! `/metrics` responder (`mesh_metrics::server`): a connection cap with no
//! accept at the cap, a header timeout, a deadline per connection, accept
//! backoff. One request per connection: the page polls, and an idle
//! keep-alive connection would hold a slot.

use std::{convert::Infallible, sync::Arc, time::Duration};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full, Limited};
use hyper::{
    Method, Request, Response, StatusCode,
    body::Incoming,
    header::{AUTHORIZATION, CACHE_CONTROL, CONTENT_TYPE, COOKIE, HeaderValue, LOCATION, SET_COOKIE},
    server::conn::http1,
    service::service_fn,
};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::{net::TcpListener, sync::Semaphore};

use super::{Web, page, session, snapshot};

/// Connections served at once (a few operators' browsers and scripts).
const MAX_CONNECTIONS: usize = 32;
/// Time a client has to send its request head.
const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// Time a connection may take in all.
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(30);
/// The largest login form read.
const MAX_FORM: usize = 4096;
/// Longest pause after repeated accept errors.
const MAX_ACCEPT_BACKOFF: Duration = Duration::from_secs(1);

/// Serves the page on `listener` until the task is dropped.
pub async fn serve(listener: TcpListener, web: Arc<Web>) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut backoff = Duration::ZERO;
    loop {
        // A slot before accepting: at the cap, clients wait in the backlog.
        let Ok(slot) = slots.clone().acquire_owned().await else { return };
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                backoff = (backoff * 2).clamp(Duration::from_millis(10), MAX_ACCEPT_BACKOFF);
                tracing::warn!(error = %e, backoff_ms = backoff.as_millis(), "web page: accept failed");
                tokio::time::sleep(backoff).await;
                continue;
            }
        };
        backoff = Duration::ZERO;
        let web = web.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let service = service_fn(move |req| {
                let web = web.clone();
                async move { Ok::<_, Infallible>(respond(&web, req).await) }
            });
            let conn = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .keep_alive(false)
                .serve_connection(TokioIo::new(stream), service);
            match tokio::time::timeout(CONNECTION_TIMEOUT, conn).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::debug!(error = %e, "web page: connection failed"),
                Err(_) => tracing::debug!("web page: connection timed out"),
            }
        });
    }
}

type Answer = Response<Full<Bytes>>;

async fn respond(web: &Web, req: Request<Incoming>) -> Answer {
    let path = req.uri().path().to_owned();
    match (req.method().clone(), path.as_str()) {
        (Method::GET, "/") => {
            if signed_in(web, &req).await {
                body(StatusCode::OK, "text/html; charset=utf-8", page::APP_HTML)
            } else {
                body(StatusCode::OK, "text/html; charset=utf-8", page::login(false))
            }
        }
        (Method::GET, "/app.js") => body(StatusCode::OK, "text/javascript; charset=utf-8", page::APP_JS),
        (Method::POST, "/login") => login(web, req).await,
        (Method::POST, "/logout") => {
            if let Some(id) = cookie(&req) {
                web.sessions.close(id);
            }
            let mut r = redirect();
            set_cookie(&mut r, &session::clear_cookie());
            r
        }
        (Method::GET, "/api/snapshot") => {
            if !signed_in(web, &req).await && !bearer_ok(web, &req).await {
                return body(StatusCode::UNAUTHORIZED, "text/plain; charset=utf-8", "unauthenticated\n");
            }
            match web.inputs().await {
                Ok(i) => match serde_json::to_string(&snapshot::build(&i)) {
                    Ok(json) => body(StatusCode::OK, "application/json", json),
                    Err(e) => internal(&e.to_string()),
                },
                Err(e) => internal(&e.to_string()),
            }
        }
        _ => body(StatusCode::NOT_FOUND, "text/plain; charset=utf-8", "not found\n"),
    }
}

async fn login(web: &Web, req: Request<Incoming>) -> Answer {
    let form = match Limited::new(req.into_body(), MAX_FORM).collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => return body(StatusCode::PAYLOAD_TOO_LARGE, "text/plain; charset=utf-8", "form too large\n"),
    };
    let token = page::form_field(&String::from_utf8_lossy(&form), "token").unwrap_or_default();
    match web.check_token(token.trim()).await {
        Some(hash) => {
            let id = web.sessions.open(&hash, web.now());
            tracing::info!(sessions = web.sessions.len(), "web page: signed in");
            let mut r = redirect();
            // Plain HTTP (see the module doc): no `Secure`.
            set_cookie(&mut r, &session::set_cookie(&id, false));
            r
        }
        None => {
            tracing::info!("web page: sign-in refused");
            body(StatusCode::UNAUTHORIZED, "text/html; charset=utf-8", page::login(true))
        }
    }
}

fn cookie<B>(req: &Request<B>) -> Option<&str> {
    req.headers().get_all(COOKIE).iter().filter_map(|v| v.to_str().ok()).find_map(session::from_cookie_header)
}

async fn signed_in<B>(web: &Web, req: &Request<B>) -> bool {
    match cookie(req) {
        Some(id) => web.check_session(id).await,
        None => false,
    }
}

async fn bearer_ok<B>(web: &Web, req: &Request<B>) -> bool {
    let Some(token) = req.headers().get(AUTHORIZATION).and_then(|v| v.to_str().ok()) else { return false };
    match token.strip_prefix("Bearer ") {
        Some(t) => web.check_token(t.trim()).await.is_some(),
        None => false,
    }
}

fn body(status: StatusCode, content_type: &'static str, text: impl Into<Bytes>) -> Answer {
    let mut r = Response::new(Full::new(text.into()));
    *r.status_mut() = status;
    let h = r.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    // Only our own script; no framing (clickjacking); no sniffing.
    h.insert(
        "content-security-policy",
        HeaderValue::from_static(
            "default-src 'none'; script-src 'self'; connect-src 'self'; style-src 'unsafe-inline'; \
             img-src 'self'; form-action 'self'; frame-ancestors 'none'",
        ),
    );
    h.insert("x-content-type-options", HeaderValue::from_static("nosniff"));
    h.insert("referrer-policy", HeaderValue::from_static("no-referrer"));
    r
}

fn redirect() -> Answer {
    let mut r = body(StatusCode::SEE_OTHER, "text/plain; charset=utf-8", "");
    r.headers_mut().insert(LOCATION, HeaderValue::from_static("/"));
    r
}

fn set_cookie(r: &mut Answer, value: &str) {
    if let Ok(v) = HeaderValue::from_str(value) {
        r.headers_mut().append(SET_COOKIE, v);
    }
}

fn internal(e: &str) -> Answer {
    tracing::error!(error = %e, "web page: internal error");
    body(StatusCode::INTERNAL_SERVER_ERROR, "text/plain; charset=utf-8", "internal error\n")
}
