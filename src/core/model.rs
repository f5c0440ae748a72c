//! Model configuration, checked once at the boundary (as linfa's `ParamGuard` does) into the
//! [`ModelSpec`] every kernel relies on; the weights it sizes live in `params.rs`.

use serde::{Deserialize, Serialize};

use super::cell::CellKind;

pub use super::kinds::{ClipScope, LearnerKind, OptimizerKind, UpdateUnit};
pub use super::params::Params;
use super::pending::UpdateSchedule;

/// The paper's learning rate, 10^-3.5 (the copy task's default).
pub const DEFAULT_LR: f64 = 3.162_277_660_168_379_5e-4;

/// The default model's learning rate, 10^-2.5: measured on unbounded streams with the default
/// update schedule (docs/RESULTS.md §4), where the paper's 10^-3.5 learns too slowly.
pub const DEFAULT_MODEL_LR: f64 = 3.162_277_660_168_379_5e-3;

/// The default model's adaptive-decay margin (`influence_margin`): exact wherever a stream's
/// dynamics contract by more than 1% a step, bounded where they do not (docs/RESULTS.md §4).
/// [`ModelConfig::default`] leaves it off; [`ModelConfig::model_defaults`] (the server's default
/// model and a fresh `kfrtrl train` model) sets it for the learners that carry an influence.
pub const DEFAULT_MODEL_MARGIN: f64 = 0.01;

/// The default model's steps per update (`tokens_per_update`, counting steps), reached by the
/// ramp below: every 32 steps once the model is past its first 14,400 updates (about 280k
/// tokens of one stream; with `B` busy streams, each update averages `32·B` tokens;
/// docs/RESULTS.md §4).
pub const DEFAULT_MODEL_TOKENS_PER_UPDATE: usize = 32;

/// Where the default model's ramp starts (`tokens_per_update_start`): 8 steps per update. One
/// stream's per-token updates early on saturate the RHN's carry gates for good (its dynamics
/// stop contracting within 50k bytes), while 16 from the start learn `abcdefgh` too slowly.
pub const DEFAULT_MODEL_TOKENS_PER_UPDATE_START: usize = 8;

/// The default model's ramp (`tokens_per_update_ramp`): 600 updates at each count, so that a
/// fresh model's first 4,800 steps update every 8 steps, 16 is reached after 4,800 updates
/// (about 55k steps) and 32 after 14,400.
pub const DEFAULT_MODEL_TOKENS_PER_UPDATE_RAMP: u64 = 600;

/// Unchecked model configuration, as read from a user; [`ModelConfig::check`] turns it into a
/// [`ModelSpec`] that every kernel can rely on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ModelConfig {
    /// Number of distinct tokens (inputs and outputs).
    pub vocab_size: usize,
    /// The recurrent cell.
    pub cell: CellKind,
    /// Hidden units `n`.
    pub hidden: usize,
    /// Gradient estimator.
    pub learner: LearnerKind,
    /// Window of truncated BPTT (only with `learner = tbptt`).
    pub tbptt_window: usize,
    /// Optimizer.
    pub optimizer: OptimizerKind,
    /// Learning rate.
    pub lr: f64,
    /// Clip the gradient norm of the weights [`ModelConfig::clip_scope`] names to this value; 0
    /// disables clipping.
    pub clip: f64,
    /// Which weights the clip measures. Absent from a saved configuration: `global`, the only
    /// scope before there was a choice.
    #[serde(default = "absent::clip_scope")]
    pub clip_scope: ClipScope,
    /// Rank `R` of the `ok` learner.
    #[serde(default = "absent::ok_rank")]
    pub ok_rank: usize,
    /// KF-RTRL and OK: the gradient of a scored token uses the influence estimate before the last
    /// step's random reduction (its conditional mean: unbiased, less variance). Absent from a
    /// saved configuration: false, the estimator before there was a choice.
    #[serde(default)]
    pub gradient_before_reduction: bool,
    /// KF-RTRL, OK and exact RTRL: the carried influence is multiplied by this factor at every
    /// step, `G_t = H_t (γ G_{t-1}) + a_t ⊗ D_t`. 1 (the default) is the gradient itself; below 1
    /// it is the exact gradient of an exponentially discounted past, a biased remedy for streams
    /// whose influence stops decaying (docs/RESULTS.md §4). Absent from a saved configuration: 1.
    #[serde(default = "absent::influence_decay")]
    pub influence_decay: f64,
    /// KF-RTRL, OK and exact RTRL: the adaptive decay's margin `ε` (`learner::growth`): every
    /// stream measures the growth rate `λ̂` of its exact state Jacobians and multiplies its carried
    /// influence by `exp(−max(0, λ̂ + ε))` (on top of `influence_decay`), so that it contracts by
    /// at least `ε` a step. Exact (factor 1) wherever the dynamics contract by more than `ε`;
    /// elsewhere a bias, asked for explicitly. Absent (the default): off.
    #[serde(default)]
    pub influence_margin: Option<f64>,
    /// Apply the optimizer, averaged, once the gradients accumulated since the last update cover
    /// this many steps or tokens (`update_unit`; [`crate::core::pending`]); 1 updates at every
    /// step. Absent from a saved configuration: 1, as before the choice.
    #[serde(default = "absent::tokens_per_update")]
    pub tokens_per_update: usize,
    /// Reach `tokens_per_update` gradually: the optimizer's `n`-th update (counting from 0) waits
    /// for `min(tokens_per_update, tokens_per_update_start + ⌊n / tokens_per_update_ramp⌋)`
    /// steps or tokens, so a fresh model updates more often while its first, large gradients are
    /// spent and its updates wait longer as it ages. 0: no ramp (always
    /// `tokens_per_update`). Absent from a saved configuration: 0.
    #[serde(default)]
    pub tokens_per_update_ramp: u64,
    /// Where the ramp starts: what the first update waits for (1 to `tokens_per_update`).
    /// Absent from a saved configuration: 1.
    #[serde(default = "absent::tokens_per_update_start")]
    pub tokens_per_update_start: usize,
    /// What `tokens_per_update`, its start and its ramp count: tokens of all streams, or the
    /// model's batched steps ([`UpdateUnit`]). Absent from a saved configuration: tokens.
    #[serde(default = "absent::update_unit")]
    pub update_unit: UpdateUnit,
    /// Seed of the weights' initialisation and of every random sign.
    pub seed: u64,
    /// Standard deviation of the Gaussian initialisation of `W` and `V`.
    pub init_std: f64,
    /// UORO's ε0, inside and outside the square roots of its scale factors.
    pub uoro_epsilon: f64,
}

/// What a saved configuration that predates a field meant by it (serde's defaults, shared by the
/// engine's model definitions).
pub mod absent {
    use super::{ClipScope, DEFAULT_OK_RANK, UpdateUnit};

    /// `clip_scope`: the global clip, the only scope before there was a choice.
    pub fn clip_scope() -> ClipScope {
        ClipScope::Global
    }

    /// `influence_decay`: none.
    pub fn influence_decay() -> f64 {
        1.0
    }

    /// `tokens_per_update`: every step.
    pub fn tokens_per_update() -> usize {
        1
    }

    /// `tokens_per_update_start`: a ramp from one token per update.
    pub fn tokens_per_update_start() -> usize {
        1
    }

    /// `update_unit`: tokens, the only unit before there was a choice.
    pub fn update_unit() -> UpdateUnit {
        UpdateUnit::Tokens
    }

    /// `ok_rank`: the default rank.
    pub fn ok_rank() -> usize {
        DEFAULT_OK_RANK
    }
}

/// Rank of the `ok` learner when none is given.
pub const DEFAULT_OK_RANK: usize = 8;

impl ModelConfig {
    /// The learner as the command line names it (`tbptt:K` with its window, `ok:R` with its rank).
    pub fn learner_label(&self) -> String {
        match self.learner {
            LearnerKind::Tbptt => format!("tbptt:{}", self.tbptt_window),
            LearnerKind::Ok => format!("ok:{}", self.ok_rank),
            l => l.name().to_string(),
        }
    }
}

impl ModelConfig {
    /// The defaults of a new model (the server's default model, a fresh `kfrtrl train` model) for
    /// `learner`: [`ModelConfig::default`] with the update schedule
    /// ([`UpdateSchedule::default_for`]: [`DEFAULT_MODEL_TOKENS_PER_UPDATE`] reached from
    /// [`DEFAULT_MODEL_TOKENS_PER_UPDATE_START`] by [`DEFAULT_MODEL_TOKENS_PER_UPDATE_RAMP`], except
    /// for TBPTT, whose window already gathers its tokens into one update)
    /// and, for the learners that carry an influence, the margin [`DEFAULT_MODEL_MARGIN`].
    pub fn model_defaults(learner: LearnerKind) -> ModelConfig {
        let schedule = UpdateSchedule::default_for(learner);
        ModelConfig {
            learner,
            influence_margin: learner.carries_influence().then_some(DEFAULT_MODEL_MARGIN),
            tokens_per_update: schedule.tokens_per_update,
            tokens_per_update_ramp: schedule.tokens_per_update_ramp,
            tokens_per_update_start: schedule.tokens_per_update_start,
            update_unit: schedule.unit,
            ..ModelConfig::default()
        }
    }

    /// The update schedule this configuration names.
    pub fn update_schedule(&self) -> UpdateSchedule {
        UpdateSchedule {
            tokens_per_update: self.tokens_per_update,
            tokens_per_update_ramp: self.tokens_per_update_ramp,
            tokens_per_update_start: self.tokens_per_update_start,
            unit: self.update_unit,
        }
    }
}

impl Default for ModelConfig {
    fn default() -> Self {
        Self {
            vocab_size: 256,
            cell: CellKind::Rhn,
            hidden: 128,
            learner: LearnerKind::Ok,
            tbptt_window: 25,
            optimizer: OptimizerKind::Adam,
            lr: DEFAULT_MODEL_LR,
            clip: 1.0,
            clip_scope: ClipScope::Recurrent,
            ok_rank: DEFAULT_OK_RANK,
            gradient_before_reduction: true,
            influence_decay: 1.0,
            influence_margin: None,
            tokens_per_update: 1,
            tokens_per_update_ramp: 0,
            tokens_per_update_start: 1,
            update_unit: UpdateUnit::Tokens,
            seed: 0,
            init_std: 0.01,
            uoro_epsilon: 1e-7,
        }
    }
}

/// Hard limits that keep one model's memory and time per step bounded.
pub mod limits {
    /// Largest vocabulary.
    pub const MAX_VOCAB: usize = 1 << 20;
    /// Largest hidden size.
    pub const MAX_HIDDEN: usize = 4096;
    /// Largest hidden size for exact RTRL, whose influence matrix has `k·n·r·n·m` entries.
    pub const MAX_RTRL_HIDDEN: usize = 64;
    /// Largest hidden size for exact RTRL as an offline oracle ([`super::ModelConfig::check_as_oracle`]).
    pub const MAX_RTRL_ORACLE_HIDDEN: usize = 256;
    /// Largest number of tokens (or steps) per optimizer update.
    pub const MAX_TOKENS_PER_UPDATE: usize = 65536;
    /// Largest number of updates per level of the ramp to `tokens_per_update`.
    pub const MAX_TOKENS_PER_UPDATE_RAMP: u64 = 1 << 32;
    /// Largest rank of the `ok` learner.
    pub const MAX_OK_RANK: usize = 32;
    /// Largest truncation window.
    pub const MAX_TBPTT_WINDOW: usize = 4096;
    /// Largest per-stream learner state, in bytes of f32 (one stream must never exhaust memory).
    pub const MAX_STREAM_BYTES: u64 = 1 << 30;
}

/// Why a configuration was refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("invalid model config: {field}: {reason}")]
pub struct ConfigError {
    /// The offending field.
    pub field: &'static str,
    /// What is wrong with it.
    pub reason: String,
}

fn invalid(field: &'static str, reason: impl Into<String>) -> ConfigError {
    ConfigError { field, reason: reason.into() }
}

impl ModelConfig {
    /// Validates every field and derives the sizes.
    pub fn check(&self) -> Result<ModelSpec, ConfigError> {
        self.check_with_rtrl_limit(limits::MAX_RTRL_HIDDEN)
    }

    /// The same model with its weights frozen (for evaluation): the frozen learner, without the
    /// options only a learner that carries an influence may have.
    pub fn frozen(&self) -> ModelConfig {
        ModelConfig {
            learner: LearnerKind::Frozen,
            influence_decay: 1.0,
            influence_margin: None,
            ..self.clone()
        }
    }

    /// As [`ModelConfig::check`], with exact RTRL allowed up to [`limits::MAX_RTRL_ORACLE_HIDDEN`]:
    /// for the offline experiments that need the exact influence as an oracle at the service's
    /// widths (one stream, measured once), never for a model that serves.
    pub fn check_as_oracle(&self) -> Result<ModelSpec, ConfigError> {
        self.check_with_rtrl_limit(limits::MAX_RTRL_ORACLE_HIDDEN)
    }

    fn check_with_rtrl_limit(&self, rtrl_limit: usize) -> Result<ModelSpec, ConfigError> {
        if !(2..=limits::MAX_VOCAB).contains(&self.vocab_size) {
            return Err(invalid("vocab_size", format!("must be in 2..={}", limits::MAX_VOCAB)));
        }
        if !(1..=limits::MAX_HIDDEN).contains(&self.hidden) {
            return Err(invalid("hidden", format!("must be in 1..={}", limits::MAX_HIDDEN)));
        }
        if self.learner == LearnerKind::Rtrl && self.hidden > rtrl_limit {
            return Err(invalid("hidden", format!("exact RTRL is limited to hidden <= {rtrl_limit}")));
        }
        if self.learner == LearnerKind::Tbptt && !(1..=limits::MAX_TBPTT_WINDOW).contains(&self.tbptt_window)
        {
            return Err(invalid("tbptt_window", format!("must be in 1..={}", limits::MAX_TBPTT_WINDOW)));
        }
        if self.learner == LearnerKind::Ok && !(1..=limits::MAX_OK_RANK).contains(&self.ok_rank) {
            return Err(invalid("ok_rank", format!("must be in 1..={}", limits::MAX_OK_RANK)));
        }
        if !(self.lr.is_finite() && self.lr > 0.0 && self.lr <= 10.0) {
            return Err(invalid("lr", "must be a finite number in (0, 10]"));
        }
        if !(self.clip.is_finite() && self.clip >= 0.0) {
            return Err(invalid("clip", "must be a finite number >= 0 (0 disables clipping)"));
        }
        if !(self.influence_decay.is_finite() && self.influence_decay > 0.0 && self.influence_decay <= 1.0) {
            return Err(invalid("influence_decay", "must be a finite number in (0, 1]"));
        }
        if self.influence_decay < 1.0 && !self.learner.carries_influence() {
            return Err(invalid(
                "influence_decay",
                "only kf-rtrl, ok, rtrl and uoro carry an influence to decay",
            ));
        }
        if !(1..=limits::MAX_TOKENS_PER_UPDATE).contains(&self.tokens_per_update) {
            return Err(invalid(
                "tokens_per_update",
                format!("must be in 1..={}", limits::MAX_TOKENS_PER_UPDATE),
            ));
        }
        if self.tokens_per_update_ramp > limits::MAX_TOKENS_PER_UPDATE_RAMP {
            return Err(invalid(
                "tokens_per_update_ramp",
                format!("must be in 0..={}", limits::MAX_TOKENS_PER_UPDATE_RAMP),
            ));
        }
        if self.tokens_per_update_ramp > 0 && self.tokens_per_update == 1 {
            return Err(invalid("tokens_per_update_ramp", "ramps to tokens_per_update, which is 1"));
        }
        if !(1..=self.tokens_per_update).contains(&self.tokens_per_update_start) {
            return Err(invalid("tokens_per_update_start", "must be in 1..=tokens_per_update"));
        }
        if self.tokens_per_update_start != 1 && self.tokens_per_update_ramp == 0 {
            return Err(invalid("tokens_per_update_start", "starts a ramp, and tokens_per_update_ramp is 0"));
        }
        if let Some(margin) = self.influence_margin {
            if !(margin.is_finite() && (0.0..=1.0).contains(&margin)) {
                return Err(invalid("influence_margin", "must be a finite number in [0, 1]"));
            }
            if !self.learner.carries_influence() {
                return Err(invalid(
                    "influence_margin",
                    "only kf-rtrl, ok, rtrl and uoro carry an influence to decay",
                ));
            }
        }
        if !(self.init_std.is_finite() && self.init_std >= 0.0 && self.init_std <= 10.0) {
            return Err(invalid("init_std", "must be a finite number in [0, 10]"));
        }
        if !(self.uoro_epsilon.is_finite() && self.uoro_epsilon >= 0.0) {
            return Err(invalid("uoro_epsilon", "must be a finite number >= 0"));
        }
        let n = self.hidden;
        let r = self.cell.gates();
        let k = self.cell.state_blocks();
        let m = self.vocab_size + n + 1;
        let spec = ModelSpec { config: self.clone(), n, r, k, m, vocab: self.vocab_size };
        let bytes = spec.stream_bytes();
        if bytes > limits::MAX_STREAM_BYTES {
            return Err(invalid(
                "hidden",
                format!(
                    "the {} learner's state per stream would take {} MiB (limit {} MiB); use a \
                     smaller hidden size or vocabulary",
                    self.learner,
                    bytes >> 20,
                    limits::MAX_STREAM_BYTES >> 20
                ),
            ));
        }
        Ok(spec)
    }
}

/// A validated configuration with its derived sizes.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelSpec {
    /// The configuration it was checked from.
    pub config: ModelConfig,
    /// Hidden units.
    pub n: usize,
    /// Gates (weight matrices).
    pub r: usize,
    /// State blocks; the state has `k·n` entries.
    pub k: usize,
    /// Length of `a_t = [x; h; 1]`.
    pub m: usize,
    /// Vocabulary size.
    pub vocab: usize,
}

impl ModelSpec {
    /// Entries of the state vector.
    pub fn state_len(&self) -> usize {
        self.k * self.n
    }
    /// Offset of `h` inside the state vector.
    pub fn h_offset(&self) -> usize {
        (self.k - 1) * self.n
    }
    /// Rows of `W`, `r·n`.
    pub fn gate_rows(&self) -> usize {
        self.r * self.n
    }
    /// The cell.
    pub fn cell(&self) -> CellKind {
        self.config.cell
    }
    /// The learner.
    pub fn learner(&self) -> LearnerKind {
        self.config.learner
    }
    /// Number of recurrent parameters, `r·n·m`.
    pub fn recurrent_params(&self) -> usize {
        self.r * self.n * self.m
    }
    /// Number of all parameters (recurrent and readout).
    pub fn total_params(&self) -> usize {
        self.recurrent_params() + self.vocab * (self.n + 1)
    }
    /// Bytes (f32) that one slot of a stream set holds: the stream's state and learner state and
    /// the slot's share of the batch scratch. Per-thread workspaces are not included (they do
    /// not grow with the number of streams).
    pub fn stream_bytes(&self) -> u64 {
        let (n, s, rn, m, vocab, k) = (
            self.n as u64,
            self.state_len() as u64,
            self.gate_rows() as u64,
            self.m as u64,
            self.vocab as u64,
            self.k as u64,
        );
        let window = self.config.tbptt_window as u64;
        // In units of 4 bytes: an 8-byte counter or option counts 2.
        // State, position, sign key and counter; batch scratch `[h; 1]`, logits, `∂L/∂h`, previous
        // state, pre-activations, `D`, carry, loss.
        let slot = s + 6 + (n + 1) + vocab + n + s + rn + k * rn + k * k * n + 2;
        let learner = match self.learner() {
            // `u`, `A`, scale, forced sign, `δᵀA` and `u` rows, chunk bounds.
            // With the gradient before the reduction: the last step's `a`, `D` and coefficient,
            // and a second `δᵀA` and `u` row per input.
            LearnerKind::KfRtrl => {
                let last_step =
                    if self.config.gradient_before_reduction { n + k * rn + 2 + rn + m } else { 0 };
                m + s * rn + 1 + 4 + rn + m + 4 + last_step
            }
            // `s̃`, `θ̃`, forced signs, scratch `y`, `s̃'`, `ν`, `w`.
            LearnerKind::Uoro => s + rn * m + 6 + rn + 2 * s + rn,
            // `G`, its product scratch, the Jacobian.
            LearnerKind::Rtrl => 2 * s * rn * m + s * s,
            // States, tokens and errors of the window; four counters.
            LearnerKind::Tbptt => window * (s + 1 + vocab) + 8,
            LearnerKind::Frozen => 0,
            // `R + 1` terms of `u`, `A` and gradient weight, their `δᵀA` and `u` rows, the
            // reduction's probabilities and forced choice.
            LearnerKind::Ok => {
                let terms = self.config.ok_rank as u64 + 1;
                terms * (m + s * rn + 1) + terms * (rn + m) + 2 * terms + 2
            }
        };
        4 * (slot + learner)
    }

    /// Column of `W` where the `h` block starts.
    pub fn h_col(&self) -> usize {
        self.vocab
    }
    /// Column of `W` holding the bias.
    pub fn bias_col(&self) -> usize {
        self.m - 1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_the_measured_setup_and_valid() {
        let spec = ModelConfig::default().check().unwrap();
        assert_eq!(spec.config.cell, CellKind::Rhn);
        assert_eq!((spec.n, spec.r, spec.k, spec.m), (128, 2, 1, 385));
        assert_eq!(spec.config.learner_label(), format!("ok:{DEFAULT_OK_RANK}"));
        assert_eq!(
            (spec.config.lr, spec.config.clip, spec.config.clip_scope),
            (DEFAULT_MODEL_LR, 1.0, ClipScope::Recurrent)
        );
        assert!(spec.config.gradient_before_reduction);
        assert!((DEFAULT_LR - 10f64.powf(-3.5)).abs() < 1e-18);
        assert!((DEFAULT_MODEL_LR - 10f64.powf(-2.5)).abs() < 1e-17);
        let model = ModelConfig::model_defaults(LearnerKind::Ok).check().unwrap().config;
        assert_eq!(
            (model.influence_margin, model.tokens_per_update, model.tokens_per_update_ramp),
            (Some(0.01), 32, 600)
        );
        assert_eq!((model.tokens_per_update_start, model.update_unit), (8, UpdateUnit::Steps));
        assert_eq!(ModelConfig::default().update_unit, UpdateUnit::Tokens, "the every-step base");
        let tbptt = ModelConfig::model_defaults(LearnerKind::Tbptt);
        assert_eq!(tbptt.influence_margin, None, "no influence to bound");
        assert_eq!(
            tbptt.update_schedule(),
            UpdateSchedule { unit: UpdateUnit::Steps, ..UpdateSchedule::EVERY_STEP },
            "one update per window"
        );
        tbptt.check().unwrap();
    }

    #[test]
    fn bad_fields_are_named() {
        let bad = |f: fn(&mut ModelConfig), field: &str| {
            let mut c = ModelConfig::default();
            f(&mut c);
            assert_eq!(c.check().unwrap_err().field, field);
        };
        bad(|c| c.hidden = 0, "hidden");
        bad(|c| c.vocab_size = 1, "vocab_size");
        bad(|c| c.lr = f64::NAN, "lr");
        bad(|c| c.lr = 0.0, "lr");
        bad(|c| c.clip = -1.0, "clip");
        bad(|c| c.clip = f64::INFINITY, "clip");
        bad(
            |c| {
                c.learner = LearnerKind::Rtrl;
                c.hidden = 65
            },
            "hidden",
        );
        bad(
            |c| {
                c.learner = LearnerKind::Tbptt;
                c.tbptt_window = 0
            },
            "tbptt_window",
        );
    }

    /// The memory target of a KF-RTRL stream: within 1.2x of the state it exports.
    #[test]
    fn a_kf_rtrl_slot_holds_little_beyond_its_state() {
        for (cell, hidden) in [(CellKind::Rhn, 128), (CellKind::Tanh, 256), (CellKind::Lstm, 64)] {
            let learner = LearnerKind::KfRtrl;
            let spec = ModelConfig { cell, hidden, learner, ..Default::default() }.check().unwrap();
            let state = crate::core::SlotStateLayout::of(&spec).bytes(4) as f64;
            let ratio = spec.stream_bytes() as f64 / state;
            assert!((1.0..1.2).contains(&ratio), "{cell} {hidden}: {ratio}");
        }
    }

    #[test]
    fn init_is_deterministic_in_the_seed() {
        let mut c = ModelConfig { hidden: 4, vocab_size: 5, ..Default::default() };
        let a = Params::<f64>::init(&c.check().unwrap());
        let b = Params::<f64>::init(&c.check().unwrap());
        assert_eq!(a, b);
        c.seed = 1;
        assert_ne!(a, Params::<f64>::init(&c.check().unwrap()));
    }
}
