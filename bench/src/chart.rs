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
