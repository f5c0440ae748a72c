//! UORO (Tallec & Ollivier 2017; KF-RTRL.md §4): `G_t ≈ s̃_t θ̃_tᵀ`, a rank-one estimate whose
//! state-side factor is projected on random signs `ν ∈ {±1}^s` each step.
//!
//! The tangent `H_t s̃` is an exact JVP. `ε0` sits inside and outside the square roots as in the
//! paper's Algorithm 1; a term whose factor norm is exactly zero is dropped (it is zero anyway),
//! which makes the estimator exactly unbiased when `ε0 = 0`.

use ndarray::{Array2, Array3, ArrayView2, Axis, s};

use super::SlotStep;
use super::raw::SlotRows;
use super::{StepInputs, for_each_input};
use crate::core::float::{Float, all_finite, sum_squares};
use crate::core::linalg::through_d;
use crate::core::model::{ModelSpec, Params};
use crate::core::optim::Gradients;
use crate::core::rng;
use crate::core::slot_state::{SlotState, names};

/// UORO state of every slot.
#[derive(Debug, Clone)]
pub struct Uoro<T> {
    eps: f64,
    /// `s̃`, `capacity × s`.
    st: Array2<T>,
    /// `θ̃`, `capacity × r·n × m`.
    th: Array3<T>,
    forced: Vec<Option<Vec<f64>>>,
    /// `‖θ̃‖²` of each slot as its last advance left it (`None`: not known, computed when needed).
    /// The advance computes it in the same pass that writes `θ̃`, so that each step reads the
    /// slab once to update it and once for the gradient: UORO's step is bound by memory.
    th_norm2: Vec<Option<f64>>,
    /// `⟨δ_h, s̃_h⟩` of each input of the step being scored.
    coef: Vec<T>,
    /// Scratch per slot: `W_h s̃_h` (`r·n`), `s̃'` (`s`), `ν` (`s`), `w = νᵀD` (`r·n`).
    y: Array2<T>,
    sp: Array2<T>,
    nu: Array2<T>,
    w: Array2<T>,
}

impl<T: Float> Uoro<T> {
    /// Zeroed factors for `capacity` slots.
    pub fn new(spec: &ModelSpec, capacity: usize) -> Self {
        let (s, rn, m) = (spec.state_len(), spec.gate_rows(), spec.m);
        Self {
            eps: spec.config.uoro_epsilon,
            st: Array2::zeros((capacity, s)),
            th: Array3::zeros((capacity, rn, m)),
            forced: vec![None; capacity],
            th_norm2: vec![Some(0.0); capacity],
            coef: vec![T::zero(); capacity],
            y: Array2::zeros((capacity, rn)),
            sp: Array2::zeros((capacity, s)),
            nu: Array2::zeros((capacity, s)),
            w: Array2::zeros((capacity, rn)),
        }
    }

    /// Forces the signs `ν` (length `s`) of a slot's next advances; for oracle tests.
    pub fn force_signs(&mut self, slot: usize, signs: Option<Vec<f64>>) {
        self.forced[slot] = signs;
    }

    /// `(s̃, θ̃)` of a slot.
    pub fn factors(&self, slot: usize) -> (ndarray::ArrayView1<'_, T>, ArrayView2<'_, T>) {
        (self.st.row(slot), self.th.index_axis(Axis(0), slot))
    }

    pub(super) fn export_slot(&self, slot: usize, out: &mut SlotState<T>) {
        let th = self.th.index_axis(Axis(0), slot);
        out.push_tensor(names::UORO_S, vec![self.st.ncols()], self.st.row(slot).to_vec());
        out.push_tensor(names::UORO_THETA, th.shape().to_vec(), th.iter().copied().collect());
    }

    /// Writes a checked [`SlotState`]'s factors into a slot (forced signs go back to the RNG).
    pub(super) fn import_slot(&mut self, slot: usize, state: &SlotState<T>) {
        let tensor = |name| state.tensor(name).expect("checked layout");
        self.st.row_mut(slot).as_slice_mut().expect("rows").copy_from_slice(tensor(names::UORO_S));
        let mut th = self.th.index_axis_mut(Axis(0), slot);
        th.as_slice_mut().expect("standard layout").copy_from_slice(tensor(names::UORO_THETA));
        self.forced[slot] = None;
        self.th_norm2[slot] = None;
    }

    /// Whether a slot's `s̃` and `θ̃` are finite.
    pub(super) fn slot_is_finite(&self, slot: usize) -> bool {
        all_finite(self.st.row(slot)) && all_finite(self.th.index_axis(Axis(0), slot))
    }

    pub(super) fn reset(&mut self, slot: usize) {
        self.st.row_mut(slot).fill(T::zero());
        self.th.index_axis_mut(Axis(0), slot).fill(T::zero());
        self.th_norm2[slot] = Some(0.0);
    }

    pub(super) fn copy_slot(&mut self, src: usize, dst: usize) {
        let st = self.st.row(src).to_owned();
        self.st.row_mut(dst).assign(&st);
        let th = self.th.index_axis(Axis(0), src).to_owned();
        self.th.index_axis_mut(Axis(0), dst).assign(&th);
        self.forced[dst] = self.forced[src].clone();
        self.th_norm2[dst] = self.th_norm2[src];
    }

    pub(super) fn gradient(
        &mut self,
        spec: &ModelSpec,
        inputs: &[SlotStep],
        delta_h: ArrayView2<'_, T>,
        grad: &mut Gradients<T>,
    ) -> f64 {
        let hoff = spec.h_offset();
        let mut count = 0.0;
        let coef = &mut self.coef[..];
        for (i, x) in inputs.iter().enumerate() {
            coef[i] = if x.learn {
                count += 1.0;
                let st = self.st.row(x.slot);
                delta_h.row(i).iter().zip(st.slice(s![hoff..]).iter()).map(|(&a, &b)| a * b).sum()
            } else {
                T::zero()
            };
        }
        // ∇W += Σ_i c_i θ̃_i, split by rows of ∇W over the pool: every entry is summed over the
        // inputs in batch order, however many threads there are.
        let coef = &coef[..inputs.len()];
        let th = &self.th;
        let rows = grad.w.nrows();
        let chunk = rows.div_ceil(rayon::current_num_threads().max(1) * 4).max(1);
        let work = |(c, mut out): (usize, ndarray::ArrayViewMut2<'_, T>)| {
            let first = c * chunk;
            for (x, &cv) in inputs.iter().zip(coef) {
                if x.learn && cv != T::zero() {
                    let part = th.slice(s![x.slot, first..first + out.nrows(), ..]);
                    out.scaled_add(cv, &part);
                }
            }
        };
        if inputs.len() > 1 && rows > chunk {
            use rayon::prelude::*;
            grad.w.axis_chunks_iter_mut(Axis(0), chunk).into_par_iter().enumerate().for_each(work);
        } else {
            grad.w.axis_chunks_iter_mut(Axis(0), chunk).enumerate().for_each(work);
        }
        count
    }

    pub(super) fn advance(&mut self, spec: &ModelSpec, params: &Params<T>, step: &StepInputs<'_, T>) {
        let (n, r, k, s_len) = (spec.n, spec.r, spec.k, spec.state_len());
        let hoff = spec.h_offset();
        let eps = self.eps;
        let w_h = params.w_h(spec);
        let st = SlotRows::new(&mut self.st);
        let th = SlotRows::new(&mut self.th);
        let ys = SlotRows::new(&mut self.y);
        let sps = SlotRows::new(&mut self.sp);
        let nus = SlotRows::new(&mut self.nu);
        let ws = SlotRows::new(&mut self.w);
        let forced = &self.forced;
        let norms = SlotRows::new_vec(&mut self.th_norm2);
        for_each_input(step.inputs.len(), |i| {
            let x = step.inputs[i];
            let b = x.slot;
            // SAFETY: slots in one step are distinct, so each task owns row `b` of every slab.
            let (st, th, y, sp, nu, w, th_norm2) = unsafe {
                (st.row(b), th.row(b), ys.row(b), sps.row(b), nus.row(b), ws.row(b), &mut norms.row(b)[0])
            };
            let d = step.d.row(i);
            let d = d.as_slice().expect("contiguous");
            let carry = step.carry.row(i);
            let carry = carry.as_slice().expect("contiguous");
            let prev = step.prev.row(i);
            let h_prev = &prev.as_slice().expect("contiguous")[hoff..];
            // y = W_h s̃_h; s̃' = carry ⊙ s̃ + Σ_q D^q ⊙ y^q.
            for (q_row, yv) in y.iter_mut().enumerate() {
                *yv = w_h.row(q_row).iter().zip(&st[hoff..]).map(|(&a, &b)| a * b).sum();
            }
            for bi in 0..k {
                for j in 0..n {
                    let mut acc = T::zero();
                    for bj in 0..k {
                        acc = acc + carry[(bi * k + bj) * n + j] * st[bj * n + j];
                    }
                    for q in 0..r {
                        acc = acc + d[(bi * r + q) * n + j] * y[q * n + j];
                    }
                    sp[bi * n + j] = acc;
                }
            }
            match &forced[b] {
                Some(signs) => nu.iter_mut().zip(signs).for_each(|(v, &sgn)| *v = T::from_f64_rounded(sgn)),
                None => {
                    let key = rng::derive_key(step.sign_key[b], step.sign_counter[b]);
                    nu.iter_mut()
                        .enumerate()
                        .for_each(|(idx, v)| *v = T::from_f64_rounded(rng::sign(key, idx as u64)));
                }
            }
            // w = νᵀD, so that νᵀF_t = w ⊗ a.
            through_d(spec, nu, d, w);
            // Summed row by row as the pass below does, so that a restored slot continues bit for bit.
            let n_th = th_norm2.unwrap_or_else(|| th.chunks_exact(spec.m).map(sum_squares).sum()).sqrt();
            let n_sp = sum_squares(sp).sqrt();
            let n_g = sum_squares(w).sqrt() * (2.0 + sum_squares(h_prev)).sqrt();
            let n_nu = (s_len as f64).sqrt();
            let keep_old = n_th > 0.0 && n_sp > 0.0;
            let add_new = n_g > 0.0;
            let rho0 = (n_th / (n_sp + eps)).sqrt() + eps;
            let rho1 = (n_g / (n_nu + eps)).sqrt() + eps;
            let (r0, r1) = (T::from_f64_rounded(rho0), T::from_f64_rounded(rho1));
            for idx in 0..s_len {
                let mut v = T::zero();
                if keep_old {
                    v = v + r0 * sp[idx];
                }
                if add_new {
                    v = v + r1 * nu[idx];
                }
                st[idx] = v;
            }
            // θ̃ ← θ̃/ρ0 + (w/ρ1) ⊗ a_t, row by row in one pass, and its new squared norm.
            let m = spec.m;
            let scale = if keep_old { T::from_f64_rounded(1.0 / rho0) } else { T::zero() };
            let inv = T::from_f64_rounded(1.0 / rho1);
            let mut norm2 = 0.0;
            for (q_row, row) in th.chunks_exact_mut(m).enumerate() {
                if keep_old {
                    row.iter_mut().for_each(|t| *t = *t * scale);
                } else {
                    row.fill(T::zero());
                }
                let c = if add_new { w[q_row] * inv } else { T::zero() };
                if c != T::zero() {
                    row[x.token as usize] = row[x.token as usize] + c;
                    for (t, &h) in row[spec.h_col()..spec.h_col() + n].iter_mut().zip(h_prev) {
                        *t = *t + c * h;
                    }
                    row[m - 1] = row[m - 1] + c;
                }
                norm2 += sum_squares(row);
            }
            *th_norm2 = Some(norm2);
        });
    }
}
