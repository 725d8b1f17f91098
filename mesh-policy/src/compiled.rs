//! The compiled policy types.

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

/// Stable identifier of a rule inside one policy generation: the index of the
/// ACL entry it came from, so counters can be mapped back to the source line.
pub type RuleId = u32;

/// IP protocol a rule applies to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Proto {
    /// Every protocol.
    Any,
    /// TCP (6).
    Tcp,
    /// UDP (17).
    Udp,
    /// ICMP (1) for IPv4 and ICMPv6 (58) for IPv6.
    Icmp,
    /// SCTP (132).
    Sctp,
    /// Another IP protocol, by number.
    Other(u8),
}

impl Proto {
    /// Whether the destination port range applies to this protocol.
    #[must_use]
    pub const fn has_ports(self) -> bool {
        matches!(self, Self::Tcp | Self::Udp | Self::Sctp)
    }

    /// Whether a packet with IP protocol number `ip_proto` matches.
    #[must_use]
    pub const fn matches(self, ip_proto: u8) -> bool {
        match self {
            Self::Any => true,
            Self::Tcp => ip_proto == 6,
            Self::Udp => ip_proto == 17,
            Self::Icmp => ip_proto == 1 || ip_proto == 58,
            Self::Sctp => ip_proto == 132,
            Self::Other(n) => ip_proto == n,
        }
    }
}

/// An inclusive destination port range; `0..=65535` is "any port".
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct PortRange {
    /// First port of the range.
    pub first: u16,
    /// Last port of the range (inclusive).
    pub last: u16,
}

impl PortRange {
    /// Every port.
    pub const ANY: Self = Self { first: 0, last: u16::MAX };

    /// One port.
    #[must_use]
    pub const fn single(port: u16) -> Self {
        Self { first: port, last: port }
    }

    /// Whether `port` is inside the range.
    #[must_use]
    pub const fn contains(self, port: u16) -> bool {
        self.first <= port && port <= self.last
    }
}

/// One accept rule.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rule {
    /// Identifier for counters (see [`RuleId`]).
    pub id: RuleId,
    /// Source CIDRs; the packet's source must be in one of them.
    pub src: Vec<IpNet>,
    /// Destination CIDRs; the packet's destination must be in one of them.
    pub dst: Vec<IpNet>,
    /// Protocol.
    pub proto: Proto,
    /// Destination ports (only for protocols with ports).
    pub ports: PortRange,
}

/// A node's compiled policy: default deny plus these accept rules.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CompiledPolicy {
    /// Policy generation at control (monotonic); 0 for a local policy.
    pub generation: u64,
    /// The accept rules.
    pub rules: Vec<Rule>,
}

/// A compiled policy that cannot be installed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PolicyError {
    /// A port range whose first port is after its last.
    #[error("rule {rule}: port range {first}-{last} is empty")]
    EmptyPortRange {
        /// The rule.
        rule: RuleId,
        /// First port.
        first: u16,
        /// Last port.
        last: u16,
    },
    /// A rule with no source or no destination can never match.
    #[error("rule {rule}: has no {side} CIDR")]
    EmptySide {
        /// The rule.
        rule: RuleId,
        /// "source" or "destination".
        side: &'static str,
    },
    /// Two rules with the same id.
    #[error("rule id {0} appears twice")]
    DuplicateId(RuleId),
}

impl CompiledPolicy {
    /// Checks the policy for rules that cannot be installed.
    pub fn validate(&self) -> Result<(), PolicyError> {
        let mut ids = std::collections::HashSet::new();
        for rule in &self.rules {
            if rule.ports.first > rule.ports.last {
                return Err(PolicyError::EmptyPortRange {
                    rule: rule.id,
                    first: rule.ports.first,
                    last: rule.ports.last,
                });
            }
            if rule.src.is_empty() {
                return Err(PolicyError::EmptySide { rule: rule.id, side: "source" });
            }
            if rule.dst.is_empty() {
                return Err(PolicyError::EmptySide { rule: rule.id, side: "destination" });
            }
            if !ids.insert(rule.id) {
                return Err(PolicyError::DuplicateId(rule.id));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proto_matching() {
        assert!(Proto::Any.matches(47));
        assert!(Proto::Icmp.matches(1) && Proto::Icmp.matches(58));
        assert!(!Proto::Tcp.matches(17));
        assert!(Proto::Other(47).matches(47));
        assert!(Proto::Udp.has_ports() && !Proto::Icmp.has_ports());
    }

    #[test]
    fn validate_names_the_problem() {
        let rule = |id, first, last| Rule {
            id,
            src: vec!["100.64.0.1/32".parse().unwrap()],
            dst: vec!["198.18.20.0/24".parse().unwrap()],
            proto: Proto::Tcp,
            ports: PortRange { first, last },
        };
        let ok = CompiledPolicy { generation: 1, rules: vec![rule(0, 5432, 5432), rule(1, 0, 65535)] };
        assert_eq!(ok.validate(), Ok(()));
        let bad = CompiledPolicy { generation: 1, rules: vec![rule(3, 10, 9)] };
        assert_eq!(bad.validate(), Err(PolicyError::EmptyPortRange { rule: 3, first: 10, last: 9 }));
        let dup = CompiledPolicy { generation: 1, rules: vec![rule(1, 1, 1), rule(1, 2, 2)] };
        assert_eq!(dup.validate(), Err(PolicyError::DuplicateId(1)));
        let json = serde_json::to_string(&ok).unwrap();
        assert_eq!(serde_json::from_str::<CompiledPolicy>(&json).unwrap(), ok);
    }
}
