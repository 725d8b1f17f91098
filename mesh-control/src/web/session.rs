//! Login sessions of the web page: pure logic, the clock passed in.
//!
//! A session is a random id (32 bytes) handed to the browser in a cookie;
//! control keeps only its SHA-256, next to the *hash* of the admin token
//! that opened it (never the token), so every request can check the token
//! again: a revoked or expired token ends its sessions at once.

use std::collections::HashMap;
use std::sync::Mutex;

use crate::auth;

/// The session cookie's name.
pub const COOKIE: &str = "mesh_session";

/// How long a session lasts: 12 hours.
pub const LIFETIME_SECS: i64 = 12 * 3600;

/// Sessions kept at most; past that, logging in drops the oldest (a login
/// flood with a valid token costs bounded memory).
pub const MAX_SESSIONS: usize = 1024;

#[derive(Clone, Debug)]
struct Session {
    token_hash: String,
    created: i64,
    expires: i64,
}

/// The live sessions, by the SHA-256 of their id.
#[derive(Debug, Default)]
pub struct Sessions {
    by_hash: Mutex<HashMap<String, Session>>,
}

impl Sessions {
    /// Opens a session for the token whose hash is `token_hash` (already
    /// checked by the caller) at `now`; returns the id for the cookie.
    pub fn open(&self, token_hash: &str, now: i64) -> String {
        let id = auth::secret(32);
        let mut map = self.by_hash.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        map.retain(|_, s| s.expires > now);
        while map.len() >= MAX_SESSIONS {
            let Some(oldest) = map.iter().min_by_key(|(_, s)| s.created).map(|(k, _)| k.clone()) else { break };
            map.remove(&oldest);
        }
        map.insert(
            auth::sha256_hex(id.as_bytes()),
            Session { token_hash: token_hash.to_owned(), created: now, expires: now.saturating_add(LIFETIME_SECS) },
        );
        id
    }

    /// The token hash behind session `id` if it is live at `now`. The id is
    /// looked up by its hash, so lookup time says nothing about the id, and
    /// the stored hash is compared in constant time all the same.
    pub fn token_hash(&self, id: &str, now: i64) -> Option<String> {
        let key = auth::sha256_hex(id.as_bytes());
        let mut map = self.by_hash.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let (stored, s) = map.get_key_value(&key)?;
        if !auth::hash_eq(stored, &key) {
            return None;
        }
        if s.expires <= now {
            map.remove(&key);
            return None;
        }
        Some(s.token_hash.clone())
    }

    /// Ends session `id` (logout, or its token no longer valid).
    pub fn close(&self, id: &str) {
        let key = auth::sha256_hex(id.as_bytes());
        self.by_hash.lock().unwrap_or_else(std::sync::PoisonError::into_inner).remove(&key);
    }

    /// Live sessions (for tests and logs).
    #[must_use]
    pub fn len(&self) -> usize {
        self.by_hash.lock().map_or(0, |m| m.len())
    }

    /// Whether there is no session.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The session id in a `Cookie` header, if any.
#[must_use]
pub fn from_cookie_header(header: &str) -> Option<&str> {
    header
        .split(';')
        .map(str::trim)
        .find_map(|pair| pair.strip_prefix(COOKIE)?.strip_prefix('='))
        .filter(|v| !v.is_empty())
}

/// The `Set-Cookie` value for session `id`: HttpOnly (no script reads
/// it), SameSite=Strict (no other site's page sends it), `Secure` only
/// when served over TLS (the listener is plain HTTP: a `Secure` cookie
/// would never come back).
#[must_use]
pub fn set_cookie(id: &str, secure: bool) -> String {
    format!(
        "{COOKIE}={id}; Path=/; Max-Age={LIFETIME_SECS}; HttpOnly; SameSite=Strict{}",
        if secure { "; Secure" } else { "" }
    )
}

/// The `Set-Cookie` value that clears the session cookie.
#[must_use]
pub fn clear_cookie() -> String {
    format!("{COOKIE}=; Path=/; Max-Age=0; HttpOnly; SameSite=Strict")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_session_maps_to_its_token_hash_and_expires() {
        let s = Sessions::default();
        let id = s.open("tokenhash", 1000);
        assert!(!id.contains("tokenhash"), "the id is random, not derived from the token");
        assert_eq!(s.token_hash(&id, 1000).as_deref(), Some("tokenhash"));
        assert_eq!(s.token_hash(&id, 1000 + LIFETIME_SECS - 1).as_deref(), Some("tokenhash"));
        assert_eq!(s.token_hash(&id, 1000 + LIFETIME_SECS), None, "expired");
        assert!(s.is_empty(), "an expired session is dropped when seen");
        assert_eq!(s.token_hash("forged", 1000), None);
    }

    #[test]
    fn close_and_cap() {
        let s = Sessions::default();
        let a = s.open("h", 0);
        let b = s.open("h", 1);
        assert_ne!(a, b);
        s.close(&a);
        assert_eq!(s.token_hash(&a, 2), None);
        assert!(s.token_hash(&b, 2).is_some());
        for t in 0..MAX_SESSIONS as i64 {
            s.open("h", 10 + t);
        }
        assert_eq!(s.len(), MAX_SESSIONS);
        assert_eq!(s.token_hash(&b, 2), None, "the oldest went first");
    }

    #[test]
    fn cookies() {
        assert_eq!(from_cookie_header("a=1; mesh_session=xyz; b=2"), Some("xyz"));
        assert_eq!(from_cookie_header("mesh_session="), None);
        assert_eq!(from_cookie_header("mesh_sessionx=1"), None);
        assert_eq!(from_cookie_header("other=1"), None);
        let c = set_cookie("xyz", false);
        assert!(c.contains("HttpOnly") && c.contains("SameSite=Strict") && !c.contains("Secure"));
        assert!(set_cookie("xyz", true).ends_with("; Secure"));
        assert!(clear_cookie().contains("Max-Age=0"));
    }
}
