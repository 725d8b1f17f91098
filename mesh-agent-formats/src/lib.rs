//! What mesh-agent parses from outside, apart from the code that touches the
//! kernel: its TOML configuration ([`config`], with the reachability targets
//! of [`reach`]) and the probe protocol between agents ([`probe_wire`]).
//! Pure, so these are unit-tested without root and fuzzed (`fuzz/`) without
//! building the data path's dependencies. mesh-agent re-exports them as
//! `mesh_agent::config`, `mesh_agent::reach::Target` and
//! `mesh_agent::probe::wire`.

pub mod config;
pub mod probe_wire;
pub mod reach;
