//! Truncated BPTT with window `K`: each stream records its last `K` advances (previous state and
//! token) and the readout error of the token scored after each; once `K` are complete, the
//! window's `K` losses are backpropagated through its `K` advances (the state at the window's start
//! is a constant) and the window restarts. With streams in step, that is one update every `K`
//! steps. At a reset (a sequence boundary) the losses an incomplete window has already scored are
//! backpropagated (`finish_sequence`); only entries not yet scored are dropped.
//!
//! The windows that complete in one step are backpropagated together, in chunks of slots whose
//! `F·K` entries fit one GEMM depth block (512), several chunks at once on the pool's threads
//! (`flush.rs`): the readout gradient, the readout's `∂L/∂h`, the recomputed forward step and
//! `∇W_h` are one GEMM each over all the chunk's entries, and only the recursion
//! `∂L/∂h_{j−1} = … + dZ_j W_h` is one GEMM per entry, over the chunk's slots. Sums over entries
//! never exceed a depth block and chunks are added in chunk order, so that results are
//! bit-identical across thread counts. Nothing is allocated per token: the gathered rows live in
//! scratch sized for one chunk per thread.

use ndarray::{Array2, Array3, ArrayView1, ArrayView2, Axis, s};
use rayon::prelude::*;

use crate::core::linalg::Par;

use super::SlotStep;
use crate::core::float::{Float, all_finite};
use crate::core::model::{ModelSpec, Params};
use crate::core::optim::Gradients;
use crate::core::slot_state::{SlotState, SlotStateError, names};

use super::StepInputs;

mod flush;

use flush::{ChunkScratch, Windows, chunk_layout, chunk_slots};

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
    scratch: Scratch<T>,
}

/// The flushing slots of one step and the state after each one's window; the scratch of the
/// chunks backpropagated at once.
#[derive(Debug, Clone)]
struct Scratch<T> {
    /// The flushing slots, in row order (all chunks).
    slots: Vec<usize>,
    /// The state after each slot's last flushed entry (`slots.len() × s`).
    last: Array2<T>,
    /// One per chunk run side by side.
    chunks: Vec<ChunkScratch<T>>,
}

impl<T: Float> Tbptt<T> {
    /// Empty windows for `capacity` slots.
    pub fn new(spec: &ModelSpec, capacity: usize) -> Self {
        let (s_len, kw) = (spec.state_len(), spec.config.tbptt_window);
        Self {
            window: kw,
            prev: Array3::zeros((capacity, kw, s_len)),
            tokens: Array2::zeros((capacity, kw)),
            err: Array3::zeros((capacity, kw, spec.vocab)),
            len: vec![0; capacity],
            scored: vec![0; capacity],
            learned: vec![0; capacity],
            flushed: vec![0; capacity],
            scratch: {
                let f = chunk_slots(kw).min(capacity);
                // As many chunks side by side as the pool has threads (results do not depend on
                // it), never more than the capacity can fill.
                let side_by_side = rayon::current_num_threads().clamp(1, capacity.div_ceil(f));
                Scratch {
                    slots: Vec::with_capacity(capacity),
                    last: Array2::zeros((capacity, s_len)),
                    chunks: (0..side_by_side).map(|_| ChunkScratch::new(spec, f, kw)).collect(),
                }
            },
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
    /// the chunks of [`chunk_ranges`], as many at once as there are chunk scratches;
    /// `scratch.last` holds, row by row, the state after each slot's entry `len − 1`.
    fn flush(&mut self, spec: &ModelSpec, params: &Params<T>, len: usize, grad: &mut Gradients<T>) {
        let Scratch { slots, last, chunks } = &mut self.scratch;
        for &b in slots.iter() {
            self.flushed[b] = len;
        }
        let windows = Windows { prev: &self.prev, tokens: &self.tokens, err: &self.err };
        let (count, size) = chunk_layout(slots.len(), len);
        let range = |c: usize| c * size..((c + 1) * size).min(slots.len());
        for wave in (0..count).step_by(chunks.len()) {
            let width = chunks.len().min(count - wave);
            let run = |scratch: &mut ChunkScratch<T>, c: usize, par| {
                let last = last.slice(s![range(c), ..]);
                scratch.backprop(spec, params, &windows, &slots[range(c)], last, len, par);
            };
            if width == 1 {
                run(&mut chunks[0], wave, Par::Pool);
            } else {
                chunks[..width]
                    .par_iter_mut()
                    .enumerate()
                    .for_each(|(i, scratch)| run(scratch, wave + i, Par::Single));
            }
            for (i, scratch) in chunks[..width].iter().enumerate() {
                scratch.accumulate(spec, &windows, &slots[range(wave + i)], len, grad);
            }
        }
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
