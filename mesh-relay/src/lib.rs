//! mesh-relay: forwards already-encrypted WireGuard datagrams between
//! enrolled nodes that cannot reach each other directly, addressed by their
//! 32-byte WireGuard public keys (as Tailscale's DERP does), and reflects
//! UDP source addresses so nodes can learn their public endpoint.
//!
//! The relay sees only ciphertext: it authenticates which key a node may
//! attach as (a [`ticket`] signed by control), never what it carries.
//!
//! - [`ticket`]: the attach credential and its verification;
//! - [`frame`]: the framing after the HTTP upgrade;
//! - [`reflect`]: the address reflector's codec and server;
//! - [`wire`]: the side-channel shape the reflector's messages share with
//!   the agents' disco messages on the WireGuard port;
//! - [`server`]: the relay ([`Relay`]);
//! - [`client`]: the node side ([`RelayClient`]);
//! - [`tls`]: the certificate, generated if missing, and pin trust;
//! - [`config`]: the TOML file.

pub mod client;
pub mod config;
pub mod frame;
mod metrics;
pub mod reflect;
pub mod server;
pub mod ticket;
pub mod tls;
pub mod wire;

pub use client::{ClientError, RelayClient, RelayReceiver, RelaySender};
pub use server::{Relay, RelayConfig, RelayError};
pub use ticket::{Ticket, TicketError, TicketSigner};
