//! Gradient estimators for the recurrent weights, one per [`LearnerKind`], each keeping its
//! per-stream state in the slots of a [`crate::core::streams::StreamSet`].
//!
//! Every learner answers the same two calls of a batched step:
//! - `gradient`: given `δ = ∂L/∂h` of each scored input, add its estimate of `∂L/∂W` (and, for
//!   TBPTT, of `∂L/∂V`) to the batch gradient and say how many contributions it added;
//! - `advance`: follow the state update `s_{t-1} → s_t` with its influence estimate.

pub mod growth;
mod kf;
mod ok;
pub mod ok_reduce;
pub(crate) mod raw;
mod rtrl;
mod tbptt;
pub mod uoro;

pub mod reference;

pub use kf::{KfRtrl, KfStrategy};
pub use ok::OkRtrl;
pub use rtrl::Rtrl;
pub use tbptt::Tbptt;
pub use uoro::{Uoro, uoro_legacy_state};

use ndarray::{Array2, ArrayView2};

use super::float::Float;
use super::model::{LearnerKind, ModelSpec, Params};
use super::optim::Gradients;
use super::slot_state::{SlotState, SlotStateError};

/// One token for one slot in a batched step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SlotStep {
    /// The slot (stream) that consumes the token.
    pub slot: usize,
    /// The token: the target of the slot's current prediction and its next input.
    pub token: u32,
    /// Whether this token's loss trains the weights.
    pub learn: bool,
    /// Whether the stream starts a new sequence (state and learner factors zeroed) first.
    pub reset: bool,
}

impl SlotStep {
    /// A learning step without reset.
    pub fn learn(slot: usize, token: u32) -> Self {
        Self { slot, token, learn: true, reset: false }
    }
}

/// What the learners see of one advance: the inputs and, row by row, the state before the step
/// and the cell's element-wise derivatives.
#[derive(Debug)]
pub(crate) struct StepInputs<'a, T> {
    /// The batch, slots strictly increasing.
    pub inputs: &'a [SlotStep],
    /// State before the step, one row per input.
    pub prev: ArrayView2<'a, T>,
    /// `D` blocks, one row per input (`k·r·n`).
    pub d: ArrayView2<'a, T>,
    /// Element-wise carry, one row per input (`k·k·n`).
    pub carry: ArrayView2<'a, T>,
    /// Sign counter of every slot before this step (advances in the slot's lifetime).
    pub sign_counter: &'a [u64],
    /// Sign key of every slot.
    pub sign_key: &'a [u64],
}

/// The learner of a model with its per-slot state.
#[derive(Debug, Clone)]
pub enum Learner<T: Float> {
    /// Kronecker-factored RTRL.
    KfRtrl(KfRtrl<T>),
    /// UORO.
    Uoro(Uoro<T>),
    /// Exact RTRL.
    Rtrl(Rtrl<T>),
    /// Truncated BPTT.
    Tbptt(Tbptt<T>),
    /// No learning.
    Frozen,
    /// Optimal Kronecker-sum RTRL.
    Ok(OkRtrl<T>),
}

impl<T: Float> Learner<T> {
    /// The learner the spec asks for, with `capacity` zeroed slots.
    pub fn new(spec: &ModelSpec, capacity: usize) -> Self {
        match spec.learner() {
            LearnerKind::KfRtrl => Learner::KfRtrl(KfRtrl::new(spec, capacity)),
            LearnerKind::Uoro => Learner::Uoro(Uoro::new(spec, capacity)),
            LearnerKind::Rtrl => Learner::Rtrl(Rtrl::new(spec, capacity)),
            LearnerKind::Tbptt => Learner::Tbptt(Tbptt::new(spec, capacity)),
            LearnerKind::Frozen => Learner::Frozen,
            LearnerKind::Ok => Learner::Ok(OkRtrl::new(spec, capacity)),
        }
    }

    /// Whether the readout gradient is taken immediately at every scored token (all but TBPTT,
    /// which accumulates it over its window).
    pub fn immediate_readout_gradient(&self) -> bool {
        !matches!(self, Learner::Tbptt(_))
    }

    /// Zeroes a slot's learner state (a new sequence).
    pub fn reset(&mut self, slot: usize) {
        if let Some(g) = self.growth_mut() {
            g.reset(slot);
        }
        match self {
            Learner::KfRtrl(l) => l.reset(slot),
            Learner::Uoro(l) => l.reset(slot),
            Learner::Rtrl(l) => l.reset(slot),
            Learner::Tbptt(l) => l.reset(slot),
            Learner::Ok(l) => l.reset(slot),
            Learner::Frozen => {}
        }
    }

    /// The Frobenius norm of a slot's carried influence estimate `‖Ĝ‖` (diagnostics: how far the
    /// carried factors have grown); `None` for learners that carry none (TBPTT, frozen).
    pub fn influence_norm(&self, slot: usize) -> Option<f64> {
        let norm =
            |x: &mut dyn Iterator<Item = T>| x.map(|v| v.to_f64_lossless().powi(2)).sum::<f64>().sqrt();
        match self {
            Learner::KfRtrl(l) => Some(l.influence_norm(slot)),
            Learner::Ok(l) => Some(l.influence_norm(slot)),
            Learner::Uoro(l) => Some(l.influence_norm(slot)),
            Learner::Rtrl(l) => Some(norm(&mut l.influence(slot).iter().copied())),
            Learner::Tbptt(_) | Learner::Frozen => None,
        }
    }

    /// Whether a slot's learner state is finite (checked only after a fault).
    pub(crate) fn slot_is_finite(&self, slot: usize) -> bool {
        if self.growth().is_some_and(|g| !g.slot_is_finite(slot)) {
            return false;
        }
        match self {
            Learner::KfRtrl(l) => l.slot_is_finite(slot),
            Learner::Uoro(l) => l.slot_is_finite(slot),
            Learner::Rtrl(l) => l.slot_is_finite(slot),
            Learner::Tbptt(l) => l.slot_is_finite(slot),
            Learner::Ok(l) => l.slot_is_finite(slot),
            Learner::Frozen => true,
        }
    }

    /// Resets a slot's learner state after a fault: as [`Learner::reset`], and TBPTT also
    /// zeroes its window buffers.
    pub(crate) fn discard(&mut self, slot: usize) {
        match self {
            Learner::Tbptt(l) => l.discard(slot),
            _ => self.reset(slot),
        }
    }

    /// Called before a reset (in `score` or in `advance`): TBPTT backpropagates the losses its
    /// window has scored so far (a boundary must not drop them); returns the contributions.
    pub(crate) fn finish_sequence(
        &mut self,
        spec: &ModelSpec,
        params: &Params<T>,
        slot: usize,
        current: &[T],
        grad: &mut Gradients<T>,
    ) -> f64 {
        match self {
            Learner::Tbptt(l) => l.finish_sequence(spec, params, slot, current, grad),
            _ => 0.0,
        }
    }

    /// Copies a slot's learner state to another slot.
    pub fn copy_slot(&mut self, src: usize, dst: usize) {
        if let Some(g) = self.growth_mut() {
            g.copy_slot(src, dst);
        }
        match self {
            Learner::KfRtrl(l) => l.copy_slot(src, dst),
            Learner::Uoro(l) => l.copy_slot(src, dst),
            Learner::Rtrl(l) => l.copy_slot(src, dst),
            Learner::Tbptt(l) => l.copy_slot(src, dst),
            Learner::Ok(l) => l.copy_slot(src, dst),
            Learner::Frozen => {}
        }
    }

    /// Appends a slot's learner state to `out` (see [`crate::core::slot_state`] for the names).
    pub(crate) fn export_slot(&self, slot: usize, out: &mut SlotState<T>) {
        match self {
            Learner::KfRtrl(l) => l.export_slot(slot, out),
            Learner::Uoro(l) => l.export_slot(slot, out),
            Learner::Rtrl(l) => l.export_slot(slot, out),
            Learner::Tbptt(l) => l.export_slot(slot, out),
            Learner::Ok(l) => l.export_slot(slot, out),
            Learner::Frozen => {}
        }
        if let Some(g) = self.growth() {
            g.export_slot(slot, out);
        }
    }

    /// Checks the values of a [`SlotState`] whose layout was checked (counters, tokens).
    pub(crate) fn check_import(&self, spec: &ModelSpec, state: &SlotState<T>) -> Result<(), SlotStateError> {
        match self {
            Learner::Tbptt(l) => l.check_import(spec.vocab, state),
            Learner::KfRtrl(l) => l.check_import(spec.vocab, state),
            _ => Ok(()),
        }
    }

    /// Overwrites a slot's learner state with a checked [`SlotState`]'s.
    pub(crate) fn import_slot(&mut self, slot: usize, state: &SlotState<T>) {
        match self {
            Learner::KfRtrl(l) => l.import_slot(slot, state),
            Learner::Uoro(l) => l.import_slot(slot, state),
            Learner::Rtrl(l) => l.import_slot(slot, state),
            Learner::Tbptt(l) => l.import_slot(slot, state),
            Learner::Ok(l) => l.import_slot(slot, state),
            Learner::Frozen => {}
        }
        if let Some(g) = self.growth_mut() {
            g.import_slot(slot, state);
        }
    }

    /// The adaptive decay's probes, when the model sets `influence_margin`.
    pub fn growth(&self) -> Option<&growth::GrowthProbe<T>> {
        match self {
            Learner::KfRtrl(l) => l.growth.as_ref(),
            Learner::Ok(l) => l.growth.as_ref(),
            Learner::Rtrl(l) => l.growth.as_ref(),
            Learner::Uoro(l) => l.growth.as_ref(),
            _ => None,
        }
    }

    fn growth_mut(&mut self) -> Option<&mut growth::GrowthProbe<T>> {
        match self {
            Learner::KfRtrl(l) => l.growth.as_mut(),
            Learner::Ok(l) => l.growth.as_mut(),
            Learner::Rtrl(l) => l.growth.as_mut(),
            Learner::Uoro(l) => l.growth.as_mut(),
            _ => None,
        }
    }

    /// Adds the gradient estimates of the scored inputs to `grad`; returns their count.
    /// `delta_h`, `err` and `h1` hold one row per input: `∂L/∂h`, `softmax − onehot` and `[h; 1]`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn gradient(
        &mut self,
        spec: &ModelSpec,
        params: &Params<T>,
        inputs: &[SlotStep],
        delta_h: ArrayView2<'_, T>,
        err: ArrayView2<'_, T>,
        h1: ArrayView2<'_, T>,
        states: &Array2<T>,
        grad: &mut Gradients<T>,
    ) -> f64 {
        match self {
            Learner::KfRtrl(l) => l.gradient(spec, inputs, delta_h, grad),
            Learner::Uoro(l) => l.gradient(spec, inputs, delta_h, grad),
            Learner::Rtrl(l) => l.gradient(spec, inputs, delta_h, grad),
            Learner::Tbptt(l) => l.gradient(spec, params, inputs, err, h1, states, grad),
            Learner::Ok(l) => l.gradient(spec, inputs, delta_h, grad),
            Learner::Frozen => 0.0,
        }
    }

    /// Follows one advance of the batch.
    pub(crate) fn advance(&mut self, spec: &ModelSpec, params: &Params<T>, step: &StepInputs<'_, T>) {
        match self {
            Learner::KfRtrl(l) => l.advance(spec, params, step),
            Learner::Uoro(l) => l.advance(spec, params, step),
            Learner::Rtrl(l) => l.advance(spec, params, step),
            Learner::Tbptt(l) => l.advance(step),
            Learner::Ok(l) => l.advance(spec, params, step),
            Learner::Frozen => {}
        }
    }
}

/// Writes the dense `a_t = [onehot(token); h_prev; 1]` (length `m`).
pub fn dense_input<T: Float>(spec: &ModelSpec, token: u32, h_prev: &[T], a: &mut [T]) {
    a.fill(T::zero());
    a[token as usize] = T::one();
    a[spec.h_col()..spec.h_col() + spec.n].copy_from_slice(h_prev);
    a[spec.bias_col()] = T::one();
}

/// Runs `f(i)` for every input index, on the pool when there is more than one: for a single
/// stream the hand-off to another thread costs more than the work.
pub(crate) fn for_each_input(nb: usize, f: impl Fn(usize) + Sync + Send) {
    use rayon::prelude::*;
    if nb <= 1 { (0..nb).for_each(f) } else { (0..nb).into_par_iter().for_each(f) }
}
