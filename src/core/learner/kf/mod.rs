//! Kronecker-factored RTRL (KF-RTRL.md §3): each stream keeps `G_t ≈ u_t ⊗ A_t`, with `u_t` over
//! the input columns of `W` (length `m`) and `A_t` over (state unit, gate row), `k·n × r·n`.
//!
//! Layout: `A` of slot `b` is column block `b` of a `k·n × (capacity·r·n)` slab, stored as
//! `A_true = scale_b · A_stored`, so that the scalar `1/p1` of the compression never costs a pass
//! over the matrix. Each slot has one copy of `A`, updated in place: the product `H_t A_{t-1}`
//! goes to a workspace (one per pool thread, sized by the chunk, never by the capacity) and is
//! written back scaled. The per-slot state is thus `u`, `A` and the scale, as exported.
//!
//! The product `B_t = H_t A_{t-1}` is computed one of two ways:
//! - [`KfStrategy::Wide`] (tanh cell, `r = 1`, no carry): `W_h [A_1 … A_B]` as one GEMM over all
//!   consecutive slots, then the per-stream row scaling `diag(d_t)`;
//! - [`KfStrategy::Jacobian`] (any cell): per stream, the explicit `H_t` (`k·n × k·n`, cost
//!   `O(r n²)`) times `A`. For `r > 1` this is `r` times fewer flops than multiplying every `W^q_h`
//!   by `A`, which is why gated cells use it.

mod compress;

use compress::{compress, sign_for};
use ndarray::{Array1, Array2, ArrayView2, Axis, s};

use rayon::prelude::*;

use super::SlotStep;
use super::raw::{SlotBlocks, SlotRows, copy_cols, copy_row};
use super::{StepInputs, dense_input, for_each_input};
use crate::core::cell::CellKind;
use crate::core::float::{Float, all_finite, sum_squares};
use crate::core::linalg::{Par, gemm, jacobian};
use crate::core::model::{ModelSpec, Params};
use crate::core::optim::Gradients;
use crate::core::slot_state::{SlotState, SlotStateError, names};

/// Bytes of GEMM output one chunk of the wide strategy may produce: half of the 1 MiB L2 of the
/// target cores, so that the scaling pass reads it from cache.
const CHUNK_CACHE_BYTES: usize = 512 << 10;

/// How `H_t A_{t-1}` is multiplied out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KfStrategy {
    /// One GEMM `W_h [A_1 … A_B]` over side-by-side slots, then row scalings (tanh only).
    Wide,
    /// Per stream, the explicit Jacobian `H_t` times `A_{t-1}` (every cell).
    Jacobian,
}

impl KfStrategy {
    /// The faster strategy for a cell and hidden size, as measured with `kfrtrl bench` on the
    /// target machine: gated cells always take the Jacobian (fewer flops); for tanh the wide GEMM
    /// wins from n = 128 up (n = 256, B = 32: 10.1k vs 9.0k tokens/s) and loses below
    /// (n = 64, B = 32: 115k vs 160k), where one GEMM's fixed costs dominate.
    pub fn best_for(cell: CellKind, hidden: usize) -> Self {
        if cell == CellKind::Tanh && hidden >= 128 { KfStrategy::Wide } else { KfStrategy::Jacobian }
    }
}

/// KF-RTRL state of every slot.
#[derive(Debug, Clone)]
pub struct KfRtrl<T> {
    strategy: KfStrategy,
    /// The adaptive decay's probes (`influence_margin`), if the model sets it.
    pub(super) growth: Option<super::growth::GrowthProbe<T>>,
    /// `capacity × m`.
    u: Array2<T>,
    /// The `k·n × capacity·r·n` slab of stored `A`s.
    a: Array2<T>,
    scale: ndarray::Array1<T>,
    forced_sign: Vec<Option<f64>>,
    /// With the gradient before the reduction: per slot, the last reduction's `c = s·p2` (0 when
    /// it was exact), the step's `[h_{t-1}; D_t]` and token.
    before_reduction: bool,
    hidden: usize,
    last_c: Array1<T>,
    last_hd: Array2<T>,
    last_token: Vec<u32>,
    /// Scratch: `v = δᵀA` per input (`capacity × r·n`; twice as many rows with the gradient
    /// before the reduction), `u` of the inputs (as many rows, `m` wide).
    v: Array2<T>,
    urows: Array2<T>,
    /// Scratch of the advance, one per pool thread (at most one per slot), made on first use.
    workspaces: Vec<Workspace<T>>,
    /// Scratch: input ranges stepped by one GEMM each (wide strategy).
    chunks: Vec<(usize, usize)>,
}

/// What one thread of the advance needs for the slots in its hands.
#[derive(Debug, Clone)]
struct Workspace<T> {
    /// `B = H_t A_{t-1}` of a chunk of slots, `k·n × (slots·r·n)`.
    product: Array2<T>,
    /// The explicit Jacobian `H_t`, `k·n × k·n` (Jacobian strategy only).
    jac: Array2<T>,
}

impl<T: Float> KfRtrl<T> {
    /// Zeroed factors for `capacity` slots, with the cell's best strategy.
    pub fn new(spec: &ModelSpec, capacity: usize) -> Self {
        Self::with_strategy(spec, capacity, KfStrategy::best_for(spec.cell(), spec.n))
    }

    /// Zeroed factors with an explicit strategy (`Wide` needs the tanh cell).
    pub fn with_strategy(spec: &ModelSpec, capacity: usize, strategy: KfStrategy) -> Self {
        assert!(
            strategy == KfStrategy::Jacobian || spec.cell() == CellKind::Tanh,
            "the wide strategy needs a cell without gates or carry (tanh)"
        );
        let (s, rn, m) = (spec.state_len(), spec.gate_rows(), spec.m);
        let before = spec.config.gradient_before_reduction;
        let (record, rows) = if before { (spec.n + spec.k * rn, 2 * capacity) } else { (0, capacity) };
        Self {
            growth: super::growth::GrowthProbe::new(spec, capacity),
            strategy,
            u: Array2::zeros((capacity, m)),
            a: Array2::zeros((s, capacity * rn)),
            scale: ndarray::Array1::from_elem(capacity, T::one()),
            forced_sign: vec![None; capacity],
            before_reduction: before,
            hidden: spec.n,
            last_c: Array1::zeros(capacity),
            last_hd: Array2::zeros((capacity, record)),
            last_token: vec![0; capacity],
            v: Array2::zeros((rows, rn)),
            urows: Array2::zeros((rows, m)),
            workspaces: Vec::new(),
            chunks: Vec::with_capacity(capacity),
        }
    }

    /// Slots per GEMM of the wide strategy: as many as fit in half a core's L2.
    fn slots_per_chunk(&self) -> usize {
        let block_bytes = self.a.len() / self.u.nrows() * std::mem::size_of::<T>();
        (CHUNK_CACHE_BYTES / block_bytes.max(1)).clamp(1, self.u.nrows())
    }

    /// Makes sure there are `count` workspaces (allocates only when the pool is larger than ever
    /// before, never in the steady state).
    fn ensure_workspaces(&mut self, count: usize) {
        let (s_len, rn) = (self.a.nrows(), self.v.ncols());
        let (slots, jac) = match self.strategy {
            KfStrategy::Wide => (self.slots_per_chunk(), 0),
            KfStrategy::Jacobian => (1, s_len),
        };
        while self.workspaces.len() < count {
            self.workspaces.push(Workspace {
                product: Array2::zeros((s_len, slots * rn)),
                jac: Array2::zeros((jac, jac)),
            });
        }
    }

    /// The strategy in use.
    pub fn strategy(&self) -> KfStrategy {
        self.strategy
    }

    /// Switches the strategy (`Wide` needs the tanh cell); the factors are unchanged.
    pub fn set_strategy(&mut self, spec: &ModelSpec, strategy: KfStrategy) {
        let state = self.clone();
        *self = Self::with_strategy(spec, self.u.nrows(), strategy);
        self.u = state.u;
        self.a = state.a;
        self.scale = state.scale;
        self.forced_sign = state.forced_sign;
        self.last_c = state.last_c;
        self.last_hd = state.last_hd;
        self.last_token = state.last_token;
    }

    /// Forces the sign `s = c1·c2` of a slot's next advances (`None`: the seeded RNG). For
    /// oracle tests that enumerate sign paths.
    pub fn force_sign(&mut self, slot: usize, sign: Option<f64>) {
        self.forced_sign[slot] = sign;
    }

    /// `(u, A)` of a slot, with `A` unscaled to its true value.
    pub fn factors(&self, slot: usize, spec: &ModelSpec) -> (Array1<T>, Array2<T>) {
        let rn = spec.gate_rows();
        let a = self.a.slice(s![.., slot * rn..(slot + 1) * rn]);
        (self.u.row(slot).to_owned(), a.mapv(|x| x * self.scale[slot]))
    }

    /// `‖u ⊗ A‖ = ‖u‖·‖A‖` of a slot.
    pub fn influence_norm(&self, slot: usize) -> f64 {
        let (u, a, scale) = (
            self.u.row(slot),
            self.a.slice(s![.., slot * self.v.ncols()..(slot + 1) * self.v.ncols()]),
            self.scale[slot],
        );
        let sq = |x: f64| x * x;
        (u.iter().map(|x| sq(x.to_f64_lossless())).sum::<f64>()
            * a.iter().map(|x| sq(x.to_f64_lossless())).sum::<f64>())
        .sqrt()
            * scale.to_f64_lossless().abs()
    }

    /// The raw stored form of a slot: `(u, A_stored, scale)` with `A = scale·A_stored`.
    pub fn raw_factors(
        &self,
        slot: usize,
        spec: &ModelSpec,
    ) -> (ndarray::ArrayView1<'_, T>, ArrayView2<'_, T>, T) {
        let rn = spec.gate_rows();
        let a = self.a.slice(s![.., slot * rn..(slot + 1) * rn]);
        (self.u.row(slot), a, self.scale[slot])
    }

    /// Restores the raw stored form of a slot (the inverse of [`KfRtrl::raw_factors`]).
    pub fn set_raw_factors(
        &mut self,
        slot: usize,
        spec: &ModelSpec,
        u: &[T],
        a: ArrayView2<'_, T>,
        scale: T,
    ) {
        let rn = spec.gate_rows();
        self.u.row_mut(slot).assign(&ndarray::ArrayView1::from(u));
        self.a.slice_mut(s![.., slot * rn..(slot + 1) * rn]).assign(&a);
        self.scale[slot] = scale;
    }

    pub(super) fn export_slot(&self, slot: usize, out: &mut SlotState<T>) {
        let (s_len, rn) = (self.a.nrows(), self.v.ncols());
        let a = self.a.slice(s![.., slot * rn..(slot + 1) * rn]);
        out.push_tensor(names::KF_U, vec![self.u.ncols()], self.u.row(slot).to_vec());
        out.push_tensor(names::KF_A, vec![s_len, rn], a.iter().copied().collect());
        out.push_tensor(names::KF_SCALE, vec![], vec![self.scale[slot]]);
        if self.before_reduction {
            let n = self.hidden;
            let hd = self.last_hd.row(slot);
            out.push_tensor(names::KF_LAST_C, vec![], vec![self.last_c[slot]]);
            out.push_tensor(names::KF_LAST_H, vec![n], hd.slice(s![..n]).to_vec());
            out.push_tensor(names::KF_LAST_D, vec![hd.len() - n], hd.slice(s![n..]).to_vec());
            out.indices.push((names::KF_LAST_TOKEN.to_string(), vec![1], vec![self.last_token[slot]]));
        }
    }

    /// Checks the last step's token of a [`SlotState`] whose layout was checked.
    pub(super) fn check_import(&self, vocab: usize, state: &SlotState<T>) -> Result<(), SlotStateError> {
        if let Some(&[t]) = state.index_tensor(names::KF_LAST_TOKEN)
            && t as usize >= vocab
        {
            return Err(SlotStateError::Value {
                name: names::KF_LAST_TOKEN.to_string(),
                value: t.into(),
                reason: format!("outside the vocabulary of {vocab}"),
            });
        }
        Ok(())
    }

    /// Writes a checked [`SlotState`]'s factors into a slot (forced signs go back to the RNG).
    pub(super) fn import_slot(&mut self, slot: usize, state: &SlotState<T>) {
        let (s_len, rn) = (self.a.nrows(), self.v.ncols());
        let tensor = |name| state.tensor(name).expect("checked layout");
        self.u.row_mut(slot).assign(&ndarray::ArrayView1::from(tensor(names::KF_U)));
        let a = ArrayView2::from_shape((s_len, rn), tensor(names::KF_A)).expect("checked layout");
        self.a.slice_mut(s![.., slot * rn..(slot + 1) * rn]).assign(&a);
        self.scale[slot] = tensor(names::KF_SCALE)[0];
        self.forced_sign[slot] = None;
        if self.before_reduction {
            let n = self.hidden;
            self.last_c[slot] = tensor(names::KF_LAST_C)[0];
            let mut hd = self.last_hd.row_mut(slot);
            hd.slice_mut(s![..n]).assign(&ndarray::ArrayView1::from(tensor(names::KF_LAST_H)));
            hd.slice_mut(s![n..]).assign(&ndarray::ArrayView1::from(tensor(names::KF_LAST_D)));
            self.last_token[slot] = state.index_tensor(names::KF_LAST_TOKEN).expect("checked layout")[0];
        }
    }

    /// Whether a slot's `u`, stored `A` and scale are all finite.
    pub(super) fn slot_is_finite(&self, slot: usize) -> bool {
        let rn = self.v.ncols();
        let a = self.a.slice(s![.., slot * rn..(slot + 1) * rn]);
        self.scale[slot].is_finite()
            && all_finite(self.u.row(slot))
            && all_finite(a)
            && self.last_c[slot].is_finite()
            && all_finite(self.last_hd.row(slot))
    }

    pub(super) fn reset(&mut self, slot: usize) {
        let rn = self.v.ncols();
        self.u.row_mut(slot).fill(T::zero());
        self.a.slice_mut(s![.., slot * rn..(slot + 1) * rn]).fill(T::zero());
        self.scale[slot] = T::one();
        self.last_c[slot] = T::zero();
        self.last_hd.row_mut(slot).fill(T::zero());
        self.last_token[slot] = 0;
    }

    pub(super) fn copy_slot(&mut self, src: usize, dst: usize) {
        let rn = self.v.ncols();
        copy_row(&mut self.u, src, dst);
        copy_cols(&mut self.a, src * rn..(src + 1) * rn, dst * rn..(dst + 1) * rn);
        self.scale[dst] = self.scale[src];
        self.forced_sign[dst] = self.forced_sign[src];
        self.last_c[dst] = self.last_c[src];
        copy_row(&mut self.last_hd, src, dst);
        self.last_token[dst] = self.last_token[src];
    }

    /// `∇W += Σ_inputs (δᵀA) ⊗ u`, as per-stream `δᵀA` then one GEMM over the batch.
    pub(super) fn gradient(
        &mut self,
        spec: &ModelSpec,
        inputs: &[SlotStep],
        delta_h: ArrayView2<'_, T>,
        grad: &mut Gradients<T>,
    ) -> f64 {
        let nb = inputs.len();
        let (n, rn, hoff) = (spec.n, spec.gate_rows(), spec.h_offset());
        let a = &self.a;
        let scale = &self.scale;
        let u = &self.u;
        let before = self.before_reduction;
        let (last_c, last_hd, last_token) = (&self.last_c, &self.last_hd, &self.last_token);
        let vrows = SlotRows::new(&mut self.v);
        let urows = SlotRows::new(&mut self.urows);
        for_each_input(nb, |i| {
            let x = inputs[i];
            // SAFETY: each task owns rows `i` and `nb + i` of the two scratch matrices.
            let (v, urow) = unsafe { (vrows.row(i), urows.row(i)) };
            let mut second = before.then(|| unsafe { (vrows.row(nb + i), urows.row(nb + i)) });
            if let Some((v2, u2)) = second.as_mut() {
                v2.fill(T::zero());
                u2.fill(T::zero());
            }
            if !x.learn {
                v.fill(T::zero());
                urow.fill(T::zero());
                return;
            }
            let b = x.slot;
            let block = a.slice(s![hoff..hoff + n, b * rn..(b + 1) * rn]);
            let delta = delta_h.row(i);
            let delta = delta.as_slice().expect("contiguous");
            contract_rows(block, delta, v);
            let sc = scale[b];
            v.iter_mut().for_each(|x| *x = *x * sc);
            urow.copy_from_slice(u.row(b).as_slice().expect("contiguous"));
            let c = if before { last_c[b] } else { T::zero() };
            if let Some((v2, u2)) = second
                && c != T::zero()
            {
                // The sum before the last reduction, u_{t-1} ⊗ B + a ⊗ D, in terms of the
                // reduced factors: u_t ⊗ (A_t − D/c) + a ⊗ (2D − c·A_t) with c = s·p2.
                let hd = last_hd.row(b);
                let hd = hd.as_slice().expect("contiguous");
                let (h_prev, d) = hd.split_at(n);
                let d_h = &d[(spec.k - 1) * rn..];
                let inv_c = T::one() / c;
                let two = T::one() + T::one();
                for q in 0..spec.r {
                    for j in 0..n {
                        let col = q * n + j;
                        let w = delta[j] * d_h[col];
                        let vt = v[col];
                        v[col] = vt - w * inv_c;
                        v2[col] = two * w - c * vt;
                    }
                }
                dense_input(spec, last_token[b], h_prev, u2);
            }
        });
        let rows = if before { 2 * nb } else { nb };
        gemm(
            T::one(),
            self.v.slice(s![..rows, ..]).t(),
            self.urows.slice(s![..rows, ..]),
            T::one(),
            grad.w.view_mut(),
            Par::Pool,
        );
        inputs.iter().filter(|x| x.learn).count() as f64
    }

    /// Follows one advance: `B = H_t A_{t-1}`, then the unbiased rank-one compression.
    pub(super) fn advance(&mut self, spec: &ModelSpec, params: &Params<T>, step: &StepInputs<'_, T>) {
        let inputs = step.inputs;
        let nb = inputs.len();
        if nb == 0 {
            return;
        }
        let rn = spec.gate_rows();
        let threads = rayon::current_num_threads().max(1);
        let workers = if self.strategy == KfStrategy::Wide {
            // Chunks of consecutive slots, at most one chunk per thread's share of the batch and
            // at most what fits in half a core's L2: each chunk is one GEMM `W_h [A_b0 … A_b1]`
            // into a workspace, followed while the result is still in cache by the per-stream
            // scaling back into the slab and the compression.
            let max_chunk = nb.div_ceil(threads).min(self.slots_per_chunk());
            self.chunks.clear();
            let mut i = 0;
            while i < nb {
                let mut j = i + 1;
                while j < nb && j - i < max_chunk && inputs[j].slot == inputs[j - 1].slot + 1 {
                    j += 1;
                }
                self.chunks.push((i, j));
                i = j;
            }
            threads.min(self.chunks.len())
        } else {
            threads.min(nb)
        };
        self.ensure_workspaces(workers);
        let w_h = params.w_h(spec);
        let decay = T::from_f64_rounded(spec.config.influence_decay);
        let slab = SlotBlocks::new(&mut self.a, rn);
        let urows = SlotRows::new(&mut self.u);
        let scales = SlotRows::new(&mut self.scale);
        let forced = &self.forced_sign;
        let growth = self.growth.as_mut().map(|g| g.rows());
        let growth = &growth;
        // SAFETY (of each call): the task that advances slot `b` owns it.
        let gamma_of = |i: usize, b: usize| {
            growth.as_ref().map_or(T::one(), |g| {
                let (d, carry) = (step.d.row(i), step.carry.row(i));
                unsafe { g.step(spec, w_h, d.as_slice().expect("rows"), carry.as_slice().expect("rows"), b) }
            })
        };
        let record = Record {
            enabled: self.before_reduction,
            c: SlotRows::new(&mut self.last_c),
            hd: SlotRows::new(&mut self.last_hd),
            token: SlotRows::new_vec(&mut self.last_token),
        };
        let record = &record;
        let workspaces = &mut self.workspaces[..workers];
        // One thread per workspace; a single worker lets the GEMM use the pool.
        let par = if workers > 1 { Par::Single } else { Par::Pool };
        if self.strategy == KfStrategy::Wide {
            let chunks = &self.chunks;
            let run_chunk = |ws: &mut Workspace<T>, (i0, i1): (usize, usize)| {
                let b0 = inputs[i0].slot;
                let mut product = ws.product.slice_mut(s![.., ..(i1 - i0) * rn]);
                {
                    // SAFETY: chunks cover distinct slots, so each task owns the column blocks of
                    // its slots, their rows of `u` and their entries of `scale`.
                    let src = unsafe { slab.blocks(b0, i1 - i0) };
                    gemm(T::one(), w_h, src.view(), T::zero(), product.view_mut(), par);
                }
                for i in i0..i1 {
                    let b = inputs[i].slot;
                    // SAFETY: as above; the chunk's GEMM view is no longer used.
                    let (mut dst, u, sc) = unsafe { (slab.block(b), urows.row(b), scales.row(b)) };
                    let col = (i - i0) * rn;
                    let prod = product.slice(s![.., col..col + rn]);
                    let d = step.d.row(i);
                    let d = d.as_slice().expect("contiguous");
                    let sb = sc[0] * gamma_of(i, b);
                    let mut nb2 = 0.0f64;
                    for ((mut row, prow), &dj) in
                        dst.axis_iter_mut(Axis(0)).zip(prod.axis_iter(Axis(0))).zip(d)
                    {
                        let c = sb * dj * decay;
                        let rs = row.as_slice_mut().expect("contiguous rows");
                        for (x, &p) in rs.iter_mut().zip(prow.as_slice().expect("contiguous rows")) {
                            *x = p * c;
                        }
                        nb2 += sum_squares(rs);
                    }
                    let sign = sign_for(forced, step, b);
                    let (new_scale, c) = compress(spec, u, dst.view_mut(), nb2, step, i, sign);
                    sc[0] = new_scale;
                    record.write(step, i, b, c);
                }
            };
            if workers > 1 {
                workspaces.par_iter_mut().enumerate().for_each(|(w, ws)| {
                    chunks.iter().skip(w).step_by(workers).for_each(|&chunk| run_chunk(ws, chunk));
                });
            } else {
                chunks.iter().for_each(|&chunk| run_chunk(&mut workspaces[0], chunk));
            }
        } else {
            let run_input = |ws: &mut Workspace<T>, i: usize| {
                let b = inputs[i].slot;
                // SAFETY: every input names a distinct slot (validated by the stream set), so each
                // task owns block `b` of the slab, row `b` of `u` and entry `b` of `scale`.
                let (mut a, u, sc) = unsafe { (slab.block(b), urows.row(b), scales.row(b)) };
                jacobian(
                    spec,
                    w_h,
                    step.d.row(i).as_slice().expect("contiguous"),
                    step.carry.row(i).as_slice().expect("contiguous"),
                    ws.jac.view_mut(),
                );
                gemm(
                    sc[0] * decay * gamma_of(i, b),
                    ws.jac.view(),
                    a.view(),
                    T::zero(),
                    ws.product.view_mut(),
                    par,
                );
                a.assign(&ws.product);
                let nb2: f64 = a.axis_iter(Axis(0)).map(|r| sum_squares(r.as_slice().expect("rows"))).sum();
                let sign = sign_for(forced, step, b);
                let (new_scale, c) = compress(spec, u, a.view_mut(), nb2, step, i, sign);
                sc[0] = new_scale;
                record.write(step, i, b, c);
            };
            if workers > 1 {
                workspaces.par_iter_mut().enumerate().for_each(|(w, ws)| {
                    (w * nb / workers..(w + 1) * nb / workers).for_each(|i| run_input(ws, i));
                });
            } else {
                (0..nb).for_each(|i| run_input(&mut workspaces[0], i));
            }
        }
    }
}

/// Where an advance writes the last step's record (gradient before the reduction).
struct Record<T> {
    enabled: bool,
    c: SlotRows<T>,
    hd: SlotRows<T>,
    token: SlotRows<u32>,
}

impl<T: Float> Record<T> {
    /// Records input `i`'s step into slot `b`: `c = s·p2` (0 when exact), `h_{t-1}`, `D_t`, token.
    fn write(&self, step: &StepInputs<'_, T>, i: usize, b: usize, c: T) {
        if !self.enabled {
            return;
        }
        // SAFETY: the caller owns slot `b` for this advance (distinct slots per batch).
        let (cs, hd, token) = unsafe { (self.c.row(b), self.hd.row(b), self.token.row(b)) };
        cs[0] = c;
        let prev = step.prev.row(i);
        let prev = prev.as_slice().expect("contiguous");
        let h_prev = &prev[prev.len() - (hd.len() - step.d.ncols())..];
        let (h, d) = hd.split_at_mut(h_prev.len());
        h.copy_from_slice(h_prev);
        d.copy_from_slice(step.d.row(i).as_slice().expect("contiguous"));
        token[0] = step.inputs[i].token;
    }
}

/// `v = δᵀ block` (block rows are state units), four rows per sweep over `v`: the pass is bound by
/// reading `A` once.
fn contract_rows<T: Float>(block: ArrayView2<'_, T>, delta: &[T], v: &mut [T]) {
    let n = block.nrows();
    v.fill(T::zero());
    let mut j = 0;
    while j + 4 <= n {
        let r0 = block.row(j);
        let r1 = block.row(j + 1);
        let r2 = block.row(j + 2);
        let r3 = block.row(j + 3);
        let (r0, r1, r2, r3) = (
            r0.to_slice().expect("rows"),
            r1.to_slice().expect("rows"),
            r2.to_slice().expect("rows"),
            r3.to_slice().expect("rows"),
        );
        let (d0, d1, d2, d3) = (delta[j], delta[j + 1], delta[j + 2], delta[j + 3]);
        for c in 0..v.len() {
            v[c] = v[c] + d0 * r0[c] + d1 * r1[c] + d2 * r2[c] + d3 * r3[c];
        }
        j += 4;
    }
    for jj in j..n {
        let row = block.row(jj);
        let row = row.to_slice().expect("rows");
        let dj = delta[jj];
        for (vv, &aa) in v.iter_mut().zip(row) {
            *vv = *vv + dj * aa;
        }
    }
}
