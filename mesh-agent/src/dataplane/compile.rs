//! The policy-to-map compiler lives in [`mesh_policy::tables`] (pure, shared
//! with control, which compiles every node's policy against the node's
//! reported limits before accepting it); re-exported here for the dataplane.

pub use mesh_policy::tables::*;
