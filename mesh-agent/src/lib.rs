//! mesh-agent: the gateway agent. It programs WireGuard, addresses and
//! routes, loads the eBPF data path, probes its peers and keeps one gRPC
//! stream to mesh-control.
//!
//! Modules follow concerns; pure logic is kept apart from kernel I/O so most
//! of it is tested without root.

pub mod admin;
pub mod agent;
pub use mesh_agent_formats::config;
pub mod control;
pub mod dataplane;
pub mod enforce;
pub mod keys;
pub mod metrics;
pub mod net;
pub mod path;
pub mod probe;
pub mod reach;
pub mod reconcile;
pub mod site;
pub mod state;
pub mod status;
pub mod view;
pub mod wg;
