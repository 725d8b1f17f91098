//! The reference evaluator: the policy semantics of the crate doc, written
//! as plainly as possible (a scan over the rules, a set of flows), with no
//! eBPF and no cleverness. The eBPF data path is tested against it packet by
//! packet, so when the two disagree this one is presumed right.

use std::{collections::HashMap, net::IpAddr};

use crate::{CompiledPolicy, Proto};

/// The fields of an IP packet the policy looks at.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Packet {
    /// Source address (its family is the packet's).
    pub src: IpAddr,
    /// Destination address (same family as `src`).
    pub dst: IpAddr,
    /// IP protocol number (after any IPv6 extension headers).
    pub proto: u8,
    /// TCP/UDP/SCTP source port; for ICMP echo messages the identifier.
    pub sport: u16,
    /// TCP/UDP/SCTP destination port; unused for other protocols.
    pub dport: u16,
    /// ICMP / ICMPv6 type (for ICMP of the packet's family).
    pub icmp_type: u8,
    /// TCP flags byte.
    pub tcp_flags: u8,
}

/// TCP flag SYN.
pub const TCP_SYN: u8 = 0x02;
/// TCP flag ACK.
pub const TCP_ACK: u8 = 0x10;

/// What happens to a packet (the subset of the dataplane's verdicts that a
/// well-formed IP packet can get).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Verdict {
    /// Accepted by the rule at this index of `CompiledPolicy::rules` (the
    /// first rule, in policy order, that matches).
    AcceptRule(usize),
    /// Accepted as a reply of an accepted flow.
    AcceptEstablished,
    /// No rule matches.
    DropNoRule,
    /// No rule matches and the packet looks like a reply (TCP ACK without
    /// SYN, ICMP echo reply).
    DropNoFlow,
}

impl Verdict {
    /// Whether the packet passes.
    #[must_use]
    pub const fn passes(self) -> bool {
        matches!(self, Self::AcceptRule(_) | Self::AcceptEstablished)
    }
}

impl Packet {
    fn is_v4(&self) -> bool {
        self.src.is_ipv4()
    }

    fn has_ports(&self) -> bool {
        matches!(self.proto, 6 | 17 | 132)
    }

    /// ICMP of the packet's own family (1 in IPv4, 58 in IPv6).
    fn is_family_icmp(&self) -> bool {
        (self.is_v4() && self.proto == 1) || (!self.is_v4() && self.proto == 58)
    }

    fn is_echo_request(&self) -> bool {
        self.is_family_icmp() && self.icmp_type == if self.is_v4() { 8 } else { 128 }
    }

    fn is_echo_reply(&self) -> bool {
        self.is_family_icmp() && self.icmp_type == if self.is_v4() { 0 } else { 129 }
    }
}

/// Index of the first rule that matches `p`, or `None` (default deny).
#[must_use]
pub fn first_match(policy: &CompiledPolicy, p: &Packet) -> Option<usize> {
    policy.rules.iter().position(|r| {
        r.src.iter().any(|n| n.contains(&p.src))
            && r.dst.iter().any(|n| n.contains(&p.dst))
            && r.proto.matches(p.proto)
            && (!r.proto.has_ports() || !p.has_ports() || r.ports.contains(p.dport))
    })
}

/// Identity of a flow as the replies carry it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct FlowId {
    src: IpAddr,
    dst: IpAddr,
    proto: u8,
    sport: u16,
    dport: u16,
}

/// What a flow-table entry stands for (the dataplane's `FlowKind`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    /// A packet of an accepted flow, keyed by its own identity.
    Forward,
    /// The replies of an accepted flow, keyed by their identity.
    Reply,
}

/// The flow table: which flows were accepted, in which direction, under
/// which policy (no timeouts: a test runs in far less than any flow
/// timeout). Policies are numbered by [`Stateful::new_policy`]; an entry
/// made under an earlier one no longer answers.
#[derive(Debug, Default)]
pub struct Stateful {
    flows: HashMap<FlowId, (Kind, u64)>,
    epoch: u64,
}

impl Stateful {
    /// No flows yet.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// A new policy is in force: the flows accepted so far are decided
    /// again (their entries stay, but no longer answer).
    pub fn new_policy(&mut self) {
        self.epoch += 1;
    }

    /// The kind of the entry at `id`, if it was made under the policy in
    /// force.
    fn live(&self, id: &FlowId) -> Option<Kind> {
        self.flows.get(id).filter(|(_, epoch)| *epoch == self.epoch).map(|(kind, _)| *kind)
    }

    /// Decides `p` under `policy` and records its flow if it is accepted.
    pub fn decide(&mut self, policy: &CompiledPolicy, p: &Packet) -> Verdict {
        // A live forward entry decides as the policy does (same rule), so
        // only reply entries short-cut the policy here.
        if self.live(&Self::id_of(p)) == Some(Kind::Reply) {
            return Verdict::AcceptEstablished;
        }
        match first_match(policy, p) {
            Some(index) => {
                self.flows.insert(Self::id_of(p), (Kind::Forward, self.epoch));
                if let Some(reply) = Self::reply_id(p) {
                    self.flows.insert(reply, (Kind::Reply, self.epoch));
                }
                Verdict::AcceptRule(index)
            }
            None => {
                let tcp_reply = p.proto == 6 && p.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_ACK;
                if tcp_reply || p.is_echo_reply() { Verdict::DropNoFlow } else { Verdict::DropNoRule }
            }
        }
    }

    /// How the packet itself is identified.
    fn id_of(p: &Packet) -> FlowId {
        let (sport, dport) = if p.has_ports() {
            (p.sport, p.dport)
        } else if p.is_echo_request() || p.is_echo_reply() {
            (p.sport, u16::from(p.icmp_type))
        } else {
            (0, 0)
        };
        FlowId { src: p.src, dst: p.dst, proto: p.proto, sport, dport }
    }

    /// How its replies will be identified; `None` when it has none (ICMP
    /// other than an echo request).
    fn reply_id(p: &Packet) -> Option<FlowId> {
        let (sport, dport) = if p.has_ports() {
            (p.dport, p.sport)
        } else if p.is_family_icmp() {
            if !p.is_echo_request() {
                return None;
            }
            (p.sport, if p.is_v4() { 0 } else { 129 })
        } else {
            (0, 0)
        };
        Some(FlowId { src: p.dst, dst: p.src, proto: p.proto, sport, dport })
    }
}

/// Whether `proto` can ever match an ICMP packet (used by policy authors'
/// tests; kept here so the meaning of [`Proto::Icmp`] lives in one place).
#[must_use]
pub const fn matches_icmp(proto: Proto) -> bool {
    proto.matches(1) || proto.matches(58)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{PortRange, Rule};

    fn pkt(src: &str, dst: &str, proto: u8, dport: u16) -> Packet {
        Packet {
            src: src.parse().unwrap(),
            dst: dst.parse().unwrap(),
            proto,
            sport: 40000,
            dport,
            icmp_type: 0,
            tcp_flags: TCP_SYN,
        }
    }

    fn policy() -> CompiledPolicy {
        let rule = |id, src: &str, dst: &str, proto, ports| Rule {
            id,
            src: vec![src.parse().unwrap()],
            dst: vec![dst.parse().unwrap()],
            proto,
            ports,
        };
        CompiledPolicy {
            generation: 1,
            rules: vec![
                rule(10, "100.64.0.0/10", "198.18.20.0/24", Proto::Tcp, PortRange::single(5432)),
                rule(11, "100.64.0.1/32", "198.18.0.0/15", Proto::Icmp, PortRange::ANY),
                rule(12, "fd7a:6d65:7368::/48", "fd7a:6d65:7368::/48", Proto::Any, PortRange::ANY),
            ],
        }
    }

    #[test]
    fn first_matching_rule_decides() {
        let p = policy();
        assert_eq!(first_match(&p, &pkt("100.64.1.2", "198.18.20.5", 6, 5432)), Some(0));
        assert_eq!(first_match(&p, &pkt("100.64.1.2", "198.18.20.5", 6, 5433)), None);
        assert_eq!(first_match(&p, &pkt("100.64.1.2", "198.18.20.5", 17, 5432)), None);
        assert_eq!(first_match(&p, &pkt("100.64.0.1", "198.18.30.1", 1, 0)), Some(1));
        assert_eq!(first_match(&p, &pkt("fd7a:6d65:7368::1", "fd7a:6d65:7368::2", 47, 0)), Some(2));
        // A v4 CIDR never matches a v6 packet.
        assert_eq!(first_match(&p, &pkt("::ffff:100.64.0.1", "198.18.30.1", 1, 0)), None);
    }

    #[test]
    fn replies_of_accepted_flows_pass_and_others_do_not() {
        let p = policy();
        let mut s = Stateful::new();
        let syn = pkt("100.64.1.2", "198.18.20.5", 6, 5432);
        let mut synack = pkt("198.18.20.5", "100.64.1.2", 6, 40000);
        synack.sport = 5432;
        synack.tcp_flags = TCP_SYN | TCP_ACK;
        let mut stray = synack;
        stray.dport = 40001;
        stray.tcp_flags = TCP_ACK;
        assert_eq!(s.decide(&p, &stray), Verdict::DropNoFlow);
        assert_eq!(s.decide(&p, &syn), Verdict::AcceptRule(0));
        assert_eq!(s.decide(&p, &synack), Verdict::AcceptEstablished);
        assert_eq!(s.decide(&p, &stray), Verdict::DropNoFlow);

        let mut echo = pkt("100.64.0.1", "198.18.30.1", 1, 0);
        echo.icmp_type = 8;
        echo.sport = 77;
        let mut reply = pkt("198.18.30.1", "100.64.0.1", 1, 0);
        reply.icmp_type = 0;
        reply.sport = 77;
        assert_eq!(s.decide(&p, &reply), Verdict::DropNoFlow);
        assert_eq!(s.decide(&p, &echo), Verdict::AcceptRule(1));
        assert_eq!(s.decide(&p, &reply), Verdict::AcceptEstablished);
        assert!(matches_icmp(Proto::Icmp) && matches_icmp(Proto::Any) && !matches_icmp(Proto::Tcp));
    }
}
