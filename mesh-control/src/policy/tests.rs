//! Policy tests: parsing, every validation error, compilation, tests, diff.

use std::net::IpAddr;

use ipnet::IpNet;
use mesh_policy::{PortRange, Proto, Rule};

use super::*;

fn net(s: &str) -> IpNet {
    s.parse().unwrap()
}

fn node(id: u64, v4: &str, tags: &[&str], user: &str, routes: &[&str]) -> InventoryNode {
    InventoryNode {
        id,
        name: format!("n{id}"),
        addrs: vec![v4.parse().unwrap(), format!("fd7a:6d65:7368::{id}").parse().unwrap()],
        tags: tags.iter().map(|t| (*t).to_owned()).collect(),
        user: user.to_owned(),
        routes: routes.iter().map(|r| net(r)).collect(),
    }
}

/// The seed article's example, with `tag:db:*:5432` written as the intended
/// `tag:db:5432`, and with the `groups` it uses declared (it names
/// `group:netops` etc. without defining them, which a strict validator
/// rightly rejects).
const SEED: &str = r#"{
  "groups": {
    "group:netops": ["ops@example.com"],
    "group:platform": ["platform@example.com"],
    "group:dba": ["dba@example.com"],
  },
  "tagOwners": {
    "tag:gateway": ["group:netops"],
    "tag:app": ["group:platform"],
    "tag:db": ["group:dba"]
  },
  "acls": [
    { "action": "accept", "src": ["tag:app"], "dst": ["tag:db:5432"] },
    { "action": "accept", "src": ["group:netops"], "dst": ["*:*"] }
  ],
  "ssh": [
    { "action": "check", "src": ["group:netops"], "dst": ["tag:gateway"], "users": ["root"] }
  ]
}"#;

fn seed_inventory() -> Vec<InventoryNode> {
    vec![
        node(1, "100.64.0.1", &["tag:app"], "", &[]),
        node(2, "100.64.0.2", &["tag:db"], "", &[]),
        node(3, "100.64.0.3", &["tag:gateway"], "", &["198.18.10.0/24"]),
        node(4, "100.64.0.4", &[], "ops@example.com", &[]),
    ]
}

#[test]
fn seed_example_compiles_to_what_it_means() {
    let policy = Policy::parse(SEED).unwrap();
    let inv = seed_inventory();
    let out = compile::compile(&policy, &inv, 7);
    let ops: Vec<IpNet> = vec![net("100.64.0.4/32"), net("fd7a:6d65:7368::4/128")];
    let app: Vec<IpNet> = vec![net("100.64.0.1/32"), net("fd7a:6d65:7368::1/128")];
    // The db node: app on 5432, netops everywhere.
    let db = &out[&2];
    assert_eq!(db.generation, 7);
    assert_eq!(
        db.rules,
        vec![
            Rule {
                id: 0,
                src: app.clone(),
                dst: vec![net("100.64.0.2/32"), net("fd7a:6d65:7368::2/128")],
                proto: Proto::Any,
                ports: PortRange::single(5432),
            },
            Rule {
                id: 1 << 16,
                src: ops.clone(),
                dst: vec![net("100.64.0.2/32"), net("fd7a:6d65:7368::2/128")],
                proto: Proto::Any,
                ports: PortRange::ANY,
            },
        ]
    );
    // The gateway: only netops, to itself and its approved site route.
    let gw = &out[&3];
    assert_eq!(gw.rules.len(), 1);
    assert_eq!(gw.rules[0].dst, vec![net("100.64.0.3/32"), net("198.18.10.0/24"), net("fd7a:6d65:7368::3/128")]);
    for c in out.values() {
        c.validate().unwrap();
    }
    // Verdicts on the compiled rules.
    let ip = |s: &str| s.parse::<IpAddr>().unwrap();
    assert!(accepts(db, ip("100.64.0.1"), ip("100.64.0.2"), 6, 5432));
    assert!(!accepts(db, ip("100.64.0.1"), ip("100.64.0.2"), 6, 22));
    assert!(!accepts(db, ip("100.64.0.3"), ip("100.64.0.2"), 6, 5432));
    assert!(accepts(db, ip("100.64.0.4"), ip("100.64.0.2"), 17, 53));
    assert!(accepts(gw, ip("100.64.0.4"), ip("198.18.10.9"), 6, 443));
    assert!(!accepts(&out[&1], ip("100.64.0.2"), ip("100.64.0.1"), 6, 5432));
}

#[test]
fn hosts_cidrs_proto_and_port_lists() {
    let text = r#"
    // Site LANs are named hosts.
    {
      "tagOwners": {"tag:gw": [], "tag:app": []},
      "hosts": {"nyc-lan": "198.18.10.0/24", "fsn-db": "198.18.20.5"},
      "acls": [
        {"action": "accept", "src": ["tag:app", "192.0.2.0/24"], "proto": "udp",
         "dst": ["nyc-lan:53,5000-5100", "fsn-db:5432"]},
        {"action": "accept", "src": ["*"], "proto": "icmp", "dst": ["tag:gw:*"]},
      ],
    }"#;
    let policy = Policy::parse(text).unwrap();
    let inv = vec![
        node(1, "100.64.0.1", &["tag:app"], "", &[]),
        node(2, "100.64.0.2", &["tag:gw"], "", &["198.18.10.0/24"]),
        node(3, "100.64.0.3", &["tag:gw"], "", &["198.18.20.0/24"]),
    ];
    let out = compile::compile(&policy, &inv, 1);
    let nyc = &out[&2];
    let texts: Vec<String> = nyc.rules.iter().map(rule_text).collect();
    assert_eq!(
        texts,
        vec![
            "#0.0 100.64.0.1/32,192.0.2.0/24,fd7a:6d65:7368::1/128 -> 198.18.10.0/24 udp:53",
            "#0.1 100.64.0.1/32,192.0.2.0/24,fd7a:6d65:7368::1/128 -> 198.18.10.0/24 udp:5000-5100",
            "#1.0 0.0.0.0/0,::/0 -> 100.64.0.2/32,fd7a:6d65:7368::2/128 icmp:*",
        ]
    );
    // fsn gateway gets only the single host out of its /24.
    assert!(out[&3].rules.iter().any(|r| r.dst == vec![net("198.18.20.5/32")] && r.ports == PortRange::single(5432)));
    // The app node serves nothing any rule targets.
    assert!(out[&1].rules.is_empty());
}

fn problems(text: &str) -> Vec<Problem> {
    Policy::parse(text).unwrap_err()
}

#[test]
fn every_validation_error_names_line_and_problem() {
    let cases: Vec<(&str, u32, ProblemKind)> = vec![
        (
            "{\n\"acls\": [\n{\"action\": \"accept\",, }]}",
            3,
            ProblemKind::Syntax("expected a quoted key or '}' in object".into()),
        ),
        ("{\n\"acl\": []}", 2, ProblemKind::UnknownField("acl".into())),
        (
            "{\"acls\":\n{}}",
            2,
            ProblemKind::WrongType { field: "acls".into(), expected: "an array", found: "an object" },
        ),
        ("{\"acls\": [\n{\"action\": \"accept\", \"dst\": [\"*:*\"]}]}", 2, ProblemKind::MissingField("src")),
        (
            "{\"acls\": [{\"action\": \"accept\",\n \"src\": [\"group:nope\"], \"dst\": [\"*:*\"]}]}",
            2,
            ProblemKind::UnknownGroup("group:nope".into()),
        ),
        (
            "{\"acls\": [{\"action\": \"accept\", \"src\": [\"*\"],\n\n \"dst\": [\"tag:db:5432\"]}]}",
            3,
            ProblemKind::UnknownTag("tag:db".into()),
        ),
        (
            "{\"acls\": [{\"action\": \"accept\", \"src\": [\"*\"],\n \"dst\": [\"dbhost:5432\"]}]}",
            2,
            ProblemKind::UnknownHost("dbhost".into()),
        ),
        (
            "{\"groups\": {\n\"netops\": []}}",
            2,
            ProblemKind::BadName { name: "netops".into(), why: "must be group:<name>" },
        ),
        ("{\"hosts\": {\"a\":\n \"10.0.0.0/33\"}}", 2, ProblemKind::BadCidr("10.0.0.0/33".into())),
        (
            "{\"acls\": [{\"action\": \"accept\", \"src\": [\"*\"],\n \"dst\": [\"*\"]}]}",
            2,
            ProblemKind::BadDestination("*".into(), "needs :ports (e.g. tag:db:5432 or host:*)"),
        ),
        (
            "{\"acls\": [{\"action\": \"accept\", \"src\": [\"*\"],\n \"dst\": [\"*:90-80\"]}]}",
            2,
            ProblemKind::BadDestination("*:90-80".into(), "ports must be *, N, N-M or a comma list"),
        ),
        (
            "{\"acls\": [{\"action\": \"accept\", \"src\": [\"*\"], \"dst\": [\"*:*\"],\n \"proto\": \"tcpx\"}]}",
            2,
            ProblemKind::BadProto("tcpx".into()),
        ),
        (
            "{\"acls\": [{\n\"action\": \"deny\", \"src\": [\"*\"], \"dst\": [\"*:*\"]}]}",
            2,
            ProblemKind::BadAction("deny".into()),
        ),
        ("{\"tagOwners\": {\n\"tag:a\": [\"group:ghost\"]}}", 2, ProblemKind::UnknownGroup("group:ghost".into())),
        (
            "{\"autoApprovers\": {\"routes\": {\n\"198.18.10.0/24\": [\"tag:nope\"]}}}",
            2,
            ProblemKind::UnknownTag("tag:nope".into()),
        ),
    ];
    for (text, line, kind) in cases {
        let got = problems(text);
        assert_eq!(got[0], Problem { line, kind: kind.clone() }, "for {text:?}: {got:?}");
        // The message names the line and the problem.
        assert!(got[0].to_string().starts_with(&format!("line {line}: ")), "{}", got[0]);
    }
}

#[test]
fn tests_pass_fail_and_name_their_line() {
    let base = r#"{
  "tagOwners": {"tag:app": [], "tag:db": []},
  "hosts": {"nyc-lan": "198.18.10.0/24"},
  "acls": [{"action": "accept", "src": ["tag:app"], "dst": ["tag:db:5432", "nyc-lan:443"]}],
  "tests": [
    {"src": "tag:app", "accept": ["tag:db:5432", "nyc-lan:443"], "deny": ["tag:db:22"]},
    TEST2
  ],
}"#;
    let ok = base.replace("TEST2", r#"{"src": "tag:db", "deny": ["tag:app:5432"]}"#);
    // No nodes at all: stand-ins make the tests meaningful.
    let (_, passed) = check(&ok, &[]).unwrap();
    assert_eq!(passed, 4);
    // And with real nodes.
    let inv = vec![node(1, "100.64.0.1", &["tag:app"], "", &[]), node(2, "100.64.0.2", &["tag:db"], "", &[])];
    assert_eq!(check(&ok, &inv).unwrap().1, 4);
    let bad = base.replace("TEST2", r#"{"src": "tag:db", "accept": ["tag:app:5432"]}"#);
    let errs = check(&bad, &inv).unwrap_err();
    assert_eq!(errs.len(), 1);
    assert_eq!(errs[0].line, 7);
    assert!(
        matches!(&errs[0].kind, ProblemKind::TestFailed(m) if m.contains("tag:db -> tag:app:5432: expected accept"))
    );
}

#[test]
fn diff_shows_added_and_removed_per_node() {
    let inv = seed_inventory();
    let old = compile::compile(&Policy::parse(SEED).unwrap(), &inv, 1);
    let newer = SEED.replace("tag:db:5432", "tag:db:5432,6432");
    let new = compile::compile(&Policy::parse(&newer).unwrap(), &inv, 2);
    let d = diff(&old, &new);
    assert_eq!(d.keys().copied().collect::<Vec<_>>(), vec![2], "only the db node changes");
    let (added, removed) = &d[&2];
    assert_eq!(added.len(), 1);
    assert!(added[0].starts_with("#0.1 ") && added[0].ends_with("any:6432"), "{added:?}");
    assert!(removed.is_empty());
    assert!(diff(&old, &old).is_empty());
}

#[test]
fn auto_approvers_match_tags_and_groups() {
    let text = r#"{"groups": {"group:ops": ["ops@example.com"]}, "tagOwners": {"tag:gw": []},
      "autoApprovers": {"routes": {"198.18.0.0/15": ["tag:gw"], "198.51.100.0/24": ["group:ops"]}}}"#;
    let p = Policy::parse(text).unwrap();
    let gw = node(1, "100.64.0.1", &["tag:gw"], "", &[]);
    let ops = node(2, "100.64.0.2", &[], "ops@example.com", &[]);
    assert!(auto_approved(&p, &gw, net("198.18.10.0/24")));
    assert!(!auto_approved(&p, &gw, net("198.51.100.0/24")));
    assert!(auto_approved(&p, &ops, net("198.51.100.0/25")));
    assert!(!auto_approved(&p, &ops, net("198.18.10.0/24")));
}

#[test]
fn default_policy_is_valid_and_denies_everything() {
    let p = Policy::parse(DEFAULT_POLICY).unwrap();
    let out = compile::compile(&p, &seed_inventory(), 1);
    assert!(out.values().all(|c| c.rules.is_empty()));
}

/// Site-to-site: gateways serving the source CIDR become peers of the
/// destination's, get egress rules, and an any-protocol entry with ports is
/// split into what it means for the dataplane.
#[test]
fn dataplane_rules_for_site_to_site() {
    let p = Policy::parse(
        r#"{
  "hosts": {"app-nyc": "198.18.10.10/32", "db-fsn": "198.18.20.20/32"},
  "acls": [{"action": "accept", "src": ["app-nyc"], "dst": ["db-fsn:5432"]}],
}"#,
    )
    .unwrap();
    let inv =
        vec![node(1, "100.64.0.1", &[], "", &["198.18.10.0/24"]), node(2, "100.64.0.2", &[], "", &["198.18.20.0/24"])];
    let pairs = compile::connectivity(&p, &inv);
    assert_eq!(pairs, vec![(vec![0], vec![1])], "the nyc gateway reaches the fsn gateway");
    let out = compile::compile_for_dataplane(&p, &inv, 1);
    let nyc = &out[&1].rules;
    assert!(nyc.iter().all(|r| r.id & compile::EGRESS_RULE_BIT != 0), "nyc only sends: {nyc:?}");
    assert_eq!(nyc[0].src, vec![net("198.18.10.10/32")]);
    assert_eq!(nyc[0].dst, vec![net("198.18.20.20/32")]);
    let fsn = &out[&2].rules;
    let protos: Vec<Proto> = fsn.iter().map(|r| r.proto).collect();
    assert_eq!(protos, [Proto::Tcp, Proto::Udp, Proto::Sctp, Proto::Icmp]);
    assert_eq!(fsn[0].ports, PortRange::single(5432));
    for c in out.values() {
        c.validate().unwrap();
    }
}

/// The policy fuzz target's seeds are real, valid policies.
#[test]
fn fuzz_seeds_parse() {
    for (name, text) in [
        ("default", include_str!("../../../fuzz/corpus/policy/default.hujson")),
        ("demo", include_str!("../../../fuzz/corpus/policy/demo.hujson")),
        ("tests-seed", include_str!("../../../fuzz/corpus/policy/tests-seed.hujson")),
        ("with-tests", include_str!("../../../fuzz/corpus/policy/with-tests.hujson")),
    ] {
        Policy::parse(text).unwrap_or_else(|e| panic!("{name}: {e:?}"));
    }
    assert_eq!(include_str!("../../../fuzz/corpus/policy/default.hujson"), DEFAULT_POLICY);
}

/// The issue's case: a test whose source is an address literal inside a
/// `hosts` CIDR holds against the rules alone, with no gateway enrolled for
/// either site, and still fails when the rules say otherwise.
#[test]
fn address_and_hosts_tests_need_no_enrolled_node() {
    let text = |dst: &str| {
        format!(
            r#"{{
  "hosts": {{"nyc-lan": "10.20.10.0/24", "fsn-db": "10.30.0.5/32"}},
  "acls": [{{"action": "accept", "src": ["nyc-lan"], "dst": ["fsn-db:5432"], "proto": "tcp"}}],
  "tests": [
    {{"src": "10.20.10.7", "accept": ["{dst}:5432"], "deny": ["{dst}:22"]}},
    {{"src": "nyc-lan", "accept": ["10.30.0.5:5432"]}},
    {{"src": "10.99.0.1", "deny": ["fsn-db:5432"]}},
  ],
}}"#
        )
    };
    for dst in ["fsn-db", "10.30.0.5"] {
        assert_eq!(check(&text(dst), &[]).unwrap().1, 4, "dst {dst}");
        // The same with an unrelated node enrolled.
        let inv = vec![node(1, "100.64.0.1", &[], "a@example.com", &[])];
        assert_eq!(check(&text(dst), &inv).unwrap().1, 4, "dst {dst}");
    }
    let wrong = text("fsn-db").replace(r#""deny": ["fsn-db:22"]"#, r#""deny": ["fsn-db:5432"]"#);
    let errs = check(&wrong, &[]).unwrap_err();
    assert_eq!(errs.len(), 1, "{errs:?}");
    assert!(
        errs[0].to_string().contains("10.20.10.7 -> fsn-db:5432: expected deny (not what the acls do)"),
        "{errs:?}"
    );
}

#[test]
fn unsupported_tailscale_sections_get_one_clear_message_each() {
    // Accepted with a warning: they grant nothing.
    let p = Policy::parse(
        r#"{"acls": [], "ssh": [{"action": "check", "src": ["*"], "dst": ["*"], "users": ["root"]}],
            "nodeAttrs": [{"target": ["*"], "attr": ["funnel"]}]}"#,
    )
    .unwrap();
    let warnings: Vec<String> = p.warnings.iter().map(ToString::to_string).collect();
    assert_eq!(warnings.len(), 2, "{warnings:?}");
    assert!(warnings[0].contains("not supported by this mesh: \"ssh\"") && warnings[0].contains("see docs"));
    assert!(warnings[1].contains("\"nodeAttrs\""));
    // Refused: ignoring them would change what the policy allows.
    for (text, what) in [
        (r#"{"grants": [{"src": ["*"], "dst": ["*"], "ip": ["*"]}]}"#, "\"grants\""),
        (r#"{"postures": {"posture:x": []}}"#, "\"postures\""),
        (r#"{"acls": [{"action": "accept", "src": ["autogroup:member"], "dst": ["*:*"]}]}"#, "\"autogroup:member\""),
        (r#"{"tagOwners": {"tag:gw": ["autogroup:admin"]}}"#, "\"autogroup:admin\""),
    ] {
        let errs = Policy::parse(text).unwrap_err();
        assert_eq!(errs.len(), 1, "{text}: {errs:?}");
        let msg = errs[0].to_string();
        assert!(msg.contains("not supported by this mesh: ") && msg.contains(what), "{text}: {msg}");
    }
}
