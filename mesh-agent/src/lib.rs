//! mesh-agent: the gateway agent. It programs WireGuard, addresses and
//! routes, loads the eBPF data path, probes its peers and keeps one gRPC
//! stream to mesh-control.
//!
//! Modules follow concerns; pure logic is kept apart from kernel I/O so most
//! of it is tested without root.

pub mod dataplane;
