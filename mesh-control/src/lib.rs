//! mesh-control: the control plane and orchestration API.
//!
//! Modules by concern: [`capability`] (what an agent's capability version
//! lets control read), [`policy`] (HuJSON ACL, compiler, tests, diff),
//! [`routes`] (gateway ordering and failover), [`route_check`] (which
//! prefixes may be routed), [`store`] (SQLite /
//! PostgreSQL, audit log), [`auth`] (secrets and their hashes), [`engine`]
//! (per-node views, deltas, fan-out), [`server`] (the gRPC services),
//! [`tls`] (control's CA), [`limits`] (rate limits and caps on clients),
//! [`metrics`], [`web`] (the live topology page), [`relay`] (relays, their
//! tickets, path-change audit), [`config`], [`run`];
//! with the
//! `test-support` feature, `sim` (a simulated agent for tests and
//! benchmarks).
//!
//! What clients share with control (the TLS channel, bearer auth, the
//! enrollment key text, view deltas, the policy on the wire) is in
//! `mesh-client`, so that agents and meshctl never link the server.
//!
//! Without the default `server` feature the crate is [`policy`] alone (the
//! fuzz targets build it that way).

#[cfg(feature = "server")]
pub mod auth;
#[cfg(feature = "server")]
pub mod capability;
#[cfg(feature = "server")]
pub mod config;
#[cfg(feature = "server")]
pub mod engine;
#[cfg(feature = "server")]
pub mod limits;
#[cfg(feature = "server")]
pub mod metrics;
pub mod policy;
#[cfg(feature = "server")]
pub mod relay;
#[cfg(feature = "server")]
pub mod route_check;
#[cfg(feature = "server")]
pub mod routes;
#[cfg(feature = "server")]
pub mod run;
#[cfg(feature = "server")]
pub mod server;
#[cfg(feature = "test-support")]
pub mod sim;
#[cfg(feature = "server")]
pub mod store;
#[cfg(feature = "server")]
pub mod tls;
#[cfg(feature = "server")]
pub mod web;
