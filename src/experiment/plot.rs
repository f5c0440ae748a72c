//! Line charts of the experiments' results, drawn with `plotters` into SVG files (one or more
//! panels side by side).

use std::path::Path;

use plotters::prelude::*;

/// One line of a panel.
#[derive(Debug, Clone)]
pub struct Series {
    /// Legend label.
    pub label: String,
    /// `(x, y)` points, in order.
    pub points: Vec<(f64, f64)>,
}

/// One chart.
#[derive(Debug, Clone)]
pub struct Panel {
    /// Caption.
    pub title: String,
    /// X axis label.
    pub x_label: String,
    /// Y axis label.
    pub y_label: String,
    /// Logarithmic x axis.
    pub log_x: bool,
    /// Logarithmic y axis.
    pub log_y: bool,
    /// The lines.
    pub series: Vec<Series>,
    /// Where the legend goes.
    pub legend: LegendAt,
}

/// Position of a panel's legend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LegendAt {
    /// Top left corner.
    #[default]
    UpperLeft,
    /// Middle of the right edge.
    MiddleRight,
    /// Bottom right corner.
    LowerRight,
}

/// Why a plot could not be drawn.
#[derive(Debug, thiserror::Error)]
pub enum PlotError {
    /// Only SVG is built in.
    #[error("unsupported plot format (use a .svg file name)")]
    Format,
    /// Nothing to draw.
    #[error("no finite points to draw")]
    Empty,
    /// The drawing backend failed.
    #[error("drawing failed: {0}")]
    Draw(String),
}

const PANEL_W: u32 = 640;
const PANEL_H: u32 = 440;

/// A distinct colour per series index.
fn colour(i: usize) -> RGBColor {
    const C: [RGBColor; 10] = [
        RGBColor(31, 119, 180),
        RGBColor(255, 127, 14),
        RGBColor(44, 160, 44),
        RGBColor(214, 39, 40),
        RGBColor(148, 103, 189),
        RGBColor(140, 86, 75),
        RGBColor(227, 119, 194),
        RGBColor(127, 127, 127),
        RGBColor(188, 189, 34),
        RGBColor(23, 190, 207),
    ];
    C[i % C.len()]
}

/// Draws the panels side by side into `path` (an `.svg` file).
pub fn line_chart(path: &Path, panels: &[Panel]) -> Result<(), PlotError> {
    let ext = path.extension().and_then(|e| e.to_str()).map(|e| e.to_ascii_lowercase());
    if ext.as_deref() != Some("svg") {
        return Err(PlotError::Format);
    }
    if panels.is_empty() {
        return Err(PlotError::Empty);
    }
    let width = PANEL_W * panels.len() as u32;
    let root = SVGBackend::new(path, (width, PANEL_H)).into_drawing_area();
    root.fill(&WHITE).map_err(draw_err)?;
    let areas = root.split_evenly((1, panels.len()));
    for (panel, area) in panels.iter().zip(areas.iter()) {
        draw_panel(area, panel)?;
    }
    root.present().map_err(draw_err)?;
    Ok(())
}

fn draw_err<E: std::fmt::Debug>(e: E) -> PlotError {
    PlotError::Draw(format!("{e:?}"))
}

fn bounds(values: impl Iterator<Item = f64>, log: bool) -> Option<(f64, f64)> {
    let (mut lo, mut hi) = (f64::INFINITY, f64::NEG_INFINITY);
    for v in values.filter(|v| v.is_finite() && (!log || *v > 0.0)) {
        lo = lo.min(v);
        hi = hi.max(v);
    }
    if lo > hi {
        return None;
    }
    if log {
        Some((lo / 1.5, hi * 1.5))
    } else if hi == lo {
        Some((lo - 1.0, hi + 1.0))
    } else {
        let pad = 0.05 * (hi - lo);
        Some((lo - pad, hi + pad))
    }
}

fn draw_panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, plotters::coord::Shift>,
    p: &Panel,
) -> Result<(), PlotError> {
    let pts = || p.series.iter().flat_map(|s| s.points.iter().copied());
    let (x0, x1) = bounds(pts().map(|q| q.0), p.log_x).ok_or(PlotError::Empty)?;
    let (y0, y1) = bounds(pts().map(|q| q.1), p.log_y).ok_or(PlotError::Empty)?;
    let mut builder = ChartBuilder::on(area);
    builder.caption(&p.title, ("sans-serif", 18)).margin(12).x_label_area_size(40).y_label_area_size(60);
    // The four axis combinations have different coordinate types.
    macro_rules! finish {
        ($chart:expr) => {{
            let mut chart = $chart;
            chart
                .configure_mesh()
                .x_desc(p.x_label.as_str())
                .y_desc(p.y_label.as_str())
                .draw()
                .map_err(draw_err)?;
            for (i, s) in p.series.iter().enumerate() {
                let c = colour(i);
                let keep = |&(x, y): &(f64, f64)| {
                    x.is_finite() && y.is_finite() && (!p.log_x || x > 0.0) && (!p.log_y || y > 0.0)
                };
                chart
                    .draw_series(LineSeries::new(s.points.iter().copied().filter(keep), c.stroke_width(2)))
                    .map_err(draw_err)?
                    .label(s.label.as_str())
                    .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], c.stroke_width(2)));
            }
            chart
                .configure_series_labels()
                .background_style(WHITE.mix(0.85))
                .border_style(BLACK)
                .position(match p.legend {
                    LegendAt::UpperLeft => SeriesLabelPosition::UpperLeft,
                    LegendAt::MiddleRight => SeriesLabelPosition::MiddleRight,
                    LegendAt::LowerRight => SeriesLabelPosition::LowerRight,
                })
                .draw()
                .map_err(draw_err)?;
        }};
    }
    match (p.log_x, p.log_y) {
        (false, false) => finish!(builder.build_cartesian_2d(x0..x1, y0..y1).map_err(draw_err)?),
        (false, true) => finish!(builder.build_cartesian_2d(x0..x1, (y0..y1).log_scale()).map_err(draw_err)?),
        (true, false) => finish!(builder.build_cartesian_2d((x0..x1).log_scale(), y0..y1).map_err(draw_err)?),
        (true, true) => {
            finish!(builder.build_cartesian_2d((x0..x1).log_scale(), (y0..y1).log_scale()).map_err(draw_err)?)
        }
    }
    Ok(())
}
