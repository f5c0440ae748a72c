//! Dense kernels the learners are built from: one GEMM entry point (so that the backend is chosen
//! in one place), the explicit recurrent Jacobian `H_t`, and small vector helpers.

use ndarray::{ArrayView2, ArrayViewMut2};

use super::float::Float;
use super::model::ModelSpec;

/// How many threads one GEMM may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Par {
    /// The calling thread only (the caller is already parallel).
    Single,
    /// The rayon pool.
    Pool,
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
    let parallelism = match par {
        Par::Single => gemm::Parallelism::None,
        Par::Pool => {
            let threads = rayon::current_num_threads();
            // Measured on the target machine: below about 256·256·2048 a second thread costs more
            // (wake-up latency) than it saves.
            if threads > 1 && (m as u64) * (n as u64) * (k as u64) >= 1 << 27 {
                gemm::Parallelism::Rayon(threads)
            } else {
                gemm::Parallelism::None
            }
        }
    };
    let read_dst = beta != T::zero();
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
    h.fill(T::zero());
    for bi in 0..k {
        for i in 0..n {
            let row_idx = bi * n + i;
            let mut row = h.row_mut(row_idx);
            for q in 0..r {
                let dq = d[(bi * r + q) * n + i];
                if dq != T::zero() {
                    let wrow = w_h.row(q * n + i);
                    for (j, &w) in wrow.iter().enumerate() {
                        row[hoff + j] = row[hoff + j] + dq * w;
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

/// `y += alpha·x`.
#[inline]
pub fn axpy<T: Float>(alpha: T, x: &[T], y: &mut [T]) {
    debug_assert_eq!(x.len(), y.len());
    for (yi, &xi) in y.iter_mut().zip(x) {
        *yi = *yi + alpha * xi;
    }
}
