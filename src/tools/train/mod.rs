//! Online training on a corpus (`kfrtrl train`): `B` streams read the text from evenly spaced
//! offsets, every step scores each stream's next symbol before learning from it (prequential
//! loss) and updates the weights, and evaluation passes run with the weights frozen. A run can
//! continue a saved model ([`train_from`]): its weights, optimizer and place in the corpus, and
//! its streams' states when the file holds them ([`streams_to_file`]), so that a long run saved
//! every so often ([`train_checkpointed`]) resumes bit for bit where it stopped.

use std::time::Instant;

use serde::Serialize;

use crate::core::model::ConfigError;
use crate::core::probe::TangentProbe;
use crate::core::{ModelConfig, ModelSpec, Optimizer, Params, SlotState, SlotStep, StreamSet};

mod plot;
mod snapshot;

pub use plot::plot_trace;
pub use snapshot::{Checkpoint, STREAMS_ENTRY, streams_from_file, streams_to_file};

/// What to train and for how long.
#[derive(Debug, Clone)]
pub struct TrainConfig {
    /// The model.
    pub model: ModelConfig,
    /// Parallel streams.
    pub batch: usize,
    /// Steps to run (each consumes one symbol per stream).
    pub steps: u64,
    /// Zero every stream's state whenever its position is a multiple of this (the paper's PTB
    /// runs: 100).
    pub reset_every: Option<u64>,
    /// Evaluate on the held-out corpus every this many symbols (all streams counted).
    pub eval_every: Option<u64>,
    /// Record a [`TracePoint`] every this many steps (diagnostics of a long run's stability).
    pub trace_every: Option<u64>,
    /// Hand the run's state to the checkpoint callback every this many steps, the last step
    /// excepted ([`train_checkpointed`]).
    pub checkpoint_every: Option<u64>,
}

/// The state of a run at one step: what grows when an online learner degrades.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct TracePoint {
    /// Symbols consumed by this run.
    pub symbols: u64,
    /// Running prequential bits per symbol (recent symbols).
    pub recent_bpc: f64,
    /// Norm of the step's averaged `W` gradient estimate, before clipping.
    pub grad_norm_w: f64,
    /// Norm of the step's averaged readout gradient, before clipping.
    pub grad_norm_v: f64,
    /// Whether the step's update was clipped.
    pub clipped: bool,
    /// Mean over the streams of the carried influence estimate's norm `‖Ĝ‖` (0 for TBPTT).
    pub influence_norm_mean: f64,
    /// Largest such norm.
    pub influence_norm_max: f64,
    /// Mean over the streams of the exact state Jacobians' log growth per step since the last
    /// point ([`crate::core::probe::TangentProbe`]): above zero, the true influence grows.
    pub tangent_growth_mean: f64,
    /// Largest stream's such rate.
    pub tangent_growth_max: f64,
}

/// One evaluation during training.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct EvalPoint {
    /// Training symbols the model had consumed when it was taken (earlier runs included).
    pub symbols: u64,
    /// Held-out bits per symbol.
    pub bpc: f64,
}

/// The outcome of a training run.
#[derive(Debug, Clone, Serialize)]
pub struct TrainReport {
    /// Learner name.
    pub learner: String,
    /// Cell name.
    pub cell: String,
    /// Hidden units.
    pub hidden: usize,
    /// Streams.
    pub batch: usize,
    /// Vocabulary size.
    pub vocab: usize,
    /// Training symbols consumed by this run.
    pub symbols: u64,
    /// Training symbols the model had consumed before this run (0 for a fresh model).
    pub start_symbols: u64,
    /// Prequential bits per symbol over the whole run.
    pub train_bpc: f64,
    /// Prequential bits per symbol over the last 10% of the run's steps (at least its last step).
    pub train_bpc_final: f64,
    /// Held-out bits per symbol after training (weights frozen, one pass, no reset).
    pub eval_bpc: Option<f64>,
    /// Evaluations during training.
    pub evals: Vec<EvalPoint>,
    /// Diagnostics every `trace_every` steps (empty without).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub trace: Vec<TracePoint>,
    /// Optimizer updates skipped because the gradient was not finite.
    pub nonfinite_updates: u64,
    /// Training throughput.
    pub symbols_per_sec: f64,
    /// Wall time of training (evaluations and checkpoints excluded).
    pub seconds: f64,
}

/// What a run ends with.
#[derive(Debug)]
pub struct Trained {
    /// The report.
    pub report: TrainReport,
    /// The weights.
    pub params: Params<f32>,
    /// The optimizer, with any gradients summed and not yet applied.
    pub optimizer: Optimizer<f32>,
    /// The streams where they stopped.
    pub streams: StreamSet<f32>,
}

/// Where a run starts: fresh weights, or a saved model's.
#[derive(Debug, Clone)]
pub struct Start {
    /// The weights.
    pub params: Params<f32>,
    /// The optimizer. Its update count and moments carry over when its kind is the run's; its
    /// rate and clip are always the run's.
    pub optimizer: Optimizer<f32>,
    /// Steps already taken: the streams read on from there, the periodic resets keep their
    /// phase and the random signs their counters.
    pub steps: u64,
    /// Symbols already consumed (the scale of the evaluation points).
    pub symbols: u64,
    /// The streams' states where the earlier run stopped (one per stream, slot order): with them
    /// the run continues bit for bit. Without them the streams start at zero, so that an online
    /// learner (KF-RTRL, OK, UORO, RTRL) continues exactly only at a multiple of the reset
    /// period, and TBPTT loses the losses of its last unfinished window.
    pub streams: Option<Vec<SlotState<f32>>>,
}

impl Start {
    /// Freshly initialised weights and optimizer.
    pub fn fresh(spec: &ModelSpec) -> Self {
        Self {
            params: Params::init(spec),
            optimizer: Optimizer::new(spec),
            steps: 0,
            symbols: 0,
            streams: None,
        }
    }
}

/// Progress of a run, reported after every step.
#[derive(Debug, Clone, Copy)]
pub struct Progress {
    /// Symbols consumed by this run.
    pub symbols: u64,
    /// Planned symbols.
    pub total: u64,
    /// Running prequential bits per symbol (recent symbols).
    pub recent_bpc: f64,
    /// The evaluation taken at this step, if one was due.
    pub eval: Option<EvalPoint>,
    /// The trace point recorded at this step, if one was due.
    pub trace: Option<TracePoint>,
}

/// Mean bits per symbol of `tokens` under frozen weights: one sequential pass from a zero state.
pub fn evaluate(spec: &ModelSpec, params: &Params<f32>, tokens: &[u32]) -> f64 {
    let frozen = spec.config.frozen().check().expect("a checked config stays valid when frozen");
    let mut set = StreamSet::<f32>::new(&frozen, 1);
    let mut loss = [0.0];
    let mut sum = 0.0;
    for &t in tokens {
        let input = [SlotStep { slot: 0, token: t, learn: false, reset: false }];
        set.score(params, &input, &mut loss).expect("tokens are in the vocabulary");
        set.advance(params, &input).expect("tokens are in the vocabulary");
        sum += loss[0];
    }
    sum / tokens.len() as f64 / std::f64::consts::LN_2
}

/// Trains a fresh model online on `train`, optionally evaluating on `eval`. Returns the report,
/// the weights and the optimizer.
pub fn train(
    cfg: &TrainConfig,
    train: &[u32],
    eval: Option<&[u32]>,
    on_progress: impl FnMut(Progress) + Send,
) -> Result<(TrainReport, Params<f32>, Optimizer<f32>), ConfigError> {
    let spec = cfg.model.check()?;
    train_from(cfg, Start::fresh(&spec), train, eval, on_progress)
}

/// Trains online from `start` (whose weights must fit `cfg.model`), for `cfg.steps` more steps.
pub fn train_from(
    cfg: &TrainConfig,
    start: Start,
    train: &[u32],
    eval: Option<&[u32]>,
    on_progress: impl FnMut(Progress) + Send,
) -> Result<(TrainReport, Params<f32>, Optimizer<f32>), ConfigError> {
    train_checkpointed(cfg, start, train, eval, on_progress, |_| {})
        .map(|t| (t.report, t.params, t.optimizer))
}

/// [`train_from`], handing the run's state to `on_checkpoint` every `cfg.checkpoint_every`
/// steps; also returns the streams at the end.
pub fn train_checkpointed(
    cfg: &TrainConfig,
    start: Start,
    train: &[u32],
    eval: Option<&[u32]>,
    on_progress: impl FnMut(Progress) + Send,
    on_checkpoint: impl FnMut(Checkpoint<'_>) + Send,
) -> Result<Trained, ConfigError> {
    train_evaluated_by(cfg, start, train, eval, on_progress, on_checkpoint, evaluate)
}

/// [`train_checkpointed`] with the evaluation pass given, so that a test can count the passes.
fn train_evaluated_by(
    cfg: &TrainConfig,
    start: Start,
    train: &[u32],
    eval: Option<&[u32]>,
    mut on_progress: impl FnMut(Progress) + Send,
    mut on_checkpoint: impl FnMut(Checkpoint<'_>) + Send,
    mut evaluate: impl FnMut(&ModelSpec, &Params<f32>, &[u32]) -> f64 + Send,
) -> Result<Trained, ConfigError> {
    let spec = cfg.model.check()?;
    assert!(!train.is_empty(), "empty training corpus");
    let b = cfg.batch.max(1);
    let Start { mut params, mut optimizer, steps: first, symbols: start_symbols, streams } = start;
    let too_long = || ConfigError {
        field: "steps",
        reason: format!(
            "{} steps of {b} streams after {first} steps overflow the step or symbol count",
            cfg.steps
        ),
    };
    let total = cfg.steps.checked_mul(b as u64).ok_or_else(too_long)?;
    if total.checked_add(start_symbols).is_none() || first.checked_add(cfg.steps).is_none() {
        return Err(too_long());
    }
    let shapes = Params::<f32>::zeros(&spec);
    assert!(
        params.w.dim() == shapes.w.dim() && params.v.dim() == shapes.v.dim(),
        "the starting weights do not fit the model"
    );
    // The gradients a saved run had summed but not applied continue with it when the run keeps
    // its optimizer and its update schedule (then two runs split anywhere make one); otherwise
    // they are dropped.
    let pending = optimizer.pending.take();
    let kept_optimizer = optimizer.kind() == spec.config.optimizer;
    let mut opt = if kept_optimizer {
        Optimizer::restore(&spec, optimizer.steps, optimizer.m.zip(optimizer.v))
            .expect("the starting optimizer's moments fit the model")
    } else {
        Optimizer::new(&spec)
    };
    let schedule = spec.config.update_schedule();
    if let Some(p) = pending.filter(|p| kept_optimizer && p.schedule == schedule) {
        opt.restore_pending(p.sum, p.count).expect("a saved pending sum fits its model");
    }
    let mut set = StreamSet::<f32>::new(&spec, b);
    match streams {
        Some(states) => {
            if states.len() != b {
                return Err(ConfigError {
                    field: "streams",
                    reason: format!("{} saved streams for a run of {b}", states.len()),
                });
            }
            for (s, state) in states.iter().enumerate() {
                set.import_slot(s, state).map_err(|e| ConfigError {
                    field: "streams",
                    reason: format!("saved stream {s}: {e}"),
                })?;
            }
        }
        None => (0..b).for_each(|s| set.set_sign_counter(s, first)),
    }
    let len = train.len();
    let offsets: Vec<usize> = (0..b).map(|s| s * len / b).collect();
    let mut inputs: Vec<SlotStep> = (0..b).map(|s| SlotStep::learn(s, 0)).collect();
    let mut losses = vec![0.0; b];
    let mut sum = 0.0;
    let mut tail_sum = 0.0;
    let mut tail_count = 0u64;
    // A run shorter than ten steps still has a last step to report (its tail was empty: 0 bpc).
    let tail_from = cfg.steps - (cfg.steps / 10).max(1);
    let mut recent = 0.0;
    let mut recent_init = false;
    let mut evals = Vec::new();
    let mut nonfinite = 0;
    let mut eval_seconds = 0.0;
    let mut checkpoint_seconds = 0.0;
    let mut trace = Vec::new();
    let mut probes: Vec<TangentProbe> = match cfg.trace_every {
        Some(_) => (0..b).map(|s| TangentProbe::new(&spec, spec.config.seed ^ s as u64)).collect(),
        None => Vec::new(),
    };
    let start = Instant::now();
    // The loop runs on a pool thread so that the step's parallel sections fork inside the pool
    // rather than handing work over from an outside thread at every step.
    let pool = rayon::ThreadPoolBuilder::new().build().expect("thread pool");
    pool.install(|| {
        for i in 0..cfg.steps {
            let t = first + i;
            for (s, x) in inputs.iter_mut().enumerate() {
                x.token = train[((offsets[s] as u64 + t) % len as u64) as usize];
                x.reset = cfg.reset_every.is_some_and(|r| r > 0 && t > 0 && t % r == 0);
            }
            for (probe, x) in probes.iter_mut().zip(&inputs) {
                // A reset's step has no Jacobian to follow: the chain restarts from zero.
                if !x.reset {
                    probe.step(&spec, &params, x.token, set.state(x.slot));
                }
            }
            let report = set.step(&mut params, &mut opt, &inputs, &mut losses).expect("valid batch");
            if report.update == Some(crate::core::UpdateOutcome::NonFinite) {
                nonfinite += 1;
            }
            let traced = cfg.trace_every.is_some_and(|every| every > 0 && (i + 1) % every == 0);
            let step_loss: f64 = losses.iter().sum::<f64>() / std::f64::consts::LN_2;
            sum += step_loss;
            if i >= tail_from {
                tail_sum += step_loss;
                tail_count += b as u64;
            }
            let bpc = step_loss / b as f64;
            recent = if recent_init { 0.999 * recent + 0.001 * bpc } else { bpc };
            recent_init = true;
            let symbols = (i + 1) * b as u64;
            let model_symbols = start_symbols + symbols;
            let mut eval_now = None;
            if let (Some(every), Some(ev)) = (cfg.eval_every, eval)
                && every > 0
                && model_symbols / every != (model_symbols - b as u64) / every
            {
                let e0 = Instant::now();
                let point = EvalPoint { symbols: model_symbols, bpc: evaluate(&spec, &params, ev) };
                evals.push(point);
                eval_now = Some(point);
                eval_seconds += e0.elapsed().as_secs_f64();
            }
            let mut trace_now = None;
            if traced {
                let (grad_norm_w, grad_norm_v) = set.gradients().group_norms();
                let norms: Vec<f64> = (0..b).filter_map(|s| set.learner().influence_norm(s)).collect();
                let rates: Vec<f64> = probes.iter_mut().filter_map(TangentProbe::take_rate).collect();
                trace.push(TracePoint {
                    symbols,
                    recent_bpc: recent,
                    grad_norm_w,
                    grad_norm_v,
                    clipped: matches!(
                        report.update,
                        Some(crate::core::UpdateOutcome::Applied { clipped: true, .. })
                    ),
                    influence_norm_mean: if norms.is_empty() {
                        0.0
                    } else {
                        norms.iter().sum::<f64>() / norms.len() as f64
                    },
                    influence_norm_max: norms.iter().copied().fold(0.0, f64::max),
                    tangent_growth_mean: rates.iter().sum::<f64>() / rates.len().max(1) as f64,
                    tangent_growth_max: rates.iter().copied().reduce(f64::max).unwrap_or(0.0),
                });
                trace_now = trace.last().copied();
            }
            on_progress(Progress { symbols, total, recent_bpc: recent, eval: eval_now, trace: trace_now });
            // The run's end hands over its state itself: no checkpoint at the last step.
            let last = i + 1 == cfg.steps;
            if !last && cfg.checkpoint_every.is_some_and(|every| every > 0 && (i + 1) % every == 0) {
                let c0 = Instant::now();
                on_checkpoint(Checkpoint {
                    steps: i + 1,
                    params: &params,
                    optimizer: &opt,
                    streams: &set,
                    nonfinite_updates: nonfinite,
                });
                checkpoint_seconds += c0.elapsed().as_secs_f64();
            }
        }
    });
    let seconds = start.elapsed().as_secs_f64() - eval_seconds - checkpoint_seconds;
    // An evaluation taken at the last step is of these very weights: the same pass again would
    // only cost its time.
    let at_end = evals.last().filter(|p| p.symbols == start_symbols + total).map(|p| p.bpc);
    let eval_bpc = eval.map(|ev| at_end.unwrap_or_else(|| evaluate(&spec, &params, ev)));
    let report = TrainReport {
        learner: spec.config.learner_label(),
        cell: spec.cell().name().into(),
        hidden: spec.n,
        batch: b,
        vocab: spec.vocab,
        symbols: total,
        start_symbols,
        train_bpc: sum / total.max(1) as f64,
        train_bpc_final: tail_sum / tail_count.max(1) as f64,
        eval_bpc,
        evals,
        trace,
        nonfinite_updates: nonfinite,
        symbols_per_sec: total as f64 / seconds,
        seconds,
    };
    Ok(Trained { report, params, optimizer: opt, streams: set })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::CellKind;

    /// When the last step crossed an `eval_every` boundary, the final evaluation ran the same
    /// pass over the same weights a second time.
    #[test]
    fn the_final_evaluation_reuses_one_taken_at_the_last_step() {
        let model = ModelConfig { vocab_size: 6, cell: CellKind::Rhn, hidden: 5, ..ModelConfig::default() };
        let tokens: Vec<u32> = (0..40).map(|t| (t * t % 6) as u32).collect();
        // 10 steps of 2 streams: 20 symbols, a multiple of 5 and of 20, not of 6.
        for (every, evals) in [(20, 1), (5, 4), (6, 3)] {
            let cfg = TrainConfig {
                model: model.clone(),
                batch: 2,
                steps: 10,
                reset_every: None,
                eval_every: Some(every),
                trace_every: None,
                checkpoint_every: None,
            };
            let spec = cfg.model.check().unwrap();
            let mut passes = 0;
            let counted = |spec: &ModelSpec, params: &Params<f32>, tokens: &[u32]| {
                passes += 1;
                evaluate(spec, params, tokens)
            };
            let Trained { report, params, .. } = train_evaluated_by(
                &cfg,
                Start::fresh(&spec),
                &tokens,
                Some(&tokens[..10]),
                |_| {},
                |_| {},
                counted,
            )
            .unwrap();
            assert_eq!(report.evals.len(), evals, "every {every}");
            let at_end = report.evals.last().unwrap().symbols == 20;
            assert_eq!(passes, evals + usize::from(!at_end), "every {every}: one pass per evaluation");
            assert_eq!(report.eval_bpc, Some(evaluate(&spec, &params, &tokens[..10])), "every {every}");
        }
    }
}

#[cfg(test)]
mod checkpoint_tests {
    use super::*;
    use crate::core::{CellKind, LearnerKind};

    fn model(learner: LearnerKind) -> ModelConfig {
        ModelConfig {
            tbptt_window: 4,
            vocab_size: 7,
            cell: CellKind::Rhn,
            hidden: 5,
            seed: 3,
            lr: 0.02,
            ..ModelConfig::model_defaults(learner)
        }
    }

    fn config(
        model: &ModelConfig,
        steps: u64,
        checkpoint_every: Option<u64>,
        reset_every: Option<u64>,
    ) -> TrainConfig {
        TrainConfig {
            model: model.clone(),
            batch: 3,
            steps,
            reset_every,
            eval_every: None,
            trace_every: None,
            checkpoint_every,
        }
    }

    fn tokens() -> Vec<u32> {
        (0..97u32).map(|t| (t * t + 3 * t) % 7).collect()
    }

    /// A run without checkpoints.
    fn run(cfg: &TrainConfig, start: Start) -> Trained {
        train_checkpointed(cfg, start, &tokens(), None, |_| {}, |_| {}).unwrap()
    }

    /// The state a run hands to its checkpoints: steps, weights, optimizer, streams.
    type Saved = (u64, Params<f32>, Optimizer<f32>, Vec<SlotState<f32>>);

    /// Runs `steps` steps from fresh weights with a checkpoint every `every`, keeping each one.
    fn checkpoints(cfg: &TrainConfig, spec: &ModelSpec) -> Vec<Saved> {
        let mut saved = Vec::new();
        let run = train_checkpointed(
            cfg,
            Start::fresh(spec),
            &tokens(),
            None,
            |_| {},
            |c| {
                let streams = (0..3).map(|s| c.streams.export_slot(s)).collect::<Vec<_>>();
                saved.push((c.steps, c.params.clone(), c.optimizer.clone(), streams));
            },
        );
        assert!(run.unwrap().report.train_bpc.is_finite());
        saved
    }

    /// A run stopped at any checkpoint and continued from it (weights, optimizer with its pending
    /// sum, streams) ends with the weights of the uninterrupted run, bit for bit, for every kind
    /// of learner state: no resets, so nothing but the saved streams can make it exact.
    #[test]
    fn a_run_continued_from_a_checkpoint_equals_the_uninterrupted_run() {
        for learner in [LearnerKind::Ok, LearnerKind::KfRtrl, LearnerKind::Uoro, LearnerKind::Tbptt] {
            let model = model(learner);
            // Updates wait for several steps, so the checkpoints fall between two updates.
            assert!(model.tokens_per_update > 1 || learner == LearnerKind::Tbptt);
            let spec = model.check().unwrap();
            let full = run(&config(&model, 40, None, None), Start::fresh(&spec));
            // 39 steps: checkpoints at 13 and 26, none at the last step.
            let mut saved = checkpoints(&config(&model, 39, Some(13), None), &spec);
            assert_eq!(saved.iter().map(|s| s.0).collect::<Vec<_>>(), [13, 26], "{learner:?}");
            let (steps, params, optimizer, streams) = saved.swap_remove(0);
            let start = Start { params, optimizer, steps, symbols: steps * 3, streams: Some(streams) };
            let rest = run(&config(&model, 40 - steps, None, None), start);
            assert_eq!(rest.params, full.params, "{learner:?}");
            assert_eq!(rest.optimizer, full.optimizer, "{learner:?}");
            assert_eq!((rest.report.start_symbols, rest.report.symbols), (39, 81));
            // Without the streams the continuation is not the same run (the negative control).
            let (steps, params, optimizer, _) = saved.swap_remove(0);
            let start = Start { params, optimizer, steps, symbols: steps * 3, streams: None };
            let zeroed = run(&config(&model, 40 - steps, None, None), start);
            assert_ne!(zeroed.params, full.params, "{learner:?}");
        }
    }

    /// A file without streams (saved before they were) still continues an online learner exactly
    /// when the split falls on a multiple of the reset period: the streams start at zero there
    /// anyway, and their sign counters follow the steps taken.
    #[test]
    fn without_streams_a_split_at_a_reset_continues_exactly() {
        for learner in [LearnerKind::Ok, LearnerKind::KfRtrl, LearnerKind::Uoro, LearnerKind::Rtrl] {
            let model = model(learner);
            let spec = model.check().unwrap();
            let full = run(&config(&model, 39, None, Some(13)), Start::fresh(&spec));
            let saved = checkpoints(&config(&model, 30, Some(13), Some(13)), &spec);
            let (steps, params, optimizer, _) = saved.into_iter().next().unwrap();
            let start = Start { params, optimizer, steps, symbols: steps * 3, streams: None };
            let rest = run(&config(&model, 39 - steps, None, Some(13)), start);
            assert_eq!(rest.params, full.params, "{learner:?}");
            assert_eq!(rest.optimizer, full.optimizer, "{learner:?}");
        }
    }
}
