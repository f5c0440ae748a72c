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
    }

    /// Whether a slot's `s̃` and `θ̃` are finite.
    pub(super) fn slot_is_finite(&self, slot: usize) -> bool {
        all_finite(self.st.row(slot)) && all_finite(self.th.index_axis(Axis(0), slot))
    }

    pub(super) fn reset(&mut self, slot: usize) {
        self.st.row_mut(slot).fill(T::zero());
        self.th.index_axis_mut(Axis(0), slot).fill(T::zero());
    }

    pub(super) fn copy_slot(&mut self, src: usize, dst: usize) {
        let st = self.st.row(src).to_owned();
        self.st.row_mut(dst).assign(&st);
        let th = self.th.index_axis(Axis(0), src).to_owned();
        self.th.index_axis_mut(Axis(0), dst).assign(&th);
        self.forced[dst] = self.forced[src].clone();
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
        for (i, x) in inputs.iter().enumerate().filter(|(_, x)| x.learn) {
            let st = self.st.row(x.slot);
            let c: T = delta_h.row(i).iter().zip(st.slice(s![hoff..]).iter()).map(|(&a, &b)| a * b).sum();
            grad.w.scaled_add(c, &self.th.index_axis(Axis(0), x.slot));
            count += 1.0;
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
        for_each_input(step.inputs.len(), |i| {
            let x = step.inputs[i];
            let b = x.slot;
            // SAFETY: slots in one step are distinct, so each task owns row `b` of every slab.
            let (st, th, y, sp, nu, w) =
                unsafe { (st.row(b), th.row(b), ys.row(b), sps.row(b), nus.row(b), ws.row(b)) };
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
            let n_th = sum_squares(th).sqrt();
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
            let m = spec.m;
            if keep_old {
                let c = T::from_f64_rounded(1.0 / rho0);
                th.iter_mut().for_each(|t| *t = *t * c);
            } else {
                th.fill(T::zero());
            }
            if add_new {
                let inv = T::from_f64_rounded(1.0 / rho1);
                for (q_row, &wv) in w.iter().enumerate() {
                    let c = wv * inv;
                    if c == T::zero() {
                        continue;
                    }
                    let row = &mut th[q_row * m..(q_row + 1) * m];
                    row[x.token as usize] = row[x.token as usize] + c;
                    for (t, &h) in row[spec.h_col()..spec.h_col() + n].iter_mut().zip(h_prev) {
                        *t = *t + c * h;
                    }
                    row[m - 1] = row[m - 1] + c;
                }
            }
        });
    }
}
