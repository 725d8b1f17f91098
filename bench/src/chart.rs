//! SVG charts of a suite's medians: one line per variant, the suite's
//! parameter on the x axis.

use std::path::Path;

use plotters::prelude::*;

use crate::Summary;

/// Draws `metric`'s medians against the numeric parameter, one series per
/// variant, into `path`. Parameters that are not numbers are placed by order.
pub fn line_chart(path: &Path, title: &str, metric: &str, summaries: &[Summary], log_x: bool) -> anyhow::Result<()> {
    let rows: Vec<&Summary> = summaries.iter().filter(|s| s.metric == metric).collect();
    anyhow::ensure!(!rows.is_empty(), "no samples of {metric} to chart");
    let mut params: Vec<String> = Vec::new();
    for r in &rows {
        if !params.contains(&r.param) {
            params.push(r.param.clone());
        }
    }
    let x_of = |p: &str| -> f64 {
        let x = p.parse::<f64>().unwrap_or_else(|_| params.iter().position(|q| q == p).unwrap_or(0) as f64 + 1.0);
        if log_x { x.max(1.0).log10() } else { x }
    };
    let xs: Vec<f64> = params.iter().map(|p| x_of(p)).collect();
    let (xmin, xmax) = xs.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &x| (a.min(x), b.max(x)));
    let ymax = rows.iter().map(|r| r.max).fold(0.0, f64::max) * 1.1;
    let unit = rows[0].unit.clone();

    let root = SVGBackend::new(path, (800, 480)).into_drawing_area();
    root.fill(&WHITE)?;
    let pad = ((xmax - xmin) * 0.05).max(0.1);
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d((xmin - pad)..(xmax + pad), 0.0..ymax.max(1e-9))?;
    chart
        .configure_mesh()
        .x_desc(if log_x { "log10(param)" } else { "param" })
        .y_desc(format!("{metric} ({unit})"))
        .draw()?;
    let mut variants: Vec<&str> = Vec::new();
    for r in &rows {
        if !variants.contains(&r.variant.as_str()) {
            variants.push(&r.variant);
        }
    }
    for (i, v) in variants.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        let mut points: Vec<(f64, f64)> =
            rows.iter().filter(|r| r.variant == *v).map(|r| (x_of(&r.param), r.median)).collect();
        points.sort_by(|a, b| a.0.total_cmp(&b.0));
        chart
            .draw_series(LineSeries::new(points.clone(), color.stroke_width(2)))?
            .label(*v)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], color.stroke_width(2)));
        chart.draw_series(points.iter().map(|&p| Circle::new(p, 3, color.filled())))?;
    }
    chart.configure_series_labels().border_style(BLACK).background_style(WHITE.mix(0.8)).draw()?;
    root.present()?;
    Ok(())
}

/// Draws `metric`'s medians as grouped bars: one group per parameter, one
/// bar per variant, with the min-max spread as a whisker.
pub fn bar_chart(path: &Path, title: &str, metric: &str, summaries: &[Summary]) -> anyhow::Result<()> {
    let rows: Vec<&Summary> = summaries.iter().filter(|s| s.metric == metric).collect();
    anyhow::ensure!(!rows.is_empty(), "no samples of {metric} to chart");
    let mut params: Vec<&str> = Vec::new();
    let mut variants: Vec<&str> = Vec::new();
    for r in &rows {
        if !params.contains(&r.param.as_str()) {
            params.push(&r.param);
        }
        if !variants.contains(&r.variant.as_str()) {
            variants.push(&r.variant);
        }
    }
    let ymax = rows.iter().map(|r| r.max).fold(0.0, f64::max) * 1.15;
    let unit = rows[0].unit.clone();
    let root = SVGBackend::new(path, (900, 480)).into_drawing_area();
    root.fill(&WHITE)?;
    let groups = params.len() as f64;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(0.0..groups, 0.0..ymax.max(1e-9))?;
    let labels: Vec<String> = params.iter().map(|p| (*p).to_owned()).collect();
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(params.len() * 2 + 1)
        .x_label_formatter(&|x| {
            let i = x.floor() as usize;
            if (x - x.floor() - 0.5).abs() < 0.01 && i < labels.len() { labels[i].clone() } else { String::new() }
        })
        .y_desc(format!("{metric} ({unit})"))
        .draw()?;
    let width = 0.8 / variants.len() as f64;
    for (vi, v) in variants.iter().enumerate() {
        let color = Palette99::pick(vi).to_rgba();
        let bars: Vec<(f64, &Summary)> = rows
            .iter()
            .filter(|r| r.variant == *v)
            .map(|r| (params.iter().position(|p| *p == r.param).unwrap_or(0) as f64 + 0.1 + width * vi as f64, *r))
            .collect();
        chart
            .draw_series(
                bars.iter().map(|(x, r)| Rectangle::new([(*x, 0.0), (*x + width * 0.9, r.median)], color.filled())),
            )?
            .label(*v)
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 12, y + 5)], color.filled()));
        chart.draw_series(bars.iter().map(|(x, r)| {
            let mid = *x + width * 0.45;
            PathElement::new(vec![(mid, r.min), (mid, r.max)], BLACK.stroke_width(1))
        }))?;
    }
    chart.configure_series_labels().border_style(BLACK).background_style(WHITE.mix(0.8)).draw()?;
    root.present()?;
    Ok(())
}
