//! Sessions with control: the Sync stream (hello, views applied and
//! acknowledged, health and failover reports, renewals) and the loop that
//! reconnects with backoff while everything local keeps running.

use std::{
    collections::{BTreeMap, VecDeque},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use mesh_client::{
    bearer::Bearer,
    channel::{self as client, Trust},
    view as pbview,
};
use mesh_proto::v1::{self as pb, agent_service_client::AgentServiceClient};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_stream::wrappers::ReceiverStream;

use super::{
    SessionError, SharedControlState, convert,
    credential::{credential, renew},
    err,
    feeder::{Feed, Feeder},
    now_secs,
    report::{advertisement, capabilities, failover_report, health_report, reachable},
    rotation,
};
use crate::{
    config::{Config, ControlConfig},
    keys::PublicKey,
    probe::{self, SharedProbe},
    reach::{self, RouteHealth},
    reconcile::worker::WorkerHandle,
};

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
    /// The node's endpoint candidates from the path manager (empty: none
    /// to report, the configured endpoints stand).
    candidates: watch::Receiver<Vec<String>>,
    candidates_live: bool,
    /// Relay tickets for the path manager.
    tickets: watch::Sender<Option<String>>,
    /// When the current ticket is due for renewal, and the node key and key
    /// expiry it was issued for.
    ticket: TicketState,
    /// The peers' paths, for the health reports.
    paths: crate::path::SharedPaths,
}

/// The current relay ticket's renewal time, and what it was issued for.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct TicketState {
    renew_at: i64,
    key: Vec<u8>,
    key_expiry: i64,
}

/// The shortest time between two renewals of a ticket for the same key.
const TICKET_RENEW_FLOOR_SECS: i64 = 600;

impl TicketState {
    /// Whether a ticket for `key` expiring with it at `key_expiry` is due
    /// at `now`: none yet, another key (a rotation) or key expiry (an
    /// admin extended it), or past half its life.
    fn due(&self, have: bool, key: &[u8], key_expiry: i64, now: i64) -> bool {
        !have || self.key != key || self.key_expiry != key_expiry || now >= self.renew_at
    }

    /// After a ticket expiring at `expires` arrived at `now`: renew at half
    /// its remaining life (12 h tickets: every 6 h), and not sooner than
    /// [`TICKET_RENEW_FLOOR_SECS`]. Near the key's expiry control caps the
    /// ticket there, so renewing sooner would only fetch the same ticket.
    fn issued(key: Vec<u8>, key_expiry: i64, expires: i64, now: i64) -> Self {
        let half = expires.saturating_sub(now) / 2;
        Self { renew_at: now.saturating_add(half.max(TICKET_RENEW_FLOOR_SECS)), key, key_expiry }
    }
}

/// Asks for a relay ticket when the view lists relays and the current one
/// is due ([`TicketState::due`]). With the credential's current token: a
/// rotation or a renewal replaces the one the stream opened with. The path
/// manager sees a ticket only when it differs: each new one is a new attach
/// to every relay.
async fn refresh_ticket(channel: &client::Channel, token: &str, view: Option<&pb::NodeView>, links: &mut Links) {
    let Some(v) = view.filter(|v| !v.relays.is_empty()) else { return };
    if links.tickets.is_closed() {
        return;
    }
    let key = v.self_.as_ref().map(|s| s.wireguard_public_key.clone()).unwrap_or_default();
    let key_expiry = v.self_.as_ref().map_or(0, |s| s.key_expiry_unix);
    let now = now_secs();
    if !links.ticket.due(links.tickets.borrow().is_some(), &key, key_expiry, now) {
        return;
    }
    let mut client = AgentServiceClient::with_interceptor(channel.clone(), Bearer(Some(token.to_owned())));
    match client.relay_ticket(pb::RelayTicketRequest {}).await {
        Ok(r) => {
            let r = r.into_inner();
            links.ticket = TicketState::issued(key, key_expiry, r.expires_unix, now);
            let new = Some(r.ticket);
            links.tickets.send_if_modified(|t| {
                if *t == new {
                    false
                } else {
                    *t = new;
                    true
                }
            });
            tracing::info!(
                expires_unix = r.expires_unix,
                renew_at = links.ticket.renew_at,
                "relay ticket from control"
            );
        }
        Err(e) => tracing::warn!(error = %e, "no relay ticket from control"),
    }
}

/// One session: credential, stream, apply/ack until the stream breaks.
/// `got_view` is set once control sent something (to reset the backoff).
/// `replica` is the index (in `cc.addresses()`) of the control replica to
/// try first; it is set to the one that answered.
async fn session(
    config: &Config,
    cc: &ControlConfig,
    public_key: PublicKey,
    worker: &WorkerHandle,
    got_view: &mut bool,
    replica: &mut usize,
    links: &mut Links,
) -> Result<(), SessionError> {
    // The key file is the truth: a rotation may have replaced the key this
    // agent started with.
    let public_key = crate::keys::load_or_generate(&config.private_key_path()).map_or(public_key, |k| k.public_key());
    let mut cred = credential(config, cc, public_key).await?;
    let addresses = cc.addresses();
    let (channel, used) = client::connect_any(&addresses, *replica, &Trust::AnyPin(cred.pins()?))
        .await
        .map_err(err("connecting to control"))?;
    *replica = used;
    let address = &addresses[used];
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
    tracing::info!(node = cred.node_id, %address, "sync stream open");
    if let Ok(mut st) = links.shared.lock() {
        st.connected = true;
        st.replica = Some(address.clone());
    }
    // The configured routes, every session: a changed `advertise_routes`
    // takes effect at the next start, not only at enrollment.
    let mut advertised = advertisement(cc);
    send(pb::sync_request::Msg::Routes(advertised.clone())).await?;
    // Switches made while control was away.
    while let Some(r) = links.unsent.pop_front() {
        send(pb::sync_request::Msg::Failover(r)).await?;
    }
    // Discovered candidates replace the hello's configured endpoints.
    let mut sent_candidates = Vec::new();
    let mut current: Option<pb::NodeView> = None;
    // Generations order views within this stream only (see
    // `NodeView::epoch`): its first snapshot replaces whatever came before.
    let epoch = rand::random::<u64>() | 1;
    let key_path = config.private_key_path();
    let mut pending_resolved = false;
    // A failed rotation is retried, but not more than once a minute.
    let mut last_failed_rotation: Option<Instant> = None;
    // The key this session rotated away from: views control made for it
    // before it had the new key are stale.
    let mut retired_key: Option<Vec<u8>> = None;
    let mut tick = tokio::time::interval(Duration::from_secs_f64(cc.health_interval_secs));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Checks the probes' verdicts between health ticks (cheap: a lock and a
    // scan of the peers); control's report bucket bounds what this costs it.
    let mut reach_tick = tokio::time::interval(REACH_CHECK);
    reach_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut reported_reach = Vec::new();
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
                    Some(pb::sync_response::Msg::TrustedCas(t)) => {
                        // A CA rotation: the next connection accepts these CAs only.
                        if let Err(e) = cred.set_trusted(&t.certificates_pem, &cred_path) {
                            tracing::warn!(error = %e, "trusted CAs from control not taken");
                        }
                        continue;
                    }
                    None => continue,
                };
                *got_view = true;
                let Some(v) = current.as_ref() else { continue };
                if !pending_resolved && let Some(me) = v.self_.as_ref() {
                    pending_resolved = true;
                    rotation::resolve_pending(&key_path, &me.wireguard_public_key, worker).await?;
                }
                let me = v.self_.as_ref();
                if let Some(me) = me && retired_key.as_ref() == Some(&me.wireguard_public_key) {
                    // Applying it would fail on the key (and nack); the view
                    // for the new key, with everything this one has, follows.
                    tracing::debug!(generation = v.generation, "a view for the retired key: skipped");
                    continue;
                }
                if let Some(me) = me
                    && me.key_rotation_requested
                    && last_failed_rotation.is_none_or(|t| t.elapsed() >= Duration::from_secs(60))
                {
                    tracing::info!("control asks for a WireGuard key rotation");
                    let old = me.wireguard_public_key.clone();
                    match rotation::rotate(&channel, &mut cred, &cred_path, &key_path, worker).await {
                        Ok(()) => {
                            retired_key = Some(old);
                            continue;
                        }
                        Err(e) => {
                            last_failed_rotation = Some(Instant::now());
                            tracing::warn!(error = %e, "key rotation failed; retrying in a minute");
                        }
                    }
                }
                let generation = v.generation;
                let started = Instant::now();
                let (reply, result) = oneshot::channel();
                links.feed.send(Feed { view: v.clone(), epoch, reply }).await.map_err(|_| SessionError("the view feeder stopped".into()))?;
                let result = result.await.unwrap_or_else(|_| Err("the view feeder stopped".into()));
                match &result {
                    Ok(()) => tracing::info!(generation, kind, ms = started.elapsed().as_secs_f64() * 1e3, "applied view from control"),
                    Err(e) => tracing::error!(generation, kind, error = %e, "view from control not applied"),
                }
                send(pb::sync_request::Msg::Ack(pb::Ack { generation, error: result.err().unwrap_or_default() })).await?;
                refresh_ticket(&channel, &cred.token, current.as_ref(), links).await;
                false
            }
            r = links.candidates.changed(), if links.candidates_live => {
                // Gone: no path manager, the hello's endpoints stand.
                links.candidates_live = r.is_ok();
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
            _ = reach_tick.tick() => {
                // A peer went down or came back: tell control now.
                links.probes.lock().map(|p| reachable(&p)).is_ok_and(|r| r != reported_reach)
            }
            _ = tick.tick() => {
                refresh_ticket(&channel, &cred.token, current.as_ref(), links).await;
                if cred.renewal_due(now_secs()) {
                    // A failure is retried at the next tick; the stream goes on.
                    if let Err(e) = renew(&channel, &mut cred, &cred_path).await {
                        tracing::warn!(error = %e, "credential renewal failed");
                    }
                }
                // A site LAN address appeared or changed: the site's other
                // gateways need it to probe this one there.
                let now_advertised = advertisement(cc);
                if now_advertised != advertised {
                    tracing::info!("this gateway's site LAN addresses changed; advertising them again");
                    advertised = now_advertised;
                    send(pb::sync_request::Msg::Routes(advertised.clone())).await?;
                }
                true
            }
        };
        let candidates = links.candidates.borrow_and_update().clone();
        if !candidates.is_empty() && candidates != sent_candidates {
            tracing::info!(?candidates, "reporting endpoint candidates");
            send(pb::sync_request::Msg::Candidates(pb::EndpointCandidates { endpoints: candidates.clone() })).await?;
            sent_candidates = candidates;
        }
        if report_now {
            let Some(st) = worker.status().await else {
                return Err(SessionError("the reconcile worker stopped".into()));
            };
            let probes = links.probes.lock().map(|p| p.clone()).unwrap_or_default();
            reported_reach = reachable(&probes);
            let routes = links.routes.borrow_and_update().clone();
            let paths = links.paths.lock().map(|p| p.clone()).unwrap_or_default();
            send(pb::sync_request::Msg::Health(health_report(&st, current.as_ref(), &routes, &probes, &paths))).await?;
        }
    }
}

/// How often the session looks for a peer whose reachability flipped.
const REACH_CHECK: Duration = Duration::from_millis(100);

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
    let (overrides_tx, overrides_rx) = watch::channel(probe::Overrides::default());
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
        paths: BTreeMap::new(),
    };
    let (paths_plan_tx, paths_plan_rx) = watch::channel(None);
    let (paths_tx, paths_rx) = watch::channel(BTreeMap::new());
    let (candidates_tx, candidates_rx) = watch::channel(Vec::new());
    let (tickets_tx, tickets_rx) = watch::channel(None);
    let shared_paths = shared.lock().map(|s| s.paths.clone()).unwrap_or_default();
    if !cc.relays {
        tracing::info!("relays are off (control.relays = false): endpoints are control's");
    } else if config.listen_port == 0 {
        tracing::warn!("listen_port = 0: no endpoint discovery and no relays (they need a fixed WireGuard port)");
    } else {
        let inputs = crate::path::Inputs {
            key_path: config.private_key_path(),
            listen_port: config.listen_port,
            configured: cc.endpoints.clone(),
            home: cc.relay_region.clone(),
        };
        let out = crate::path::Outputs { paths: paths_tx, candidates: candidates_tx, shared: shared_paths.clone() };
        tokio::spawn(crate::path::run(inputs, paths_plan_rx, tickets_rx, out));
    }
    let feeder = Feeder {
        worker: worker.clone(),
        local,
        plan: plan_tx,
        paths_plan: paths_plan_tx,
        shared: shared.clone(),
        saved: config.state_dir.join("control-view.pb"),
    };
    tokio::spawn(feeder.run(feed_rx, overrides_rx, paths_rx));
    let mut links = Links {
        feed: feed_tx,
        events: events_rx,
        unsent: VecDeque::new(),
        routes,
        routes_checked: true,
        owned: Some(owned_rx),
        probes,
        shared: shared.clone(),
        candidates: candidates_rx,
        candidates_live: true,
        tickets: tickets_tx,
        ticket: TicketState::default(),
        paths: shared_paths,
    };
    let min = Duration::from_millis(100);
    let max = Duration::from_secs_f64(cc.max_backoff_secs);
    let mut backoff = min;
    let replicas = cc.addresses().len();
    // The control replica to try first.
    let mut first = 0;
    loop {
        let mut got_view = false;
        let mut replica = first;
        match session(&config, &cc, public_key, &worker, &mut got_view, &mut replica, &mut links).await {
            Ok(()) => {}
            Err(e) => tracing::warn!(error = %e, "control session ended; keeping the last applied view"),
        }
        if let Ok(mut st) = shared.lock() {
            st.connected = false;
            st.replica = None;
        }
        if got_view {
            backoff = min;
            // A stream that worked and broke: its replica may be gone, so
            // the next attempt starts with the next one (connect_any still
            // comes back to it if no other answers).
            first = (replica + 1) % replicas;
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
    use super::{TICKET_RENEW_FLOOR_SECS, TicketState};

    const DAY: i64 = 86_400;

    #[test]
    fn a_ticket_is_renewed_at_half_life_and_not_in_a_loop_near_the_key_expiry() {
        let key = vec![7; 32];
        let t0 = 1_000_000;
        // A 12 h ticket for a key with 90 days left: renewed after 6 h.
        let t = TicketState::issued(key.clone(), t0 + 90 * DAY, t0 + 12 * 3600, t0);
        assert!(!t.due(true, &key, t0 + 90 * DAY, t0 + 6 * 3600 - 1));
        assert!(t.due(true, &key, t0 + 90 * DAY, t0 + 6 * 3600));
        // None yet, a rotated key, or an extended key expiry: due at once.
        assert!(t.due(false, &key, t0 + 90 * DAY, t0));
        assert!(t.due(true, &[8; 32], t0 + 90 * DAY, t0));
        assert!(t.due(true, &key, t0 + 120 * DAY, t0));
        // The key expires in 2 h, so control caps the ticket there.
        // Renewals come at half the remaining life, and never more than
        // once per floor period: a few fetches, not one per health tick.
        let key_expiry = t0 + 2 * 3600;
        let (mut now, mut last, mut fetches) = (t0, t0, 0);
        let mut t = TicketState::issued(key.clone(), key_expiry, key_expiry, now);
        while now < key_expiry {
            now += 10;
            if t.due(true, &key, key_expiry, now) {
                fetches += 1;
                assert!(now - last >= TICKET_RENEW_FLOOR_SECS, "renewed {} s after the last", now - last);
                last = now;
                t = TicketState::issued(key.clone(), key_expiry, key_expiry, now);
            }
        }
        assert!(fetches <= 6, "{fetches} ticket fetches in the key's last 2 h");
    }
}
