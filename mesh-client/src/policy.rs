//! A node's compiled policy ([`mesh_policy::CompiledPolicy`]) on the wire:
//! control sends it in every view, the agent turns it back into rules.

use ipnet::IpNet;
use mesh_policy::{CompiledPolicy, PortRange, Proto, Rule};
use mesh_proto::v1 as pb;

/// A wire policy that does not convert back.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("bad compiled policy from the wire: {0}")]
pub struct BadPolicy(String);

/// A compiled policy on the wire.
#[must_use]
pub fn to_proto(p: &CompiledPolicy) -> pb::CompiledPolicy {
    to_proto_with(p, &mut NetNames::default())
}

/// CIDRs as text, each formatted once: the rules of many nodes name the
/// same CIDRs (a site's addresses are in every site member's rules), and
/// formatting addresses was the largest cost of converting thousands of
/// policies at once.
#[derive(Debug, Default)]
pub struct NetNames(std::collections::HashMap<IpNet, String>);

impl NetNames {
    fn name(&mut self, net: &IpNet) -> String {
        self.0.entry(*net).or_insert_with(|| net.to_string()).clone()
    }
}

/// [`to_proto`], with the CIDRs' text from `names`.
#[must_use]
pub fn to_proto_with(p: &CompiledPolicy, names: &mut NetNames) -> pb::CompiledPolicy {
    pb::CompiledPolicy {
        generation: p.generation,
        rules: p
            .rules
            .iter()
            .map(|r| {
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
                    src: r.src.iter().map(|n| names.name(n)).collect(),
                    dst: r.dst.iter().map(|n| names.name(n)).collect(),
                    proto: proto.into(),
                    proto_number: number,
                    port_first: u32::from(r.ports.first),
                    port_last: u32::from(r.ports.last),
                }
            })
            .collect(),
    }
}

/// The wire form back to [`CompiledPolicy`] (what an agent does).
pub fn from_proto(p: &pb::CompiledPolicy) -> Result<CompiledPolicy, BadPolicy> {
    let nets = |v: &[String]| -> Result<Vec<IpNet>, BadPolicy> {
        v.iter().map(|s| s.parse().map_err(|_| BadPolicy(format!("CIDR {s:?}")))).collect()
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
                src: nets(&r.src)?,
                dst: nets(&r.dst)?,
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
        assert_eq!(from_proto(&to_proto(&p)).unwrap(), p);
    }

    #[test]
    fn a_bad_wire_policy_is_refused() {
        let rule = pb::PolicyRule { src: vec!["not a cidr".into()], ..Default::default() };
        let p = pb::CompiledPolicy { generation: 1, rules: vec![rule] };
        assert!(from_proto(&p).is_err());
        let rule = pb::PolicyRule { port_first: 70_000, ..Default::default() };
        assert!(from_proto(&pb::CompiledPolicy { generation: 1, rules: vec![rule] }).is_err());
    }
}
