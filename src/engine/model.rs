//! What a model is to the engine: its definition (the core's configuration plus its stream limit,
//! with the wire names clients use), name rules, and an estimate of the memory it will hold.

use serde::{Deserialize, Serialize};

use crate::core::model::{ClipScope, UpdateUnit};
use crate::core::{CellKind, LearnerKind, ModelConfig, ModelSpec, OptimizerKind};

/// Longest model or stream name.
pub const MAX_NAME_LEN: usize = 64;

/// Most streams one model may hold (each gets a preallocated slot).
pub const MAX_STREAMS_PER_MODEL: usize = 65_536;

/// True for names matching `^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$` (models and streams).
pub fn valid_name(name: &str) -> bool {
    let bytes = name.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= MAX_NAME_LEN
        && bytes[0].is_ascii_alphanumeric()
        && bytes.iter().all(|&b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// A fully resolved model definition: every field present. This is also the `config` object of
/// a model's description on the wire.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelDefinition {
    /// The model's name, unique in the server.
    pub name: String,
    /// Number of distinct tokens; 256 makes a byte-level model that also accepts text.
    pub vocab_size: usize,
    /// Recurrent cell.
    pub cell: CellKind,
    /// Hidden units.
    pub hidden: usize,
    /// Gradient estimator.
    pub learner: LearnerKind,
    /// Truncation window (learner `tbptt` only).
    pub tbptt_window: usize,
    /// Optimizer.
    pub optimizer: OptimizerKind,
    /// Learning rate.
    pub lr: f64,
    /// Gradient-norm clip; 0 disables clipping.
    pub clip: f64,
    /// Which weights the clip measures (`recurrent`: `W` alone; `per-group`: `W` and `V` each;
    /// `global`: both together). Absent from a saved definition: `global`, as before the choice.
    #[serde(default = "crate::core::model::absent::clip_scope")]
    pub clip_scope: ClipScope,
    /// Rank of the `ok` learner.
    #[serde(default = "crate::core::model::absent::ok_rank")]
    pub ok_rank: usize,
    /// KF-RTRL and OK take the gradient of the estimate before the last step's random
    /// reduction. Absent from a saved definition: false, as before the choice.
    #[serde(default)]
    pub gradient_before_reduction: bool,
    /// KF-RTRL, OK, RTRL, UORO: the factor `γ ≤ 1` the carried influence is multiplied by at every
    /// step (1: none; below 1 a biased, explicit remedy). Absent from a saved definition: 1.
    #[serde(default = "crate::core::model::absent::influence_decay")]
    pub influence_decay: f64,
    /// KF-RTRL, OK, RTRL, UORO: the adaptive decay's margin `ε` (`null`: off, the default): the carried
    /// influence contracts by at least `ε` a step wherever the measured growth of the exact state
    /// Jacobians would let it grow (see [`ModelConfig::influence_margin`]).
    #[serde(default)]
    pub influence_margin: Option<f64>,
    /// Apply the optimizer once the gradients accumulated cover this many steps or tokens
    /// (`update_unit`; 1: at every step). Absent from a saved definition: 1.
    #[serde(default = "crate::core::model::absent::tokens_per_update")]
    pub tokens_per_update: usize,
    /// Updates per level of the ramp to `tokens_per_update` (0: none; see
    /// [`ModelConfig::tokens_per_update_ramp`]). Absent from a saved definition: 0.
    #[serde(default)]
    pub tokens_per_update_ramp: u64,
    /// What the ramp starts from (see [`ModelConfig::tokens_per_update_start`]). Absent from a
    /// saved definition: 1.
    #[serde(default = "crate::core::model::absent::tokens_per_update_start")]
    pub tokens_per_update_start: usize,
    /// What `tokens_per_update`, its start and its ramp count: `tokens` of all streams, or the
    /// model's batched `steps` (see [`ModelConfig::update_unit`]). Absent from a saved
    /// definition: tokens.
    #[serde(default = "crate::core::model::absent::update_unit")]
    pub update_unit: UpdateUnit,
    /// Seed of the initial weights and of every random sign.
    pub seed: u64,
    /// Standard deviation of the initial weights.
    pub init_std: f64,
    /// UORO's ε0.
    pub uoro_epsilon: f64,
    /// Most streams the model holds at once.
    pub max_streams: usize,
}

impl ModelDefinition {
    /// Estimated bytes of the model as loaded: its `max_streams` slots and the scratch slot that
    /// predictions run on (see [`estimate_model_bytes`]).
    pub fn estimated_bytes(&self, spec: &ModelSpec) -> u128 {
        estimate_model_bytes(spec, self.max_streams + 1)
    }

    /// The server's defaults for a model named `name`: [`ModelConfig::model_defaults`] (byte-level
    /// RHN, n = 128, `ok:8`, Adam 10^-2.5, the adaptive decay's margin 0.01, updates every 8 steps
    /// at first and up to every 32 later) and `max_streams` streams.
    pub fn with_defaults(name: &str, max_streams: usize) -> Self {
        let c = ModelConfig::model_defaults(ModelConfig::default().learner);
        Self {
            name: name.to_owned(),
            vocab_size: c.vocab_size,
            cell: c.cell,
            hidden: c.hidden,
            learner: c.learner,
            tbptt_window: c.tbptt_window,
            optimizer: c.optimizer,
            lr: c.lr,
            clip: c.clip,
            clip_scope: c.clip_scope,
            ok_rank: c.ok_rank,
            gradient_before_reduction: c.gradient_before_reduction,
            influence_decay: c.influence_decay,
            influence_margin: c.influence_margin,
            tokens_per_update: c.tokens_per_update,
            tokens_per_update_ramp: c.tokens_per_update_ramp,
            tokens_per_update_start: c.tokens_per_update_start,
            update_unit: c.update_unit,
            seed: c.seed,
            init_std: c.init_std,
            uoro_epsilon: c.uoro_epsilon,
            max_streams,
        }
    }

    /// The core's configuration.
    pub fn model_config(&self) -> ModelConfig {
        ModelConfig {
            vocab_size: self.vocab_size,
            cell: self.cell,
            hidden: self.hidden,
            learner: self.learner,
            tbptt_window: self.tbptt_window,
            optimizer: self.optimizer,
            lr: self.lr,
            clip: self.clip,
            clip_scope: self.clip_scope,
            ok_rank: self.ok_rank,
            gradient_before_reduction: self.gradient_before_reduction,
            influence_decay: self.influence_decay,
            influence_margin: self.influence_margin,
            tokens_per_update: self.tokens_per_update,
            tokens_per_update_ramp: self.tokens_per_update_ramp,
            tokens_per_update_start: self.tokens_per_update_start,
            update_unit: self.update_unit,
            seed: self.seed,
            init_std: self.init_std,
            uoro_epsilon: self.uoro_epsilon,
        }
    }

    /// Whether the model reads bytes, so that requests may send UTF-8 text.
    pub fn byte_level(&self) -> bool {
        self.vocab_size == 256
    }
}

/// A model definition as a client or a config file writes it: only `name` is required, every
/// other field falls back to the server's defaults.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelRequest {
    /// The model's name.
    pub name: String,
    /// See [`ModelDefinition::vocab_size`].
    #[serde(default)]
    pub vocab_size: Option<usize>,
    /// See [`ModelDefinition::cell`].
    #[serde(default)]
    pub cell: Option<CellKind>,
    /// See [`ModelDefinition::hidden`].
    #[serde(default)]
    pub hidden: Option<usize>,
    /// See [`ModelDefinition::learner`].
    #[serde(default)]
    pub learner: Option<LearnerKind>,
    /// See [`ModelDefinition::tbptt_window`].
    #[serde(default)]
    pub tbptt_window: Option<usize>,
    /// See [`ModelDefinition::optimizer`].
    #[serde(default)]
    pub optimizer: Option<OptimizerKind>,
    /// See [`ModelDefinition::lr`].
    #[serde(default)]
    pub lr: Option<f64>,
    /// See [`ModelDefinition::clip`].
    #[serde(default)]
    pub clip: Option<f64>,
    /// See [`ModelDefinition::clip_scope`].
    #[serde(default)]
    pub clip_scope: Option<ClipScope>,
    /// See [`ModelDefinition::ok_rank`].
    #[serde(default)]
    pub ok_rank: Option<usize>,
    /// See [`ModelDefinition::gradient_before_reduction`].
    #[serde(default)]
    pub gradient_before_reduction: Option<bool>,
    /// See [`ModelDefinition::influence_decay`].
    #[serde(default)]
    pub influence_decay: Option<f64>,
    /// See [`ModelDefinition::influence_margin`]: absent takes the defaults' (for a learner that
    /// carries an influence); `null` or `"off"` (TOML has no null) turns it off.
    #[serde(default, deserialize_with = "margin_or_off", skip_serializing_if = "Option::is_none")]
    pub influence_margin: Option<Option<f64>>,
    /// See [`ModelDefinition::tokens_per_update`].
    #[serde(default)]
    pub tokens_per_update: Option<usize>,
    /// See [`ModelDefinition::tokens_per_update_ramp`].
    #[serde(default)]
    pub tokens_per_update_ramp: Option<u64>,
    /// See [`ModelDefinition::tokens_per_update_start`].
    #[serde(default)]
    pub tokens_per_update_start: Option<usize>,
    /// See [`ModelDefinition::update_unit`].
    #[serde(default)]
    pub update_unit: Option<UpdateUnit>,
    /// See [`ModelDefinition::seed`].
    #[serde(default)]
    pub seed: Option<u64>,
    /// See [`ModelDefinition::init_std`].
    #[serde(default)]
    pub init_std: Option<f64>,
    /// See [`ModelDefinition::uoro_epsilon`].
    #[serde(default)]
    pub uoro_epsilon: Option<f64>,
    /// See [`ModelDefinition::max_streams`].
    #[serde(default)]
    pub max_streams: Option<usize>,
}

/// A margin that is present: a number, or off (`null` or `"off"`: `Some(None)`), as opposed to
/// absent (`None`, through `#[serde(default)]`).
fn margin_or_off<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Option<f64>>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Margin {
        Value(f64),
        Word(String),
    }
    match Option::<Margin>::deserialize(d)? {
        None => Ok(Some(None)),
        Some(Margin::Value(m)) => Ok(Some(Some(m))),
        Some(Margin::Word(w)) if w == "off" => Ok(Some(None)),
        Some(Margin::Word(w)) => {
            Err(serde::de::Error::custom(format!("influence_margin: {w:?} is neither a number nor \"off\"")))
        }
    }
}

impl ModelRequest {
    /// Fills the missing fields from `defaults` (whose name is ignored).
    pub fn resolve(self, defaults: &ModelDefinition) -> ModelDefinition {
        let d = defaults;
        // The schedule's three settings go together (`UpdateSchedule::asked`).
        let learner = self.learner.unwrap_or(d.learner);
        let inherited = d.model_config().update_schedule().inherited_by(d.learner, learner);
        let schedule = inherited.asked(
            self.tokens_per_update,
            self.tokens_per_update_ramp,
            self.tokens_per_update_start,
            self.update_unit,
        );
        ModelDefinition {
            name: self.name,
            vocab_size: self.vocab_size.unwrap_or(d.vocab_size),
            cell: self.cell.unwrap_or(d.cell),
            hidden: self.hidden.unwrap_or(d.hidden),
            learner: self.learner.unwrap_or(d.learner),
            tbptt_window: self.tbptt_window.unwrap_or(d.tbptt_window),
            optimizer: self.optimizer.unwrap_or(d.optimizer),
            lr: self.lr.unwrap_or(d.lr),
            clip: self.clip.unwrap_or(d.clip),
            clip_scope: self.clip_scope.unwrap_or(d.clip_scope),
            ok_rank: self.ok_rank.unwrap_or(d.ok_rank),
            gradient_before_reduction: self.gradient_before_reduction.unwrap_or(d.gradient_before_reduction),
            influence_decay: self.influence_decay.unwrap_or(d.influence_decay),
            influence_margin: match self.influence_margin {
                Some(explicit) => explicit,
                None if self.learner.unwrap_or(d.learner).carries_influence() => d.influence_margin,
                None => None,
            },
            tokens_per_update: schedule.tokens_per_update,
            tokens_per_update_ramp: schedule.tokens_per_update_ramp,
            tokens_per_update_start: schedule.tokens_per_update_start,
            update_unit: schedule.unit,
            seed: self.seed.unwrap_or(d.seed),
            init_std: self.init_std.unwrap_or(d.init_std),
            uoro_epsilon: self.uoro_epsilon.unwrap_or(d.uoro_epsilon),
            max_streams: self.max_streams.unwrap_or(d.max_streams),
        }
    }
}

/// Bytes a model will hold with `slots` stream slots: weights, gradient and optimizer moments,
/// and every slot's state, learner factors and step scratch. An upper estimate, so that a
/// definition that cannot fit is refused before any allocation (a failed allocation aborts).
pub fn estimate_model_bytes(spec: &ModelSpec, slots: usize) -> u128 {
    let (n, r, k, m, vocab) =
        (spec.n as u128, spec.r as u128, spec.k as u128, spec.m as u128, spec.vocab as u128);
    let s = k * n;
    let rn = r * n;
    let weights = rn * m + vocab * (n + 1);
    // Weights, gradient, and Adam's two moments (counted for SGD too: an upper bound), and the
    // pending sum of a model whose updates wait for more than one token or step.
    let pending = u128::from(spec.config.tokens_per_update > 1);
    let model = (4 + pending) * weights;
    let step_scratch = (n + 1) + vocab + n + s + rn + k * rn + k * k * n + s;
    let learner = match spec.learner() {
        // Two alternating factor slabs, the Jacobian scratch and the `u` rows.
        LearnerKind::KfRtrl => 2 * s * rn + s * s + 2 * m + rn + 2 * (n + k * rn + 2 + rn + m),
        // R + 1 terms of `u` and `A`, their gradient scratch, weights and probabilities (the
        // product and Jacobian scratch are per thread, not per slot).
        LearnerKind::Ok => {
            let terms = spec.config.ok_rank as u128 + 1;
            terms * (m + s * rn) + terms * (rn + m) + 4 * terms
        }
        LearnerKind::Uoro => 2 * s + rn * m + 2 * rn + 2 * s,
        LearnerKind::Rtrl => 2 * s * rn * m,
        // The window (previous state, token, readout error) and the state after its last entry.
        LearnerKind::Tbptt => spec.config.tbptt_window as u128 * (s + 1 + vocab) + s,
        LearnerKind::Frozen => 0,
    };
    // TBPTT's backward pass gathers the entries of at most 512 slot-windows (one GEMM depth
    // block), whatever the number of slots.
    let shared = if spec.learner() == LearnerKind::Tbptt {
        let window = (spec.config.tbptt_window as u128).max(1);
        let chunk = (512 / window).max(1).min(slots as u128);
        chunk * window * (3 * n + vocab + 2 * rn + k * rn + k * k * n) + 2 * chunk * s + s
    } else {
        0
    };
    let floats = model + shared + slots as u128 * (step_scratch + learner) + slots as u128 * vocab;
    floats * std::mem::size_of::<f32>() as u128
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::pending::UpdateSchedule;

    #[test]
    fn names_follow_the_documented_pattern() {
        for ok in ["default", "a", "A.b_c-9", &"x".repeat(64)] {
            assert!(valid_name(ok), "{ok}");
        }
        for bad in ["", ".a", "-a", "_a", "a b", "a/b", "é", &"x".repeat(65)] {
            assert!(!valid_name(bad), "{bad}");
        }
    }

    #[test]
    fn requests_fall_back_to_defaults() {
        let d = ModelDefinition::with_defaults("x", 7);
        let r = ModelRequest { name: "m".into(), hidden: Some(16), ..Default::default() }.resolve(&d);
        assert_eq!(r.name, "m");
        assert_eq!(r.hidden, 16);
        assert_eq!(r.max_streams, 7);
        let margin = Some(crate::core::model::DEFAULT_MODEL_MARGIN);
        assert_eq!(
            r.model_config(),
            ModelConfig { hidden: 16, ..ModelConfig::model_defaults(LearnerKind::Ok) }
        );
        assert_eq!(r.model_config().influence_margin, margin);
        assert_eq!((r.tokens_per_update, r.tokens_per_update_ramp, r.tokens_per_update_start), (32, 600, 8));
        assert_eq!(r.update_unit, UpdateUnit::Steps);
        // The schedule's three counts go together: asking for one replaces the default counts; the
        // unit stays the defaults' unless asked for, on its own or with them.
        let k25 =
            ModelRequest { name: "k".into(), tokens_per_update: Some(25), ..Default::default() }.resolve(&d);
        assert_eq!(
            (k25.tokens_per_update, k25.tokens_per_update_ramp, k25.tokens_per_update_start, k25.update_unit),
            (25, 0, 1, UpdateUnit::Steps)
        );
        let tokens =
            ModelRequest { name: "t".into(), update_unit: Some(UpdateUnit::Tokens), ..Default::default() }
                .resolve(&d);
        assert_eq!(
            (tokens.tokens_per_update, tokens.tokens_per_update_ramp, tokens.tokens_per_update_start),
            (32, 600, 8),
            "the unit alone keeps the default counts"
        );
        assert_eq!(tokens.update_unit, UpdateUnit::Tokens);
        let tbptt_k4 = ModelRequest {
            name: "t".into(),
            learner: Some(LearnerKind::Tbptt),
            tokens_per_update: Some(4),
            ..Default::default()
        }
        .resolve(&d);
        assert_eq!((tbptt_k4.tokens_per_update, tbptt_k4.update_unit), (4, UpdateUnit::Steps));
        let tbptt =
            ModelRequest { name: "t".into(), learner: Some(LearnerKind::Tbptt), ..Default::default() }
                .resolve(&d)
                .model_config()
                .update_schedule();
        assert_eq!(tbptt, UpdateSchedule { unit: UpdateUnit::Steps, ..UpdateSchedule::EVERY_STEP });
        let ramp = ModelRequest { name: "k".into(), tokens_per_update_ramp: Some(5), ..Default::default() }
            .resolve(&d);
        assert_eq!(ramp.model_config().check().unwrap_err().field, "tokens_per_update_ramp", "a ramp to 1");
        // The default margin goes with a learner that carries an influence; `null` turns it off.
        let uoro = ModelRequest { name: "u".into(), learner: Some(LearnerKind::Uoro), ..Default::default() };
        assert_eq!(uoro.resolve(&d).influence_margin, margin, "UORO carries its influence as a tangent");
        let tbptt =
            ModelRequest { name: "t".into(), learner: Some(LearnerKind::Tbptt), ..Default::default() };
        assert_eq!(tbptt.resolve(&d).influence_margin, None);
        for off in
            [r#"{"name": "o", "influence_margin": null}"#, r#"{"name": "o", "influence_margin": "off"}"#]
        {
            let off: ModelRequest = serde_json::from_str(off).unwrap();
            assert_eq!(off.clone().resolve(&d).influence_margin, None);
            // Serialized and read back, an explicit off stays off (absent would take the default).
            let again: ModelRequest = serde_json::from_str(&serde_json::to_string(&off).unwrap()).unwrap();
            assert_eq!(again.influence_margin, Some(None));
        }
        assert!(serde_json::from_str::<ModelRequest>(r#"{"name": "o", "influence_margin": "on"}"#).is_err());
        let asked: ModelRequest = serde_json::from_str(r#"{"name": "a", "influence_margin": 0.05}"#).unwrap();
        assert_eq!(asked.resolve(&d).influence_margin, Some(0.05));
        let absent: ModelRequest = serde_json::from_str(r#"{"name": "b"}"#).unwrap();
        assert_eq!(absent.resolve(&d).influence_margin, margin);
    }

    /// A definition saved before the clip scope, the gradient before the reduction and the decay
    /// existed keeps its estimator and clip: checkpoints continue exactly as they were written.
    #[test]
    fn definitions_saved_before_the_new_fields_keep_their_behaviour() {
        let old = r#"{"name":"m","vocab_size":256,"cell":"rhn","hidden":8,"learner":"kf-rtrl",
            "tbptt_window":25,"optimizer":"adam","lr":0.001,"clip":1.0,"seed":0,"init_std":0.01,
            "uoro_epsilon":1e-7,"max_streams":4}"#;
        let d: ModelDefinition = serde_json::from_str(old).unwrap();
        assert_eq!(d.clip_scope, ClipScope::Global);
        assert!(!d.gradient_before_reduction);
        assert_eq!(d.influence_decay, 1.0);
        assert_eq!(
            (d.tokens_per_update, d.tokens_per_update_ramp, d.tokens_per_update_start),
            (1, 0, 1),
            "updates at every step"
        );
        assert_eq!(d.update_unit, UpdateUnit::Tokens, "the unit before there was a choice");
        let c: ModelConfig = serde_json::from_str(
            r#"{"vocab_size":4,"cell":"tanh","hidden":3,"learner":"kf-rtrl","tbptt_window":25,
            "optimizer":"sgd","lr":0.1,"clip":0.0,"seed":0,"init_std":0.1,"uoro_epsilon":0.0}"#,
        )
        .unwrap();
        assert_eq!(
            (c.clip_scope, c.gradient_before_reduction, c.influence_decay, c.update_unit),
            (ClipScope::Global, false, 1.0, UpdateUnit::Tokens)
        );
    }

    #[test]
    fn the_default_model_fits_a_few_hundred_megabytes() {
        let d = ModelDefinition::with_defaults("default", 256);
        let bytes = estimate_model_bytes(&d.model_config().check().unwrap(), 257);
        assert!(bytes > 50 << 20 && bytes < 400 << 20, "{bytes}");
    }
}
