//! The named choices of a model configuration: the gradient estimator ([`LearnerKind`]), the
//! optimizer ([`OptimizerKind`]), what the gradient clip measures ([`ClipScope`]) and what the
//! update schedule counts ([`UpdateUnit`]), with the names the command line, model definitions
//! and files use for them.

use serde::{Deserialize, Serialize};

/// How a model estimates the gradient of its recurrent weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum LearnerKind {
    /// Kronecker-factored RTRL: unbiased, `O(r n³)` per step, memory `O(r n²)` per stream.
    #[serde(rename = "kf-rtrl")]
    KfRtrl,
    /// Unbiased Online Recurrent Optimization: unbiased, `O(P)` per step, high variance.
    #[serde(rename = "uoro")]
    Uoro,
    /// Exact RTRL: the full influence matrix, `O(r n⁴)` per step; an oracle for small `n`.
    #[serde(rename = "rtrl")]
    Rtrl,
    /// Truncated BPTT with a window of `tbptt_window` steps; one update per window.
    #[serde(rename = "tbptt")]
    Tbptt,
    /// No learning: the weights never change.
    #[serde(rename = "frozen")]
    Frozen,
    /// Optimal Kronecker-sum RTRL (OK.md §2): the minimum-variance unbiased rank-`ok_rank`
    /// member of KF-RTRL's class; `O(R n³)` per step, memory `O(R n²)` per stream.
    #[serde(rename = "ok")]
    Ok,
}

impl LearnerKind {
    /// Whether the learner carries an influence estimate through the state Jacobians (KF-RTRL, OK,
    /// exact RTRL, UORO's tangent `s̃`): the only ones an influence decay or margin applies to.
    pub fn carries_influence(self) -> bool {
        matches!(self, LearnerKind::KfRtrl | LearnerKind::Ok | LearnerKind::Rtrl | LearnerKind::Uoro)
    }

    /// The wire name.
    pub fn name(self) -> &'static str {
        match self {
            LearnerKind::KfRtrl => "kf-rtrl",
            LearnerKind::Uoro => "uoro",
            LearnerKind::Rtrl => "rtrl",
            LearnerKind::Tbptt => "tbptt",
            LearnerKind::Frozen => "frozen",
            LearnerKind::Ok => "ok",
        }
    }

    /// Parses a wire name.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "kf-rtrl" | "kfrtrl" => LearnerKind::KfRtrl,
            "uoro" => LearnerKind::Uoro,
            "rtrl" => LearnerKind::Rtrl,
            "tbptt" => LearnerKind::Tbptt,
            "frozen" => LearnerKind::Frozen,
            "ok" => LearnerKind::Ok,
            _ => return None,
        })
    }
}

impl std::fmt::Display for LearnerKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The optimizer applied to the averaged gradient of each step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OptimizerKind {
    /// Adam (β1 0.9, β2 0.999, ε 1e-8).
    Adam,
    /// Plain stochastic gradient descent.
    Sgd,
}

impl OptimizerKind {
    /// The wire name.
    pub fn name(self) -> &'static str {
        match self {
            OptimizerKind::Adam => "adam",
            OptimizerKind::Sgd => "sgd",
        }
    }

    /// Parses a wire name.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "adam" => Some(OptimizerKind::Adam),
            "sgd" => Some(OptimizerKind::Sgd),
            _ => None,
        }
    }
}

/// Which weights the gradient-norm clip measures and scales.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ClipScope {
    /// One norm over `W` and `V` together, both scaled (the scope before it was a choice). A
    /// noisy recurrent estimate then shrinks the readout's exact gradient with it.
    Global,
    /// `W`'s norm alone, `V` never clipped: the authors' recipe (OK.md §1.1).
    Recurrent,
    /// `W` and `V` each clipped to the bound on their own.
    PerGroup,
}

impl ClipScope {
    /// The wire name.
    pub fn name(self) -> &'static str {
        match self {
            ClipScope::Global => "global",
            ClipScope::Recurrent => "recurrent",
            ClipScope::PerGroup => "per-group",
        }
    }

    /// Parses a wire name.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "global" => Some(ClipScope::Global),
            "recurrent" => Some(ClipScope::Recurrent),
            "per-group" => Some(ClipScope::PerGroup),
            _ => None,
        }
    }
}

/// What the update schedule (`tokens_per_update` and its ramp) counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UpdateUnit {
    /// Every token of every stream: a step of `B` streams counts `B`, so a model with as many
    /// busy streams as `tokens_per_update` updates at every step (the unit before it was a
    /// choice).
    Tokens,
    /// The model's batched steps: a step that learns counts 1 whatever number of streams it
    /// carries (a step without a learning token counts 0), so with every stream busy each one
    /// sees an update every `tokens_per_update` of its own tokens, as a lone stream does, and the
    /// update averages the tokens of all of them.
    Steps,
}

impl UpdateUnit {
    /// The wire name.
    pub fn name(self) -> &'static str {
        match self {
            UpdateUnit::Tokens => "tokens",
            UpdateUnit::Steps => "steps",
        }
    }

    /// Parses a wire name.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "tokens" => Some(UpdateUnit::Tokens),
            "steps" => Some(UpdateUnit::Steps),
            _ => None,
        }
    }
}
