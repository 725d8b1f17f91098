//! A node's compiled policy ([`mesh_policy::CompiledPolicy`]) on the wire:
//! control sends it in every view, the agent turns it back into rules.

use std::collections::HashMap;
use std::net::IpAddr;

use ipnet::IpNet;
use mesh_policy::{CompiledPolicy, PortRange, Proto, Rule};
use mesh_proto::v1 as pb;

/// A wire policy that does not convert back.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("bad compiled policy from the wire: {0}")]
pub struct BadPolicy(String);

/// A compiled policy on the wire (capability 6): every CIDR once, as bytes
/// in `nets` in the order the rules first use it, and the rules refer to
/// them by index. A site member's rules name the site's addresses in
/// every rule; as text they were most of a view's bytes and most of
/// control's work to build and send thousands of views at once.
#[must_use]
pub fn to_proto(p: &CompiledPolicy) -> pb::CompiledPolicy {
    let mut index: HashMap<IpNet, u32> = HashMap::new();
    let mut nets: Vec<Vec<u8>> = Vec::new();
    let mut refs = |v: &[IpNet]| -> Vec<u32> {
        v.iter()
            .map(|n| {
                *index.entry(*n).or_insert_with(|| {
                    nets.push(net_bytes(n));
                    u32::try_from(nets.len() - 1).unwrap_or(u32::MAX)
                })
            })
            .collect()
    };
    let mut rules = Vec::with_capacity(p.rules.len());
    for r in &p.rules {
        let (src_nets, dst_nets) = (refs(&r.src), refs(&r.dst));
        rules.push(pb::PolicyRule { src_nets, dst_nets, ..rule_head(r) });
    }
    pb::CompiledPolicy { generation: p.generation, rules, nets }
}

/// The same policy with its CIDRs as text in each rule: what agents before
/// capability 6 read.
#[must_use]
pub fn to_text_proto(p: &CompiledPolicy) -> pb::CompiledPolicy {
    let mut names: HashMap<IpNet, String> = HashMap::new();
    let mut text = |v: &[IpNet]| -> Vec<String> {
        v.iter().map(|n| names.entry(*n).or_insert_with(|| n.to_string()).clone()).collect()
    };
    let mut rules = Vec::with_capacity(p.rules.len());
    for r in &p.rules {
        let (src, dst) = (text(&r.src), text(&r.dst));
        rules.push(pb::PolicyRule { src, dst, ..rule_head(r) });
    }
    pb::CompiledPolicy { generation: p.generation, rules, nets: Vec::new() }
}

/// A rule's id, protocol and ports on the wire, without its CIDRs.
fn rule_head(r: &Rule) -> pb::PolicyRule {
    let (proto, number) = match r.proto {
        Proto::Any => (pb::RuleProto::Any, 0),
        Proto::Tcp => (pb::RuleProto::Tcp, 6),
        Proto::Udp => (pb::RuleProto::Udp, 17),
        Proto::Icmp => (pb::RuleProto::Icmp, 1),
        Proto::Sctp => (pb::RuleProto::Sctp, 132),
        Proto::Other(n) => (pb::RuleProto::Other, u32::from(n)),
    };
    pb::PolicyRule {
        id: r.id,
        proto: proto.into(),
        proto_number: number,
        port_first: u32::from(r.ports.first),
        port_last: u32::from(r.ports.last),
        ..Default::default()
    }
}

/// A CIDR as `CompiledPolicy.nets` holds it: the address's bytes, then the
/// prefix length.
fn net_bytes(n: &IpNet) -> Vec<u8> {
    let mut b = match n.addr() {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    };
    b.push(n.prefix_len());
    b
}

/// [`net_bytes`] back.
fn net_from_bytes(b: &[u8]) -> Result<IpNet, BadPolicy> {
    let bad = || BadPolicy(format!("CIDR bytes {b:02x?}"));
    let (&len, addr) = b.split_last().ok_or_else(bad)?;
    let addr = match addr.len() {
        4 => IpAddr::from(<[u8; 4]>::try_from(addr).map_err(|_| bad())?),
        16 => IpAddr::from(<[u8; 16]>::try_from(addr).map_err(|_| bad())?),
        _ => return Err(bad()),
    };
    IpNet::new(addr, len).map_err(|_| bad())
}

/// The wire form back to [`CompiledPolicy`] (what an agent does). Reads
/// both forms: CIDRs as text in the rules, and by index into `nets`.
pub fn from_proto(p: &pb::CompiledPolicy) -> Result<CompiledPolicy, BadPolicy> {
    let table: Vec<IpNet> = p.nets.iter().map(|b| net_from_bytes(b)).collect::<Result<_, _>>()?;
    let nets = |text: &[String], indexes: &[u32]| -> Result<Vec<IpNet>, BadPolicy> {
        let parsed = text.iter().map(|s| s.parse().map_err(|_| BadPolicy(format!("CIDR {s:?}"))));
        let indexed = indexes.iter().map(|&i| {
            usize::try_from(i)
                .ok()
                .and_then(|i| table.get(i).copied())
                .ok_or_else(|| BadPolicy(format!("CIDR index {i} of {} CIDRs", table.len())))
        });
        parsed.chain(indexed).collect()
    };
    let port = |v: u32| u16::try_from(v).map_err(|_| BadPolicy(format!("port {v}")));
    let rules = p
        .rules
        .iter()
        .map(|r| {
            let proto = match pb::RuleProto::try_from(r.proto).map_err(|_| BadPolicy(format!("proto {}", r.proto)))? {
                pb::RuleProto::Any => Proto::Any,
                pb::RuleProto::Tcp => Proto::Tcp,
                pb::RuleProto::Udp => Proto::Udp,
                pb::RuleProto::Icmp => Proto::Icmp,
                pb::RuleProto::Sctp => Proto::Sctp,
                pb::RuleProto::Other => {
                    Proto::Other(u8::try_from(r.proto_number).map_err(|_| BadPolicy("proto number".into()))?)
                }
            };
            Ok(Rule {
                id: r.id,
                src: nets(&r.src, &r.src_nets)?,
                dst: nets(&r.dst, &r.dst_nets)?,
                proto,
                ports: PortRange { first: port(r.port_first)?, last: port(r.port_last)? },
            })
        })
        .collect::<Result<_, _>>()?;
    Ok(CompiledPolicy { generation: p.generation, rules })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compiled_policy_round_trips_through_the_wire() {
        let p = CompiledPolicy {
            generation: 9,
            rules: vec![
                Rule {
                    id: 1 << 16,
                    src: vec!["100.64.0.1/32".parse().unwrap(), "fd7a:6d65:7368::1/128".parse().unwrap()],
                    dst: vec!["198.18.10.0/24".parse().unwrap()],
                    proto: Proto::Other(47),
                    ports: PortRange::ANY,
                },
                Rule {
                    id: 2,
                    src: vec!["0.0.0.0/0".parse().unwrap()],
                    dst: vec!["100.64.0.2/32".parse().unwrap()],
                    proto: Proto::Tcp,
                    ports: PortRange { first: 5000, last: 5100 },
                },
            ],
        };
        let compact = to_proto(&p);
        assert_eq!(from_proto(&compact).unwrap(), p);
        assert_eq!(compact.nets.len(), 5, "each CIDR once");
        assert!(compact.rules.iter().all(|r| r.src.is_empty() && r.dst.is_empty()));
        let text = to_text_proto(&p);
        assert!(text.nets.is_empty());
        assert_eq!(text.rules[0].src, ["100.64.0.1/32", "fd7a:6d65:7368::1/128"]);
        assert_eq!(from_proto(&text).unwrap(), p);
    }

    /// The compact form is what makes views small: a site member's rules,
    /// naming the same 40 addresses in six rules, take under a quarter of the
    /// bytes they take as text.
    #[test]
    fn the_compact_form_names_each_cidr_once() {
        use prost::Message as _;
        let site: Vec<IpNet> = (1..=20u8)
            .flat_map(|i| [format!("100.64.0.{i}/32"), format!("fd7a:6d65:7368::{i:x}/128")])
            .map(|s| s.parse().unwrap())
            .collect();
        let me = vec![site[0], site[1]];
        let rules = [Proto::Tcp, Proto::Udp, Proto::Sctp]
            .into_iter()
            .flat_map(|proto| {
                let ports = PortRange { first: 22, last: 22 };
                [
                    Rule { id: 1, src: site.clone(), dst: me.clone(), proto, ports },
                    Rule { id: 2, src: me.clone(), dst: site.clone(), proto, ports },
                ]
            })
            .collect();
        let p = CompiledPolicy { generation: 1, rules };
        let (compact, text) = (to_proto(&p).encoded_len(), to_text_proto(&p).encoded_len());
        assert!(compact * 4 < text, "compact {compact} bytes, text {text}");
    }

    #[test]
    fn a_bad_wire_policy_is_refused() {
        let rule = pb::PolicyRule { src: vec!["not a cidr".into()], ..Default::default() };
        let p = pb::CompiledPolicy { generation: 1, rules: vec![rule], nets: Vec::new() };
        assert!(from_proto(&p).is_err());
        let rule = pb::PolicyRule { port_first: 70_000, ..Default::default() };
        assert!(from_proto(&pb::CompiledPolicy { generation: 1, rules: vec![rule], nets: Vec::new() }).is_err());
        // Compact form: an index past the table, and CIDR bytes of no
        // address family or with too long a prefix.
        let rule = pb::PolicyRule { src_nets: vec![1], ..Default::default() };
        let p = pb::CompiledPolicy { generation: 1, rules: vec![rule], nets: vec![vec![10, 0, 0, 0, 8]] };
        assert_eq!(
            from_proto(&p).unwrap_err().to_string(),
            "bad compiled policy from the wire: CIDR index 1 of 1 CIDRs"
        );
        for bad in [vec![10, 0, 0, 8], vec![10, 0, 0, 0, 33], vec![0; 16].into_iter().chain([129]).collect(), vec![]] {
            let p = pb::CompiledPolicy { generation: 1, rules: Vec::new(), nets: vec![bad.clone()] };
            assert!(from_proto(&p).is_err(), "{bad:?}");
        }
    }
}
