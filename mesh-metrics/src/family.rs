//! Writing metric families from state read at scrape time, inside a
//! prometheus-client [`Collector`](prometheus_client::collector::Collector):
//! the agent's status, probe and control-session facts and control's
//! snapshot-derived numbers are views of state owned elsewhere, not values
//! this process counts, so they are encoded on each scrape rather than kept
//! in a second copy.
//!
//! Names are given as prometheus-client wants them: a counter without its
//! `_total` suffix (the encoder adds it to the samples).

use std::fmt;

use prometheus_client::{
    encoding::{
        DescriptorEncoder, EncodeCounterValue, EncodeGaugeValue, EncodeLabelSet, EncodeMetric as _, NoLabelSet,
    },
    metrics::{MetricType, counter::ConstCounter, gauge::ConstGauge},
};

/// A gauge family with one sample per `(labels, value)`; declared even
/// with no samples.
pub fn gauges<L: EncodeLabelSet, V: EncodeGaugeValue>(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    samples: impl IntoIterator<Item = (L, V)>,
) -> fmt::Result {
    let mut metric = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for (labels, value) in samples {
        ConstGauge::new(value).encode(metric.encode_family(&labels)?)?;
    }
    Ok(())
}

/// A gauge without labels.
pub fn gauge<V: EncodeGaugeValue>(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    value: V,
) -> fmt::Result {
    ConstGauge::new(value).encode(encoder.encode_descriptor(name, help, None, MetricType::Gauge)?)
}

/// A counter family (`name` without `_total`) with one sample per
/// `(labels, value)`; declared even with no samples.
pub fn counters<L: EncodeLabelSet, V: EncodeCounterValue>(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    samples: impl IntoIterator<Item = (L, V)>,
) -> fmt::Result {
    let mut metric = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (labels, value) in samples {
        ConstCounter::new(value).encode(metric.encode_family(&labels)?)?;
    }
    Ok(())
}

/// A counter without labels (`name` without `_total`).
pub fn counter<V: EncodeCounterValue>(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    value: V,
) -> fmt::Result {
    ConstCounter::new(value).encode(encoder.encode_descriptor(name, help, None, MetricType::Counter)?)
}

/// One histogram of a family, kept by the caller: per-bucket counts (not
/// cumulative) for each upper bound of `bounds`, the count above the last
/// bound, the sum and the count of observations.
#[derive(Clone, Copy, Debug)]
pub struct Buckets<'a> {
    /// Upper bounds, ascending.
    pub bounds: &'a [f64],
    /// Observations per bound (same length as `bounds`), not cumulative.
    pub counts: &'a [u64],
    /// Observations above the last bound.
    pub above: u64,
    /// Sum of the observations.
    pub sum: f64,
}

/// A histogram family with one histogram per `(labels, buckets)`; declared
/// even with no samples.
pub fn histograms<'a, L: EncodeLabelSet>(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    samples: impl IntoIterator<Item = (L, Buckets<'a>)>,
) -> fmt::Result {
    let mut metric = encoder.encode_descriptor(name, help, None, MetricType::Histogram)?;
    let mut rows = Vec::new();
    for (labels, b) in samples {
        rows.clear();
        rows.extend(b.bounds.iter().copied().zip(b.counts.iter().copied()));
        // prometheus-client writes the bucket bounded by f64::MAX as +Inf.
        rows.push((f64::MAX, b.above));
        let count = rows.iter().map(|(_, n)| n).sum();
        metric.encode_family(&labels)?.encode_histogram::<NoLabelSet>(b.sum, count, &rows, None)?;
    }
    Ok(())
}
