//! The same store tests against SQLite and PostgreSQL.
//!
//! PostgreSQL comes from `MESH_TEST_DATABASE_URL` (set by `cargo xtask
//! test`). Under CI (`CI=true`) a missing URL fails the tests; by hand, the
//! tests start a local cluster themselves with the xtask helper.

use super::*;

#[path = "../../../xtask/src/postgres.rs"]
mod postgres;

/// A PostgreSQL URL, or None (only outside CI) when none can be had.
pub(crate) fn postgres_url() -> Option<String> {
    if let Ok(url) = std::env::var("MESH_TEST_DATABASE_URL") {
        return Some(url);
    }
    let ci = std::env::var("CI").is_ok_and(|v| v == "true");
    assert!(!ci, "MESH_TEST_DATABASE_URL is unset under CI: the PostgreSQL store tests cannot run");
    match postgres::ensure_postgres() {
        Ok(url) => Some(url),
        Err(e) => {
            eprintln!("NOTE: no PostgreSQL for the store tests ({e:#}); set MESH_TEST_DATABASE_URL");
            None
        }
    }
}

/// A fresh, empty PostgreSQL schema on `url`, as a URL.
pub(crate) async fn fresh_pg_schema(url: &str) -> String {
    sqlx::any::install_default_drivers();
    let schema = format!("t_{}", crate::auth::secret(9).to_lowercase().replace(['-', '_'], "x"));
    let pool = AnyPool::connect(url).await.expect("connect to PostgreSQL");
    sqlx::query(&format!("CREATE SCHEMA {schema}")).execute(&pool).await.unwrap();
    pool.close().await;
    let sep = if url.contains('?') { '&' } else { '?' };
    format!("{url}{sep}options=-c%20search_path%3D{schema}")
}

/// A store of each kind, both empty.
async fn stores() -> Vec<(Store, Option<tempfile::TempDir>)> {
    let dir = tempfile::tempdir().unwrap();
    let sqlite = Store::open(&format!("sqlite://{}", dir.path().join("control.db").display())).await.unwrap();
    let mut out = vec![(sqlite, Some(dir))];
    if let Some(url) = postgres_url() {
        out.push((Store::open(&fresh_pg_schema(&url).await).await.unwrap(), None));
    }
    out
}

pub(crate) fn key(id: &str, reusable: bool, preapproved: bool, expires: i64) -> KeyRecord {
    KeyRecord {
        id: id.into(),
        reusable,
        ephemeral: false,
        preapproved,
        tags: vec!["tag:gw".into()],
        owner: "ops@example.com".into(),
        description: String::new(),
        created: 0,
        expires,
        revoked: false,
        uses: 0,
        secret_hash: crate::auth::sha256_hex(id.as_bytes()),
    }
}

pub(crate) fn new_node(host: &str) -> NewNode {
    NewNode {
        hostname: host.into(),
        public_key: "00".repeat(32),
        endpoints: vec!["192.0.2.1:51820".into()],
        routes: vec![("198.18.10.0/24".parse().unwrap(), false)],
        credential_hash: crate::auth::sha256_hex(host.as_bytes()),
        key_lifetime: 90 * 86_400,
    }
}

#[tokio::test]
async fn enrollment_keys_nodes_and_audit() {
    for (store, _dir) in stores().await {
        let kind = store.backend();
        store.create_key(&key("once", false, false, 1000), "admin:t", 10).await.unwrap();
        store.create_key(&key("many", true, true, 1000), "admin:t", 10).await.unwrap();
        store.create_key(&key("old", true, true, 5), "admin:t", 1).await.unwrap();
        let auto = |_: &KeyRecord, p: &IpNet| p.to_string() == "198.18.10.0/24";
        let h = crate::auth::sha256_hex;
        let a = store.enroll("once", &h(b"once"), &new_node("gw-a"), auto, 20).await.unwrap();
        assert_eq!(a.state, NodeState::Pending, "{kind}");
        assert_eq!(a.ipv4, "100.64.0.1".parse::<Ipv4Addr>().unwrap());
        assert_eq!(a.ipv6, "fd7a:6d65:7368::1".parse::<Ipv6Addr>().unwrap());
        assert_eq!(a.key_expiry, 20 + 90 * 86_400);
        // One-off reused, wrong secret, expired, unknown: all refused alike.
        for (id, secret) in [("once", "once"), ("many", "nope"), ("old", "old"), ("ghost", "ghost")] {
            let err = store.enroll(id, &h(secret.as_bytes()), &new_node("x"), auto, 20).await.unwrap_err();
            assert!(matches!(err, StoreError::Conflict(_)), "{kind} {id}: {err}");
        }
        let b1 = store.enroll("many", &h(b"many"), &new_node("gw-a"), auto, 21).await.unwrap();
        let b2 = store.enroll("many", &h(b"many"), &new_node("gw-a"), auto, 22).await.unwrap();
        assert_eq!((b1.state, b1.name.as_str(), b2.name.as_str()), (NodeState::Approved, "gw-a-2", "gw-a-3"));
        assert_eq!(b2.ipv4, "100.64.0.3".parse::<Ipv4Addr>().unwrap());
        // Removing a node never frees an address for reuse while the node
        // with the highest index exists; ids are never reused.
        store.remove_node(b1.id, "admin:t", 23).await.unwrap();
        let c = store.enroll("many", &h(b"many"), &new_node("gw-c"), auto, 24).await.unwrap();
        assert!(c.id > b2.id && c.ipv4 != b2.ipv4 && c.ipv4 != a.ipv4, "{kind}");
        let keys = store.list_keys().await.unwrap();
        assert_eq!(keys.iter().find(|k| k.id == "many").unwrap().uses, 3);
        // Node changes and their audit entries.
        store.approve_node(a.id, "admin:t", 30).await.unwrap();
        store.set_tags(a.id, vec!["tag:db".into()], "admin:t", 31).await.unwrap();
        let exp = store.expire_key(a.id, "admin:t", 32).await.unwrap();
        assert!(exp.expired(32));
        let found = store.node_by_credential(&h(b"gw-c")).await.unwrap().unwrap();
        assert_eq!(found.id, c.id);
        let entries =
            store.audit(&AuditFilter { subject: format!("node/{}", a.id), ..Default::default() }).await.unwrap();
        let actions: Vec<&str> = entries.iter().map(|e| e.action.as_str()).collect();
        assert_eq!(actions, vec!["node.enroll", "node.approve", "node.set_tags", "node.expire_key"], "{kind}");
        let tags = &entries[2];
        assert!(tags.before.contains("tag:gw") && tags.after.contains("tag:db"), "{kind}: {tags:?}");
        assert!(!tags.after.contains("credential"), "secrets never reach the audit log");
        let limited =
            store.audit(&AuditFilter { action_prefix: "key.".into(), limit: 2, ..Default::default() }).await.unwrap();
        assert_eq!(limited.len(), 2);
        assert!(limited[0].id < limited[1].id);
        let revoked = store.revoke_key("many", "admin:t", 40).await.unwrap();
        assert!(revoked.revoked);
        assert!(store.enroll("many", &h(b"many"), &new_node("late"), auto, 41).await.is_err());
    }
}

#[tokio::test]
async fn routes_policy_and_version() {
    for (store, _dir) in stores().await {
        let kind = store.backend();
        let v0 = store.version().await.unwrap();
        store.create_key(&key("k", true, true, 1000), "admin", 1).await.unwrap();
        let never = |_: &KeyRecord, _: &IpNet| false;
        let n = store.enroll("k", &crate::auth::sha256_hex(b"k"), &new_node("gw"), never, 2).await.unwrap();
        let nyc: IpNet = "198.18.10.0/24".parse().unwrap();
        let fsn: IpNet = "198.18.20.0/24".parse().unwrap();
        let snap = store.snapshot().await.unwrap();
        assert!(snap.version >= v0 + 2, "{kind}");
        assert_eq!(snap.routes.len(), 1);
        assert!(!snap.routes[0].approved);
        store.approve_route(n.id, &nyc, "admin", 3).await.unwrap();
        store.set_route_priority(n.id, &nyc, 5, "admin", 4).await.unwrap();
        store.set_advertised(n.id, &[(nyc, false), (fsn, true)], 5).await.unwrap();
        store.set_route_health(n.id, &fsn, false, 6).await.unwrap();
        let snap = store.snapshot().await.unwrap();
        let r: Vec<(String, bool, bool, i32, bool)> = snap
            .routes
            .iter()
            .map(|r| (r.prefix.to_string(), r.approved, r.auto_approved, r.priority, r.healthy))
            .collect();
        assert_eq!(
            r,
            vec![("198.18.10.0/24".into(), true, false, 5, true), ("198.18.20.0/24".into(), true, true, 0, false)],
            "{kind}"
        );
        store.set_advertised(n.id, &[(fsn, true)], 7).await.unwrap();
        assert_eq!(store.snapshot().await.unwrap().routes.len(), 1);
        assert_eq!(store.set_policy("{}", "admin", 8).await.unwrap(), 1);
        assert_eq!(store.set_policy("{\"acls\": []}", "admin", 9).await.unwrap(), 2);
        let snap = store.snapshot().await.unwrap();
        assert_eq!(snap.policy, Some(PolicyRecord { generation: 2, text: "{\"acls\": []}".into() }));
        let p = store.audit(&AuditFilter { action_prefix: "policy.".into(), ..Default::default() }).await.unwrap();
        assert_eq!(p.len(), 2);
        // Removing the node removes its routes.
        store.remove_node(n.id, "admin", 10).await.unwrap();
        assert!(store.snapshot().await.unwrap().routes.is_empty());
        // Meta: first writer wins.
        assert_eq!(store.meta_get_or_init("ca", || "one".into()).await.unwrap(), "one");
        assert_eq!(store.meta_get_or_init("ca", || "two".into()).await.unwrap(), "one");
        // Admin tokens.
        store.add_api_token("t1", "hash1", "first", 100, "control", 11).await.unwrap();
        store.add_api_token("t2", "hash2", "second", 0, "control", 12).await.unwrap();
        assert_eq!(store.api_token("hash1", 99).await.unwrap().map(|t| t.id).as_deref(), Some("t1"));
        assert_eq!(store.api_token("hash1", 100).await.unwrap(), None, "expired");
        assert_eq!(store.api_token("nope", 11).await.unwrap(), None);
        assert!(store.api_token("hash2", i64::MAX).await.unwrap().is_some(), "0: never expires");
        store.revoke_api_token("t2", "admin:t1", 13).await.unwrap();
        assert_eq!(store.api_token("hash2", 14).await.unwrap(), None, "revoked");
        let list = store.list_api_tokens().await.unwrap();
        assert_eq!(list.iter().map(|t| (t.id.as_str(), t.revoked)).collect::<Vec<_>>(), [("t1", false), ("t2", true)]);
        assert!(store.revoke_api_token("t9", "admin:t1", 13).await.is_err());
        assert_eq!(store.api_token_count().await.unwrap(), 2);
    }
}

#[tokio::test]
async fn one_off_key_is_used_once_under_concurrency() {
    for (store, _dir) in stores().await {
        store.create_key(&key("race", false, true, 1000), "admin", 1).await.unwrap();
        let never = |_: &KeyRecord, _: &IpNet| false;
        let tries = (0..6).map(|n| {
            let store = store.clone();
            async move {
                store.enroll("race", &crate::auth::sha256_hex(b"race"), &new_node(&format!("h{n}")), never, 2).await
            }
        });
        let results = futures::future::join_all(tries).await;
        assert_eq!(results.iter().filter(|r| r.is_ok()).count(), 1, "{}: {results:?}", store.backend());
    }
}

#[tokio::test]
async fn a_lease_has_one_holder_until_it_expires() {
    for (store, _dir) in stores().await {
        let v = store.version().await.unwrap();
        assert!(store.try_lease("housekeeping", "a", 100, 3).await.unwrap(), "free: a takes it");
        assert!(!store.try_lease("housekeeping", "b", 101, 3).await.unwrap(), "{}: held by a", store.backend);
        assert!(store.try_lease("housekeeping", "a", 102, 3).await.unwrap(), "a renews it (to 105)");
        assert!(!store.try_lease("housekeeping", "b", 105, 3).await.unwrap(), "not expired at 105");
        assert!(store.try_lease("other", "b", 105, 3).await.unwrap(), "leases are by name");
        assert!(store.try_lease("housekeeping", "b", 106, 3).await.unwrap(), "expired: b takes it over");
        assert!(!store.try_lease("housekeeping", "a", 107, 3).await.unwrap(), "{}: now b's", store.backend);
        assert_eq!(store.version().await.unwrap(), v, "a lease is not a change");
    }
}
