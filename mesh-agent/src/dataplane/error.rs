//! Errors of the data path, each naming what was being done.

/// An eBPF operation failed.
#[derive(Debug, thiserror::Error)]
pub enum DataplaneError {
    /// The object could not be loaded (map creation, BTF, relocation).
    #[error("loading the eBPF object: {0}")]
    Load(#[source] aya::EbpfError),
    /// The object has no program of that name (a build mismatch).
    #[error("the eBPF object has no program {0:?}")]
    MissingProgram(&'static str),
    /// The object has no map of that name (a build mismatch).
    #[error("the eBPF object has no map {0:?}")]
    MissingMap(&'static str),
    /// A program could not be loaded, attached or run.
    #[error("{what}: {source}")]
    Program {
        /// What was being done ("attaching count_xdp to eth0").
        what: String,
        /// The underlying error (verifier log included when it rejected it).
        #[source]
        source: aya::programs::ProgramError,
    },
    /// A map could not be read or written.
    #[error("{what}: {source}")]
    Map {
        /// What was being done.
        what: String,
        /// The underlying error.
        #[source]
        source: aya::maps::MapError,
    },
}
