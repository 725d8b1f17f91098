//! The real [`PolicyEnforcer`]: the eBPF dataplane (TC ACL and MSS clamp on
//! the overlay interface, optionally the XDP guard on the underlay one).
//!
//! The dataplane pins its maps and attachments, so enforcement outlives the
//! agent; after a restart the digest of the policy in force is unknown here
//! and reconcile installs the desired policy again (an atomic swap to an
//! equal policy: harmless).

use std::{collections::BTreeSet, ffi::CString, net::IpAddr};

use mesh_policy::CompiledPolicy;

use crate::{
    dataplane::Dataplane,
    reconcile::{EnforcerError, PolicyDigest, PolicyEnforcer},
};

/// [`PolicyEnforcer`] over [`Dataplane`].
#[derive(Debug)]
pub struct DataplaneEnforcer {
    dp: Dataplane,
    /// (interface, ifindex) the ACL was attached to: a recreated interface
    /// has a new index and needs attaching again.
    attached: Option<(String, u32)>,
    installed: Option<PolicyDigest>,
    underlay: Option<(String, u16)>,
    underlay_attached: bool,
}

fn ifindex(name: &str) -> u32 {
    let Ok(c) = CString::new(name) else { return 0 };
    // SAFETY: `c` is a valid NUL-terminated string.
    unsafe { libc::if_nametoindex(c.as_ptr()) }
}

impl DataplaneEnforcer {
    /// Opens (or adopts) the dataplane pinned under `pin_dir`. With
    /// `underlay = Some((ifname, wg_port))` the underlay guard is attached too.
    pub fn open(pin_dir: &std::path::Path, underlay: Option<(String, u16)>) -> Result<Self, EnforcerError> {
        let dp = Dataplane::open(pin_dir).map_err(|e| EnforcerError(Box::new(e)))?;
        Ok(Self { dp, attached: None, installed: None, underlay, underlay_attached: false })
    }
}

impl PolicyEnforcer for DataplaneEnforcer {
    fn in_force(&mut self, overlay_if: &str) -> Result<Option<PolicyDigest>, EnforcerError> {
        let current = Some((overlay_if.to_owned(), ifindex(overlay_if)));
        Ok(if self.attached == current { self.installed } else { None })
    }

    fn enforce(&mut self, overlay_if: &str, policy: &CompiledPolicy, mtu: u32) -> Result<(), EnforcerError> {
        let err = |e: crate::dataplane::DataplaneError| EnforcerError(Box::new(e));
        // Policy first, then attach: the attached program never runs with
        // an older policy than the desired one.
        self.dp.set_mss(mtu).map_err(err)?;
        self.dp.install_policy(policy).map_err(err)?;
        let current = (overlay_if.to_owned(), ifindex(overlay_if));
        if self.attached.as_ref() != Some(&current) {
            // A stale pinned link (its interface was recreated) is replaced
            // only once the new attachment is in place; on failure the old
            // link stays and the error stops reconcile before the interface
            // gets peers or goes up (see `Dataplane::attach_overlay`).
            self.dp.attach_overlay(overlay_if).map_err(err)?;
            self.attached = Some(current);
        }
        if let Some((ifname, port)) = &self.underlay
            && !self.underlay_attached
        {
            self.dp.attach_underlay(ifname, *port).map_err(err)?;
            self.underlay_attached = true;
        }
        self.installed = Some(PolicyDigest::of(policy));
        Ok(())
    }

    fn set_known_endpoints(&mut self, endpoints: &BTreeSet<IpAddr>) -> Result<(), EnforcerError> {
        if self.underlay.is_none() {
            return Ok(());
        }
        let endpoints: Vec<IpAddr> = endpoints.iter().copied().collect();
        self.dp.set_known_endpoints(&endpoints).map_err(|e| EnforcerError(Box::new(e)))
    }

    fn stats(&self) -> Option<crate::reconcile::DataplaneStats> {
        use crate::dataplane::{AclVerdict, GuardVerdict, MssEvent};
        let c = self.dp.counters().map_err(|e| tracing::warn!(error = %e, "reading dataplane counters")).ok()?;
        Some(crate::reconcile::DataplaneStats {
            verdicts: AclVerdict::ALL.iter().map(|v| (format!("{v:?}"), c.verdict(*v).packets)).collect(),
            rules: c.rules.iter().map(|r| (r.rule_id, r.count.packets)).collect(),
            mss: [MssEvent::Clamped, MssEvent::Unchanged, MssEvent::NoOption]
                .iter()
                .map(|e| (format!("{e:?}"), c.mss(*e)))
                .collect(),
            guard: GuardVerdict::ALL.iter().map(|v| (format!("{v:?}"), c.guard(*v).packets)).collect(),
        })
    }
}
