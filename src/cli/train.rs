//! `kfrtrl train`: online training on a corpus file (or the bundled sample), from fresh weights
//! or a saved model (`--init`), with a progress bar on stderr and, with `--json`, one final JSON
//! object on stdout.

use std::path::PathBuf;

use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};

use kfrtrl::core::model::UpdateUnit;
use kfrtrl::core::{CellKind, ModelConfig, OptimizerKind, StreamSet};
use kfrtrl::engine::model_file::{Counters, ModelFile, load, save};
use kfrtrl::tools::corpus::{Format, Vocab, tokenize_train, tokenize_with};
use kfrtrl::tools::train::{Start, TrainConfig, streams_from_file, streams_to_file, train_checkpointed};

use super::bench::{LearnerArg, parse_learner, parse_update_unit};

/// The bundled sample: the first 40,000 bytes of Tiny Shakespeare (public domain).
const SAMPLE: &[u8] = include_bytes!("../../assets/sample.txt");

/// Flags of `kfrtrl train`.
#[derive(Debug, Args)]
pub struct TrainArgs {
    /// Training corpus (default: the bundled Tiny Shakespeare sample).
    #[arg(long)]
    corpus: Option<PathBuf>,
    /// Corpus format: bytes or ptb-char (default: bytes, or the --init model's).
    #[arg(long, value_parser = parse_format)]
    format: Option<Format>,
    /// Held-out corpus, evaluated after training (and every --eval-every symbols).
    #[arg(long)]
    eval: Option<PathBuf>,
    /// Evaluate every this many training symbols (needs --eval).
    #[arg(long, requires = "eval")]
    eval_every: Option<u64>,
    /// Continue training this saved model (from `--save`, or a byte-level server checkpoint):
    /// its weights, optimizer state, vocabulary, place in the corpus and streams' states. Its
    /// cell, size and seed are kept.
    #[arg(long, conflicts_with_all = ["cell", "hidden", "seed"])]
    init: Option<PathBuf>,
    /// Cell: tanh, rhn, lstm.
    #[arg(long, default_value = "rhn", value_parser = super::bench::parse_cell)]
    cell: CellKind,
    /// Hidden units.
    #[arg(long, default_value_t = 128)]
    hidden: usize,
    /// Learner: kf-rtrl, ok:R, uoro, rtrl, tbptt:K, frozen (default: the server's default
    /// model's, or the --init model's).
    #[arg(long)]
    learner: Option<String>,
    /// Optimizer: adam or sgd (default: adam, or the --init model's).
    #[arg(long, value_parser = super::bench::parse_optimizer)]
    optimizer: Option<OptimizerKind>,
    /// Parallel streams reading the corpus from evenly spaced offsets (default: 8, or the --init
    /// model's).
    #[arg(long)]
    batch: Option<usize>,
    /// Learning rate (default: 10^-2.5, or the --init model's).
    #[arg(long)]
    lr: Option<f64>,
    /// Gradient-norm clip, 0 disables (default: 1, or the --init model's).
    #[arg(long)]
    clip: Option<f64>,
    /// Which weights the clip measures: recurrent (W alone), per-group (W and V each), global
    /// (both together) (default: recurrent, or the --init model's).
    #[arg(long, value_parser = super::bench::parse_clip_scope)]
    clip_scope: Option<kfrtrl::core::model::ClipScope>,
    /// KF-RTRL and OK: take each token's gradient from the estimate before the last step's
    /// random reduction, on or off (default: on, or the --init model's).
    #[arg(long, value_parser = super::bench::parse_switch)]
    gradient_before_reduction: Option<bool>,
    /// KF-RTRL, OK, RTRL, UORO: multiply the carried influence by this factor every step, in (0, 1]
    /// (default 1: none; below 1 a biased remedy for influences that stop decaying).
    #[arg(long)]
    influence_decay: Option<f64>,
    /// KF-RTRL, OK, RTRL, UORO: the adaptive decay's margin ε in [0, 1], or `off` (default 0.01 for a
    /// fresh model, an --init model's own otherwise). Each stream measures the growth rate λ of
    /// its exact state Jacobians and multiplies its carried influence by exp(-max(0, λ + ε)):
    /// exact where the dynamics contract by more than ε, a biased remedy where the true influence
    /// would grow
    #[arg(long, value_parser = parse_margin)]
    influence_margin: Option<Margin>,
    /// Apply the optimizer, averaged, once the gradients accumulated since the last update cover
    /// this many steps or tokens (--update-unit; default 32 steps for a fresh model, reached by
    /// the ramp below, or the --init model's). The three count flags go together: giving any of
    /// them replaces the three, the others then being 1 per update, no ramp, a start at 1
    #[arg(long)]
    tokens_per_update: Option<usize>,
    /// Reach --tokens-per-update gradually: the n-th update waits for min(K, START + n / RAMP)
    /// (0: no ramp; default 600 for a fresh model, or the --init model's)
    #[arg(long)]
    tokens_per_update_ramp: Option<u64>,
    /// What the ramp's first update waits for, START (default 8 for a fresh model, or the
    /// --init model's)
    #[arg(long)]
    tokens_per_update_start: Option<usize>,
    /// What the three count: steps (a learning step of the B streams counts 1, so each stream sees an
    /// update every K of its tokens; the default for a fresh model) or tokens (a step counts its B
    /// learning streams); default the --init model's
    #[arg(long, value_parser = parse_update_unit)]
    update_unit: Option<UpdateUnit>,
    /// Seed of the weights and the random signs.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Training symbols (all streams together).
    #[arg(long, conflicts_with = "epochs")]
    symbols: Option<u64>,
    /// Passes over the corpus (default 1).
    #[arg(long)]
    epochs: Option<f64>,
    /// Zero each stream's state every N of its symbols; 0: never (default: never, or the --init
    /// model's).
    #[arg(long)]
    reset_every: Option<u64>,
    /// Record the stability diagnostics every N steps: the gradient norms, whether the step was
    /// clipped, the norm of every stream's carried influence estimate (a line on stderr each, and
    /// the report's `trace`).
    #[arg(long, value_name = "STEPS")]
    trace_every: Option<u64>,
    /// Draw the trace (running bpc, gradient norms, influence norms against symbols) to this
    /// file (.svg or .png); needs --trace-every.
    #[arg(long, requires = "trace_every", value_parser = parse_save_path)]
    trace_plot: Option<PathBuf>,
    /// Print one JSON object on stdout at the end.
    #[arg(long)]
    json: bool,
    /// Write the trained model (weights, optimizer state, config, counters, the streams' states)
    /// to this file, in the format of the server's checkpoints (safetensors with JSON metadata).
    #[arg(long, value_parser = parse_save_path)]
    save: Option<PathBuf>,
    /// Also write the --save file every this many steps (atomically), so that a long run stopped
    /// early continues bit for bit from its last checkpoint: `--init` that file with the same
    /// flags (less --cell, --hidden and --seed) and `--symbols` for the rest (the checkpoint's
    /// line on stderr counts every symbol the model has seen, earlier runs included).
    #[arg(long, value_name = "STEPS", requires = "save")]
    checkpoint_every: Option<u64>,
}

/// A file the command writes at its end (`train --save`, `experiment copy --checkpoint`, a
/// plot), refused at parsing when its directory does not exist or it names a directory, so that
/// a long run does not fail only at its end.
pub(super) fn parse_save_path(s: &str) -> Result<PathBuf, String> {
    let path = PathBuf::from(s);
    if path.file_name().is_none() || path.is_dir() {
        return Err(format!("{s} is not a file name"));
    }
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() && !dir.is_dir() => {
            Err(format!("the directory {} does not exist", dir.display()))
        }
        _ => Ok(path),
    }
}

/// `--influence-margin`: a margin, or `off`.
#[derive(Debug, Clone, Copy)]
struct Margin(Option<f64>);

fn parse_margin(s: &str) -> Result<Margin, String> {
    if s == "off" {
        return Ok(Margin(None));
    }
    s.parse::<f64>().map(|m| Margin(Some(m))).map_err(|_| format!("{s:?} is not a margin (a number, or off)"))
}

fn parse_format(s: &str) -> Result<Format, String> {
    Format::parse(s).ok_or_else(|| format!("unknown format {s:?} (bytes, ptb-char)"))
}

/// The model a run starts from: the flags' fresh model, or a saved one (`--init`).
struct Initial {
    /// The fresh model's config, or the saved one's (the flags that may change apply later).
    base: ModelConfig,
    format: Format,
    saved: Option<Saved>,
}

/// What `--init` brings beyond the config.
struct Saved {
    vocab: Vocab,
    start: Start,
    nonfinite_updates: u64,
    /// The run's batch and reset period, when its file records them (0: no reset).
    batch: Option<usize>,
    reset_every: Option<u64>,
}

/// Loads `--init` and checks that the model fits the corpus format (or builds the fresh model's
/// config from the flags).
fn initial(args: &TrainArgs) -> Result<Initial, String> {
    let Some(path) = &args.init else {
        return Ok(Initial {
            base: ModelConfig {
                cell: args.cell,
                hidden: args.hidden,
                seed: args.seed,
                ..ModelConfig::model_defaults(ModelConfig::default().learner)
            },
            format: args.format.unwrap_or(Format::Bytes),
            saved: None,
        });
    };
    let file = load(path).map_err(|e| e.to_string())?;
    let (format, vocab) = saved_format_and_vocab(path, &file, args.format)?;
    let streams = streams_from_file(&file).map_err(|e| format!("{}: {e}", path.display()))?;
    let from_server = file.metadata.contains_key("engine");
    if streams.is_none() && !from_server {
        eprintln!(
            "note: the --init model holds no streams' states (saved before they were); they start at zero"
        );
    }
    // A server checkpoint counts write-ahead-log records, not steps over this corpus: its run
    // here starts at the corpus's beginning.
    let steps = if from_server { 0 } else { file.counters.steps };
    Ok(Initial {
        base: file.config,
        format,
        saved: Some(Saved {
            vocab,
            start: Start {
                params: file.params,
                optimizer: file.optimizer,
                steps,
                symbols: file.counters.symbols,
                streams,
            },
            nonfinite_updates: file.counters.nonfinite_updates,
            batch: file.metadata.get("batch").and_then(serde_json::Value::as_u64).map(|b| b as usize),
            reset_every: file.metadata.get("reset_every").and_then(serde_json::Value::as_u64),
        }),
    })
}

/// The corpus format and vocabulary of a saved model (`asked`, if given, must agree with the
/// one it was trained on), checked against the model's vocabulary size.
pub(crate) fn saved_format_and_vocab(
    path: &std::path::Path,
    file: &ModelFile,
    asked: Option<Format>,
) -> Result<(Format, Vocab), String> {
    let saved_format =
        match file.metadata.get("corpus_format").and_then(|f| f.as_str()) {
            Some(name) => Some(Format::parse(name).ok_or_else(|| {
                format!("{}: unknown corpus format {name:?} in its metadata", path.display())
            })?),
            None => None,
        };
    let format = match (asked, saved_format) {
        (Some(asked), Some(saved)) if asked != saved => {
            return Err(format!(
                "{} was trained on the {} format, not {}",
                path.display(),
                saved.name(),
                asked.name()
            ));
        }
        (asked, saved) => asked.or(saved).unwrap_or(Format::Bytes),
    };
    let symbols =
        file.metadata.get("symbols").and_then(|s| serde_json::from_value::<Vec<String>>(s.clone()).ok());
    let vocab = match (format, symbols) {
        (Format::Bytes, _) => Vocab::bytes(),
        (Format::PtbChar, Some(symbols)) => {
            Vocab::from_symbols(symbols).map_err(|e| format!("{}: {e}", path.display()))?
        }
        (Format::PtbChar, None) => {
            return Err(format!("{}: its metadata lists no ptb-char symbols (\"symbols\")", path.display()));
        }
    };
    if vocab.size != file.config.vocab_size {
        return Err(format!(
            "{}: the model's vocabulary has {} symbols, the {} format {} (a model without a saved \
             symbol list, such as a server checkpoint's, can be continued on bytes only)",
            path.display(),
            file.config.vocab_size,
            format.name(),
            vocab.size
        ));
    }
    Ok((format, vocab))
}

pub fn run(args: TrainArgs) -> Result<(), String> {
    if args.batch == Some(0) {
        return Err("--batch must be at least 1".into());
    }
    let init = initial(&args)?;
    let data = match &args.corpus {
        Some(p) => std::fs::read(p).map_err(|e| format!("{}: {e}", p.display()))?,
        None => SAMPLE.to_vec(),
    };
    let corpus_name =
        || args.corpus.as_ref().map_or("the bundled sample".into(), |p| p.display().to_string());
    // A continued run keeps the saved run's batch and reset period unless told otherwise: with
    // other ones it is no longer the same run (and a KF-RTRL model trained with resets can
    // degrade quickly without them).
    let mut batch = args.batch;
    let mut reset_every = args.reset_every;
    let (tokens, vocab, saved) = match init.saved {
        Some(Saved { vocab, start, nonfinite_updates, batch: saved_batch, reset_every: saved_reset }) => {
            batch = batch.or(saved_batch);
            // A file of `kfrtrl train` from before the period was recorded (a server checkpoint
            // records no batch: its streams never reset periodically).
            if reset_every.is_none() && saved_reset.is_none() && saved_batch.is_some() {
                eprintln!(
                    "note: the --init model does not record its reset period; continuing without resets \
                     (give --reset-every N to reset)"
                );
            }
            reset_every = reset_every.or(saved_reset);
            let tokens =
                tokenize_with(&data, init.format, &vocab).map_err(|e| format!("{}: {e}", corpus_name()))?;
            (tokens, vocab, Some((start, nonfinite_updates)))
        }
        None => {
            let (tokens, vocab) =
                tokenize_train(&data, init.format).map_err(|e| format!("{}: {e}", corpus_name()))?;
            (tokens, vocab, None)
        }
    };
    let eval = match &args.eval {
        Some(p) => {
            let d = std::fs::read(p).map_err(|e| format!("{}: {e}", p.display()))?;
            Some(tokenize_with(&d, init.format, &vocab).map_err(|e| format!("{}: {e}", p.display()))?)
        }
        None => None,
    };
    let base = &init.base;
    let learner = match &args.learner {
        Some(name) => parse_learner(name)?,
        None => LearnerArg { kind: base.learner, param: None },
    };
    // The three settings of the update schedule go together (`UpdateSchedule::asked`).
    let inherited = base.update_schedule().inherited_by(base.learner, learner.kind);
    let schedule = inherited.asked(
        args.tokens_per_update,
        args.tokens_per_update_ramp,
        args.tokens_per_update_start,
        args.update_unit,
    );
    let model = learner.apply(ModelConfig {
        vocab_size: vocab.size,
        optimizer: args.optimizer.unwrap_or(base.optimizer),
        lr: args.lr.unwrap_or(base.lr),
        clip: args.clip.unwrap_or(base.clip),
        clip_scope: args.clip_scope.unwrap_or(base.clip_scope),
        gradient_before_reduction: args.gradient_before_reduction.unwrap_or(base.gradient_before_reduction),
        influence_decay: args.influence_decay.unwrap_or(base.influence_decay),
        // The default margin applies to the learners that carry an influence; asked for, it is
        // checked for any (and refused for the others).
        influence_margin: match args.influence_margin {
            Some(Margin(asked)) => asked,
            None if learner.kind.carries_influence() => base.influence_margin,
            None => None,
        },
        tokens_per_update: schedule.tokens_per_update,
        tokens_per_update_ramp: schedule.tokens_per_update_ramp,
        tokens_per_update_start: schedule.tokens_per_update_start,
        update_unit: schedule.unit,
        ..base.clone()
    });
    let spec = model.check().map_err(|e| e.to_string())?;
    let batch = match batch {
        Some(0) => return Err("the --init model records a batch of 0: give --batch".into()),
        b => b.unwrap_or(8) as u64,
    };
    let (start, earlier_nonfinite) = match saved {
        Some((mut start, nonfinite)) => {
            start.streams = start.streams.take().and_then(|s| streams_that_fit(&spec, batch as usize, s));
            if start.optimizer.kind() != model.optimizer {
                eprintln!(
                    "note: the optimizer changes from {} to {}; it starts afresh (and the update schedule's ramp with it)",
                    start.optimizer.kind().name(),
                    model.optimizer.name()
                );
            }
            (start, nonfinite)
        }
        None => (Start::fresh(&spec), 0),
    };
    let (start_steps, start_symbols) = (start.steps, start.symbols);
    let reset_every = reset_every.filter(|&n| n > 0);
    let symbols = match (args.symbols, args.epochs) {
        (Some(s), _) => s,
        (None, Some(e)) if e.is_finite() && e > 0.0 => {
            let symbols = (e * tokens.len() as f64).round();
            // `as` would saturate a count past u64 silently.
            if symbols >= u64::MAX as f64 {
                return Err(format!("--epochs {e} is more symbols than can be counted"));
            }
            symbols as u64
        }
        (None, Some(_)) => return Err("--epochs must be a positive number".into()),
        (None, None) => tokens.len() as u64,
    };
    let steps = symbols.div_ceil(batch).max(1);
    // Whole steps of every stream, counted from the --init model's symbols and steps: each sum
    // must fit, or the counters and the corpus position would wrap.
    let fits = steps
        .checked_mul(batch)
        .and_then(|total| total.checked_add(start_symbols))
        .and(start_steps.checked_add(steps))
        .is_some();
    if !fits {
        return Err(format!("{symbols} symbols in steps of {batch} streams are more than can be counted"));
    }
    if args.trace_every == Some(0) {
        return Err("--trace-every must be at least 1".into());
    }
    if args.checkpoint_every == Some(0) {
        return Err("--checkpoint-every must be at least 1".into());
    }
    let cfg = TrainConfig {
        model,
        batch: batch as usize,
        steps,
        reset_every,
        eval_every: args.eval_every,
        trace_every: args.trace_every,
        checkpoint_every: args.checkpoint_every,
    };
    let metadata = file_metadata(init.format, &vocab, &cfg);
    // The file a checkpoint or the end writes: the run's model, its counters after `steps` of
    // this run's steps, and its streams.
    let model_file = |params: &kfrtrl::core::Params<f32>,
                      opt: &kfrtrl::core::Optimizer<f32>,
                      set: &StreamSet<f32>,
                      steps: u64,
                      nonfinite: u64,
                      extra_metadata: &[(&str, f64)]|
     -> Result<ModelFile, String> {
        let mut metadata = metadata.clone();
        for (key, value) in extra_metadata {
            metadata.insert((*key).into(), (*value).into());
        }
        let extra = streams_to_file(set, &mut metadata)?;
        Ok(ModelFile {
            config: cfg.model.clone(),
            params: params.clone(),
            optimizer: opt.clone(),
            counters: Counters {
                steps: start_steps + steps,
                symbols: start_symbols + steps * batch,
                nonfinite_updates: earlier_nonfinite + nonfinite,
            },
            metadata,
            extra,
        })
    };
    let bar = ProgressBar::new(steps * batch);
    bar.set_style(
        ProgressStyle::with_template("{bar:40} {pos}/{len} symbols  {per_sec}  ETA {eta}  {msg}")
            .map_err(|e| e.to_string())?,
    );
    let checkpoint = |c: kfrtrl::tools::train::Checkpoint<'_>| {
        let Some(path) = &args.save else { return };
        // A checkpoint that cannot be written costs the run nothing but that checkpoint.
        let written = model_file(c.params, c.optimizer, c.streams, c.steps, c.nonfinite_updates, &[])
            .and_then(|file| save(path, &file).map_err(|e| e.to_string()));
        let symbols = start_symbols + c.steps * batch;
        bar.suspend(|| match written {
            Ok(()) => eprintln!("checkpoint at {symbols} symbols: {}", path.display()),
            Err(e) => eprintln!("warning: checkpoint at {symbols} symbols not written: {e}"),
        });
    };
    let trained = train_checkpointed(&cfg, start, &tokens, eval.as_deref(), |p| {
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
        if let Some(t) = p.trace {
            bar.suspend(|| {
                eprintln!(
                    "trace at {} symbols: running bpc {:.4}, |grad W| {:.4e}, |grad V| {:.4e}{}, |G| mean {:.4e} max {:.4e}, ln|H v| per step mean {:+.5} max {:+.5}",
                    t.symbols,
                    t.recent_bpc,
                    t.grad_norm_w,
                    t.grad_norm_v,
                    if t.clipped { " (clipped)" } else { "" },
                    t.influence_norm_mean,
                    t.influence_norm_max,
                    t.tangent_growth_mean,
                    t.tangent_growth_max
                )
            });
        }
        if p.symbols % (1024 * batch) < batch || p.symbols == p.total {
            bar.set_position(p.symbols);
            bar.set_message(format!("running bpc {:.3}", p.recent_bpc));
        }
    }, checkpoint)
    .map_err(|e| e.to_string())?;
    bar.finish_and_clear();
    let kfrtrl::tools::train::Trained { report, params, optimizer: opt, streams: set } = trained;
    // The report is out before the model is saved: a file that cannot be written must not
    // cost a long run its results.
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
    if let Some(path) = &args.trace_plot {
        kfrtrl::tools::train::plot_trace(path, &report).map_err(|e| format!("{}: {e}", path.display()))?;
    }
    if let Some(path) = &args.save {
        let mut scores = vec![("train_bpc", report.train_bpc)];
        scores.extend(report.eval_bpc.map(|e| ("eval_bpc", e)));
        let file = model_file(&params, &opt, &set, cfg.steps, report.nonfinite_updates, &scores)?;
        save(path, &file).map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// What a saved run records beside its model: the corpus format and symbols, the learner, the
/// batch and the reset period (0: none).
fn file_metadata(
    format: Format,
    vocab: &Vocab,
    cfg: &TrainConfig,
) -> serde_json::Map<String, serde_json::Value> {
    let mut metadata = serde_json::Map::new();
    metadata.insert("corpus_format".into(), format.name().into());
    if !vocab.symbols.is_empty() {
        metadata.insert("symbols".into(), vocab.symbols.clone().into());
    }
    metadata.insert("learner".into(), cfg.model.learner_label().into());
    metadata.insert("batch".into(), cfg.batch.into());
    metadata.insert("reset_every".into(), cfg.reset_every.unwrap_or(0).into());
    metadata
}

/// The saved streams, if this run can continue them: one per stream of `batch`, each fitting the
/// run's model (its learner may have changed). Otherwise the streams start at zero, with a note.
fn streams_that_fit(
    spec: &kfrtrl::core::ModelSpec,
    batch: usize,
    streams: Vec<kfrtrl::core::SlotState<f32>>,
) -> Option<Vec<kfrtrl::core::SlotState<f32>>> {
    let why_not = if streams.len() != batch {
        Some(format!("it saved {} streams, this run has {batch}", streams.len()))
    } else {
        let mut probe = StreamSet::<f32>::new(spec, 1);
        streams.iter().find_map(|s| probe.import_slot(0, s).err().map(|e| format!("{e}")))
    };
    match why_not {
        None => Some(streams),
        Some(reason) => {
            eprintln!("note: the --init model's streams are not continued ({reason}); they start at zero");
            None
        }
    }
}
