//! Recurrent cells of the KF-RTRL class (KF-RTRL.md §1): every pre-activation is one affine map
//! `z^q = W^q a_t` of the shared vector `a_t = [x_t; h_{t-1}; 1]`, and the state update is
//! element-wise in the pre-activations.
//!
//! A cell's state has `k` blocks of `n` units (tanh and RHN: `[h]`; LSTM: `[c; h]`); the last block
//! is `h`, the part that feeds `a_t` and the readout. Besides the next state, [`CellKind::forward`]
//! returns the element-wise derivatives that define the influence recursion:
//! - `d[(blk·r + q)·n + j] = ∂state[blk·n + j] / ∂z^q_j` (the diagonal blocks of `D_t`),
//! - `carry[(bi·k + bj)·n + j] = ∂state[bi·n + j] / ∂state_prev[bj·n + j]` holding the recurrent
//!   weights fixed (the element-wise part of `H_t`; the rest is `Σ_q diag(D^q) W^q_h`).

use serde::{Deserialize, Serialize};

use super::float::Float;

/// The recurrent cell of a model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CellKind {
    /// `h_t = tanh(W a_t)`.
    Tanh,
    /// One-layer Recurrent Highway Network with coupled gates (KF-RTRL.md §2.3):
    /// `c = 2σ(z_c) − 1`, `f = σ(z_f)`, `h_t = f⊙h_{t-1} + (1−f)⊙c`; gate order `[c, f]`.
    Rhn,
    /// LSTM with state `(c, h)` (KF-RTRL.md §2.2); gate order `[i, f, o, g]`.
    Lstm,
}

impl CellKind {
    /// All cells, for tests and reports.
    pub const ALL: [CellKind; 3] = [CellKind::Tanh, CellKind::Rhn, CellKind::Lstm];

    /// Number of weight matrices `r` (gates), each `n × m`.
    pub fn gates(self) -> usize {
        match self {
            CellKind::Tanh => 1,
            CellKind::Rhn => 2,
            CellKind::Lstm => 4,
        }
    }

    /// Number of `n`-unit blocks in the state (`k`); the last one is `h`.
    pub fn state_blocks(self) -> usize {
        match self {
            CellKind::Tanh | CellKind::Rhn => 1,
            CellKind::Lstm => 2,
        }
    }

    /// The wire name (`tanh`, `rhn`, `lstm`).
    pub fn name(self) -> &'static str {
        match self {
            CellKind::Tanh => "tanh",
            CellKind::Rhn => "rhn",
            CellKind::Lstm => "lstm",
        }
    }

    /// Parses a wire name.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "tanh" => Some(CellKind::Tanh),
            "rhn" => Some(CellKind::Rhn),
            "lstm" => Some(CellKind::Lstm),
            _ => None,
        }
    }

    /// Advances one state: `z` holds the `r·n` pre-activations, `prev` and `next` the `k·n` states;
    /// `d` (`k·r·n`) and `carry` (`k·k·n`) receive the derivatives described in the module docs.
    pub fn forward<T: Float>(
        self,
        n: usize,
        z: &[T],
        prev: &[T],
        next: &mut [T],
        d: &mut [T],
        carry: &mut [T],
    ) {
        let one = T::one();
        let two = one + one;
        match self {
            CellKind::Tanh => {
                for j in 0..n {
                    let h = z[j].tanh();
                    next[j] = h;
                    d[j] = one - h * h;
                    carry[j] = T::zero();
                }
            }
            CellKind::Rhn => {
                let (zc, zf) = z.split_at(n);
                let (dc, df) = d.split_at_mut(n);
                for j in 0..n {
                    // `1 − σ` by subtraction is 0 in f32 for z ≳ 17 and coarse from z ≈ 8: every
                    // complement is σ(−z), computed as precisely as σ(z).
                    let (sc, sc_neg) = sigmoid_pair(zc[j]);
                    let (f, f_neg) = sigmoid_pair(zf[j]);
                    let c = two * sc - one;
                    let hp = prev[j];
                    next[j] = f * hp + f_neg * c;
                    dc[j] = f_neg * two * sc * sc_neg;
                    df[j] = (hp - c) * f * f_neg;
                    carry[j] = f;
                }
            }
            CellKind::Lstm => {
                // d blocks: c-rows [i f o g] then h-rows [i f o g]; carry: [cc, ch, hc, hh].
                let (c_prev, _h_prev) = prev.split_at(n);
                let (c_next, h_next) = next.split_at_mut(n);
                let (d_c, d_h) = d.split_at_mut(4 * n);
                for j in 0..n {
                    // Derivatives use σ(−z) for `1 − σ(z)`, which subtraction loses at saturation.
                    let (i, i_neg) = sigmoid_pair(z[j]);
                    let (f, f_neg) = sigmoid_pair(z[n + j]);
                    let (o, o_neg) = sigmoid_pair(z[2 * n + j]);
                    let g = z[3 * n + j].tanh();
                    let c = f * c_prev[j] + i * g;
                    let tc = c.tanh();
                    let h = o * tc;
                    let kappa = o * (one - tc * tc);
                    c_next[j] = c;
                    h_next[j] = h;
                    let dci = g * i * i_neg;
                    let dcf = c_prev[j] * f * f_neg;
                    let dcg = i * (one - g * g);
                    d_c[j] = dci;
                    d_c[n + j] = dcf;
                    d_c[2 * n + j] = T::zero();
                    d_c[3 * n + j] = dcg;
                    d_h[j] = kappa * dci;
                    d_h[n + j] = kappa * dcf;
                    d_h[2 * n + j] = tc * o * o_neg;
                    d_h[3 * n + j] = kappa * dcg;
                    carry[j] = f; // ∂c/∂c_prev
                    carry[n + j] = T::zero(); // ∂c/∂h_prev (through W only)
                    carry[2 * n + j] = kappa * f; // ∂h/∂c_prev
                    carry[3 * n + j] = T::zero(); // ∂h/∂h_prev (through W only)
                }
            }
        }
    }

    /// Whether a step's output alone determines its derivatives (the tanh cell: `D = 1 − h²`, no
    /// carry); the gated cells' gates are not recoverable from their states.
    pub fn output_determines_derivatives(self) -> bool {
        matches!(self, CellKind::Tanh)
    }

    /// The derivatives [`CellKind::forward`] gives, from the step's output `next`, for a cell
    /// whose [`CellKind::output_determines_derivatives`].
    pub fn derivatives_from_next<T: Float>(self, next: &[T], d: &mut [T], carry: &mut [T]) {
        assert!(self.output_determines_derivatives(), "the {self} cell needs its step run again");
        for ((dv, cv), &h) in d.iter_mut().zip(carry.iter_mut()).zip(next) {
            *dv = T::one() - h * h;
            *cv = T::zero();
        }
    }
}

impl std::fmt::Display for CellKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The logistic function, in a form that neither overflows nor loses precision for large |x|.
#[inline]
pub fn sigmoid<T: Float>(x: T) -> T {
    let one = T::one();
    if x >= T::zero() {
        one / (one + (-x).exp())
    } else {
        let e = x.exp();
        e / (one + e)
    }
}

/// `(σ(x), σ(−x))` from one exponential, each to full relative precision: `σ(−x)` stands for
/// `1 − σ(x)`, which subtraction rounds to 0 once σ(x) rounds to 1.
#[inline]
pub fn sigmoid_pair<T: Float>(x: T) -> (T, T) {
    let one = T::one();
    let e = (-x.abs()).exp();
    let (big, small) = (one / (one + e), e / (one + e));
    if x >= T::zero() { (big, small) } else { (small, big) }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lcg(seed: &mut u64) -> f64 {
        *seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((*seed >> 11) as f64 / (1u64 << 53) as f64) * 2.0 - 1.0
    }

    /// The element-wise derivatives agree with central finite differences of `forward` itself.
    #[test]
    fn derivatives_match_finite_differences_for_every_cell() {
        let n = 3;
        for cell in CellKind::ALL {
            let (r, k) = (cell.gates(), cell.state_blocks());
            let mut seed = 11;
            let z: Vec<f64> = (0..r * n).map(|_| 1.5 * lcg(&mut seed)).collect();
            let prev: Vec<f64> = (0..k * n).map(|_| 0.8 * lcg(&mut seed)).collect();
            let mut next = vec![0.0; k * n];
            let mut d = vec![0.0; k * r * n];
            let mut carry = vec![0.0; k * k * n];
            cell.forward(n, &z, &prev, &mut next, &mut d, &mut carry);
            let eval = |z: &[f64], prev: &[f64]| {
                let mut s = vec![0.0; k * n];
                let mut dd = vec![0.0; k * r * n];
                let mut cc = vec![0.0; k * k * n];
                cell.forward(n, z, prev, &mut s, &mut dd, &mut cc);
                s
            };
            let h = 1e-6;
            for q in 0..r {
                for j in 0..n {
                    let mut zp = z.clone();
                    zp[q * n + j] += h;
                    let mut zm = z.clone();
                    zm[q * n + j] -= h;
                    let (sp, sm) = (eval(&zp, &prev), eval(&zm, &prev));
                    for blk in 0..k {
                        let fd = (sp[blk * n + j] - sm[blk * n + j]) / (2.0 * h);
                        let an = d[(blk * r + q) * n + j];
                        assert!((fd - an).abs() < 1e-8, "{cell} dz q{q} j{j} blk{blk}: {fd} vs {an}");
                        // Off-diagonal units do not depend on z^q_j.
                        for other in (0..n).filter(|&o| o != j) {
                            assert_eq!(sp[blk * n + other], sm[blk * n + other]);
                        }
                    }
                }
            }
            // Carry: derivative w.r.t. the previous state with z held fixed.
            for bj in 0..k {
                for j in 0..n {
                    let mut pp = prev.clone();
                    pp[bj * n + j] += h;
                    let mut pm = prev.clone();
                    pm[bj * n + j] -= h;
                    let (sp, sm) = (eval(&z, &pp), eval(&z, &pm));
                    for bi in 0..k {
                        let fd = (sp[bi * n + j] - sm[bi * n + j]) / (2.0 * h);
                        let an = carry[(bi * k + bj) * n + j];
                        assert!((fd - an).abs() < 1e-8, "{cell} carry {bi}{bj} j{j}: {fd} vs {an}");
                    }
                }
            }
        }
    }

    // One test per cell against the equations of KF-RTRL.md §2.1-§2.3 written out in f64 for a
    // hand-set example: the other oracles all call `forward`, so they cannot catch a wrong equation
    // that RTRL, BPTT and KF-RTRL would then share.

    fn run_cell(cell: CellKind, n: usize, z: &[f64], prev: &[f64]) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
        let (r, k) = (cell.gates(), cell.state_blocks());
        let (mut next, mut d, mut carry) =
            (vec![f64::NAN; k * n], vec![f64::NAN; k * r * n], vec![f64::NAN; k * k * n]);
        cell.forward(n, z, prev, &mut next, &mut d, &mut carry);
        (next, d, carry)
    }

    fn assert_close(got: &[f64], want: &[f64], what: &str) {
        assert_eq!(got.len(), want.len(), "{what}");
        for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
            assert!((g - w).abs() <= 1e-15 * w.abs().max(1.0), "{what}[{i}]: {g} vs {w}");
        }
    }

    fn logistic(z: f64) -> f64 {
        1.0 / (1.0 + (-z).exp())
    }

    /// σ'(z) = e^{−z} / (1 + e^{−z})², written apart from σ(1−σ).
    fn logistic_prime(z: f64) -> f64 {
        let e = (-z).exp();
        e / ((1.0 + e) * (1.0 + e))
    }

    /// §2.1: `h = tanh(z)`, `D = diag(1 − h²)`, no element-wise carry.
    #[test]
    fn tanh_cell_matches_its_equations() {
        let z = [0.3, -1.2];
        let (next, d, carry) = run_cell(CellKind::Tanh, 2, &z, &[0.9, -0.4]);
        let h = [0.3f64.tanh(), (-1.2f64).tanh()];
        assert_close(&next, &h, "h");
        assert_close(&d, &[1.0 - h[0] * h[0], 1.0 - h[1] * h[1]], "D");
        assert_close(&carry, &[0.0, 0.0], "carry");
    }

    /// §2.3: `c = 2σ(z_c) − 1`, `f = σ(z_f)`, `h = f⊙h_prev + (1−f)⊙c`,
    /// `D = [(1−f)⊙2σ'(z_c) | (h_prev − c)⊙σ'(z_f)]`, element-wise part of `H` = `f`.
    #[test]
    fn rhn_cell_matches_its_equations() {
        let (zc, zf, hp) = ([0.5, -2.0], [1.5, -0.25], [0.2, -0.7]);
        let z = [zc[0], zc[1], zf[0], zf[1]];
        let (next, d, carry) = run_cell(CellKind::Rhn, 2, &z, &hp);
        let mut h = [0.0; 2];
        let mut d_want = [0.0; 4];
        let mut carry_want = [0.0; 2];
        for j in 0..2 {
            let c = 2.0 * logistic(zc[j]) - 1.0;
            let f = logistic(zf[j]);
            h[j] = f * hp[j] + (1.0 - f) * c;
            d_want[j] = (1.0 - f) * 2.0 * logistic_prime(zc[j]);
            d_want[2 + j] = (hp[j] - c) * logistic_prime(zf[j]);
            carry_want[j] = f;
        }
        assert_close(&next, &h, "h");
        assert_close(&d, &d_want, "D");
        assert_close(&carry, &carry_want, "carry");
        // Spot check of the first unit by hand: σ(1.5) = 0.8175745, 2σ(0.5) − 1 = 0.2449187.
        assert!(
            (h[0] - (0.817_574_476_193_643_7 * 0.2 + 0.182_425_523_806_356_35 * 0.244_918_662_403_709_2))
                .abs()
                < 1e-15
        );
    }

    /// §2.2: gates `[i, f, o, g]`, `c = f⊙c_prev + i⊙g`, `h = o⊙tanh(c)`, `κ = o⊙(1 − tanh²c)`;
    /// `D` c-rows `[g⊙σ'(z_i) | c_prev⊙σ'(z_f) | 0 | i⊙(1−g²)]`, h-rows κ times those except
    /// `∂h/∂z_o = tanh(c)⊙σ'(z_o)`; element-wise `H`: `∂c/∂c_prev = f`, `∂h/∂c_prev = κ⊙f`, the
    /// `h_prev` columns 0 (they act through `W` only).
    #[test]
    fn lstm_cell_matches_its_equations() {
        let (zi, zf, zo, zg) = ([0.4, -1.1], [2.0, 0.1], [-0.3, 0.8], [0.9, -0.6]);
        let (c_prev, h_prev) = ([0.5, -1.3], [0.25, -0.1]);
        let z = [zi[0], zi[1], zf[0], zf[1], zo[0], zo[1], zg[0], zg[1]];
        let prev = [c_prev[0], c_prev[1], h_prev[0], h_prev[1]];
        let (next, d, carry) = run_cell(CellKind::Lstm, 2, &z, &prev);
        let (n, r) = (2, 4);
        let mut next_want = [0.0; 4];
        let mut d_want = [0.0; 16];
        let mut carry_want = [0.0; 8];
        for j in 0..n {
            let (i, f, o, g) = (logistic(zi[j]), logistic(zf[j]), logistic(zo[j]), zg[j].tanh());
            let c = f * c_prev[j] + i * g;
            let kappa = o * (1.0 - c.tanh() * c.tanh());
            next_want[j] = c;
            next_want[n + j] = o * c.tanh();
            let dc = [g * logistic_prime(zi[j]), c_prev[j] * logistic_prime(zf[j]), 0.0, i * (1.0 - g * g)];
            for q in 0..r {
                d_want[q * n + j] = dc[q];
                d_want[(r + q) * n + j] =
                    if q == 2 { c.tanh() * logistic_prime(zo[j]) } else { kappa * dc[q] };
            }
            // Blocks (bi, bj) in the order cc, ch, hc, hh.
            carry_want[j] = f;
            carry_want[2 * n + j] = kappa * f;
        }
        assert_close(&next, &next_want, "[c; h]");
        assert_close(&d, &d_want, "D");
        assert_close(&carry, &carry_want, "carry");
    }

    /// `1 − σ(z)` by subtraction is 0 in f32 for z ≳ 17 and coarse from z ≈ 8, so the gate
    /// derivatives `σ(1−σ)` and the RHN's `(1−f)` vanished or lost most digits at saturation.
    /// Expected values come from the §2.2/§2.3 formulas in f64 with `1 − σ(z) = 1/(1+eᶻ)`.
    #[test]
    fn saturated_gate_derivatives_keep_their_precision_in_f32() {
        let sig = |z: f64| 1.0 / (1.0 + (-z).exp());
        let sig_neg = |z: f64| 1.0 / (1.0 + z.exp());
        let rel = |got: f32, want: f64| ((f64::from(got) - want) / want).abs();
        let tol = 4.0 * f64::from(f32::EPSILON);
        for z in [8.5f32, 12.0, 17.0, 25.0, 40.0, -8.5, -12.0, -17.0, -25.0, -40.0] {
            let zf = f64::from(z);
            let (s, s_neg) = sigmoid_pair(z);
            assert!(rel(s, sig(zf)) <= tol && rel(s_neg, sig_neg(zf)) <= tol, "σ pair at {z}");

            // RHN with both gates saturated at z: c = 2σ(z) − 1, f = σ(z).
            let (zc, hp) = (z, 0.25f32);
            let (mut next, mut d, mut carry) = ([0.0f32; 1], [0.0f32; 2], [0.0f32; 1]);
            CellKind::Rhn.forward(1, &[zc, z], &[hp], &mut next, &mut d, &mut carry);
            let (f, f_neg) = (sig(zf), sig_neg(zf));
            let c = sig(zf) - sig_neg(zf);
            let hp64 = f64::from(hp);
            assert!(rel(d[0], f_neg * 2.0 * sig(zf) * sig_neg(zf)) <= tol, "RHN ∂h/∂z_c at {z}: {}", d[0]);
            assert!(rel(d[1], (hp64 - c) * f * f_neg) <= tol, "RHN ∂h/∂z_f at {z}: {}", d[1]);
            assert!(rel(next[0], f * hp64 + f_neg * c) <= tol, "RHN h at {z}");

            // LSTM with i, f, o saturated at z; g and c moderate so that tanh is not saturated.
            let (zg, c_prev) = (0.7f32, 0.6f32);
            let (mut next, mut d, mut carry) = ([0.0f32; 2], [0.0f32; 8], [0.0f32; 4]);
            CellKind::Lstm.forward(1, &[z, z, z, zg], &[c_prev, 0.0], &mut next, &mut d, &mut carry);
            let (g, cp) = (f64::from(zg).tanh(), f64::from(c_prev));
            let gate = sig(zf) * sig_neg(zf);
            let cell = f * cp + f * g;
            let tc = cell.tanh();
            let kappa = f * (1.0 - tc * tc);
            assert!(rel(d[0], g * gate) <= tol, "LSTM ∂c/∂z_i at {z}: {}", d[0]);
            assert!(rel(d[1], cp * gate) <= tol, "LSTM ∂c/∂z_f at {z}: {}", d[1]);
            assert!(rel(d[4], kappa * g * gate) <= tol, "LSTM ∂h/∂z_i at {z}: {}", d[4]);
            assert!(rel(d[5], kappa * cp * gate) <= tol, "LSTM ∂h/∂z_f at {z}: {}", d[5]);
            assert!(rel(d[6], tc * gate) <= tol, "LSTM ∂h/∂z_o at {z}: {}", d[6]);
        }
    }

    #[test]
    fn sigmoid_is_stable_at_extremes() {
        assert_eq!(sigmoid(1000.0f64), 1.0);
        assert_eq!(sigmoid(-1000.0f64), 0.0);
        assert!((sigmoid(0.3f64) - 1.0 / (1.0 + (-0.3f64).exp())).abs() < 1e-16);
    }
}
