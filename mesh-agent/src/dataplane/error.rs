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
    /// A pinned attachment could not be created, opened or removed.
    #[error("{what}: {source}")]
    Link {
        /// What was being done.
        what: String,
        /// The underlying error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A file-system or socket operation failed (bpffs, namespaces, ioctl).
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The policy does not fit the data path (nothing was changed).
    #[error("compiling the policy: {0}")]
    Compile(#[from] super::compile::CompileError),
    /// The running kernel is older than the data path needs (the ACL's
    /// lookups run in `bpf_loop`, added in Linux 5.17).
    #[error(
        "kernel {release} is too old for the eBPF data path: it needs Linux {}.{} or later (bpf_loop); \
         enforcement is not started",
        .needed.0, .needed.1
    )]
    KernelTooOld {
        /// `uname -r`.
        release: String,
        /// The minimum (major, minor).
        needed: (u32, u32),
    },
    /// The data path was asked for something it was not set up for.
    #[error("{0}")]
    Usage(String),
}
