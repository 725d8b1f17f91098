//! The agent's side of mesh-control: enrollment (first start, with the
//! enrollment key) or the stored credential (later), the Sync stream, each
//! generation converted and applied through the reconcile worker then
//! acknowledged, health reports, and reconnection with backoff.
//!
//! While control is away nothing is torn down: the worker keeps the last
//! applied view (persisted, re-applied at restart), so forwarding and
//! enforcement go on (fail-static).

pub mod convert;

use std::{
    collections::{BTreeMap, VecDeque},
    io::Write as _,
    path::Path,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use ipnet::IpNet;
use tokio::sync::{mpsc, oneshot, watch};

use mesh_client::{
    bearer::Bearer,
    channel::{self, Channel, Trust},
    enrollment::EnrollmentKeyText,
    view as pbview,
};
use mesh_proto::v1::{self as pb, agent_service_client::AgentServiceClient};
use serde::{Deserialize, Serialize};
use tokio_stream::wrappers::ReceiverStream;

use crate::{
    agent::WorkerHandle,
    config::{Config, ControlConfig},
    keys::PublicKey,
    probe::{self, ProbeState, SharedProbe, stats::Reach},
    reach::{self, RouteHealth},
    status::Status,
};

/// The credential control gave at enrollment, kept in
/// `<state_dir>/control.json` (0600).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Credential {
    /// Our node id at control.
    pub node_id: u64,
    /// Node name control assigned.
    pub name: String,
    /// Bearer token.
    pub token: String,
    /// SHA-256 of control's CA certificate (hex).
    pub ca_pin: String,
    /// Expiry of the credential (unix seconds).
    pub expires_unix: i64,
    /// When it was issued or last renewed (unix seconds; 0: unknown).
    #[serde(default)]
    pub renewed_unix: i64,
}

/// What the control session knows that the reconcile worker does not, for
/// the metrics endpoint.
#[derive(Clone, Debug, Default)]
pub struct ControlState {
    /// Whether the Sync stream is open.
    pub connected: bool,
    /// Expiry of this node's key at control (unix seconds).
    pub key_expiry_unix: Option<i64>,
    /// Each assigned prefix and its primary gateway's name.
    pub primaries: Vec<(String, String)>,
}

impl ControlState {
    /// Prometheus text of these facts.
    #[must_use]
    pub fn prometheus(&self) -> String {
        let mut s = String::from(
            "# HELP mesh_agent_control_connected Whether the Sync stream to mesh-control is open.\n# TYPE mesh_agent_control_connected gauge\n",
        );
        s.push_str(&format!("mesh_agent_control_connected {}\n", u8::from(self.connected)));
        if let Some(t) = self.key_expiry_unix {
            s.push_str("# HELP mesh_agent_key_expiry_timestamp_seconds When this node's key expires at control.\n");
            s.push_str(&format!(
                "# TYPE mesh_agent_key_expiry_timestamp_seconds gauge\nmesh_agent_key_expiry_timestamp_seconds {t}\n"
            ));
        }
        s.push_str(
            "# HELP mesh_agent_route_primary The primary gateway of each prefix in control's order (1 per prefix).\n",
        );
        s.push_str("# TYPE mesh_agent_route_primary gauge\n");
        for (prefix, gw) in &self.primaries {
            s.push_str(&format!("mesh_agent_route_primary{{prefix=\"{prefix}\",gateway=\"{gw}\"}} 1\n"));
        }
        s
    }

    /// Records the view's facts; `overrides` are the local failover's
    /// choices, which replace control's primary in the metric.
    fn update(shared: &SharedControlState, v: &pb::NodeView, overrides: &BTreeMap<IpNet, u64>) {
        let me = v.self_.as_ref();
        let name = |id: u64| {
            if me.is_some_and(|m| m.id == id) {
                return me.map(|m| m.name.clone()).unwrap_or_default();
            }
            v.peers.iter().find(|p| p.node_id == id).map_or_else(|| format!("node-{id}"), |p| p.name.clone())
        };
        if let Ok(mut st) = shared.lock() {
            st.key_expiry_unix = me.map(|m| m.key_expiry_unix).filter(|&t| t != 0);
            st.primaries = v
                .routes
                .iter()
                .filter_map(|r| {
                    let local = r.prefix.parse::<IpNet>().ok().and_then(|p| overrides.get(&p.trunc()).copied());
                    Some((r.prefix.clone(), name(local.or_else(|| r.gateways.first().copied())?)))
                })
                .collect();
        }
    }
}

/// [`ControlState`] shared between the session and the metrics endpoint.
pub type SharedControlState = std::sync::Arc<std::sync::Mutex<ControlState>>;

/// Why a session with control ended.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct SessionError(String);

/// Maps an error to a [`SessionError`] saying what failed, with the whole
/// source chain (transport errors hide the useful part in their sources).
/// This agent's capabilities; with the eBPF ACL enforcing, its map sizes
/// (capability 3), so that control refuses a policy this node cannot hold
/// instead of sending it a view it must nack.
fn capabilities(enforced: bool) -> pb::Capabilities {
    let l = mesh_policy::tables::Limits::DATAPATH;
    let limits = enforced.then_some(pb::DataplaneLimits {
        max_rules: l.max_rules,
        max_cidrs: l.max_cidrs,
        max_dst_entries: l.max_dst_entries,
        max_policy_entries: l.max_policy_entries,
    });
    pb::Capabilities { limits, ..mesh_proto::capabilities("mesh-agent") }
}

fn err<E: Into<Box<dyn std::error::Error + Send + Sync>>>(what: &str) -> impl Fn(E) -> SessionError + '_ {
    move |e| {
        let e: Box<dyn std::error::Error + Send + Sync> = e.into();
        let mut text = format!("{what}: {e}");
        let mut source = e.source();
        while let Some(s) = source {
            text.push_str(&format!(": {s}"));
            source = s.source();
        }
        SessionError(text)
    }
}

impl Credential {
    /// Whether to renew now: less than half of the lifetime left (a day
    /// when the lifetime is unknown). An expired credential cannot be
    /// renewed: control refuses it, and re-enrollment is the operator's call.
    #[must_use]
    pub fn renewal_due(&self, now: i64) -> bool {
        let lifetime = if self.renewed_unix > 0 { self.expires_unix - self.renewed_unix } else { 2 * 86_400 };
        self.expires_unix - now < lifetime / 2
    }

    fn pin(&self) -> Result<[u8; 32], SessionError> {
        hex::decode(&self.ca_pin)
            .ok()
            .and_then(|v| v.try_into().ok())
            .ok_or_else(|| SessionError("bad CA pin in the credential".into()))
    }

    /// Reads the stored credential, if any.
    pub fn load(path: &Path) -> Result<Option<Self>, SessionError> {
        match std::fs::read_to_string(path) {
            Ok(t) => serde_json::from_str(&t).map(Some).map_err(|e| SessionError(format!("{}: {e}", path.display()))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(SessionError(format!("{}: {e}", path.display()))),
        }
    }

    fn save(&self, path: &Path) -> Result<(), SessionError> {
        use std::os::unix::fs::OpenOptionsExt as _;
        let tmp = path.with_extension("tmp");
        let text = serde_json::to_vec_pretty(self).map_err(|e| SessionError(e.to_string()))?;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(err("writing the credential"))?;
        f.write_all(&text).and_then(|()| f.sync_all()).map_err(err("writing the credential"))?;
        std::fs::rename(&tmp, path).map_err(err("writing the credential"))
    }
}

fn hostname(cc: &ControlConfig) -> String {
    cc.hostname.clone().unwrap_or_else(|| {
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map_or_else(|_| "mesh-agent".into(), |h| h.trim().to_owned())
    })
}

fn enrollment_key(cc: &ControlConfig) -> Result<String, SessionError> {
    if let Some(k) = &cc.enrollment_key {
        return Ok(k.trim().to_owned());
    }
    let path = cc.enrollment_key_file.as_ref().ok_or_else(|| {
        SessionError("not enrolled yet and no control.enrollment_key or control.enrollment_key_file configured".into())
    })?;
    std::fs::read_to_string(path)
        .map(|k| k.trim().to_owned())
        .map_err(|e| SessionError(format!("{}: {e}", path.display())))
}

/// The stored credential, or a new one from enrolling with the key.
async fn credential(config: &Config, cc: &ControlConfig, public_key: PublicKey) -> Result<Credential, SessionError> {
    let path = config.control_credential_path();
    if let Some(c) = Credential::load(&path)? {
        return Ok(c);
    }
    let key = enrollment_key(cc)?;
    let parsed =
        EnrollmentKeyText::parse(&key).ok_or_else(|| SessionError("the enrollment key is malformed".into()))?;
    let pin = parsed.ca_pin.ok_or_else(|| SessionError("the enrollment key carries no CA pin".into()))?;
    let channel = channel::connect(&cc.address, &Trust::Pin(pin)).await.map_err(err("connecting to control"))?;
    let resp = AgentServiceClient::new(channel)
        .enroll(pb::EnrollRequest {
            capabilities: Some(mesh_proto::capabilities("mesh-agent")),
            enrollment_key: key,
            wireguard_public_key: public_key.0.to_vec(),
            hostname: hostname(cc),
            advertised_routes: cc.advertise_routes.iter().map(ToString::to_string).collect(),
            endpoints: cc.endpoints.clone(),
        })
        .await
        .map_err(err("enrolling"))?
        .into_inner();
    let node = resp.node.ok_or_else(|| SessionError("enrollment: no node in the answer".into()))?;
    let cred = resp.credential.ok_or_else(|| SessionError("enrollment: no credential in the answer".into()))?;
    let c = Credential {
        node_id: node.id,
        name: node.name,
        token: cred.token,
        ca_pin: hex::encode(pin),
        expires_unix: cred.expires_unix,
        renewed_unix: now_secs(),
    };
    c.save(&path)?;
    tracing::info!(node = c.node_id, name = %c.name, state = ?node.state, "enrolled with control");
    Ok(c)
}

/// Seconds since the epoch, as an integer.
fn now_secs() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

fn ms(d: Option<Duration>) -> f64 {
    d.map_or(-1.0, |d| d.as_secs_f64() * 1e3)
}

/// The health report from the agent's status and probes: per-peer
/// handshake age, traffic, probe RTT and loss; the health of the routes
/// this node advertises; the backend.
#[must_use]
pub fn health_report(
    status: &Status,
    view: Option<&pb::NodeView>,
    routes: &[RouteHealth],
    probes: &ProbeState,
) -> pb::HealthReport {
    let now = now_secs();
    let ids: BTreeMap<Vec<u8>, u64> =
        view.map(|v| v.peers.iter().map(|p| (p.wireguard_public_key.clone(), p.node_id)).collect()).unwrap_or_default();
    let peers = status
        .peers
        .iter()
        .filter_map(|p| {
            let id = *ids.get(p.public_key.0.as_slice())?;
            let age = p.last_handshake_unix.map_or(-1, |t| (now - i64::try_from(t).unwrap_or(now)).max(0) * 1000);
            let mut h = pb::PeerHealth {
                node_id: id,
                handshake_age_ms: age,
                probe_rtt_ms: -1.0,
                probe_loss: 0.0,
                probe_rtt_p50_ms: -1.0,
                probe_rtt_p95_ms: -1.0,
                probe_up: false,
                rx_bytes: p.rx_bytes,
                tx_bytes: p.tx_bytes,
            };
            if let Some(e) = probes.peers.get(&id) {
                h.probe_rtt_ms = ms(e.stats.last_rtt());
                h.probe_loss = e.stats.loss_ratio();
                h.probe_rtt_p50_ms = ms(e.stats.quantile(0.5));
                h.probe_rtt_p95_ms = ms(e.stats.quantile(0.95));
                h.probe_up = e.stats.reach() == Reach::Up;
            }
            Some(h)
        })
        .collect();
    let (rx, tx) = status.peers.iter().fold((0, 0), |(r, t), p| (r + p.rx_bytes, t + p.tx_bytes));
    pb::HealthReport {
        peers,
        routes: routes
            .iter()
            .map(|r| {
                let owned = probes.owned.get(&r.prefix.trunc());
                pb::RouteHealth {
                    prefix: r.prefix.to_string(),
                    healthy: r.healthy,
                    detail: r.detail.clone(),
                    owner: owned.is_some(),
                    owner_since_unix: owned.map_or(0, |o| o.since_unix),
                }
            })
            .collect(),
        counters: Some(pb::DataplaneCounters { rx_bytes: rx, tx_bytes: tx, ..Default::default() }),
        backend: status.backend.as_ref().map(|b| b.kind.to_string()).unwrap_or_default(),
    }
}

/// The routes this gateway advertises, with their options.
fn advertisement(cc: &ControlConfig) -> pb::RouteAdvertisement {
    pb::RouteAdvertisement {
        prefixes: cc.advertise_routes.iter().map(ToString::to_string).collect(),
        options: cc
            .route_options
            .iter()
            .map(|(prefix, o)| pb::RouteOptions {
                prefix: prefix.to_string(),
                virtual_addresses: o.virtual_addresses.iter().map(ToString::to_string).collect(),
                snat: o.snat,
            })
            .collect(),
    }
}

/// The report of a local switch, stamped now.
fn failover_report(e: probe::failover::Event) -> pb::FailoverReport {
    let at = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(0));
    pb::FailoverReport {
        prefix: e.prefix.to_string(),
        from_node: e.from,
        to_node: e.to,
        reason: e.reason,
        at_unix_ms: at,
    }
}

/// A view from control for the feeder, with where to say how applying it went.
struct Feed {
    view: pb::NodeView,
    reply: oneshot::Sender<Result<(), String>>,
}

/// The view feeder: owns the last view from control and the local
/// failover's overrides, and applies their combination through the
/// reconcile worker whenever either changes. It outlives sessions, so local
/// failover keeps working while control is away.
struct Feeder {
    worker: WorkerHandle,
    local: convert::Local,
    plan: watch::Sender<probe::Plan>,
    shared: SharedControlState,
    /// Where the last view from control is kept, so that an agent restarted
    /// while control is away still knows each prefix's gateway order.
    saved: std::path::PathBuf,
}

impl Feeder {
    async fn apply(&self, v: &pb::NodeView, overrides: &BTreeMap<IpNet, u64>) -> Result<(), String> {
        ControlState::update(&self.shared, v, overrides);
        let local = convert::Local { overrides: overrides.clone(), ..self.local.clone() };
        let nv = convert::node_view(v, &local).map_err(|e| e.to_string())?;
        self.worker.apply(nv).await.map(|_| ())
    }

    /// The view saved by the last run, if any (a broken file is logged and
    /// ignored: control sends a new one).
    fn load(&self) -> Option<pb::NodeView> {
        use prost::Message as _;
        let bytes = std::fs::read(&self.saved).ok()?;
        pb::NodeView::decode(bytes.as_slice())
            .inspect_err(
                |e| tracing::warn!(path = %self.saved.display(), error = %e, "ignoring the saved control view"),
            )
            .ok()
    }

    fn save(&self, v: &pb::NodeView) {
        use prost::Message as _;
        let tmp = self.saved.with_extension("tmp");
        if let Err(e) = std::fs::write(&tmp, v.encode_to_vec()).and_then(|()| std::fs::rename(&tmp, &self.saved)) {
            tracing::warn!(path = %self.saved.display(), error = %e, "could not save the control view");
        }
    }

    async fn run(self, mut views: mpsc::Receiver<Feed>, mut overrides: watch::Receiver<BTreeMap<IpNet, u64>>) {
        // The worker re-applies the last applied view by itself; the saved
        // control view only feeds the prober and later overrides.
        let mut current = self.load();
        if let Some(v) = &current {
            self.plan.send_replace(convert::probe_plan(v, &self.local, false));
        }
        // False once the prober is gone (or was never started): then only
        // views from control come in.
        let mut prober = true;
        loop {
            tokio::select! {
                feed = views.recv() => {
                    let Some(Feed { view, reply }) = feed else { return };
                    self.plan.send_replace(convert::probe_plan(&view, &self.local, true));
                    let o = overrides.borrow_and_update().clone();
                    let result = self.apply(&view, &o).await;
                    if result.is_ok() {
                        self.save(&view);
                    }
                    let _ = reply.send(result);
                    current = Some(view);
                }
                r = overrides.changed(), if prober => {
                    if r.is_err() {
                        prober = false;
                        continue;
                    }
                    let o = overrides.borrow_and_update().clone();
                    if let Some(v) = &current {
                        match self.apply(v, &o).await {
                            Ok(()) => tracing::info!(generation = v.generation, overrides = ?o, "applied local failover"),
                            Err(e) => tracing::error!(error = %e, "local failover not applied"),
                        }
                    }
                }
            }
        }
    }
}

/// What a session shares with the long-lived parts of the control module.
struct Links {
    feed: mpsc::Sender<Feed>,
    events: mpsc::Receiver<probe::failover::Event>,
    /// Failover reports not yet delivered to control.
    unsent: VecDeque<pb::FailoverReport>,
    routes: watch::Receiver<Vec<RouteHealth>>,
    /// False once the reachability checks are gone (a node that advertises
    /// nothing has none): their channel is then no longer polled.
    routes_checked: bool,
    /// What this gateway owns (a change is reported at once); `None` once
    /// the prober is gone.
    owned: Option<watch::Receiver<probe::owner::Ownership>>,
    probes: SharedProbe,
    shared: SharedControlState,
}

/// Renews the credential with control (same WireGuard key) and stores it.
async fn renew(channel: &Channel, cred: &mut Credential, path: &Path) -> Result<(), SessionError> {
    let mut client = AgentServiceClient::with_interceptor(channel.clone(), Bearer(Some(cred.token.clone())));
    let resp = client.renew(pb::RenewRequest::default()).await.map_err(err("renewing the credential"))?.into_inner();
    let c = resp.credential.ok_or_else(|| SessionError("renewal: no credential in the answer".into()))?;
    cred.token = c.token;
    cred.expires_unix = c.expires_unix;
    cred.renewed_unix = now_secs();
    cred.save(path)?;
    tracing::info!(node = cred.node_id, expires_unix = cred.expires_unix, "credential renewed");
    Ok(())
}

/// One session: credential, stream, apply/ack until the stream breaks.
/// `got_view` is set once control sent something (to reset the backoff).
async fn session(
    config: &Config,
    cc: &ControlConfig,
    public_key: PublicKey,
    worker: &WorkerHandle,
    got_view: &mut bool,
    links: &mut Links,
) -> Result<(), SessionError> {
    let mut cred = credential(config, cc, public_key).await?;
    let channel =
        channel::connect(&cc.address, &Trust::Pin(cred.pin()?)).await.map_err(err("connecting to control"))?;
    let cred_path = config.control_credential_path();
    if cred.renewal_due(now_secs()) {
        renew(&channel, &mut cred, &cred_path).await?;
    }
    let mut client = AgentServiceClient::with_interceptor(channel.clone(), Bearer(Some(cred.token.clone())));
    let status = worker.status().await.ok_or_else(|| SessionError("the reconcile worker stopped".into()))?;
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    let send = |msg| {
        let tx = tx.clone();
        async move { tx.send(pb::SyncRequest { msg: Some(msg) }).await.map_err(|_| SessionError("stream closed".into())) }
    };
    send(pb::sync_request::Msg::Hello(pb::SyncHello {
        capabilities: Some(capabilities(status.policy_enforced)),
        last_generation: status.applied_generation.unwrap_or(0),
        endpoints: cc.endpoints.clone(),
        node_id: cred.node_id,
    }))
    .await?;
    let mut stream = client.sync(ReceiverStream::new(rx)).await.map_err(err("opening the sync stream"))?.into_inner();
    tracing::info!(node = cred.node_id, address = %cc.address, "sync stream open");
    if let Ok(mut st) = links.shared.lock() {
        st.connected = true;
    }
    // The configured routes, every session: a changed `advertise_routes`
    // takes effect at the next start, not only at enrollment.
    send(pb::sync_request::Msg::Routes(advertisement(cc))).await?;
    // Switches made while control was away.
    while let Some(r) = links.unsent.pop_front() {
        send(pb::sync_request::Msg::Failover(r)).await?;
    }
    let mut current: Option<pb::NodeView> = None;
    let mut rotation_warned = false;
    let mut tick = tokio::time::interval(Duration::from_secs_f64(cc.health_interval_secs));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let report_now = tokio::select! {
            msg = stream.message() => {
                let msg = msg.map_err(err("sync stream"))?.ok_or_else(|| SessionError("control ended the stream".into()))?;
                let kind = match msg.msg {
                    Some(pb::sync_response::Msg::Snapshot(v)) => { current = Some(v); "snapshot" }
                    Some(pb::sync_response::Msg::Delta(d)) => {
                        let v = current.as_mut().ok_or_else(|| SessionError("delta before any snapshot".into()))?;
                        // A delta on the wrong base: reconnect, the new stream starts with a snapshot.
                        pbview::apply(v, &d).map_err(err("applying a delta"))?;
                        "delta"
                    }
                    None => continue,
                };
                *got_view = true;
                let Some(v) = current.as_ref() else { continue };
                if !rotation_warned && v.self_.as_ref().is_some_and(|m| m.key_rotation_requested) {
                    rotation_warned = true;
                    tracing::warn!("control asks for a key rotation; this agent renews its credential but does not rotate its WireGuard key yet");
                }
                let generation = v.generation;
                let started = Instant::now();
                let (reply, result) = oneshot::channel();
                links.feed.send(Feed { view: v.clone(), reply }).await.map_err(|_| SessionError("the view feeder stopped".into()))?;
                let result = result.await.unwrap_or_else(|_| Err("the view feeder stopped".into()));
                match &result {
                    Ok(()) => tracing::info!(generation, kind, ms = started.elapsed().as_secs_f64() * 1e3, "applied view from control"),
                    Err(e) => tracing::error!(generation, kind, error = %e, "view from control not applied"),
                }
                send(pb::sync_request::Msg::Ack(pb::Ack { generation, error: result.err().unwrap_or_default() })).await?;
                false
            }
            Some(e) = links.events.recv() => {
                let report = failover_report(e);
                if let Err(err) = send(pb::sync_request::Msg::Failover(report.clone())).await {
                    links.unsent.push_back(report);
                    return Err(err);
                }
                false
            }
            r = links.routes.changed(), if links.routes_checked => {
                // A route's health changed: tell control now, not at the next tick.
                links.routes_checked = r.is_ok();
                r.is_ok()
            }
            r = async { links.owned.as_mut()?.changed().await.ok() } , if links.owned.is_some() => {
                // Ownership moved: control audits it and shows it now.
                if r.is_none() {
                    links.owned = None;
                }
                r.is_some()
            }
            _ = tick.tick() => {
                if cred.renewal_due(now_secs()) {
                    // A failure is retried at the next tick; the stream goes on.
                    if let Err(e) = renew(&channel, &mut cred, &cred_path).await {
                        tracing::warn!(error = %e, "credential renewal failed");
                    }
                }
                true
            }
        };
        if report_now {
            let Some(st) = worker.status().await else {
                return Err(SessionError("the reconcile worker stopped".into()));
            };
            let probes = links.probes.lock().map(|p| p.clone()).unwrap_or_default();
            let routes = links.routes.borrow_and_update().clone();
            send(pb::sync_request::Msg::Health(health_report(&st, current.as_ref(), &routes, &probes))).await?;
        }
    }
}

/// Runs forever: the reachability checks, the prober, the view feeder, and
/// sessions with control, reconnecting with exponential backoff (capped at
/// `max_backoff_secs`, with jitter) in between.
pub async fn run(
    config: Config,
    public_key: PublicKey,
    worker: WorkerHandle,
    shared: SharedControlState,
    probes: SharedProbe,
    owned: watch::Sender<probe::owner::Ownership>,
) {
    let Some(cc) = config.control.clone() else { return };
    let routes = reach::spawn(
        cc.advertise_routes.clone(),
        cc.reachability.clone(),
        Duration::from_secs_f64(cc.reachability_interval_secs),
        Duration::from_secs_f64(cc.reachability_timeout_secs),
    );
    let (plan_tx, plan_rx) = watch::channel(probe::Plan::default());
    let (overrides_tx, overrides_rx) = watch::channel(BTreeMap::new());
    let (events_tx, events_rx) = mpsc::channel(256);
    let owned_rx = owned.subscribe();
    if config.probe.port == 0 {
        tracing::warn!("probe.port = 0: no health probes and no local failover");
        drop(overrides_tx);
    } else {
        let out = probe::Outputs { overrides: overrides_tx, events: events_tx, shared: probes.clone(), owned };
        tokio::spawn(probe::run(config.probe.clone(), config.interface.clone(), plan_rx, routes.clone(), out));
    }
    let (feed_tx, feed_rx) = mpsc::channel(4);
    let local = convert::Local {
        advertised: cc.advertise_routes.clone(),
        persistent_keepalive: cc.persistent_keepalive,
        probe_port: config.probe.port,
        overrides: BTreeMap::new(),
    };
    let feeder = Feeder {
        worker: worker.clone(),
        local,
        plan: plan_tx,
        shared: shared.clone(),
        saved: config.state_dir.join("control-view.pb"),
    };
    tokio::spawn(feeder.run(feed_rx, overrides_rx));
    let mut links = Links {
        feed: feed_tx,
        events: events_rx,
        unsent: VecDeque::new(),
        routes,
        routes_checked: true,
        owned: Some(owned_rx),
        probes,
        shared: shared.clone(),
    };
    let min = Duration::from_millis(100);
    let max = Duration::from_secs_f64(cc.max_backoff_secs);
    let mut backoff = min;
    loop {
        let mut got_view = false;
        match session(&config, &cc, public_key, &worker, &mut got_view, &mut links).await {
            Ok(()) => {}
            Err(e) => tracing::warn!(error = %e, "control session ended; keeping the last applied view"),
        }
        if let Ok(mut st) = shared.lock() {
            st.connected = false;
        }
        if got_view {
            backoff = min;
        }
        // Jitter (0-25 %) so a fleet does not reconnect in lockstep after a control restart.
        let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
        let wait = backoff + backoff.mul_f64(f64::from(nanos % 1000) / 4000.0);
        // Meanwhile, local switches queue up for the next session (bounded).
        let deadline = tokio::time::Instant::now() + wait;
        while let Ok(Some(e)) = tokio::time::timeout_at(deadline, links.events.recv()).await {
            if links.unsent.len() >= 256 {
                links.unsent.pop_front();
            }
            links.unsent.push_back(failover_report(e));
        }
        backoff = (backoff * 2).min(max);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renewal_at_half_life() {
        let c = |renewed_unix, expires_unix| Credential {
            node_id: 1,
            name: "n".into(),
            token: "t".into(),
            ca_pin: String::new(),
            expires_unix,
            renewed_unix,
        };
        // Issued at 1000 for 1000 s: due from 1500 on.
        assert!(!c(1000, 2000).renewal_due(1499));
        assert!(c(1000, 2000).renewal_due(1501));
        // Unknown lifetime (older credential files): due within a day.
        assert!(!c(0, 100_000 + 86_401).renewal_due(100_000));
        assert!(c(0, 100_000 + 86_399).renewal_due(100_000));
    }
}
