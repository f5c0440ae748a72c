//! Dense kernels the learners are built from: one GEMM entry point (so that the backend is chosen
//! in one place), the explicit recurrent Jacobian `H_t`, and small vector helpers.

use ndarray::{ArrayView2, ArrayViewMut2, Axis};

use super::float::Float;
use super::model::ModelSpec;

thread_local! {
    static IN_BACKEND: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// True while the calling thread is inside the GEMM backend. The `gemm` crate allocates its
/// packing buffers on every call (served from the allocator's thread cache); the allocation test
/// uses this to tell those apart from allocations of our own per-token loop, which must be none.
pub fn in_gemm_backend() -> bool {
    IN_BACKEND.with(|f| f.get())
}

/// Smallest product (`m·n·k`) split over two threads.
const SPLIT_MIN_WORK: u64 = 1 << 16;

/// How many threads one GEMM may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Par {
    /// The calling thread only (the caller is already parallel).
    Single,
    /// The rayon pool, when the product is large enough to gain from it.
    Pool,
    /// The rayon pool whatever the size (for measuring the backend's peak).
    AllThreads,
}

/// `c ← alpha·a·b + beta·c`. Any strides; `beta = 0` ignores the old contents of `c` (even NaN).
pub fn gemm<T: Float>(
    alpha: T,
    a: ArrayView2<'_, T>,
    b: ArrayView2<'_, T>,
    beta: T,
    mut c: ArrayViewMut2<'_, T>,
    par: Par,
) {
    let (m, k) = a.dim();
    let (k2, n) = b.dim();
    assert_eq!(k, k2, "gemm: inner dimensions differ");
    assert_eq!(c.dim(), (m, n), "gemm: output shape");
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if beta == T::zero() {
            c.fill(T::zero());
        } else {
            c.mapv_inplace(|x| x * beta);
        }
        return;
    }
    let work = (m as u64) * (n as u64) * (k as u64);
    let threads = rayon::current_num_threads();
    let parallelism = match par {
        Par::Single => gemm::Parallelism::None,
        Par::AllThreads => gemm::Parallelism::Rayon(threads),
        // Measured on the target machine: from about 256·256·2048 the backend's own threading
        // pays off; below, its per-call thread start-up costs more than it saves.
        Par::Pool if threads > 1 && work >= 1 << 27 => gemm::Parallelism::Rayon(threads),
        // Medium products: two halves of the output on two pool threads, each a plain
        // single-threaded call (a join costs about a microsecond when the pool is busy).
        // Only when `k` fits one of the backend's depth blocks (512): then every output entry is
        // summed in the same order however the output is split, and results stay bit-identical
        // across thread counts.
        Par::Pool
            if threads > 1
                && work >= SPLIT_MIN_WORK
                && m.max(n) >= 16
                && k <= 512
                && halves_keep_kernel(m, n) =>
        {
            if m >= n {
                let half = m / 2;
                let (c0, c1) = c.split_at(Axis(0), half);
                let (a0, a1) = a.split_at(Axis(0), half);
                rayon::join(
                    || gemm(alpha, a0, b, beta, c0, Par::Single),
                    || gemm(alpha, a1, b, beta, c1, Par::Single),
                );
            } else {
                let half = n / 2;
                let (c0, c1) = c.split_at(Axis(1), half);
                let (b0, b1) = b.split_at(Axis(1), half);
                rayon::join(
                    || gemm(alpha, a, b0, beta, c0, Par::Single),
                    || gemm(alpha, a, b1, beta, c1, Par::Single),
                );
            }
            return;
        }
        Par::Pool => gemm::Parallelism::None,
    };
    let read_dst = beta != T::zero();
    IN_BACKEND.with(|f| f.set(true));
    // SAFETY: the three views are valid for their shapes and strides (ndarray guarantees it), the
    // output does not alias the inputs (it is a unique mutable borrow), and the shapes were checked.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            c.strides()[1],
            c.strides()[0],
            read_dst,
            a.as_ptr(),
            a.strides()[1],
            a.strides()[0],
            b.as_ptr(),
            b.strides()[1],
            b.strides()[0],
            beta,
            alpha,
            false,
            false,
            false,
            parallelism,
        );
    }
    IN_BACKEND.with(|f| f.set(false));
}

/// Whether both halves of an `m × n` output (split along its longer side, as [`gemm`] does) run
/// the backend's kernel of the whole product, so that every entry is summed in the same order
/// with one thread or two: the backend (gemm-common) takes a "horizontal" kernel for outputs of
/// at most 16·16 entries and other block sizes for outputs of at most 64 × 64. At two streams
/// (`2 × 256`, halves `2 × 128`) a split crossed the first line and KF-RTRL's, UORO's and TBPTT's
/// bits depended on the thread count.
fn halves_keep_kernel(m: usize, n: usize) -> bool {
    let (rows, cols) = if m >= n { (m / 2, n) } else { (m, n / 2) };
    let horizontal = |r: usize, c: usize| r * c <= 16 * 16;
    let small = |r: usize, c: usize| r <= 64 && c <= 64;
    horizontal(rows, cols) == horizontal(m, n) && small(rows, cols) == small(m, n)
}

/// Fills `h` (`s × s`, `s = k·n`) with the recurrent Jacobian
/// `H_t = carry + Σ_q diag(D^q) W^q_h` (the second term in the `h` columns only).
pub fn jacobian<T: Float>(
    spec: &ModelSpec,
    w_h: ArrayView2<'_, T>,
    d: &[T],
    carry: &[T],
    mut h: ArrayViewMut2<'_, T>,
) {
    let (n, r, k) = (spec.n, spec.r, spec.k);
    let hoff = spec.h_offset();
    for bi in 0..k {
        for i in 0..n {
            let mut row_view = h.row_mut(bi * n + i);
            let row = row_view.as_slice_mut().expect("jacobian rows are contiguous");
            row[..hoff].fill(T::zero());
            let hpart = &mut row[hoff..hoff + n];
            for q in 0..r {
                let dq = d[(bi * r + q) * n + i];
                let wrow = w_h.row(q * n + i);
                let w = wrow.as_slice().expect("rows of W are contiguous");
                if q == 0 {
                    for (o, &wv) in hpart.iter_mut().zip(w) {
                        *o = dq * wv;
                    }
                } else if dq != T::zero() {
                    for (o, &wv) in hpart.iter_mut().zip(w) {
                        *o = *o + dq * wv;
                    }
                }
            }
            for bj in 0..k {
                let cv = carry[(bi * k + bj) * n + i];
                row[bj * n + i] = row[bj * n + i] + cv;
            }
        }
    }
}

/// `out = xᵀD` for a state-sized `x`: `out[q·n + l] = Σ_blk x[blk·n + l] · D[(blk·r + q)·n + l]`
/// (`D` as [`crate::core::CellKind::forward`] writes it, `k·r·n`; `out` is `r·n`).
pub fn through_d<T: Float>(spec: &ModelSpec, x: &[T], d: &[T], out: &mut [T]) {
    let (n, r, k) = (spec.n, spec.r, spec.k);
    for q in 0..r {
        for l in 0..n {
            let mut acc = T::zero();
            for blk in 0..k {
                acc = acc + x[blk * n + l] * d[(blk * r + q) * n + l];
            }
            out[q * n + l] = acc;
        }
    }
}

/// `out = H_t v` for a state-sized `v`, given `w_h_v = W_h v_h` (`r·n`): the carry's part plus
/// each gate's `D`: `out[bi·n + j] = Σ_bj carry[(bi·k + bj)·n + j] v[bj·n + j] + Σ_q D[(bi·r + q)·n + j] w_h_v[q·n + j]`
/// (`D` and the carry as [`jacobian`] takes them).
pub fn jacobian_times<T: Float>(spec: &ModelSpec, d: &[T], carry: &[T], v: &[T], w_h_v: &[T], out: &mut [T]) {
    let (n, r, k) = (spec.n, spec.r, spec.k);
    for bi in 0..k {
        for j in 0..n {
            let mut acc = T::zero();
            for bj in 0..k {
                acc = acc + carry[(bi * k + bj) * n + j] * v[bj * n + j];
            }
            for q in 0..r {
                acc = acc + d[(bi * r + q) * n + j] * w_h_v[q * n + j];
            }
            out[bi * n + j] = acc;
        }
    }
}
