//! Checks of `deploy/monitoring/`: promtool validates the rule files and
//! runs their unit tests; this module proves that every alert is fired by a
//! test and left silent by another, and that the rules and the Grafana
//! dashboard name only series that exist (a metric the agent or control
//! exports, or a series the recording rules record).

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, ensure};

use crate::cmd;

const RULES: [&str; 2] = ["rules/mesh-recording.yml", "rules/mesh-alerts.yml"];
const DASHBOARD: &str = "grafana/mesh-overview.json";

/// Series that Prometheus itself makes.
const BUILTIN: [&str; 2] = ["up", "ALERTS"];

/// Everything under `dir` (`deploy/monitoring/`), failing on the first
/// problem.
pub(crate) fn check(dir: &Path) -> anyhow::Result<()> {
    let root = cmd::workspace_root();
    let rules: Vec<PathBuf> = RULES.iter().map(|r| dir.join(r)).collect();
    cmd::run(Command::new("promtool").args(["check", "rules"]).args(&rules))?;
    cmd::run(Command::new("promtool").args(["check", "config"]).arg(dir.join("prometheus.yml")))?;
    let tests = yml_files(&dir.join("tests"))?;
    ensure!(!tests.is_empty(), "no promtool tests in {}", dir.join("tests").display());
    cmd::run(Command::new("promtool").args(["test", "rules"]).args(&tests).current_dir(dir.join("tests")))?;

    let alerts_text = read(&rules[1])?;
    let mut tested = Coverage::default();
    for t in &tests {
        tested.add(&read(t)?);
    }
    let untested = untested(&alert_names(&alerts_text), &tested);
    ensure!(untested.is_empty(), "alerts without a firing and a non-firing test:\n{}", untested.join("\n"));

    let known = Known::new(&root, &read(&rules[0])?)?;
    for r in &rules {
        known.check(&read(r)?).with_context(|| format!("in {}", r.display()))?;
    }
    let dashboard = read(&dir.join(DASHBOARD))?;
    check_dashboard(&dashboard, &known).with_context(|| format!("in {}", dir.join(DASHBOARD).display()))?;
    eprintln!(
        "xtask: monitoring: {} rule files, {} test files, every alert fired and not fired, dashboard series known",
        rules.len(),
        tests.len()
    );
    Ok(())
}

fn read(path: &Path) -> anyhow::Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))
}

fn yml_files(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "yml" || e == "yaml") {
            out.push(path);
        }
    }
    out.sort();
    Ok(out)
}

/// The value of a `key: value` line, unquoted.
fn value_of<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    let rest = line.trim_start().trim_start_matches("- ").trim_start().strip_prefix(key)?.strip_prefix(':')?;
    Some(rest.trim().trim_matches(|c| c == '"' || c == '\''))
}

/// The alerts of a rule file (`- alert: Name` lines).
fn alert_names(rules: &str) -> BTreeSet<String> {
    rules.lines().filter_map(|l| value_of(l, "alert")).map(str::to_owned).collect()
}

/// Per alert name: whether a test case expects it firing, and not firing.
#[derive(Debug, Default)]
struct Coverage(BTreeMap<String, (bool, bool)>);

impl Coverage {
    /// Reads the `alert_rule_test` cases of a promtool test file: each
    /// `alertname:` is followed by its `exp_alerts:`, either `[]` (not
    /// firing) or a list of alerts (firing). promtool has already parsed the
    /// file, so its shape is known to be right.
    fn add(&mut self, test: &str) {
        let lines: Vec<&str> = test.lines().collect();
        let mut current: Option<String> = None;
        for (i, line) in lines.iter().enumerate() {
            if let Some(name) = value_of(line, "alertname") {
                current = Some(name.to_owned());
            } else if let Some(exp) = value_of(line, "exp_alerts") {
                let Some(name) = current.take() else { continue };
                let entry = self.0.entry(name).or_default();
                if exp == "[]" {
                    entry.1 = true;
                } else if exp.is_empty() && next_is_item(&lines[i + 1..]) {
                    entry.0 = true;
                }
            }
        }
    }
}

/// Whether the next non-blank, non-comment line starts a list item.
fn next_is_item(lines: &[&str]) -> bool {
    lines.iter().map(|l| l.trim()).find(|l| !l.is_empty() && !l.starts_with('#')).is_some_and(|l| l.starts_with("- "))
}

/// Alerts lacking a firing or a non-firing test, with what is missing.
fn untested(alerts: &BTreeSet<String>, tested: &Coverage) -> Vec<String> {
    alerts
        .iter()
        .filter_map(|a| {
            let (fires, silent) = tested.0.get(a).copied().unwrap_or_default();
            let missing = match (fires, silent) {
                (true, true) => return None,
                (false, true) => "a test that fires it",
                (true, false) => "a test with `exp_alerts: []`",
                (false, false) => "any test",
            };
            Some(format!("  {a}: lacks {missing}"))
        })
        .collect()
}

/// The series names the rules and the dashboard may use.
#[derive(Debug)]
struct Known {
    /// Families the agent and control export (from their sources).
    exported: BTreeSet<String>,
    /// Series the recording rules record.
    recorded: BTreeSet<String>,
}

impl Known {
    fn new(root: &Path, recording: &str) -> anyhow::Result<Self> {
        let mut exported = BTreeSet::new();
        for dir in ["mesh-agent/src", "mesh-control/src"] {
            families_in(&root.join(dir), &mut exported)?;
        }
        ensure!(exported.len() > 20, "found only {} metric families in the sources", exported.len());
        let recorded = recording.lines().filter_map(|l| value_of(l, "record")).map(str::to_owned).collect();
        Ok(Self { exported, recorded })
    }

    /// Whether `name` is a series: a recorded one, a builtin one, or an
    /// exported family with the suffixes Prometheus adds.
    fn contains(&self, name: &str) -> bool {
        if self.recorded.contains(name) || BUILTIN.contains(&name) || self.exported.contains(name) {
            return true;
        }
        ["_total", "_bucket", "_sum", "_count"]
            .iter()
            .any(|s| name.strip_suffix(s).is_some_and(|f| self.exported.contains(f)))
    }

    /// Fails on a series name in `text` (PromQL, or a YAML rule file) that
    /// does not exist: a `mesh_...` metric, or a recorded-looking name
    /// (`level:metric:operation`). Comments, quoted strings and YAML keys
    /// (`name:`) are not names.
    fn check(&self, text: &str) -> anyhow::Result<()> {
        let code = strip_strings(&strip_comments(text));
        let unknown: BTreeSet<&str> = identifiers(&code)
            .into_iter()
            .filter(|id| (id.starts_with("mesh_") || id.contains(':')) && !id.starts_with(':') && !id.ends_with(':'))
            .filter(|id| !self.contains(id))
            .collect();
        ensure!(unknown.is_empty(), "unknown series: {unknown:?}");
        Ok(())
    }
}

/// Collects `"mesh_agent_..."` and `"mesh_control_..."` string literals
/// (the families' names) from the `.rs` files under `dir`.
fn families_in(dir: &Path, out: &mut BTreeSet<String>) -> anyhow::Result<()> {
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        if path.is_dir() {
            families_in(&path, out)?;
        } else if path.extension().is_some_and(|e| e == "rs") {
            let text = read(&path)?;
            for (i, _) in text.match_indices("\"mesh_") {
                let name: String =
                    text[i + 1..].chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
                if name.starts_with("mesh_agent_") || name.starts_with("mesh_control_") {
                    out.insert(name);
                }
            }
        }
    }
    Ok(())
}

/// `text` without `#` comments (PromQL's and YAML's).
fn strip_comments(text: &str) -> String {
    text.lines().map(|l| l.split_once('#').map_or(l, |(code, _)| code)).collect::<Vec<_>>().join("\n")
}

/// `text` with the contents of double-quoted strings blanked (label values,
/// regexes, annotation text), so only PromQL names remain.
fn strip_strings(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let (mut quoted, mut escaped) = (false, false);
    for c in text.chars() {
        if quoted {
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == '"' {
                quoted = false;
                out.push(c);
            }
            continue;
        }
        quoted = c == '"';
        out.push(c);
    }
    out
}

/// The PromQL identifiers (`[a-zA-Z_:][a-zA-Z0-9_:]*`) in `text`.
fn identifiers(text: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut start = None;
    for (i, c) in text.char_indices().chain([(text.len(), ' ')]) {
        let word = c.is_ascii_alphanumeric() || c == '_' || c == ':';
        match (start, word) {
            (None, true) if !c.is_ascii_digit() => start = Some(i),
            (Some(s), false) => {
                out.push(&text[s..i]);
                start = None;
            }
            _ => {}
        }
    }
    out
}

/// The dashboard is Grafana JSON with a schema version, its data source is
/// the `DS_PROMETHEUS` variable, and every query names known series.
fn check_dashboard(text: &str, known: &Known) -> anyhow::Result<()> {
    let dash: serde_json::Value = serde_json::from_str(text).context("not JSON")?;
    ensure!(dash["schemaVersion"].as_u64().is_some(), "no schemaVersion");
    ensure!(dash["uid"].is_string() && dash["title"].is_string(), "no uid or title");
    let vars = dash["templating"]["list"].as_array().context("no templating list")?;
    ensure!(
        vars.iter().any(|v| v["name"] == "DS_PROMETHEUS" && v["type"] == "datasource"),
        "no DS_PROMETHEUS data source variable"
    );
    let mut exprs = Vec::new();
    let mut sources = Vec::new();
    walk(&dash, &mut exprs, &mut sources);
    ensure!(exprs.len() >= 10, "only {} queries", exprs.len());
    for s in sources {
        ensure!(s == "${DS_PROMETHEUS}", "a data source is {s:?}, not ${{DS_PROMETHEUS}}");
    }
    for e in exprs {
        known.check(e).with_context(|| format!("query {e:?}"))?;
    }
    Ok(())
}

/// Collects every query (`expr`, and a variable's `definition`) and every
/// data source uid under `v`.
fn walk<'a>(v: &'a serde_json::Value, exprs: &mut Vec<&'a str>, sources: &mut Vec<&'a str>) {
    match v {
        serde_json::Value::Object(map) => {
            for (k, v) in map {
                match (k.as_str(), v) {
                    ("expr" | "definition", serde_json::Value::String(s)) => exprs.push(s),
                    ("datasource", serde_json::Value::Object(d)) => {
                        if let Some(uid) = d.get("uid").and_then(|u| u.as_str()) {
                            sources.push(uid);
                        }
                    }
                    _ => walk(v, exprs, sources),
                }
            }
        }
        serde_json::Value::Array(items) => items.iter().for_each(|v| walk(v, exprs, sources)),
        _ => {}
    }
}

/// A failure with the repository's own files, for the tests.
#[cfg(test)]
fn repo_dir() -> PathBuf {
    cmd::workspace_root().join("deploy/monitoring")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn coverage_reads_firing_and_silent_cases() {
        let test = "
tests:
  - alert_rule_test:
      - eval_time: 3m
        alertname: A
        exp_alerts: []
      - eval_time: 5m
        alertname: A
        exp_alerts:
          # fires
          - exp_labels:
              severity: page
      - alertname: \"B\"
        exp_alerts:
          - exp_labels: {}
";
        let mut c = Coverage::default();
        c.add(test);
        let alerts: BTreeSet<String> = ["A", "B", "C"].map(String::from).into();
        assert_eq!(
            untested(&alerts, &c),
            ["  B: lacks a test with `exp_alerts: []`", "  C: lacks any test"].map(String::from)
        );
    }

    #[test]
    fn every_alert_of_the_repository_is_covered() {
        let dir = repo_dir();
        let mut c = Coverage::default();
        for t in yml_files(&dir.join("tests")).unwrap() {
            c.add(&read(&t).unwrap());
        }
        let alerts = alert_names(&read(&dir.join(RULES[1])).unwrap());
        assert!(alerts.len() >= 10, "{alerts:?}");
        assert_eq!(untested(&alerts, &c), Vec::<String>::new());
    }

    #[test]
    fn unknown_series_are_refused() {
        let known = Known::new(&cmd::workspace_root(), "- record: site_pair:x:p95\n").unwrap();
        known.check("rate(mesh_agent_peer_probes_lost_total{peer=\"mesh_nope\"}[5m])").unwrap();
        known.check("histogram_quantile(0.9, mesh_agent_peer_rtt_seconds_bucket) + site_pair:x:p95").unwrap();
        known.check("sum by (le) (up) / ALERTS").unwrap();
        assert!(known.check("mesh_agent_peer_rtt_p95").is_err());
        assert!(known.check("site_pair:y:p95").is_err());
    }

    #[test]
    fn the_repository_dashboard_and_rules_name_known_series() {
        let dir = repo_dir();
        let known = Known::new(&cmd::workspace_root(), &read(&dir.join(RULES[0])).unwrap()).unwrap();
        for r in RULES {
            known.check(&read(&dir.join(r)).unwrap()).unwrap();
        }
        check_dashboard(&read(&dir.join(DASHBOARD)).unwrap(), &known).unwrap();
        let bad = read(&dir.join(DASHBOARD)).unwrap().replace("site_pair:mesh_agent_peer_rtt_seconds:p95_5m", "nope:x");
        assert!(check_dashboard(&bad, &known).is_err());
    }
}
