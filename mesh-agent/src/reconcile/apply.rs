//! The applier: executes a plan through the backends, in a fail-closed
//! order, then re-reads everything and diffs again to confirm.
//!
//! Order: make sure the interface exists (a new one is down) -> the guard's
//! known endpoints -> remove the peers that left the view -> enforce the
//! policy -> MTU -> WireGuard device and the other peer changes (one call)
//! -> addresses -> up -> rules added -> routes -> rules removed ->
//! forwarding; after the confirming re-read, the known endpoints again
//! (WireGuard's roamed ones). The policy is in force before any peer is
//! added or the link is up, so a new interface never passes unfiltered
//! traffic.
//!
//! Removing a peer only ever takes access away, so it comes first and does
//! not wait for the policy: a revoked node stops being a peer even when the
//! new policy cannot be installed (map limits, a bad rule). If the policy
//! fails, only the other removals (routes, addresses) run after it; nothing
//! is added, the policy already in force (or, on a new interface, no peer
//! and a down link) keeps denying by default, and the run fails with the
//! policy's error, which the agent reports to control as a nack.
//!
//! Otherwise the first failing step stops the run with an error naming it;
//! nothing is reported as applied until the confirming re-read shows no
//! difference.

use std::{
    collections::BTreeSet,
    fmt,
    net::IpAddr,
    time::{Duration, Instant, SystemTime},
};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use super::{Actual, Changes, Desired, Local, Plan, PolicyEnforcer, diff, known_endpoints};
use crate::{
    keys::PublicKey,
    net::{MAIN_TABLE, NetOps, RouteRule},
    view::{NodeView, ViewError},
    wg::{BackendKind, WgUpdate, WireGuard},
};

/// A step of a reconcile run (named in errors).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    /// Creating the interface / starting the engine.
    Ensure,
    /// Reading the actual state.
    Observe,
    /// Updating the underlay guard's known endpoints.
    KnownEndpoints,
    /// Enforcing the policy.
    Policy,
    /// Setting the MTU.
    Mtu,
    /// Configuring WireGuard (device and peers).
    WireGuard,
    /// Removing an address.
    RemoveAddress(IpNet),
    /// Adding an address.
    AddAddress(IpNet),
    /// Setting the link up.
    Up,
    /// Adding a policy-routing rule.
    AddRule(RouteRule),
    /// Removing a policy-routing rule.
    RemoveRule(RouteRule),
    /// Removing a route.
    RemoveRoute(IpNet),
    /// Adding or replacing a route.
    ReplaceRoute(IpNet),
    /// Turning forwarding on.
    Forwarding,
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Ensure => f.write_str("ensure interface"),
            Self::Observe => f.write_str("read actual state"),
            Self::KnownEndpoints => f.write_str("update the guard's known endpoints"),
            Self::Policy => f.write_str("enforce policy"),
            Self::Mtu => f.write_str("set mtu"),
            Self::WireGuard => f.write_str("configure wireguard"),
            Self::RemoveAddress(a) => write!(f, "remove address {a}"),
            Self::AddAddress(a) => write!(f, "add address {a}"),
            Self::Up => f.write_str("set link up"),
            Self::AddRule(r) => write!(f, "add rule {}", rule_text(r)),
            Self::RemoveRule(r) => write!(f, "remove rule {}", rule_text(r)),
            Self::RemoveRoute(r) => write!(f, "remove route {r}"),
            Self::ReplaceRoute(r) => write!(f, "add route {r}"),
            Self::Forwarding => f.write_str("enable forwarding"),
        }
    }
}

/// A rule as `ip rule` would show it.
fn rule_text(r: &RouteRule) -> String {
    let mut t = format!("{}: ", r.priority);
    if let Some(m) = r.fwmark {
        t.push_str(&format!("fwmark {m:#x} "));
    }
    match r.dst {
        Some(d) => t.push_str(&format!("to {d} ")),
        None => t.push_str(if r.v6 { "from ::/0 " } else { "from all " }),
    }
    t.push_str(&format!("lookup {}", r.table));
    t
}

/// A reconcile run that did not succeed. The node may be partly changed; the
/// next run diffs again from what is actually there.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// The view was refused before anything was touched.
    #[error(transparent)]
    View(#[from] ViewError),
    /// A step failed; the steps after it were not run.
    #[error("reconcile step \"{step}\" failed: {source}")]
    Step {
        /// The failed step.
        step: Step,
        /// Why.
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// Every step succeeded but the re-read state still differs.
    #[error("not converged: after applying, these still differ: {remaining:?}")]
    NotConverged {
        /// What still differs.
        remaining: Changes,
    },
}

fn step<E: std::error::Error + Send + Sync + 'static>(step: Step) -> impl FnOnce(E) -> ApplyError {
    move |e| ApplyError::Step { step, source: Box::new(e) }
}

/// The outcome of a successful reconcile run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Report {
    /// Generation of the view applied.
    pub generation: u64,
    /// WireGuard backend in use.
    pub backend: BackendKind,
    /// What was changed (all zero for a no-op run).
    pub changes: Changes,
    /// Wall time of the whole run (diff, apply, confirming re-read).
    #[serde(with = "secs_f64")]
    pub duration: Duration,
}

mod secs_f64 {
    use std::time::Duration;

    use serde::{Deserialize as _, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_f64(d.as_secs_f64())
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let secs = f64::deserialize(d)?;
        Duration::try_from_secs_f64(secs).map_err(serde::de::Error::custom)
    }
}

/// Reconciles one node: owns the backends.
pub struct Applier {
    local: Local,
    wg: Box<dyn WireGuard>,
    net: Box<dyn NetOps>,
    enforcer: Option<Box<dyn PolicyEnforcer>>,
    /// The known endpoints last given to the enforcer (`None` after a
    /// start: the pinned map may hold anything, so the first run writes).
    known: Option<BTreeSet<IpAddr>>,
}

impl fmt::Debug for Applier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Applier")
            .field("ifname", &self.wg.ifname())
            .field("backend", &self.wg.kind())
            .field("enforcer", &self.enforcer.is_some())
            .finish_non_exhaustive()
    }
}

impl Applier {
    /// An applier over these backends. `local.enforce_policy` is set from
    /// whether an enforcer is given.
    #[must_use]
    pub fn new(
        mut local: Local,
        wg: Box<dyn WireGuard>,
        net: Box<dyn NetOps>,
        enforcer: Option<Box<dyn PolicyEnforcer>>,
    ) -> Self {
        local.enforce_policy = enforcer.is_some();
        Self { local, wg, net, enforcer, known: None }
    }

    /// The WireGuard backend in use.
    #[must_use]
    pub fn backend(&self) -> BackendKind {
        self.wg.kind()
    }

    /// The overlay interface.
    #[must_use]
    pub fn ifname(&self) -> &str {
        self.wg.ifname()
    }

    /// Uses `key` from the next reconcile on (a key rotation): the device
    /// gets it because its public key no longer matches.
    pub fn set_private_key(&mut self, key: crate::keys::SecretKey) {
        self.local.private_key = key;
    }

    /// This node's public key.
    #[must_use]
    pub fn public_key(&self) -> PublicKey {
        self.local.private_key.public_key()
    }

    /// Whether policies are enforced.
    #[must_use]
    pub fn enforces_policy(&self) -> bool {
        self.enforcer.is_some()
    }

    /// The enforcer's counters, if any.
    #[must_use]
    pub fn dataplane_stats(&self) -> Option<super::DataplaneStats> {
        self.enforcer.as_ref().and_then(|e| e.stats())
    }

    /// Reads the actual state.
    pub fn observe(&mut self) -> Result<Actual, ApplyError> {
        let ifname = self.wg.ifname().to_owned();
        let link = self.net.link(&ifname).map_err(step(Step::Observe))?;
        let mut actual = Actual { link, ..Actual::default() };
        if let Some(l) = link {
            actual.wg = self.wg.read().map_err(step(Step::Observe))?;
            actual.addresses = self.net.addresses(l.index).map_err(step(Step::Observe))?;
            actual.routes = self.net.routes(l.index, self.local.routing.table).map_err(step(Step::Observe))?;
            actual.connected = self.net.connected(l.index).map_err(step(Step::Observe))?;
            if self.local.routing.own_table() {
                actual.stale_routes = self.net.routes(l.index, MAIN_TABLE).map_err(step(Step::Observe))?;
            }
        }
        actual.rules = self.net.rules().map_err(step(Step::Observe))?;
        actual.forwarding = self.net.forwarding().map_err(step(Step::Observe))?;
        if let Some(e) = self.enforcer.as_mut() {
            actual.policy = e.in_force(&ifname).map_err(step(Step::Observe))?;
        }
        Ok(actual)
    }

    /// Brings the node to `view`: validate, ensure the interface, diff,
    /// apply, re-read and confirm.
    pub fn reconcile(&mut self, view: &NodeView) -> Result<Report, ApplyError> {
        let start = Instant::now();
        view.validate(&self.public_key())?;
        let desired = Desired::new(view, &self.local);
        if self.wg.ensure().map_err(step(Step::Ensure))? {
            tracing::info!(ifname = %self.wg.ifname(), backend = %self.wg.kind(), "overlay interface created or its engine (re)started");
        }
        let actual = self.observe()?;
        // Before the plan: a new peer's endpoint is known before WireGuard
        // starts a handshake with it.
        self.sync_known_endpoints(&desired, &actual)?;
        let plan = diff(&desired, &actual, SystemTime::now());
        let changes = plan.changes;
        if !plan.is_empty() {
            tracing::info!(generation = view.generation, ?changes, "reconcile: applying changes");
            self.execute(&plan, &actual, view)?;
            let after = self.observe()?;
            let rest = diff(&desired, &after, SystemTime::now());
            if !rest.is_empty() {
                return Err(ApplyError::NotConverged { remaining: rest.changes });
            }
            self.sync_known_endpoints(&desired, &after)?;
        }
        let report =
            Report { generation: view.generation, backend: self.wg.kind(), changes, duration: start.elapsed() };
        tracing::debug!(
            generation = view.generation,
            duration_ms = report.duration.as_secs_f64() * 1e3,
            "reconcile: converged"
        );
        Ok(report)
    }

    /// Gives the enforcer the guard's known endpoints when they changed
    /// since the last run (runs without a change touch nothing).
    fn sync_known_endpoints(&mut self, desired: &Desired, actual: &Actual) -> Result<(), ApplyError> {
        let Some(e) = self.enforcer.as_mut() else { return Ok(()) };
        let known = known_endpoints(desired, actual);
        if self.known.as_ref() == Some(&known) {
            return Ok(());
        }
        e.set_known_endpoints(&known).map_err(step(Step::KnownEndpoints))?;
        tracing::info!(endpoints = ?known, "guard: known endpoints updated");
        self.known = Some(known);
        Ok(())
    }

    fn execute(&mut self, plan: &Plan, actual: &Actual, view: &NodeView) -> Result<(), ApplyError> {
        let ifname = self.wg.ifname().to_owned();
        let (removals, changes): (Vec<_>, Vec<_>) = plan.wg.peers.iter().cloned().partition(|p| p.remove);
        if !removals.is_empty() {
            self.wg.apply(&WgUpdate { peers: removals, ..WgUpdate::default() }).map_err(step(Step::WireGuard))?;
        }
        if plan.policy
            && let Some(e) = self.enforcer.as_mut()
            && let Err(err) = e.enforce(&ifname, &view.policy, view.mtu)
        {
            let err = step(Step::Policy)(err);
            tracing::error!(error = %err, "policy not installed: applying only removals; the policy in force stays");
            if let Some(l) = actual.link {
                self.remove_only(plan, l.index)?;
            }
            return Err(err);
        }
        let index = match actual.link {
            Some(l) => l.index,
            None => {
                let link = self.net.link(&ifname).map_err(step(Step::Ensure))?;
                link.ok_or_else(|| ApplyError::Step {
                    step: Step::Ensure,
                    source: format!("link {ifname} does not exist").into(),
                })?
                .index
            }
        };
        if let Some(mtu) = plan.mtu {
            self.net.set_mtu(index, mtu).map_err(step(Step::Mtu))?;
        }
        let rest = WgUpdate { peers: changes, ..plan.wg.clone() };
        if !rest.is_empty() {
            self.wg.apply(&rest).map_err(step(Step::WireGuard))?;
        }
        for a in &plan.remove_addresses {
            self.net.remove_address(index, *a).map_err(step(Step::RemoveAddress(*a)))?;
        }
        for a in &plan.add_addresses {
            self.net.replace_address(index, *a).map_err(step(Step::AddAddress(*a)))?;
        }
        if plan.up {
            self.net.set_up(index).map_err(step(Step::Up))?;
        }
        let table = self.local.routing.table;
        for r in &plan.add_rules {
            self.net.add_rule(r).map_err(step(Step::AddRule(*r)))?;
        }
        for r in &plan.remove_stale_routes {
            self.net.remove_route(index, MAIN_TABLE, *r).map_err(step(Step::RemoveRoute(*r)))?;
        }
        for r in &plan.remove_routes {
            self.net.remove_route(index, table, *r).map_err(step(Step::RemoveRoute(*r)))?;
        }
        for r in &plan.replace_routes {
            self.net.replace_route(index, table, *r).map_err(step(Step::ReplaceRoute(*r)))?;
        }
        for r in &plan.remove_rules {
            self.net.remove_rule(r).map_err(step(Step::RemoveRule(*r)))?;
        }
        if let Some(f) = plan.forwarding {
            self.net.enable_forwarding(f).map_err(step(Step::Forwarding))?;
        }
        Ok(())
    }

    /// The subtractive steps of `plan` (routes and addresses removed): what
    /// is safe to apply while the new policy is not in force.
    fn remove_only(&mut self, plan: &Plan, index: u32) -> Result<(), ApplyError> {
        for r in &plan.remove_routes {
            self.net.remove_route(index, self.local.routing.table, *r).map_err(step(Step::RemoveRoute(*r)))?;
        }
        for a in &plan.remove_addresses {
            self.net.remove_address(index, *a).map_err(step(Step::RemoveAddress(*a)))?;
        }
        Ok(())
    }

    /// Agent shutdown: `keep` leaves the data path in place. Otherwise the
    /// agent's routes and rules go too (the routes with the link, the rules
    /// here), so nothing of the mesh is left in the host's routing.
    pub fn shutdown(&mut self, keep: bool) -> Result<(), ApplyError> {
        if !keep {
            let ifname = self.wg.ifname().to_owned();
            if let Some(l) = self.net.link(&ifname).map_err(step(Step::Observe))? {
                let table = self.local.routing.table;
                for r in self.net.routes(l.index, table).map_err(step(Step::Observe))? {
                    self.net.remove_route(l.index, table, r).map_err(step(Step::RemoveRoute(r)))?;
                }
            }
            for r in self.net.rules().map_err(step(Step::Observe))? {
                self.net.remove_rule(&r).map_err(step(Step::RemoveRule(r)))?;
            }
        }
        self.wg.shutdown(keep).map_err(step(Step::Ensure))
    }
}
