//! Line charts of the experiments' results, drawn with `plotters` into SVG or PNG files (one or
//! more panels side by side). The embedded DejaVu Sans font (`assets/fonts`) draws the text of a
//! PNG, so it needs no installed fonts; in an SVG it only measures the text, which the viewer
//! then draws in its own sans-serif font.

use std::fs::File;
use std::io::BufWriter;
use std::path::Path;
use std::sync::OnceLock;

use plotters::prelude::*;
use plotters::style::register_font;

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
    /// The file name ends neither in `.svg` nor in `.png`.
    #[error("unsupported plot format (use a .svg or .png file name)")]
    Format,
    /// Nothing to draw.
    #[error("no finite points to draw")]
    Empty,
    /// The drawing backend failed.
    #[error("drawing failed: {0}")]
    Draw(String),
    /// The file could not be written.
    #[error("cannot write the file: {0}")]
    Write(#[source] std::io::Error),
    /// The PNG encoder refused the image.
    #[error("cannot encode the PNG: {0}")]
    Encode(String),
}

/// The file formats a plot can be written in, chosen by the file name's extension.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PlotFormat {
    /// Scalable vector graphics (`.svg`).
    Svg,
    /// An 8-bit RGB bitmap (`.png`).
    Png,
}

impl PlotFormat {
    /// The format a file name asks for (extension, any case).
    pub fn of(path: &Path) -> Result<Self, PlotError> {
        match path.extension().and_then(|e| e.to_str()).map(|e| e.to_ascii_lowercase()).as_deref() {
            Some("svg") => Ok(Self::Svg),
            Some("png") => Ok(Self::Png),
            _ => Err(PlotError::Format),
        }
    }
}

/// The family the embedded font is registered as. It must stay "sans-serif": plotters' default
/// tick and legend labels ask for that family by name.
const FONT_FAMILY: &str = "sans-serif";
static FONT_BYTES: &[u8] = include_bytes!("../../../assets/fonts/DejaVuSans.ttf");

/// Registers the embedded font with `plotters` once per process; both backends measure text
/// with it.
fn ensure_font() -> Result<(), PlotError> {
    static REGISTERED: OnceLock<bool> = OnceLock::new();
    let ok = *REGISTERED.get_or_init(|| register_font(FONT_FAMILY, FontStyle::Normal, FONT_BYTES).is_ok());
    if ok { Ok(()) } else { Err(PlotError::Draw("the embedded font cannot be parsed".into())) }
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

/// Draws the panels side by side into `path`, an `.svg` or `.png` file ([`PlotFormat::of`]).
pub fn line_chart(path: &Path, panels: &[Panel]) -> Result<(), PlotError> {
    let format = PlotFormat::of(path)?;
    if panels.is_empty() {
        return Err(PlotError::Empty);
    }
    ensure_font()?;
    let size = (PANEL_W * panels.len() as u32, PANEL_H);
    // Both formats are drawn in memory first, so a failed drawing leaves no partial file.
    match format {
        PlotFormat::Svg => {
            let mut svg = String::new();
            draw_panels(SVGBackend::with_string(&mut svg, size).into_drawing_area(), panels)?;
            std::fs::write(path, svg).map_err(PlotError::Write)
        }
        PlotFormat::Png => {
            let mut rgb = vec![0u8; size.0 as usize * size.1 as usize * 3];
            draw_panels(BitMapBackend::with_buffer(&mut rgb, size).into_drawing_area(), panels)?;
            write_png(path, size, &rgb)
        }
    }
}

/// Fills `root` white and draws the panels side by side on it.
fn draw_panels<DB: DrawingBackend>(
    root: DrawingArea<DB, plotters::coord::Shift>,
    panels: &[Panel],
) -> Result<(), PlotError> {
    root.fill(&WHITE).map_err(draw_err)?;
    let areas = root.split_evenly((1, panels.len()));
    for (panel, area) in panels.iter().zip(areas.iter()) {
        draw_panel(area, panel)?;
    }
    root.present().map_err(draw_err)
}

/// Encodes an RGB buffer of `size` pixels as a PNG file.
fn write_png(path: &Path, size: (u32, u32), rgb: &[u8]) -> Result<(), PlotError> {
    let encoding_err = |e: png::EncodingError| match e {
        png::EncodingError::IoError(source) => PlotError::Write(source),
        other => PlotError::Encode(other.to_string()),
    };
    let file = File::create(path).map_err(PlotError::Write)?;
    let mut encoder = png::Encoder::new(BufWriter::new(file), size.0, size.1);
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    let mut writer = encoder.write_header().map_err(encoding_err)?;
    writer.write_image_data(rgb).map_err(encoding_err)?;
    writer.finish().map_err(encoding_err)
}

/// A short axis label: `1.5M`, `200k`, `36`, `0.015`.
fn tick_label(v: f64) -> String {
    fn trimmed(x: f64) -> String {
        let s = format!("{x:.4}");
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    }
    match v.abs() {
        a if a >= 999_950.0 => format!("{}M", trimmed(v / 1e6)),
        a if a >= 1e3 => format!("{}k", trimmed(v / 1e3)),
        a if a != 0.0 && a < 1e-3 => format!("{v:.1e}"),
        _ => trimmed(v),
    }
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
    builder.caption(&p.title, (FONT_FAMILY, 18)).margin(12).x_label_area_size(40).y_label_area_size(60);
    // The four axis combinations have different coordinate types.
    macro_rules! finish {
        ($chart:expr) => {{
            let mut chart = $chart;
            chart
                .configure_mesh()
                .x_desc(p.x_label.as_str())
                .y_desc(p.y_label.as_str())
                .x_label_formatter(&|v| tick_label(*v))
                .y_label_formatter(&|v| tick_label(*v))
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

#[cfg(test)]
mod tests {
    use super::tick_label;

    #[test]
    fn tick_labels_are_short() {
        let cases = [
            (2_000_000.0, "2M"),
            (1_500_000.0, "1.5M"),
            (999_999.0, "1M"),
            (200_000.0, "200k"),
            (12_500.0, "12.5k"),
            (5000.0, "5k"),
            (36.0, "36"),
            (0.25, "0.25"),
            (0.015, "0.015"),
            (0.02, "0.02"),
            (0.0, "0"),
            (-3.0, "-3"),
            (0.0005, "5.0e-4"),
        ];
        for (v, want) in cases {
            assert_eq!(tick_label(v), want, "{v}");
        }
    }
}
