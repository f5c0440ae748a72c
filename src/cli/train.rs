//! `kfrtrl train`: online training on a corpus file (or the bundled sample), with a progress bar
//! on stderr and, with `--json`, one final JSON object on stdout.

use std::path::PathBuf;

use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};

use kfrtrl::core::{CellKind, ModelConfig, OptimizerKind};
use kfrtrl::corpus::{Format, tokenize_train, tokenize_with};
use kfrtrl::model_file::{Counters, ModelFile, save};
use kfrtrl::train::{TrainConfig, train};

use super::bench::parse_learner;

/// The bundled sample: the first 40,000 bytes of Tiny Shakespeare (public domain).
const SAMPLE: &[u8] = include_bytes!("../../assets/sample.txt");

/// Flags of `kfrtrl train`.
#[derive(Debug, Args)]
pub struct TrainArgs {
    /// Training corpus (default: the bundled Tiny Shakespeare sample).
    #[arg(long)]
    corpus: Option<PathBuf>,
    /// Corpus format: bytes or ptb-char.
    #[arg(long, default_value = "bytes", value_parser = parse_format)]
    format: Format,
    /// Held-out corpus, evaluated after training (and every --eval-every symbols).
    #[arg(long)]
    eval: Option<PathBuf>,
    /// Evaluate every this many training symbols.
    #[arg(long)]
    eval_every: Option<u64>,
    /// Cell: tanh, rhn, lstm.
    #[arg(long, default_value = "rhn", value_parser = super::bench::parse_cell)]
    cell: CellKind,
    /// Hidden units.
    #[arg(long, default_value_t = 128)]
    hidden: usize,
    /// Learner: kf-rtrl, uoro, rtrl, tbptt:K, frozen.
    #[arg(long, default_value = "kf-rtrl")]
    learner: String,
    /// Optimizer: adam or sgd.
    #[arg(long, default_value = "adam", value_parser = super::bench::parse_optimizer)]
    optimizer: OptimizerKind,
    /// Parallel streams reading the corpus from evenly spaced offsets.
    #[arg(long, default_value_t = 8)]
    batch: usize,
    /// Learning rate (default 10^-3.5).
    #[arg(long)]
    lr: Option<f64>,
    /// Global-norm gradient clip (0 disables).
    #[arg(long, default_value_t = 1.0)]
    clip: f64,
    /// Seed of the weights and the random signs.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Training symbols (all streams together).
    #[arg(long, conflicts_with = "epochs")]
    symbols: Option<u64>,
    /// Passes over the corpus (default 1).
    #[arg(long)]
    epochs: Option<f64>,
    /// Zero each stream's state every N of its symbols.
    #[arg(long)]
    reset_every: Option<u64>,
    /// Print one JSON object on stdout at the end.
    #[arg(long)]
    json: bool,
    /// Write the trained model (weights, optimizer state, config, counters) to this file, in the
    /// format of the server's checkpoints (safetensors with JSON metadata).
    #[arg(long)]
    save: Option<PathBuf>,
}

fn parse_format(s: &str) -> Result<Format, String> {
    Format::parse(s).ok_or_else(|| format!("unknown format {s:?} (bytes, ptb-char)"))
}

pub fn run(args: TrainArgs) -> Result<(), String> {
    let data = match &args.corpus {
        Some(p) => std::fs::read(p).map_err(|e| format!("{}: {e}", p.display()))?,
        None => SAMPLE.to_vec(),
    };
    let (tokens, vocab) = tokenize_train(&data, args.format).map_err(|e| e.to_string())?;
    let eval = match &args.eval {
        Some(p) => {
            let d = std::fs::read(p).map_err(|e| format!("{}: {e}", p.display()))?;
            Some(tokenize_with(&d, args.format, &vocab).map_err(|e| format!("{}: {e}", p.display()))?)
        }
        None => None,
    };
    let (learner, window) = parse_learner(&args.learner)?;
    let model = ModelConfig {
        vocab_size: vocab.size,
        cell: args.cell,
        hidden: args.hidden,
        learner,
        tbptt_window: window.unwrap_or(25),
        optimizer: args.optimizer,
        lr: args.lr.unwrap_or(kfrtrl::core::model::DEFAULT_LR),
        clip: args.clip,
        seed: args.seed,
        ..ModelConfig::default()
    };
    model.check().map_err(|e| e.to_string())?;
    let batch = args.batch.max(1) as u64;
    let symbols = match (args.symbols, args.epochs) {
        (Some(s), _) => s,
        (None, Some(e)) if e.is_finite() && e > 0.0 => (e * tokens.len() as f64).round() as u64,
        (None, Some(_)) => return Err("--epochs must be a positive number".into()),
        (None, None) => tokens.len() as u64,
    };
    let steps = symbols.div_ceil(batch).max(1);
    let cfg = TrainConfig {
        model,
        batch: batch as usize,
        steps,
        reset_every: args.reset_every,
        eval_every: args.eval_every,
    };
    let bar = ProgressBar::new(steps * batch);
    bar.set_style(
        ProgressStyle::with_template("{bar:40} {pos}/{len} symbols  {per_sec}  ETA {eta}  {msg}")
            .map_err(|e| e.to_string())?,
    );
    let (report, params, opt) = train(&cfg, &tokens, eval.as_deref(), |p| {
        // One line per evaluation, also when stderr is not a terminal (the bar is then hidden),
        // so that a long run that is stopped early has still reported its curve.
        if let Some(e) = p.eval {
            bar.suspend(|| {
                eprintln!(
                    "eval at {} symbols: {:.4} bpc (running train bpc {:.4})",
                    e.symbols, e.bpc, p.recent_bpc
                )
            });
        }
        if p.symbols % (1024 * batch) < batch || p.symbols == p.total {
            bar.set_position(p.symbols);
            bar.set_message(format!("running bpc {:.3}", p.recent_bpc));
        }
    })
    .map_err(|e| e.to_string())?;
    bar.finish_and_clear();
    if let Some(path) = &args.save {
        let mut metadata = serde_json::Map::new();
        let format = match args.format {
            Format::Bytes => "bytes",
            Format::PtbChar => "ptb-char",
        };
        metadata.insert("corpus_format".into(), format.into());
        if !vocab.symbols.is_empty() {
            metadata.insert("symbols".into(), vocab.symbols.clone().into());
        }
        metadata.insert("learner".into(), args.learner.clone().into());
        metadata.insert("batch".into(), report.batch.into());
        metadata.insert("train_bpc".into(), report.train_bpc.into());
        if let Some(e) = report.eval_bpc {
            metadata.insert("eval_bpc".into(), e.into());
        }
        let file = ModelFile {
            config: cfg.model.clone(),
            params,
            optimizer: opt,
            counters: Counters {
                steps: cfg.steps,
                symbols: report.symbols,
                nonfinite_updates: report.nonfinite_updates,
            },
            metadata,
            extra: Vec::new(),
        };
        save(path, &file).map_err(|e| e.to_string())?;
    }
    if args.json {
        println!("{}", serde_json::to_string(&report).map_err(|e| e.to_string())?);
    } else {
        println!(
            "{} {} n={} B={}: {} symbols, train {:.4} bpc (last 10%: {:.4}){}, {:.0} symbols/s, {:.1} s",
            report.learner,
            report.cell,
            report.hidden,
            report.batch,
            report.symbols,
            report.train_bpc,
            report.train_bpc_final,
            report.eval_bpc.map(|e| format!(", eval {e:.4} bpc")).unwrap_or_default(),
            report.symbols_per_sec,
            report.seconds
        );
    }
    Ok(())
}
