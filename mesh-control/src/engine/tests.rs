//! Two replicas over one PostgreSQL store: route primaries are decided by
//! the housekeeping lease's holder alone, stored, and followed by the other
//! replica, so they never disagree and each change is audited once.

use std::sync::Arc;

use ipnet::IpNet;

use super::{Engine, EngineConfig, LEASE, ManualClock};
use crate::store::tests::{fresh_pg_schema, key, new_node, postgres_url};
use crate::store::{AuditFilter, Store, StoreError};

/// The `route.primary` audit entries, as (before, after).
async fn primary_audit(store: &Store) -> Vec<(String, String)> {
    let f = AuditFilter { action_prefix: "route.primary".into(), limit: 1000, ..AuditFilter::default() };
    store.audit(&f).await.unwrap().into_iter().map(|e| (e.before, e.after)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_follow_the_primaries_the_lease_holder_decided() {
    let Some(url) = postgres_url() else { return };
    let url = fresh_pg_schema(&url).await;
    let (sa, sb) = (Store::open(&url).await.unwrap(), Store::open(&url).await.unwrap());
    let clock = Arc::new(ManualClock::new(1_000_000));
    let now = || crate::engine::Clock::now(&*clock);
    let prefix: IpNet = "198.18.10.0/24".parse().unwrap();

    // Two gateways of one site, both up: gw-1 (priority 0) is primary,
    // gw-2 (priority 10) its backup.
    sa.create_key(&key("k", true, true, i64::MAX), "admin:t", now()).await.unwrap();
    let h = crate::auth::sha256_hex(b"k");
    let mut ids = Vec::new();
    for host in ["gw-1", "gw-2"] {
        let n = sa.enroll("k", &h, &new_node(host), |_, _| true, now()).await.unwrap();
        sa.set_presence(n.id, true, None, "a", now()).await.unwrap();
        sa.set_route_health(n.id, &prefix, true, now()).await.unwrap();
        let priority = if ids.is_empty() { 0 } else { 10 };
        sa.set_route_priority(n.id, &prefix, priority, "admin:t", now()).await.unwrap();
        ids.push(n.id);
    }
    let (gw1, gw2) = (ids[0], ids[1]);
    let cfg = |replica: &str| EngineConfig {
        clock: clock.clone(),
        replica: replica.into(),
        hold_down_secs: 30,
        ..EngineConfig::default()
    };
    // A starts first and takes the lease; B follows.
    let a = Engine::new(sa.clone(), cfg("a")).await.unwrap();
    let b = Engine::new(sb.clone(), cfg("b")).await.unwrap();
    assert!(a.leads() && !b.leads());
    assert_eq!(a.route_order()[&prefix], vec![gw1, gw2]);
    assert_eq!(b.route_order()[&prefix], vec![gw1, gw2]);

    // gw-1 reports the route unhealthy: A fails over, B follows.
    clock.advance(10);
    a.lead().await; // as its background loop does every second
    sa.set_route_health(gw1, &prefix, false, now()).await.unwrap();
    a.refresh().await.unwrap();
    b.refresh().await.unwrap();
    assert_eq!(a.route_order()[&prefix][0], gw2);
    assert_eq!(b.route_order()[&prefix][0], gw2);

    // gw-1 recovers: A holds gw-2 for the hold-down. B restarts meanwhile:
    // deciding alone, with no memory, it would pick gw-1 (the agents on it
    // would route the other way round); it follows the stored gw-2.
    clock.advance(5);
    a.lead().await;
    sa.set_route_health(gw1, &prefix, true, now()).await.unwrap();
    a.refresh().await.unwrap();
    drop(b);
    let b = Engine::new(sb.clone(), cfg("b")).await.unwrap();
    assert_eq!(a.route_order()[&prefix][0], gw2, "hold-down");
    assert!(a.leads() && !b.leads());
    assert_eq!(b.route_order()[&prefix][0], gw2, "a restarted follower disagrees with the lease holder");

    // The hold-down over, A fails back; B follows once it reads the store.
    clock.advance(31);
    a.lead().await;
    a.refresh().await.unwrap();
    assert_eq!(a.route_order()[&prefix][0], gw1);
    b.refresh().await.unwrap();
    assert_eq!(b.route_order()[&prefix][0], gw1);

    // Each change decided, stored and audited once, by A.
    let one = |g: u64| format!("{{\"primary\":{g}}}");
    let expected = vec![("{}".to_owned(), one(gw1)), (one(gw1), one(gw2)), (one(gw2), one(gw1))];
    assert_eq!(primary_audit(&sa).await, expected);
    assert_eq!(sb.snapshot().await.unwrap().primaries[&prefix], gw1);

    // A goes away; its lease runs out and B takes it over. B carries on
    // from the stored decisions: nothing is re-decided or audited again.
    drop(a);
    clock.advance(4);
    b.lead().await;
    assert!(b.leads());
    b.refresh().await.unwrap();
    assert_eq!(b.route_order()[&prefix][0], gw1);
    assert_eq!(primary_audit(&sa).await.len(), expected.len());
    // And now B decides: gw-1 down, B fails over and stores it.
    sb.set_route_health(gw1, &prefix, false, now()).await.unwrap();
    b.refresh().await.unwrap();
    assert_eq!(b.route_order()[&prefix][0], gw2);
    assert_eq!(sa.snapshot().await.unwrap().primaries[&prefix], gw2);
    assert_eq!(primary_audit(&sa).await.last(), Some(&(one(gw1), one(gw2))));
    // Had A stalled rather than stopped, its late decision is refused.
    let err = sa.set_primary((LEASE, "a"), &prefix, Some(gw2), Some(gw1), now()).await.unwrap_err();
    assert!(matches!(err, StoreError::Conflict(_)), "{err}");
    assert_eq!(sb.snapshot().await.unwrap().primaries[&prefix], gw2);
}
