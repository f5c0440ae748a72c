//! The trace of a training run drawn as four panels (`kfrtrl train --trace-plot`).

use super::{TracePoint, TrainReport};
use crate::tools::experiment::plot::{LegendAt, Panel, Series, line_chart};

/// The trace's four panels: running bpc, gradient norms, influence norms (log scales for norms)
/// and the exact Jacobians' growth rate.
pub fn plot_trace(path: &std::path::Path, report: &TrainReport) -> Result<(), String> {
    // Points a log axis cannot draw (zero or negative) are left out of log panels only.
    let points = |f: &dyn Fn(&TracePoint) -> f64, positive: bool| -> Vec<(f64, f64)> {
        let keep = |y: f64| y.is_finite() && (!positive || y > 0.0);
        report.trace.iter().map(|t| (t.symbols as f64, f(t))).filter(|p| keep(p.1)).collect()
    };
    let series =
        |label: &str, f: &dyn Fn(&TracePoint) -> f64| Series { label: label.into(), points: points(f, true) };
    let signed_series = |label: &str, f: &dyn Fn(&TracePoint) -> f64| Series {
        label: label.into(),
        points: points(f, false),
    };
    let panel = |title: &str, y: &str, log_y: bool, series: Vec<Series>| Panel {
        title: format!("{} {}: {title}", report.learner, report.cell),
        x_label: "symbols".into(),
        y_label: y.into(),
        log_x: false,
        log_y,
        series,
        legend: LegendAt::MiddleRight,
    };
    let panels = [
        panel(
            "running prequential loss",
            "bits per symbol",
            false,
            vec![series("running bpc", &|t| t.recent_bpc)],
        ),
        panel(
            "gradient norms before clipping",
            "norm",
            true,
            vec![series("W (recurrent)", &|t| t.grad_norm_w), series("V (readout)", &|t| t.grad_norm_v)],
        ),
        panel(
            "carried influence estimate",
            "Frobenius norm",
            true,
            vec![
                series("mean over streams", &|t| t.influence_norm_mean),
                series("max", &|t| t.influence_norm_max),
            ],
        ),
        panel(
            "growth of the exact state Jacobians (above 0: the true influence explodes)",
            "ln |H v| per step",
            false,
            vec![
                signed_series("mean over streams", &|t| t.tangent_growth_mean),
                signed_series("max", &|t| t.tangent_growth_max),
            ],
        ),
    ];
    line_chart(path, &panels).map_err(|e| e.to_string())
}
