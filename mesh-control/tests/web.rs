//! The topology page over real HTTP on loopback: the login form, the
//! session cookie, bearer tokens for scripts, and a revoked token ending
//! its session.

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// One request; the whole answer (head and body) as text.
async fn request(addr: std::net::SocketAddr, head: &str, body: &str) -> String {
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let req = format!("{head}\r\nHost: x\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}", body.len());
    s.write_all(req.as_bytes()).await.expect("write");
    let mut out = String::new();
    s.read_to_string(&mut out).await.expect("read");
    out
}

fn status(answer: &str) -> u16 {
    answer.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0)
}

#[tokio::test]
async fn sign_in_snapshot_and_revocation() {
    let dir = tempfile::tempdir().unwrap();
    let config = mesh_control::config::Config {
        web_listen: Some(std::net::SocketAddr::from(([127, 0, 0, 1], 0))),
        ..mesh_control::sim::loopback_config(dir.path())
    };
    let c = mesh_control::run::start(&config).await.expect("control starts");
    let web = c.web_addr.expect("the page listens");
    let token = c.bootstrap_admin_token.clone().expect("a bootstrap token");

    let page = request(web, "GET / HTTP/1.1", "").await;
    assert_eq!(status(&page), 200);
    assert!(page.contains("id=\"login\""), "not signed in: the login form");
    assert!(page.to_ascii_lowercase().contains("content-security-policy:"));
    assert_eq!(status(&request(web, "GET /api/snapshot HTTP/1.1", "").await), 401);

    let refused =
        request(web, "POST /login HTTP/1.1\r\nContent-Type: application/x-www-form-urlencoded", "token=mat1.x.y").await;
    assert_eq!(status(&refused), 401);
    assert!(refused.contains("login-error") && !refused.to_ascii_lowercase().contains("set-cookie"));

    let signed_in = request(
        web,
        "POST /login HTTP/1.1\r\nContent-Type: application/x-www-form-urlencoded",
        &format!("token={token}"),
    )
    .await;
    assert_eq!(status(&signed_in), 303);
    let cookie = signed_in
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase().starts_with("set-cookie:").then(|| l["set-cookie:".len()..].trim().to_owned())
        })
        .expect("a session cookie");
    assert!(cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"), "{cookie}");
    assert!(!cookie.contains("Secure"), "plain HTTP: a Secure cookie would never come back");
    let session = cookie.split(';').next().unwrap().to_owned();
    let secret = token.rsplit('.').next().unwrap();
    assert!(!session.contains(secret), "the cookie never holds the token");

    let app = request(web, &format!("GET / HTTP/1.1\r\nCookie: {session}"), "").await;
    assert!(app.contains("src=\"/app.js\""), "signed in: the app");
    let snap = request(web, &format!("GET /api/snapshot HTTP/1.1\r\nCookie: {session}"), "").await;
    assert_eq!(status(&snap), 200);
    let json: serde_json::Value = serde_json::from_str(snap.split("\r\n\r\n").nth(1).unwrap()).unwrap();
    assert!(json["gateways"].is_array() && json["audit"].is_array(), "{json}");
    let bearer = request(web, &format!("GET /api/snapshot HTTP/1.1\r\nAuthorization: Bearer {token}"), "").await;
    assert_eq!(status(&bearer), 200, "scripts use a bearer token");

    // Revoking the token ends the session at once.
    let id = token.split('.').nth(1).unwrap();
    c.engine.revoke_admin_token(id, "test").await.unwrap();
    assert_eq!(status(&request(web, &format!("GET /api/snapshot HTTP/1.1\r\nCookie: {session}"), "").await), 401);
    let page = request(web, &format!("GET / HTTP/1.1\r\nCookie: {session}"), "").await;
    assert!(page.contains("id=\"login\""));
}
