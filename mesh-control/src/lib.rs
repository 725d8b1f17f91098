//! mesh-control: the control plane and orchestration API.
//!
//! Modules by concern: [`policy`] (HuJSON ACL, compiler, tests, diff),
//! [`routes`] (gateway ordering and failover), [`store`] (SQLite /
//! PostgreSQL, audit log), [`view`] (per-node views and deltas),
//! [`server`] (gRPC services, auth, fan-out), [`tls`], [`client`] (pinned
//! TLS connections for agents and meshctl), [`metrics`], [`config`].

pub mod policy;
pub mod routes;
