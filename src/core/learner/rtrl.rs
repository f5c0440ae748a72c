//! Exact RTRL (KF-RTRL.md §2): the full influence matrix `G_t = H_t G_{t-1} + F_t` per stream,
//! `k·n × P`. It costs `O(k²n²P)` per step and is the oracle the estimators are tested against.

use ndarray::{Array3, ArrayView2, ArrayViewMut2, Axis, s};

use super::SlotStep;
use super::raw::SlotRows;
use super::{StepInputs, for_each_input};
use crate::core::float::{Float, all_finite};
use crate::core::linalg::{Par, gemm, jacobian};
use crate::core::model::{ModelSpec, Params};
use crate::core::optim::Gradients;
use crate::core::slot_state::{SlotState, names};

/// Exact influence matrices of every slot.
#[derive(Debug, Clone)]
pub struct Rtrl<T> {
    /// The adaptive decay's probes (`influence_margin`), if the model sets it.
    pub(super) growth: Option<super::growth::GrowthProbe<T>>,
    /// `capacity × s × P`, columns ordered like the entries of `W` (row-major).
    g: Array3<T>,
    tmp: Array3<T>,
    jac: Array3<T>,
}

impl<T: Float> Rtrl<T> {
    /// Zero influence for `capacity` slots.
    pub fn new(spec: &ModelSpec, capacity: usize) -> Self {
        let (s_len, p) = (spec.state_len(), spec.recurrent_params());
        Self {
            growth: super::growth::GrowthProbe::new(spec, capacity),
            g: Array3::zeros((capacity, s_len, p)),
            tmp: Array3::zeros((capacity, s_len, p)),
            jac: Array3::zeros((capacity, s_len, s_len)),
        }
    }

    /// The influence matrix `dstate/dW` of a slot, `s × P`.
    pub fn influence(&self, slot: usize) -> ArrayView2<'_, T> {
        self.g.index_axis(Axis(0), slot)
    }

    pub(super) fn export_slot(&self, slot: usize, out: &mut SlotState<T>) {
        let g = self.g.index_axis(Axis(0), slot);
        out.push_tensor(names::RTRL_G, g.shape().to_vec(), g.iter().copied().collect());
    }

    /// Writes a checked [`SlotState`]'s influence matrix into a slot.
    pub(super) fn import_slot(&mut self, slot: usize, state: &SlotState<T>) {
        let mut g = self.g.index_axis_mut(Axis(0), slot);
        g.as_slice_mut()
            .expect("standard layout")
            .copy_from_slice(state.tensor(names::RTRL_G).expect("checked layout"));
    }

    /// Whether a slot's influence matrix is finite.
    pub(super) fn slot_is_finite(&self, slot: usize) -> bool {
        all_finite(self.g.index_axis(Axis(0), slot))
    }

    pub(super) fn reset(&mut self, slot: usize) {
        self.g.index_axis_mut(Axis(0), slot).fill(T::zero());
    }

    pub(super) fn copy_slot(&mut self, src: usize, dst: usize) {
        let g = self.g.index_axis(Axis(0), src).to_owned();
        self.g.index_axis_mut(Axis(0), dst).assign(&g);
    }

    pub(super) fn gradient(
        &mut self,
        spec: &ModelSpec,
        inputs: &[SlotStep],
        delta_h: ArrayView2<'_, T>,
        grad: &mut Gradients<T>,
    ) -> f64 {
        let hoff = spec.h_offset();
        let (n, p) = (spec.n, spec.recurrent_params());
        let mut gw = grad.w.view_mut().into_shape_with_order((1, p)).expect("contiguous gradient");
        let mut count = 0.0;
        for (i, x) in inputs.iter().enumerate().filter(|(_, x)| x.learn) {
            // ∇W += δ_hᵀ G_h: a product of one row, split over the pool by columns.
            let g = self.g.index_axis(Axis(0), x.slot);
            let g_h = g.slice(s![hoff..hoff + n, ..]);
            let delta = delta_h.slice(s![i..i + 1, ..]);
            gemm(T::one(), delta, g_h, T::one(), gw.view_mut(), Par::Pool);
            count += 1.0;
        }
        count
    }

    pub(super) fn advance(&mut self, spec: &ModelSpec, params: &Params<T>, step: &StepInputs<'_, T>) {
        let (n, r, k, m, s_len, p) =
            (spec.n, spec.r, spec.k, spec.m, spec.state_len(), spec.recurrent_params());
        let hoff = spec.h_offset();
        let w_h = params.w_h(spec);
        let decay = T::from_f64_rounded(spec.config.influence_decay);
        let gs = SlotRows::new(&mut self.g);
        let tmps = SlotRows::new(&mut self.tmp);
        let jacs = SlotRows::new(&mut self.jac);
        let growth = self.growth.as_mut().map(|g| g.rows());
        // One stream: its product may use the pool; several: one per pool thread.
        let par = if step.inputs.len() == 1 { Par::Pool } else { Par::Single };
        for_each_input(step.inputs.len(), |i| {
            let x = step.inputs[i];
            let b = x.slot;
            // SAFETY: slots in one step are distinct; each task owns row `b` of each slab.
            let (g, tmp, jac) = unsafe { (gs.row(b), tmps.row(b), jacs.row(b)) };
            let mut h = ArrayViewMut2::from_shape((s_len, s_len), jac).expect("shape");
            let d = step.d.row(i);
            let d = d.as_slice().expect("contiguous");
            jacobian(spec, w_h, d, step.carry.row(i).as_slice().expect("contiguous"), h.view_mut());
            let g_view = ndarray::ArrayView2::from_shape((s_len, p), &*g).expect("shape");
            let tmp_view = ArrayViewMut2::from_shape((s_len, p), &mut *tmp).expect("shape");
            let carry = step.carry.row(i);
            let carry = carry.as_slice().expect("contiguous");
            // SAFETY: as above.
            let gamma = growth.as_ref().map_or(T::one(), |g| unsafe { g.step(spec, w_h, d, carry, b) });
            gemm(decay * gamma, h.view(), g_view, T::zero(), tmp_view, par);
            g.copy_from_slice(tmp);
            // + F_t: F[blk·n + j, (q·n + j)·m + col] = D[blk, q, j] · a[col].
            let prev = step.prev.row(i);
            let h_prev = &prev.as_slice().expect("contiguous")[hoff..];
            let mut gm = ArrayViewMut2::from_shape((s_len, p), g).expect("shape");
            for blk in 0..k {
                for q in 0..r {
                    for j in 0..n {
                        let dv = d[(blk * r + q) * n + j];
                        if dv == T::zero() {
                            continue;
                        }
                        let base = (q * n + j) * m;
                        let mut row = gm.slice_mut(s![blk * n + j, base..base + m]);
                        row[x.token as usize] = row[x.token as usize] + dv;
                        for (l, &hv) in h_prev.iter().enumerate() {
                            row[spec.h_col() + l] = row[spec.h_col() + l] + dv * hv;
                        }
                        row[m - 1] = row[m - 1] + dv;
                    }
                }
            }
        });
    }
}
