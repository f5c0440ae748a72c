//! Integration tests of the KF-RTRL learner against exact RTRL and the dense reference formulas
//! (KF-RTRL.md §3, §8 and the testable properties T2–T7, T10 of §9).
//!
//! Everything runs in f64 with frozen weights unless a test says otherwise. Exact influences come
//! from the `rtrl` learner run on the same tokens in a separate `StreamSet`; KF factors are
//! flattened with `reference::kron_influence`, which uses the same layout as `Rtrl::influence`.

#![allow(clippy::needless_range_loop, clippy::too_many_arguments, clippy::nonminimal_bool)]

use std::time::{Duration, Instant};

use kfrtrl::core::learner::KfRtrl;
use kfrtrl::core::learner::reference;
use kfrtrl::core::model::{ClipScope, UpdateUnit};
use kfrtrl::core::rng::{self, CounterRng, derive_key};
use kfrtrl::core::{
    CellKind, Float, Gradients, KfStrategy, Learner, LearnerKind, ModelConfig, ModelSpec, Optimizer,
    OptimizerKind, Params, SlotStep, StreamSet,
};
use ndarray::{Array1, Array2, ArrayView2, s};

mod batched;
mod monte_carlo;

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

fn config(cell: CellKind, n: usize, vocab: usize, learner: LearnerKind, seed: u64) -> ModelConfig {
    ModelConfig {
        vocab_size: vocab,
        cell,
        hidden: n,
        learner,
        tbptt_window: 8,
        optimizer: OptimizerKind::Sgd,
        lr: 0.05,
        clip: 0.0,
        clip_scope: ClipScope::Global,
        ok_rank: 2,
        gradient_before_reduction: false,
        influence_decay: 1.0,
        influence_margin: None,
        tokens_per_update: 1,
        tokens_per_update_ramp: 0,
        tokens_per_update_start: 1,
        update_unit: UpdateUnit::Tokens,
        seed,
        init_std: 0.5,
        uoro_epsilon: 1e-7,
    }
}

fn check(cfg: &ModelConfig) -> ModelSpec {
    cfg.check().expect("valid test config")
}

/// The same model with the exact RTRL learner (same sizes, same seed, hence same `Params::init`).
fn rtrl_spec(cfg: &ModelConfig) -> ModelSpec {
    check(&ModelConfig { learner: LearnerKind::Rtrl, ..cfg.clone() })
}

fn tokens(seed: u64, len: usize, vocab: usize) -> Vec<u32> {
    let mut rng = CounterRng::new(seed);
    (0..len).map(|_| rng.below(vocab as u64) as u32).collect()
}

fn kf<T: Float>(set: &StreamSet<T>) -> &KfRtrl<T> {
    match set.learner() {
        Learner::KfRtrl(k) => k,
        _ => panic!("expected the kf-rtrl learner"),
    }
}

fn kf_mut<T: Float>(set: &mut StreamSet<T>) -> &mut KfRtrl<T> {
    match set.learner_mut() {
        Learner::KfRtrl(k) => k,
        _ => panic!("expected the kf-rtrl learner"),
    }
}

fn exact_influence(set: &StreamSet<f64>, slot: usize) -> Array2<f64> {
    match set.learner() {
        Learner::Rtrl(r) => r.influence(slot).to_owned(),
        _ => panic!("expected the rtrl learner"),
    }
}

fn to_f64<T: Float>(a: &Array2<T>) -> Array2<f64> {
    a.mapv(|x| x.to_f64_lossless())
}

fn fro(a: ArrayView2<'_, f64>) -> f64 {
    a.iter().map(|x| x * x).sum::<f64>().sqrt()
}

fn norm_slice(x: &[f64]) -> f64 {
    x.iter().map(|v| v * v).sum::<f64>().sqrt()
}

/// ‖x − y‖_F / ‖y‖_F.
fn rel(x: &Array2<f64>, y: &Array2<f64>) -> f64 {
    assert_eq!(x.dim(), y.dim(), "shape mismatch");
    fro((x - y).view()) / fro(y.view())
}

fn rel_slice(x: &[f64], y: &[f64]) -> f64 {
    assert_eq!(x.len(), y.len());
    let d: Vec<f64> = x.iter().zip(y).map(|(a, b)| a - b).collect();
    norm_slice(&d) / norm_slice(y)
}

/// `u ⊗ A` flattened like the exact influence, in f64.
fn kron<T: Float>(u: &Array1<T>, a: &Array2<T>) -> Array2<f64> {
    to_f64(&reference::kron_influence(u, a))
}

fn kf_estimate<T: Float>(set: &StreamSet<T>, slot: usize) -> Array2<f64> {
    let (u, a) = kf(set).factors(slot, set.spec());
    kron(&u, &a)
}

fn all_slots(count: usize, token: u32) -> Vec<SlotStep> {
    (0..count).map(|b| SlotStep::learn(b, token)).collect()
}

fn random_vec(rng: &mut CounterRng, len: usize) -> Array1<f64> {
    Array1::from_iter((0..len).map(|_| rng.normal()))
}

fn random_mat(rng: &mut CounterRng, rows: usize, cols: usize) -> Array2<f64> {
    Array2::from_shape_fn((rows, cols), |_| rng.normal())
}

fn frob_inner(a: &Array2<f64>, b: &Array2<f64>) -> f64 {
    a.iter().zip(b.iter()).map(|(x, y)| x * y).sum()
}

/// A state with the cell's typical ranges (|h| < 1, LSTM c moderate).
fn random_state(rng: &mut CounterRng, spec: &ModelSpec) -> Vec<f64> {
    (0..spec.state_len()).map(|_| 0.6 * (2.0 * rng.uniform() - 1.0)).collect()
}

const CELLS: [(CellKind, usize); 3] = [(CellKind::Tanh, 6), (CellKind::Rhn, 5), (CellKind::Lstm, 3)];

// ---------------------------------------------------------------------------------------------
// 1. T2: exact unbiasedness by enumerating every sign path
// ---------------------------------------------------------------------------------------------

/// Runs all `2^(T-1)` sign paths of `T = 9` steps in one batched set (one path per slot) and
/// returns `(rel error of the path mean vs G_T, largest single-path rel error, hidden-state error)`.
fn enumerate_paths(
    cell: CellKind,
    n: usize,
    strategy: Option<KfStrategy>,
    all_plus: bool,
) -> (f64, f64, f64) {
    const T_LEN: usize = 9;
    let vocab = 4;
    let cfg = config(cell, n, vocab, LearnerKind::KfRtrl, 11);
    let spec = check(&cfg);
    let params = Params::<f64>::init(&spec);
    let toks = tokens(derive_key(7, cell as u64), T_LEN, vocab);
    let paths = 1usize << (T_LEN - 1);
    let mut set = StreamSet::<f64>::new(&spec, paths);
    if let Some(st) = strategy {
        kf_mut(&mut set).set_strategy(&spec, st);
        assert_eq!(kf(&set).strategy(), st);
    }
    let mut exact = StreamSet::<f64>::new(&rtrl_spec(&cfg), 1);
    for (t, &tok) in toks.iter().enumerate() {
        for p in 0..paths {
            let sign = if all_plus {
                1.0
            } else if t == 0 {
                // The first step after a reset is exact: its sign is arbitrary.
                if p % 3 == 0 { 1.0 } else { -1.0 }
            } else if (p >> (t - 1)) & 1 == 0 {
                1.0
            } else {
                -1.0
            };
            kf_mut(&mut set).force_sign(p, Some(sign));
        }
        set.advance(&params, &all_slots(paths, tok)).unwrap();
        exact.advance(&params, &[SlotStep::learn(0, tok)]).unwrap();
    }
    let g = exact_influence(&exact, 0);
    let mut mean = Array2::<f64>::zeros(g.dim());
    let mut worst_single = 0.0f64;
    let mut state_err = 0.0f64;
    for p in 0..paths {
        let x = kf_estimate(&set, p);
        worst_single = worst_single.max(rel(&x, &g));
        mean += &x;
        state_err = state_err.max(rel_slice(set.state(p), exact.state(0)));
    }
    mean /= paths as f64;
    (rel(&mean, &g), worst_single, state_err)
}

#[test]
fn t2_enumerated_sign_paths_average_to_exact_influence_for_every_cell() {
    let mut report = Vec::new();
    for (cell, n) in CELLS {
        let strategies: Vec<Option<KfStrategy>> = if cell == CellKind::Tanh {
            vec![None, Some(KfStrategy::Wide), Some(KfStrategy::Jacobian)]
        } else {
            vec![None]
        };
        for st in strategies {
            let (err, worst_single, state_err) = enumerate_paths(cell, n, st, false);
            report.push(format!("{cell} n={n} {st:?}: mean rel {err:.3e}, worst path {worst_single:.3e}"));
            assert!(state_err <= 1e-14, "{cell} {st:?}: hidden states differ from RTRL's: {state_err:.3e}");
            assert!(
                worst_single > 1e-3,
                "{cell} {st:?}: single paths should be noisy (else the test is vacuous): {worst_single:.3e}"
            );
            assert!(err <= 1e-12, "{cell} n={n} {st:?}: mean over 256 paths vs exact G_T: rel {err:.3e}");
        }
        // Negative control: no random signs (s ≡ +1) is biased.
        let (err_plus, _, _) = enumerate_paths(cell, n, None, true);
        report.push(format!("{cell} n={n} all +1: rel {err_plus:.3e}"));
        assert!(err_plus > 1e-3, "{cell}: s ≡ +1 should be biased, but rel error is only {err_plus:.3e}");
    }
    eprintln!("T2:\n  {}", report.join("\n  "));
}

// ---------------------------------------------------------------------------------------------
// 2–3. T3 / T4: one-step mean and variance, optimality of the p's
// ---------------------------------------------------------------------------------------------

struct OneStep {
    u: Array1<f64>,
    b: Array2<f64>,
    d: Array2<f64>,
    a: Array1<f64>,
}

/// Random `u` and `B = H_t A` with a real step's `a_t`, `D_t` (diagonal blocks) and `H_t`; `u` and
/// `B` lean towards `a` and `D` so that the cross term `⟨u,a⟩⟨B,D⟩` is not negligible.
fn one_step_terms(cell: CellKind, n: usize, seed: u64) -> OneStep {
    let spec = check(&config(cell, n, 4, LearnerKind::KfRtrl, seed));
    let params = Params::<f64>::init(&spec);
    let mut rng = CounterRng::new(derive_key(seed, 99));
    let prev = random_state(&mut rng, &spec);
    let t = reference::step_terms(&spec, &params, &prev, 2);
    let a_prev = random_mat(&mut rng, spec.state_len(), spec.gate_rows());
    let b = t.h.dot(&a_prev) + &(&t.d * 2.0);
    let u = random_vec(&mut rng, spec.m) + &(&t.a * 0.7);
    OneStep { u, b, d: t.d, a: t.a }
}

/// Mean and variance (mean squared Frobenius deviation) of the two sign outcomes.
fn two_outcomes(x: &OneStep, rho_factor: f64) -> (Array2<f64>, f64) {
    let (up, ap) = reference::kf_compress(&x.u, &x.b, &x.d, &x.a, 1.0, rho_factor);
    let (um, am) = reference::kf_compress(&x.u, &x.b, &x.d, &x.a, -1.0, rho_factor);
    let (gp, gm) = (kron(&up, &ap), kron(&um, &am));
    let mean = (&gp + &gm) / 2.0;
    let var = (fro((&gp - &mean).view()).powi(2) + fro((&gm - &mean).view()).powi(2)) / 2.0;
    (mean, var)
}

#[test]
fn t3_one_step_mean_and_variance_match_the_formulas() {
    let mut report = Vec::new();
    for (i, (cell, n)) in CELLS.into_iter().enumerate() {
        let x = one_step_terms(cell, n, 100 + i as u64);
        let target = kron(&x.u, &x.b) + &kron(&x.a, &x.d);
        let (mean, var) = two_outcomes(&x, 1.0);
        let mean_err = rel(&mean, &target);
        let nu = x.u.dot(&x.u).sqrt();
        let na = x.a.dot(&x.a).sqrt();
        let (nb, nd) = (fro(x.b.view()), fro(x.d.view()));
        let cross = 2.0 * x.u.dot(&x.a) * frob_inner(&x.b, &x.d);
        let formula = 2.0 * nu * nd * na * nb + cross;
        let var_err = (var - formula).abs() / formula;
        report.push(format!(
            "{cell}: mean rel {mean_err:.3e}, var {var:.6e} vs formula {formula:.6e} (cross {cross:.3e}) rel {var_err:.3e}"
        ));
        assert!(mean_err <= 1e-12, "{cell}: mean of the two outcomes vs u⊗B + a⊗D: rel {mean_err:.3e}");
        assert!(cross.abs() > 1e-2 * formula, "{cell}: cross term too small to be tested: {cross:.3e}");
        assert!(var_err <= 1e-12, "{cell}: variance {var:.15e} vs formula {formula:.15e}: rel {var_err:.3e}");
    }
    eprintln!("T3:\n  {}", report.join("\n  "));
}

#[test]
fn t4_the_optimal_ratio_minimises_the_one_step_variance() {
    let mut report = Vec::new();
    for (i, (cell, n)) in CELLS.into_iter().enumerate() {
        let x = one_step_terms(cell, n, 200 + i as u64);
        let target = kron(&x.u, &x.b) + &kron(&x.a, &x.d);
        let (_, v1) = two_outcomes(&x, 1.0);
        for f in [1.1, 1.0 / 1.1] {
            let (mean, vf) = two_outcomes(&x, f);
            let mean_err = rel(&mean, &target);
            report.push(format!("{cell}: var(rho×{f:.4}) = {vf:.6e} vs var(rho×1) = {v1:.6e}"));
            assert!(vf > v1, "{cell}: variance at rho×{f} ({vf:.15e}) must exceed the optimum ({v1:.15e})");
            assert!(mean_err <= 1e-12, "{cell}: rho×{f} must stay unbiased: rel {mean_err:.3e}");
        }
    }
    eprintln!("T4:\n  {}", report.join("\n  "));
}

// ---------------------------------------------------------------------------------------------
// 4. T6: gauge invariance
// ---------------------------------------------------------------------------------------------

#[test]
fn t6_gauge_invariance_of_the_compression() {
    let mut worst_ref = 0.0f64;
    let mut worst_set = 0.0f64;
    for (cell, n) in CELLS {
        let cfg = config(cell, n, 4, LearnerKind::KfRtrl, 21);
        let spec = check(&cfg);
        let params = Params::<f64>::init(&spec);
        let toks = tokens(derive_key(3, cell as u64), 7, 4);
        // Three slots on the same stream with the same (seeded) signs.
        let mut set = StreamSet::<f64>::new(&spec, 3);
        for b in 0..3 {
            set.set_sign_key(b, 1234);
        }
        for &tok in &toks[..5] {
            set.advance(&params, &all_slots(3, tok)).unwrap();
        }
        // Dense reference: one step from (αu, A/α) vs from (u, A).
        let (u, a) = kf(&set).factors(0, &spec);
        let prev = set.state(0).to_vec();
        for alpha in [1e-3, 0.37, 5.0, 1e3] {
            for sign in [1.0, -1.0] {
                let (_, u1, a1) = reference::kf_step(&spec, &params, &prev, &u, &a, toks[5], sign);
                let (_, u2, a2) = reference::kf_step(
                    &spec,
                    &params,
                    &prev,
                    &u.mapv(|x| x * alpha),
                    &a.mapv(|x| x / alpha),
                    toks[5],
                    sign,
                );
                let e = rel(&kron(&u2, &a2), &kron(&u1, &a1));
                worst_ref = worst_ref.max(e);
                assert!(e <= 1e-12, "{cell} alpha {alpha} sign {sign}: reference gauge error {e:.3e}");
            }
        }
        // Batched: slot 1 gets (αu, scale/α), slot 2 gets (αu, A_stored/α); all use the same sign.
        let alpha = 7.5;
        let (ru, ra, rs) = {
            let (ru, ra, rs) = kf(&set).raw_factors(0, &spec);
            (ru.to_owned(), ra.to_owned(), rs)
        };
        let u_scaled: Vec<f64> = ru.iter().map(|x| x * alpha).collect();
        kf_mut(&mut set).set_raw_factors(1, &spec, &u_scaled, ra.view(), rs / alpha);
        let a_scaled = ra.mapv(|x| x / alpha);
        kf_mut(&mut set).set_raw_factors(2, &spec, &u_scaled, a_scaled.view(), rs);
        let before = kf_estimate(&set, 0);
        for b in 1..3 {
            let e = rel(&kf_estimate(&set, b), &before);
            assert!(e <= 1e-14, "{cell}: gauge-transformed slot {b} changed u⊗A before any step: {e:.3e}");
        }
        for &tok in &toks[5..] {
            set.advance(&params, &all_slots(3, tok)).unwrap();
            let x0 = kf_estimate(&set, 0);
            for b in 1..3 {
                let e = rel(&kf_estimate(&set, b), &x0);
                worst_set = worst_set.max(e);
                assert!(e <= 1e-12, "{cell}: batched gauge slot {b}: rel {e:.3e}");
            }
        }
    }
    eprintln!("T6: worst reference gauge error {worst_ref:.3e}, worst batched gauge error {worst_set:.3e}");
}

// ---------------------------------------------------------------------------------------------
// 5. T7: the first step after a reset is exact
// ---------------------------------------------------------------------------------------------

#[test]
fn t7_first_step_after_a_reset_is_exact_whatever_the_sign() {
    let mut worst = 0.0f64;
    for (cell, n) in CELLS {
        let cfg = config(cell, n, 4, LearnerKind::KfRtrl, 31);
        let spec = check(&cfg);
        let params = Params::<f64>::init(&spec);
        let toks = tokens(derive_key(5, cell as u64), 5, 4);
        let cap = 4;
        let mut set = StreamSet::<f64>::new(&spec, cap);
        let mut losses = vec![0.0; cap];
        // A few seeded steps so that every slot has non-zero factors and state.
        for &tok in &toks[..4] {
            let inputs = all_slots(cap, tok);
            set.score(&params, &inputs, &mut losses).unwrap();
            set.advance(&params, &inputs).unwrap();
        }
        for b in 0..cap {
            assert!(fro(kf_estimate(&set, b).view()) > 0.0);
        }
        let tok = toks[4];
        // Slots 0, 1: SlotStep { reset: true } through score + advance, forced signs +1 / −1.
        // Slots 2, 3: StreamSet::reset, then advance only, forced signs −1 / +1.
        let signs = [1.0, -1.0, -1.0, 1.0];
        for (b, &sg) in signs.iter().enumerate() {
            kf_mut(&mut set).force_sign(b, Some(sg));
        }
        let via_step: Vec<SlotStep> =
            (0..2).map(|b| SlotStep { slot: b, token: tok, learn: true, reset: true }).collect();
        set.score(&params, &via_step, &mut losses).unwrap();
        set.advance(&params, &via_step).unwrap();
        set.reset(&params, 2);
        set.reset(&params, 3);
        set.advance(&params, &[SlotStep::learn(2, tok), SlotStep::learn(3, tok)]).unwrap();

        let zero = vec![0.0; spec.state_len()];
        let terms = reference::step_terms(&spec, &params, &zero, tok);
        let target = kron(&terms.a, &terms.d);
        for b in 0..cap {
            let e = rel(&kf_estimate(&set, b), &target);
            worst = worst.max(e);
            assert!(e <= 1e-14, "{cell} slot {b} sign {}: u_1⊗A_1 vs a_1⊗D_1: rel {e:.3e}", signs[b]);
            let se = rel_slice(set.state(b), terms.next.as_slice().unwrap());
            assert!(se <= 1e-15, "{cell} slot {b}: state after reset + 1 step: rel {se:.3e}");
            assert_eq!(set.position(b), 1, "{cell} slot {b}: position after reset + 1 step");
        }
    }
    eprintln!("T7: worst rel error of u_1⊗A_1 vs a_1⊗D_1: {worst:.3e}");
}

// ---------------------------------------------------------------------------------------------
// 10. End-to-end gradient unbiasedness by enumeration
// ---------------------------------------------------------------------------------------------

#[test]
fn enumerated_mean_of_summed_gradients_equals_exact_rtrl_gradient() {
    const T_LEN: usize = 6;
    let (n, vocab) = (4, 3);
    let cfg = config(CellKind::Tanh, n, vocab, LearnerKind::KfRtrl, 71);
    let spec = check(&cfg);
    let params = Params::<f64>::init(&spec);
    let toks = tokens(71, T_LEN, vocab);
    // Signs of advances 2..=T (advance 1 is exact): 2^(T-1) paths, one per slot. score()
    // averages over the slots, so each step's gradients() is already the mean over paths.
    let paths = 1usize << (T_LEN - 1);
    let mut set = StreamSet::<f64>::new(&spec, paths);
    let mut exact = StreamSet::<f64>::new(&rtrl_spec(&cfg), 1);
    let mut single = StreamSet::<f64>::new(&spec, 1); // one seeded path, to show it differs
    let mut sum_kf = Gradients::<f64>::zeros(&spec);
    let mut sum_exact = Gradients::<f64>::zeros(&spec);
    let mut sum_single = Gradients::<f64>::zeros(&spec);
    let mut losses = vec![0.0; paths];
    for (t, &tok) in toks.iter().enumerate() {
        let inputs = all_slots(paths, tok);
        let c = set.score(&params, &inputs, &mut losses).unwrap();
        assert_eq!(c, paths as f64);
        sum_kf.add(set.gradients());
        let c1 = exact.score(&params, &[SlotStep::learn(0, tok)], &mut losses).unwrap();
        assert_eq!(c1, 1.0);
        sum_exact.add(exact.gradients());
        single.score(&params, &[SlotStep::learn(0, tok)], &mut losses).unwrap();
        sum_single.add(single.gradients());
        for p in 0..paths {
            // Advance 1 (t = 0) is exact, its sign arbitrary: +1.
            let sign = if t == 0 || (p >> (t - 1)) & 1 == 0 { 1.0 } else { -1.0 };
            kf_mut(&mut set).force_sign(p, Some(sign));
        }
        set.advance(&params, &inputs).unwrap();
        exact.advance(&params, &[SlotStep::learn(0, tok)]).unwrap();
        single.advance(&params, &[SlotStep::learn(0, tok)]).unwrap();
    }
    let ew = rel(&sum_kf.w, &sum_exact.w);
    let ev = rel(&sum_kf.v, &sum_exact.v);
    let es = rel(&sum_single.w, &sum_exact.w);
    eprintln!("gradient enumeration: W rel {ew:.3e}, V rel {ev:.3e} (a single seeded path: W rel {es:.3e})");
    assert!(fro(sum_exact.w.view()) > 0.0);
    assert!(es > 1e-3, "a single path should differ from the exact gradient: rel {es:.3e}");
    assert!(ew <= 1e-12, "mean over paths of Σ_t ∇W vs exact RTRL: rel {ew:.3e}");
    assert!(ev <= 1e-12, "Σ_t ∇V vs exact RTRL: rel {ev:.3e}");
}
