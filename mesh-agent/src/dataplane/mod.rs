//! The eBPF data path: loading the programs built from `mesh-ebpf`,
//! attaching them to interfaces, installing policies and reading counters.
//!
//! The entry point is [`Dataplane`]:
//!
//! ```no_run
//! # fn demo(policy: &mesh_policy::CompiledPolicy) -> Result<(), mesh_agent::dataplane::DataplaneError> {
//! use mesh_agent::dataplane::{Dataplane, GuardSettings};
//! let mut dp = Dataplane::open(std::path::Path::new("/sys/fs/bpf/mesh/gw1"))?; // adopts pinned state
//! dp.attach_overlay("wg0")?;            // ACL + MSS clamp, TC ingress and egress
//! dp.attach_underlay("eth0", 51820)?;   // XDP guard
//! dp.set_mss(1420)?;
//! dp.set_guard(&GuardSettings::default())?;
//! dp.install_policy(policy)?;           // atomic swap
//! let c = dp.counters()?;               // per rule, per verdict, MSS, guard
//! # Ok(()) }
//! ```
//!
//! Map layouts and lookup precedence: `mesh_common::acl` and
//! `mesh_common::guard`. The policy-to-map compiler is [`compile`] (pure).
//!
//! Minimum kernel: Linux 5.17. The ACL's LPM probes run in `bpf_loop`
//! (5.17); [`Dataplane::open`] and [`Dataplane::load_unpinned`] refuse older
//! kernels with [`DataplaneError::KernelTooOld`], so an agent there never
//! runs unfiltered while believing it enforces. The benchmarks' generator
//! ([`flood`], `transmit_frames`) needs 5.18 (live frames).

mod acl;
mod batch;
pub mod compile;
mod counter;
mod counters;
mod engine;
mod error;
pub mod flood;
mod guard;
mod sys;

pub use acl::InstallReport;
pub use counter::{Counter, CounterAttach};
pub use counters::{Counters, RuleCounter};
pub use engine::{Dataplane, PROG_ACL_ETH, PROG_ACL_IP, PROG_GUARD, PROG_PASS_TC, PROG_PASS_XDP, PROG_TX_XDP};
pub use error::DataplaneError;
pub use guard::{AllowRule, GuardSettings};
pub use mesh_common::{
    acl::{AclVerdict, MssEvent},
    counter::PacketCount,
    guard::GuardVerdict,
};
/// The policy types `install_policy` takes, re-exported for callers that do
/// not depend on `mesh-policy` themselves (benchmarks).
pub use mesh_policy::{CompiledPolicy, PortRange, Proto, Rule};

/// The eBPF object built by build.rs from the `mesh-ebpf` crate.
pub(crate) static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/mesh-ebpf"));

/// Loads a fresh copy of the eBPF object: new maps, programs not yet loaded
/// into the kernel.
pub(crate) fn load_object() -> Result<aya::Ebpf, DataplaneError> {
    aya::EbpfLoader::new().load(EBPF_OBJECT).map_err(DataplaneError::Load)
}

/// A program of the object as its concrete type (a missing or mistyped
/// program is a build mismatch, named in the error).
pub(crate) fn program_mut<'a, T>(ebpf: &'a mut aya::Ebpf, name: &'static str) -> Result<&'a mut T, DataplaneError>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    ebpf.program_mut(name)
        .ok_or(DataplaneError::MissingProgram(name))?
        .try_into()
        .map_err(|source| DataplaneError::Program { what: format!("{name} type"), source })
}
