//! Truncated BPTT with window `K`: each stream records its last `K` advances (previous state and
//! token) and the readout error of the token scored after each; once `K` are complete, the
//! window's `K` losses are backpropagated through its `K` advances (the state at the window's start
//! is a constant) and the window restarts. With streams in step, that is one update every `K`
//! steps. At a reset (a sequence boundary) the losses an incomplete window has already scored are
//! backpropagated (`finish_sequence`); only entries not yet scored are dropped.
//!
//! The windows that complete in one step are backpropagated together, in chunks of slots whose
//! `F·K` entries fit one GEMM depth block (512): the readout gradient, the readout's `∂L/∂h`, the
//! recomputed forward step and `∇W_h` are one GEMM each over all the chunk's entries, and only the
//! recursion `∂L/∂h_{j−1} = … + dZ_j W_h` is one GEMM per entry, over the chunk's slots. Sums over
//! entries never exceed a depth block, so that results are bit-identical across thread counts.
//! Nothing is allocated per token: the gathered rows live in scratch sized for one chunk.

use ndarray::{Array2, Array3, ArrayView1, ArrayView2, ArrayViewMut1, Axis, Zip, s};

use crate::core::linalg::{Par, gemm, through_d};

use super::SlotStep;
use crate::core::float::{Float, all_finite};
use crate::core::model::{ModelSpec, Params};
use crate::core::optim::Gradients;
use crate::core::slot_state::{SlotState, SlotStateError, names};

use super::StepInputs;

/// Truncated-BPTT windows of every slot.
#[derive(Debug, Clone)]
pub struct Tbptt<T> {
    window: usize,
    /// State before each recorded advance, `capacity × K × s`.
    prev: Array3<T>,
    tokens: Array2<u32>,
    /// `softmax − onehot` of the token scored after each advance, `capacity × K × vocab`.
    err: Array3<T>,
    len: Vec<usize>,
    /// Entries whose following token has been scored (`len − 1` or `len`).
    scored: Vec<usize>,
    learned: Vec<usize>,
    /// Length of the window last backpropagated (its entries stay in the buffers until
    /// overwritten), so that a non-finite gradient can be traced to the window that made it.
    flushed: Vec<usize>,
    /// Boxed: a dozen arrays would make this the largest variant of `Learner` by far.
    scratch: Box<Scratch<T>>,
}

/// Entries summed by one reduction GEMM at most (a depth block of the backend).
const DEPTH_BLOCK: usize = 512;

/// Slots backpropagated together when their windows hold `len` entries.
fn chunk_slots(len: usize) -> usize {
    (DEPTH_BLOCK / len.max(1)).max(1)
}

/// Rows gathered for one chunk of the batched backward pass: `F` flushing slots, and their
/// `R = len·F` entries, entry `j` of slot row `f` at row `j·F + f`.
#[derive(Debug, Clone)]
struct Scratch<T> {
    /// The flushing slots, in row order (all chunks).
    slots: Vec<usize>,
    /// The state after each slot's last flushed entry (`slots.len() × s`).
    last: Array2<T>,
    /// `h` after each entry, `h` before it, its readout error (`R × n`, `R × n`, `R × vocab`).
    h_after: Array2<T>,
    h_prev: Array2<T>,
    err: Array2<T>,
    /// The readout's `∂L/∂h` at each entry, `E V_h` (`R × n`).
    readout_dh: Array2<T>,
    /// Recomputed pre-activations, cell derivatives and `∂L/∂z` of each entry.
    z: Array2<T>,
    d: Array2<T>,
    carry: Array2<T>,
    dz: Array2<T>,
    /// The cell's next state of each entry (computed with the derivatives, not needed).
    next: Array2<T>,
    /// `∂L/∂s` after the entry, then before it (`F × s` each).
    g: Array2<T>,
    g2: Array2<T>,
}

impl<T: Float> Tbptt<T> {
    /// Empty windows for `capacity` slots.
    pub fn new(spec: &ModelSpec, capacity: usize) -> Self {
        let (n, r, k, s_len, kw) = (spec.n, spec.r, spec.k, spec.state_len(), spec.config.tbptt_window);
        Self {
            window: kw,
            prev: Array3::zeros((capacity, kw, s_len)),
            tokens: Array2::zeros((capacity, kw)),
            err: Array3::zeros((capacity, kw, spec.vocab)),
            len: vec![0; capacity],
            scored: vec![0; capacity],
            learned: vec![0; capacity],
            flushed: vec![0; capacity],
            scratch: Box::new({
                let f = chunk_slots(kw).min(capacity);
                let rows = f * kw;
                Scratch {
                    slots: Vec::with_capacity(capacity),
                    last: Array2::zeros((capacity, s_len)),
                    h_after: Array2::zeros((rows, n)),
                    h_prev: Array2::zeros((rows, n)),
                    err: Array2::zeros((rows, spec.vocab)),
                    readout_dh: Array2::zeros((rows, n)),
                    z: Array2::zeros((rows, r * n)),
                    d: Array2::zeros((rows, k * r * n)),
                    carry: Array2::zeros((rows, k * k * n)),
                    dz: Array2::zeros((rows, r * n)),
                    next: Array2::zeros((rows, s_len)),
                    g: Array2::zeros((f, s_len)),
                    g2: Array2::zeros((f, s_len)),
                }
            }),
        }
    }

    /// The truncation window `K`.
    pub fn window(&self) -> usize {
        self.window
    }

    /// Advances recorded in a slot's current window.
    pub fn pending(&self, slot: usize) -> usize {
        self.len[slot]
    }

    /// Exports the window, entries past its length as zeros (never read before being written).
    pub(super) fn export_slot(&self, slot: usize, out: &mut SlotState<T>) {
        let len = self.len[slot];
        let window_rows = |a: &Array3<T>| {
            let mut v: Vec<T> = a.slice(s![slot, ..len, ..]).iter().copied().collect();
            v.resize(self.window * a.shape()[2], T::zero());
            (vec![self.window, a.shape()[2]], v)
        };
        let (shape, prev) = window_rows(&self.prev);
        out.push_tensor(names::TBPTT_PREV, shape, prev);
        let (shape, err) = window_rows(&self.err);
        out.push_tensor(names::TBPTT_ERR, shape, err);
        let mut tokens = self.tokens.slice(s![slot, ..len]).to_vec();
        tokens.resize(self.window, 0);
        out.indices.push((names::TBPTT_TOKENS.to_string(), vec![self.window], tokens));
        out.counters.extend([
            (names::TBPTT_LEN.to_string(), len as u64),
            (names::TBPTT_SCORED.to_string(), self.scored[slot] as u64),
            (names::TBPTT_LEARNED.to_string(), self.learned[slot] as u64),
        ]);
    }

    /// Checks the counters and tokens of a [`SlotState`] whose layout was checked.
    pub(super) fn check_import(&self, vocab: usize, state: &SlotState<T>) -> Result<(), SlotStateError> {
        let counter = |name| state.counter(name).expect("checked layout");
        let (len, scored, learned) =
            (counter(names::TBPTT_LEN), counter(names::TBPTT_SCORED), counter(names::TBPTT_LEARNED));
        let bad = |name: &str, value: u64, reason: String| {
            Err(SlotStateError::Value { name: name.to_string(), value, reason })
        };
        if len > self.window as u64 {
            return bad(names::TBPTT_LEN, len, format!("the window holds at most {}", self.window));
        }
        if scored > len {
            return bad(names::TBPTT_SCORED, scored, format!("more than the {len} advances recorded"));
        }
        if learned > scored {
            return bad(names::TBPTT_LEARNED, learned, format!("more than the {scored} advances scored"));
        }
        let tokens = state.index_tensor(names::TBPTT_TOKENS).expect("checked layout");
        if let Some(&t) = tokens.iter().find(|&&t| t as usize >= vocab) {
            return bad(names::TBPTT_TOKENS, t.into(), format!("outside the vocabulary of {vocab}"));
        }
        Ok(())
    }

    /// Writes a checked [`SlotState`]'s window into a slot.
    pub(super) fn import_slot(&mut self, slot: usize, state: &SlotState<T>) {
        let tensor = |name| state.tensor(name).expect("checked layout");
        let mut prev = self.prev.index_axis_mut(Axis(0), slot);
        prev.as_slice_mut().expect("standard layout").copy_from_slice(tensor(names::TBPTT_PREV));
        let mut err = self.err.index_axis_mut(Axis(0), slot);
        err.as_slice_mut().expect("standard layout").copy_from_slice(tensor(names::TBPTT_ERR));
        let mut tokens = self.tokens.row_mut(slot);
        let tokens = tokens.as_slice_mut().expect("standard layout");
        tokens.copy_from_slice(state.index_tensor(names::TBPTT_TOKENS).expect("checked layout"));
        let counter = |name| state.counter(name).expect("checked layout") as usize;
        self.len[slot] = counter(names::TBPTT_LEN);
        self.scored[slot] = counter(names::TBPTT_SCORED);
        self.learned[slot] = counter(names::TBPTT_LEARNED);
        // Entries past the window are never read; zeros keep them out of fault tracing.
        let len = self.len[slot];
        self.prev.slice_mut(s![slot, len.., ..]).fill(T::zero());
        self.err.slice_mut(s![slot, len.., ..]).fill(T::zero());
        self.flushed[slot] = 0;
    }

    /// Whether the entries of a slot's window, and of the window it last backpropagated, are
    /// finite.
    pub(super) fn slot_is_finite(&self, slot: usize) -> bool {
        let used = self.len[slot].max(self.flushed[slot]);
        all_finite(self.prev.slice(s![slot, ..used, ..])) && all_finite(self.err.slice(s![slot, ..used, ..]))
    }

    /// Empties a slot's window and zeroes its buffers, so that a faulty window leaves no trace.
    pub(super) fn discard(&mut self, slot: usize) {
        self.reset(slot);
        self.flushed[slot] = 0;
        self.prev.index_axis_mut(Axis(0), slot).fill(T::zero());
        self.err.index_axis_mut(Axis(0), slot).fill(T::zero());
    }

    pub(super) fn reset(&mut self, slot: usize) {
        self.len[slot] = 0;
        self.scored[slot] = 0;
        self.learned[slot] = 0;
    }

    /// Before a reset: backpropagates the window's scored entries (the losses already taken)
    /// so that a sequence boundary never drops them. Returns the contributions added.
    pub(super) fn finish_sequence(
        &mut self,
        spec: &ModelSpec,
        params: &Params<T>,
        slot: usize,
        current: &[T],
        grad: &mut Gradients<T>,
    ) -> f64 {
        let (scored, learned) = (self.scored[slot], self.learned[slot]);
        let mut count = 0.0;
        if scored > 0 && learned > 0 {
            let after_last = if scored < self.len[slot] {
                self.prev.slice(s![slot, scored, ..])
            } else {
                ArrayView1::from(current)
            };
            self.scratch.last.row_mut(0).assign(&after_last);
            self.scratch.slots.clear();
            self.scratch.slots.push(slot);
            self.flush(spec, params, scored, grad);
            count = learned as f64;
        }
        self.reset(slot);
        count
    }

    pub(super) fn copy_slot(&mut self, src: usize, dst: usize) {
        let p = self.prev.index_axis(Axis(0), src).to_owned();
        self.prev.index_axis_mut(Axis(0), dst).assign(&p);
        let t = self.tokens.row(src).to_owned();
        self.tokens.row_mut(dst).assign(&t);
        let e = self.err.index_axis(Axis(0), src).to_owned();
        self.err.index_axis_mut(Axis(0), dst).assign(&e);
        self.len[dst] = self.len[src];
        self.scored[dst] = self.scored[src];
        self.learned[dst] = self.learned[src];
        self.flushed[dst] = self.flushed[src];
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn gradient(
        &mut self,
        spec: &ModelSpec,
        params: &Params<T>,
        inputs: &[SlotStep],
        err: ArrayView2<'_, T>,
        h1: ArrayView2<'_, T>,
        states: &Array2<T>,
        grad: &mut Gradients<T>,
    ) -> f64 {
        let mut count = 0.0;
        self.scratch.slots.clear();
        for (i, x) in inputs.iter().enumerate() {
            let b = x.slot;
            let len = self.len[b];
            if len == 0 {
                // Scored from the start of a sequence: only the readout has a gradient.
                if x.learn {
                    outer_add(
                        &mut grad.v,
                        err.row(i).as_slice().expect("row"),
                        h1.row(i).as_slice().expect("row"),
                    );
                    count += 1.0;
                }
                continue;
            }
            self.err.slice_mut(s![b, len - 1, ..]).assign(&err.row(i));
            // A second score of the same entry replaces its error; it is counted once.
            if self.scored[b] < len {
                self.scored[b] = len;
                if x.learn {
                    self.learned[b] += 1;
                }
            }
            if len == self.window {
                if self.learned[b] > 0 {
                    let row = self.scratch.slots.len();
                    self.scratch.last.row_mut(row).assign(&states.row(b));
                    self.scratch.slots.push(b);
                    count += self.learned[b] as f64;
                }
                // The buffers keep the window for the flush below; only the counters restart.
                self.reset(b);
            }
        }
        if !self.scratch.slots.is_empty() {
            self.flush(spec, params, self.window, grad);
        }
        count
    }

    /// Backpropagates the first `len` entries of the windows of `scratch.slots` into `grad`, in
    /// chunks of [`chunk_slots`]; `scratch.last` holds, row by row, the state after each slot's
    /// entry `len − 1`.
    fn flush(&mut self, spec: &ModelSpec, params: &Params<T>, len: usize, grad: &mut Gradients<T>) {
        for &b in &self.scratch.slots {
            self.flushed[b] = len;
        }
        let per_chunk = chunk_slots(len);
        let mut first = 0;
        while first < self.scratch.slots.len() {
            let end = (first + per_chunk).min(self.scratch.slots.len());
            self.flush_chunk(spec, params, len, first..end, grad);
            first = end;
        }
    }

    /// One chunk of [`Tbptt::flush`]: the slots `scratch.slots[chunk]`.
    fn flush_chunk(
        &mut self,
        spec: &ModelSpec,
        params: &Params<T>,
        len: usize,
        chunk: std::ops::Range<usize>,
        grad: &mut Gradients<T>,
    ) {
        let (n, k) = (spec.n, spec.k);
        let hoff = spec.h_offset();
        let (h_col, bias) = (spec.h_col(), spec.bias_col());
        let w_h = params.w_h(spec);
        let v_h = params.v.slice(s![.., ..n]);
        let Scratch { slots, last, h_after, h_prev, err, readout_dh, z, d, carry, dz, next, g, g2 } =
            &mut *self.scratch;
        let slots = &slots[chunk.clone()];
        let f = slots.len();
        let rows = s![..len * f, ..];
        for j in 0..len {
            for (row, &b) in slots.iter().enumerate() {
                let at = j * f + row;
                let after = if j + 1 < len {
                    self.prev.slice(s![b, j + 1, hoff..])
                } else {
                    last.slice(s![chunk.start + row, hoff..])
                };
                h_after.row_mut(at).assign(&after);
                h_prev.row_mut(at).assign(&self.prev.slice(s![b, j, hoff..]));
                err.row_mut(at).assign(&self.err.slice(s![b, j, ..]));
            }
        }
        let (h_after, h_prev, err) = (h_after.slice(rows), h_prev.slice(rows), err.slice(rows));
        // Readout of every entry: ∇V += Eᵀ [H_after 1], and its ∂L/∂h, E V_h.
        gemm(T::one(), err.t(), h_after, T::one(), grad.v.slice_mut(s![.., ..n]), Par::Pool);
        let mut v_bias = grad.v.column_mut(n);
        for e in err.rows() {
            v_bias.zip_mut_with(&e, |acc, &ev| *acc = *acc + ev);
        }
        let mut readout_dh = readout_dh.slice_mut(rows);
        gemm(T::one(), err, v_h, T::zero(), readout_dh.view_mut(), Par::Pool);
        // Every entry's cell derivatives: from its output where the cell allows (tanh), else from
        // the forward step run again, Z = H_prev W_hᵀ + W_x + b.
        // One task per entry row (on the pool when there are enough): rows are independent.
        let cell = spec.cell();
        let pooled = len * f >= 64;
        let (mut d_rows, mut carry_rows, mut next_rows) =
            (d.slice_mut(rows), carry.slice_mut(rows), next.slice_mut(rows));
        if cell.output_determines_derivatives() {
            let work = |_at: usize,
                        h: ArrayView1<'_, T>,
                        mut d: ArrayViewMut1<'_, T>,
                        mut carry: ArrayViewMut1<'_, T>| {
                cell.derivatives_from_next(
                    h.to_slice().expect("row"),
                    d.as_slice_mut().expect("row"),
                    carry.as_slice_mut().expect("row"),
                );
            };
            let zip = Zip::indexed(h_after.rows()).and(d_rows.rows_mut()).and(carry_rows.rows_mut());
            if pooled { zip.par_for_each(work) } else { zip.for_each(work) }
        } else {
            let mut z = z.slice_mut(rows);
            gemm(T::one(), h_prev, w_h.t(), T::zero(), z.view_mut(), Par::Pool);
            let (prev_all, tokens) = (&self.prev, &self.tokens);
            let work = |at: usize,
                        mut z: ArrayViewMut1<'_, T>,
                        mut next: ArrayViewMut1<'_, T>,
                        mut d: ArrayViewMut1<'_, T>,
                        mut carry: ArrayViewMut1<'_, T>| {
                let (j, b) = (at / f, slots[at % f]);
                let token = tokens[[b, j]] as usize;
                let zr = z.as_slice_mut().expect("row");
                for (q_row, zv) in zr.iter_mut().enumerate() {
                    *zv = *zv + params.w[[q_row, token]] + params.w[[q_row, bias]];
                }
                let prev = prev_all.slice(s![b, j, ..]);
                cell.forward(
                    n,
                    zr,
                    prev.to_slice().expect("row"),
                    next.as_slice_mut().expect("row"),
                    d.as_slice_mut().expect("row"),
                    carry.as_slice_mut().expect("row"),
                );
            };
            let zip = Zip::indexed(z.rows_mut())
                .and(next_rows.rows_mut())
                .and(d_rows.rows_mut())
                .and(carry_rows.rows_mut());
            if pooled { zip.par_for_each(work) } else { zip.for_each(work) }
        }
        // The recursion over the window, all the chunk's slots at once.
        let (mut g, mut g2) = (g.slice_mut(s![..f, ..]), g2.slice_mut(s![..f, ..]));
        g.fill(T::zero());
        for j in (0..len).rev() {
            let entry = s![j * f..(j + 1) * f, ..];
            g.slice_mut(s![.., hoff..]).zip_mut_with(&readout_dh.slice(entry), |a, &b| *a = *a + b);
            for (row, &b) in slots.iter().enumerate() {
                let at = j * f + row;
                let token = self.tokens[[b, j]] as usize;
                let (gr, d, carry) = (g.row(row), d.row(at), carry.row(at));
                let (gr, d, carry) =
                    (gr.to_slice().expect("row"), d.to_slice().expect("row"), carry.to_slice().expect("row"));
                // ∂L/∂z of each gate row: Σ over state blocks of D ∘ ∂L/∂s.
                let dzr = dz.row_mut(at).into_slice().expect("row");
                through_d(spec, gr, d, dzr);
                // The carried part of ∂L/∂s before the step.
                let mut g2r = g2.row_mut(row);
                for bj in 0..k {
                    for l in 0..n {
                        let mut acc = T::zero();
                        for bi in 0..k {
                            acc = acc + carry[(bi * k + bj) * n + l] * gr[bi * n + l];
                        }
                        g2r[bj * n + l] = acc;
                    }
                }
                // Input and bias columns of ∇W (the token's one-hot picks one column).
                for (q_row, &dzv) in dzr.iter().enumerate() {
                    grad.w[[q_row, token]] = grad.w[[q_row, token]] + dzv;
                    grad.w[[q_row, bias]] = grad.w[[q_row, bias]] + dzv;
                }
            }
            gemm(T::one(), dz.slice(entry), w_h, T::one(), g2.slice_mut(s![.., hoff..]), Par::Pool);
            std::mem::swap(&mut g, &mut g2);
        }
        // ∇W_h += dZᵀ H_prev over every entry.
        let dz = dz.slice(rows);
        gemm(T::one(), dz.t(), h_prev, T::one(), grad.w.slice_mut(s![.., h_col..h_col + n]), Par::Pool);
    }

    pub(super) fn advance(&mut self, step: &StepInputs<'_, T>) {
        for (i, x) in step.inputs.iter().enumerate() {
            let b = x.slot;
            if self.len[b] == self.window {
                // The window was never scored (advance without score): start a new one.
                self.reset(b);
            }
            let len = self.len[b];
            self.prev.slice_mut(s![b, len, ..]).assign(&step.prev.row(i));
            self.tokens[[b, len]] = x.token;
            // No loss has been taken after this advance yet.
            self.err.slice_mut(s![b, len, ..]).fill(T::zero());
            self.len[b] = len + 1;
        }
    }
}

fn outer_add<T: Float>(dst: &mut Array2<T>, col: &[T], row: &[T]) {
    for (o, &c) in col.iter().enumerate() {
        if c != T::zero() {
            let mut r = dst.row_mut(o);
            for (x, &v) in r.iter_mut().zip(row) {
                *x = *x + c * v;
            }
        }
    }
}
