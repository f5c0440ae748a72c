//! The copy (string memorisation) task with the curriculum of KF-RTRL.md §6.2.
//!
//! - Vocabulary of 4: `0` and `1` are bits, [`START`] (2) is the start marker, [`BLANK`] (3) the
//!   filler.
//! - A curriculum level `L` starts at 1. Each new sequence draws `T = max(1, L − U)` with `U`
//!   uniform in `{0, 1, 2, 3, 4}` and `T` random bits `b_1..b_T`.
//! - Input (length `2T+2`): `[2, b_1..b_T, 3 × (T+1)]`; target: `[3 × (T+1), 2, b_1..b_T]`.
//! - The loss is the softmax cross-entropy at every step (fillers included), averaged over the
//!   batch. An EMA (decay 0.999, initial value 1 bit) tracks it in bits; when it falls below
//!   0.15, `L += 1` and the EMA is set to 0.3.
//! - Streams are asynchronous: when a stream's sequence ends it starts a new one with a reset
//!   (hidden state and learner factors zeroed, [`SlotStep::reset`]).
//!
//! ## Step order
//!
//! [`StreamSet::score`] scores a slot's *current* prediction against a token, and
//! [`StreamSet::advance`] consumes a token. The library's training loop uses one token for both
//! (next-token prediction). Here the target at time `t` is not the next input, so each time step
//! is, for all streams together:
//! 1. `advance` with the inputs `x_t` (a stream starting a new sequence has `reset` set here), so
//!    that `h_t = cell(W [x_t; h_{t-1}; 1])`;
//! 2. `score` with the targets `y_t` (never `reset`): the loss is `CE(softmax(V [h_t; 1]), y_t)`
//!    and its gradient estimate `δ_tᵀ Ĝ_t` uses the influence after the advance of `x_t`;
//! 3. the optimizer applies the averaged gradient (when there were contributions).
//!
//! So `y_t` is predicted from a state that has consumed `x_1..x_t` ([`copy_step`]; the test
//! `step_order_scores_the_target_after_the_input` in `tests/numerics/experiment_copy.rs` checks it).

use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::core::model::ConfigError;
use crate::core::rng::{CounterRng, derive_key};
use crate::core::{ModelConfig, ModelSpec, Optimizer, Params, SlotStep, StreamSet, UpdateOutcome};
use crate::engine::model_file::{Counters, ModelFile, SlotLayout, SlotScalars, stack_slots, unstack_slots};

/// Vocabulary size of the task.
pub const VOCAB: usize = 4;
/// The start marker.
pub const START: u32 = 2;
/// The filler.
pub const BLANK: u32 = 3;
/// EMA decay of the loss in bits.
pub const EMA_DECAY: f64 = 0.999;
/// The EMA's initial value (bits).
pub const EMA_INIT: f64 = 1.0;
/// The level goes up when the EMA falls below this (bits).
pub const EMA_THRESHOLD: f64 = 0.15;
/// The EMA's value after a level-up (bits).
pub const EMA_AFTER_LEVEL_UP: f64 = 0.3;
/// `U` of `T = max(1, L − U)` is uniform in `0..=MAX_SHORTENING`.
pub const MAX_SHORTENING: usize = 4;

/// Input and target of one sequence with the given bits: `[2, b.., 3 × (T+1)]` and
/// `[3 × (T+1), 2, b..]`.
pub fn sequence(bits: &[u32]) -> (Vec<u32>, Vec<u32>) {
    let t = bits.len();
    let mut input = Vec::with_capacity(2 * t + 2);
    input.push(START);
    input.extend_from_slice(bits);
    input.extend(std::iter::repeat_n(BLANK, t + 1));
    let mut target = Vec::with_capacity(2 * t + 2);
    target.extend(std::iter::repeat_n(BLANK, t + 1));
    target.push(START);
    target.extend_from_slice(bits);
    (input, target)
}

/// Draws a sequence for level `level`: `T = max(1, L − U)`, `U` uniform in `0..=4`, `T` fair bits.
pub fn draw_sequence(level: usize, rng: &mut CounterRng) -> (Vec<u32>, Vec<u32>) {
    let u = rng.below(MAX_SHORTENING as u64 + 1) as usize;
    let t = level.saturating_sub(u).max(1);
    let bits: Vec<u32> = (0..t).map(|_| rng.below(2) as u32).collect();
    sequence(&bits)
}

/// The curriculum: the level `L` and the EMA of the batch-averaged loss in bits.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Curriculum {
    /// Current level `L`.
    pub level: usize,
    /// EMA of the loss in bits.
    pub ema: f64,
}

impl Default for Curriculum {
    fn default() -> Self {
        Self { level: 1, ema: EMA_INIT }
    }
}

impl Curriculum {
    /// Feeds one step's batch-averaged loss (bits); returns true when the level went up.
    pub fn observe(&mut self, loss_bits: f64) -> bool {
        self.ema = EMA_DECAY * self.ema + (1.0 - EMA_DECAY) * loss_bits;
        if self.ema < EMA_THRESHOLD {
            self.level += 1;
            self.ema = EMA_AFTER_LEVEL_UP;
            true
        } else {
            false
        }
    }
}

/// A copy-task run.
#[derive(Debug, Clone)]
pub struct CopyConfig {
    /// The model (its `vocab_size` is forced to [`VOCAB`]).
    pub model: ModelConfig,
    /// Parallel streams.
    pub batch: usize,
    /// Time steps (each consumes one symbol per stream).
    pub steps: u64,
    /// Seed of the sequences (the weights and signs use `model.seed`).
    pub data_seed: u64,
    /// Whether a stream is reset (state and learner zeroed) when it starts a new sequence, as
    /// the task prescribes (every learner, truncated BPTT included: a reset carries its scored
    /// window into the next update). `false` lets states run across sequences (an ablation).
    pub reset_at_sequence_end: bool,
}

impl CopyConfig {
    /// The task's setup for a model: streams reset at every new sequence.
    pub fn new(model: ModelConfig, batch: usize, steps: u64, data_seed: u64) -> Self {
        Self { model, batch, steps, data_seed, reset_at_sequence_end: true }
    }
}

/// A point of the curriculum curve.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct CurvePoint {
    /// Steps done.
    pub step: u64,
    /// Level after that step.
    pub length: usize,
}

/// Outcome of a copy-task run.
#[derive(Debug, Clone, Serialize)]
pub struct CopyReport {
    /// Learner name (`tbptt:K` for truncated BPTT).
    pub learner: String,
    /// Cell name.
    pub cell: String,
    /// Hidden units.
    pub hidden: usize,
    /// Streams.
    pub batch: usize,
    /// Learning rate.
    pub lr: f64,
    /// Seed.
    pub seed: u64,
    /// Steps run.
    pub steps: u64,
    /// Whether streams were reset at every new sequence.
    pub reset_at_sequence_end: bool,
    /// Longest curriculum length reached.
    pub max_length: usize,
    /// EMA of the loss (bits) at the end.
    pub final_ema: f64,
    /// `(step, L)`: the start, every level-up, and the end.
    pub curve: Vec<CurvePoint>,
    /// Optimizer updates refused because the gradient was not finite.
    pub nonfinite_updates: u64,
    /// Wall time.
    pub seconds: f64,
    /// Steps per second.
    pub steps_per_sec: f64,
}

/// Progress of a run, reported after every step.
#[derive(Debug, Clone, Copy)]
pub struct CopyProgress {
    /// Steps done.
    pub step: u64,
    /// The step this stretch of the run goes to ([`CopyRun::run_to`]; with [`run_copy`], the
    /// run's planned steps).
    pub total: u64,
    /// The curriculum after the step.
    pub curriculum: Curriculum,
    /// Whether the level went up at this step.
    pub level_up: bool,
}

/// One time step of the copy task for a batch: `advance` with the inputs (`adv`, whose `reset`
/// starts new sequences), `score` of the targets (`sc`, never `reset`; losses in nats into
/// `losses`), then the optimizer update if anything contributed. Returns the update's outcome;
/// after a non-finite value the streams at fault are restarted
/// ([`StreamSet::recover_from_faults`]), as [`StreamSet::step`] does.
pub fn copy_step(
    set: &mut StreamSet<f32>,
    params: &mut Params<f32>,
    opt: &mut Optimizer<f32>,
    adv: &[SlotStep],
    sc: &[SlotStep],
    losses: &mut [f64],
) -> Option<UpdateOutcome> {
    debug_assert!(sc.iter().all(|x| !x.reset), "a reset at scoring would discard the input just consumed");
    set.advance(params, adv).expect("valid batch");
    let contributions = set.score(params, sc, losses).expect("valid batch");
    let outcome = (contributions > 0.0).then(|| opt.apply(params, set.gradients()));
    set.recover_from_faults(params, sc, &losses[..sc.len()], outcome);
    outcome
}

/// Runs the copy task online. Weights `f32`, as in training.
pub fn run_copy(
    cfg: &CopyConfig,
    on_progress: impl FnMut(CopyProgress) + Send,
) -> Result<CopyReport, ConfigError> {
    let mut run = CopyRun::new(cfg)?;
    run.run_to(cfg.steps, on_progress);
    Ok(run.report())
}

/// Label of the snapshot's metadata entry and prefix of its stacked stream tensors.
const SNAPSHOT_ENTRY: &str = "copy";
const STREAMS_PREFIX: &str = "streams.";

/// A copy-task run that can stop and go on: everything the run carries from one step to the
/// next. [`CopyRun::snapshot`] writes it as a model file (the weights and optimizer as
/// `kfrtrl train --save` does, every stream's state and learner factors as stacked tensors, the
/// curriculum, the sequences in progress and the data generator's position as JSON), and
/// [`CopyRun::resume`] continues from it bit for bit as if the run had never stopped.
pub struct CopyRun {
    cfg: CopyConfig,
    model: ModelConfig,
    spec: ModelSpec,
    batch: usize,
    params: Params<f32>,
    opt: Optimizer<f32>,
    set: StreamSet<f32>,
    rng: CounterRng,
    cur: Curriculum,
    seqs: Vec<(Vec<u32>, Vec<u32>)>,
    pos: Vec<usize>,
    adv: Vec<SlotStep>,
    sc: Vec<SlotStep>,
    losses: Vec<f64>,
    curve: Vec<CurvePoint>,
    max_length: usize,
    nonfinite: u64,
    step: u64,
    /// Wall time of the steps run before this process resumed.
    earlier_seconds: f64,
    /// Wall time of the steps run by this process.
    seconds: f64,
}

/// The JSON part of a snapshot.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct SnapshotJson {
    batch: usize,
    data_seed: u64,
    reset_at_sequence_end: bool,
    step: u64,
    rng_counter: u64,
    level: usize,
    /// The EMA's bits, so that it comes back exactly.
    ema_bits: u64,
    sequences: Vec<(Vec<u32>, Vec<u32>)>,
    positions: Vec<usize>,
    curve: Vec<CurvePoint>,
    max_length: usize,
    nonfinite_updates: u64,
    seconds: f64,
    layout: SlotLayout,
    slots: Vec<SlotScalars>,
}

fn data_rng_key(data_seed: u64) -> u64 {
    derive_key(data_seed, 0x434f_5059) // "COPY"
}

impl CopyRun {
    /// A run at step 0.
    pub fn new(cfg: &CopyConfig) -> Result<Self, ConfigError> {
        let model = ModelConfig { vocab_size: VOCAB, ..cfg.model.clone() };
        let spec = model.check()?;
        let b = cfg.batch.max(1);
        let cur = Curriculum::default();
        Ok(Self {
            cfg: cfg.clone(),
            params: Params::<f32>::init(&spec),
            opt: Optimizer::new(&spec),
            set: StreamSet::<f32>::new(&spec, b),
            rng: CounterRng::new(data_rng_key(cfg.data_seed)),
            cur,
            // Every stream starts with an empty sequence, so it draws one (with reset) at step 0.
            seqs: vec![(Vec::new(), Vec::new()); b],
            pos: vec![0; b],
            adv: (0..b).map(|s| SlotStep::learn(s, 0)).collect(),
            sc: (0..b).map(|s| SlotStep::learn(s, 0)).collect(),
            losses: vec![0.0; b],
            curve: vec![CurvePoint { step: 0, length: cur.level }],
            max_length: cur.level,
            nonfinite: 0,
            step: 0,
            earlier_seconds: 0.0,
            seconds: 0.0,
            model,
            spec,
            batch: b,
        })
    }

    /// Steps done.
    pub fn step(&self) -> u64 {
        self.step
    }

    /// Runs until `steps` steps are done (no step when already there).
    pub fn run_to(&mut self, steps: u64, mut on_progress: impl FnMut(CopyProgress) + Send) {
        let start = Instant::now();
        let pool = rayon::ThreadPoolBuilder::new().build().expect("thread pool");
        pool.install(|| {
            while self.step < steps {
                let progress = self.advance_one(steps);
                on_progress(progress);
            }
        });
        self.seconds += start.elapsed().as_secs_f64();
    }

    fn advance_one(&mut self, total: u64) -> CopyProgress {
        let b = self.batch;
        for s in 0..b {
            let mut reset = false;
            if self.pos[s] >= self.seqs[s].0.len() {
                self.seqs[s] = draw_sequence(self.cur.level, &mut self.rng);
                self.pos[s] = 0;
                reset = true;
            }
            self.adv[s].token = self.seqs[s].0[self.pos[s]];
            self.adv[s].reset = reset && self.cfg.reset_at_sequence_end;
            self.sc[s].token = self.seqs[s].1[self.pos[s]];
            self.pos[s] += 1;
        }
        let outcome =
            copy_step(&mut self.set, &mut self.params, &mut self.opt, &self.adv, &self.sc, &mut self.losses);
        if outcome == Some(UpdateOutcome::NonFinite) {
            self.nonfinite += 1;
        }
        self.step += 1;
        let bits = self.losses.iter().sum::<f64>() / b as f64 / std::f64::consts::LN_2;
        let level_up = self.cur.observe(bits);
        if level_up {
            self.max_length = self.max_length.max(self.cur.level);
            self.curve.push(CurvePoint { step: self.step, length: self.cur.level });
        }
        CopyProgress { step: self.step, total, curriculum: self.cur, level_up }
    }

    /// The report of the steps done so far (wall time over every process of the run).
    pub fn report(&self) -> CopyReport {
        let mut curve = self.curve.clone();
        if curve.last().is_none_or(|p| p.step != self.step) {
            curve.push(CurvePoint { step: self.step, length: self.cur.level });
        }
        let seconds = self.earlier_seconds + self.seconds;
        CopyReport {
            learner: self.model.learner_label(),
            cell: self.spec.cell().name().into(),
            hidden: self.spec.n,
            batch: self.batch,
            lr: self.model.lr,
            seed: self.model.seed,
            steps: self.step,
            reset_at_sequence_end: self.cfg.reset_at_sequence_end,
            max_length: self.max_length,
            final_ema: self.cur.ema,
            curve,
            nonfinite_updates: self.nonfinite,
            seconds,
            steps_per_sec: self.step as f64 / seconds.max(1e-9),
        }
    }

    /// The run as a model file: see [`CopyRun`].
    pub fn snapshot(&self) -> Result<ModelFile, String> {
        let (layout, scalars, extra) = stack_slots(STREAMS_PREFIX, &self.set)?;
        let json = SnapshotJson {
            batch: self.batch,
            data_seed: self.cfg.data_seed,
            reset_at_sequence_end: self.cfg.reset_at_sequence_end,
            step: self.step,
            rng_counter: self.rng.counter(),
            level: self.cur.level,
            ema_bits: self.cur.ema.to_bits(),
            sequences: self.seqs.clone(),
            positions: self.pos.clone(),
            curve: self.curve.clone(),
            max_length: self.max_length,
            nonfinite_updates: self.nonfinite,
            seconds: self.earlier_seconds + self.seconds,
            layout,
            slots: scalars,
        };
        let mut metadata = serde_json::Map::new();
        metadata.insert(SNAPSHOT_ENTRY.into(), serde_json::to_value(&json).map_err(|e| e.to_string())?);
        Ok(ModelFile {
            config: self.model.clone(),
            params: self.params.clone(),
            optimizer: self.opt.clone(),
            counters: Counters {
                steps: self.step,
                symbols: self.step.saturating_mul(self.batch as u64),
                nonfinite_updates: self.nonfinite,
            },
            metadata,
            extra,
        })
    }

    /// Continues the run `cfg` from a snapshot of it, which must have been taken with the same
    /// model, batch, data seed and resets (the step count may differ).
    pub fn resume(cfg: &CopyConfig, file: ModelFile) -> Result<Self, String> {
        let mut run = Self::new(cfg).map_err(|e| e.to_string())?;
        let entry =
            file.metadata.get(SNAPSHOT_ENTRY).ok_or("not a copy-task snapshot (no `copy` metadata)")?;
        let json: SnapshotJson =
            serde_json::from_value(entry.clone()).map_err(|e| format!("copy-task snapshot: {e}"))?;
        if file.config != run.model {
            return Err(format!(
                "the snapshot's model differs from this run's: {} against {} (pass the flags it was started with)",
                serde_json::to_string(&file.config).unwrap_or_default(),
                serde_json::to_string(&run.model).unwrap_or_default()
            ));
        }
        let ours = (run.batch, cfg.data_seed, cfg.reset_at_sequence_end);
        let theirs = (json.batch, json.data_seed, json.reset_at_sequence_end);
        if ours != theirs {
            return Err(format!(
                "the snapshot's (batch, seed, resets) are {theirs:?}, this run's {ours:?} (pass the flags it was started with)"
            ));
        }
        let b = run.batch;
        if json.sequences.len() != b || json.positions.len() != b || json.slots.len() != b {
            return Err(format!("the snapshot does not hold {b} streams"));
        }
        for (s, ((input, target), &pos)) in json.sequences.iter().zip(&json.positions).enumerate() {
            let valid = input.len() == target.len()
                && pos <= input.len()
                && input.iter().chain(target).all(|&t| (t as usize) < VOCAB);
            if !valid {
                return Err(format!("stream {s}'s sequence in the snapshot is invalid"));
            }
        }
        let ema = f64::from_bits(json.ema_bits);
        // A sequence is about twice the level long: a level past any run's reach is damage.
        if json.level == 0 || json.level > 1_000_000 || !ema.is_finite() || json.max_length < json.level {
            return Err("the snapshot's curriculum is invalid".into());
        }
        for (slot, state) in
            unstack_slots(STREAMS_PREFIX, &json.layout, json.slots, &file.extra)?.iter().enumerate()
        {
            run.set.import_slot(slot, state).map_err(|e| format!("stream {slot} of the snapshot: {e}"))?;
        }
        run.params = file.params;
        run.opt = file.optimizer;
        run.rng = CounterRng::at(data_rng_key(cfg.data_seed), json.rng_counter);
        run.cur = Curriculum { level: json.level, ema };
        run.seqs = json.sequences;
        run.pos = json.positions;
        run.curve = json.curve;
        run.max_length = json.max_length;
        run.nonfinite = json.nonfinite_updates;
        run.step = json.step;
        run.earlier_seconds = json.seconds;
        Ok(run)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sequence_layout() {
        let (x, y) = sequence(&[1, 0, 1]);
        assert_eq!(x, vec![2, 1, 0, 1, 3, 3, 3, 3]);
        assert_eq!(y, vec![3, 3, 3, 3, 2, 1, 0, 1]);
    }

    #[test]
    fn drawn_lengths_follow_the_level() {
        let mut rng = CounterRng::new(7);
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..2000 {
            let (x, y) = draw_sequence(10, &mut rng);
            assert_eq!(x.len(), y.len());
            let t = (x.len() - 2) / 2;
            seen.insert(t);
            assert!(x[1..=t].iter().all(|&b| b < 2));
        }
        assert_eq!(seen.into_iter().collect::<Vec<_>>(), vec![6, 7, 8, 9, 10]);
        for _ in 0..100 {
            assert_eq!(draw_sequence(1, &mut rng).0.len(), 4);
        }
    }

    #[test]
    fn curriculum_advances_below_threshold_and_resets_ema() {
        let mut c = Curriculum::default();
        assert_eq!((c.level, c.ema), (1, 1.0));
        let mut steps = 0;
        while !c.observe(0.0) {
            steps += 1;
        }
        // 0.999^k < 0.15 first at k = 1897 (the k-th observation).
        assert_eq!(steps + 1, 1897);
        assert_eq!((c.level, c.ema), (2, 0.3));
        // A loss that stays at 0.2 bits never levels up.
        let mut c = Curriculum::default();
        assert!((0..20_000).all(|_| !c.observe(0.2)));
    }
}
