//! Compiles a [`CompiledPolicy`] into the ACL's map entries (layout and
//! precedence: `mesh_common::acl`). Pure: no kernel, tested without root.
//!
//! - Every distinct source CIDR gets a class number (IPv4 and IPv6 share one
//!   numbering so classes never collide in the decision map); so does every
//!   distinct destination CIDR.
//! - A rule's source CIDR `C` *applies to* every source class whose CIDR lies
//!   inside `C`: an address whose longest source match is such a class is in
//!   `C`.
//! - For each source class, the destination CIDRs of the rules that apply to
//!   it go into the destination map under that class. A destination CIDR
//!   `D` of such a rule covers every one of those CIDRs inside `D`.
//! - Each (source class, covered destination class) then gets decision
//!   entries per protocol and aligned port block. Where entries of several
//!   rules coincide or nest, each keeps the smallest rule index among the
//!   rules covering it, so the most specific entry names the first matching
//!   rule.
//! - [`SlotLens`] lists the prefix lengths and port levels in use, longest
//!   first, which is the order the program probes them in.
//!
//! Size: the destination map holds, per source class, the destination CIDRs
//! that apply to it; decision entries multiply only where destination CIDRs
//! that apply to one source class nest. `* -> *` plus N host-to-host rules
//! is O(N). Many wide, overlapping rules can still reach the limits
//! ([`MAX_POLICY_ENTRIES`], [`MAX_DST_ENTRIES`]), which are errors that
//! leave the installed policy alone.

use std::collections::HashMap;

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use mesh_common::acl::{
    LEVEL_ANY_PROTO, MAX_CIDRS, MAX_DST_ENTRIES, MAX_POLICY_ENTRIES, MAX_RULES, PolicyKey, PolicyValue, SlotLens,
    prefix_mask,
};

use crate::{CompiledPolicy, PolicyError, Proto, RuleId};

/// What the ACL maps can hold. The agent's eBPF data path has
/// [`Limits::DATAPATH`]; agents report theirs to control (capability 3),
/// which compiles every node's policy against them before accepting a
/// policy change, so a policy that does not fit is refused up front instead
/// of freezing an agent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Rules of one policy.
    pub max_rules: u32,
    /// Distinct CIDRs on one side and family.
    pub max_cidrs: u32,
    /// (source class, destination CIDR) entries per family.
    pub max_dst_entries: u32,
    /// Decision entries.
    pub max_policy_entries: u32,
}

impl Limits {
    /// The sizes of the eBPF ACL's maps (`mesh_common::acl`).
    pub const DATAPATH: Self = Self {
        max_rules: MAX_RULES,
        max_cidrs: MAX_CIDRS,
        max_dst_entries: MAX_DST_ENTRIES,
        max_policy_entries: MAX_POLICY_ENTRIES,
    };
}

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
    /// Decision entries.
    pub policy: Vec<(PolicyKey, PolicyValue)>,
    /// Prefix lengths and port levels in use, longest first.
    pub lens: SlotLens,
    /// Rule index -> rule id.
    pub rule_ids: Vec<RuleId>,
}

/// A policy that cannot be compiled into the maps.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CompileError {
    /// The policy itself is invalid.
    #[error(transparent)]
    Invalid(#[from] PolicyError),
    /// More than [`Limits::max_rules`] rules.
    #[error("{0} rules; the data path holds at most {1}")]
    TooManyRules(usize, u32),
    /// More than [`Limits::max_cidrs`] distinct CIDRs on one side and family.
    #[error("{0} distinct CIDRs on one side; the data path holds at most {1}")]
    TooManyCidrs(usize, u32),
    /// More than [`Limits::max_dst_entries`] (source class, destination CIDR) pairs.
    #[error("the policy needs {0} destination entries; the data path holds at most {1}")]
    TooManyDstEntries(usize, u32),
    /// The cross product of overlapping CIDRs is larger than the decision
    /// map.
    #[error("the policy needs {0} decision entries; the data path holds at most {1}")]
    TooManyEntries(usize, u32),
}

/// One side's classes: sorted distinct CIDRs, class = 1 + position (v4
/// first, then v6).
struct Side {
    v4: Vec<Ipv4Net>,
    v6: Vec<Ipv6Net>,
}

impl Side {
    fn new<'a>(nets: impl Iterator<Item = &'a IpNet>, max_cidrs: u32) -> Result<Self, CompileError> {
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
            if len > max_cidrs as usize {
                return Err(CompileError::TooManyCidrs(len, max_cidrs));
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

/// Compiles `policy` into map entries for the eBPF data path.
pub fn compile(policy: &CompiledPolicy) -> Result<AclTables, CompileError> {
    compile_within(policy, &Limits::DATAPATH)
}

/// Compiles `policy` into map entries that must fit `limits`.
pub fn compile_within(policy: &CompiledPolicy, limits: &Limits) -> Result<AclTables, CompileError> {
    policy.validate()?;
    if policy.rules.len() > limits.max_rules as usize {
        return Err(CompileError::TooManyRules(policy.rules.len(), limits.max_rules));
    }
    let src = Side::new(policy.rules.iter().flat_map(|r| r.src.iter()), limits.max_cidrs)?;
    let dst = Side::new(policy.rules.iter().flat_map(|r| r.dst.iter()), limits.max_cidrs)?;

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
        let local = Side::new(
            rules.iter().flat_map(|&r| policy.rules[r as usize].dst.iter().filter(same_family)),
            limits.max_cidrs,
        )?;
        for dc_local in 1..=local.len() as u32 {
            let net = local.cidr(dc_local);
            let dc = dst.class_of(&net);
            match net {
                IpNet::V4(n) => dst4.push((sc, n, dc)),
                IpNet::V6(n) => dst6.push((sc, n, dc)),
            }
        }
        if dst4.len().max(dst6.len()) > limits.max_dst_entries as usize {
            return Err(CompileError::TooManyDstEntries(dst4.len().max(dst6.len()), limits.max_dst_entries));
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
            if entries.len() > limits.max_policy_entries as usize {
                return Err(CompileError::TooManyEntries(entries.len(), limits.max_policy_entries));
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
        let key = PolicyKey {
            src_class: sc,
            dst_class: dc,
            port: port.to_be_bytes(),
            proto: proto.unwrap_or(0),
            level: if proto.is_some() { bits } else { LEVEL_ANY_PROTO },
        };
        policy_entries.push((key, PolicyValue { rule_index: first }));
    }
    policy_entries.sort_by_key(|(k, _)| (k.src_class, k.dst_class, k.level, k.proto, k.port));
    let lens = slot_lens(&src, &dst4, &dst6, &policy_entries);

    Ok(AclTables {
        generation: policy.generation,
        src4: src.classes4(),
        src6: src.classes6(),
        dst4,
        dst6,
        policy: policy_entries,
        lens,
        rule_ids: policy.rules.iter().map(|r| r.id).collect(),
    })
}

/// The prefix lengths and port levels `entries` use, longest first.
fn slot_lens(
    src: &Side,
    dst4: &[(u32, Ipv4Net, u32)],
    dst6: &[(u32, Ipv6Net, u32)],
    entries: &[(PolicyKey, PolicyValue)],
) -> SlotLens {
    /// Writes the distinct values of `lens` into `out`, largest first, and
    /// returns how many there are.
    fn fill(out: &mut [u8], lens: impl Iterator<Item = u8>) -> u8 {
        let mut seen = [false; 256];
        for l in lens {
            seen[usize::from(l)] = true;
        }
        let mut n = 0;
        for l in (0..=u8::MAX).rev().filter(|l| seen[usize::from(*l)]) {
            out[n] = l;
            n += 1;
        }
        n as u8
    }
    // Native integers read from the big-endian mask bytes (see SlotLens).
    fn masks<T>(out: &mut [T], lens: &[u8], from: impl Fn(u8) -> T) {
        for (m, l) in out.iter_mut().zip(lens) {
            *m = from(*l);
        }
    }
    let v4 = |l| u32::from_ne_bytes(prefix_mask(l));
    let v6 = |l| {
        let m: [u8; 16] = prefix_mask(l);
        [u64::from_ne_bytes(m[..8].try_into().unwrap()), u64::from_ne_bytes(m[8..].try_into().unwrap())]
    };
    // Ports are compared as numbers, not bytes.
    let port = |l| u16::from_be_bytes(prefix_mask(l));
    let mut lens = SlotLens::EMPTY;
    lens.n_src4 = fill(&mut lens.src4, src.v4.iter().map(Ipv4Net::prefix_len));
    lens.n_src6 = fill(&mut lens.src6, src.v6.iter().map(Ipv6Net::prefix_len));
    lens.n_dst4 = fill(&mut lens.dst4, dst4.iter().map(|(_, n, _)| n.prefix_len()));
    lens.n_dst6 = fill(&mut lens.dst6, dst6.iter().map(|(_, n, _)| n.prefix_len()));
    let levels = entries.iter().map(|(k, _)| k.level);
    lens.n_ports = fill(&mut lens.ports, levels.clone().filter(|l| *l != LEVEL_ANY_PROTO));
    lens.any_proto = u8::from(levels.clone().any(|l| l == LEVEL_ANY_PROTO));
    masks(&mut lens.src4_mask, &lens.src4[..usize::from(lens.n_src4)], v4);
    masks(&mut lens.dst4_mask, &lens.dst4[..usize::from(lens.n_dst4)], v4);
    masks(&mut lens.src6_mask, &lens.src6[..usize::from(lens.n_src6)], v6);
    masks(&mut lens.dst6_mask, &lens.dst6[..usize::from(lens.n_dst6)], v6);
    masks(&mut lens.ports_mask, &lens.ports[..usize::from(lens.n_ports)], port);
    lens
}

fn mask_port(port: u16, bits: u8) -> u16 {
    if bits == 0 { 0 } else { port & (u16::MAX << (16 - bits)) }
}

/// (protocol or any, port prefix bits, port) triples a rule's protocol and
/// ports become.
fn proto_blocks(proto: Proto, ports: crate::PortRange) -> Vec<(Option<u8>, u8, u16)> {
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
    use crate::{PortRange, Rule};

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
        let tcp: Vec<_> = t.policy.iter().filter(|(k, _)| k.proto == 6).collect();
        assert_eq!(tcp.len(), 2);
        assert!(tcp.iter().all(|(k, v)| k.level == 16 && v.rule_index == 0));
        // Rule 1 (any) from class 2 to v4 dst: value 1; the TCP 5432 entry
        // under it keeps rule 0, which comes first.
        let any: Vec<_> = t.policy.iter().filter(|(k, _)| k.level == LEVEL_ANY_PROTO).collect();
        assert_eq!(any.len(), 1, "rule 101's v6 destination has no v6 source");
        assert_eq!(any[0].1.rule_index, 1);
        // Destinations per source class: the /10 and the /32 see the /24;
        // the v6 source sees the /48.
        assert_eq!(t.dst4.iter().map(|(s, _, _)| *s).collect::<Vec<_>>(), vec![1, 2]);
        assert_eq!(t.dst6.len(), 1);
        // ICMP: protocols 1 and 58 from class 3 to the v6 dst class.
        assert_eq!(t.policy.iter().filter(|(k, _)| k.level == 0).count(), 2);
        // The lengths the program probes, longest first.
        assert_eq!(&t.lens.src4[..usize::from(t.lens.n_src4)], &[32, 10]);
        assert_eq!(&t.lens.src6[..usize::from(t.lens.n_src6)], &[48]);
        assert_eq!(&t.lens.dst4[..usize::from(t.lens.n_dst4)], &[24]);
        assert_eq!(&t.lens.dst6[..usize::from(t.lens.n_dst6)], &[48]);
        assert_eq!(&t.lens.ports[..usize::from(t.lens.n_ports)], &[16, 0]);
        assert_eq!(t.lens.any_proto, 1);
        assert_eq!(
            t.lens.src4_mask[..2].iter().map(|m| m.to_ne_bytes()).collect::<Vec<_>>(),
            [[255, 255, 255, 255], [255, 192, 0, 0]]
        );
        assert_eq!(t.lens.ports_mask[..2], [u16::MAX, 0]);
        assert_eq!(t.lens.src6_mask[0][0].to_ne_bytes(), [255, 255, 255, 255, 255, 255, 0, 0]);
        assert_eq!(t.lens.src6_mask[0][1], 0);
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
        assert!(t.policy.iter().all(|(_, v)| v.rule_index == 0), "rule 1 matches everything rule 2 does");
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
        assert_eq!(compile(&too_many), Err(CompileError::TooManyRules(MAX_RULES as usize + 1, MAX_RULES)));
        // Smaller limits (an agent that reports them) are errors too.
        let small = Limits { max_policy_entries: 2, ..Limits::DATAPATH };
        let two = CompiledPolicy {
            generation: 1,
            rules: vec![
                rule(0, &["10.0.0.0/8"], &["10.1.0.0/16"], Proto::Tcp, PortRange::single(22)),
                rule(1, &["10.0.0.0/8"], &["10.2.0.0/16"], Proto::Tcp, PortRange::single(22)),
                rule(2, &["10.0.0.0/8"], &["10.3.0.0/16"], Proto::Tcp, PortRange::single(22)),
            ],
        };
        let e = compile_within(&two, &small).unwrap_err();
        assert_eq!(e.to_string(), "the policy needs 3 decision entries; the data path holds at most 2");
        let bad =
            CompiledPolicy { generation: 1, rules: vec![rule(1, &[], &["100.64.0.2/32"], Proto::Any, PortRange::ANY)] };
        assert!(matches!(compile(&bad), Err(CompileError::Invalid(_))));
    }
}
