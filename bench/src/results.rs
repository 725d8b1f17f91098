//! Samples, their JSON-lines form and the Markdown summary.

use std::{collections::BTreeMap, io::Write as _, path::Path};

use serde::{Deserialize, Serialize};

/// One measured sample.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Record {
    /// Suite name (`acl`, `guard`, `agent`, `push`, `failover`, `tunnel`).
    pub suite: String,
    /// What was measured (`ebpf-acl`, `nft-sets`, `gotatun`, ...).
    pub variant: String,
    /// The parameter the suite varies (rule count, peer count, ...), as text.
    pub param: String,
    /// Metric name (`ns_per_packet`, `gbit_per_s`, ...).
    pub metric: String,
    /// The value.
    pub value: f64,
    /// Unit of `value`.
    pub unit: String,
    /// Run index (interleaved runs of the variants).
    pub run: u32,
}

/// The samples of one suite, with which variant is its baseline.
#[derive(Debug)]
pub struct Results {
    suite: String,
    baseline: Option<String>,
    records: Vec<Record>,
    /// Whether a higher value is better, per metric (for the ratio's sense).
    higher_is_better: BTreeMap<String, bool>,
}

/// Median and spread of one (variant, param, metric).
#[derive(Clone, Debug, PartialEq)]
pub struct Summary {
    /// Variant.
    pub variant: String,
    /// Parameter.
    pub param: String,
    /// Metric.
    pub metric: String,
    /// Unit.
    pub unit: String,
    /// Median of the samples.
    pub median: f64,
    /// Smallest sample.
    pub min: f64,
    /// Largest sample.
    pub max: f64,
    /// Number of samples.
    pub samples: usize,
    /// Median divided by the baseline's median for the same param and metric.
    pub ratio: Option<f64>,
}

impl Results {
    /// Empty results of `suite`; `baseline` names the variant ratios are
    /// computed against.
    #[must_use]
    pub fn new(suite: &str, baseline: Option<&str>) -> Self {
        Self {
            suite: suite.to_owned(),
            baseline: baseline.map(str::to_owned),
            records: Vec::new(),
            higher_is_better: BTreeMap::new(),
        }
    }

    /// Declares whether larger values of `metric` are better (throughput) or
    /// worse (latency, the default).
    pub fn higher_is_better(&mut self, metric: &str, higher: bool) {
        self.higher_is_better.insert(metric.to_owned(), higher);
    }

    /// Adds a sample.
    pub fn push(&mut self, variant: &str, param: impl ToString, metric: &str, value: f64, unit: &str, run: u32) {
        self.records.push(Record {
            suite: self.suite.clone(),
            variant: variant.to_owned(),
            param: param.to_string(),
            metric: metric.to_owned(),
            value,
            unit: unit.to_owned(),
            run,
        });
    }

    /// The samples so far.
    #[must_use]
    pub fn records(&self) -> &[Record] {
        &self.records
    }

    /// Medians and spreads, in first-seen order of (metric, param, variant).
    #[must_use]
    pub fn summaries(&self) -> Vec<Summary> {
        let mut order = Vec::new();
        let mut groups: BTreeMap<(String, String, String), Vec<&Record>> = BTreeMap::new();
        for r in &self.records {
            let key = (r.metric.clone(), r.param.clone(), r.variant.clone());
            if !groups.contains_key(&key) {
                order.push(key.clone());
            }
            groups.entry(key).or_default().push(r);
        }
        let median_of = |key: &(String, String, String)| groups.get(key).map(|g| median(g));
        order
            .iter()
            .map(|key| {
                let group = &groups[key];
                let values: Vec<f64> = group.iter().map(|r| r.value).collect();
                let m = median(group);
                let ratio = self.baseline.as_ref().and_then(|b| {
                    let base = median_of(&(key.0.clone(), key.1.clone(), b.clone()))?;
                    (base != 0.0).then(|| m / base)
                });
                Summary {
                    variant: key.2.clone(),
                    param: key.1.clone(),
                    metric: key.0.clone(),
                    unit: group[0].unit.clone(),
                    median: m,
                    min: values.iter().copied().fold(f64::INFINITY, f64::min),
                    max: values.iter().copied().fold(f64::NEG_INFINITY, f64::max),
                    samples: values.len(),
                    ratio,
                }
            })
            .collect()
    }

    /// The Markdown table of [`Results::summaries`].
    #[must_use]
    pub fn markdown(&self) -> String {
        let mut s = format!("### {}\n\n", self.suite);
        if let Some(b) = &self.baseline {
            s.push_str(&format!("Ratios are to `{b}` (same parameter, same metric, same run).\n\n"));
        }
        s.push_str("| metric | param | variant | median | min-max | n | ratio |\n|---|---|---|---|---|---|---|\n");
        for x in self.summaries() {
            let ratio = x.ratio.map_or_else(|| "-".to_owned(), |r| format!("{r:.2}x"));
            s.push_str(&format!(
                "| {} | {} | {} | {} {} | {}-{} | {} | {} |\n",
                x.metric,
                x.param,
                x.variant,
                fmt_num(x.median),
                x.unit,
                fmt_num(x.min),
                fmt_num(x.max),
                x.samples,
                ratio
            ));
        }
        s
    }

    /// Writes `<suite>.jsonl` and `<suite>.md` under `dir` (replacing older
    /// results of the same suite) and returns the Markdown.
    pub fn write(&self, dir: &Path) -> std::io::Result<String> {
        std::fs::create_dir_all(dir)?;
        let mut jsonl = std::fs::File::create(dir.join(format!("{}.jsonl", self.suite)))?;
        for r in &self.records {
            writeln!(jsonl, "{}", serde_json::to_string(r).map_err(std::io::Error::other)?)?;
        }
        let md = self.markdown();
        std::fs::write(dir.join(format!("{}.md", self.suite)), &md)?;
        Ok(md)
    }
}

fn median(group: &[&Record]) -> f64 {
    let mut v: Vec<f64> = group.iter().map(|r| r.value).collect();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n == 0 {
        f64::NAN
    } else if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn fmt_num(x: f64) -> String {
    if x.abs() >= 100.0 {
        format!("{x:.0}")
    } else if x.abs() >= 1.0 {
        format!("{x:.2}")
    } else {
        format!("{x:.4}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians_spreads_and_ratios() {
        let mut r = Results::new("acl", Some("none"));
        for (run, (a, b)) in [(10.0, 20.0), (12.0, 18.0), (11.0, 40.0)].into_iter().enumerate() {
            r.push("none", 10, "ns_per_packet", a, "ns", run as u32);
            r.push("ebpf", 10, "ns_per_packet", b, "ns", run as u32);
        }
        let s = r.summaries();
        assert_eq!(s.len(), 2);
        assert_eq!((s[0].median, s[0].min, s[0].max, s[0].ratio), (11.0, 10.0, 12.0, Some(1.0)));
        assert_eq!((s[1].median, s[1].samples), (20.0, 3));
        assert!((s[1].ratio.unwrap() - 20.0 / 11.0).abs() < 1e-9);
        assert!(r.markdown().contains("| ns_per_packet | 10 | ebpf | 20.00 ns | 18.00-40.00 | 3 | 1.82x |"));
    }
}
