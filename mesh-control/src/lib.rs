//! mesh-control: the control plane and orchestration API.
//!
//! Modules by concern: [`policy`] (HuJSON ACL, compiler, tests, diff),
//! [`routes`] (gateway ordering and failover), [`store`] (SQLite /
//! PostgreSQL, audit log), [`auth`] (secrets and their hashes).

pub mod auth;
pub mod policy;
pub mod routes;
pub mod store;
