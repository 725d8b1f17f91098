//! The compiled ACL policy: what mesh-control's compiler produces for one
//! node, what travels to the agent, and what the agent installs into the eBPF
//! maps. Also the plain-Rust reference evaluator of its semantics, against
//! which the eBPF programs are checked.
//!
//! Semantics (the contract every implementation follows):
//! - default deny: a packet is accepted iff some rule matches it;
//! - a rule matches when the packet's source address is in one of the rule's
//!   source CIDRs, its destination address in one of the destination CIDRs,
//!   the protocol matches ([`Proto::Any`] matches every protocol) and, for
//!   TCP, UDP and SCTP, the destination port is inside the rule's range
//!   (ICMP and other protocols ignore the port range);
//! - replies of an accepted flow are accepted (stateful; see the dataplane),
//!   as long as the policy that accepted the flow is in force; a reply
//!   whose flow was not seen (TCP without SYN, UDP, echo reply) is
//!   accepted when the policy accepts its reversed tuple;
//! - the later fragments of a datagram whose first fragment was accepted
//!   are accepted, and so are ICMP errors about a packet of an accepted
//!   flow (the exact rules: [`eval::Stateful::decide`] and
//!   `mesh_common::acl`);
//! - IPv4 and IPv6 rules are independent: a v4 CIDR never matches a v6 packet;
//! - which rule "decided" a packet (for per-rule counters) is the first
//!   matching rule in policy order.
//!
//! [`eval`] is the reference evaluator of these semantics; [`tables`]
//! compiles a policy into the eBPF ACL's map entries (the agent installs
//! them; control compiles against each agent's reported [`tables::Limits`]).

mod compiled;
pub mod eval;
pub mod tables;

pub use compiled::{CompiledPolicy, PolicyError, PortRange, Proto, Rule, RuleId};
