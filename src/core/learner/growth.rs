//! The adaptive influence decay (`influence_margin`): per stream, a tangent vector carried through
//! the exact state Jacobians `H_t` measures the growth rate of the true influence (a running
//! finite-time Lyapunov exponent `λ̂`), and the carried influence is multiplied by
//! `γ_t = exp(−max(0, λ̂_t + ε))` at every step. Where the dynamics contract by more than the
//! margin `ε`, `γ_t = 1` exactly and the learner is the unbiased one; where they do not
//! (docs/RESULTS.md §4: carry gates at 1, then chaos), the true influence itself explodes and
//! no unbiased learner can follow it, so the estimate is discounted just enough to contract by
//! `ε` a step: the exact gradient of a past discounted by `γ_t`, a bias asked for explicitly.
//!
//! The probe's state (the tangent and `λ̂`) is part of the slot's state, so that a restored
//! stream continues bit for bit.

use ndarray::{Array2, ArrayView2};

use super::raw::SlotRows;
use crate::core::float::{Float, all_finite, dot_f64, sum_squares};
use crate::core::linalg::jacobian_times;
use crate::core::model::ModelSpec;
use crate::core::slot_state::{SlotState, names};

/// Weight of the newest step in the running growth rate (a memory of about 64 steps).
pub const GROWTH_RATE_WEIGHT: f64 = 1.0 / 64.0;

/// The per-slot probes of a learner whose model sets `influence_margin`.
#[derive(Debug, Clone)]
pub struct GrowthProbe<T> {
    margin: f64,
    /// Unit tangent `v` per slot, `capacity × s`.
    tangent: Array2<T>,
    /// Running growth rate `λ̂` per slot.
    rate: Vec<T>,
    /// Scratch per slot: `W_h v` (`r·n`) and `H_t v` (`s`).
    wv: Array2<T>,
    next: Array2<T>,
}

impl<T: Float> GrowthProbe<T> {
    /// Probes for `capacity` slots, or `None` when the model has no `influence_margin`.
    pub fn new(spec: &ModelSpec, capacity: usize) -> Option<Self> {
        let margin = spec.config.influence_margin?;
        let s = spec.state_len();
        let mut probe = Self {
            margin,
            tangent: Array2::zeros((capacity, s)),
            rate: vec![T::zero(); capacity],
            wv: Array2::zeros((capacity, spec.gate_rows())),
            next: Array2::zeros((capacity, s)),
        };
        (0..capacity).for_each(|slot| probe.reset(slot));
        Some(probe)
    }

    /// A new stream's probe: the normalized all-ones tangent and a rate of 0 (so the first
    /// steps are discounted by `exp(−ε)` until the rate is measured).
    pub(super) fn reset(&mut self, slot: usize) {
        let s = self.tangent.ncols();
        self.tangent.row_mut(slot).fill(T::from_f64_rounded(1.0 / (s as f64).sqrt()));
        self.rate[slot] = T::zero();
    }

    pub(super) fn copy_slot(&mut self, src: usize, dst: usize) {
        let v = self.tangent.row(src).to_owned();
        self.tangent.row_mut(dst).assign(&v);
        self.rate[dst] = self.rate[src];
    }

    pub(super) fn export_slot(&self, slot: usize, out: &mut SlotState<T>) {
        out.push_tensor(names::GROWTH_TANGENT, vec![self.tangent.ncols()], self.tangent.row(slot).to_vec());
        out.push_tensor(names::GROWTH_RATE, vec![], vec![self.rate[slot]]);
    }

    /// Writes a checked state's probe into a slot.
    pub(super) fn import_slot(&mut self, slot: usize, state: &SlotState<T>) {
        let tensor = |name| state.tensor(name).expect("checked layout");
        self.tangent
            .row_mut(slot)
            .as_slice_mut()
            .expect("rows")
            .copy_from_slice(tensor(names::GROWTH_TANGENT));
        self.rate[slot] = tensor(names::GROWTH_RATE)[0];
    }

    pub(super) fn slot_is_finite(&self, slot: usize) -> bool {
        all_finite(self.tangent.row(slot)) && self.rate[slot].is_finite()
    }

    /// The running growth rate `λ̂` of a slot.
    pub fn rate(&self, slot: usize) -> T {
        self.rate[slot]
    }

    /// Row access for the learners' parallel advances.
    pub(super) fn rows(&mut self) -> ProbeRows<T> {
        ProbeRows {
            margin: self.margin,
            tangent: SlotRows::new(&mut self.tangent),
            rate: SlotRows::new_vec(&mut self.rate),
            wv: SlotRows::new(&mut self.wv),
            next: SlotRows::new(&mut self.next),
        }
    }
}

/// Raw per-slot access to a [`GrowthProbe`] inside a parallel advance.
pub(super) struct ProbeRows<T> {
    margin: f64,
    tangent: SlotRows<T>,
    rate: SlotRows<T>,
    wv: SlotRows<T>,
    next: SlotRows<T>,
}

impl<T: Float> ProbeRows<T> {
    /// Steps slot `b`'s probe through this step's `H_t` (from `W_h`, the cell's `D_t` and carry
    /// as [`crate::core::linalg::jacobian`] takes them) and returns the step's factor `γ_t`.
    ///
    /// # Safety
    /// No other task may use slot `b` at the same time.
    pub(super) unsafe fn step(
        &self,
        spec: &ModelSpec,
        w_h: ArrayView2<'_, T>,
        d: &[T],
        carry: &[T],
        b: usize,
    ) -> T {
        // SAFETY: the caller owns slot `b`.
        let (v, rate, wv, next) =
            unsafe { (self.tangent.row(b), &mut self.rate.row(b)[0], self.wv.row(b), self.next.row(b)) };
        let hoff = spec.h_offset();
        for (q_row, out) in wv.iter_mut().enumerate() {
            let row = w_h.row(q_row);
            *out =
                T::from_f64_rounded(dot_f64(row.as_slice().expect("rows of W_h are contiguous"), &v[hoff..]));
        }
        jacobian_times(spec, d, carry, v, wv, next);
        let growth = sum_squares(next).sqrt();
        if growth > 0.0 && growth.is_finite() {
            let inv = T::from_f64_rounded(1.0 / growth);
            v.iter_mut().zip(next.iter()).for_each(|(x, &y)| *x = y * inv);
        }
        // A zero or overflowing tangent keeps its direction; its growth is clamped either way.
        let log_growth = if growth > 0.0 { growth.ln().clamp(-50.0, 50.0) } else { -50.0 };
        let updated = (1.0 - GROWTH_RATE_WEIGHT) * rate.to_f64_lossless() + GROWTH_RATE_WEIGHT * log_growth;
        *rate = T::from_f64_rounded(updated);
        T::from_f64_rounded((-(rate.to_f64_lossless() + self.margin).max(0.0)).exp())
    }
}
