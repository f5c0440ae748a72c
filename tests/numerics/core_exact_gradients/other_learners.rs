//! UORO exactly unbiased by enumeration of its signs, the frozen learner, and the guard that
//! refuses a non-finite gradient, against the oracles of the parent module.

use super::*;

// ---------------------------------------------------------------------------------------------
// 4. UORO is exactly unbiased: enumeration of every sign path (T8)
// ---------------------------------------------------------------------------------------------

/// Exact influence after advancing `toks` from a fresh stream, from the crate's exact RTRL.
fn rtrl_influence(cfg: &ModelConfig, params: &Params<f64>, toks: &[u32]) -> Array2<f64> {
    let spec = ModelConfig { learner: LearnerKind::Rtrl, ..cfg.clone() }.check().unwrap();
    let mut set = StreamSet::<f64>::new(&spec, 1);
    for &x in toks {
        set.advance(params, &learn(x)).unwrap();
    }
    match set.learner() {
        Learner::Rtrl(l) => l.influence(0).to_owned(),
        _ => unreachable!(),
    }
}

/// Average of `s̃ θ̃ᵀ` (flattened `s × P`) over the given sign paths; each path is a function
/// `(step, index) -> ν`.
fn uoro_average(
    spec: &ModelSpec,
    params: &Params<f64>,
    toks: &[u32],
    paths: u64,
    sign: impl Fn(u64, usize, usize) -> f64,
) -> Array2<f64> {
    let s_len = spec.state_len();
    let p_len = spec.recurrent_params();
    let mut set = StreamSet::<f64>::new(spec, 1);
    let mut acc = Array2::<f64>::zeros((s_len, p_len));
    for path in 0..paths {
        set.reset(params, 0);
        for (t, &x) in toks.iter().enumerate() {
            let nu: Vec<f64> = (0..s_len).map(|i| sign(path, t, i)).collect();
            match set.learner_mut() {
                Learner::Uoro(u) => u.force_signs(0, Some(nu)),
                _ => unreachable!(),
            }
            set.advance(params, &learn(x)).unwrap();
        }
        let (st, th) = match set.learner() {
            Learner::Uoro(u) => u.factors(0),
            _ => unreachable!(),
        };
        let th: Vec<f64> = th.iter().copied().collect(); // row-major: (q·n + j)·m + col
        assert_eq!(th.len(), p_len);
        for i in 0..s_len {
            let si = st[i];
            let mut row = acc.row_mut(i);
            for (a, &tv) in row.iter_mut().zip(&th) {
                *a += si * tv;
            }
        }
    }
    acc.mapv(|x| x / paths as f64)
}

#[test]
fn uoro_is_exactly_unbiased_by_enumeration() {
    const T: usize = 4;
    for (cell, n) in [(CellKind::Tanh, 3), (CellKind::Rhn, 3), (CellKind::Lstm, 2)] {
        let cfg = config(cell, n, 3, LearnerKind::Uoro, seed_of(cell) + 7);
        let spec = cfg.check().unwrap();
        assert_eq!(spec.config.uoro_epsilon, 0.0);
        let params = Params::<f64>::init(&spec);
        let toks = tokens(seed_of(cell) ^ 0x0404, spec.vocab, T);
        let exact = rtrl_influence(&cfg, &params, &toks);
        let s_len = spec.state_len();
        let bits = (s_len * T) as u32;
        let paths = 1u64 << bits;
        let avg = uoro_average(&spec, &params, &toks, paths, |path, t, i| {
            if (path >> (t * s_len + i)) & 1 == 0 { 1.0 } else { -1.0 }
        });
        let e = rel(&flat(&avg), &flat(&exact));
        println!(
            "{cell} (n={n}, s={s_len}, T={T}, {paths} paths): UORO mean vs exact influence: rel {e:.3e} (|G| {:.3e})",
            norm(&flat(&exact))
        );
        assert!(norm(&flat(&exact)) > 1e-2, "{cell}: influence too small to be meaningful");
        assert!(e <= 1e-12, "{cell}: UORO enumeration mean vs exact RTRL influence: rel {e:.3e}");

        // Negative control: a wrong sign set (every ν ≡ +1) must visibly miss the exact influence.
        let wrong = uoro_average(&spec, &params, &toks, 1, |_, _, _| 1.0);
        let ew = rel(&flat(&wrong), &flat(&exact));
        println!("{cell}: negative control (ν ≡ +1): rel {ew:.3e}");
        assert!(ew > 1e-3, "{cell}: negative control should fail but rel is only {ew:.3e}");
    }
}

// ---------------------------------------------------------------------------------------------
// 5. Frozen learner
// ---------------------------------------------------------------------------------------------

#[test]
fn frozen_learner_never_learns() {
    for cell in CellKind::ALL {
        let spec = spec_for(cell, LearnerKind::Frozen, seed_of(cell));
        let mut params = Params::<f64>::init(&spec);
        let before = params.clone();
        let mut opt = Optimizer::<f64>::new(&spec);
        let toks = tokens(seed_of(cell) ^ 0xF0, spec.vocab, 10);
        let mut set = StreamSet::<f64>::new(&spec, 1);
        let mut losses = [0.0];
        // score alone: zero contributions and a zero gradient buffer.
        let mut probe = set.clone();
        let c = probe.score(&params, &learn(toks[0]), &mut losses).unwrap();
        let gmax =
            probe.gradients().w.iter().chain(probe.gradients().v.iter()).fold(0.0f64, |a, &b| a.max(b.abs()));
        assert_eq!(c, 0.0, "{cell}: frozen score returned {c} contributions");
        assert_eq!(gmax, 0.0, "{cell}: frozen score left a gradient (max {gmax:.3e})");
        let zero = vec![0.0; spec.state_len()];
        let full = forward(&spec, &params, &zero, &toks);
        let mut max_loss_err = 0.0f64;
        for (t, &x) in toks.iter().enumerate() {
            let rep = set.step(&mut params, &mut opt, &learn(x), &mut losses).unwrap();
            assert_eq!(
                rep.contributions, 0.0,
                "{cell}: frozen step {t}: contributions {}",
                rep.contributions
            );
            assert_eq!(rep.update, None, "{cell}: frozen step {t}: an update was attempted");
            let (l, _) = readout(&spec, &params, h_of(&spec, &full.states[t]), x);
            max_loss_err = max_loss_err.max((losses[0] - l).abs() / l.abs());
        }
        let same = params.w.iter().zip(before.w.iter()).all(|(a, b)| a.to_bits() == b.to_bits())
            && params.v.iter().zip(before.v.iter()).all(|(a, b)| a.to_bits() == b.to_bits());
        println!(
            "{cell}: frozen: weights bit-identical {same}, loss rel err {max_loss_err:.3e}, optimizer steps {}",
            opt.steps
        );
        assert!(same, "{cell}: frozen learner changed the weights");
        assert_eq!(opt.steps, 0, "{cell}: optimizer was applied");
        assert!(max_loss_err <= 1e-12, "{cell}: frozen losses vs oracle: rel {max_loss_err:.3e}");
    }
}

// ---------------------------------------------------------------------------------------------
// 6. Non-finite guard: NaN gradient -> no update, learner of the slot restarted (KF-RTRL.md §8)
// ---------------------------------------------------------------------------------------------

/// The KF-RTRL factors of slot 0.
fn kf_factors(set: &StreamSet<f64>, spec: &ModelSpec) -> (Array1<f64>, Array2<f64>) {
    match set.learner() {
        Learner::KfRtrl(l) => l.factors(0, spec),
        _ => unreachable!(),
    }
}

#[test]
fn non_finite_gradient_is_refused_and_resets_the_factors() {
    for cell in CellKind::ALL {
        let spec = spec_for(cell, LearnerKind::KfRtrl, seed_of(cell));
        let (n, r, k) = (spec.n, spec.r, spec.k);
        let mut params = Params::<f64>::init(&spec);
        let mut opt = Optimizer::<f64>::new(&spec);
        let toks = tokens(seed_of(cell) ^ 0x3A3A, spec.vocab, 5);
        let mut set = StreamSet::<f64>::new(&spec, 1);
        let mut losses = [0.0];
        // Warm up with frozen weights so that the factors carry history.
        for &x in &toks[..4] {
            set.score(&params, &learn(x), &mut losses).unwrap();
            set.advance(&params, &learn(x)).unwrap();
        }
        let (u0, a0) = kf_factors(&set, &spec);
        assert!(
            norm(u0.as_slice().unwrap()) > 0.0 && norm(&flat(&a0)) > 0.0,
            "{cell}: warm-up left zero factors"
        );

        params.v[[1, 0]] = f64::NAN;
        let before = params.clone();
        let prev = set.state(0).to_vec();
        let x = toks[4];
        // Controls, advanced from the same point: one without and one with a learner reset.
        let mut no_reset = set.clone();
        no_reset.advance(&params, &learn(x)).unwrap();
        let mut with_reset = set.clone();
        with_reset.learner_mut().reset(0);
        with_reset.advance(&params, &learn(x)).unwrap();

        let rep = set.step(&mut params, &mut opt, &learn(x), &mut losses).unwrap();
        println!("{cell}: NaN readout: report {rep:?}");
        assert_eq!(rep.update, Some(UpdateOutcome::NonFinite), "{cell}: expected a refused update");
        let w_same = params.w.iter().zip(before.w.iter()).all(|(a, b)| a.to_bits() == b.to_bits());
        let v_same = params.v.iter().zip(before.v.iter()).all(|(a, b)| a.to_bits() == b.to_bits());
        assert!(w_same, "{cell}: W changed under a non-finite gradient");
        assert!(v_same, "{cell}: V changed under a non-finite gradient");
        assert!(set.state(0).iter().all(|v| v.is_finite()), "{cell}: state became non-finite");

        // The factors restarted from zero before this step's advance, so after it they are the
        // exact first-step factors u = p2·a, A = D/p2 (KF-RTRL.md §8 item 1, §9 T7).
        let tr = forward(&spec, &before, &prev, &[x]);
        let (a_vec, d) = (&tr.a[0], &tr.d[0]);
        let mut dmat = Array2::<f64>::zeros((k * n, r * n));
        for blk in 0..k {
            for q in 0..r {
                for j in 0..n {
                    dmat[[blk * n + j, q * n + j]] = d[(blk * r + q) * n + j];
                }
            }
        }
        let p2 = norm(&flat(&dmat)).sqrt() / norm(a_vec).sqrt();
        let exp_u: Vec<f64> = a_vec.iter().map(|v| v * p2).collect();
        let exp_a = dmat.mapv(|v| v / p2);
        let (u, a) = kf_factors(&set, &spec);
        let eu = rel(u.as_slice().unwrap(), &exp_u);
        let ea = rel(&flat(&a), &flat(&exp_a));
        let g = kron_influence(&u, &a);
        let exp_g = kron_influence(&Array1::from(a_vec.clone()), &dmat);
        let eg = rel(&flat(&g), &flat(&exp_g));
        let (ur, ar) = kf_factors(&with_reset, &spec);
        let bitwise = u.iter().zip(ur.iter()).all(|(p, q)| p.to_bits() == q.to_bits())
            && a.iter().zip(ar.iter()).all(|(p, q)| p.to_bits() == q.to_bits());
        let (un, an) = kf_factors(&no_reset, &spec);
        let e_ctrl = rel(&flat(&kron_influence(&un, &an)), &flat(&exp_g));
        println!(
            "{cell}: factors after refused step vs fresh first step: u rel {eu:.3e}, A rel {ea:.3e}, u⊗A vs a⊗D rel {eg:.3e}; \
             bitwise equal to reset+advance: {bitwise}; control without reset differs by rel {e_ctrl:.3e}"
        );
        assert!(eu <= 1e-14 && ea <= 1e-14, "{cell}: factors not restarted: u rel {eu:.3e}, A rel {ea:.3e}");
        assert!(eg <= 1e-14, "{cell}: u⊗A vs a⊗D: rel {eg:.3e}");
        assert!(bitwise, "{cell}: factors differ from a learner reset followed by the same advance");
        assert!(
            e_ctrl > 1e-3,
            "{cell}: control: factors without a reset are indistinguishable (rel {e_ctrl:.3e})"
        );
    }
}
