//! Encoding a registry in the format the scraper asked for.
//!
//! prometheus-client writes OpenMetrics: a counter family is named without
//! its `_total` suffix in `# HELP`/`# TYPE` and the text ends with `# EOF`.
//! Prometheus asks for that format in its `Accept` header and reads it as
//! such. Everything else that reads `/metrics` here (curl, `promtool check
//! metrics`, node_exporter's textfile collector fed by `mesh-agent status
//! --format prometheus`, the tests) reads the classic text format, where the
//! same family is declared as `name_total` and `# EOF` means nothing, so
//! those get [`Format::Classic`], as Go's promhttp does by default.

use prometheus_client::{encoding::text, registry::Registry};

/// A text exposition format.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// OpenMetrics 1.0 text, as prometheus-client writes it.
    OpenMetrics,
    /// The classic Prometheus text format (version 0.0.4).
    Classic,
}

impl Format {
    /// The format for a request with this `Accept` header: OpenMetrics when
    /// the client names it (Prometheus does), classic otherwise.
    #[must_use]
    pub fn negotiate(accept: Option<&str>) -> Self {
        match accept {
            Some(a) if a.contains("application/openmetrics-text") => Self::OpenMetrics,
            _ => Self::Classic,
        }
    }

    /// The response's `Content-Type`.
    #[must_use]
    pub const fn content_type(self) -> &'static str {
        match self {
            Self::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
            Self::Classic => "text/plain; version=0.0.4; charset=utf-8",
        }
    }
}

/// The registry's metrics in `format`. Fails only if a collector does.
pub fn encode(registry: &Registry, format: Format) -> Result<String, std::fmt::Error> {
    let mut out = String::new();
    text::encode(&mut out, registry)?;
    Ok(match format {
        Format::OpenMetrics => out,
        Format::Classic => to_classic(&out),
    })
}

/// The classic text of an OpenMetrics text written by prometheus-client:
/// counter families are declared under their sample name (`name_total`),
/// `unknown` becomes `untyped`, and `# UNIT` and `# EOF` (which the classic
/// format does not have) are dropped. Samples are unchanged.
#[must_use]
pub fn to_classic(openmetrics: &str) -> String {
    let mut out = String::with_capacity(openmetrics.len() + 256);
    // prometheus-client writes `# HELP` before `# TYPE`: hold the help line
    // until the type says whether the family's name changes.
    let mut help: Option<(&str, &str)> = None;
    for line in openmetrics.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            flush_help(&mut out, help.take(), None);
            help = Some(rest.split_once(' ').unwrap_or((rest, "")));
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap_or((rest, "untyped"));
            let (family, kind) = match kind {
                "counter" if !name.ends_with("_total") => (format!("{name}_total"), kind),
                "unknown" => (name.to_owned(), "untyped"),
                _ => (name.to_owned(), kind),
            };
            let held = help.take();
            flush_help(&mut out, held.filter(|(n, _)| *n == name), Some(&family));
            out.push_str("# TYPE ");
            out.push_str(&family);
            out.push(' ');
            out.push_str(kind);
            out.push('\n');
        } else if line.starts_with("# UNIT ") || line == "# EOF" {
        } else {
            flush_help(&mut out, help.take(), None);
            out.push_str(line);
            out.push('\n');
        }
    }
    flush_help(&mut out, help, None);
    out
}

/// Writes a held `# HELP` line, under `family` if the family was renamed.
fn flush_help(out: &mut String, help: Option<(&str, &str)>, family: Option<&str>) {
    if let Some((name, text)) = help {
        out.push_str("# HELP ");
        out.push_str(family.unwrap_or(name));
        out.push(' ');
        out.push_str(text);
        out.push('\n');
    }
}

#[cfg(test)]
mod tests {
    use prometheus_client::metrics::{counter::Counter, gauge::Gauge, histogram::Histogram};

    use super::*;

    fn registry() -> Registry {
        let mut r = Registry::default();
        let c: Counter = Counter::default();
        c.inc_by(3);
        r.register("t_requests", "Requests", c);
        let g: Gauge = Gauge::default();
        g.set(-1);
        r.register("t_up", "Up", g);
        let h = Histogram::new([0.5, 1.0]);
        h.observe(0.7);
        r.register("t_latency_seconds", "Latency", h);
        r
    }

    #[test]
    fn negotiation_follows_accept() {
        assert_eq!(Format::negotiate(None), Format::Classic);
        assert_eq!(Format::negotiate(Some("*/*")), Format::Classic);
        let prometheus = "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";
        assert_eq!(Format::negotiate(Some(prometheus)), Format::OpenMetrics);
    }

    #[test]
    fn classic_declares_counters_under_their_sample_name() {
        let text = encode(&registry(), Format::Classic).unwrap();
        assert!(
            text.contains("# HELP t_requests_total Requests.\n# TYPE t_requests_total counter\nt_requests_total 3\n")
        );
        assert!(text.contains("# HELP t_up Up.\n# TYPE t_up gauge\nt_up -1\n"), "{text}");
        assert!(text.contains("# TYPE t_latency_seconds histogram\n"), "{text}");
        assert!(text.contains("t_latency_seconds_bucket{le=\"1.0\"} 1\n"), "{text}");
        assert!(!text.contains("# EOF"), "{text}");
    }

    #[test]
    fn openmetrics_is_what_prometheus_client_writes() {
        let text = encode(&registry(), Format::OpenMetrics).unwrap();
        assert!(text.contains("# TYPE t_requests counter\nt_requests_total 3\n"), "{text}");
        assert!(text.ends_with("# EOF\n"), "{text}");
    }
}
