//! Store records and compiled policies to their `mesh.v1` messages.

use ipnet::IpNet;
use mesh_policy::{CompiledPolicy, PortRange, Proto, Rule};
use mesh_proto::v1 as pb;

use crate::store::{AuditRecord, KeyRecord, NodeRecord, NodeState};

/// Seven days: a key closer than this to expiry is "expiring soon".
pub const EXPIRING_SOON_SECS: i64 = 7 * 86_400;

/// Limits as an agent reports them; a 0 (unset) field is no limit.
#[must_use]
pub fn limits(l: &pb::DataplaneLimits) -> mesh_policy::tables::Limits {
    let or_max = |v: u32| if v == 0 { u32::MAX } else { v };
    mesh_policy::tables::Limits {
        max_rules: or_max(l.max_rules),
        max_cidrs: or_max(l.max_cidrs),
        max_dst_entries: or_max(l.max_dst_entries),
        max_policy_entries: or_max(l.max_policy_entries),
    }
}

/// A node as the API shows it. `volatile` includes presence fields (left
/// out of agent views so presence changes do not push new generations).
#[must_use]
pub fn node(n: &NodeRecord, now: i64, volatile: bool) -> pb::Node {
    let state = if n.expired(now) {
        pb::NodeState::Expired
    } else if n.state == NodeState::Approved {
        pb::NodeState::Approved
    } else {
        pb::NodeState::Pending
    };
    pb::Node {
        id: n.id,
        name: n.name.clone(),
        hostname: n.hostname.clone(),
        wireguard_public_key: hex::decode(&n.public_key).unwrap_or_default(),
        ipv4: n.ipv4.to_string(),
        ipv6: n.ipv6.to_string(),
        tags: n.tags.clone(),
        state: state.into(),
        ephemeral: n.ephemeral,
        online: volatile && n.online,
        created_unix: n.created,
        last_seen_unix: if volatile { n.last_seen } else { 0 },
        key_expiry_unix: n.key_expiry,
        key_expiring_soon: volatile && !n.expired(now) && n.key_expiry - now < EXPIRING_SOON_SECS,
        key_rotation_requested: n.rotation_requested,
        endpoints: n.endpoints.clone(),
        advertised_routes: Vec::new(),
        user: n.owner.clone(),
        acked_generation: 0,
        backend: String::new(),
        view_error: String::new(),
        view_error_generation: 0,
    }
}

/// A compiled policy on the wire.
#[must_use]
pub fn policy_to_proto(p: &CompiledPolicy) -> pb::CompiledPolicy {
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
                    src: r.src.iter().map(ToString::to_string).collect(),
                    dst: r.dst.iter().map(ToString::to_string).collect(),
                    proto: proto.into(),
                    proto_number: number,
                    port_first: u32::from(r.ports.first),
                    port_last: u32::from(r.ports.last),
                }
            })
            .collect(),
    }
}

/// A wire policy that does not convert back.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("bad compiled policy from the wire: {0}")]
pub struct BadPolicy(String);

/// The wire form back to [`CompiledPolicy`] (what an agent does).
pub fn policy_from_proto(p: &pb::CompiledPolicy) -> Result<CompiledPolicy, BadPolicy> {
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

/// An enrollment key as the API shows it.
#[must_use]
pub fn key(k: &KeyRecord) -> pb::EnrollmentKey {
    pb::EnrollmentKey {
        id: k.id.clone(),
        reusable: k.reusable,
        ephemeral: k.ephemeral,
        preapproved: k.preapproved,
        tags: k.tags.clone(),
        user: k.owner.clone(),
        description: k.description.clone(),
        created_unix: k.created,
        expires_unix: k.expires,
        revoked: k.revoked,
        uses: k.uses,
    }
}

/// An audit entry on the wire.
#[must_use]
pub fn audit(a: &AuditRecord) -> pb::AuditEntry {
    pb::AuditEntry {
        id: a.id,
        at_unix: a.at,
        actor: a.actor.clone(),
        action: a.action.clone(),
        subject: a.subject.clone(),
        before: a.before.clone(),
        after: a.after.clone(),
    }
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
        assert_eq!(policy_from_proto(&policy_to_proto(&p)).unwrap(), p);
    }
}
