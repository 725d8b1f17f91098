//! Compiles a [`CompiledPolicy`] into the ACL's map entries (layout and
//! precedence: `mesh_common::acl`). Pure: no kernel, tested without root.
//!
//! - Every distinct source CIDR gets a class number (IPv4 and IPv6 share one
//!   numbering so classes never collide in the decision trie); so does every
//!   distinct destination CIDR.
//! - A rule's source CIDR `C` *applies to* every source class whose CIDR lies
//!   inside `C`: an address whose longest source match is such a class is in
//!   `C`.
//! - For each source class, the destination CIDRs of the rules that apply to
//!   it go into the destination trie under that class. A destination CIDR
//!   `D` of such a rule covers every one of those CIDRs inside `D`.
//! - Each (source class, covered destination class) then gets decision
//!   entries per protocol and aligned port block. Where entries of several
//!   rules coincide or nest, each keeps the smallest rule index among the
//!   rules covering it, so the longest match names the first matching rule.
//!
//! Size: the destination trie holds, per source class, the destination CIDRs
//! that apply to it; decision entries multiply only where destination CIDRs
//! that apply to one source class nest. `* -> *` plus N host-to-host rules
//! is O(N). Many wide, overlapping rules can still reach the limits
//! ([`MAX_POLICY_ENTRIES`], [`MAX_DST_ENTRIES`]), which are errors that
//! leave the installed policy alone.

use std::collections::HashMap;

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use mesh_common::acl::{
    MAX_CIDRS, MAX_DST_ENTRIES, MAX_POLICY_ENTRIES, MAX_RULES, POLICY_PREFIX_ANY_PROTO, POLICY_PREFIX_PROTO, PolicyKey,
    PolicyValue,
};
use mesh_policy::{CompiledPolicy, PolicyError, Proto, RuleId};

/// The map contents of one policy.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AclTables {
    /// Policy generation.
    pub generation: u64,
    /// IPv4 source CIDR -> class.
    pub src4: Vec<(Ipv4Net, u32)>,
    /// IPv6 source CIDR -> class.
    pub src6: Vec<(Ipv6Net, u32)>,
    /// (source class, IPv4 destination CIDR) -> destination class.
    pub dst4: Vec<(u32, Ipv4Net, u32)>,
    /// (source class, IPv6 destination CIDR) -> destination class.
    pub dst6: Vec<(u32, Ipv6Net, u32)>,
    /// Decision entries: (prefix length, key, value).
    pub policy: Vec<(u32, PolicyKey, PolicyValue)>,
    /// Rule index -> rule id.
    pub rule_ids: Vec<RuleId>,
}

/// A policy that cannot be compiled into the maps.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CompileError {
    /// The policy itself is invalid.
    #[error(transparent)]
    Invalid(#[from] PolicyError),
    /// More than [`MAX_RULES`] rules.
    #[error("{0} rules; the data path holds at most {MAX_RULES}")]
    TooManyRules(usize),
    /// More than [`MAX_CIDRS`] distinct CIDRs on one side and family.
    #[error("{0} distinct CIDRs on one side; the data path holds at most {MAX_CIDRS}")]
    TooManyCidrs(usize),
    /// More than [`MAX_DST_ENTRIES`] (source class, destination CIDR) pairs.
    #[error("the policy needs {0} destination entries; the data path holds at most {MAX_DST_ENTRIES}")]
    TooManyDstEntries(usize),
    /// The cross product of overlapping CIDRs is larger than the decision
    /// map.
    #[error("the policy needs {0} decision entries; the data path holds at most {MAX_POLICY_ENTRIES}")]
    TooManyEntries(usize),
}

/// One side's classes: sorted distinct CIDRs, class = 1 + position (v4
/// first, then v6).
struct Side {
    v4: Vec<Ipv4Net>,
    v6: Vec<Ipv6Net>,
}

impl Side {
    fn new<'a>(nets: impl Iterator<Item = &'a IpNet>) -> Result<Self, CompileError> {
        let (mut v4, mut v6) = (Vec::new(), Vec::new());
        for n in nets {
            match n.trunc() {
                IpNet::V4(n) => v4.push(n),
                IpNet::V6(n) => v6.push(n),
            }
        }
        // Sorted by (address, prefix length): the CIDRs inside `C` follow `C`
        // contiguously.
        v4.sort_by_key(|n| (n.network(), n.prefix_len()));
        v4.dedup();
        v6.sort_by_key(|n| (n.network(), n.prefix_len()));
        v6.dedup();
        for len in [v4.len(), v6.len()] {
            if len > MAX_CIDRS as usize {
                return Err(CompileError::TooManyCidrs(len));
            }
        }
        Ok(Self { v4, v6 })
    }

    /// Classes of the CIDRs inside `net` (itself included).
    fn covered(&self, net: &IpNet) -> std::ops::Range<u32> {
        match net.trunc() {
            IpNet::V4(n) => {
                let start =
                    self.v4.binary_search_by_key(&(n.network(), n.prefix_len()), |m| (m.network(), m.prefix_len()));
                let start = start.expect("every rule CIDR is a class");
                let end = start + self.v4[start..].iter().take_while(|m| n.contains(*m)).count();
                (start as u32 + 1)..(end as u32 + 1)
            }
            IpNet::V6(n) => {
                let start =
                    self.v6.binary_search_by_key(&(n.network(), n.prefix_len()), |m| (m.network(), m.prefix_len()));
                let start = start.expect("every rule CIDR is a class");
                let end = start + self.v6[start..].iter().take_while(|m| n.contains(*m)).count();
                let base = self.v4.len() as u32 + 1;
                (base + start as u32)..(base + end as u32)
            }
        }
    }

    fn classes4(&self) -> Vec<(Ipv4Net, u32)> {
        self.v4.iter().zip(1..).map(|(n, c)| (*n, c)).collect()
    }

    fn classes6(&self) -> Vec<(Ipv6Net, u32)> {
        let base = self.v4.len() as u32 + 1;
        self.v6.iter().zip(base..).map(|(n, c)| (*n, c)).collect()
    }
}

/// (src class, dst class, protocol or any, port prefix bits, masked port).
type EntryId = (u32, u32, Option<u8>, u8, u16);

impl Side {
    /// Number of classes (v4 and v6).
    fn len(&self) -> usize {
        self.v4.len() + self.v6.len()
    }

    /// The CIDR of class `class`.
    fn cidr(&self, class: u32) -> IpNet {
        let i = class as usize - 1;
        if i < self.v4.len() { IpNet::V4(self.v4[i]) } else { IpNet::V6(self.v6[i - self.v4.len()]) }
    }

    /// The class of a CIDR of this side.
    fn class_of(&self, net: &IpNet) -> u32 {
        self.covered(net).start
    }
}

/// Compiles `policy` into map entries.
pub fn compile(policy: &CompiledPolicy) -> Result<AclTables, CompileError> {
    policy.validate()?;
    if policy.rules.len() > MAX_RULES as usize {
        return Err(CompileError::TooManyRules(policy.rules.len()));
    }
    let src = Side::new(policy.rules.iter().flat_map(|r| r.src.iter()))?;
    let dst = Side::new(policy.rules.iter().flat_map(|r| r.dst.iter()))?;

    // The rules that apply to each source class, in policy order.
    let mut applies: Vec<Vec<u32>> = vec![Vec::new(); src.len() + 1];
    for (index, rule) in policy.rules.iter().enumerate() {
        for s in &rule.src {
            for sc in src.covered(s) {
                let list = &mut applies[sc as usize];
                if list.last() != Some(&(index as u32)) {
                    list.push(index as u32);
                }
            }
        }
    }

    let mut dst4 = Vec::new();
    let mut dst6 = Vec::new();
    let mut entries: HashMap<EntryId, u32> = HashMap::new();
    for sc in 1..=src.len() as u32 {
        let v4 = matches!(src.cidr(sc), IpNet::V4(_));
        let same_family = |d: &&IpNet| matches!(d, IpNet::V4(_)) == v4;
        let rules = &applies[sc as usize];
        // This source class's destination CIDRs, as their own small side.
        let local = Side::new(rules.iter().flat_map(|&r| policy.rules[r as usize].dst.iter().filter(same_family)))?;
        for dc_local in 1..=local.len() as u32 {
            let net = local.cidr(dc_local);
            let dc = dst.class_of(&net);
            match net {
                IpNet::V4(n) => dst4.push((sc, n, dc)),
                IpNet::V6(n) => dst6.push((sc, n, dc)),
            }
        }
        if dst4.len().max(dst6.len()) > MAX_DST_ENTRIES as usize {
            return Err(CompileError::TooManyDstEntries(dst4.len().max(dst6.len())));
        }
        for &index in rules {
            let rule = &policy.rules[index as usize];
            let protos = proto_blocks(rule.proto, rule.ports);
            for d in rule.dst.iter().filter(same_family) {
                for dc_local in local.covered(d) {
                    let dc = dst.class_of(&local.cidr(dc_local));
                    for &(proto, bits, port) in &protos {
                        let e = entries.entry((sc, dc, proto, bits, port)).or_insert(index);
                        *e = (*e).min(index);
                    }
                }
            }
            if entries.len() > MAX_POLICY_ENTRIES as usize {
                return Err(CompileError::TooManyEntries(entries.len()));
            }
        }
    }

    // An entry's value is the first rule among the entries that contain it:
    // the any-protocol entry, and the shorter port blocks of its protocol.
    let mut policy_entries = Vec::with_capacity(entries.len());
    for (&(sc, dc, proto, bits, port), &index) in &entries {
        let mut first = index;
        if let Some(p) = proto {
            if let Some(&i) = entries.get(&(sc, dc, None, 0, 0)) {
                first = first.min(i);
            }
            for shorter in 0..bits {
                if let Some(&i) = entries.get(&(sc, dc, Some(p), shorter, mask_port(port, shorter))) {
                    first = first.min(i);
                }
            }
        }
        let prefix = match proto {
            None => POLICY_PREFIX_ANY_PROTO,
            Some(_) => POLICY_PREFIX_PROTO + u32::from(bits),
        };
        let key = PolicyKey {
            src_class: sc.to_be_bytes(),
            dst_class: dc.to_be_bytes(),
            proto: proto.unwrap_or(0),
            port: port.to_be_bytes(),
            pad: 0,
        };
        policy_entries.push((prefix, key, PolicyValue { rule_index: first }));
    }
    policy_entries.sort_by_key(|(p, k, _)| (k.src_class, k.dst_class, *p, k.proto, k.port));

    Ok(AclTables {
        generation: policy.generation,
        src4: src.classes4(),
        src6: src.classes6(),
        dst4,
        dst6,
        policy: policy_entries,
        rule_ids: policy.rules.iter().map(|r| r.id).collect(),
    })
}

fn mask_port(port: u16, bits: u8) -> u16 {
    if bits == 0 { 0 } else { port & (u16::MAX << (16 - bits)) }
}

/// (protocol or any, port prefix bits, port) triples a rule's protocol and
/// ports become.
fn proto_blocks(proto: Proto, ports: mesh_policy::PortRange) -> Vec<(Option<u8>, u8, u16)> {
    match proto {
        Proto::Any => vec![(None, 0, 0)],
        Proto::Icmp => vec![(Some(1), 0, 0), (Some(58), 0, 0)],
        Proto::Other(n) => vec![(Some(n), 0, 0)],
        Proto::Tcp | Proto::Udp | Proto::Sctp => {
            let n = match proto {
                Proto::Tcp => 6,
                Proto::Udp => 17,
                _ => 132,
            };
            port_blocks(ports.first, ports.last).into_iter().map(|(bits, port)| (Some(n), bits, port)).collect()
        }
    }
}

/// Splits `first..=last` into the fewest aligned blocks: (prefix bits, start).
#[must_use]
pub fn port_blocks(first: u16, last: u16) -> Vec<(u8, u16)> {
    let mut out = Vec::new();
    let (mut lo, hi) = (u32::from(first), u32::from(last));
    while lo <= hi {
        // Largest aligned block starting at `lo` that ends by `hi`.
        let mut size_log = if lo == 0 { 16 } else { lo.trailing_zeros().min(16) };
        while lo + (1 << size_log) - 1 > hi {
            size_log -= 1;
        }
        out.push((16 - size_log as u8, lo as u16));
        lo += 1 << size_log;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use mesh_policy::{PortRange, Rule};

    fn rule(id: u32, src: &[&str], dst: &[&str], proto: Proto, ports: PortRange) -> Rule {
        Rule {
            id,
            src: src.iter().map(|s| s.parse().unwrap()).collect(),
            dst: dst.iter().map(|s| s.parse().unwrap()).collect(),
            proto,
            ports,
        }
    }

    #[test]
    fn port_blocks_cover_exactly_the_range() {
        assert_eq!(port_blocks(0, 65535), vec![(0, 0)]);
        assert_eq!(port_blocks(5432, 5432), vec![(16, 5432)]);
        assert_eq!(port_blocks(1024, 2047), vec![(6, 1024)]);
        for (first, last) in [(1, 65535), (3, 17), (1000, 1999), (0, 0), (65535, 65535), (80, 443)] {
            let blocks = port_blocks(first, last);
            assert!(blocks.len() <= 30, "{first}-{last}: {} blocks", blocks.len());
            let mut covered = 0u32;
            for (bits, start) in &blocks {
                let size = 1u32 << (16 - bits);
                assert_eq!(u32::from(*start) % size, 0, "aligned");
                covered += size;
            }
            assert_eq!(covered, u32::from(last) - u32::from(first) + 1);
            for p in [first, last, first + (last - first) / 2] {
                assert_eq!(
                    blocks.iter().filter(|(bits, s)| mask_port(p, *bits) == *s).count(),
                    1,
                    "{p} in exactly one block"
                );
            }
        }
    }

    #[test]
    fn nested_cidrs_share_classes_and_first_rule_wins() {
        let policy = CompiledPolicy {
            generation: 7,
            rules: vec![
                rule(100, &["100.64.0.0/10"], &["198.18.20.0/24"], Proto::Tcp, PortRange::single(5432)),
                rule(101, &["100.64.0.1/32"], &["198.18.20.0/24", "fd7a:6d65:7368::/48"], Proto::Any, PortRange::ANY),
                rule(102, &["fd7a:6d65:7368::/48"], &["fd7a:6d65:7368::/48"], Proto::Icmp, PortRange::ANY),
            ],
        };
        let t = compile(&policy).unwrap();
        assert_eq!(t.generation, 7);
        assert_eq!(t.rule_ids, vec![100, 101, 102]);
        // /10 then /32 inside it: classes 1 and 2; the v6 /48 is class 3.
        assert_eq!(t.src4.iter().map(|(_, c)| *c).collect::<Vec<_>>(), vec![1, 2]);
        assert_eq!(t.src6.iter().map(|(_, c)| *c).collect::<Vec<_>>(), vec![3]);
        // Rule 0 covers src classes 1 and 2 (the /32 is inside the /10).
        let tcp: Vec<_> = t.policy.iter().filter(|(_, k, _)| k.proto == 6).collect();
        assert_eq!(tcp.len(), 2);
        assert!(tcp.iter().all(|(p, _, v)| *p == 88 && v.rule_index == 0));
        // Rule 1 (any) from class 2 to v4 dst: value 1; the TCP 5432 entry
        // under it keeps rule 0, which comes first.
        let any: Vec<_> = t.policy.iter().filter(|(p, _, _)| *p == 64).collect();
        assert_eq!(any.len(), 1, "rule 101's v6 destination has no v6 source");
        assert_eq!(any[0].2.rule_index, 1);
        // Destinations per source class: the /10 and the /32 see the /24;
        // the v6 source sees the /48.
        assert_eq!(t.dst4.iter().map(|(s, _, _)| *s).collect::<Vec<_>>(), vec![1, 2]);
        assert_eq!(t.dst6.len(), 1);
        // ICMP: protocols 1 and 58 from class 3 to the v6 dst class.
        assert_eq!(t.policy.iter().filter(|(p, _, _)| *p == 72).count(), 2);
    }

    #[test]
    fn a_later_wider_rule_does_not_steal_counts_but_an_earlier_one_does() {
        let policy = CompiledPolicy {
            generation: 1,
            rules: vec![
                rule(1, &["100.64.0.1/32"], &["198.18.20.1/32"], Proto::Any, PortRange::ANY),
                rule(2, &["100.64.0.1/32"], &["198.18.20.1/32"], Proto::Tcp, PortRange { first: 0, last: 1023 }),
            ],
        };
        let t = compile(&policy).unwrap();
        assert!(t.policy.iter().all(|(_, _, v)| v.rule_index == 0), "rule 1 matches everything rule 2 does");
    }

    #[test]
    fn allow_all_plus_host_rules_stays_linear() {
        let n = 2000u32;
        let mut rules = vec![rule(0, &["0.0.0.0/0"], &["0.0.0.0/0"], Proto::Any, PortRange::ANY)];
        for i in 0..n {
            let a = std::net::Ipv4Addr::from(0x6440_0000 + i);
            let b = std::net::Ipv4Addr::from(0xC612_0000 + i);
            rules.push(rule(i + 1, &[&format!("{a}/32")], &[&format!("{b}/32")], Proto::Tcp, PortRange::single(5432)));
        }
        let t = compile(&CompiledPolicy { generation: 1, rules }).unwrap();
        assert!(t.policy.len() <= 3 * n as usize + 1, "{} entries", t.policy.len());
        assert!(t.dst4.len() <= 2 * n as usize + 1, "{} dst entries", t.dst4.len());
    }

    #[test]
    fn limits_are_errors() {
        let too_many = CompiledPolicy {
            generation: 1,
            rules: (0..=MAX_RULES)
                .map(|i| rule(i, &["100.64.0.1/32"], &["100.64.0.2/32"], Proto::Any, PortRange::ANY))
                .collect(),
        };
        assert_eq!(compile(&too_many), Err(CompileError::TooManyRules(MAX_RULES as usize + 1)));
        let bad =
            CompiledPolicy { generation: 1, rules: vec![rule(1, &[], &["100.64.0.2/32"], Proto::Any, PortRange::ANY)] };
        assert!(matches!(compile(&bad), Err(CompileError::Invalid(_))));
    }
}
