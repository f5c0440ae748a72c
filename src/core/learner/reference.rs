//! Dense single-stream formulas, written for clarity rather than speed: the explicit `a_t`, `D_t`
//! (`k·n × r·n`) and `H_t` (`k·n × k·n`) of one step, and the KF-RTRL compression on dense
//! matrices. The oracle tests use them to check the batched learners, never the other way round.

use ndarray::{Array1, Array2};

use super::dense_input;
use crate::core::float::Float;
use crate::core::linalg::jacobian;
use crate::core::model::{ModelSpec, Params};

/// Everything one step of one stream defines.
#[derive(Debug, Clone)]
pub struct StepTerms<T> {
    /// `a_t = [onehot(x_t); h_{t-1}; 1]`.
    pub a: Array1<T>,
    /// `D_t`, dense, `k·n × r·n`.
    pub d: Array2<T>,
    /// `H_t = ∂s_t/∂s_{t-1}`, dense.
    pub h: Array2<T>,
    /// The next state.
    pub next: Array1<T>,
}

/// Runs the cell once from `prev` on `token`, with dense derivatives.
pub fn step_terms<T: Float>(spec: &ModelSpec, params: &Params<T>, prev: &[T], token: u32) -> StepTerms<T> {
    let (n, r, k, m, s_len) = (spec.n, spec.r, spec.k, spec.m, spec.state_len());
    let mut a = Array1::zeros(m);
    dense_input(spec, token, &prev[spec.h_offset()..], a.as_slice_mut().expect("contiguous"));
    let z = params.w.dot(&a);
    let mut next = Array1::zeros(s_len);
    let mut dv = vec![T::zero(); k * r * n];
    let mut carry = vec![T::zero(); k * k * n];
    spec.cell().forward(
        n,
        z.as_slice().expect("contiguous"),
        prev,
        next.as_slice_mut().expect("c"),
        &mut dv,
        &mut carry,
    );
    let mut d = Array2::zeros((s_len, r * n));
    for blk in 0..k {
        for q in 0..r {
            for j in 0..n {
                d[[blk * n + j, q * n + j]] = dv[(blk * r + q) * n + j];
            }
        }
    }
    let mut h = Array2::zeros((s_len, s_len));
    jacobian(spec, params.w_h(spec), &dv, &carry, h.view_mut());
    StepTerms { a, d, h, next }
}

/// The KF-RTRL compression of `u ⊗ B + a ⊗ D` with sign `s` and the ratio `ρ = p1/p2` multiplied
/// by `rho_factor` (1 is the paper's optimum; tests move it to show the optimum is one).
/// The zero-factor branches are exact (KF-RTRL.md §8).
pub fn kf_compress<T: Float>(
    u: &Array1<T>,
    b: &Array2<T>,
    d: &Array2<T>,
    a: &Array1<T>,
    sign: f64,
    rho_factor: f64,
) -> (Array1<T>, Array2<T>) {
    let f = |x: f64| T::from_f64_rounded(x);
    let norm = |it: &mut dyn Iterator<Item = T>| it.map(|x| x.to_f64_lossless().powi(2)).sum::<f64>().sqrt();
    let (nu, nb, nd, na) = (
        norm(&mut u.iter().copied()),
        norm(&mut b.iter().copied()),
        norm(&mut d.iter().copied()),
        norm(&mut a.iter().copied()),
    );
    if nu * nb == 0.0 && nd == 0.0 {
        return (Array1::zeros(u.len()), Array2::zeros(b.dim()));
    }
    if nu * nb == 0.0 {
        let p2 = nd.sqrt() / na.sqrt();
        return (a.mapv(|x| x * f(p2)), d.mapv(|x| x / f(p2)));
    }
    if nd == 0.0 {
        let p1 = nb.sqrt() / nu.sqrt();
        return (u.mapv(|x| x * f(p1)), b.mapv(|x| x / f(p1)));
    }
    let p1 = nb.sqrt() / nu.sqrt() * rho_factor.sqrt();
    let p2 = nd.sqrt() / na.sqrt() / rho_factor.sqrt();
    let un = u.mapv(|x| x * f(p1)) + &a.mapv(|x| x * f(sign * p2));
    let an = b.mapv(|x| x / f(p1)) + &d.mapv(|x| x * f(sign / p2));
    (un, an)
}

/// One dense KF-RTRL step of one stream: returns the next state and `(u_t, A_t)`.
pub fn kf_step<T: Float>(
    spec: &ModelSpec,
    params: &Params<T>,
    prev: &[T],
    u: &Array1<T>,
    a_mat: &Array2<T>,
    token: u32,
    sign: f64,
) -> (Array1<T>, Array1<T>, Array2<T>) {
    let t = step_terms(spec, params, prev, token);
    let b = t.h.dot(a_mat);
    let (u2, a2) = kf_compress(u, &b, &t.d, &t.a, sign, 1.0);
    (t.next, u2, a2)
}

/// Flattens `u ⊗ A` to the layout of the exact influence (`s × P`, `P` ordered like `W`):
/// `G[i, (q·n + j)·m + col] = A[i, q·n + j] · u[col]`.
pub fn kron_influence<T: Float>(u: &Array1<T>, a_mat: &Array2<T>) -> Array2<T> {
    let (s_len, rn) = a_mat.dim();
    let m = u.len();
    let mut g = Array2::zeros((s_len, rn * m));
    for i in 0..s_len {
        for c in 0..rn {
            let av = a_mat[[i, c]];
            for col in 0..m {
                g[[i, c * m + col]] = av * u[col];
            }
        }
    }
    g
}
