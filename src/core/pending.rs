//! Updates that wait (`tokens_per_update`): the optimizer applies the average of the gradients
//! accumulated since its last update once they cover enough tokens or steps ([`UpdateUnit`]).
//! The per-token Adam steps of one stream are mostly noise, and they walk its weights into
//! dynamics that no longer contract (docs/RESULTS.md §4); so do per-step updates of many streams,
//! which is why new models count the model's batched steps (`steps`: with every stream busy, each
//! one sees an update every `tokens_per_update` of its own tokens, as a lone stream does) rather
//! than the tokens of all streams (`tokens`, under which a model with that many busy streams
//! updates at every step). Every token's gradient is still taken online and without truncation;
//! only its application waits, as TBPTT's waits for the end of its window.
//! `tokens_per_update_ramp` reaches the count gradually, from `tokens_per_update_start` for a
//! fresh model.

use super::float::Float;
use super::model::{
    DEFAULT_MODEL_TOKENS_PER_UPDATE, DEFAULT_MODEL_TOKENS_PER_UPDATE_RAMP,
    DEFAULT_MODEL_TOKENS_PER_UPDATE_START, LearnerKind, ModelSpec, Params, UpdateUnit,
};
use super::optim::{Gradients, Optimizer, OptimizerStateError, UpdateOutcome};

/// The settings of the update schedule (`tokens_per_update`, `_ramp`, `_start`, and the unit
/// they count in).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UpdateSchedule {
    /// Tokens (or steps) per update once the ramp is done.
    pub tokens_per_update: usize,
    /// Updates per level of the ramp (0: none).
    pub tokens_per_update_ramp: u64,
    /// Tokens (or steps) the ramp starts from.
    pub tokens_per_update_start: usize,
    /// What the three count.
    pub unit: UpdateUnit,
}

impl UpdateSchedule {
    /// An update at every step, as before the choice.
    pub const EVERY_STEP: Self = Self {
        tokens_per_update: 1,
        tokens_per_update_ramp: 0,
        tokens_per_update_start: 1,
        unit: UpdateUnit::Tokens,
    };

    /// The schedule of a new model with `learner` (the server's default model, a fresh `kfrtrl
    /// train` model): an update every 32 steps, reached from 8 by 600 updates per count; TBPTT
    /// updates at every step (its window already gathers `K` tokens into one update). Both count
    /// steps, so that a `tokens_per_update` asked for later counts steps too.
    pub fn default_for(learner: LearnerKind) -> Self {
        if learner == LearnerKind::Tbptt {
            return Self { unit: UpdateUnit::Steps, ..Self::EVERY_STEP };
        }
        Self {
            tokens_per_update: DEFAULT_MODEL_TOKENS_PER_UPDATE,
            tokens_per_update_ramp: DEFAULT_MODEL_TOKENS_PER_UPDATE_RAMP,
            tokens_per_update_start: DEFAULT_MODEL_TOKENS_PER_UPDATE_START,
            unit: UpdateUnit::Steps,
        }
    }

    /// The schedule a model running `learner` inherits from defaults made for `defaults_learner`
    /// whose schedule is `self`: theirs, except that TBPTT asked for on top of another learner's
    /// defaults updates at every step (its window already gathers its tokens into one update),
    /// counting in the defaults' unit.
    pub fn inherited_by(self, defaults_learner: LearnerKind, learner: LearnerKind) -> Self {
        if learner == LearnerKind::Tbptt && defaults_learner != LearnerKind::Tbptt {
            Self { unit: self.unit, ..Self::EVERY_STEP }
        } else {
            self
        }
    }

    /// The schedule a user asked for on top of `self` (the defaults): the three counts go
    /// together, so that asking for any of them replaces the default counts and the others take
    /// their every-step values (`tokens_per_update` 25 alone is 25 from the first update, not a
    /// ramp to 25 from the defaults' start); the unit is the one asked for, else the defaults'.
    pub fn asked(
        self,
        tokens_per_update: Option<usize>,
        ramp: Option<u64>,
        start: Option<usize>,
        unit: Option<UpdateUnit>,
    ) -> Self {
        let unit = unit.unwrap_or(self.unit);
        if tokens_per_update.is_none() && ramp.is_none() && start.is_none() {
            return Self { unit, ..self };
        }
        let base = Self::EVERY_STEP;
        Self {
            tokens_per_update: tokens_per_update.unwrap_or(base.tokens_per_update),
            tokens_per_update_ramp: ramp.unwrap_or(base.tokens_per_update_ramp),
            tokens_per_update_start: start.unwrap_or(base.tokens_per_update_start),
            unit,
        }
    }
}

impl UpdateSchedule {
    /// The tokens (or steps) the update after `updates` applied ones waits for:
    /// `min(tokens_per_update, start + ⌊updates / ramp⌋)`, or `tokens_per_update` without a ramp.
    pub fn due(&self, updates: u64) -> f64 {
        let every = self.tokens_per_update as f64;
        match self.tokens_per_update_ramp {
            0 => every,
            ramp => every.min(self.tokens_per_update_start as f64 + (updates / ramp) as f64),
        }
    }
}

/// The gradients accumulated since the last update.
#[derive(Debug, Clone, PartialEq)]
pub struct PendingUpdate<T> {
    /// The schedule the updates follow (the model's).
    pub schedule: UpdateSchedule,
    /// The sum of the accumulated gradients (not yet averaged), each step's weighted by its
    /// count.
    pub sum: Gradients<T>,
    /// How many tokens (or steps, per the schedule's unit) `sum` holds.
    pub count: f64,
}

impl<T: Float> PendingUpdate<T> {
    /// An empty accumulator, or `None` when the model updates at every step.
    pub fn new(spec: &ModelSpec) -> Option<Self> {
        let schedule = spec.config.update_schedule();
        (schedule.tokens_per_update > 1).then(|| Self { schedule, sum: Gradients::zeros(spec), count: 0.0 })
    }

    /// The count the update after `updates` applied ones waits for ([`UpdateSchedule::due`]).
    pub fn due(&self, updates: u64) -> f64 {
        self.schedule.due(updates)
    }

    /// What a step of `contributions` tokens adds to the count.
    pub fn weight(&self, contributions: f64) -> f64 {
        match self.schedule.unit {
            UpdateUnit::Tokens => contributions,
            UpdateUnit::Steps => 1.0,
        }
    }
}

impl<T: Float> Optimizer<T> {
    /// Takes one step's averaged gradient `grad` of `contributions` tokens: applied now when the
    /// model updates at every step, else added to the pending sum (weighted by its count: its
    /// tokens, or 1 when the schedule counts steps) and applied, averaged, once the sum holds the
    /// count the next update is due ([`PendingUpdate::due`]). `None` when
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
        let weight = pending.weight(contributions);
        pending.sum.add_scaled(grad, T::from_f64_rounded(weight));
        pending.count += weight;
        if pending.count < pending.due(updates) {
            return None;
        }
        let count = std::mem::take(&mut pending.count);
        pending.sum.scale(T::from_f64_rounded(1.0 / count));
        // The sum is taken out for the update (which borrows the optimizer) and put back cleared.
        let mut pending = self.pending.take().expect("pending");
        let outcome = self.apply(params, &pending.sum);
        pending.sum.clear();
        self.pending = Some(pending);
        Some(outcome)
    }

    /// The accumulated, not yet applied, gradient sum and its count (tokens or steps; `None` when
    /// the model updates at every step).
    pub fn pending(&self) -> Option<(&Gradients<T>, f64)> {
        self.pending.as_ref().map(|p| (&p.sum, p.count))
    }

    /// Restores a saved pending sum: its shape must fit, its values be finite and its count below
    /// what the next update waits for (call after the update count is restored).
    pub fn restore_pending(&mut self, sum: Gradients<T>, count: f64) -> Result<(), OptimizerStateError> {
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
        if !(count.is_finite() && count >= 0.0 && count < due && sum.norm().is_finite()) {
            return Err(OptimizerStateError::BadPending);
        }
        pending.sum = sum.into_standard_layout();
        pending.count = count;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tbptt_on_another_learners_defaults_updates_every_step_in_their_unit() {
        let defaults = UpdateSchedule::default_for(LearnerKind::Ok);
        assert_eq!(defaults.inherited_by(LearnerKind::Ok, LearnerKind::KfRtrl), defaults);
        let steps_every = UpdateSchedule { unit: UpdateUnit::Steps, ..UpdateSchedule::EVERY_STEP };
        assert_eq!(defaults.inherited_by(LearnerKind::Ok, LearnerKind::Tbptt), steps_every);
        let in_tokens = UpdateSchedule { unit: UpdateUnit::Tokens, ..defaults };
        assert_eq!(in_tokens.inherited_by(LearnerKind::Ok, LearnerKind::Tbptt), UpdateSchedule::EVERY_STEP);
        // TBPTT's own defaults (or a schedule asked for them) stay as they are.
        let own = UpdateSchedule { tokens_per_update: 4, ..steps_every };
        assert_eq!(own.inherited_by(LearnerKind::Tbptt, LearnerKind::Tbptt), own);
    }
}
