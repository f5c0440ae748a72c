//! Optimal Kronecker-sum RTRL, `ok:R` (Benzing et al. 2019; OK.md §2): each stream keeps
//! `G_t ≈ Σ_{i<R} u_i ⊗ A_i`, the minimum-variance unbiased rank-`R` member of KF-RTRL's class.
//!
//! One advance per stream: the `R + 1` terms `u_i ⊗ (H_t A_i)` and `a_t ⊗ D_t`, with the products
//! `H_t [A_1 … A_R]` as one GEMM (`H_t` explicit, `k·n × k·n`), then the reduction of
//! [`super::ok_reduce`] from the two `(R+1) × (R+1)` Gram matrices, and the rebuild of the new
//! factors as linear combinations of the terms.
//!
//! Layout: slot `b` holds `R + 1` terms: rows `u` of `(capacity, (R+1)·m)` and column block `b` of a
//! `k·n × capacity·(R+1)·r·n` slab. Terms `0..R` are carried into the next step; term `R` is the
//! component the last reduction dropped, kept (with the per-term gradient weights) only so that
//! the gradient can use the sum before the reduction, which is the conditional mean of the
//! reduced one (`gradient_before_reduction`).

use ndarray::{Array2, ArrayView2, s};
use rayon::prelude::*;

use super::SlotStep;
use super::ok_reduce::{Choice, Reduction};
use super::raw::{SlotBlocks, SlotRows, copy_cols, copy_row};
use super::{StepInputs, for_each_input};
use crate::core::float::{Float, all_finite, dot_f64 as dot};
use crate::core::linalg::{Par, gemm, jacobian};
use crate::core::model::{ModelSpec, Params};
use crate::core::optim::Gradients;
use crate::core::rng;
use crate::core::slot_state::{SlotState, names};

/// OK state of every slot.
#[derive(Debug, Clone)]
pub struct OkRtrl<T> {
    rank: usize,
    /// The adaptive decay's probes (`influence_margin`), if the model sets it.
    pub(super) growth: Option<super::growth::GrowthProbe<T>>,
    before_reduction: bool,
    /// `capacity × (R+1)·m`.
    u: Array2<T>,
    /// `k·n × capacity·(R+1)·r·n`.
    a: Array2<T>,
    /// `capacity × (R+1)`: each term's weight in the gradient before the reduction.
    weight: Array2<T>,
    /// Per slot, the dropped member of the mixed set forced for the next advances (tests).
    forced: Vec<Option<usize>>,
    /// `capacity × (R+1)`: the last reduction's drop probabilities, ascending `σ` (tests).
    probabilities: Array2<f64>,
    /// Scratch of the gradient: `δᵀA_l` and `u_l` of every term of every input.
    v: Array2<T>,
    urows: Array2<T>,
    workspaces: Vec<Workspace<T>>,
}

#[derive(Debug, Clone)]
struct Workspace<T> {
    jac: Array2<T>,
    /// `H_t [A_1 … A_R]`, `k·n × R·r·n`.
    product: Array2<T>,
    /// New `u` of the `R + 1` outputs.
    unew: Vec<T>,
    kv: Vec<f64>,
    km: Vec<f64>,
    reduction: Reduction,
}

impl<T: Float> OkRtrl<T> {
    /// Zeroed factors for `capacity` slots, rank `spec.config.ok_rank`.
    pub fn new(spec: &ModelSpec, capacity: usize) -> Self {
        let rank = spec.config.ok_rank;
        let terms = rank + 1;
        let (s_len, rn, m) = (spec.state_len(), spec.gate_rows(), spec.m);
        Self {
            growth: super::growth::GrowthProbe::new(spec, capacity),
            rank,
            before_reduction: spec.config.gradient_before_reduction,
            u: Array2::zeros((capacity, terms * m)),
            a: Array2::zeros((s_len, capacity * terms * rn)),
            weight: Array2::zeros((capacity, terms)),
            forced: vec![None; capacity],
            probabilities: Array2::zeros((capacity, terms)),
            v: Array2::zeros((capacity, terms * rn)),
            urows: Array2::zeros((capacity, terms * m)),
            workspaces: Vec::new(),
        }
    }

    /// The rank `R`.
    pub fn rank(&self) -> usize {
        self.rank
    }

    fn terms(&self) -> usize {
        self.rank + 1
    }

    fn rn(&self) -> usize {
        self.v.ncols() / self.terms()
    }

    /// Forces which member of the mixed set (ascending `σ`) a slot's next reductions drop
    /// (`None`: the seeded RNG), for oracle tests that enumerate outcomes.
    pub fn force_drop(&mut self, slot: usize, member: Option<usize>) {
        self.forced[slot] = member;
    }

    /// The drop probabilities of a slot's last reduction, ascending `σ`, zeros past the mixed set.
    pub fn drop_probabilities(&self, slot: usize) -> Vec<f64> {
        self.probabilities.row(slot).to_vec()
    }

    /// The carried estimate `Σ_{i<R} u_i ⊗ A_i` of a slot as its factors `(u_i, A_i)`.
    pub fn factors(&self, slot: usize, spec: &ModelSpec) -> Vec<(ndarray::Array1<T>, Array2<T>)> {
        (0..self.rank).map(|l| self.term(slot, spec, l)).collect()
    }

    /// All `R + 1` terms with their gradient weights: `Σ_l w_l u_l ⊗ A_l` is the estimate before
    /// the last reduction.
    pub fn weighted_terms(&self, slot: usize, spec: &ModelSpec) -> Vec<(T, ndarray::Array1<T>, Array2<T>)> {
        (0..self.terms())
            .map(|l| {
                let (u, a) = self.term(slot, spec, l);
                (self.weight[[slot, l]], u, a)
            })
            .collect()
    }

    /// `‖Σ_{l<R} u_l ⊗ A_l‖`: the reduction's outputs are orthogonal singular directions, so it is
    /// `sqrt(Σ_l ‖u_l‖²‖A_l‖²)`.
    pub fn influence_norm(&self, slot: usize) -> f64 {
        let (rn, terms) = (self.rn(), self.terms());
        let m = self.u.ncols() / terms;
        let sq = |x: &T| x.to_f64_lossless() * x.to_f64_lossless();
        (0..self.rank)
            .map(|l| {
                let u: f64 = self.u.slice(s![slot, l * m..(l + 1) * m]).iter().map(sq).sum();
                let c0 = (slot * terms + l) * rn;
                let a: f64 = self.a.slice(s![.., c0..c0 + rn]).iter().map(sq).sum();
                u * a
            })
            .sum::<f64>()
            .sqrt()
    }

    fn term(&self, slot: usize, spec: &ModelSpec, l: usize) -> (ndarray::Array1<T>, Array2<T>) {
        let (rn, m, terms) = (self.rn(), spec.m, self.terms());
        let u = self.u.slice(s![slot, l * m..(l + 1) * m]).to_owned();
        let c0 = (slot * terms + l) * rn;
        (u, self.a.slice(s![.., c0..c0 + rn]).to_owned())
    }

    fn block_cols(&self, slot: usize) -> std::ops::Range<usize> {
        let width = self.terms() * self.rn();
        slot * width..(slot + 1) * width
    }

    pub(super) fn export_slot(&self, slot: usize, out: &mut SlotState<T>) {
        let (terms, m, s_len) = (self.terms(), self.u.ncols() / self.terms(), self.a.nrows());
        let block = self.a.slice(s![.., self.block_cols(slot)]);
        out.push_tensor(names::OK_U, vec![terms, m], self.u.row(slot).to_vec());
        out.push_tensor(names::OK_A, vec![s_len, block.ncols()], block.iter().copied().collect());
        out.push_tensor(names::OK_WEIGHT, vec![terms], self.weight.row(slot).to_vec());
    }

    pub(super) fn import_slot(&mut self, slot: usize, state: &SlotState<T>) {
        let tensor = |name| state.tensor(name).expect("checked layout");
        self.u.row_mut(slot).assign(&ndarray::ArrayView1::from(tensor(names::OK_U)));
        let cols = self.block_cols(slot);
        let a = ArrayView2::from_shape((self.a.nrows(), cols.len()), tensor(names::OK_A))
            .expect("checked layout");
        self.a.slice_mut(s![.., cols]).assign(&a);
        self.weight.row_mut(slot).assign(&ndarray::ArrayView1::from(tensor(names::OK_WEIGHT)));
        self.forced[slot] = None;
    }

    pub(super) fn slot_is_finite(&self, slot: usize) -> bool {
        all_finite(self.u.row(slot))
            && all_finite(self.weight.row(slot))
            && all_finite(self.a.slice(s![.., self.block_cols(slot)]))
    }

    pub(super) fn reset(&mut self, slot: usize) {
        self.u.row_mut(slot).fill(T::zero());
        let cols = self.block_cols(slot);
        self.a.slice_mut(s![.., cols]).fill(T::zero());
        self.weight.row_mut(slot).fill(T::zero());
    }

    pub(super) fn copy_slot(&mut self, src: usize, dst: usize) {
        copy_row(&mut self.u, src, dst);
        let (from, to) = (self.block_cols(src), self.block_cols(dst));
        copy_cols(&mut self.a, from, to);
        copy_row(&mut self.weight, src, dst);
        self.forced[dst] = self.forced[src];
    }

    /// `∇W += Σ_inputs Σ_l w_l (δᵀA_l) ⊗ u_l`, with `w_l` the gradient weights (before the
    /// reduction) or 1 for the carried terms and 0 for the dropped one (after it).
    pub(super) fn gradient(
        &mut self,
        spec: &ModelSpec,
        inputs: &[SlotStep],
        delta_h: ArrayView2<'_, T>,
        grad: &mut Gradients<T>,
    ) -> f64 {
        let nb = inputs.len();
        let (n, hoff, m) = (spec.n, spec.h_offset(), spec.m);
        let (terms, rank, rn, before) = (self.terms(), self.rank, self.rn(), self.before_reduction);
        let (a, u, weight) = (&self.a, &self.u, &self.weight);
        let vrows = SlotRows::new(&mut self.v);
        let urows = SlotRows::new(&mut self.urows);
        for_each_input(nb, |i| {
            let x = inputs[i];
            // SAFETY: each task owns row `i` of the two scratch matrices.
            let (v, urow) = unsafe { (vrows.row(i), urows.row(i)) };
            let delta = delta_h.row(i);
            let delta = delta.as_slice().expect("contiguous");
            let b = x.slot;
            for l in 0..terms {
                let w = if before {
                    weight[[b, l]]
                } else if l < rank {
                    T::one()
                } else {
                    T::zero()
                };
                let (vl, ul) = (&mut v[l * rn..(l + 1) * rn], &mut urow[l * m..(l + 1) * m]);
                vl.fill(T::zero());
                if !x.learn || w == T::zero() {
                    ul.fill(T::zero());
                    continue;
                }
                let c0 = (b * terms + l) * rn;
                let block = a.slice(s![hoff..hoff + n, c0..c0 + rn]);
                for (row, &dj) in block.rows().into_iter().zip(delta) {
                    let row = row.to_slice().expect("rows");
                    let c = dj * w;
                    for (vv, &aa) in vl.iter_mut().zip(row) {
                        *vv = *vv + c * aa;
                    }
                }
                ul.copy_from_slice(&u.row(b).as_slice().expect("contiguous")[l * m..(l + 1) * m]);
            }
        });
        let v = self.v.slice(s![..nb, ..]).into_shape_with_order((nb * terms, rn)).expect("contiguous rows");
        let us =
            self.urows.slice(s![..nb, ..]).into_shape_with_order((nb * terms, m)).expect("contiguous rows");
        gemm(T::one(), v.t(), us, T::one(), grad.w.view_mut(), Par::Pool);
        inputs.iter().filter(|x| x.learn).count() as f64
    }

    fn ensure_workspaces(&mut self, count: usize) {
        let (s_len, rn, terms) = (self.a.nrows(), self.rn(), self.terms());
        let m = self.u.ncols() / terms;
        while self.workspaces.len() < count {
            self.workspaces.push(Workspace {
                jac: Array2::zeros((s_len, s_len)),
                product: Array2::zeros((s_len, self.rank * rn)),
                unew: vec![T::zero(); terms * m],
                kv: vec![0.0; terms * terms],
                km: vec![0.0; terms * terms],
                reduction: Reduction::new(terms),
            });
        }
    }

    /// Follows one advance: the `R + 1` terms, their optimal unbiased reduction to `R`.
    pub(super) fn advance(&mut self, spec: &ModelSpec, params: &Params<T>, step: &StepInputs<'_, T>) {
        let inputs = step.inputs;
        let nb = inputs.len();
        if nb == 0 {
            return;
        }
        let workers = rayon::current_num_threads().max(1).min(nb);
        self.ensure_workspaces(workers);
        let (terms, rn) = (self.terms(), self.rn());
        let w_h = params.w_h(spec);
        let slab = SlotBlocks::new(&mut self.a, terms * rn);
        let urows = SlotRows::new(&mut self.u);
        let weights = SlotRows::new(&mut self.weight);
        let probabilities = SlotRows::new(&mut self.probabilities);
        let forced = &self.forced;
        let growth = self.growth.as_mut().map(|g| g.rows());
        let growth = &growth;
        let par = if workers > 1 { Par::Single } else { Par::Pool };
        let run_input = |ws: &mut Workspace<T>, i: usize| {
            let b = inputs[i].slot;
            // SAFETY: every input names a distinct slot (validated by the stream set), so each task
            // owns block `b` of the slab and row `b` of `u`, the weights and the probabilities.
            let (block, u, weight, probs) =
                unsafe { (slab.block(b), urows.row(b), weights.row(b), probabilities.row(b)) };
            let choice = match forced[b] {
                Some(member) => Choice::Forced(member),
                None => Choice::Uniform(rng::uniform(step.sign_key[b], step.sign_counter[b])),
            };
            let gamma = growth.as_ref().map_or(T::one(), |g| {
                let (d, carry) = (step.d.row(i), step.carry.row(i));
                // SAFETY: as above, the task owns slot `b`.
                unsafe { g.step(spec, w_h, d.as_slice().expect("rows"), carry.as_slice().expect("rows"), b) }
            });
            advance_slot(spec, w_h, step, i, block, u, ws, par, choice, gamma);
            for (w, &g) in weight.iter_mut().zip(&ws.reduction.grad_weight) {
                *w = T::from_f64_rounded(g);
            }
            probs.copy_from_slice(&ws.reduction.drop_probability);
        };
        let workspaces = &mut self.workspaces[..workers];
        if workers > 1 {
            workspaces.par_iter_mut().enumerate().for_each(|(w, ws)| {
                (w * nb / workers..(w + 1) * nb / workers).for_each(|i| run_input(ws, i));
            });
        } else {
            (0..nb).for_each(|i| run_input(&mut workspaces[0], i));
        }
    }
}

/// One stream's advance: terms, Gram matrices, reduction, rebuild in place.
#[allow(clippy::too_many_arguments)]
fn advance_slot<T: Float>(
    spec: &ModelSpec,
    w_h: ArrayView2<'_, T>,
    step: &StepInputs<'_, T>,
    i: usize,
    mut block: ndarray::ArrayViewMut2<'_, T>,
    u: &mut [T],
    ws: &mut Workspace<T>,
    par: Par,
    choice: Choice,
    gamma: T,
) {
    let (n, m) = (spec.n, spec.m);
    let rn = spec.gate_rows();
    let terms = ws.reduction.terms();
    let rank = terms - 1;
    let d = step.d.row(i);
    let d = d.as_slice().expect("contiguous");
    jacobian(spec, w_h, d, step.carry.row(i).as_slice().expect("contiguous"), ws.jac.view_mut());
    let decay = T::from_f64_rounded(spec.config.influence_decay) * gamma;
    gemm(decay, ws.jac.view(), block.slice(s![.., ..rank * rn]), T::zero(), ws.product.view_mut(), par);
    let prev = step.prev.row(i);
    let h_prev = &prev.as_slice().expect("contiguous")[spec.h_offset()..];
    let token = step.inputs[i].token as usize;
    let (hcol, bias) = (spec.h_col(), spec.bias_col());
    // Gram of the vectors u_0..u_{R-1}, a.
    let (kv, km) = (&mut ws.kv, &mut ws.km);
    for p in 0..rank {
        let up = &u[p * m..(p + 1) * m];
        for q in p..rank {
            let g = dot(up, &u[q * m..(q + 1) * m]);
            kv[p * terms + q] = g;
            kv[q * terms + p] = g;
        }
        let ga = up[token].to_f64_lossless() + dot(&up[hcol..hcol + n], h_prev) + up[bias].to_f64_lossless();
        kv[p * terms + rank] = ga;
        kv[rank * terms + p] = ga;
    }
    kv[rank * terms + rank] = 2.0 + dot(h_prev, h_prev);
    // Gram of the matrices H A_0..H A_{R-1}, D (D has one entry per (state unit, gate) pair).
    km.fill(0.0);
    for row in ws.product.rows() {
        let row = row.to_slice().expect("contiguous rows");
        for p in 0..rank {
            let rp = &row[p * rn..(p + 1) * rn];
            for q in p..rank {
                km[p * terms + q] += dot(rp, &row[q * rn..(q + 1) * rn]);
            }
        }
    }
    let mut dd = 0.0;
    for_each_d_entry(spec, d, |row, col, dv| {
        let dv64 = dv.to_f64_lossless();
        dd += dv64 * dv64;
        let prow = ws.product.row(row);
        for p in 0..rank {
            km[p * terms + rank] += prow[p * rn + col].to_f64_lossless() * dv64;
        }
    });
    km[rank * terms + rank] = dd;
    for p in 0..terms {
        for q in 0..p {
            km[p * terms + q] = km[q * terms + p];
        }
    }
    ws.reduction.reduce(kv, km, choice);
    let (alpha, beta) = (&ws.reduction.alpha, &ws.reduction.beta);
    // u_l = Σ_i α_li u_i + α_lR a.
    for l in 0..terms {
        let out = &mut ws.unew[l * m..(l + 1) * m];
        out.fill(T::zero());
        for p in 0..rank {
            let c = T::from_f64_rounded(alpha[l * terms + p]);
            if c != T::zero() {
                for (o, &x) in out.iter_mut().zip(&u[p * m..(p + 1) * m]) {
                    *o = *o + c * x;
                }
            }
        }
        let c = T::from_f64_rounded(alpha[l * terms + rank]);
        out[token] = out[token] + c;
        for (o, &h) in out[hcol..hcol + n].iter_mut().zip(h_prev) {
            *o = *o + c * h;
        }
        out[bias] = out[bias] + c;
    }
    u.copy_from_slice(&ws.unew);
    // A_l = Σ_i β_li (H A_i) + β_lR D, row by row of the state.
    let coef: [T; 33 * 33] = {
        let mut c = [T::zero(); 33 * 33];
        for (x, &b) in c.iter_mut().zip(beta.iter()) {
            *x = T::from_f64_rounded(b);
        }
        c
    };
    for (mut out_row, prow) in block.rows_mut().into_iter().zip(ws.product.rows()) {
        let out_row = out_row.as_slice_mut().expect("contiguous rows");
        let prow = prow.to_slice().expect("contiguous rows");
        for l in 0..terms {
            let out = &mut out_row[l * rn..(l + 1) * rn];
            out.fill(T::zero());
            for p in 0..rank {
                let c = coef[l * terms + p];
                if c != T::zero() {
                    for (o, &x) in out.iter_mut().zip(&prow[p * rn..(p + 1) * rn]) {
                        *o = *o + c * x;
                    }
                }
            }
        }
    }
    for_each_d_entry(spec, d, |row, col, dv| {
        let mut row = block.row_mut(row);
        for l in 0..terms {
            let e = &mut row[l * rn + col];
            *e = *e + coef[l * terms + rank] * dv;
        }
    });
}

/// Calls `f(row, column, value)` for every non-zero entry of `D_t` (`k·n × r·n`, one entry per
/// (state block, gate, unit): row `blk·n + j`, column `q·n + j`).
fn for_each_d_entry<T: Float>(spec: &ModelSpec, d: &[T], mut f: impl FnMut(usize, usize, T)) {
    let (n, r) = (spec.n, spec.r);
    for blk in 0..spec.k {
        for q in 0..r {
            for j in 0..n {
                let dv = d[(blk * r + q) * n + j];
                if dv != T::zero() {
                    f(blk * n + j, q * n + j, dv);
                }
            }
        }
    }
}
