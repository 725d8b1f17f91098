//! Label values that are always escaped.
//!
//! prometheus-client 0.24 writes `String` and `&str` label values verbatim.
//! A node or peer name holding a quote, a backslash or a newline would then
//! break the line it is on and every sample after it for the scraper, so
//! every label value whose text comes from outside goes through [`Label`].

use std::fmt::{self, Write as _};

use prometheus_client::encoding::{EncodeLabelValue, LabelValueEncoder};

/// A label value, written with `\`, `"` and newline escaped as both text
/// formats require (`\\`, `\"`, `\n`).
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Label(String);

impl Label {
    /// The label value `v` (its `Display` text).
    pub fn new(v: impl fmt::Display) -> Self {
        Self(v.to_string())
    }
}

impl From<&str> for Label {
    fn from(v: &str) -> Self {
        Self(v.to_owned())
    }
}

impl From<String> for Label {
    fn from(v: String) -> Self {
        Self(v)
    }
}

impl EncodeLabelValue for Label {
    fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> fmt::Result {
        let mut rest = self.0.as_str();
        while let Some(i) = rest.find(['\\', '"', '\n']) {
            encoder.write_str(&rest[..i])?;
            encoder.write_str(match rest.as_bytes()[i] {
                b'\\' => "\\\\",
                b'"' => "\\\"",
                _ => "\\n",
            })?;
            rest = &rest[i + 1..];
        }
        encoder.write_str(rest)
    }
}

#[cfg(test)]
mod tests {
    use prometheus_client::{
        metrics::{family::Family, gauge::Gauge},
        registry::Registry,
    };

    use super::*;
    use crate::exposition::{Format, encode};

    #[test]
    fn quotes_backslashes_and_newlines_are_escaped() {
        let mut registry = Registry::default();
        let family = Family::<[(&'static str, Label); 1], Gauge>::default();
        family.get_or_create(&[("peer", Label::from("a\"b\\c\nd"))]).set(1);
        family.get_or_create(&[("peer", Label::from("plain"))]).set(2);
        registry.register("t_peer", "A gauge", family);
        for format in [Format::Classic, Format::OpenMetrics] {
            let text = encode(&registry, format).unwrap();
            assert!(text.contains("t_peer{peer=\"a\\\"b\\\\c\\nd\"} 1\n"), "{text}");
            assert!(text.contains("t_peer{peer=\"plain\"} 2\n"), "{text}");
            assert_eq!(text.lines().filter(|l| l.starts_with("t_peer")).count(), 2, "{text}");
        }
    }
}
