//! The policy document: HuJSON text to typed, validated [`Policy`].
//!
//! Supported (Tailscale-style): `groups`, `tagOwners`, `hosts`, `acls`,
//! `autoApprovers.routes` and `tests`. Tailscale sections the mesh does not
//! enforce get one clear message each ([`ProblemKind::Unsupported`]): `ssh`
//! and `nodeAttrs` are accepted with a warning (they grant nothing, so
//! ignoring them opens nothing); `grants`, `postures` and `autogroup:*`
//! names are refused, because ignoring them would change what the policy
//! allows. Any other unknown key is an error so that a typo never silently
//! drops part of a policy.

use std::collections::BTreeMap;

use ipnet::IpNet;
use mesh_policy::{PortRange, Proto};

use super::hujson::{self, Spanned, Value};

/// One problem found in a policy, with the line to look at.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {kind}")]
pub struct Problem {
    /// 1-based line in the HuJSON text.
    pub line: u32,
    /// What is wrong.
    pub kind: ProblemKind,
}

/// What is wrong with a policy.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ProblemKind {
    /// The text is not HuJSON.
    #[error("syntax: {0}")]
    Syntax(String),
    /// A node's compiled rules do not fit the data path limits its agent
    /// reported (see [`super::check_limits`]).
    #[error("too large for {0}")]
    Limit(String),
    /// Checking the policy exceeded its time budget, or the checker failed.
    #[error("{0}")]
    Budget(String),
    /// A key this policy format does not have.
    #[error("unknown field {0:?}")]
    UnknownField(String),
    /// A value of the wrong JSON type.
    #[error("{field} must be {expected}, not {found}")]
    WrongType {
        /// The field.
        field: String,
        /// The JSON type it needs.
        expected: &'static str,
        /// The JSON type it has.
        found: &'static str,
    },
    /// A required field is missing.
    #[error("missing field {0:?}")]
    MissingField(&'static str),
    /// A `group:` that `groups` does not define.
    #[error("unknown group {0:?}")]
    UnknownGroup(String),
    /// A `tag:` that `tagOwners` does not define.
    #[error("unknown tag {0:?} (tags must be declared in tagOwners)")]
    UnknownTag(String),
    /// A name that is neither a host, a user, an address nor a known prefix.
    #[error("unknown host or target {0:?}")]
    UnknownHost(String),
    /// A key of `groups`, `tagOwners` or `hosts` of the wrong form.
    #[error("bad name {name:?}: {why}")]
    BadName {
        /// The name.
        name: String,
        /// Why it is wrong.
        why: &'static str,
    },
    /// An address or CIDR that does not parse.
    #[error("bad address or CIDR {0:?}")]
    BadCidr(String),
    /// A `dst` entry without `:ports`, or with bad ports.
    #[error("bad destination {0:?}: {1}")]
    BadDestination(String, &'static str),
    /// A `proto` we do not know.
    #[error("unknown protocol {0:?}")]
    BadProto(String),
    /// Only `accept` is supported.
    #[error("unknown action {0:?} (only \"accept\")")]
    BadAction(String),
    /// A policy test that does not hold.
    #[error("test failed: {0}")]
    TestFailed(String),
    /// A Tailscale policy feature this mesh does not have: an error, or a
    /// warning for sections that grant nothing (see [`Policy::warnings`]).
    #[error("not supported by this mesh: {0}, see docs/policy.md#unsupported")]
    Unsupported(String),
}

fn problem(line: u32, kind: ProblemKind) -> Problem {
    Problem { line, kind }
}

/// A string and its line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Located {
    /// The line.
    pub line: u32,
    /// The text.
    pub text: String,
}

/// A source or destination principal.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Target {
    /// `*`: everything.
    Any,
    /// `group:name`.
    Group(String),
    /// `tag:name`.
    Tag(String),
    /// A user (`alice@example.com`): the nodes enrolled for that user.
    User(String),
    /// A name from `hosts`.
    Host(String),
    /// A literal address or CIDR.
    Cidr(IpNet),
}

/// One `dst` entry: a target and its port ranges.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Destination {
    /// Line of the entry.
    pub line: u32,
    /// The target.
    pub target: Target,
    /// Port ranges (`*` is [`PortRange::ANY`]).
    pub ports: Vec<PortRange>,
}

/// One ACL entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Acl {
    /// Line of the entry.
    pub line: u32,
    /// Sources.
    pub src: Vec<Target>,
    /// Destinations.
    pub dst: Vec<Destination>,
    /// Protocol; absent means [`Proto::Any`].
    pub proto: Proto,
}

/// One policy test: traffic from `src` to each `accept` must be allowed and
/// to each `deny` must be refused (checked as TCP to the given port).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PolicyTest {
    /// Line of the test.
    pub line: u32,
    /// The source principal.
    pub src: Target,
    /// Destinations (`target:port`) that must be reachable.
    pub accept: Vec<(Target, u16, String)>,
    /// Destinations that must not be.
    pub deny: Vec<(Target, u16, String)>,
}

/// A parsed, validated policy.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Policy {
    /// `group:x` to its users.
    pub groups: BTreeMap<String, Vec<String>>,
    /// `tag:x` to the principals that may assign it.
    pub tag_owners: BTreeMap<String, Vec<String>>,
    /// Host names to CIDRs.
    pub hosts: BTreeMap<String, IpNet>,
    /// The ACL entries in order; an entry's index is its rule id's high part.
    pub acls: Vec<Acl>,
    /// Route prefixes and who may advertise them without admin approval.
    pub auto_approvers: Vec<(IpNet, Vec<Target>)>,
    /// The policy's own tests.
    pub tests: Vec<PolicyTest>,
    /// Sections accepted but ignored (`ssh`, `nodeAttrs`), one warning each.
    pub warnings: Vec<Problem>,
}

/// The policy every fresh control starts with: nothing is allowed.
pub const DEFAULT_POLICY: &str = "// Default deny: nothing is allowed until a policy says so.\n{\n  \"acls\": [],\n}\n";

impl Policy {
    /// Parses and validates `text`. Returns every problem found (at least
    /// one on failure), in line order.
    pub fn parse(text: &str) -> Result<Self, Vec<Problem>> {
        let doc = hujson::parse(text).map_err(|e| vec![problem(e.line, ProblemKind::Syntax(e.message))])?;
        let mut cx = Cx { problems: Vec::new(), warnings: Vec::new() };
        let mut policy = cx.policy(&doc);
        if cx.problems.is_empty() {
            policy.warnings = cx.warnings;
            Ok(policy)
        } else {
            cx.problems.sort_by_key(|p| p.line);
            Err(cx.problems)
        }
    }
}

struct Cx {
    problems: Vec<Problem>,
    warnings: Vec<Problem>,
}

impl Cx {
    fn push(&mut self, line: u32, kind: ProblemKind) {
        self.problems.push(problem(line, kind));
    }

    fn unsupported(&mut self, line: u32, what: &str) {
        self.push(line, ProblemKind::Unsupported(what.to_owned()));
    }

    fn object<'v>(&mut self, field: &str, v: &'v Spanned) -> &'v [(String, u32, Spanned)] {
        match &v.value {
            Value::Object(m) => m,
            other => {
                self.wrong(field, "an object", other, v.line);
                &[]
            }
        }
    }

    fn array<'v>(&mut self, field: &str, v: &'v Spanned) -> &'v [Spanned] {
        match &v.value {
            Value::Array(a) => a,
            other => {
                self.wrong(field, "an array", other, v.line);
                &[]
            }
        }
    }

    fn string(&mut self, field: &str, v: &Spanned) -> Option<Located> {
        match &v.value {
            Value::String(s) => Some(Located { line: v.line, text: s.clone() }),
            other => {
                self.wrong(field, "a string", other, v.line);
                None
            }
        }
    }

    fn strings(&mut self, field: &str, v: &Spanned) -> Vec<Located> {
        self.array(field, v).iter().filter_map(|x| self.string(field, x)).collect()
    }

    fn wrong(&mut self, field: &str, expected: &'static str, found: &Value, line: u32) {
        self.push(line, ProblemKind::WrongType { field: field.to_owned(), expected, found: found.kind() });
    }

    fn policy(&mut self, doc: &Spanned) -> Policy {
        let mut p = Policy::default();
        let members = self.object("the policy", doc);
        // Names first: targets in acls are resolved against them.
        for (key, line, v) in members {
            match key.as_str() {
                "groups" => {
                    for (name, nline, users) in self.object("groups", v) {
                        if !name.starts_with("group:") || name.len() == 6 {
                            self.push(*nline, ProblemKind::BadName { name: name.clone(), why: "must be group:<name>" });
                        }
                        let users = self.strings(name, users).into_iter().map(|l| l.text).collect();
                        p.groups.insert(name.clone(), users);
                    }
                }
                "tagOwners" => {
                    for (name, nline, owners) in self.object("tagOwners", v) {
                        if !name.starts_with("tag:") || name.len() == 4 {
                            self.push(*nline, ProblemKind::BadName { name: name.clone(), why: "must be tag:<name>" });
                        }
                        let owners = self.strings(name, owners).into_iter().map(|l| l.text).collect();
                        p.tag_owners.insert(name.clone(), owners);
                    }
                }
                "hosts" => {
                    for (name, nline, addr) in self.object("hosts", v) {
                        if name.contains(':') || name.contains('@') || name == "*" || name.is_empty() {
                            self.push(
                                *nline,
                                ProblemKind::BadName { name: name.clone(), why: "host names have no ':' or '@'" },
                            );
                        }
                        if let Some(a) = self.string(name, addr) {
                            match parse_cidr(&a.text) {
                                Some(net) => {
                                    p.hosts.insert(name.clone(), net);
                                }
                                None => self.push(a.line, ProblemKind::BadCidr(a.text)),
                            }
                        }
                    }
                }
                "acls" | "autoApprovers" | "tests" => {}
                "ssh" => self.warnings.push(problem(
                    *line,
                    ProblemKind::Unsupported("\"ssh\" (no SSH access control here; the section is ignored)".into()),
                )),
                "nodeAttrs" => self.warnings.push(problem(
                    *line,
                    ProblemKind::Unsupported(
                        "\"nodeAttrs\" (node attributes have no effect; the section is ignored)".into(),
                    ),
                )),
                "grants" => self.unsupported(*line, "\"grants\" (write them as \"acls\" entries)"),
                "postures" => self.unsupported(*line, "\"postures\" (no device posture checks)"),
                _ => self.push(*line, ProblemKind::UnknownField(key.clone())),
            }
        }
        // Group members and tag owners may name groups (owners) and users.
        for (tag, owners) in p.tag_owners.clone() {
            for owner in owners {
                if owner.starts_with("autogroup:") {
                    let line = line_of_key(members, "tagOwners", &tag);
                    self.unsupported(line, &format!("{owner:?} (name groups or users)"));
                } else if owner.starts_with("group:") && !p.groups.contains_key(&owner) {
                    let line = line_of_key(members, "tagOwners", &tag);
                    self.push(line, ProblemKind::UnknownGroup(owner));
                } else if owner.starts_with("tag:") && !p.tag_owners.contains_key(&owner) {
                    let line = line_of_key(members, "tagOwners", &tag);
                    self.push(line, ProblemKind::UnknownTag(owner));
                }
            }
        }
        for (key, _, v) in members {
            match key.as_str() {
                "acls" => {
                    for entry in self.array("acls", v) {
                        if let Some(acl) = self.acl(&p, entry) {
                            p.acls.push(acl);
                        }
                    }
                }
                "autoApprovers" => {
                    for (k, kline, inner) in self.object("autoApprovers", v) {
                        match k.as_str() {
                            "routes" => {
                                for (prefix, pline, who) in self.object("autoApprovers.routes", inner) {
                                    let Some(net) = parse_cidr(prefix) else {
                                        self.push(*pline, ProblemKind::BadCidr(prefix.clone()));
                                        continue;
                                    };
                                    let who = self
                                        .strings(prefix, who)
                                        .into_iter()
                                        .filter_map(|l| self.target(&p, &l))
                                        .collect();
                                    p.auto_approvers.push((net, who));
                                }
                            }
                            "exitNode" => {}
                            _ => self.push(*kline, ProblemKind::UnknownField(format!("autoApprovers.{k}"))),
                        }
                    }
                }
                "tests" => {
                    for t in self.array("tests", v) {
                        if let Some(t) = self.test(&p, t) {
                            p.tests.push(t);
                        }
                    }
                }
                _ => {}
            }
        }
        p
    }

    fn acl(&mut self, p: &Policy, entry: &Spanned) -> Option<Acl> {
        let members = self.object("acl entry", entry);
        let (mut src, mut dst, mut proto, mut action) = (None, None, Proto::Any, None);
        for (key, line, v) in members {
            match key.as_str() {
                "action" => action = self.string("action", v),
                "src" => src = Some(self.strings("src", v)),
                "dst" => dst = Some(self.strings("dst", v)),
                "proto" => {
                    let text = match &v.value {
                        Value::String(s) => s.clone(),
                        Value::Number(n) => n.to_string(),
                        other => {
                            self.wrong("proto", "a string", other, v.line);
                            continue;
                        }
                    };
                    match parse_proto(&text) {
                        Some(pr) => proto = pr,
                        None => self.push(v.line, ProblemKind::BadProto(text)),
                    }
                }
                "users" => {}
                _ => self.push(*line, ProblemKind::UnknownField(key.clone())),
            }
        }
        match &action {
            None => self.push(entry.line, ProblemKind::MissingField("action")),
            Some(a) if a.text != "accept" => self.push(a.line, ProblemKind::BadAction(a.text.clone())),
            Some(_) => {}
        }
        let Some(src) = src else {
            self.push(entry.line, ProblemKind::MissingField("src"));
            return None;
        };
        let Some(dst) = dst else {
            self.push(entry.line, ProblemKind::MissingField("dst"));
            return None;
        };
        let src = src.iter().filter_map(|l| self.target(p, l)).collect();
        let dst = dst.iter().filter_map(|l| self.destination(p, l)).collect();
        Some(Acl { line: entry.line, src, dst, proto })
    }

    fn destination(&mut self, p: &Policy, l: &Located) -> Option<Destination> {
        let Some((target, ports)) = l.text.rsplit_once(':') else {
            self.push(l.line, ProblemKind::BadDestination(l.text.clone(), "needs :ports (e.g. tag:db:5432 or host:*)"));
            return None;
        };
        let Some(ports) = parse_ports(ports) else {
            self.push(l.line, ProblemKind::BadDestination(l.text.clone(), "ports must be *, N, N-M or a comma list"));
            return None;
        };
        let target = self.target(p, &Located { line: l.line, text: target.to_owned() })?;
        Some(Destination { line: l.line, target, ports })
    }

    fn target(&mut self, p: &Policy, l: &Located) -> Option<Target> {
        let t = l.text.as_str();
        let target = if t == "*" {
            Target::Any
        } else if t.starts_with("autogroup:") {
            self.unsupported(l.line, &format!("{t:?} (name tags, groups, users or hosts instead)"));
            return None;
        } else if t.starts_with("group:") {
            if !p.groups.contains_key(t) {
                self.push(l.line, ProblemKind::UnknownGroup(t.to_owned()));
                return None;
            }
            Target::Group(t.to_owned())
        } else if t.starts_with("tag:") {
            if !p.tag_owners.contains_key(t) {
                self.push(l.line, ProblemKind::UnknownTag(t.to_owned()));
                return None;
            }
            Target::Tag(t.to_owned())
        } else if t.contains('@') {
            Target::User(t.to_owned())
        } else if p.hosts.contains_key(t) {
            Target::Host(t.to_owned())
        } else if let Some(net) = parse_cidr(t) {
            Target::Cidr(net)
        } else {
            self.push(l.line, ProblemKind::UnknownHost(t.to_owned()));
            return None;
        };
        Some(target)
    }

    fn test(&mut self, p: &Policy, v: &Spanned) -> Option<PolicyTest> {
        let (mut src, mut accept, mut deny) = (None, Vec::new(), Vec::new());
        for (key, line, value) in self.object("test", v) {
            match key.as_str() {
                "src" => src = self.string("src", value).and_then(|l| self.target(p, &l)),
                "accept" | "deny" => {
                    let mut out = Vec::new();
                    for l in self.strings(key, value) {
                        let port = l.text.rsplit_once(':').and_then(|(t, port)| Some((t, port.parse::<u16>().ok()?)));
                        let Some((t, port)) = port else {
                            self.push(l.line, ProblemKind::BadDestination(l.text.clone(), "tests need target:port"));
                            continue;
                        };
                        if let Some(target) = self.target(p, &Located { line: l.line, text: t.to_owned() }) {
                            out.push((target, port, l.text.clone()));
                        }
                    }
                    if key == "accept" {
                        accept = out;
                    } else {
                        deny = out;
                    }
                }
                _ => self.push(*line, ProblemKind::UnknownField(key.clone())),
            }
        }
        let Some(src) = src else {
            if !self.problems.iter().any(|pr| pr.line == v.line) {
                self.push(v.line, ProblemKind::MissingField("src"));
            }
            return None;
        };
        Some(PolicyTest { line: v.line, src, accept, deny })
    }
}

fn line_of_key(members: &[(String, u32, Spanned)], section: &str, key: &str) -> u32 {
    members
        .iter()
        .find(|(k, _, _)| k == section)
        .and_then(|(_, _, v)| match &v.value {
            Value::Object(m) => m.iter().find(|(k, _, _)| k == key).map(|(_, l, _)| *l),
            _ => None,
        })
        .unwrap_or(1)
}

/// Parses `1.2.3.4`, `1.2.3.0/24`, `fd00::1` or `fd00::/48`.
#[must_use]
pub fn parse_cidr(s: &str) -> Option<IpNet> {
    s.parse::<IpNet>().map(|n| n.trunc()).ok().or_else(|| s.parse::<std::net::IpAddr>().ok().map(IpNet::from))
}

fn parse_ports(s: &str) -> Option<Vec<PortRange>> {
    if s == "*" {
        return Some(vec![PortRange::ANY]);
    }
    s.split(',')
        .map(|part| match part.split_once('-') {
            Some((a, b)) => {
                let (first, last) = (a.parse().ok()?, b.parse().ok()?);
                (first <= last).then_some(PortRange { first, last })
            }
            None => part.parse().ok().map(PortRange::single),
        })
        .collect()
}

fn parse_proto(s: &str) -> Option<Proto> {
    Some(match s.to_ascii_lowercase().as_str() {
        "" | "*" | "any" => Proto::Any,
        "tcp" | "6" => Proto::Tcp,
        "udp" | "17" => Proto::Udp,
        "icmp" | "ipv6-icmp" | "icmpv6" | "1" | "58" => Proto::Icmp,
        "sctp" | "132" => Proto::Sctp,
        n => Proto::Other(n.parse().ok()?),
    })
}
