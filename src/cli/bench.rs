//! `kfrtrl bench`: prints one line (table row or JSON object) per configuration.

use clap::Args;

use kfrtrl::core::model::{ClipScope, UpdateUnit};
use kfrtrl::core::{CellKind, LearnerKind, ModelConfig, OptimizerKind};
use kfrtrl::tools::bench::{BenchConfig, memory, run as run_bench, run_steps};

/// Flags of `kfrtrl bench`; every list flag takes comma-separated values.
#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Cells: tanh, rhn, lstm.
    #[arg(long, value_delimiter = ',', default_value = "tanh", value_parser = parse_cell)]
    cell: Vec<CellKind>,
    /// Hidden sizes.
    #[arg(long, value_delimiter = ',', default_value = "64,128,256")]
    hidden: Vec<usize>,
    /// Streams stepped together.
    #[arg(long, value_delimiter = ',', default_value = "1,32")]
    batch: Vec<usize>,
    /// Learners: kf-rtrl, uoro, rtrl, tbptt[:K], frozen.
    #[arg(long, value_delimiter = ',', default_value = "kf-rtrl")]
    learner: Vec<String>,
    /// Optimizer: sgd (as the peer benchmarks) or adam (the service default).
    #[arg(long, default_value = "sgd", value_parser = parse_optimizer)]
    optimizer: OptimizerKind,
    /// Vocabulary size.
    #[arg(long, default_value_t = 256)]
    vocab: usize,
    /// Repetitions per configuration (the median is reported).
    #[arg(long, default_value_t = 5)]
    reps: usize,
    /// Seconds per repetition.
    #[arg(long, default_value_t = 1.0)]
    seconds: f64,
    /// Threads for the GEMM and per-stream work (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
    /// One JSON object per configuration on stdout.
    #[arg(long)]
    json: bool,
    /// Run exactly this many steps per configuration and report nothing timed (for instruction
    /// counts: `valgrind --tool=callgrind kfrtrl bench --steps 20 ...`).
    #[arg(long, conflicts_with = "memory")]
    steps: Option<usize>,
    /// Measure resident memory per stream instead of speed: `--batch` is the number of streams
    /// of the set, compared with the size of one stream's exported state.
    #[arg(long)]
    memory: bool,
}

pub fn parse_cell(s: &str) -> Result<CellKind, String> {
    CellKind::parse(s).ok_or_else(|| format!("unknown cell {s:?} (tanh, rhn, lstm)"))
}

pub fn parse_optimizer(s: &str) -> Result<OptimizerKind, String> {
    OptimizerKind::parse(s).ok_or_else(|| format!("unknown optimizer {s:?} (adam, sgd)"))
}

/// A learner as the command line names it: the kind and, for `tbptt:K` and `ok:R`, its number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LearnerArg {
    /// The learner.
    pub kind: LearnerKind,
    /// TBPTT's window or OK's rank, when given.
    pub param: Option<usize>,
}

impl LearnerArg {
    /// `base` with this learner (its window or rank replaced when given).
    pub fn apply(self, base: ModelConfig) -> ModelConfig {
        let mut c = ModelConfig { learner: self.kind, ..base };
        match (self.kind, self.param) {
            (LearnerKind::Tbptt, Some(k)) => c.tbptt_window = k,
            (LearnerKind::Ok, Some(r)) => c.ok_rank = r,
            _ => {}
        }
        c
    }
}

/// Parses `kf-rtrl`, `ok`, `ok:R`, `uoro`, `rtrl`, `frozen`, `tbptt` or `tbptt:K`.
pub fn parse_learner(s: &str) -> Result<LearnerArg, String> {
    for (prefix, kind, what) in [("tbptt:", LearnerKind::Tbptt, "window"), ("ok:", LearnerKind::Ok, "rank")] {
        if let Some(k) = s.strip_prefix(prefix) {
            let k: usize = k.parse().map_err(|_| format!("bad {what} in {s:?}"))?;
            return Ok(LearnerArg { kind, param: Some(k) });
        }
    }
    LearnerKind::parse(s)
        .map(|kind| LearnerArg { kind, param: None })
        .ok_or_else(|| format!("unknown learner {s:?} (kf-rtrl, ok:R, uoro, rtrl, tbptt:K, frozen)"))
}

/// Parses a clip scope.
pub fn parse_clip_scope(s: &str) -> Result<ClipScope, String> {
    ClipScope::parse(s).ok_or_else(|| format!("unknown clip scope {s:?} (recurrent, per-group, global)"))
}

/// Parses an update unit (`steps`, `tokens`).
pub fn parse_update_unit(s: &str) -> Result<UpdateUnit, String> {
    UpdateUnit::parse(s).ok_or_else(|| format!("unknown update unit {s:?} (steps, tokens)"))
}

/// Parses `on`/`off` (also `true`/`false`).
pub fn parse_switch(s: &str) -> Result<bool, String> {
    match s {
        "on" | "true" => Ok(true),
        "off" | "false" => Ok(false),
        _ => Err(format!("expected on or off, got {s:?}")),
    }
}

/// Most repetitions of one configuration.
const MAX_REPS: usize = 10_000;

pub fn run(args: BenchArgs) -> Result<(), String> {
    if args.batch.contains(&0) {
        return Err("--batch values must be at least 1".into());
    }
    // Refused here, as `load` does: the calibration turns it into a `Duration`, which panics on
    // a negative, non-finite or huge value.
    if !(args.seconds > 0.0 && args.seconds < 1e9) {
        return Err(format!("--seconds must be positive and below 10^9 (got {})", args.seconds));
    }
    // Zero ran one repetition anyway; a huge count reserved its rates up front and aborted.
    if !(1..=MAX_REPS).contains(&args.reps) {
        return Err(format!("--reps must be between 1 and {MAX_REPS} (got {})", args.reps));
    }
    if let Some(t) = args.threads {
        rayon::ThreadPoolBuilder::new().num_threads(t).build_global().map_err(|e| e.to_string())?;
    }
    if !args.json && !args.memory && args.steps.is_none() {
        println!(
            "{:<5} {:<8} {:>6} {:>5} {:>12} {:>12} {:>12} {:>8} {:>8} {:>6}",
            "cell", "learner", "hidden", "batch", "tokens/s", "min", "max", "GFLOP/s", "peak", "%peak"
        );
    }
    for &cell in &args.cell {
        for learner in &args.learner {
            let learner = parse_learner(learner)?;
            for &hidden in &args.hidden {
                for &batch in &args.batch {
                    let model = learner.apply(ModelConfig {
                        vocab_size: args.vocab,
                        cell,
                        hidden,
                        optimizer: args.optimizer,
                        ..ModelConfig::default()
                    });
                    if args.memory {
                        let r = memory(&model, batch)?;
                        if args.json {
                            println!("{}", serde_json::to_string(&r).map_err(|e| e.to_string())?);
                        } else {
                            println!(
                                "{} {} hidden {} streams {}: {:.0} resident bytes per stream ({:.0} with the set's own), state {} bytes, ratio {:.3} (spec claims {} bytes)",
                                r.cell,
                                r.learner,
                                r.hidden,
                                r.streams,
                                r.resident_bytes_per_stream,
                                r.resident_bytes_per_stream_with_set,
                                r.state_bytes,
                                r.ratio,
                                r.spec_stream_bytes
                            );
                        }
                        continue;
                    }
                    if let Some(steps) = args.steps {
                        let mean_loss = run_steps(&model, batch, steps).map_err(|e| e.to_string())?;
                        println!(
                            "{} {} hidden {hidden} batch {batch}: {steps} steps, mean loss {mean_loss} nats",
                            cell.name(),
                            model.learner_label()
                        );
                        continue;
                    }
                    let cfg = BenchConfig { model, batch, reps: args.reps, rep_seconds: args.seconds };
                    let r = run_bench(&cfg).map_err(|e| e.to_string())?;
                    if args.json {
                        println!("{}", serde_json::to_string(&r).map_err(|e| e.to_string())?);
                    } else {
                        println!(
                            "{:<5} {:<8} {:>6} {:>5} {:>12.0} {:>12.0} {:>12.0} {:>8.1} {:>8.1} {:>5.0}%",
                            r.cell,
                            r.learner,
                            r.hidden,
                            r.batch,
                            r.tokens_per_sec,
                            r.tokens_per_sec_min,
                            r.tokens_per_sec_max,
                            r.gflops,
                            r.peak_gflops,
                            100.0 * r.fraction_of_peak
                        );
                    }
                }
            }
        }
    }
    Ok(())
}
