//! The batched backward pass of the windows that complete together, in two phases per chunk of
//! slots:
//! 1. [`ChunkScratch::backprop`]: gather the chunk's entries, take the readout's `∂L/∂h` of every
//!    entry, the cell derivatives (from the output, or from the forward step run again), and run
//!    the recursion over the window down to each entry's `∂L/∂z`. A chunk only reads the windows
//!    and writes its own scratch, so several chunks run at once, one per pool thread.
//! 2. [`ChunkScratch::accumulate`]: add the chunk's sums to the shared gradient — `∇V`, the input
//!    and bias columns of `∇W`, and `∇W_h = dZᵀ H_prev` — chunk after chunk, in chunk order.
//!
//! Each sum over entries is one GEMM of at most a depth block, and phase 2 adds the chunks in the
//! same order whatever ran them, so results are bit-identical across thread counts.

use ndarray::{Array2, Array3, ArrayView1, ArrayViewMut1, Zip, s};

use crate::core::float::Float;
use crate::core::linalg::{Par, gemm, through_d};
use crate::core::model::{ModelSpec, Params};
use crate::core::optim::Gradients;

/// Entries summed by one reduction GEMM at most (a depth block of the backend).
const DEPTH_BLOCK: usize = 512;

/// Most slots one chunk may hold when their windows hold `len` entries.
pub(super) fn chunk_slots(len: usize) -> usize {
    (DEPTH_BLOCK / len.max(1)).max(1)
}

/// How `flushing` slots with `len` entries each split into chunks: `(count, size)`, as few chunks
/// as [`chunk_slots`] allows, of equal size (the last may be smaller), so that chunks run side by
/// side take equal time. Chunk `c` holds the slots `c·size .. min((c + 1)·size, flushing)`.
/// Depends on nothing else, the thread count least of all.
pub(super) fn chunk_layout(flushing: usize, len: usize) -> (usize, usize) {
    let count = flushing.div_ceil(chunk_slots(len)).max(1);
    (count, flushing.div_ceil(count).max(1))
}

/// The recorded windows of every slot, read by the backward pass.
pub(super) struct Windows<'a, T> {
    /// State before each recorded advance, `capacity × K × s`.
    pub prev: &'a Array3<T>,
    pub tokens: &'a Array2<u32>,
    /// `softmax − onehot` after each advance, `capacity × K × vocab`.
    pub err: &'a Array3<T>,
}

/// Rows gathered for one chunk: `F` slots and their `R = len·F` entries, entry `j` of slot row
/// `f` at row `j·F + f`.
#[derive(Debug, Clone)]
pub(super) struct ChunkScratch<T> {
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

impl<T: Float> ChunkScratch<T> {
    /// Scratch for chunks of up to `slots` slots with windows of up to `window` entries.
    pub fn new(spec: &ModelSpec, slots: usize, window: usize) -> Self {
        let (n, r, k, s_len) = (spec.n, spec.r, spec.k, spec.state_len());
        let rows = slots * window;
        Self {
            h_after: Array2::zeros((rows, n)),
            h_prev: Array2::zeros((rows, n)),
            err: Array2::zeros((rows, spec.vocab)),
            readout_dh: Array2::zeros((rows, n)),
            z: Array2::zeros((rows, r * n)),
            d: Array2::zeros((rows, k * r * n)),
            carry: Array2::zeros((rows, k * k * n)),
            dz: Array2::zeros((rows, r * n)),
            next: Array2::zeros((rows, s_len)),
            g: Array2::zeros((slots, s_len)),
            g2: Array2::zeros((slots, s_len)),
        }
    }

    /// Phase 1 for the first `len` entries of the windows of `slots`: everything up to each
    /// entry's `∂L/∂z`. `last` holds, row by row, the state after each slot's entry `len − 1`.
    /// `par` says whether this chunk may use the pool (it runs alone) or not (it runs beside
    /// others).
    #[allow(clippy::too_many_arguments)]
    pub fn backprop(
        &mut self,
        spec: &ModelSpec,
        params: &Params<T>,
        windows: &Windows<'_, T>,
        slots: &[usize],
        last: ndarray::ArrayView2<'_, T>,
        len: usize,
        par: Par,
    ) {
        let (n, k) = (spec.n, spec.k);
        let hoff = spec.h_offset();
        let bias = spec.bias_col();
        let w_h = params.w_h(spec);
        let v_h = params.v.slice(s![.., ..n]);
        let Self { h_after, h_prev, err, readout_dh, z, d, carry, dz, next, g, g2 } = self;
        let f = slots.len();
        let rows = s![..len * f, ..];
        for j in 0..len {
            for (row, &b) in slots.iter().enumerate() {
                let at = j * f + row;
                let after = if j + 1 < len {
                    windows.prev.slice(s![b, j + 1, hoff..])
                } else {
                    last.slice(s![row, hoff..])
                };
                h_after.row_mut(at).assign(&after);
                h_prev.row_mut(at).assign(&windows.prev.slice(s![b, j, hoff..]));
                err.row_mut(at).assign(&windows.err.slice(s![b, j, ..]));
            }
        }
        let mut readout_dh = readout_dh.slice_mut(rows);
        gemm(T::one(), err.slice(rows), v_h, T::zero(), readout_dh.view_mut(), par);
        // Every entry's cell derivatives: from its output where the cell allows (tanh), else from
        // the forward step run again, Z = H_prev W_hᵀ + W_x + b.
        // One task per entry row (on the pool when allowed and there are enough): rows are
        // independent.
        let cell = spec.cell();
        let pooled = par != Par::Single && len * f >= 64;
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
            let h_after = h_after.slice(rows);
            let zip = Zip::indexed(h_after.rows()).and(d_rows.rows_mut()).and(carry_rows.rows_mut());
            if pooled { zip.par_for_each(work) } else { zip.for_each(work) }
        } else {
            let mut z = z.slice_mut(rows);
            gemm(T::one(), h_prev.slice(rows), w_h.t(), T::zero(), z.view_mut(), par);
            let work = |at: usize,
                        mut z: ArrayViewMut1<'_, T>,
                        mut next: ArrayViewMut1<'_, T>,
                        mut d: ArrayViewMut1<'_, T>,
                        mut carry: ArrayViewMut1<'_, T>| {
                let (j, b) = (at / f, slots[at % f]);
                let token = windows.tokens[[b, j]] as usize;
                let zr = z.as_slice_mut().expect("row");
                for (q_row, zv) in zr.iter_mut().enumerate() {
                    *zv = *zv + params.w[[q_row, token]] + params.w[[q_row, bias]];
                }
                let prev = windows.prev.slice(s![b, j, ..]);
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
            for row in 0..f {
                let at = j * f + row;
                let (gr, d, carry) = (g.row(row), d.row(at), carry.row(at));
                let (gr, d, carry) =
                    (gr.to_slice().expect("row"), d.to_slice().expect("row"), carry.to_slice().expect("row"));
                // ∂L/∂z of each gate row: Σ over state blocks of D ∘ ∂L/∂s.
                through_d(spec, gr, d, dz.row_mut(at).into_slice().expect("row"));
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
            }
            gemm(T::one(), dz.slice(entry), w_h, T::one(), g2.slice_mut(s![.., hoff..]), par);
            std::mem::swap(&mut g, &mut g2);
        }
    }

    /// Phase 2: adds the sums of the chunk [`ChunkScratch::backprop`] left to `grad`.
    pub fn accumulate(
        &self,
        spec: &ModelSpec,
        windows: &Windows<'_, T>,
        slots: &[usize],
        len: usize,
        grad: &mut Gradients<T>,
    ) {
        let n = spec.n;
        let (h_col, bias) = (spec.h_col(), spec.bias_col());
        let f = slots.len();
        let rows = s![..len * f, ..];
        let (h_after, h_prev, err, dz) =
            (self.h_after.slice(rows), self.h_prev.slice(rows), self.err.slice(rows), self.dz.slice(rows));
        // Readout of every entry: ∇V += Eᵀ [H_after 1].
        gemm(T::one(), err.t(), h_after, T::one(), grad.v.slice_mut(s![.., ..n]), Par::Pool);
        let mut v_bias = grad.v.column_mut(n);
        for e in err.rows() {
            v_bias.zip_mut_with(&e, |acc, &ev| *acc = *acc + ev);
        }
        // Input and bias columns of ∇W (the token's one-hot picks one column), in the order of
        // the recursion.
        for j in (0..len).rev() {
            for (row, &b) in slots.iter().enumerate() {
                let token = windows.tokens[[b, j]] as usize;
                for (q_row, &dzv) in dz.row(j * f + row).iter().enumerate() {
                    grad.w[[q_row, token]] = grad.w[[q_row, token]] + dzv;
                    grad.w[[q_row, bias]] = grad.w[[q_row, bias]] + dzv;
                }
            }
        }
        // ∇W_h += dZᵀ H_prev over every entry.
        gemm(T::one(), dz.t(), h_prev, T::one(), grad.w.slice_mut(s![.., h_col..h_col + n]), Par::Pool);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The layout is the contract behind bit-identical results: every chunk's sums fit one depth
    /// block, and chunks are as few and as even as that allows (results and speed depend on it,
    /// the thread count never does).
    #[test]
    fn chunks_fit_a_depth_block_and_are_as_few_and_even_as_it_allows() {
        assert_eq!((chunk_slots(25), chunk_slots(8), chunk_slots(512), chunk_slots(600)), (20, 64, 1, 1));
        assert_eq!(chunk_slots(0), DEPTH_BLOCK);
        for (flushing, len, layout) in
            [(32, 25, (2, 16)), (130, 8, (3, 44)), (20, 25, (1, 20)), (1, 600, (1, 1))]
        {
            assert_eq!(chunk_layout(flushing, len), layout, "{flushing} slots of {len} entries");
        }
        for flushing in 1..200 {
            for len in [1, 3, 8, 25, 64, 100, 511, 513] {
                let (count, size) = chunk_layout(flushing, len);
                assert!(size * len <= DEPTH_BLOCK || size == 1, "{flushing}×{len}: chunks of {size}");
                assert!(count * size >= flushing && (count - 1) * size < flushing, "{flushing}×{len}");
                assert_eq!(count, flushing.div_ceil(chunk_slots(len)), "{flushing}×{len}: not the fewest");
            }
        }
    }
}
