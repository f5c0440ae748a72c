//! Updates that wait for enough tokens (`tokens_per_update`): the optimizer applies the average
//! of the token gradients accumulated since its last update once there are at least that many,
//! over any streams and steps. A server step carries one token of each active stream, so a busy
//! model (as many streams as `tokens_per_update` or more) updates at every step as before, while
//! a lone stream updates every `tokens_per_update` tokens instead of at every token: the per-token
//! Adam steps of one stream are mostly noise, and they walk its weights into dynamics that no
//! longer contract (docs/RESULTS.md §4). Every token's gradient is still taken online and without
//! truncation; only its application waits, as TBPTT's waits for the end of its window.

use super::float::Float;
use super::model::{ModelSpec, Params};
use super::optim::{Gradients, Optimizer, OptimizerStateError, UpdateOutcome};

/// The token gradients accumulated since the last update.
#[derive(Debug, Clone, PartialEq)]
pub struct PendingUpdate<T> {
    /// Tokens per update.
    pub every: f64,
    /// The sum of the accumulated token gradients (not yet averaged).
    pub sum: Gradients<T>,
    /// How many token gradients `sum` holds.
    pub tokens: f64,
}

impl<T: Float> PendingUpdate<T> {
    /// An empty accumulator, or `None` when the model updates at every step.
    pub fn new(spec: &ModelSpec) -> Option<Self> {
        let every = spec.config.tokens_per_update;
        (every > 1).then(|| Self { every: every as f64, sum: Gradients::zeros(spec), tokens: 0.0 })
    }
}

impl<T: Float> Optimizer<T> {
    /// Takes one step's averaged gradient `grad` of `contributions` tokens: applied now when the
    /// model updates at every step, else added to the pending sum and applied, averaged, once
    /// the sum holds at least `tokens_per_update` tokens. `None` when nothing was applied (no
    /// contributions, or the sum still waits); a `grad` that `apply` would refuse (not finite,
    /// or too large once clipped) is refused at its own step, without touching the sum, so that
    /// the step at fault is the one whose streams are examined.
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
        let pending = self.pending.as_mut().expect("checked above");
        pending.sum.add_scaled(grad, T::from_f64_rounded(contributions));
        pending.tokens += contributions;
        if pending.tokens < pending.every {
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

    /// Restores a saved pending sum: its shape must fit and its values be finite.
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
        if !(tokens.is_finite() && tokens >= 0.0 && tokens < pending.every && sum.norm().is_finite()) {
            return Err(OptimizerStateError::BadPending);
        }
        pending.sum = sum.into_standard_layout();
        pending.tokens = tokens;
        Ok(())
    }
}
