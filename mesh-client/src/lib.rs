//! What every client of mesh-control shares: agents, meshctl, the tests'
//! simulated agent and the benchmarks.
//!
//! Modules by concern: [`channel`] (TLS to control, trusting exactly its CA
//! by pin or PEM; the local admin socket), [`bearer`] (the credential on
//! every call), [`enrollment`] (the enrollment key's text form), [`view`]
//! (node-view deltas: computing and applying them) and [`policy`] (the
//! compiled policy on the wire).
//!
//! Without the default `transport` feature the crate is the wire formats
//! alone ([`enrollment`], [`view`], [`policy`]; the fuzz targets build it
//! that way).
//!
//! Clients depend on this crate and never on `mesh-control`, so that an
//! agent does not link the server's store, SQL drivers and CA code.

#[cfg(feature = "transport")]
pub mod bearer;
#[cfg(feature = "transport")]
pub mod channel;
pub mod enrollment;
#[cfg(feature = "transport")]
pub mod key_proof;
pub mod policy;
pub mod view;
