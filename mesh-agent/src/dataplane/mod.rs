//! The eBPF data path: loading the programs built from `mesh-ebpf`,
//! attaching them to interfaces and reading their maps.

mod counter;
mod error;

pub use counter::{Counter, CounterAttach};
pub use error::DataplaneError;

/// The eBPF object built by build.rs from the `mesh-ebpf` crate.
pub(crate) static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/mesh-ebpf"));

/// Loads a fresh copy of the eBPF object: new maps, programs not yet loaded
/// into the kernel.
pub(crate) fn load_object() -> Result<aya::Ebpf, DataplaneError> {
    aya::EbpfLoader::new().load(EBPF_OBJECT).map_err(DataplaneError::Load)
}
