//! KF-RTRL's unbiased rank-one compression of `u ⊗ B + a ⊗ D` (KF-RTRL.md §3.2), with the exact
//! branches for zero factors (§8), and the random sign each slot's step draws for it.

use ndarray::ArrayViewMut2;

use super::super::StepInputs;
use crate::core::float::{Float, sum_squares};
use crate::core::model::ModelSpec;
use crate::core::rng;

/// The sign `s = c1·c2` of a slot's step: forced by an oracle test, else from the slot's
/// counter-based key.
pub(super) fn sign_for<T>(forced: &[Option<f64>], step: &StepInputs<'_, T>, slot: usize) -> f64 {
    forced[slot].unwrap_or_else(|| rng::sign(step.sign_key[slot], step.sign_counter[slot]))
}

/// The unbiased rank-one compression of `u ⊗ B + a ⊗ D` (KF-RTRL.md §3.2 and the exact zero-factor
/// branches of §8): updates `u` in place, turns `dst` (holding the true `B`) into the stored new
/// `A`, and returns its scale and `c = s·p2` (0 when the compression was exact). `nb2 = ‖B‖²`.
pub(super) fn compress<T: Float>(
    spec: &ModelSpec,
    u: &mut [T],
    mut dst: ArrayViewMut2<'_, T>,
    nb2: f64,
    step: &StepInputs<'_, T>,
    i: usize,
    sign: f64,
) -> (T, T) {
    let (n, r, k) = (spec.n, spec.r, spec.k);
    let d = step.d.row(i);
    let d = d.as_slice().expect("contiguous");
    let prev = step.prev.row(i);
    let h_prev = &prev.as_slice().expect("contiguous")[spec.h_offset()..];
    let token = step.inputs[i].token as usize;
    let nu2 = sum_squares(u);
    let nd2 = sum_squares(d);
    let na2 = 2.0 + sum_squares(h_prev);
    let nu = nu2.sqrt();
    let nbn = nb2.sqrt();
    let (nd, na) = (nd2.sqrt(), na2.sqrt());
    let old_term_zero = nu * nbn == 0.0;
    let add_a = |u: &mut [T], c: T| {
        u[token] = u[token] + c;
        for (uj, &hj) in u[spec.h_col()..spec.h_col() + n].iter_mut().zip(h_prev) {
            *uj = *uj + c * hj;
        }
        let bias = spec.bias_col();
        u[bias] = u[bias] + c;
    };
    let add_d = |dst: &mut ArrayViewMut2<'_, T>, c: T| {
        for blk in 0..k {
            for q in 0..r {
                for j in 0..n {
                    let dv = d[(blk * r + q) * n + j];
                    if dv != T::zero() {
                        let e = &mut dst[[blk * n + j, q * n + j]];
                        *e = *e + c * dv;
                    }
                }
            }
        }
    };
    if old_term_zero && nd == 0.0 {
        u.fill(T::zero());
        dst.fill(T::zero());
        (T::one(), T::zero())
    } else if old_term_zero {
        // Exact: u = p2·a, A = D/p2.
        let p2 = nd.sqrt() / na.sqrt();
        u.fill(T::zero());
        add_a(u, T::from_f64_rounded(p2));
        dst.fill(T::zero());
        add_d(&mut dst, T::one());
        (T::from_f64_rounded(1.0 / p2), T::zero())
    } else if nd == 0.0 {
        // Exact: u = p1·u, A = B/p1.
        let p1 = nbn.sqrt() / nu.sqrt();
        let c = T::from_f64_rounded(p1);
        u.iter_mut().for_each(|x| *x = *x * c);
        (T::from_f64_rounded(1.0 / p1), T::zero())
    } else {
        // u = p1·u + s·p2·a, A = B/p1 + s·D/p2 = (1/p1)(B + s·(p1/p2)·D).
        let p1 = nbn.sqrt() / nu.sqrt();
        let p2 = nd.sqrt() / na.sqrt();
        let c = T::from_f64_rounded(p1);
        u.iter_mut().for_each(|x| *x = *x * c);
        add_a(u, T::from_f64_rounded(sign * p2));
        add_d(&mut dst, T::from_f64_rounded(sign * p1 / p2));
        (T::from_f64_rounded(1.0 / p1), T::from_f64_rounded(sign * p2))
    }
}
