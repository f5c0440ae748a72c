//! UORO (Tallec & Ollivier 2017; KF-RTRL.md §4): `G_t ≈ s̃_t θ̃_tᵀ`, a rank-one estimate whose
//! state-side factor is projected on random signs `ν ∈ {±1}^s` each step.
//!
//! The tangent `H_t s̃` is an exact JVP. `ε0` sits inside and outside the square roots as in the
//! paper's Algorithm 1; a term whose factor norm is exactly zero is dropped (it is zero anyway),
//! which makes the estimator exactly unbiased when `ε0 = 0`.
//!
//! UORO's step is bound by memory: `θ̃` is `r·n × m` per stream and every step scales it, adds a
//! rank-one term and reads it for the gradient. It is kept as `σ Θ` with a lazy scale `σ`, so that
//! the advance writes only the columns the rank-one term touches (the token's, `h`'s and the
//! bias's) and keeps `‖Θ‖²` up to date from the entries it changes; `σ` is folded back into `Θ`
//! when it leaves `[2^-16, 2^16]`, and `‖Θ‖²` is summed afresh every [`NORM_REFRESH`] advances
//! (keyed on the slot's advance counter, so a restored slot continues bit for bit).
//!
//! With `influence_decay` or `influence_margin` the carried tangent takes the step's factor
//! `γ_t` before the balancing, `s̃' = γ_t H_t s̃`: unbiased for the discounted influence, as
//! KF-RTRL and OK are (`tests/numerics/influence_decay.rs`).

use ndarray::{Array2, Array3, ArrayView2, Axis, s};

use super::SlotStep;
use super::raw::SlotRows;
use super::{StepInputs, for_each_input};
use crate::core::float::{Float, all_finite, dot_f64, sum_squares};
use crate::core::linalg::{jacobian_times, through_d};
use crate::core::model::{ModelSpec, Params};
use crate::core::optim::Gradients;
use crate::core::rng;
use crate::core::slot_state::{SlotState, names};

/// Advances between two exact sums of `‖Θ‖²` (the running one accumulates rounding).
pub const NORM_REFRESH: u64 = 4096;
/// `σ` is folded into `Θ` when it leaves `[1/SCALE_LIMIT, SCALE_LIMIT]`.
pub const SCALE_LIMIT: f64 = 65536.0;

/// UORO state of every slot.
#[derive(Debug, Clone)]
pub struct Uoro<T> {
    eps: f64,
    scale_limit: f64,
    /// `s̃`, `capacity × s`.
    st: Array2<T>,
    /// `Θ`, `capacity × r·n × m`, with `θ̃ = σ Θ`.
    th: Array3<T>,
    forced: Vec<Option<Vec<f64>>>,
    /// `[σ, ‖Θ‖²]` of each slot, in the slot's float type so that it is saved exactly.
    th_scale: Array2<T>,
    /// `⟨δ_h, s̃_h⟩` of each input of the step being scored.
    coef: Vec<T>,
    /// Scratch per slot: `W_h s̃_h` (`r·n`), `s̃'` (`s`), `ν` (`s`), `w = νᵀD` (`r·n`).
    y: Array2<T>,
    sp: Array2<T>,
    nu: Array2<T>,
    w: Array2<T>,
    /// The carried tangent's factor `γ ≤ 1` per step (`influence_decay`).
    decay: f64,
    /// The adaptive decay's probes (`influence_margin`), which scale the carried tangent too.
    pub(super) growth: Option<super::growth::GrowthProbe<T>>,
}

impl<T: Float> Uoro<T> {
    /// Zeroed factors for `capacity` slots.
    pub fn new(spec: &ModelSpec, capacity: usize) -> Self {
        let (s, rn, m) = (spec.state_len(), spec.gate_rows(), spec.m);
        Self {
            eps: spec.config.uoro_epsilon,
            scale_limit: SCALE_LIMIT,
            st: Array2::zeros((capacity, s)),
            th: Array3::zeros((capacity, rn, m)),
            forced: vec![None; capacity],
            th_scale: Array2::from_shape_fn(
                (capacity, 2),
                |(_, j)| if j == 0 { T::one() } else { T::zero() },
            ),
            coef: vec![T::zero(); capacity],
            y: Array2::zeros((capacity, rn)),
            sp: Array2::zeros((capacity, s)),
            nu: Array2::zeros((capacity, s)),
            w: Array2::zeros((capacity, rn)),
            decay: spec.config.influence_decay,
            growth: super::growth::GrowthProbe::new(spec, capacity),
        }
    }

    /// Forces the signs `ν` (length `s`) of a slot's next advances; for oracle tests.
    pub fn force_signs(&mut self, slot: usize, signs: Option<Vec<f64>>) {
        self.forced[slot] = signs;
    }

    /// Folds `σ` into `Θ` when it leaves `[1/limit, limit]` instead of [`SCALE_LIMIT`]; for tests
    /// that must see folds happen.
    pub fn set_scale_limit(&mut self, limit: f64) {
        self.scale_limit = limit;
    }

    /// `σ` of a slot (`θ̃ = σ Θ`).
    pub fn scale(&self, slot: usize) -> T {
        self.th_scale[[slot, 0]]
    }

    /// `(s̃, θ̃)` of a slot (`θ̃ = σ Θ` computed: allocates).
    pub fn factors(&self, slot: usize) -> (ndarray::ArrayView1<'_, T>, Array2<T>) {
        let scale = self.th_scale[[slot, 0]];
        (self.st.row(slot), self.th.index_axis(Axis(0), slot).mapv(|v| v * scale))
    }

    /// `‖s̃‖ ‖θ̃‖` of a slot, from the running norm.
    pub(super) fn influence_norm(&self, slot: usize) -> f64 {
        let (scale, norm2) =
            (self.th_scale[[slot, 0]].to_f64_lossless(), self.th_scale[[slot, 1]].to_f64_lossless());
        sum_squares(self.st.row(slot).as_slice().expect("rows")).sqrt() * scale.abs() * norm2.max(0.0).sqrt()
    }

    pub(super) fn export_slot(&self, slot: usize, out: &mut SlotState<T>) {
        let th = self.th.index_axis(Axis(0), slot);
        out.push_tensor(names::UORO_S, vec![self.st.ncols()], self.st.row(slot).to_vec());
        out.push_tensor(names::UORO_THETA, th.shape().to_vec(), th.iter().copied().collect());
        out.push_tensor(names::UORO_SCALE, vec![2], self.th_scale.row(slot).to_vec());
    }

    /// Writes a checked [`SlotState`]'s factors into a slot (forced signs go back to the RNG).
    pub(super) fn import_slot(&mut self, slot: usize, state: &SlotState<T>) {
        let tensor = |name| state.tensor(name).expect("checked layout");
        self.st.row_mut(slot).as_slice_mut().expect("rows").copy_from_slice(tensor(names::UORO_S));
        let mut th = self.th.index_axis_mut(Axis(0), slot);
        th.as_slice_mut().expect("standard layout").copy_from_slice(tensor(names::UORO_THETA));
        self.th_scale.row_mut(slot).as_slice_mut().expect("rows").copy_from_slice(tensor(names::UORO_SCALE));
        self.forced[slot] = None;
    }

    /// Whether a slot's `s̃` and `θ̃` are finite.
    pub(super) fn slot_is_finite(&self, slot: usize) -> bool {
        all_finite(self.st.row(slot))
            && all_finite(self.th.index_axis(Axis(0), slot))
            && all_finite(self.th_scale.row(slot))
    }

    pub(super) fn reset(&mut self, slot: usize) {
        self.st.row_mut(slot).fill(T::zero());
        self.th.index_axis_mut(Axis(0), slot).fill(T::zero());
        self.th_scale[[slot, 0]] = T::one();
        self.th_scale[[slot, 1]] = T::zero();
    }

    pub(super) fn copy_slot(&mut self, src: usize, dst: usize) {
        let st = self.st.row(src).to_owned();
        self.st.row_mut(dst).assign(&st);
        let th = self.th.index_axis(Axis(0), src).to_owned();
        self.th.index_axis_mut(Axis(0), dst).assign(&th);
        self.forced[dst] = self.forced[src].clone();
        let scale = self.th_scale.row(src).to_owned();
        self.th_scale.row_mut(dst).assign(&scale);
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
                let c: T = delta_h.row(i).iter().zip(st.slice(s![hoff..]).iter()).map(|(&a, &b)| a * b).sum();
                c * self.th_scale[[x.slot, 0]]
            } else {
                T::zero()
            };
        }
        // ∇W += Σ_i c_i σ_i Θ_i, split by rows of ∇W over the pool: every entry is summed over the
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
        let (n, s_len) = (spec.n, spec.state_len());
        let hoff = spec.h_offset();
        let (eps, scale_limit) = (self.eps, self.scale_limit);
        let w_h = params.w_h(spec);
        let st = SlotRows::new(&mut self.st);
        let th = SlotRows::new(&mut self.th);
        let ys = SlotRows::new(&mut self.y);
        let sps = SlotRows::new(&mut self.sp);
        let nus = SlotRows::new(&mut self.nu);
        let ws = SlotRows::new(&mut self.w);
        let forced = &self.forced;
        let scales = SlotRows::new(&mut self.th_scale);
        let decay = self.decay;
        let growth = self.growth.as_mut().map(|g| g.rows());
        let growth = &growth;
        for_each_input(step.inputs.len(), |i| {
            let x = step.inputs[i];
            let b = x.slot;
            // SAFETY: slots in one step are distinct, so each task owns row `b` of every slab.
            let (st, th, y, sp, nu, w, scale) = unsafe {
                (st.row(b), th.row(b), ys.row(b), sps.row(b), nus.row(b), ws.row(b), scales.row(b))
            };
            let d = step.d.row(i);
            let d = d.as_slice().expect("contiguous");
            let carry = step.carry.row(i);
            let carry = carry.as_slice().expect("contiguous");
            let prev = step.prev.row(i);
            let h_prev = &prev.as_slice().expect("contiguous")[hoff..];
            // y = W_h s̃_h, each entry summed in a fixed order in f64 (a GEMM's order depends on
            // the batch and the thread count; a serial f32 sum does not vectorize), then
            // s̃' = H_t s̃.
            for (q_row, yv) in y.iter_mut().enumerate() {
                let row = w_h.row(q_row);
                *yv = T::from_f64_rounded(dot_f64(
                    row.as_slice().expect("rows of W_h are contiguous"),
                    &st[hoff..],
                ));
            }
            jacobian_times(spec, d, carry, st, y, sp);
            // The carried influence `s̃ θ̃ᵀ` discounted as KF-RTRL's is (`G_t = γ H_t G_{t-1} + F_t`):
            // the tangent side takes the factor, so the balancing below sees it.
            // SAFETY: this task owns slot `b` (as above).
            let gamma = decay
                * growth
                    .as_ref()
                    .map_or(1.0, |g| unsafe { g.step(spec, w_h, d, carry, b) }.to_f64_lossless());
            if gamma != 1.0 {
                let g = T::from_f64_rounded(gamma);
                sp.iter_mut().for_each(|v| *v = *v * g);
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
            let m = spec.m;
            let exact_norm2 = |th: &[T]| -> f64 { th.chunks_exact(m).map(sum_squares).sum() };
            let sigma = scale[0].to_f64_lossless();
            let n_th = (sigma * sigma * scale[1].to_f64_lossless()).max(0.0).sqrt();
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
            // θ̃ ← θ̃/ρ0 + (w/ρ1) ⊗ a_t: σ ← σ/ρ0, then Θ += (w/(ρ1 σ)) ⊗ a_t on the columns of
            // a_t's non-zero entries only.
            let mut norm2 = scale[1].to_f64_lossless();
            if keep_old {
                scale[0] = scale[0] * T::from_f64_rounded(1.0 / rho0);
                let sigma = scale[0].to_f64_lossless().abs();
                if !(1.0 / scale_limit..=scale_limit).contains(&sigma) {
                    let fold = scale[0];
                    th.iter_mut().for_each(|t| *t = *t * fold);
                    scale[0] = T::one();
                    norm2 = exact_norm2(th);
                }
            } else {
                th.fill(T::zero());
                scale[0] = T::one();
                norm2 = 0.0;
            }
            if add_new {
                let inv = T::from_f64_rounded(1.0 / (rho1 * scale[0].to_f64_lossless()));
                let (token, hcol) = (x.token as usize, spec.h_col());
                let add = |t: &mut T, v: T| -> f64 {
                    let old = t.to_f64_lossless();
                    *t = *t + v;
                    let new = t.to_f64_lossless();
                    (new - old) * (new + old)
                };
                let mut change = 0.0;
                for (q_row, row) in th.chunks_exact_mut(m).enumerate() {
                    let c = w[q_row] * inv;
                    if c != T::zero() {
                        change += add(&mut row[token], c);
                        change += add(&mut row[m - 1], c);
                        let block = &mut row[hcol..hcol + n];
                        let before = sum_squares(block);
                        for (t, &h) in block.iter_mut().zip(h_prev) {
                            *t = *t + c * h;
                        }
                        change += sum_squares(block) - before;
                    }
                }
                norm2 += change;
            }
            if step.sign_counter[b].is_multiple_of(NORM_REFRESH) {
                norm2 = exact_norm2(th);
            }
            scale[1] = T::from_f64_rounded(norm2.max(0.0));
        });
    }
}

/// A UORO slot state saved before `θ̃` had its lazy scale (no [`names::UORO_SCALE`]), with the
/// scale added: `σ = 1` and `‖Θ‖²` summed as the advance sums it. `None` for any other state.
pub fn uoro_legacy_state<T: Float>(spec: &ModelSpec, state: &SlotState<T>) -> Option<SlotState<T>> {
    if spec.learner() != crate::core::model::LearnerKind::Uoro || state.tensor(names::UORO_SCALE).is_some() {
        return None;
    }
    let theta = state.tensor(names::UORO_THETA)?;
    let norm2: f64 = theta.chunks(spec.m.max(1)).map(sum_squares).sum();
    let mut upgraded = state.clone();
    upgraded.push_tensor(names::UORO_SCALE, vec![2], vec![T::one(), T::from_f64_rounded(norm2)]);
    Some(upgraded)
}
