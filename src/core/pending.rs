//! Updates that wait for enough tokens (`tokens_per_update`): the optimizer applies the average
//! of the token gradients accumulated since its last update once there are at least that many,
//! over any streams and steps. A server step carries one token of each active stream, so a busy
//! model (as many streams as `tokens_per_update` or more) updates at every step as before, while
//! a lone stream updates every `tokens_per_update` tokens instead of at every token: the per-token
//! Adam steps of one stream are mostly noise, and they walk its weights into dynamics that no
//! longer contract (docs/RESULTS.md §4). Every token's gradient is still taken online and without
//! truncation; only its application waits, as TBPTT's waits for the end of its window.
//! `tokens_per_update_ramp` reaches the count gradually, from `tokens_per_update_start` tokens per
//! update for a fresh model.

use super::float::Float;
use super::model::{
    DEFAULT_MODEL_TOKENS_PER_UPDATE, DEFAULT_MODEL_TOKENS_PER_UPDATE_RAMP,
    DEFAULT_MODEL_TOKENS_PER_UPDATE_START, LearnerKind, ModelSpec, Params,
};
use super::optim::{Gradients, Optimizer, OptimizerStateError, UpdateOutcome};

/// The three settings of the update schedule (`tokens_per_update`, `_ramp`, `_start`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UpdateSchedule {
    /// Tokens per update once the ramp is done.
    pub tokens_per_update: usize,
    /// Updates per level of the ramp (0: none).
    pub tokens_per_update_ramp: u64,
    /// Tokens the ramp starts from.
    pub tokens_per_update_start: usize,
}

impl UpdateSchedule {
    /// An update at every step, as before the choice.
    pub const EVERY_STEP: Self =
        Self { tokens_per_update: 1, tokens_per_update_ramp: 0, tokens_per_update_start: 1 };

    /// The schedule of a new model with `learner` (the server's default model, a fresh `kfrtrl
    /// train` model): 32 tokens per update, reached from 8 by 600 updates per count; TBPTT
    /// updates at every step (its window already gathers `K` tokens into one update).
    pub fn default_for(learner: LearnerKind) -> Self {
        if learner == LearnerKind::Tbptt {
            return Self::EVERY_STEP;
        }
        Self {
            tokens_per_update: DEFAULT_MODEL_TOKENS_PER_UPDATE,
            tokens_per_update_ramp: DEFAULT_MODEL_TOKENS_PER_UPDATE_RAMP,
            tokens_per_update_start: DEFAULT_MODEL_TOKENS_PER_UPDATE_START,
        }
    }

    /// The schedule a user asked for on top of `self` (the defaults): the three settings go
    /// together, so that asking for any of them replaces the whole default schedule and the
    /// others take their every-step values (`tokens_per_update` 25 alone is 25 from the first
    /// update, not a ramp to 25 from the defaults' start).
    pub fn asked(self, tokens_per_update: Option<usize>, ramp: Option<u64>, start: Option<usize>) -> Self {
        if tokens_per_update.is_none() && ramp.is_none() && start.is_none() {
            return self;
        }
        let base = Self::EVERY_STEP;
        Self {
            tokens_per_update: tokens_per_update.unwrap_or(base.tokens_per_update),
            tokens_per_update_ramp: ramp.unwrap_or(base.tokens_per_update_ramp),
            tokens_per_update_start: start.unwrap_or(base.tokens_per_update_start),
        }
    }
}

impl UpdateSchedule {
    /// The tokens the update after `updates` applied ones waits for:
    /// `min(tokens_per_update, start + ⌊updates / ramp⌋)`, or `tokens_per_update` without a ramp.
    pub fn due(&self, updates: u64) -> f64 {
        let every = self.tokens_per_update as f64;
        match self.tokens_per_update_ramp {
            0 => every,
            ramp => every.min(self.tokens_per_update_start as f64 + (updates / ramp) as f64),
        }
    }
}

/// The token gradients accumulated since the last update.
#[derive(Debug, Clone, PartialEq)]
pub struct PendingUpdate<T> {
    /// The schedule the updates follow (the model's).
    pub schedule: UpdateSchedule,
    /// The sum of the accumulated token gradients (not yet averaged).
    pub sum: Gradients<T>,
    /// How many token gradients `sum` holds.
    pub tokens: f64,
}

impl<T: Float> PendingUpdate<T> {
    /// An empty accumulator, or `None` when the model updates at every step.
    pub fn new(spec: &ModelSpec) -> Option<Self> {
        let schedule = spec.config.update_schedule();
        (schedule.tokens_per_update > 1).then(|| Self { schedule, sum: Gradients::zeros(spec), tokens: 0.0 })
    }

    /// The tokens the update after `updates` applied ones waits for ([`UpdateSchedule::due`]).
    pub fn due(&self, updates: u64) -> f64 {
        self.schedule.due(updates)
    }
}

impl<T: Float> Optimizer<T> {
    /// Takes one step's averaged gradient `grad` of `contributions` tokens: applied now when the
    /// model updates at every step, else added to the pending sum and applied, averaged, once
    /// the sum holds the tokens the next update is due ([`PendingUpdate::due`]). `None` when
    /// nothing was applied (no contributions, or the sum still waits); a `grad` that `apply`
    /// would refuse (not finite, or too large once clipped) is refused at its own step, without
    /// touching the sum, so that the step at fault is the one whose streams are examined.
    pub fn step(
        &mut self,
        params: &mut Params<T>,
        grad: &Gradients<T>,
        contributions: f64,
    ) -> Option<UpdateOutcome> {
        if contributions <= 0.0 {
            return None;
        }
        if self.pending.is_none() {
            return Some(self.apply(params, grad));
        }
        // Refused on its own as `apply` would refuse it, so that the sum (and the update it
        // makes) only ever holds gradients an every-step model would have applied.
        if self.would_refuse(grad) {
            return Some(UpdateOutcome::NonFinite);
        }
        let updates = self.steps;
        let pending = self.pending.as_mut().expect("checked above");
        pending.sum.add_scaled(grad, T::from_f64_rounded(contributions));
        pending.tokens += contributions;
        if pending.tokens < pending.due(updates) {
            return None;
        }
        let tokens = std::mem::take(&mut pending.tokens);
        pending.sum.scale(T::from_f64_rounded(1.0 / tokens));
        // The sum is taken out for the update (which borrows the optimizer) and put back cleared.
        let mut pending = self.pending.take().expect("pending");
        let outcome = self.apply(params, &pending.sum);
        pending.sum.clear();
        self.pending = Some(pending);
        Some(outcome)
    }

    /// The accumulated, not yet applied, gradient sum and its token count (`None` when the model
    /// updates at every step).
    pub fn pending(&self) -> Option<(&Gradients<T>, f64)> {
        self.pending.as_ref().map(|p| (&p.sum, p.tokens))
    }

    /// Restores a saved pending sum: its shape must fit, its values be finite and its count below
    /// what the next update waits for (call after the update count is restored).
    pub fn restore_pending(&mut self, sum: Gradients<T>, tokens: f64) -> Result<(), OptimizerStateError> {
        let Some(pending) = self.pending.as_mut() else {
            return Err(OptimizerStateError::UnexpectedPending);
        };
        if sum.w.dim() != pending.sum.w.dim() || sum.v.dim() != pending.sum.v.dim() {
            return Err(OptimizerStateError::Shape {
                expected: [pending.sum.w.dim(), pending.sum.v.dim()],
                found: [sum.w.dim(), sum.v.dim()],
            });
        }
        let due = pending.due(self.steps);
        if !(tokens.is_finite() && tokens >= 0.0 && tokens < due && sum.norm().is_finite()) {
            return Err(OptimizerStateError::BadPending);
        }
        pending.sum = sum.into_standard_layout();
        pending.tokens = tokens;
        Ok(())
    }
}
