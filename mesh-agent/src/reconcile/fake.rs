//! In-memory fakes of the backends, for tests of reconcile (here and in other
//! crates): one shared [`FakeState`] that tests inspect and tamper with, and
//! failure injection by operation name.

use std::{
    collections::BTreeSet,
    net::IpAddr,
    sync::{Arc, Mutex, MutexGuard},
};

use ipnet::IpNet;
use mesh_policy::CompiledPolicy;

use super::{Actual, EnforcerError, PolicyDigest, PolicyEnforcer};
use crate::{
    net::{Forwarding, LinkState, MAIN_TABLE, NetError, NetOps, RouteRule},
    wg::{BackendKind, WgDevice, WgError, WgPeer, WgUpdate, WireGuard},
};

/// Everything the fakes hold.
#[derive(Debug, Default)]
pub struct FakeState {
    /// What is in place (read back as it is; fields reachable through
    /// `Deref`).
    pub actual: Actual,
    /// Operations that fail while listed (`"wg.apply"`, `"replace_route"`,
    /// `"enforce"`, ... : the method names).
    pub fail: BTreeSet<&'static str>,
    /// Every mutating operation, in order.
    pub log: Vec<&'static str>,
    /// The guard's known endpoints, as the enforcer was last told.
    pub known_endpoints: BTreeSet<IpAddr>,
}

impl std::ops::Deref for FakeState {
    type Target = Actual;

    fn deref(&self) -> &Actual {
        &self.actual
    }
}

impl std::ops::DerefMut for FakeState {
    fn deref_mut(&mut self) -> &mut Actual {
        &mut self.actual
    }
}

/// The shared state.
pub type Shared = Arc<Mutex<FakeState>>;

fn lock(s: &Shared) -> MutexGuard<'_, FakeState> {
    s.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn gate(s: &mut FakeState, op: &'static str) -> bool {
    s.log.push(op);
    s.fail.contains(op)
}

/// Applies `u` to `dev` with WireGuard's semantics: an allowed IP given to a
/// peer is taken away from whichever peer had it.
pub fn apply_update(dev: &mut WgDevice, u: &WgUpdate) {
    if let Some(k) = &u.private_key {
        dev.public_key = Some(k.public_key());
    }
    if let Some(p) = u.listen_port {
        dev.listen_port = p;
    }
    if let Some(m) = u.fwmark {
        dev.fwmark = (m != 0).then_some(m);
    }
    for p in &u.peers {
        if p.remove {
            dev.peers.remove(&p.public_key);
            continue;
        }
        if let Some(ips) = &p.allowed_ips {
            for other in dev.peers.iter_mut().filter(|(k, _)| **k != p.public_key) {
                for ip in ips {
                    other.1.allowed_ips.remove(ip);
                }
            }
        }
        let peer: &mut WgPeer = dev.peers.entry(p.public_key).or_default();
        if let Some(ips) = &p.allowed_ips {
            peer.allowed_ips = ips.iter().copied().collect();
        }
        if let Some(e) = p.endpoint {
            peer.endpoint = Some(e);
        }
        if let Some(k) = p.persistent_keepalive {
            peer.persistent_keepalive = (k != 0).then_some(k);
        }
        if let Some(psk) = &p.preshared_key {
            peer.preshared_key.clone_from(psk);
        }
    }
}

/// A fake WireGuard backend.
#[derive(Debug)]
pub struct FakeWg {
    /// The state.
    pub state: Shared,
    /// The interface name.
    pub ifname: String,
}

impl WireGuard for FakeWg {
    fn kind(&self) -> BackendKind {
        BackendKind::Userspace
    }

    fn ifname(&self) -> &str {
        &self.ifname
    }

    fn ensure(&mut self) -> Result<bool, WgError> {
        let mut s = lock(&self.state);
        if s.link.is_some() {
            return Ok(false);
        }
        if gate(&mut s, "ensure") {
            return Err(WgError::Engine { ifname: self.ifname.clone(), message: "injected failure".into() });
        }
        s.link = Some(LinkState { index: 7, up: false, mtu: 1500 });
        s.wg = WgDevice::default();
        s.addresses.clear();
        s.routes.clear();
        Ok(true)
    }

    fn read(&self) -> Result<WgDevice, WgError> {
        Ok(lock(&self.state).wg.clone())
    }

    fn apply(&mut self, update: &WgUpdate) -> Result<(), WgError> {
        let mut s = lock(&self.state);
        if gate(&mut s, "wg.apply") {
            return Err(WgError::Engine { ifname: self.ifname.clone(), message: "injected failure".into() });
        }
        apply_update(&mut s.wg, update);
        Ok(())
    }

    fn shutdown(&mut self, keep: bool) -> Result<(), WgError> {
        if !keep {
            lock(&self.state).link = None;
        }
        Ok(())
    }
}

/// A fake network.
#[derive(Debug)]
pub struct FakeNet {
    /// The state.
    pub state: Shared,
}

fn injected(op: &str) -> NetError {
    NetError::Netlink { op: op.to_owned(), message: "injected failure".into(), errno: None }
}

impl FakeNet {
    fn mutate(&self, op: &'static str, f: impl FnOnce(&mut FakeState)) -> Result<(), NetError> {
        let mut s = lock(&self.state);
        if gate(&mut s, op) {
            return Err(injected(op));
        }
        f(&mut s);
        Ok(())
    }
}

impl NetOps for FakeNet {
    fn link(&mut self, _name: &str) -> Result<Option<LinkState>, NetError> {
        Ok(lock(&self.state).link)
    }

    fn set_mtu(&mut self, _index: u32, mtu: u32) -> Result<(), NetError> {
        self.mutate("set_mtu", |s| {
            if let Some(l) = s.link.as_mut() {
                l.mtu = mtu;
            }
        })
    }

    fn set_up(&mut self, _index: u32) -> Result<(), NetError> {
        self.mutate("set_up", |s| {
            if let Some(l) = s.link.as_mut() {
                l.up = true;
            }
        })
    }

    fn addresses(&mut self, _index: u32) -> Result<BTreeSet<IpNet>, NetError> {
        Ok(lock(&self.state).addresses.clone())
    }

    fn replace_address(&mut self, _index: u32, addr: IpNet) -> Result<(), NetError> {
        self.mutate("replace_address", |s| {
            s.addresses.insert(addr);
        })
    }

    fn remove_address(&mut self, _index: u32, addr: IpNet) -> Result<(), NetError> {
        self.mutate("remove_address", |s| {
            s.addresses.remove(&addr);
        })
    }

    // The main table's routes are `stale_routes` (what an older release
    // left there), every other table's are `routes`.
    fn routes(&mut self, _index: u32, table: u32) -> Result<BTreeSet<IpNet>, NetError> {
        let s = lock(&self.state);
        Ok(if table == MAIN_TABLE { s.stale_routes.clone() } else { s.routes.clone() })
    }

    fn replace_route(&mut self, _index: u32, table: u32, dst: IpNet) -> Result<(), NetError> {
        self.mutate("replace_route", |s| {
            if table == MAIN_TABLE { &mut s.stale_routes } else { &mut s.routes }.insert(dst);
        })
    }

    fn remove_route(&mut self, _index: u32, table: u32, dst: IpNet) -> Result<(), NetError> {
        self.mutate("remove_route", |s| {
            if table == MAIN_TABLE { &mut s.stale_routes } else { &mut s.routes }.remove(&dst);
        })
    }

    fn connected(&mut self, _index: u32) -> Result<BTreeSet<IpNet>, NetError> {
        Ok(lock(&self.state).connected.clone())
    }

    fn rules(&mut self) -> Result<BTreeSet<RouteRule>, NetError> {
        Ok(lock(&self.state).rules.clone())
    }

    fn add_rule(&mut self, rule: &RouteRule) -> Result<(), NetError> {
        self.mutate("add_rule", |s| {
            s.rules.insert(*rule);
        })
    }

    fn remove_rule(&mut self, rule: &RouteRule) -> Result<(), NetError> {
        self.mutate("remove_rule", |s| {
            s.rules.remove(rule);
        })
    }

    fn forwarding(&mut self) -> Result<Forwarding, NetError> {
        Ok(lock(&self.state).forwarding)
    }

    fn enable_forwarding(&mut self, on: Forwarding) -> Result<(), NetError> {
        self.mutate("enable_forwarding", |s| {
            s.forwarding.ipv4 |= on.ipv4;
            s.forwarding.ipv6 |= on.ipv6;
        })
    }
}

/// A fake policy enforcer.
#[derive(Debug)]
pub struct FakeEnforcer {
    /// The state.
    pub state: Shared,
}

impl PolicyEnforcer for FakeEnforcer {
    fn in_force(&mut self, _overlay_if: &str) -> Result<Option<PolicyDigest>, EnforcerError> {
        Ok(lock(&self.state).policy)
    }

    fn enforce(&mut self, _overlay_if: &str, policy: &CompiledPolicy, _mtu: u32) -> Result<(), EnforcerError> {
        let mut s = lock(&self.state);
        if gate(&mut s, "enforce") {
            return Err(EnforcerError("injected failure".into()));
        }
        s.policy = Some(PolicyDigest::of(policy));
        Ok(())
    }

    fn set_known_endpoints(&mut self, endpoints: &BTreeSet<IpAddr>) -> Result<(), EnforcerError> {
        let mut s = lock(&self.state);
        if gate(&mut s, "set_known_endpoints") {
            return Err(EnforcerError("injected failure".into()));
        }
        s.known_endpoints.clone_from(endpoints);
        Ok(())
    }
}
