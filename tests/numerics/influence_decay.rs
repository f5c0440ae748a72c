//! The biased remedies for an influence that stops decaying, against exact oracles: the fixed
//! decay `γ` (`influence_decay`) and the adaptive one (`influence_margin`, `learner::growth`),
//! whose factor `γ_t = exp(−max(0, λ̂_t + ε))` follows a probe of the exact state Jacobians.
//!
//! The adaptive decay's oracle is written here from its definition: a unit tangent pushed
//! through the dense `H_t` of [`reference::step_terms`], the running rate
//! `λ̂_t = (1 − w) λ̂_{t-1} + w ln ‖H_t v‖`, and exact RTRL `G_t = γ_t H_t G_{t-1} + a_t ⊗ D_t`.
//! OK's, KF-RTRL's and UORO's enumerated means must equal the engine's exact RTRL with the same
//! margin, which must equal that oracle.

use super::core_ok::{carried, check, config, enumerate, exact_run, kf_mut, rel, tokens};
use kfrtrl::core::learner::growth::GROWTH_RATE_WEIGHT;
use kfrtrl::core::learner::reference;
use kfrtrl::core::slot_state::names;
use kfrtrl::core::{CellKind, KfStrategy, Learner, LearnerKind, ModelConfig, Params, SlotStep, StreamSet};
use ndarray::{Array1, Array2};

/// The influence decay `γ` (an explicit, biased option): OK's enumerated mean is exact RTRL's
/// discounted influence `G_t = H_t (γ G_{t-1}) + a_t ⊗ D_t` (also decayed), and differs from the
/// undiscounted one; KF-RTRL's sign paths likewise.
#[test]
fn a_decayed_influence_is_exact_rtrl_with_the_same_decay() {
    let (cell, n, vocab) = (CellKind::Rhn, 3, 3);
    let cfg = ModelConfig { influence_decay: 0.8, ..config(cell, n, vocab, LearnerKind::Ok, 2, true) };
    let params = Params::<f64>::init(&check(&cfg));
    let toks = tokens(31, 5, vocab);
    let (set, paths) = enumerate(&cfg, &params, &toks);
    let (_, g, _) = exact_run(&cfg, &params, &toks);
    let (_, g_plain, _) = exact_run(&ModelConfig { influence_decay: 1.0, ..cfg.clone() }, &params, &toks);
    let mean =
        paths.iter().fold(Array2::<f64>::zeros(g.dim()), |acc, p| acc + carried(&set, p.slot) * p.weight);
    assert!(rel(&mean, &g) < 1e-12, "OK with decay: rel {:.3e}", rel(&mean, &g));
    assert!(rel(&g, &g_plain) > 1e-2, "the decay should change the influence");

    for (cell, strategy) in [(CellKind::Rhn, KfStrategy::Jacobian), (CellKind::Tanh, KfStrategy::Wide)] {
        kf_decay_paths(ModelConfig { learner: LearnerKind::KfRtrl, cell, ..cfg.clone() }, strategy, &toks);
    }
}

fn kf_decay_paths(kf_cfg: ModelConfig, strategy: KfStrategy, toks: &[u32]) {
    let spec = check(&kf_cfg);
    let params = Params::<f64>::init(&spec);
    let (_, g, _) = exact_run(&kf_cfg, &params, toks);
    let paths = 1usize << (toks.len() - 1);
    let mut kf = StreamSet::<f64>::new(&spec, paths);
    kf_mut(&mut kf).set_strategy(&spec, strategy);
    for (t, &tok) in toks.iter().enumerate() {
        for p in 0..paths {
            let sign = if t == 0 || (p >> (t - 1)) & 1 == 0 { 1.0 } else { -1.0 };
            kf_mut(&mut kf).force_sign(p, Some(sign));
        }
        kf.advance(&params, &(0..paths).map(|p| SlotStep::learn(p, tok)).collect::<Vec<_>>()).unwrap();
    }
    let mean = (0..paths).fold(Array2::<f64>::zeros(g.dim()), |acc, p| {
        let (u, a) = match kf.learner() {
            Learner::KfRtrl(k) => k.factors(p, &spec),
            _ => unreachable!(),
        };
        acc + reference::kron_influence(&u, &a)
    }) / paths as f64;
    assert!(rel(&mean, &g) < 1e-12, "KF-RTRL {strategy:?} with decay: rel {:.3e}", rel(&mean, &g));
}

/// The adaptive decay's oracle: `(G_T, λ̂_T, factors γ_1..γ_T)` for one stream of `toks` from
/// zero state under frozen `params`.
fn margin_oracle(cfg: &ModelConfig, params: &Params<f64>, toks: &[u32]) -> (Array2<f64>, f64, Vec<f64>) {
    let spec = check(&ModelConfig { learner: LearnerKind::Rtrl, ..cfg.clone() });
    let margin = cfg.influence_margin.expect("a margin");
    let s_len = spec.state_len();
    let mut state = Array1::<f64>::zeros(s_len);
    let mut v = Array1::<f64>::from_elem(s_len, 1.0 / (s_len as f64).sqrt());
    let mut rate = 0.0;
    let mut g: Option<Array2<f64>> = None;
    let mut factors = Vec::new();
    for &tok in toks {
        let terms = reference::step_terms(&spec, params, state.as_slice().unwrap(), tok);
        let hv = terms.h.dot(&v);
        let growth = hv.dot(&hv).sqrt();
        v = hv / growth;
        rate = (1.0 - GROWTH_RATE_WEIGHT) * rate + GROWTH_RATE_WEIGHT * growth.ln();
        let gamma = (-(rate + margin).max(0.0)).exp();
        factors.push(gamma);
        let f = reference::kron_influence(&terms.a, &terms.d);
        g = Some(match g {
            Some(g) => terms.h.dot(&g) * gamma + f,
            None => f,
        });
        state = terms.next;
    }
    (g.expect("at least one token"), rate, factors)
}

fn margin_config(cell: CellKind, n: usize, learner: LearnerKind, margin: f64) -> ModelConfig {
    ModelConfig { influence_margin: Some(margin), ..config(cell, n, 3, learner, 2, true) }
}

/// Exact RTRL with a margin is the exact influence of the past discounted by the probe's
/// factors, for every cell; the factors are 1 exactly once the measured rate is below `−ε`
/// (the unbiased learner) and below 1 before, so both branches are exercised.
#[test]
fn rtrl_with_a_margin_discounts_exactly_by_the_measured_growth() {
    for (cell, n) in [(CellKind::Tanh, 3), (CellKind::Rhn, 3), (CellKind::Lstm, 2)] {
        let cfg = margin_config(cell, n, LearnerKind::Rtrl, 0.05);
        let params = Params::<f64>::init(&check(&cfg));
        let toks = tokens(5, 300, 3);
        let (set, g, _) = exact_run(&cfg, &params, &toks);
        let (oracle, rate, factors) = margin_oracle(&cfg, &params, &toks);
        let e = rel(&g, &oracle);
        assert!(e < 1e-12, "{cell}: RTRL with a margin vs the oracle: rel {e:.3e}");
        let measured = set.learner().growth().expect("probes").rate(0);
        assert!((measured - rate).abs() < 1e-12, "{cell}: rate {measured} vs the oracle's {rate}");
        let exact = factors.iter().filter(|&&f| f == 1.0).count();
        assert!(
            exact > 100 && exact < factors.len(),
            "{cell}: {exact} of {} steps undiscounted",
            factors.len()
        );
        // Early on, while the rate is still being measured, the discount is visible.
        let early = &toks[..3];
        let (_, g_early, _) = exact_run(&cfg, &params, early);
        let (_, g_plain, _) =
            exact_run(&ModelConfig { influence_margin: None, ..cfg.clone() }, &params, early);
        assert!(rel(&g_early, &g_plain) > 1e-6, "{cell}: the early discount should show");
    }
}

/// OK's and KF-RTRL's enumerated means equal exact RTRL with the same margin: the factors depend
/// on the trajectory alone, never on the random signs, so the estimators stay unbiased for
/// the discounted influence.
#[test]
fn ok_and_kf_rtrl_with_a_margin_are_unbiased_for_the_discounted_influence() {
    let cfg = margin_config(CellKind::Rhn, 3, LearnerKind::Ok, 0.3);
    let params = Params::<f64>::init(&check(&cfg));
    let toks = tokens(31, 5, 3);
    let (set, paths) = enumerate(&cfg, &params, &toks);
    let (_, g, _) = exact_run(&cfg, &params, &toks);
    let (oracle, _, factors) = margin_oracle(&cfg, &params, &toks);
    assert!(factors.iter().all(|&f| f < 1.0), "the margin should discount these first steps: {factors:?}");
    assert!(rel(&g, &oracle) < 1e-12);
    let mean =
        paths.iter().fold(Array2::<f64>::zeros(g.dim()), |acc, p| acc + carried(&set, p.slot) * p.weight);
    assert!(rel(&mean, &g) < 1e-12, "OK with a margin: rel {:.3e}", rel(&mean, &g));
    for (cell, strategy) in [(CellKind::Rhn, KfStrategy::Jacobian), (CellKind::Tanh, KfStrategy::Wide)] {
        kf_decay_paths(ModelConfig { learner: LearnerKind::KfRtrl, cell, ..cfg.clone() }, strategy, &toks);
    }
}

/// Where the dynamics expand (a tanh cell of 32 units with gain about 3.4: a growth rate of about
/// +0.2 a step), exact
/// RTRL's influence grows geometrically; with a margin it stays bounded, and so does OK's.
#[test]
fn a_margin_bounds_the_influence_of_expanding_dynamics() {
    let norm = |g: &Array2<f64>| g.iter().map(|x| x * x).sum::<f64>().sqrt();
    let base = ModelConfig { init_std: 0.6, ..config(CellKind::Tanh, 32, 3, LearnerKind::Rtrl, 2, true) };
    let params = Params::<f64>::init(&check(&base));
    let toks = tokens(9, 400, 3);
    let (_, plain, _) = exact_run(&base, &params, &toks);
    let with_margin = ModelConfig { influence_margin: Some(0.02), ..base.clone() };
    let (set, bounded, _) = exact_run(&with_margin, &params, &toks);
    let rate = set.learner().growth().expect("probes").rate(0);
    assert!(rate > 0.05, "the test needs expanding dynamics: rate {rate}");
    // Bounded: about ‖a ⊗ D‖/ε at most, and no larger at the end than half-way.
    let (_, half, _) = exact_run(&with_margin, &params, &toks[..200]);
    eprintln!(
        "‖G‖: exact {:.3e}, with a margin {:.3e} (half-way {:.3e})",
        norm(&plain),
        norm(&bounded),
        norm(&half)
    );
    assert!(norm(&plain) > 1e20, "exact RTRL's influence should explode: {:.3e}", norm(&plain));
    assert!(norm(&bounded) < 1e5, "with a margin it should stay bounded: {:.3e}", norm(&bounded));
    assert!(norm(&bounded) < 10.0 * norm(&half), "with a margin it should not keep growing");
    // OK (rank 2) carries the same bounded influence, up to its noise.
    let ok_cfg = ModelConfig { learner: LearnerKind::Ok, ..with_margin };
    let mut ok_set = StreamSet::<f64>::new(&check(&ok_cfg), 1);
    for &tok in &toks {
        ok_set.advance(&params, &[SlotStep::learn(0, tok)]).unwrap();
    }
    assert!(norm(&carried(&ok_set, 0)) < 1e5, "OK with a margin: {:.3e}", norm(&carried(&ok_set, 0)));
}

/// The probe is part of a stream's state: exported and imported, a stream continues bit for bit
/// (a reset restarts the probe too); a state without the probe is refused by a model with a
/// margin, and a margin is refused for learners that carry no influence.
#[test]
fn the_probe_travels_with_the_stream_and_is_checked() {
    let cfg = margin_config(CellKind::Rhn, 3, LearnerKind::Ok, 0.01);
    let spec = check(&cfg);
    let params = Params::<f64>::init(&spec);
    let toks = tokens(2, 60, 3);
    let mut set = StreamSet::<f64>::new(&spec, 3);
    for &tok in &toks[..30] {
        set.advance(&params, &[SlotStep::learn(0, tok)]).unwrap();
    }
    let saved = set.export_slot(0);
    assert!(saved.tensor(names::GROWTH_TANGENT).is_some() && saved.tensor(names::GROWTH_RATE).is_some());
    set.import_slot(1, &saved).unwrap();
    for &tok in &toks[30..] {
        set.advance(&params, &[SlotStep::learn(0, tok), SlotStep::learn(1, tok)]).unwrap();
    }
    let (a, b) = (set.export_slot(0), set.export_slot(1));
    assert_eq!(a.tensors, b.tensors, "the imported stream should continue bit for bit");
    let growth = set.learner().growth().unwrap();
    assert_eq!(growth.rate(0).to_bits(), growth.rate(1).to_bits());
    set.reset(&params, 1);
    assert_eq!(set.learner().growth().unwrap().rate(1), 0.0);

    let mut without = saved.clone();
    without.tensors.retain(|(name, _, _)| name != names::GROWTH_TANGENT && name != names::GROWTH_RATE);
    assert!(set.import_slot(2, &without).is_err(), "a state without the probe must be refused");
    let plain = StreamSet::<f64>::new(&check(&ModelConfig { influence_margin: None, ..cfg.clone() }), 1);
    assert!(
        plain.clone().import_slot(0, &saved).is_err(),
        "a probe the model does not carry must be refused"
    );

    for learner in [LearnerKind::Tbptt, LearnerKind::Frozen] {
        assert!(
            ModelConfig { learner, ..cfg.clone() }.check().is_err(),
            "{learner:?} has no influence to decay"
        );
    }
    for margin in [-0.1, 1.5, f64::NAN] {
        assert!(
            ModelConfig { influence_margin: Some(margin), ..cfg.clone() }.check().is_err(),
            "margin {margin}"
        );
    }
}

/// UORO with a margin and with a decay: its tangent `s̃` carries the same factors (they follow
/// the trajectory, never the signs), so the mean of `s̃ θ̃ᵀ` over every sign path is exact RTRL
/// with the same margin (and decay), which differs from the undiscounted influence.
#[test]
fn uoro_with_a_margin_or_a_decay_is_unbiased_for_the_discounted_influence() {
    const STEPS: usize = 3;
    for (margin, decay) in [(Some(0.3), 1.0), (None, 0.7), (Some(0.3), 0.7)] {
        let cfg = ModelConfig {
            influence_margin: margin,
            influence_decay: decay,
            uoro_epsilon: 0.0,
            ..config(CellKind::Rhn, 2, 3, LearnerKind::Uoro, 1, false)
        };
        let spec = check(&cfg);
        let params = Params::<f64>::init(&spec);
        let toks = tokens(41, 3, STEPS);
        let (_, exact, _) = exact_run(&cfg, &params, &toks);
        let (_, undiscounted, _) = exact_run(
            &ModelConfig { influence_margin: None, influence_decay: 1.0, ..cfg.clone() },
            &params,
            &toks,
        );
        assert!(rel(&exact, &undiscounted) > 1e-3, "{margin:?} {decay}: the factors should discount");
        let s_len = spec.state_len();
        let paths = 1u64 << (s_len * STEPS);
        let mut mean = Array2::<f64>::zeros(exact.dim());
        let mut set = StreamSet::<f64>::new(&spec, 1);
        for path in 0..paths {
            set.reset(&params, 0);
            for (t, &tok) in toks.iter().enumerate() {
                let nu =
                    (0..s_len).map(|i| if (path >> (t * s_len + i)) & 1 == 0 { 1.0 } else { -1.0 }).collect();
                match set.learner_mut() {
                    Learner::Uoro(u) => u.force_signs(0, Some(nu)),
                    _ => unreachable!(),
                }
                set.advance(&params, &[SlotStep::learn(0, tok)]).unwrap();
            }
            let (st, th) = match set.learner() {
                Learner::Uoro(u) => u.factors(0),
                _ => unreachable!(),
            };
            let th: Vec<f64> = th.iter().copied().collect();
            for (i, mut row) in mean.rows_mut().into_iter().enumerate() {
                row.iter_mut().zip(&th).for_each(|(m, &t)| *m += st[i] * t / paths as f64);
            }
        }
        let e = rel(&mean, &exact);
        assert!(e < 1e-12, "{margin:?} {decay}: UORO's enumerated mean vs exact RTRL: rel {e:.3e}");
    }
}
