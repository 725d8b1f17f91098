//! The reference evaluator: the policy semantics of the crate doc, written
//! as plainly as possible (a scan over the rules, a set of flows), with no
//! eBPF and no cleverness. The eBPF data path is tested against it packet by
//! packet, so when the two disagree this one is presumed right.

use std::{
    collections::{HashMap, HashSet},
    net::IpAddr,
};

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
    /// Where the packet sits in a fragmented datagram.
    pub fragment: Fragment,
    /// For an ICMP error: the packet it quotes.
    pub quoted: Option<Quoted>,
}

/// Where a packet sits in a fragmented datagram (IPv4 flags and offset,
/// or the IPv6 fragment header).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Fragment {
    /// Not fragmented (IPv6: also an atomic fragment, offset 0 and no more).
    #[default]
    Whole,
    /// Offset 0, more fragments follow: carries the transport header.
    First {
        /// The datagram's identification (IPv4: 16 bits).
        id: u32,
    },
    /// Offset above 0: no transport header.
    Later {
        /// The datagram's identification (IPv4: 16 bits).
        id: u32,
    },
}

/// The packet an ICMP error is about, as the error quotes it (its IP
/// header and the first 8 bytes of its transport header).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Quoted {
    /// Source address: the error's receiver, if the error is genuine.
    pub src: IpAddr,
    /// Destination address.
    pub dst: IpAddr,
    /// IP protocol number.
    pub proto: u8,
    /// As [`Packet::sport`].
    pub sport: u16,
    /// As [`Packet::dport`].
    pub dport: u16,
    /// ICMP / ICMPv6 type when the quoted packet is ICMP.
    pub icmp_type: u8,
    /// Where the quoted packet sits in its datagram.
    pub fragment: Fragment,
}

impl Quoted {
    /// The quoted packet, as far as its flow identity goes.
    #[must_use]
    pub const fn packet(&self) -> Packet {
        Packet {
            src: self.src,
            dst: self.dst,
            proto: self.proto,
            sport: self.sport,
            dport: self.dport,
            icmp_type: self.icmp_type,
            tcp_flags: 0,
            fragment: self.fragment,
            quoted: None,
        }
    }
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
    /// A non-first fragment of a datagram whose first fragment did not
    /// pass.
    DropFragment,
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

    /// An ICMP error that relates to a flow: IPv4 destination unreachable
    /// and time exceeded; ICMPv6 destination unreachable, packet too big
    /// and time exceeded.
    fn is_error(&self) -> bool {
        self.is_family_icmp()
            && if self.is_v4() { matches!(self.icmp_type, 3 | 11) } else { matches!(self.icmp_type, 1..=3) }
    }

    /// The datagram a fragment with identification `id` belongs to: source,
    /// destination, protocol (IPv4 only: an IPv6 identification is unique
    /// per source and destination) and identification.
    fn datagram(&self, id: u32) -> (IpAddr, IpAddr, u8, u32) {
        (self.src, self.dst, if self.is_v4() { self.proto } else { 0 }, id)
    }

    /// The same packet in the other direction: addresses and ports
    /// swapped, an echo reply turned into its request.
    fn reversed(&self) -> Self {
        let mut r = Self { src: self.dst, dst: self.src, sport: self.dport, dport: self.sport, ..*self };
        if self.is_echo_reply() {
            (r.sport, r.dport) = (self.sport, 0);
            r.icmp_type = if self.is_v4() { 8 } else { 128 };
        }
        r
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
    /// Datagrams whose first fragment passed, by [`Packet::datagram`].
    frags: HashSet<(IpAddr, IpAddr, u8, u32)>,
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
    ///
    /// In order (the dataplane's precedence, `mesh_common::acl`):
    /// 1. a non-first fragment passes iff its datagram's first fragment
    ///    passed (`DropFragment` otherwise), and nothing else applies;
    /// 2. an ICMP error passes as related if the packet it quotes is not a
    ///    non-first fragment, was sent by the error's receiver (its source
    ///    is the error's destination) and has a live entry (either kind);
    /// 3. a live reply entry accepts the packet;
    /// 4. the first matching rule accepts it, writing its forward entry and
    ///    its replies' entry;
    /// 5. a TCP packet without SYN, a UDP datagram or an echo reply whose
    ///    reversed tuple a rule accepts passes as a reply, writing the
    ///    entries as if the reversed packet had been accepted;
    /// 6. otherwise it is dropped.
    ///
    /// A first fragment that passes lets its datagram's later fragments in.
    pub fn decide(&mut self, policy: &CompiledPolicy, p: &Packet) -> Verdict {
        if let Fragment::Later { id } = p.fragment {
            let known = self.frags.contains(&p.datagram(id));
            return if known { Verdict::AcceptEstablished } else { Verdict::DropFragment };
        }
        let verdict = self.decide_whole(policy, p);
        if let (Fragment::First { id }, true) = (p.fragment, verdict.passes()) {
            self.frags.insert(p.datagram(id));
        }
        verdict
    }

    fn decide_whole(&mut self, policy: &CompiledPolicy, p: &Packet) -> Verdict {
        if p.is_error() && p.quoted.is_some_and(|q| self.related(p, &q)) {
            return Verdict::AcceptEstablished;
        }
        // A live forward entry decides as the policy does (same rule), so
        // only reply entries short-cut the policy here.
        if self.live(&Self::id_of(p)) == Some(Kind::Reply) {
            return Verdict::AcceptEstablished;
        }
        if let Some(index) = first_match(policy, p) {
            self.accept(p);
            return Verdict::AcceptRule(index);
        }
        let tcp_reply = p.proto == 6 && p.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_ACK;
        let reply_candidate = (p.proto == 6 && p.tcp_flags & TCP_SYN == 0) || p.proto == 17 || p.is_echo_reply();
        if reply_candidate && first_match(policy, &p.reversed()).is_some() {
            self.accept(&p.reversed());
            return Verdict::AcceptEstablished;
        }
        if tcp_reply || p.is_echo_reply() { Verdict::DropNoFlow } else { Verdict::DropNoRule }
    }

    /// Writes the entries of an accepted packet: its own (forward) and its
    /// replies'.
    fn accept(&mut self, p: &Packet) {
        self.flows.insert(Self::id_of(p), (Kind::Forward, self.epoch));
        if let Some(reply) = Self::reply_id(p) {
            self.flows.insert(reply, (Kind::Reply, self.epoch));
        }
    }

    /// Whether the ICMP error `p` is about a packet of an accepted flow.
    fn related(&self, p: &Packet, q: &Quoted) -> bool {
        q.src == p.dst
            && !matches!(q.fragment, Fragment::Later { .. })
            && self.live(&Self::id_of(&q.packet())).is_some()
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
            fragment: Fragment::Whole,
            quoted: None,
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
        // From a port the policy does not open in the other direction.
        let mut stray = synack;
        stray.sport = 5433;
        stray.tcp_flags = TCP_ACK;
        assert_eq!(s.decide(&p, &stray), Verdict::DropNoFlow);
        assert_eq!(s.decide(&p, &synack), Verdict::DropNoRule, "a SYN-ACK is never a reply by the reversed tuple");
        assert_eq!(s.decide(&p, &syn), Verdict::AcceptRule(0));
        assert_eq!(s.decide(&p, &synack), Verdict::AcceptEstablished);
        assert_eq!(s.decide(&p, &stray), Verdict::DropNoFlow);

        let mut echo = pkt("100.64.0.1", "198.18.30.1", 1, 0);
        echo.icmp_type = 8;
        echo.sport = 77;
        let mut reply = pkt("198.18.30.1", "100.64.0.1", 1, 0);
        reply.icmp_type = 0;
        reply.sport = 77;
        assert_eq!(s.decide(&p, &echo), Verdict::AcceptRule(1));
        assert_eq!(s.decide(&p, &reply), Verdict::AcceptEstablished);
        // To a host whose requests no rule accepts.
        let back = Packet { dst: "100.64.0.9".parse().unwrap(), ..reply };
        assert_eq!(s.decide(&p, &back), Verdict::DropNoFlow);
        assert!(matches_icmp(Proto::Icmp) && matches_icmp(Proto::Any) && !matches_icmp(Proto::Tcp));
    }

    #[test]
    fn replies_pass_by_the_reversed_tuple_and_stop_with_a_revoking_policy() {
        let p = policy();
        let mut s = Stateful::new();
        // An established connection's reply, first seen here (the flow was
        // set up through another gateway).
        let mut ack = pkt("198.18.20.5", "100.64.1.2", 6, 40000);
        ack.sport = 5432;
        ack.tcp_flags = TCP_ACK;
        assert_eq!(s.decide(&p, &ack), Verdict::AcceptEstablished);
        // Its entry was written: a SYN-ACK on that tuple is now a reply.
        let synack = Packet { tcp_flags: TCP_SYN | TCP_ACK, ..ack };
        assert_eq!(s.decide(&p, &synack), Verdict::AcceptEstablished);
        // A policy without the rule: the reply entry no longer answers and
        // the reversed tuple is not accepted either.
        let revoking = CompiledPolicy { generation: 2, rules: p.rules[1..].to_vec() };
        s.new_policy();
        assert_eq!(s.decide(&revoking, &ack), Verdict::DropNoFlow);
        assert_eq!(s.decide(&revoking, &synack), Verdict::DropNoRule);
        // Back to a policy that accepts it: re-decided, passes again.
        s.new_policy();
        assert_eq!(s.decide(&p, &ack), Verdict::AcceptEstablished);
    }

    #[test]
    fn later_fragments_follow_their_first() {
        let p = policy();
        let mut s = Stateful::new();
        let first = Packet { fragment: Fragment::First { id: 9 }, ..pkt("100.64.1.2", "198.18.20.5", 6, 5432) };
        let later = Packet { fragment: Fragment::Later { id: 9 }, ..first };
        let other = Packet { fragment: Fragment::Later { id: 10 }, ..first };
        assert_eq!(s.decide(&p, &later), Verdict::DropFragment, "before its first fragment");
        assert_eq!(s.decide(&p, &first), Verdict::AcceptRule(0));
        assert_eq!(s.decide(&p, &later), Verdict::AcceptEstablished);
        assert_eq!(s.decide(&p, &other), Verdict::DropFragment);
        let denied = Packet { dport: 5433, fragment: Fragment::First { id: 11 }, ..first };
        assert_eq!(s.decide(&p, &denied), Verdict::DropNoRule);
        assert_eq!(s.decide(&p, &Packet { fragment: Fragment::Later { id: 11 }, ..denied }), Verdict::DropFragment);
    }

    #[test]
    fn icmp_errors_about_accepted_flows_are_related() {
        let p = policy();
        let mut s = Stateful::new();
        let syn = pkt("100.64.1.2", "198.18.20.5", 6, 5432);
        let quote = |q: &Packet| Quoted {
            src: q.src,
            dst: q.dst,
            proto: q.proto,
            sport: q.sport,
            dport: q.dport,
            icmp_type: q.icmp_type,
            fragment: q.fragment,
        };
        let mut error = pkt("198.18.20.1", "100.64.1.2", 1, 0);
        error.icmp_type = 3;
        error.quoted = Some(quote(&syn));
        // No ICMP rule for this source: only the flow makes it pass.
        assert_eq!(s.decide(&p, &error), Verdict::DropNoRule, "before the flow");
        assert_eq!(s.decide(&p, &syn), Verdict::AcceptRule(0));
        assert_eq!(s.decide(&p, &error), Verdict::AcceptEstablished);
        let elsewhere = Packet { dst: "100.64.1.3".parse().unwrap(), ..error };
        assert_eq!(s.decide(&p, &elsewhere), Verdict::DropNoRule, "addressed to someone else");
        let unrelated = Packet { quoted: Some(Quoted { dport: 5433, ..quote(&syn) }), ..error };
        assert_eq!(s.decide(&p, &unrelated), Verdict::DropNoRule);
        let not_error = Packet { icmp_type: 5, ..error };
        assert_eq!(s.decide(&p, &not_error), Verdict::DropNoRule, "a redirect is not related");
    }
}
