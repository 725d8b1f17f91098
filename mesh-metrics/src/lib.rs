//! The metrics stack both binaries share: one `prometheus-client` registry
//! per binary (built by the binary), label values that are always escaped
//! ([`Label`]), the exposition format a scraper asked for
//! ([`exposition`]), small helpers for collectors that mirror state read at
//! scrape time ([`family`]), and one small HTTP responder with a header
//! timeout, a connection deadline, a connection cap and accept backoff
//! ([`server`]).

pub mod exposition;
pub mod family;
pub mod label;
pub mod server;

pub use exposition::Format;
pub use label::Label;
pub use prometheus_client;
pub use server::{Limits, Scrape, Unavailable};
