//! mesh-control: the control plane and orchestration API.
//!
//! Modules by concern: [`policy`] (HuJSON ACL, compiler, tests, diff),
//! [`routes`] (gateway ordering and failover), [`route_check`] (which
//! prefixes may be routed), [`store`] (SQLite /
//! PostgreSQL, audit log), [`auth`] (secrets and their hashes), [`engine`]
//! (per-node views, deltas, fan-out), [`server`] (the gRPC services),
//! [`tls`] (control's CA), [`client`] (pinned TLS connections for agents,
//! meshctl, tests and benchmarks), [`metrics`], [`config`], [`run`].

pub mod auth;
pub mod client;
pub mod config;
pub mod engine;
pub mod metrics;
pub mod policy;
pub mod route_check;
pub mod routes;
pub mod run;
pub mod server;
pub mod sim;
pub mod store;
pub mod tls;
