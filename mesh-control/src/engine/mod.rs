//! The engine: turns the store's state into per-node views and fans them
//! out. Each node's view is computed once per change and published on that
//! node's `watch` channel; every Sync stream of the node reads the latest
//! value at its own pace, so a slow agent skips intermediate generations
//! (it gets a snapshot) instead of holding anyone back.
//!
//! Refreshes are coalesced: a change asks for a refresh and waits for one
//! that started after its request; many changes at once cost one refresh.
//! A background loop polls the store's change counter, which is how changes
//! made by another replica on a shared PostgreSQL arrive.

pub mod clock;
pub mod convert;
pub mod metrics;
pub mod ops;
pub mod view;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ipnet::IpNet;
use mesh_proto::v1 as pb;
use tokio::sync::watch;

use crate::policy::{DEFAULT_POLICY, Policy};
use crate::routes::RouteSelector;
use crate::store::{NodeRecord, Snapshot, Store, StoreError};

pub use clock::{Clock, ManualClock, SystemClock};
pub use metrics::Metrics;

/// Engine settings.
#[derive(Clone, Debug)]
pub struct EngineConfig {
    /// Overlay MTU pushed to agents.
    pub mtu: u32,
    /// Seconds a recovered gateway must stay up before it is primary again.
    pub hold_down_secs: i64,
    /// Node key (and credential) lifetime, seconds.
    pub key_lifetime_secs: i64,
    /// Ask agents to rotate their WireGuard key once it is this old,
    /// seconds (0: never by age).
    pub key_rotation_secs: i64,
    /// Ephemeral nodes offline this long are removed, seconds.
    pub ephemeral_offline_secs: i64,
    /// How often to look for changes made by other replicas.
    pub poll_interval: Duration,
    /// Where "now" comes from (the wall clock but in tests).
    pub clock: Arc<dyn Clock>,
    /// Rate limits and caps.
    pub limits: crate::limits::LimitsConfig,
    /// This replica's name in the store's leases: stable across restarts
    /// of one replica (it takes its lease back at once), different between
    /// replicas.
    pub replica: String,
}

/// Runs CPU-heavy `f` (a recompute over every node) so that the runtime
/// moves its other tasks to another worker meanwhile: streams and acks are
/// not held up behind it. Inline on a current-thread runtime (tests).
fn heavy<R>(f: impl FnOnce() -> R) -> R {
    match tokio::runtime::Handle::try_current() {
        Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => tokio::task::block_in_place(f),
        _ => f(),
    }
}

/// The lease whose holder does the once-per-mesh work (see
/// `store::leases`), and how long it lasts without renewal (renewed every
/// second).
const LEASE: &str = "housekeeping";
const LEASE_SECS: i64 = 3;

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            mtu: 1280,
            hold_down_secs: 30,
            key_lifetime_secs: 90 * 86_400,
            key_rotation_secs: 0,
            ephemeral_offline_secs: 600,
            poll_interval: Duration::from_millis(500),
            clock: Arc::new(SystemClock),
            limits: crate::limits::LimitsConfig::default(),
            replica: format!("engine-{}", crate::auth::secret(6)),
        }
    }
}

/// What [`Engine::key_housekeeping`] remembers between looks.
#[derive(Debug)]
struct KeyWatch {
    /// Nodes already seen expired (audited once).
    expired: std::collections::HashSet<u64>,
    /// When it last looked (expiries before control started are not audited).
    last_look: i64,
}

/// One published generation of a node's view.
#[derive(Debug)]
pub struct Published {
    /// The full view (with its generation).
    pub view: pb::NodeView,
    /// The delta from the previous generation, if there was one.
    pub delta: Option<pb::NodeViewDelta>,
    /// When it was published (for push latency).
    pub at: Instant,
}

/// What subscribers of a node see: `None` once the node is removed.
pub type Slot = watch::Receiver<Option<Arc<Published>>>;

#[derive(Debug, Default)]
struct State {
    snap: Arc<Snapshot>,
    policy: Arc<Policy>,
    policy_generation: u64,
    views: BTreeMap<u64, Arc<Published>>,
    routes: BTreeMap<IpNet, Vec<u64>>,
    selector: RouteSelector,
    /// Each prefix's primary as the store has it: from the last snapshot
    /// read, plus this replica's writes since (see `RouteSelector::follow`).
    stored_primaries: BTreeMap<IpNet, u64>,
    /// What the last view computation keeps for the next (see `view::Memo`).
    memo: view::Memo,
    up_since: HashMap<(u64, IpNet), i64>,
    slots: HashMap<u64, watch::Sender<Option<Arc<Published>>>>,
    acked: HashMap<u64, u64>,
    streams: HashMap<u64, usize>,
    health: HashMap<u64, (Instant, pb::HealthReport)>,
    /// Failover reports per node in the current minute (rate limit).
    failover_reports: HashMap<u64, (Instant, u32)>,
    /// Per node, its last nack (generation, reason) until it applies a view.
    nacks: HashMap<u64, (u64, String)>,
    /// Per node, the data path limits its agent reported (capability 3).
    limits: HashMap<u64, mesh_policy::tables::Limits>,
    /// Per reporting node, its path-change audit entries (rate limit).
    path_audit: crate::relay::paths::AuditLimiter,
}

/// A prefix whose primary the lease holder decided differs from the stored
/// one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PrimaryChange {
    /// The prefix.
    pub prefix: IpNet,
    /// The primary before (none: the prefix was not routed).
    pub from: Option<u64>,
    /// The primary now (none: no gateway serves it any more).
    pub to: Option<u64>,
}

/// The engine (shared by the gRPC services through an `Arc`).
#[derive(Debug)]
pub struct Engine {
    store: Store,
    cfg: EngineConfig,
    state: Mutex<State>,
    refresh_lock: tokio::sync::Mutex<()>,
    requested: AtomicU64,
    completed: AtomicU64,
    next_generation: AtomicU64,
    /// Whether this replica holds the housekeeping lease (as of its last
    /// renewal).
    leader: std::sync::atomic::AtomicBool,
    /// Counters for `/metrics`.
    pub metrics: Metrics,
    /// Rate limits and caps on clients.
    pub limits: crate::limits::Limits,
    audit_tx: watch::Sender<u64>,
}

impl Engine {
    /// An engine over `store`; call [`Engine::refresh`] (or start
    /// [`Engine::run_background`]) to compute the first views.
    pub async fn new(store: Store, cfg: EngineConfig) -> Result<Arc<Self>, StoreError> {
        // Generations grow across restarts of one replica whose clock does
        // not step back: start from the clock (µs). They do not order views
        // across replicas or clock steps; agents therefore compare
        // generations only within one stream (each starts with a snapshot).
        let start = cfg.clock.now_micros().max(1);
        let limits = crate::limits::Limits::new(&cfg.limits);
        let engine = Arc::new(Self {
            store,
            state: Mutex::new(State { selector: RouteSelector::new(cfg.hold_down_secs), ..State::default() }),
            cfg,
            refresh_lock: tokio::sync::Mutex::new(()),
            requested: AtomicU64::new(0),
            completed: AtomicU64::new(0),
            next_generation: AtomicU64::new(start),
            leader: std::sync::atomic::AtomicBool::new(false),
            metrics: Metrics::default(),
            limits,
            audit_tx: watch::channel(0).0,
        });
        engine.lead().await;
        engine.refresh().await?;
        Ok(engine)
    }

    /// Takes or renews the housekeeping lease (see [`Self::leads`]).
    async fn lead(&self) {
        let held = match self.store.try_lease(LEASE, &self.cfg.replica, self.now(), LEASE_SECS).await {
            Ok(held) => held,
            Err(e) => {
                // Without the store nothing is written anyway.
                tracing::warn!(error = %e, "cannot renew the housekeeping lease");
                false
            }
        };
        if self.leader.swap(held, Ordering::SeqCst) != held {
            tracing::info!(replica = %self.cfg.replica, held, "housekeeping lease");
        }
    }

    /// Whether this replica does the once-per-mesh work now.
    fn leads(&self) -> bool {
        self.leader.load(Ordering::SeqCst)
    }

    /// The store.
    #[must_use]
    pub const fn store(&self) -> &Store {
        &self.store
    }

    /// The settings.
    #[must_use]
    pub const fn config(&self) -> &EngineConfig {
        &self.cfg
    }

    /// Unix seconds now, by the engine's clock.
    #[must_use]
    pub fn now(&self) -> i64 {
        self.cfg.clock.now()
    }

    /// The latest snapshot the views were computed from.
    #[must_use]
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.lock().snap.clone()
    }

    /// The active policy and its generation.
    #[must_use]
    pub fn policy(&self) -> (Arc<Policy>, u64) {
        let st = self.lock();
        (st.policy.clone(), st.policy_generation)
    }

    /// Prefix to gateways (primary first).
    #[must_use]
    pub fn route_order(&self) -> BTreeMap<IpNet, Vec<u64>> {
        self.lock().routes.clone()
    }

    /// Generations acknowledged per node.
    #[must_use]
    pub fn acked(&self, node: u64) -> u64 {
        self.lock().acked.get(&node).copied().unwrap_or(0)
    }

    /// Number of open Sync streams.
    #[must_use]
    pub fn connected(&self) -> usize {
        self.lock().streams.values().sum()
    }

    /// Wakes audit followers.
    pub fn audit_changed(&self) {
        self.audit_tx.send_modify(|v| *v += 1);
    }

    /// A receiver that changes when audit entries may have been added.
    #[must_use]
    pub fn audit_watch(&self) -> watch::Receiver<u64> {
        self.audit_tx.subscribe()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Subscribes to `node`'s views.
    #[must_use]
    pub fn subscribe(&self, node: u64) -> Slot {
        let mut st = self.lock();
        let current = st.views.get(&node).cloned();
        st.slots.entry(node).or_insert_with(|| watch::channel(current).0).subscribe()
    }

    /// Records that `node` could not fully apply `generation` (an ack with
    /// an error): kept, shown and exported until the node applies a view.
    pub fn nack(&self, node: u64, generation: u64, error: &str) {
        // The reason is the agent's text: bounded before it is kept.
        let error: String = error.chars().take(500).collect();
        self.metrics.nacks.inc();
        self.lock().nacks.insert(node, (generation, error));
    }

    /// The node's last nack (generation, reason), if it has not applied a
    /// view since.
    #[must_use]
    pub fn nacked(&self, node: u64) -> Option<(u64, String)> {
        self.lock().nacks.get(&node).cloned()
    }

    /// Every node currently nacking, by id.
    #[must_use]
    pub fn nacks(&self) -> BTreeMap<u64, (u64, String)> {
        self.lock().nacks.iter().map(|(id, n)| (*id, n.clone())).collect()
    }

    /// Keeps the data path limits a node's agent reported (`None`: the agent
    /// reports none, nothing is checked for it).
    pub fn set_limits(&self, node: u64, limits: Option<mesh_policy::tables::Limits>) {
        let mut st = self.lock();
        match limits {
            Some(l) => st.limits.insert(node, l),
            None => st.limits.remove(&node),
        };
    }

    /// The limits of every node whose agent reported them.
    #[must_use]
    pub fn limits(&self) -> HashMap<u64, mesh_policy::tables::Limits> {
        self.lock().limits.clone()
    }

    /// Records an ack; returns whether it acknowledged the latest view.
    pub fn ack(&self, node: u64, generation: u64) -> bool {
        let mut st = self.lock();
        st.acked.insert(node, generation);
        st.nacks.remove(&node);
        match st.views.get(&node) {
            Some(p) if p.view.generation == generation => {
                self.metrics.observe_push_latency(p.at.elapsed());
                true
            }
            _ => false,
        }
    }

    /// Keeps a node's latest health report (for metrics and status), and
    /// returns the peers whose path changed since its previous one that
    /// are to be audited, each with the count of changes left out before
    /// it (see [`crate::relay::paths`]).
    pub fn record_health(&self, node: u64, report: pb::HealthReport) -> Vec<(crate::relay::paths::PathChange, u32)> {
        use crate::relay::paths::{self, Admit};
        let mut st = self.lock();
        let changes = st.health.get(&node).map(|(_, old)| paths::changes(old, &report)).unwrap_or_default();
        let now = Instant::now();
        let admitted = changes
            .into_iter()
            .filter_map(|c| match st.path_audit.admit(node, now) {
                Admit::Write { suppressed } => Some((c, suppressed)),
                Admit::Suppressed => {
                    tracing::debug!(node, peer = c.peer, from = %c.from, to = %c.to, "path change over the audit rate limit");
                    None
                }
            })
            .collect();
        st.health.insert(node, (now, report));
        admitted
    }

    /// How many (node, peer) pairs the latest health reports show on each
    /// path: (direct, relay).
    #[must_use]
    pub fn path_counts(&self) -> (u64, u64) {
        let st = self.lock();
        let mut counts = (0, 0);
        for h in st.health.values().flat_map(|(_, r)| &r.peers) {
            match crate::relay::paths::Path::of(h) {
                Some(crate::relay::paths::Path::Direct) => counts.0 += 1,
                Some(crate::relay::paths::Path::Relay(_)) => counts.1 += 1,
                None => {}
            }
        }
        counts
    }

    /// Whether one more failover report of `node` may be audited: at most
    /// 60 a minute, so a misbehaving agent cannot flood the audit log.
    pub fn allow_failover_report(&self, node: u64) -> bool {
        let mut st = self.lock();
        let e = st.failover_reports.entry(node).or_insert((Instant::now(), 0));
        if e.0.elapsed() >= Duration::from_secs(60) {
            *e = (Instant::now(), 0);
        }
        e.1 += 1;
        e.1 <= 60
    }

    /// The WireGuard backend a node last reported.
    #[must_use]
    pub fn backend(&self, node: u64) -> Option<String> {
        self.lock().health.get(&node).map(|(_, r)| r.backend.clone()).filter(|b| !b.is_empty())
    }

    /// The latest health report of every node that sent one, with its age.
    #[must_use]
    pub fn health_reports(&self) -> Vec<(u64, Duration, pb::HealthReport)> {
        let st = self.lock();
        let mut v: Vec<_> = st.health.iter().map(|(id, (at, r))| (*id, at.elapsed(), r.clone())).collect();
        v.sort_by_key(|(id, _, _)| *id);
        v
    }

    /// Sum of the dataplane counters of the latest health reports.
    #[must_use]
    pub fn counters_total(&self) -> pb::DataplaneCounters {
        let st = self.lock();
        let mut t = pb::DataplaneCounters::default();
        for c in st.health.values().filter_map(|(_, h)| h.counters.as_ref()) {
            t.accepted_packets += c.accepted_packets;
            t.denied_packets += c.denied_packets;
            t.mss_clamped += c.mss_clamped;
            t.guard_dropped += c.guard_dropped;
            t.rx_bytes += c.rx_bytes;
            t.tx_bytes += c.tx_bytes;
        }
        t
    }

    /// Counts Sync streams per node; returns the node's count after.
    pub fn stream_opened(&self, node: u64) -> usize {
        let mut st = self.lock();
        let n = st.streams.entry(node).or_default();
        *n += 1;
        *n
    }

    /// See [`Engine::stream_opened`].
    pub fn stream_closed(&self, node: u64) -> usize {
        let mut st = self.lock();
        let n = st.streams.entry(node).or_default();
        *n = n.saturating_sub(1);
        let left = *n;
        if left == 0 {
            st.streams.remove(&node);
        }
        left
    }

    /// The node whose credential (or previous credential, in its grace
    /// period) hashes to `hash`, and which one it is (from memory, then the
    /// store: another replica may have just enrolled it).
    pub async fn node_by_credential(
        &self,
        hash: &str,
    ) -> Result<Option<(NodeRecord, crate::store::CredentialMatch)>, StoreError> {
        let known = self.lock().snap.nodes.iter().find_map(|n| n.credential_matches(hash).map(|m| (n.clone(), m)));
        match known {
            Some(n) => Ok(Some(n)),
            None => Ok(self.store.node_by_credential(hash).await?.and_then(|n| {
                let m = n.credential_matches(hash)?;
                Some((n, m))
            })),
        }
    }

    /// Recomputes the views from the store and publishes the ones that
    /// changed. Returns once a refresh that started after this call has
    /// finished (so the caller's change is visible).
    pub async fn refresh(&self) -> Result<(), StoreError> {
        let want = self.requested.fetch_add(1, Ordering::SeqCst) + 1;
        let _guard = self.refresh_lock.lock().await;
        if self.completed.load(Ordering::SeqCst) >= want {
            return Ok(());
        }
        let covers = self.requested.load(Ordering::SeqCst);
        let snap = self.store.snapshot().await?;
        self.lock().stored_primaries.clone_from(&snap.primaries);
        let changes = heavy(|| self.recompute(Arc::new(snap)));
        self.store_primaries(changes).await;
        self.completed.store(covers, Ordering::SeqCst);
        self.audit_changed();
        Ok(())
    }

    /// Stores (and audits) the primaries this replica decided as the lease
    /// holder. A write that fails is retried by the next recompute, which
    /// finds the same difference; it does not fail the refresh that already
    /// published the views.
    async fn store_primaries(&self, changes: Vec<PrimaryChange>) {
        for c in changes {
            tracing::info!(prefix = %c.prefix, from = ?c.from, to = ?c.to, "route primary changed");
            match self.store.set_primary((LEASE, &self.cfg.replica), &c.prefix, c.from, c.to, self.now()).await {
                Ok(()) => {
                    self.metrics.primary_changes.inc();
                    let mut st = self.lock();
                    match c.to {
                        Some(n) => st.stored_primaries.insert(c.prefix, n),
                        None => st.stored_primaries.remove(&c.prefix),
                    };
                }
                // Retried by the next recompute that still leads.
                Err(e) => tracing::warn!(error = %e, prefix = %c.prefix, "primary change not stored"),
            }
        }
    }

    /// Recomputes every view from `snap`; as the lease holder, returns the
    /// prefixes whose primary it decided differs from the stored one.
    /// Callers hold `refresh_lock` (recomputes do not overlap); the state
    /// lock is held only to read the inputs and to publish the results,
    /// never while computing, so acks, subscriptions and status keep being
    /// served during a large recompute.
    fn recompute(&self, snap: Arc<Snapshot>) -> Vec<PrimaryChange> {
        let started = Instant::now();
        let now = self.now();
        // 1. Inputs.
        let generation = snap.policy.as_ref().map_or(0, |p| p.generation);
        let reparse = {
            let st = self.lock();
            (generation != st.policy_generation || st.snap.version == 0).then_some(())
        };
        // The policy, re-parsed only when its generation changed.
        let parsed = reparse.map(|()| {
            let text = snap.policy.as_ref().map_or(DEFAULT_POLICY, |p| p.text.as_str());
            Arc::new(Policy::parse(text).unwrap_or_else(|problems| {
                // Only validated text is ever stored; keep going default-deny.
                tracing::error!(?problems, generation, "stored policy does not parse; denying everything");
                Policy::default()
            }))
        });
        let leads = self.leads();
        let (policy, mut selector, mut memo, old_up_since, old_views, stored) = {
            let mut st = self.lock();
            if let Some(p) = parsed {
                st.policy = p;
                st.policy_generation = generation;
            }
            let st = &mut *st;
            if leads {
                st.selector.lead(&st.stored_primaries);
            } else {
                st.selector.follow(&st.stored_primaries);
            }
            (
                st.policy.clone(),
                std::mem::take(&mut st.selector),
                std::mem::take(&mut st.memo),
                std::mem::take(&mut st.up_since),
                st.views.clone(),
                st.stored_primaries.clone(),
            )
        };
        // 2. The computation, unlocked.
        // Gateway health: up = online and reporting the route healthy.
        let online: HashMap<u64, bool> = snap.nodes.iter().map(|n| (n.id, n.online)).collect();
        let mut up_since = HashMap::new();
        for r in &snap.routes {
            if r.healthy && online.get(&r.node_id).copied().unwrap_or(false) {
                let since = old_up_since.get(&(r.node_id, r.prefix)).copied().unwrap_or(now);
                up_since.insert((r.node_id, r.prefix), since);
            }
        }
        let input = view::ViewInput {
            snap: &snap,
            policy: &policy,
            policy_generation: generation,
            mtu: self.cfg.mtu,
            now,
            up_since: &up_since,
        };
        let views = view::compute(&input, &mut selector, &mut memo);
        let mut fresh: Vec<(u64, Arc<Published>)> = Vec::new();
        for (id, mut new) in views.nodes {
            let old = old_views.get(&id);
            if old.is_some_and(|o| view::same(&o.view, &new)) {
                continue;
            }
            new.generation = self.next_generation.fetch_add(1, Ordering::SeqCst);
            let delta = old.map(|o| mesh_client::view::delta(&o.view, &new));
            fresh.push((id, Arc::new(Published { view: new, delta, at: Instant::now() })));
        }
        let present: std::collections::HashSet<u64> = snap.nodes.iter().map(|n| n.id).collect();
        // 3. Publishing.
        let mut st = self.lock();
        let st = &mut *st;
        st.selector = selector;
        st.memo = memo;
        st.up_since = up_since;
        let changed = fresh.len() as u64;
        for (id, published) in fresh {
            st.views.insert(id, published.clone());
            match st.slots.get(&id) {
                Some(tx) => {
                    tx.send_replace(Some(published));
                }
                None => {
                    st.slots.insert(id, watch::channel(Some(published)).0);
                }
            }
        }
        // Removed nodes: their streams end.
        let gone: Vec<u64> = st.views.keys().filter(|id| !present.contains(id)).copied().collect();
        for id in gone {
            st.views.remove(&id);
            st.acked.remove(&id);
            st.health.remove(&id);
            st.nacks.remove(&id);
            st.limits.remove(&id);
            st.path_audit.forget(id);
            if let Some(tx) = st.slots.remove(&id) {
                tx.send_replace(None);
            }
        }
        // As the lease holder: what it decided that the store does not have.
        let mut primaries = Vec::new();
        if leads {
            for (prefix, order) in &views.routes {
                let (from, to) = (stored.get(prefix).copied(), order.first().copied());
                if from != to {
                    primaries.push(PrimaryChange { prefix: *prefix, from, to });
                }
            }
            for (prefix, from) in &stored {
                if !views.routes.contains_key(prefix) {
                    primaries.push(PrimaryChange { prefix: *prefix, from: Some(*from), to: None });
                }
            }
        }
        st.routes = views.routes;
        st.snap = snap;
        self.metrics.record_refresh(changed, started.elapsed());
        tracing::debug!(changed, elapsed_ms = started.elapsed().as_millis() as u64, "views recomputed");
        primaries
    }

    /// Runs forever: picks up other replicas' changes, re-evaluates route
    /// hold-downs and removes ephemeral nodes that stayed offline.
    pub async fn run_background(self: Arc<Self>) {
        let mut tick = tokio::time::interval(self.cfg.poll_interval);
        let mut last_full = Instant::now();
        let mut keys = KeyWatch { expired: std::collections::HashSet::new(), last_look: self.now() };
        loop {
            tick.tick().await;
            // Against the published snapshot's version, not the last one
            // seen here: a local change was already recomputed by the
            // handler that made it, and a second recompute of the same
            // version would double the cost of every report.
            match self.store.version().await {
                Ok(v) if v != self.lock().snap.version => {
                    if let Err(e) = self.refresh().await {
                        tracing::warn!(error = %e, "refresh failed");
                    }
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "cannot read the store's change counter"),
            }
            // Hold-downs expire with time alone: re-run selection now and then.
            if last_full.elapsed() >= Duration::from_secs(1) {
                last_full = Instant::now();
                self.lead().await;
                // A full recompute only if an order would change: one over
                // every node each second cost most of an idle core at
                // 10,000 nodes. Under the refresh lock: a recompute in
                // progress has the selector and hold-down clocks out of the
                // state, and a refresh that ran while this waited published
                // a newer snapshot, which a recompute from an older one
                // would undo (removing the nodes enrolled meanwhile).
                {
                    let _guard = self.refresh_lock.lock().await;
                    let due = {
                        let st = self.lock();
                        // The lease changed hands: lead or follow from now.
                        st.selector.follows() == self.leads()
                            || (st.routes.values().any(|g| g.len() > 1)
                                && view::order_changed(&st.snap, &st.up_since, &st.selector, self.now(), &st.routes))
                    };
                    if due {
                        let snap = self.snapshot();
                        let changes = heavy(|| self.recompute(snap));
                        self.store_primaries(changes).await;
                    }
                }
                if self.leads() {
                    self.collect_ephemeral().await;
                }
                self.key_housekeeping(&mut keys).await;
            }
        }
    }

    /// Key lifecycle by time alone: asks agents whose WireGuard key is
    /// older than `key_rotation_secs` to rotate it, and audits keys that
    /// expired since the last look, recomputing the views so that their
    /// peers drop them now rather than at the next unrelated change.
    async fn key_housekeeping(&self, keys: &mut KeyWatch) {
        let now = self.now();
        let snap = self.snapshot();
        let mut expired_now = false;
        for n in &snap.nodes {
            if n.expired(now) {
                if keys.expired.insert(n.id) && n.key_expiry >= keys.last_look {
                    // Every replica drops the node from its views now; the
                    // lease holder audits it.
                    expired_now = true;
                    tracing::warn!(node = n.id, name = %n.name, "node key expired: its peers drop it; it must re-enroll");
                    if !self.leads() {
                        continue;
                    }
                    let after = format!("{{\"key_expiry\":{}}}", n.key_expiry);
                    if let Err(e) = self
                        .store
                        .record_event(
                            "control",
                            "node.key_expired",
                            &format!("node/{}", n.id),
                            String::new(),
                            after,
                            now,
                        )
                        .await
                    {
                        tracing::warn!(node = n.id, error = %e, "could not audit a key expiry");
                    }
                }
                continue;
            }
            keys.expired.remove(&n.id);
            let rotation = self.cfg.key_rotation_secs;
            if rotation > 0 && !n.rotation_requested && now - n.key_created >= rotation && self.leads() {
                tracing::info!(node = n.id, name = %n.name, age_days = (now - n.key_created) / 86_400, "asking for a key rotation by age");
                if let Err(e) = self.store.request_rotation(n.id, "control:key_rotation_days", now).await {
                    tracing::warn!(node = n.id, error = %e, "could not request a key rotation");
                }
            }
        }
        keys.last_look = now;
        if expired_now && let Err(e) = self.refresh().await {
            tracing::warn!(error = %e, "refresh after a key expiry failed");
        }
    }

    async fn collect_ephemeral(&self) {
        let now = self.now();
        let snap = self.snapshot();
        for n in snap
            .nodes
            .iter()
            .filter(|n| n.ephemeral && !n.online && now - n.last_seen >= self.cfg.ephemeral_offline_secs)
        {
            tracing::info!(node = n.id, name = %n.name, "removing ephemeral node offline too long");
            if let Err(e) = self.store.remove_node(n.id, "control", now).await {
                tracing::warn!(node = n.id, error = %e, "could not remove ephemeral node");
            }
        }
    }
}

#[cfg(test)]
mod tests;
