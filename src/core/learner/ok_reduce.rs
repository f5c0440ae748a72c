//! The optimal unbiased reduction of a sum of `k = R + 1` Kronecker terms `Σ_i v_i ⊗ M_i` to `R`
//! terms (OK.md §2.3-§2.4), computed from the two `k × k` Gram matrices alone, in f64.
//!
//! The terms themselves never enter: the result is a set of coefficients, each new factor being a
//! linear combination of the old ones (`ũ_l = Σ_i α_li v_i`, `Ã_l = Σ_i β_li M_i`), so the caller
//! rebuilds with one pass over its own storage. The steps:
//! 1. `K_v = E_v Λ_v E_vᵀ`, `K_M = E_M Λ_M E_Mᵀ` (cyclic Jacobi; eigenvalues below a relative
//!    threshold are treated as zero, so a rank-deficient sum is handled);
//! 2. the core `C = Λ_v^½ E_vᵀ E_M Λ_M^½` and its SVD `C = U Σ Wᵀ` (one-sided Jacobi), so that
//!    the sum is `Σ_j σ_j p_j ⊗ P_j` with `p_j = V E_v Λ_v^-½ U e_j`, `P_j = M E_M Λ_M^-½ W e_j`;
//! 3. the mixed set `S`: the `q` smallest `σ`, those with `t·σ_(t) ≤ Σ_{i≤t} σ_(i)` (ascending);
//!    `c = Σ_S σ / (q − 1)`, `d_j = σ_j / c ≤ 1`;
//! 4. the drop-one sampler: one `j* ∈ S` is dropped with probability `1 − d_j`; the other
//!    members of `S` survive as `√c p_j ⊗ √c P_j`, the larger terms stay as `√σ_j p_j ⊗ √σ_j P_j`.
//!
//! Output `R` is the dropped term itself (`√σ_j* p_j* ⊗ √σ_j* P_j*`), which the next step does
//! not carry; with the gradient weights (1 for kept terms and the dropped one, `d_j` for the
//! survivors) the `R + 1` outputs sum to the sum before the reduction exactly, which is how the
//! current step's gradient avoids the current step's noise.

/// How the reduction picks the term it drops.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Choice {
    /// A uniform draw in `[0, 1)`.
    Uniform(f64),
    /// The `j`-th member of `S` in ascending order of `σ` (tests that enumerate outcomes); an
    /// index past `q` is taken modulo `q`.
    Forced(usize),
}

/// Scratch and result of one reduction of `k` terms.
#[derive(Debug, Clone)]
pub struct Reduction {
    k: usize,
    ev: Vec<f64>,
    em: Vec<f64>,
    lv: Vec<f64>,
    lm: Vec<f64>,
    core: Vec<f64>,
    right: Vec<f64>,
    sigma: Vec<f64>,
    order: Vec<usize>,
    /// `α`, `(k) × k` row-major: output `l` is `Σ_i alpha[l·k + i] v_i`.
    pub alpha: Vec<f64>,
    /// `β`, as `alpha` for the matrices.
    pub beta: Vec<f64>,
    /// The gradient weight of each output (the last output is the dropped term).
    pub grad_weight: Vec<f64>,
    /// Probability of dropping each member of `S` in ascending order of `σ`; zeros past `q`.
    pub drop_probability: Vec<f64>,
    /// The index into `S` (ascending) that was dropped.
    pub dropped: usize,
    /// `q = |S|`, the number of terms merged.
    pub mixed: usize,
}

/// Sweeps of the Jacobi iterations: far more than the 6-10 that reach full f64 accuracy at
/// `k ≤ 33`; a non-finite input stops there instead of looping.
const MAX_SWEEPS: usize = 60;

impl Reduction {
    /// Scratch for sums of `k ≥ 2` terms.
    pub fn new(k: usize) -> Self {
        assert!(k >= 2, "a reduction needs at least two terms");
        Self {
            k,
            ev: vec![0.0; k * k],
            em: vec![0.0; k * k],
            lv: vec![0.0; k],
            lm: vec![0.0; k],
            core: vec![0.0; k * k],
            right: vec![0.0; k * k],
            sigma: vec![0.0; k],
            order: (0..k).collect(),
            alpha: vec![0.0; k * k],
            beta: vec![0.0; k * k],
            grad_weight: vec![0.0; k],
            drop_probability: vec![0.0; k],
            dropped: 0,
            mixed: 0,
        }
    }

    /// Number of terms `k`.
    pub fn terms(&self) -> usize {
        self.k
    }

    /// The singular values of the sum, in the order of the outputs before the reduction
    /// (diagnostics and tests).
    pub fn singular_values(&self) -> &[f64] {
        &self.sigma
    }

    /// Reduces the sum whose Gram matrices (row-major `k × k`, symmetric) are `kv` (vectors) and
    /// `km` (matrices). Allocates nothing.
    pub fn reduce(&mut self, kv: &[f64], km: &[f64], choice: Choice) {
        let k = self.k;
        assert!(kv.len() == k * k && km.len() == k * k, "Gram matrices must be k × k");
        // Λ^½ with pseudo-inverse for the vectors' and the matrices' Gram.
        self.ev.copy_from_slice(kv);
        symmetric_eigen(&mut self.ev, &mut self.lv, k);
        self.em.copy_from_slice(km);
        symmetric_eigen(&mut self.em, &mut self.lm, k);
        clamp_spectrum(&mut self.lv);
        clamp_spectrum(&mut self.lm);
        // C[a][b] = √λv_a (E_vᵀ E_M)[a][b] √λm_b.
        for a in 0..k {
            for b in 0..k {
                let mut dot = 0.0;
                for i in 0..k {
                    dot += self.ev[i * k + a] * self.em[i * k + b];
                }
                self.core[a * k + b] = self.lv[a].sqrt() * dot * self.lm[b].sqrt();
            }
        }
        // One-sided Jacobi on C's columns: C W = U Σ, W accumulated in `right`.
        one_sided_jacobi(&mut self.core, &mut self.right, &mut self.sigma, k);
        // Ascending order of σ (ties by index, so the outcome never depends on the sort).
        for (j, o) in self.order.iter_mut().enumerate() {
            *o = j;
        }
        let sigma = &self.sigma;
        self.order.sort_by(|&a, &b| sigma[a].total_cmp(&sigma[b]).then(a.cmp(&b)));
        // The mixed set S: the longest ascending prefix with t·σ_(t) ≤ Σ_{i≤t} σ_(i).
        let mut q = 0;
        let mut cumulative = 0.0;
        for (t, &j) in self.order.iter().enumerate() {
            cumulative += sigma[j];
            if t as f64 * sigma[j] <= cumulative {
                q = t + 1;
            } else {
                break;
            }
        }
        let q = q.max(2);
        self.mixed = q;
        let mixed_sum: f64 = self.order[..q].iter().map(|&j| sigma[j]).sum();
        let c = mixed_sum / (q - 1) as f64;
        self.drop_probability.fill(0.0);
        if c > 0.0 {
            for (t, &j) in self.order[..q].iter().enumerate() {
                self.drop_probability[t] = (1.0 - sigma[j] / c).clamp(0.0, 1.0);
            }
        } else {
            // Every merged term is zero: nothing is random, the first is "dropped".
            self.drop_probability[0] = 1.0;
        }
        self.dropped = match choice {
            Choice::Forced(t) => t % q,
            Choice::Uniform(x) => {
                let total: f64 = self.drop_probability[..q].iter().sum();
                let target = x * total;
                let mut acc = 0.0;
                let mut pick = q - 1;
                for t in 0..q {
                    acc += self.drop_probability[t];
                    if target < acc {
                        pick = t;
                        break;
                    }
                }
                // A member that can never be dropped is never picked, rounding aside.
                while self.drop_probability[pick] == 0.0 && pick > 0 {
                    pick -= 1;
                }
                pick
            }
        };
        // Outputs: the survivors of S, the kept terms, then the dropped term.
        self.alpha.fill(0.0);
        self.beta.fill(0.0);
        let mut out = 0;
        for t in 0..k {
            let j = self.order[t];
            let sigma = &self.sigma;
            let (scale, weight, slot) = if t < q {
                if t == self.dropped {
                    (sigma[j].sqrt(), 1.0, k - 1)
                } else {
                    let weight = if c > 0.0 { sigma[j] / c } else { 0.0 };
                    let slot = out;
                    out += 1;
                    (c.sqrt(), weight, slot)
                }
            } else {
                let slot = out;
                out += 1;
                (sigma[j].sqrt(), 1.0, slot)
            };
            self.grad_weight[slot] = weight;
            self.write_coefficients(slot, j, scale);
        }
        debug_assert_eq!(out, k - 1);
    }

    /// `α_slot = scale · E_v Λ_v^-½ U e_j` and `β_slot = scale · E_M Λ_M^-½ W e_j`, with
    /// `U e_j = C W e_j / σ_j` (a zero `σ_j` gives zero coefficients: the term is zero).
    fn write_coefficients(&mut self, slot: usize, j: usize, scale: f64) {
        let k = self.k;
        let sigma = self.sigma[j];
        if sigma <= 0.0 || scale == 0.0 {
            return;
        }
        for i in 0..k {
            let mut a = 0.0;
            let mut b = 0.0;
            for e in 0..k {
                if self.lv[e] > 0.0 {
                    // The column j of C W is stored in `core` (one-sided Jacobi works in place).
                    a += self.ev[i * k + e] / self.lv[e].sqrt() * (self.core[e * k + j] / sigma);
                }
                if self.lm[e] > 0.0 {
                    b += self.em[i * k + e] / self.lm[e].sqrt() * self.right[e * k + j];
                }
            }
            self.alpha[slot * k + i] = scale * a;
            self.beta[slot * k + i] = scale * b;
        }
    }
}

/// `x > y`, false when either is NaN: a NaN input must end the iterations, not feed them.
fn above(x: f64, y: f64) -> bool {
    x.partial_cmp(&y) == Some(std::cmp::Ordering::Greater)
}

/// Sets eigenvalues that are negative or below `k²·ε·λ_max` to zero: the directions a Gram matrix
/// computed in floating point cannot resolve, whose `λ^-½` would only amplify rounding.
fn clamp_spectrum(lambda: &mut [f64]) {
    let max = lambda.iter().copied().fold(0.0f64, f64::max);
    let tol = (lambda.len() * lambda.len()) as f64 * f64::EPSILON * max;
    for l in lambda.iter_mut() {
        if !above(*l, tol) {
            *l = 0.0;
        }
    }
}

/// Cyclic Jacobi: on return `a` (row-major `k × k`) holds the eigenvectors as columns and
/// `lambda` the eigenvalues of the symmetric input.
fn symmetric_eigen(a: &mut [f64], lambda: &mut [f64], k: usize) {
    // Fixed stack buffers: the reduction must not allocate per step.
    let mut work = [0.0f64; 33 * 33];
    let mut vecs = [0.0f64; 33 * 33];
    assert!(k <= 33, "at most 33 terms");
    work[..k * k].copy_from_slice(a);
    vecs[..k * k].fill(0.0);
    for i in 0..k {
        vecs[i * k + i] = 1.0;
    }
    for _ in 0..MAX_SWEEPS {
        let mut off = 0.0;
        let mut diag = 0.0;
        for p in 0..k {
            diag += work[p * k + p] * work[p * k + p];
            for q in p + 1..k {
                off += work[p * k + q] * work[p * k + q];
            }
        }
        if !above(off, 1e-30 * diag) {
            break;
        }
        for p in 0..k {
            for q in p + 1..k {
                let apq = work[p * k + q];
                if apq == 0.0 {
                    continue;
                }
                let (app, aqq) = (work[p * k + p], work[q * k + q]);
                let theta = (aqq - app) / (2.0 * apq);
                let t = theta.signum() / (theta.abs() + (theta * theta + 1.0).sqrt());
                let t = if theta == 0.0 { 1.0 } else { t };
                let c = 1.0 / (t * t + 1.0).sqrt();
                let s = t * c;
                for r in 0..k {
                    let (arp, arq) = (work[r * k + p], work[r * k + q]);
                    work[r * k + p] = c * arp - s * arq;
                    work[r * k + q] = s * arp + c * arq;
                }
                for r in 0..k {
                    let (apr, aqr) = (work[p * k + r], work[q * k + r]);
                    work[p * k + r] = c * apr - s * aqr;
                    work[q * k + r] = s * apr + c * aqr;
                }
                for r in 0..k {
                    let (vrp, vrq) = (vecs[r * k + p], vecs[r * k + q]);
                    vecs[r * k + p] = c * vrp - s * vrq;
                    vecs[r * k + q] = s * vrp + c * vrq;
                }
            }
        }
    }
    for i in 0..k {
        lambda[i] = work[i * k + i];
    }
    a.copy_from_slice(&vecs[..k * k]);
}

/// One-sided Jacobi SVD of the row-major `k × k` matrix `c`: on return its columns are
/// `U_j σ_j`, `w` holds `W` (so that `C_in W = U Σ`) and `sigma` the column norms.
fn one_sided_jacobi(c: &mut [f64], w: &mut [f64], sigma: &mut [f64], k: usize) {
    w.fill(0.0);
    for i in 0..k {
        w[i * k + i] = 1.0;
    }
    for _ in 0..MAX_SWEEPS {
        let mut rotated = false;
        for p in 0..k {
            for q in p + 1..k {
                let (mut alpha, mut beta, mut gamma) = (0.0, 0.0, 0.0);
                for r in 0..k {
                    let (x, y) = (c[r * k + p], c[r * k + q]);
                    alpha += x * x;
                    beta += y * y;
                    gamma += x * y;
                }
                if gamma == 0.0 || !above(gamma.abs(), 1e-15 * (alpha * beta).sqrt()) {
                    continue;
                }
                rotated = true;
                let zeta = (beta - alpha) / (2.0 * gamma);
                let t = zeta.signum() / (zeta.abs() + (1.0 + zeta * zeta).sqrt());
                let t = if zeta == 0.0 { 1.0 } else { t };
                let cs = 1.0 / (1.0 + t * t).sqrt();
                let sn = cs * t;
                for r in 0..k {
                    let (x, y) = (c[r * k + p], c[r * k + q]);
                    c[r * k + p] = cs * x - sn * y;
                    c[r * k + q] = sn * x + cs * y;
                    let (x, y) = (w[r * k + p], w[r * k + q]);
                    w[r * k + p] = cs * x - sn * y;
                    w[r * k + q] = sn * x + cs * y;
                }
            }
        }
        if !rotated {
            break;
        }
    }
    for j in 0..k {
        sigma[j] = (0..k).map(|r| c[r * k + j] * c[r * k + j]).sum::<f64>().sqrt();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::rng::CounterRng;

    fn gram(x: &[Vec<f64>]) -> Vec<f64> {
        let k = x.len();
        let mut g = vec![0.0; k * k];
        for i in 0..k {
            for j in 0..k {
                g[i * k + j] = x[i].iter().zip(&x[j]).map(|(a, b)| a * b).sum();
            }
        }
        g
    }

    fn random(rng: &mut CounterRng, k: usize, len: usize) -> Vec<Vec<f64>> {
        (0..k).map(|_| (0..len).map(|_| rng.normal()).collect()).collect()
    }

    /// `Σ_i v_i ⊗ M_i` (flattened outer products) of coefficient rows applied to the terms.
    fn sum_of(v: &[Vec<f64>], m: &[Vec<f64>], alpha: &[f64], beta: &[f64], weights: &[f64]) -> Vec<f64> {
        let k = v.len();
        let (lv, lm) = (v[0].len(), m[0].len());
        let mut out = vec![0.0; lv * lm];
        for (l, &w) in weights.iter().enumerate() {
            let u: Vec<f64> = (0..lv).map(|x| (0..k).map(|i| alpha[l * k + i] * v[i][x]).sum()).collect();
            let a: Vec<f64> = (0..lm).map(|x| (0..k).map(|i| beta[l * k + i] * m[i][x]).sum()).collect();
            for x in 0..lv {
                for y in 0..lm {
                    out[x * lm + y] += w * u[x] * a[y];
                }
            }
        }
        out
    }

    #[test]
    fn eigen_and_svd_reconstruct_their_inputs() {
        let mut rng = CounterRng::new(3);
        let k = 5;
        let x = random(&mut rng, k, 9);
        let g = gram(&x);
        let mut e = g.clone();
        let mut l = vec![0.0; k];
        symmetric_eigen(&mut e, &mut l, k);
        for i in 0..k {
            for j in 0..k {
                let back: f64 = (0..k).map(|a| e[i * k + a] * l[a] * e[j * k + a]).sum();
                assert!((back - g[i * k + j]).abs() < 1e-12 * g[0], "{i} {j}");
            }
        }
        let c0: Vec<f64> = (0..k * k).map(|_| rng.normal()).collect();
        let (mut c, mut w, mut s) = (c0.clone(), vec![0.0; k * k], vec![0.0; k]);
        one_sided_jacobi(&mut c, &mut w, &mut s, k);
        // C0 W = (columns of c), and W is orthogonal.
        for i in 0..k {
            for j in 0..k {
                let cw: f64 = (0..k).map(|a| c0[i * k + a] * w[a * k + j]).sum();
                assert!((cw - c[i * k + j]).abs() < 1e-12, "{i} {j}");
                let wtw: f64 = (0..k).map(|a| w[a * k + i] * w[a * k + j]).sum();
                assert!((wtw - f64::from(i == j)).abs() < 1e-12);
            }
        }
    }

    /// T-OK1 on the bare reduction: the mean over the `q` outcomes, weighted by their
    /// probabilities, is the sum before the reduction; the variance is the closed form; every
    /// outcome with its gradient weights is the sum exactly.
    #[test]
    fn outcomes_average_to_the_sum_with_the_closed_form_variance() {
        let mut rng = CounterRng::new(11);
        for case in 0..6 {
            let k = 2 + case % 4;
            let v = random(&mut rng, k, 7);
            let m = random(&mut rng, k, 6);
            let target = sum_of(&v, &m, &identity(k), &identity(k), &vec![1.0; k]);
            let mut red = Reduction::new(k);
            red.reduce(&gram(&v), &gram(&m), Choice::Forced(0));
            let sigma = red.singular_values().to_vec();
            let mut sorted = sigma.clone();
            sorted.sort_by(f64::total_cmp);
            let q = red.mixed;
            let mixed: f64 = sorted[..q].iter().sum();
            let closed = mixed * mixed / (q as f64 - 1.0) - sorted[..q].iter().map(|s| s * s).sum::<f64>();
            let mut mean = vec![0.0; target.len()];
            let mut second = 0.0;
            let mut total_p = 0.0;
            for t in 0..q {
                red.reduce(&gram(&v), &gram(&m), Choice::Forced(t));
                let p = red.drop_probability[t];
                total_p += p;
                let mut carried = vec![1.0; k];
                carried[k - 1] = 0.0;
                let x = sum_of(&v, &m, &red.alpha, &red.beta, &carried);
                let exact = sum_of(&v, &m, &red.alpha, &red.beta, &red.grad_weight);
                let scale = target.iter().map(|t| t * t).sum::<f64>().sqrt();
                let err: f64 = exact.iter().zip(&target).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);
                assert!(err < 1e-12 * scale, "case {case} outcome {t}: weighted outputs off by {err}");
                for (mu, xi) in mean.iter_mut().zip(&x) {
                    *mu += p * xi;
                }
                second += p * x.iter().zip(&target).map(|(a, b)| (a - b) * (a - b)).sum::<f64>();
            }
            assert!((total_p - 1.0).abs() < 1e-12);
            let scale = target.iter().map(|t| t * t).sum::<f64>().sqrt();
            let bias: f64 = mean.iter().zip(&target).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);
            assert!(bias < 1e-12 * scale, "case {case}: bias {bias}");
            assert!(
                (second - closed).abs() < 1e-9 * closed.max(1e-300) + 1e-12 * scale * scale,
                "{second} {closed}"
            );
        }
    }

    fn identity(k: usize) -> Vec<f64> {
        let mut id = vec![0.0; k * k];
        for i in 0..k {
            id[i * k + i] = 1.0;
        }
        id
    }

    /// Two of three terms are multiples of each other: the rank is 2, so reducing to two terms
    /// is exact whatever is drawn.
    #[test]
    fn a_sum_of_lower_rank_is_reduced_exactly() {
        let mut rng = CounterRng::new(5);
        let mut v = random(&mut rng, 3, 6);
        let mut m = random(&mut rng, 3, 5);
        v[2] = v[0].iter().map(|x| 2.0 * x).collect();
        m[2] = m[0].iter().map(|x| -0.5 * x).collect();
        let target = sum_of(&v, &m, &identity(3), &identity(3), &[1.0; 3]);
        let mut red = Reduction::new(3);
        for t in 0..3 {
            red.reduce(&gram(&v), &gram(&m), Choice::Forced(t));
            let x = sum_of(&v, &m, &red.alpha, &red.beta, &[1.0, 1.0, 0.0]);
            let err: f64 = x.iter().zip(&target).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);
            assert!(err < 1e-10, "{err}");
        }
    }

    #[test]
    fn uniform_draws_follow_the_drop_probabilities() {
        let mut rng = CounterRng::new(9);
        let v = random(&mut rng, 4, 5);
        let m = random(&mut rng, 4, 5);
        let mut red = Reduction::new(4);
        red.reduce(&gram(&v), &gram(&m), Choice::Forced(0));
        let probs = red.drop_probability.clone();
        let mut counts = [0usize; 4];
        let draws = 20_000;
        for i in 0..draws {
            red.reduce(&gram(&v), &gram(&m), Choice::Uniform((i as f64 + 0.5) / draws as f64));
            counts[red.dropped] += 1;
        }
        for t in 0..4 {
            let freq = counts[t] as f64 / draws as f64;
            assert!((freq - probs[t]).abs() < 1e-3, "{t}: {freq} vs {}", probs[t]);
        }
    }
}
