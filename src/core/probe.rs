//! The tangent probe: the growth rate of the exact state Jacobians `H_t = ∂s_t/∂s_{t-1}` along a
//! stream's trajectory (a finite-time top Lyapunov exponent). Exact RTRL's influence obeys
//! `G_t = H_t G_{t-1} + F_t`, so when this rate stays above zero the true influence grows
//! geometrically and any unbiased estimate of it must grow too; when it stays below zero, a
//! growing estimate is the estimator's own noise. Diagnostics only: it runs in f64 beside the
//! step and never touches the learner.

use super::float::Float;
use super::model::{ModelSpec, Params};
use super::rng::{CounterRng, derive_key};

/// One stream's probe: a unit tangent vector carried through `H_t`, and the log growth summed
/// since it was last read.
#[derive(Debug, Clone)]
pub struct TangentProbe {
    v: Vec<f64>,
    z: Vec<f64>,
    next: Vec<f64>,
    d: Vec<f64>,
    carry: Vec<f64>,
    prev: Vec<f64>,
    wv: Vec<f64>,
    hv: Vec<f64>,
    log_growth: f64,
    steps: u64,
}

impl TangentProbe {
    /// A probe with a random unit tangent drawn from `seed`.
    pub fn new(spec: &ModelSpec, seed: u64) -> Self {
        let (n, k, r) = (spec.n, spec.k, spec.r);
        let mut rng = CounterRng::new(derive_key(seed, 0x0050_524F_4245)); // "PROBE"
        let mut v: Vec<f64> = (0..k * n).map(|_| rng.normal()).collect();
        let norm = v.iter().map(|x| x * x).sum::<f64>().sqrt();
        v.iter_mut().for_each(|x| *x /= norm);
        Self {
            v,
            z: vec![0.0; r * n],
            next: vec![0.0; k * n],
            d: vec![0.0; k * r * n],
            carry: vec![0.0; k * k * n],
            prev: vec![0.0; k * n],
            wv: vec![0.0; r * n],
            hv: vec![0.0; k * n],
            log_growth: 0.0,
            steps: 0,
        }
    }

    /// The carried tangent (unit norm between steps).
    pub fn tangent(&self) -> &[f64] {
        &self.v
    }

    /// Replaces the tangent by `H_t v / ‖H_t v‖` for the step that reads `token` from state
    /// `prev` under `params`, and returns `ln ‖H_t v‖`.
    pub fn step<T: Float>(&mut self, spec: &ModelSpec, params: &Params<T>, token: u32, prev: &[T]) -> f64 {
        let (n, k, r) = (spec.n, spec.k, spec.r);
        let w = |i: usize, j: usize| params.w[[i, j]].to_f64_lossless();
        for (p, x) in self.prev.iter_mut().zip(prev) {
            *p = x.to_f64_lossless();
        }
        let h = &self.prev[spec.h_offset()..spec.h_offset() + n];
        let v_h = &self.v[spec.h_offset()..spec.h_offset() + n];
        for i in 0..r * n {
            let (mut zi, mut wvi) = (w(i, token as usize) + w(i, spec.bias_col()), 0.0);
            for j in 0..n {
                let wij = w(i, spec.h_col() + j);
                zi += wij * h[j];
                wvi += wij * v_h[j];
            }
            self.z[i] = zi;
            self.wv[i] = wvi;
        }
        spec.cell().forward(n, &self.z, &self.prev, &mut self.next, &mut self.d, &mut self.carry);
        // (H v)[bi, j] = Σ_bj carry[bi, bj, j] v[bj, j] + Σ_q d[bi, q, j] (W^q_h v_h)[j]
        let out = &mut self.hv;
        for bi in 0..k {
            for j in 0..n {
                let mut x = 0.0;
                for bj in 0..k {
                    x += self.carry[(bi * k + bj) * n + j] * self.v[bj * n + j];
                }
                for q in 0..r {
                    x += self.d[(bi * r + q) * n + j] * self.wv[q * n + j];
                }
                out[bi * n + j] = x;
            }
        }
        let norm = out.iter().map(|x| x * x).sum::<f64>().sqrt();
        let growth = norm.ln();
        if norm > 0.0 && norm.is_finite() {
            self.v.iter_mut().zip(out.iter()).for_each(|(v, o)| *v = o / norm);
        }
        self.log_growth += growth;
        self.steps += 1;
        growth
    }

    /// The mean log growth per step since the last call (`None` before any step), and restarts
    /// the sum.
    pub fn take_rate(&mut self) -> Option<f64> {
        let rate = (self.steps > 0).then(|| self.log_growth / self.steps as f64);
        self.log_growth = 0.0;
        self.steps = 0;
        rate
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::{CellKind, ModelConfig};

    /// `H_t v` against central differences of the whole step (affine map and cell) in `v`'s
    /// direction, for every cell, from a state off zero.
    #[test]
    fn the_probe_applies_the_exact_state_jacobian() {
        for cell in CellKind::ALL {
            let spec =
                ModelConfig { cell, hidden: 6, vocab_size: 4, init_std: 0.6, ..ModelConfig::default() }
                    .check()
                    .unwrap();
            let params = Params::<f64>::init(&spec);
            let mut rng = CounterRng::new(7);
            let prev: Vec<f64> = (0..spec.state_len()).map(|_| 0.5 * rng.normal()).collect();
            let mut probe = TangentProbe::new(&spec, 3);
            let v = probe.tangent().to_vec();
            let growth = probe.step(&spec, &params, 2, &prev);
            let hv: Vec<f64> = probe.tangent().iter().map(|x| x * growth.exp()).collect();

            let eps = 1e-6;
            let moved = |sign: f64| {
                let s: Vec<f64> = prev.iter().zip(&v).map(|(p, d)| p + sign * eps * d).collect();
                let mut other = TangentProbe::new(&spec, 3);
                other.step(&spec, &params, 2, &s);
                other.next.clone()
            };
            let (plus, minus) = (moved(1.0), moved(-1.0));
            for i in 0..spec.state_len() {
                let fd = (plus[i] - minus[i]) / (2.0 * eps);
                assert!((hv[i] - fd).abs() < 1e-8 * (1.0 + fd.abs()), "{cell} [{i}]: {} vs {fd}", hv[i]);
            }
            assert!(hv.iter().any(|x| x.abs() > 1e-3), "{cell}: a trivial Jacobian tests nothing");
        }
    }

    /// A linear tanh cell near zero has `H = W_h`: with `W_h = c·I` the rate is `ln c`, above
    /// zero for `c > 1`, and `take_rate` restarts its sum.
    #[test]
    fn the_rate_is_the_log_of_a_scaled_identity() {
        let spec = ModelConfig { cell: CellKind::Tanh, hidden: 5, vocab_size: 3, ..ModelConfig::default() }
            .check()
            .unwrap();
        for c in [0.5, 1.5] {
            let mut params = Params::<f64>::zeros(&spec);
            for j in 0..spec.n {
                params.w[[j, spec.h_col() + j]] = c;
            }
            let mut probe = TangentProbe::new(&spec, 11);
            assert_eq!(probe.take_rate(), None);
            for _ in 0..4 {
                probe.step(&spec, &params, 1, &vec![0.0; spec.n]);
            }
            assert!((probe.take_rate().unwrap() - f64::ln(c)).abs() < 1e-12, "c = {c}");
            assert_eq!(probe.take_rate(), None);
        }
    }
}
