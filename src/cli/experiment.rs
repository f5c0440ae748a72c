//! `kfrtrl experiment`: the paper's experiments (gradient variance, copy task).

use std::io::Write;
use std::path::PathBuf;

use clap::{Args, Subcommand};

use kfrtrl::core::{CellKind, ModelConfig, OptimizerKind};
use kfrtrl::tools::experiment::copy::{CopyConfig, CopyRun};

use super::bench::{parse_cell, parse_learner, parse_optimizer};
use super::train::parse_save_path;

/// Flags of `kfrtrl experiment`.
#[derive(Debug, Args)]
pub struct ExperimentArgs {
    #[command(subcommand)]
    which: Which,
}

#[derive(Debug, Subcommand)]
enum Which {
    /// Gradient noise: the relative variance of KF-RTRL's and UORO's estimates against exact
    /// RTRL, over time and hidden sizes (tanh RNN with fixed contracting random weights).
    Variance(VarianceArgs),
    /// The copy task with the KF-RTRL paper's curriculum: the length L reached against steps.
    Copy(CopyArgs),
    /// Draws several copy-task runs in one chart, from their `--json` reports or, for a run
    /// stopped early, from their progress logs (stderr).
    CopyPlot(CopyPlotArgs),
}

/// Flags of `kfrtrl experiment copy-plot`.
#[derive(Debug, Args)]
pub struct CopyPlotArgs {
    /// Output file (.svg or .png).
    #[arg(long, value_parser = parse_plot_path)]
    plot: PathBuf,
    /// Chart title.
    #[arg(long, default_value = "copy task: curriculum length L")]
    title: String,
    /// Runs: `--json` reports of `kfrtrl experiment copy`, or their stderr logs; `LABEL=FILE`
    /// sets the legend label.
    #[arg(required = true)]
    runs: Vec<String>,
}

/// The curve of a run from its JSON report or its progress log, with its label.
fn read_copy_curve(arg: &str) -> Result<(String, Vec<kfrtrl::tools::experiment::copy::CurvePoint>), String> {
    use kfrtrl::tools::experiment::copy::CurvePoint;
    let (label, file) = match arg.split_once('=') {
        Some((l, f)) => (Some(l.to_string()), f),
        None => (None, arg),
    };
    let text = std::fs::read_to_string(file).map_err(|e| format!("{file}: {e}"))?;
    if let Ok(v) = serde_json::from_str::<serde_json::Value>(text.trim()) {
        let curve: Vec<CurvePoint> = v["curve"]
            .as_array()
            .ok_or_else(|| format!("{file}: no curve in the JSON report"))?
            .iter()
            .filter_map(|p| {
                Some(CurvePoint { step: p["step"].as_u64()?, length: p["length"].as_u64()? as usize })
            })
            .collect();
        let label = label.unwrap_or_else(|| v["learner"].as_str().unwrap_or(file).to_string());
        return Ok((label, curve));
    }
    // Progress lines: "step <done>/<total>  L <level>  ...".
    let mut curve: Vec<CurvePoint> = Vec::new();
    for line in text.lines() {
        let mut w = line.split_whitespace();
        if w.next() != Some("step") {
            continue;
        }
        let step = w.next().and_then(|s| s.split('/').next()?.parse().ok());
        let level = (w.next() == Some("L")).then(|| w.next().and_then(|s| s.parse().ok())).flatten();
        if let (Some(step), Some(length)) = (step, level) {
            if curve.is_empty() {
                curve.push(CurvePoint { step: 0, length: 1 });
            }
            curve.push(CurvePoint { step, length });
        }
    }
    if curve.is_empty() {
        return Err(format!("{file}: neither a JSON report nor a progress log"));
    }
    Ok((label.unwrap_or_else(|| file.to_string()), curve))
}

fn copy_plot(a: CopyPlotArgs) -> Result<(), String> {
    use kfrtrl::tools::experiment::plot::{Panel, Series, line_chart};
    let mut series = Vec::new();
    for run in &a.runs {
        let (label, curve) = read_copy_curve(run)?;
        series.push(Series { label, points: copy_staircase(&curve) });
    }
    let panel = Panel {
        title: a.title.clone(),
        x_label: "steps".into(),
        y_label: "curriculum length L".into(),
        log_x: false,
        log_y: false,
        series,
        legend: Default::default(),
    };
    line_chart(&a.plot, &[panel]).map_err(|e| format!("{}: {e}", a.plot.display()))
}

/// Flags of `kfrtrl experiment variance`.
#[derive(Debug, Args)]
pub struct VarianceArgs {
    /// Cell: tanh, rhn, lstm.
    #[arg(long, default_value = "tanh", value_parser = parse_cell)]
    cell: CellKind,
    /// Estimators compared with exact RTRL (comma-separated): kf-rtrl, ok:R, uoro.
    #[arg(long, value_delimiter = ',', default_value = "kf-rtrl,uoro")]
    learner: Vec<String>,
    /// Hidden sizes (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "8,16,32,64")]
    hidden: Vec<usize>,
    /// Time steps T of each sequence.
    #[arg(long, default_value_t = 200)]
    steps: usize,
    /// Independent sign draws per estimator (slots of one stream set).
    #[arg(long, default_value_t = 500)]
    samples: usize,
    /// Independent input sequences (and weights) averaged over.
    #[arg(long, default_value_t = 4)]
    sequences: usize,
    /// Vocabulary of the random one-hot inputs.
    #[arg(long, default_value_t = 8)]
    vocab: usize,
    /// Measure every this many steps (and at 50 and --steps, the table's columns).
    #[arg(long, default_value_t = 10)]
    every: usize,
    /// Spectral norm of the recurrent block.
    #[arg(long, default_value_t = 0.9)]
    contraction: f64,
    /// A trained model (from `train --save`, or a server checkpoint) whose weights, cell, width
    /// and vocabulary replace the random contracting ones; needs --corpus.
    #[arg(long, requires = "corpus", conflicts_with_all = ["hidden", "vocab", "contraction", "cell"])]
    weights: Option<PathBuf>,
    /// With --weights: the corpus the sequences are cut from (at random offsets), read in the
    /// model's format and vocabulary.
    #[arg(long, requires = "weights")]
    corpus: Option<PathBuf>,
    /// Seed.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Print the table as JSON on stdout: {"rows": [{"learner","n","t","rel_var"}, ...]}.
    #[arg(long)]
    json: bool,
    /// Draw rel_var against t and against n to this file (.svg or .png).
    #[arg(long, value_parser = parse_plot_path)]
    plot: Option<PathBuf>,
}

fn variance(a: VarianceArgs) -> Result<(), String> {
    use kfrtrl::core::LearnerKind;
    use kfrtrl::tools::experiment::plot::{LegendAt, Panel, Series, line_chart};
    use kfrtrl::tools::experiment::variance::{Estimator, VarianceConfig, run_variance};
    if a.hidden.is_empty() || a.steps == 0 {
        return Err("--hidden and --steps must be non-empty and positive".into());
    }
    let mut estimators = Vec::new();
    for name in &a.learner {
        let l = parse_learner(name)?;
        if !matches!(l.kind, LearnerKind::KfRtrl | LearnerKind::Ok | LearnerKind::Uoro) {
            return Err(format!(
                "--learner {name}: the experiment compares kf-rtrl, ok:R and uoro with exact RTRL"
            ));
        }
        let rank = l.param.unwrap_or(kfrtrl::core::model::DEFAULT_OK_RANK);
        estimators.push(Estimator { learner: l.kind, rank });
    }
    // The table's middle column: measured whatever --every is (it was NaN unless --every
    // divided it).
    let t_mid = a.steps.min(50);
    let trained = match (&a.weights, &a.corpus) {
        (Some(path), Some(corpus)) => Some(trained_weights(path, corpus)?),
        _ => None,
    };
    let (cell, hidden) = match &trained {
        Some(t) => (t.config.cell, vec![t.config.hidden]),
        None => (a.cell, a.hidden.clone()),
    };
    let cfg = VarianceConfig {
        cell,
        estimators: estimators.clone(),
        hidden: hidden.clone(),
        steps: a.steps,
        samples: a.samples,
        sequences: a.sequences,
        vocab: a.vocab,
        every: a.every,
        also_at: vec![t_mid],
        contraction: a.contraction,
        seed: a.seed,
        trained,
        ..VarianceConfig::default()
    };
    let t0 = std::time::Instant::now();
    let report = run_variance(&cfg, |n, q| {
        eprintln!(
            "n={n}: sequence {}/{} done ({:.0} s)",
            q + 1,
            cfg.sequences.max(1),
            t0.elapsed().as_secs_f64()
        );
    })
    .map_err(|e| e.to_string())?;
    let labels: Vec<String> = estimators.iter().map(Estimator::label).collect();
    let learners: Vec<&str> = labels.iter().map(String::as_str).collect();
    let t_end = a.steps;
    if a.json {
        println!("{}", serde_json::to_string(&report).map_err(|e| e.to_string())?);
    } else {
        let weights = match &a.weights {
            Some(p) => format!("trained weights {}", p.display()),
            None => format!("random weights of spectral norm {}", a.contraction),
        };
        println!(
            "relative variance E‖ĝ − g‖²/‖g‖² of the {} cell ({weights}) at t = {t_mid} / {t_end}",
            cell.name()
        );
        print!("{:<5}", "n");
        for l in &learners {
            print!(" {:>21}", format!("{l}@{t_mid}/{t_end}"));
        }
        println!();
        for &n in &hidden {
            print!("{n:<5}");
            for l in &learners {
                let g = |t: usize| report.get(l, n, t).unwrap_or(f64::NAN);
                print!(" {:>21}", format!("{:.4}/{:.4}", g(t_mid), g(t_end)));
            }
            println!();
        }
        println!("{:.1} s", report.seconds);
    }
    // The report is out before the plot is drawn: a plot that cannot be written must not
    // cost a long run its results.
    if let Some(path) = &a.plot {
        let mut over_t = Vec::new();
        for &l in &learners {
            for &n in &hidden {
                let points = report
                    .rows
                    .iter()
                    .filter(|r| r.learner == l && r.n == n)
                    .map(|r| (r.t as f64, r.rel_var))
                    .collect();
                over_t.push(Series { label: format!("{l} n={n}"), points });
            }
        }
        let over_n = learners
            .iter()
            .map(|&l| Series {
                label: l.to_string(),
                points: hidden
                    .iter()
                    .filter_map(|&n| report.get(l, n, t_end).map(|v| (n as f64, v)))
                    .collect(),
            })
            .collect();
        line_chart(
            path,
            &[
                Panel {
                    title: "relative variance over time".into(),
                    x_label: "t".into(),
                    y_label: "E‖ĝ − g‖² / ‖g‖²".into(),
                    log_x: false,
                    log_y: true,
                    series: over_t,
                    legend: LegendAt::MiddleRight,
                },
                Panel {
                    title: format!("relative variance at t = {t_end}"),
                    x_label: "hidden units n".into(),
                    y_label: "E‖ĝ − g‖² / ‖g‖²".into(),
                    log_x: true,
                    log_y: true,
                    series: over_n,
                    legend: LegendAt::MiddleRight,
                },
            ],
        )
        .map_err(|e| format!("{}: {e}", path.display()))?;
    }
    Ok(())
}

/// Flags of `kfrtrl experiment copy`.
#[derive(Debug, Args)]
pub struct CopyArgs {
    /// Learner: kf-rtrl, uoro, rtrl, tbptt:K.
    #[arg(long, default_value = "kf-rtrl")]
    learner: String,
    /// Cell: tanh, rhn, lstm.
    #[arg(long, default_value = "rhn", value_parser = parse_cell)]
    cell: CellKind,
    /// Hidden units.
    #[arg(long, default_value_t = 128)]
    hidden: usize,
    /// Parallel (asynchronous) streams.
    #[arg(long, default_value_t = 16)]
    batch: usize,
    /// Time steps.
    #[arg(long, default_value_t = 2_000_000)]
    steps: u64,
    /// Seed of the weights, signs and sequences.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Learning rate (default 10^-3.5).
    #[arg(long)]
    lr: Option<f64>,
    /// Optimizer: adam or sgd.
    #[arg(long, default_value = "adam", value_parser = parse_optimizer)]
    optimizer: OptimizerKind,
    /// Gradient-norm clip (0 disables).
    #[arg(long, default_value_t = 1.0)]
    clip: f64,
    /// Which weights the clip measures: recurrent, per-group or global.
    #[arg(long, default_value = "recurrent", value_parser = super::bench::parse_clip_scope)]
    clip_scope: kfrtrl::core::model::ClipScope,
    /// KF-RTRL and OK: each token's gradient from the estimate before the last reduction (on/off).
    #[arg(long, default_value = "on", value_parser = super::bench::parse_switch)]
    gradient_before_reduction: bool,
    /// Print one JSON object on stdout at the end.
    #[arg(long)]
    json: bool,
    /// Draw L against steps to this file (.svg or .png).
    #[arg(long, value_parser = parse_plot_path)]
    plot: Option<PathBuf>,
    /// Print a progress line on stderr every this many steps (0: only level-ups).
    #[arg(long, default_value_t = 10_000)]
    log_every: u64,
    /// Write the run's state to this file (a model file) every --checkpoint-every steps and at
    /// the end, so that --resume can continue it.
    #[arg(long, value_name = "PATH", value_parser = parse_save_path)]
    checkpoint: Option<PathBuf>,
    /// Steps between two writes of --checkpoint.
    #[arg(long, default_value_t = 50_000, value_name = "STEPS")]
    checkpoint_every: u64,
    /// Continue the run saved in this file (written by --checkpoint; pass the flags the run was
    /// started with, --steps may be larger): it goes on bit for bit as if it had never stopped.
    #[arg(long, value_name = "PATH")]
    resume: Option<PathBuf>,
}

/// A plot's file name, refused at parsing unless its extension names a format
/// ([`PlotFormat::of`](kfrtrl::tools::experiment::plot::PlotFormat::of)) and its directory exists, so
/// that a long run does not fail only at its end.
fn parse_plot_path(s: &str) -> Result<PathBuf, String> {
    kfrtrl::tools::experiment::plot::PlotFormat::of(std::path::Path::new(s)).map_err(|e| e.to_string())?;
    parse_save_path(s)
}

/// Runs `kfrtrl experiment ...`.
pub fn run(args: ExperimentArgs) -> Result<(), String> {
    match args.which {
        Which::Copy(a) => copy(a),
        Which::CopyPlot(a) => copy_plot(a),
        Which::Variance(a) => variance(a),
    }
}

fn copy(a: CopyArgs) -> Result<(), String> {
    if a.batch == 0 {
        return Err("--batch must be at least 1".into());
    }
    // Zero steps reported a run (L = 1 at 0 steps/s) that never happened.
    if a.steps == 0 {
        return Err("--steps must be at least 1".into());
    }
    let learner = parse_learner(&a.learner)?;
    // Frozen weights never learn to copy: the run would only burn its steps at L = 1.
    if learner.kind == kfrtrl::core::LearnerKind::Frozen {
        return Err(
            "--learner frozen learns nothing; the copy task takes kf-rtrl, uoro, rtrl or tbptt:K".into()
        );
    }
    let model = learner.apply(ModelConfig {
        vocab_size: kfrtrl::tools::experiment::copy::VOCAB,
        cell: a.cell,
        hidden: a.hidden,
        optimizer: a.optimizer,
        lr: a.lr.unwrap_or(kfrtrl::core::model::DEFAULT_LR),
        clip: a.clip,
        clip_scope: a.clip_scope,
        gradient_before_reduction: a.gradient_before_reduction,
        seed: a.seed,
        ..ModelConfig::default()
    });
    if a.checkpoint.is_some() && a.checkpoint_every == 0 {
        return Err("--checkpoint-every must be at least 1".into());
    }
    let cfg = CopyConfig::new(model, a.batch, a.steps, a.seed);
    let mut run = match &a.resume {
        None => CopyRun::new(&cfg).map_err(|e| e.to_string())?,
        Some(path) => {
            let file = kfrtrl::engine::model_file::load(path).map_err(|e| e.to_string())?;
            let run = CopyRun::resume(&cfg, file).map_err(|e| format!("{}: {e}", path.display()))?;
            if run.step() > a.steps {
                return Err(format!(
                    "{}: the run is at step {}, past --steps {}",
                    path.display(),
                    run.step(),
                    a.steps
                ));
            }
            eprintln!("resuming at step {} from {}", run.step(), path.display());
            run
        }
    };
    let t0 = std::time::Instant::now();
    let log_every = a.log_every;
    // The run's end, not the end of the stretch to the next checkpoint (`p.total`).
    let total = a.steps;
    let progress = |p: kfrtrl::tools::experiment::copy::CopyProgress| {
        if p.level_up || (log_every > 0 && p.step.is_multiple_of(log_every)) || p.step == total {
            let mut e = std::io::stderr().lock();
            let _ = writeln!(
                e,
                "step {:>9}/{}  L {:>3}  ema {:.4} bits  {:.0} s{}",
                p.step,
                total,
                p.curriculum.level,
                p.curriculum.ema,
                t0.elapsed().as_secs_f64(),
                if p.level_up { "  level up" } else { "" }
            );
        }
    };
    match &a.checkpoint {
        None => run.run_to(a.steps, progress),
        Some(path) => loop {
            let next = run.step().saturating_add(a.checkpoint_every).min(a.steps);
            run.run_to(next, progress);
            let snapshot = run.snapshot()?;
            kfrtrl::engine::model_file::save(path, &snapshot).map_err(|e| e.to_string())?;
            if run.step() >= a.steps {
                break;
            }
        },
    }
    let report = run.report();
    if a.json {
        println!("{}", serde_json::to_string(&report).map_err(|e| e.to_string())?);
    } else {
        println!(
            "{} {} n={} B={}: {} steps, max L {}, final EMA {:.3} bits, {:.0} steps/s, {:.1} s",
            report.learner,
            report.cell,
            report.hidden,
            report.batch,
            report.steps,
            report.max_length,
            report.final_ema,
            report.steps_per_sec,
            report.seconds
        );
    }
    // The report is out before the plot is drawn: a plot that cannot be written must not
    // cost a long run its results.
    if let Some(path) = &a.plot {
        let title =
            format!("copy task: {} {} n={} B={}", report.learner, report.cell, report.hidden, report.batch);
        let series = vec![kfrtrl::tools::experiment::plot::Series {
            label: report.learner.clone(),
            points: copy_staircase(&report.curve),
        }];
        kfrtrl::tools::experiment::plot::line_chart(
            path,
            &[kfrtrl::tools::experiment::plot::Panel {
                title,
                x_label: "steps".into(),
                y_label: "curriculum length L".into(),
                log_x: false,
                log_y: false,
                series,
                legend: Default::default(),
            }],
        )
        .map_err(|e| format!("{}: {e}", path.display()))?;
    }
    Ok(())
}

/// The curve as a staircase (L holds until the next level-up).
pub fn copy_staircase(curve: &[kfrtrl::tools::experiment::copy::CurvePoint]) -> Vec<(f64, f64)> {
    let mut pts = Vec::with_capacity(curve.len() * 2);
    for (i, p) in curve.iter().enumerate() {
        if i > 0 {
            pts.push((p.step as f64, curve[i - 1].length as f64));
        }
        pts.push((p.step as f64, p.length as f64));
    }
    pts
}

/// A trained model's weights (in f64) and a corpus tokenized in its format and vocabulary.
fn trained_weights(
    path: &std::path::Path,
    corpus: &std::path::Path,
) -> Result<kfrtrl::tools::experiment::variance::TrainedWeights, String> {
    let file = kfrtrl::engine::model_file::load(path).map_err(|e| e.to_string())?;
    let (format, vocab) = super::train::saved_format_and_vocab(path, &file, None)?;
    let data = std::fs::read(corpus).map_err(|e| format!("{}: {e}", corpus.display()))?;
    let tokens = kfrtrl::tools::corpus::tokenize_with(&data, format, &vocab)
        .map_err(|e| format!("{}: {e}", corpus.display()))?;
    Ok(kfrtrl::tools::experiment::variance::TrainedWeights {
        config: file.config,
        params: file.params.cast::<f64>(),
        tokens,
    })
}
