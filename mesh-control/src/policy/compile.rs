//! Compiling a [`Policy`] into each node's [`CompiledPolicy`]; evaluating
//! the policy's tests on the compiled rules; diffs between two compilations.
//!
//! A node's rule set is its *ingress* filter: for each ACL entry, the
//! sources resolved to CIDRs, and the destinations narrowed to what this node
//! serves (its overlay addresses and the approved site routes it advertises).
//! Entries that leave nothing on either side are dropped.
//!
//! Rule ids: `(acl_index << 16) | n`, where `n` numbers the distinct port
//! ranges of that entry, so `id >> 16` maps a counter back to its ACL line.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;

use ipnet::IpNet;
use mesh_policy::{CompiledPolicy, PortRange, Proto, Rule};

use super::model::{Policy, Problem, ProblemKind, Target};

/// What the compiler needs to know about one node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InventoryNode {
    /// Node id.
    pub id: u64,
    /// Node name.
    pub name: String,
    /// Overlay addresses (IPv4 and IPv6).
    pub addrs: Vec<IpAddr>,
    /// Tags.
    pub tags: Vec<String>,
    /// Owner (may be empty).
    pub user: String,
    /// Approved site routes this node advertises.
    pub routes: Vec<IpNet>,
}

impl InventoryNode {
    fn served(&self) -> Vec<IpNet> {
        self.addrs.iter().map(|a| IpNet::from(*a)).chain(self.routes.iter().copied()).collect()
    }
}

/// The approved nodes the policy is compiled against.
pub type Inventory = [InventoryNode];

/// Whether `node` is one of `target`'s principals (tags, users, groups).
fn node_is(policy: &Policy, node: &InventoryNode, target: &Target) -> bool {
    match target {
        Target::Any => true,
        Target::Tag(t) => node.tags.iter().any(|x| x == t),
        Target::User(u) => !node.user.is_empty() && node.user == *u,
        Target::Group(g) => {
            policy.groups.get(g).is_some_and(|users| users.iter().any(|u| *u == node.user && !u.is_empty()))
        }
        Target::Host(_) | Target::Cidr(_) => false,
    }
}

/// The inventory with what ACL lookups need precomputed: each node's
/// served CIDRs and the members of each tag and user. Resolving a principal
/// then costs its members, not the whole inventory, so compiling N nodes
/// against an ACL per site stays near-linear instead of N times the ACLs.
struct Index<'a> {
    policy: &'a Policy,
    inv: &'a Inventory,
    served: Vec<Vec<IpNet>>,
    by_tag: HashMap<&'a str, Vec<usize>>,
    by_user: HashMap<&'a str, Vec<usize>>,
    /// Nodes that serve site routes (their served CIDRs go beyond their own
    /// addresses, so any source may overlap them).
    routers: Vec<usize>,
}

impl<'a> Index<'a> {
    fn new(policy: &'a Policy, inv: &'a Inventory) -> Self {
        let mut by_tag: HashMap<&str, Vec<usize>> = HashMap::new();
        let mut by_user: HashMap<&str, Vec<usize>> = HashMap::new();
        for (i, n) in inv.iter().enumerate() {
            for t in &n.tags {
                let v = by_tag.entry(t.as_str()).or_default();
                // A node listing a tag twice is still one member.
                if v.last() != Some(&i) {
                    v.push(i);
                }
            }
            if !n.user.is_empty() {
                by_user.entry(n.user.as_str()).or_default().push(i);
            }
        }
        Self {
            policy,
            inv,
            served: inv.iter().map(InventoryNode::served).collect(),
            by_tag,
            by_user,
            routers: inv.iter().enumerate().filter(|(_, n)| !n.routes.is_empty()).map(|(i, _)| i).collect(),
        }
    }

    /// The nodes that are `target`'s principals (as [`node_is`] decides), in
    /// inventory order.
    fn members(&self, target: &Target) -> Vec<usize> {
        match target {
            Target::Any => (0..self.inv.len()).collect(),
            Target::Tag(t) => self.by_tag.get(t.as_str()).cloned().unwrap_or_default(),
            Target::User(u) => self.by_user.get(u.as_str()).cloned().unwrap_or_default(),
            Target::Group(g) => {
                let users = self.policy.groups.get(g).into_iter().flatten();
                let set: BTreeSet<usize> =
                    users.filter_map(|u| self.by_user.get(u.as_str())).flatten().copied().collect();
                set.into_iter().collect()
            }
            Target::Host(_) | Target::Cidr(_) => Vec::new(),
        }
    }

    /// The CIDRs a target stands for.
    fn resolve(&self, target: &Target) -> Vec<IpNet> {
        match target {
            Target::Any => vec!["0.0.0.0/0".parse().unwrap(), "::/0".parse().unwrap()],
            Target::Host(h) => self.policy.hosts.get(h).copied().into_iter().collect(),
            Target::Cidr(c) => vec![*c],
            _ => self.members(target).into_iter().flat_map(|i| self.addrs(i)).collect(),
        }
    }

    fn addrs(&self, i: usize) -> impl Iterator<Item = IpNet> + '_ {
        self.inv[i].addrs.iter().map(|a| IpNet::from(*a))
    }

    /// The nodes a target covers as a destination, with the part of each
    /// node's served CIDRs it covers. Principal targets are found by
    /// membership.
    fn dst_hits(&self, target: &Target) -> Vec<(usize, Vec<IpNet>)> {
        match target {
            Target::Any => {
                self.served.iter().enumerate().filter(|(_, s)| !s.is_empty()).map(|(i, s)| (i, s.clone())).collect()
            }
            Target::Tag(_) | Target::User(_) | Target::Group(_) => {
                self.members(target).into_iter().map(|i| (i, self.addrs(i).collect::<Vec<_>>())).collect()
            }
            Target::Host(_) | Target::Cidr(_) => {
                let nets = self.resolve(target);
                self.served
                    .iter()
                    .enumerate()
                    .filter_map(|(i, served)| {
                        let hit: Vec<IpNet> =
                            served.iter().flat_map(|s| nets.iter().filter_map(|c| intersect(*c, *s))).collect();
                        (!hit.is_empty()).then_some((i, hit))
                    })
                    .collect()
            }
        }
    }

    /// The nodes a source target covers: those with an overlay address in
    /// it, and the gateways of site routes that overlap it (site-to-site
    /// traffic from a LAN host enters the overlay at its gateway, so that
    /// gateway needs the destination as a peer).
    fn src_nodes(&self, target: &Target) -> Vec<usize> {
        let nets = match target {
            Target::Host(_) | Target::Cidr(_) => self.resolve(target),
            _ => return self.members(target),
        };
        self.inv
            .iter()
            .enumerate()
            .filter(|(_, n)| {
                n.addrs.iter().any(|a| nets.iter().any(|c| c.contains(a)))
                    || n.routes.iter().any(|r| nets.iter().any(|c| intersect(*c, *r).is_some()))
            })
            .map(|(i, _)| i)
            .collect()
    }

    /// The nodes whose served CIDRs may overlap the sources of `targets`:
    /// for principals, their members and the site routers (a node serving
    /// only its own addresses overlaps a member's address only if it is that
    /// member); otherwise every node.
    fn may_serve_sources(&self, targets: &[Target]) -> Vec<usize> {
        if targets.iter().all(|t| matches!(t, Target::Tag(_) | Target::User(_) | Target::Group(_))) {
            let set: BTreeSet<usize> =
                targets.iter().flat_map(|t| self.members(t)).chain(self.routers.iter().copied()).collect();
            set.into_iter().collect()
        } else {
            (0..self.inv.len()).collect()
        }
    }
}

/// The part of `a` and `b` that overlaps, if any (CIDRs nest or are disjoint).
fn intersect(a: IpNet, b: IpNet) -> Option<IpNet> {
    if a.contains(&b) {
        Some(b)
    } else if b.contains(&a) {
        Some(a)
    } else {
        None
    }
}

/// Per ACL entry, which nodes (indexes into `inv`) it lets talk to which:
/// `(sources, destinations)`. Peers are derived from this: two nodes need
/// each other as WireGuard peers only if some entry connects them.
#[must_use]
pub fn connectivity(policy: &Policy, inv: &Inventory) -> Vec<(Vec<usize>, Vec<usize>)> {
    let index = Index::new(policy, inv);
    policy
        .acls
        .iter()
        .map(|acl| {
            let src: BTreeSet<usize> = acl.src.iter().flat_map(|t| index.src_nodes(t)).collect();
            let dst: BTreeSet<usize> =
                acl.dst.iter().flat_map(|d| index.dst_hits(&d.target).into_iter().map(|(i, _)| i)).collect();
            (src.into_iter().collect(), dst.into_iter().collect())
        })
        .collect()
}

/// Compiles `policy` for every node of `inv`, tagging the results with
/// `generation`.
#[must_use]
pub fn compile(policy: &Policy, inv: &Inventory, generation: u64) -> BTreeMap<u64, CompiledPolicy> {
    compile_indexed(&Index::new(policy, inv), generation)
}

fn compile_indexed(index: &Index<'_>, generation: u64) -> BTreeMap<u64, CompiledPolicy> {
    let (policy, inv) = (index.policy, index.inv);
    // node index -> acl index -> port range -> destination CIDRs
    type PerNode = BTreeMap<usize, BTreeMap<PortRange, BTreeSet<IpNet>>>;
    let mut per_node: Vec<PerNode> = vec![BTreeMap::new(); inv.len()];
    let mut sources: Vec<Vec<IpNet>> = Vec::with_capacity(policy.acls.len());
    for (i, acl) in policy.acls.iter().enumerate() {
        let set: BTreeSet<IpNet> = acl.src.iter().flat_map(|t| index.resolve(t)).collect();
        sources.push(set.into_iter().collect());
        if sources[i].is_empty() {
            continue;
        }
        for d in &acl.dst {
            for (n, hit) in index.dst_hits(&d.target) {
                let by_ports = per_node[n].entry(i).or_default();
                for p in &d.ports {
                    by_ports.entry(*p).or_default().extend(hit.iter().copied());
                }
            }
        }
    }
    inv.iter()
        .zip(per_node)
        .map(|(node, acls)| {
            let mut rules = Vec::new();
            for (i, by_ports) in acls {
                for (n, (ports, dst)) in by_ports.into_iter().enumerate() {
                    let id = (u32::try_from(i).unwrap_or(u32::MAX >> 16) << 16) | u32::try_from(n).unwrap_or(0xffff);
                    let proto = policy.acls[i].proto;
                    rules.push(Rule { id, src: sources[i].clone(), dst: dst.into_iter().collect(), proto, ports });
                }
            }
            (node.id, CompiledPolicy { generation, rules })
        })
        .collect()
}

/// Bit set in the low 16 bits of the id of a rule [`compile_for_dataplane`]
/// adds for traffic a node sends (`id >> 16` is still the ACL line).
pub const EGRESS_RULE_BIT: u32 = 0x8000;

/// Splits a rule of any protocol restricted to some ports into what the
/// policy means (TCP, UDP and SCTP on those ports, and ICMP, as
/// [`accepts`] evaluates it): in the `mesh_policy` contract a
/// [`Proto::Any`] rule ignores its ports. Other IP protocols are left out
/// (stricter than [`accepts`]). The variants' ids carry the protocol in
/// bits 12-13 (`id >> 16` is still the ACL line).
fn split_any_with_ports(rules: Vec<Rule>) -> Vec<Rule> {
    let mut out = Vec::with_capacity(rules.len());
    for r in rules {
        if r.proto != Proto::Any || r.ports == PortRange::ANY {
            out.push(r);
            continue;
        }
        for (variant, proto) in [(0u32, Proto::Tcp), (1, Proto::Udp), (2, Proto::Sctp), (3, Proto::Icmp)] {
            out.push(Rule {
                id: r.id | (variant << 12),
                proto,
                ports: if proto == Proto::Icmp { PortRange::ANY } else { r.ports },
                ..r.clone()
            });
        }
    }
    out
}

/// What an agent installs: [`compile`]'s ingress rules plus, for every ACL
/// entry whose sources overlap what the node serves (its overlay addresses,
/// its site routes), an egress rule from that overlap to the entry's
/// destinations. The agent's eBPF ACL filters both directions of the overlay
/// interface with one rule set, so a gateway must also admit what its own
/// site sends (and, by accepting it, lets the replies back in). The
/// destination gateway still decides on ingress: a packet is checked on both
/// sides against the same policy.
#[must_use]
pub fn compile_for_dataplane(policy: &Policy, inv: &Inventory, generation: u64) -> BTreeMap<u64, CompiledPolicy> {
    let index = Index::new(policy, inv);
    let mut out = compile_indexed(&index, generation);
    for (i, acl) in policy.acls.iter().enumerate() {
        let sources: BTreeSet<IpNet> = acl.src.iter().flat_map(|t| index.resolve(t)).collect();
        if sources.is_empty() {
            continue;
        }
        // Destinations of the entry, by port range.
        let mut by_ports: BTreeMap<PortRange, BTreeSet<IpNet>> = BTreeMap::new();
        for d in &acl.dst {
            let nets: Vec<IpNet> = match &d.target {
                Target::Any | Target::Host(_) | Target::Cidr(_) => index.resolve(&d.target),
                _ => index.dst_hits(&d.target).into_iter().flat_map(|(_, hit)| hit).collect(),
            };
            for p in &d.ports {
                by_ports.entry(*p).or_default().extend(nets.iter().copied());
            }
        }
        for n in index.may_serve_sources(&acl.src) {
            let served = &index.served[n];
            let src: BTreeSet<IpNet> =
                sources.iter().flat_map(|c| served.iter().filter_map(|s| intersect(*c, *s))).collect();
            if src.is_empty() {
                continue;
            }
            let Some(compiled) = out.get_mut(&inv[n].id) else { continue };
            for (k, (ports, dst)) in by_ports.iter().enumerate() {
                if dst.is_empty() {
                    continue;
                }
                let id = (u32::try_from(i).unwrap_or(u32::MAX >> 16) << 16)
                    | EGRESS_RULE_BIT
                    | (u32::try_from(k).unwrap_or(0x7fff) & 0x7fff);
                compiled.rules.push(Rule {
                    id,
                    src: src.iter().copied().collect(),
                    dst: dst.iter().copied().collect(),
                    proto: acl.proto,
                    ports: *ports,
                });
            }
        }
    }
    for compiled in out.values_mut() {
        compiled.rules = split_any_with_ports(std::mem::take(&mut compiled.rules));
    }
    out
}

/// Whether `policy` accepts a packet (the `mesh_policy` semantics: default
/// deny, any matching rule accepts; ports only for TCP/UDP/SCTP).
#[must_use]
pub fn accepts(policy: &CompiledPolicy, src: IpAddr, dst: IpAddr, ip_proto: u8, port: u16) -> bool {
    policy.rules.iter().any(|r| {
        r.src.iter().any(|n| n.contains(&src))
            && r.dst.iter().any(|n| n.contains(&dst))
            && r.proto.matches(ip_proto)
            && (!matches!(ip_proto, 6 | 17 | 132) || r.ports.contains(port))
    })
}

/// Address block for stand-in nodes in test evaluation (never allocated to
/// real nodes: the allocator stops below it).
const PROBE_BASE: u32 = u32::from_be_bytes([100, 127, 255, 0]);

/// Runs the policy's `tests` against the compiled rules. Tags and users
/// that no node of `inv` carries get a stand-in node, so tests mean the same
/// before and after nodes enroll. Returns the number of checks that passed,
/// or one problem per failing check.
pub fn run_tests(policy: &Policy, inv: &Inventory) -> Result<u32, Vec<Problem>> {
    let mut inv: Vec<InventoryNode> = inv.to_vec();
    let mut principals: BTreeSet<Target> = BTreeSet::new();
    for t in &policy.tests {
        principals.insert(t.src.clone());
        principals.extend(t.accept.iter().chain(&t.deny).map(|(x, _, _)| x.clone()));
    }
    let mut next = PROBE_BASE;
    for p in &principals {
        let (tags, user) = match p {
            Target::Tag(t) => (vec![t.clone()], String::new()),
            Target::User(u) => (Vec::new(), u.clone()),
            Target::Group(g) => match policy.groups.get(g).and_then(|u| u.first()) {
                Some(u) => (Vec::new(), u.clone()),
                None => continue,
            },
            _ => continue,
        };
        if inv.iter().any(|n| node_is(policy, n, p)) {
            continue;
        }
        inv.push(InventoryNode {
            id: u64::MAX - u64::from(next - PROBE_BASE),
            name: format!("test-standin-{}", next - PROBE_BASE),
            addrs: vec![IpAddr::from(next.to_be_bytes())],
            tags,
            user,
            routes: Vec::new(),
        });
        next += 1;
    }
    // Hosts entries and address literals named by tests are served by a
    // stand-in gateway when no enrolled node serves them, so that
    // "tag:app -> nyc-lan:5432" or "10.20.10.7 -> 10.30.0.5:5432" is checked
    // against the rules alone, before (and whichever) gateways enroll.
    for p in &principals {
        let net = match p {
            Target::Host(h) => policy.hosts.get(h).copied(),
            Target::Cidr(c) => Some(*c),
            _ => None,
        };
        if let Some(net) = net
            && !inv.iter().any(|n| n.served().iter().any(|s| s.contains(&net)))
        {
            inv.push(InventoryNode {
                id: u64::MAX - u64::from(next - PROBE_BASE),
                name: format!("test-standin-{}", show(p)),
                addrs: vec![IpAddr::from(next.to_be_bytes())],
                tags: Vec::new(),
                user: String::new(),
                routes: vec![net],
            });
            next += 1;
        }
    }
    let compiled = compile(policy, &inv, 0);
    let mut passed = 0;
    let mut problems = Vec::new();
    for t in &policy.tests {
        let srcs = sample_addrs(policy, &inv, &t.src);
        for (expect, list) in [(true, &t.accept), (false, &t.deny)] {
            for (dst, port, text) in list {
                let dsts = sample_addrs(policy, &inv, dst);
                let mut verdicts = Vec::new();
                for (_, s) in &srcs {
                    for (node, d) in &dsts {
                        let ok = compiled.get(node).is_some_and(|c| accepts(c, *s, *d, 6, *port));
                        verdicts.push(ok);
                    }
                }
                let holds = !verdicts.is_empty() && verdicts.iter().all(|v| *v == expect);
                if holds {
                    passed += 1;
                } else {
                    let what = if expect { "accept" } else { "deny" };
                    let why = if verdicts.is_empty() { "no address to test with" } else { "not what the acls do" };
                    problems.push(Problem {
                        line: t.line,
                        kind: ProblemKind::TestFailed(format!("{} -> {text}: expected {what} ({why})", show(&t.src))),
                    });
                }
            }
        }
    }
    if problems.is_empty() { Ok(passed) } else { Err(problems) }
}

/// (serving node, address) pairs that stand for a test principal.
fn sample_addrs(policy: &Policy, inv: &Inventory, target: &Target) -> Vec<(u64, IpAddr)> {
    let nets = match target {
        Target::Host(h) => policy.hosts.get(h).copied().into_iter().collect(),
        Target::Cidr(c) => vec![*c],
        _ => {
            return inv
                .iter()
                .filter(|n| node_is(policy, n, target))
                .flat_map(|n| n.addrs.iter().map(move |a| (n.id, *a)))
                .collect();
        }
    };
    nets.iter()
        .flat_map(|net| {
            let addr = if net.prefix_len() == net.max_prefix_len() { net.addr() } else { first_host(*net) };
            inv.iter().filter(move |n| n.served().iter().any(|s| s.contains(&addr))).map(move |n| (n.id, addr))
        })
        .collect()
}

fn first_host(net: IpNet) -> IpAddr {
    net.hosts().next().unwrap_or(net.addr())
}

fn show(t: &Target) -> String {
    match t {
        Target::Any => "*".into(),
        Target::Group(s) | Target::Tag(s) | Target::User(s) | Target::Host(s) => s.clone(),
        // As written: an address, not its /32.
        Target::Cidr(c) if c.prefix_len() == c.max_prefix_len() => c.addr().to_string(),
        Target::Cidr(c) => c.to_string(),
    }
}

/// One rule as a line of text, for diffs and `meshctl`.
#[must_use]
pub fn rule_text(r: &Rule) -> String {
    let list = |v: &[IpNet]| v.iter().map(ToString::to_string).collect::<Vec<_>>().join(",");
    let proto = match r.proto {
        Proto::Any => "any".to_owned(),
        Proto::Tcp => "tcp".into(),
        Proto::Udp => "udp".into(),
        Proto::Icmp => "icmp".into(),
        Proto::Sctp => "sctp".into(),
        Proto::Other(n) => format!("proto{n}"),
    };
    let ports = if r.ports == PortRange::ANY {
        "*".to_owned()
    } else if r.ports.first == r.ports.last {
        r.ports.first.to_string()
    } else {
        format!("{}-{}", r.ports.first, r.ports.last)
    };
    format!("#{}.{} {} -> {} {proto}:{ports}", r.id >> 16, r.id & 0xffff, list(&r.src), list(&r.dst))
}

/// Per node, the rules `new` adds and removes relative to `old` (nodes with
/// no change are left out).
#[must_use]
pub fn diff(
    old: &BTreeMap<u64, CompiledPolicy>,
    new: &BTreeMap<u64, CompiledPolicy>,
) -> BTreeMap<u64, (Vec<String>, Vec<String>)> {
    let ids: BTreeSet<u64> = old.keys().chain(new.keys()).copied().collect();
    let texts = |m: &BTreeMap<u64, CompiledPolicy>, id| -> BTreeSet<String> {
        m.get(&id).map(|p| p.rules.iter().map(rule_text).collect()).unwrap_or_default()
    };
    ids.into_iter()
        .filter_map(|id| {
            let (a, b) = (texts(old, id), texts(new, id));
            let added: Vec<String> = b.difference(&a).cloned().collect();
            let removed: Vec<String> = a.difference(&b).cloned().collect();
            (!added.is_empty() || !removed.is_empty()).then_some((id, (added, removed)))
        })
        .collect()
}

/// Whether an `autoApprovers` entry lets `node` advertise `prefix`.
#[must_use]
pub fn auto_approved(policy: &Policy, node: &InventoryNode, prefix: IpNet) -> bool {
    policy.auto_approvers.iter().any(|(net, who)| net.contains(&prefix) && who.iter().any(|t| node_is(policy, node, t)))
}
