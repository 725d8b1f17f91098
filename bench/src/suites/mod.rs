//! The suites. Each is `fn run(ctx: &Ctx) -> anyhow::Result<Results>`; the
//! runner writes its results, table and chart.

pub mod acl;
pub mod agent;
pub mod failover;
pub mod guard;
pub mod push;
pub mod relay;
pub mod tunnel;

use crate::{Ctx, Results};

/// A named suite.
#[derive(Debug, Clone, Copy)]
pub struct Suite {
    /// Name used on the command line.
    pub name: &'static str,
    /// What it measures, one line.
    pub about: &'static str,
    /// Runs it.
    pub run: fn(&Ctx) -> anyhow::Result<Results>,
}

/// Every suite, in the order `all` runs them.
pub const SUITES: &[Suite] = &[
    Suite { name: "acl", about: acl::ABOUT, run: acl::run },
    Suite { name: "guard", about: guard::ABOUT, run: guard::run },
    Suite { name: "agent", about: agent::ABOUT, run: agent::run },
    Suite {
        name: "push",
        about: "policy change to the last agent's ack, N simulated agents over gRPC",
        run: push::run,
    },
    Suite { name: "failover", about: failover::ABOUT, run: failover::run },
    Suite { name: "tunnel", about: "WireGuard tunnel throughput per engine (iperf3 TCP/UDP)", run: tunnel::run },
    Suite { name: "relay", about: relay::ABOUT, run: relay::run },
];
