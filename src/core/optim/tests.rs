//! Unit tests of the optimizers: SGD and Adam steps against hand computation, the clip scopes,
//! refused updates (non-finite or too large), state restores, and thread-count independence.

use super::*;
use crate::core::model::ModelConfig;

fn spec(opt: OptimizerKind, clip: f64) -> ModelSpec {
    // The global scope: these tests were written for it; the scopes have a test of their own.
    let clip_scope = ClipScope::Global;
    ModelConfig { vocab_size: 3, hidden: 2, optimizer: opt, lr: 0.1, clip, clip_scope, ..Default::default() }
        .check()
        .unwrap()
}

#[test]
fn sgd_moves_against_the_gradient_by_lr() {
    let s = spec(OptimizerKind::Sgd, 0.0);
    let mut p = Params::<f64>::zeros(&s);
    let mut g = Gradients::zeros(&s);
    g.w[[0, 0]] = 2.0;
    g.v[[1, 1]] = -1.0;
    let mut o = Optimizer::new(&s);
    assert!(matches!(o.apply(&mut p, &g), UpdateOutcome::Applied { clipped: false, .. }));
    assert_eq!(p.w[[0, 0]], -0.2);
    assert_eq!(p.v[[1, 1]], 0.1);
}

#[test]
fn clipping_rescales_to_the_clip_norm() {
    let s = spec(OptimizerKind::Sgd, 1.0);
    let mut p = Params::<f64>::zeros(&s);
    let mut g = Gradients::zeros(&s);
    g.w[[0, 0]] = 3.0;
    g.v[[0, 0]] = 4.0;
    let mut o = Optimizer::new(&s);
    let out = o.apply(&mut p, &g);
    assert_eq!(out, UpdateOutcome::Applied { grad_norm: 5.0, clipped: true });
    assert!((p.w[[0, 0]] + 0.1 * 0.6).abs() < 1e-15);
    assert!((p.v[[0, 0]] + 0.1 * 0.8).abs() < 1e-15);
}

/// The readout's exact gradient must not shrink because the recurrent estimate is large.
#[test]
fn recurrent_and_per_group_clips_spare_the_readout() {
    let run = |scope: ClipScope, w: f64, v: f64| {
        let s = ModelConfig { clip_scope: scope, ..spec(OptimizerKind::Sgd, 1.0).config }.check().unwrap();
        let mut p = Params::<f64>::zeros(&s);
        let mut g = Gradients::zeros(&s);
        g.w[[0, 0]] = w;
        g.v[[0, 0]] = v;
        let out = Optimizer::new(&s).apply(&mut p, &g);
        (out, -p.w[[0, 0]] / 0.1, -p.v[[0, 0]] / 0.1)
    };
    let close = |a: f64, b: f64| (a - b).abs() < 1e-12;
    let (out, w, v) = run(ClipScope::Recurrent, 30.0, 0.5);
    assert_eq!(out, UpdateOutcome::Applied { grad_norm: 30.0f64.hypot(0.5), clipped: true });
    assert!(close(w, 1.0) && close(v, 0.5), "{w} {v}");
    // A readout above the bound is still not clipped under the recurrent scope.
    let (_, w, v) = run(ClipScope::Recurrent, 0.5, 7.0);
    assert!(close(w, 0.5) && close(v, 7.0), "{w} {v}");
    let (_, w, v) = run(ClipScope::PerGroup, 30.0, 7.0);
    assert!(close(w, 1.0) && close(v, 1.0), "{w} {v}");
    let (out, w, v) = run(ClipScope::PerGroup, 0.6, 0.7);
    assert!(close(w, 0.6) && close(v, 0.7) && matches!(out, UpdateOutcome::Applied { clipped: false, .. }));
    // The global scope shrinks both by the joint norm (the old behaviour).
    let (_, w, v) = run(ClipScope::Global, 30.0, 0.5);
    let joint = 30.0f64.hypot(0.5);
    assert!(close(w, 30.0 / joint) && close(v, 0.5 / joint), "{w} {v}");
}

#[test]
fn adam_first_step_moves_each_weight_by_lr_in_sign_direction() {
    let s = spec(OptimizerKind::Adam, 0.0);
    let mut p = Params::<f64>::zeros(&s);
    let mut g = Gradients::zeros(&s);
    g.w[[0, 1]] = 0.5;
    g.w[[1, 2]] = -3.0;
    let mut o = Optimizer::new(&s);
    o.apply(&mut p, &g);
    // With bias correction, step 1 is lr·g/(|g| + ε).
    assert!((p.w[[0, 1]] + 0.1).abs() < 1e-6);
    assert!((p.w[[1, 2]] - 0.1).abs() < 1e-6);
    assert_eq!(p.w[[0, 0]], 0.0);
    // Step 2 with the same gradient: m/sqrt(v) stays ±1 after bias correction.
    o.apply(&mut p, &g);
    assert!((p.w[[0, 1]] + 0.2).abs() < 1e-6);
}

#[test]
fn restore_rebuilds_an_equal_optimizer_and_refuses_misfits() {
    let s = spec(OptimizerKind::Adam, 1.0);
    let mut p = Params::<f64>::init(&s);
    let mut g = Gradients::zeros(&s);
    g.w[[1, 2]] = 0.25;
    let mut o = Optimizer::new(&s);
    o.apply(&mut p, &g);
    let (m, v) = (o.m.clone().unwrap(), o.v.clone().unwrap());
    let restored = Optimizer::restore(&s, o.steps, Some((m.clone(), v.clone()))).unwrap();
    assert_eq!(restored, o);
    assert_eq!((restored.lr(), restored.clip()), (0.1, 1.0));
    assert_eq!(Optimizer::<f64>::restore(&s, 1, None), Err(OptimizerStateError::MissingMoments));
    let other = ModelConfig { vocab_size: 4, hidden: 2, ..Default::default() }.check().unwrap();
    let wrong = Gradients::<f64>::zeros(&other);
    assert!(matches!(
        Optimizer::restore(&s, 1, Some((wrong.clone(), wrong))),
        Err(OptimizerStateError::Shape { .. })
    ));
    let sgd = spec(OptimizerKind::Sgd, 0.0);
    assert_eq!(Optimizer::<f64>::restore(&sgd, 3, Some((m, v))), Err(OptimizerStateError::UnexpectedMoments));
    assert_eq!(Optimizer::<f64>::restore(&sgd, 3, None).unwrap().steps, 3);
}

/// `restore` used to check shapes only: a saved negative second moment made `sqrt(v)` NaN and
/// the first update wrote NaN into the weights, for good.
#[test]
fn restore_refuses_non_finite_or_negative_moments() {
    let s = spec(OptimizerKind::Adam, 0.0);
    let good = || (Gradients::<f32>::zeros(&s), Gradients::<f32>::zeros(&s));
    let restore = |(m, v)| Optimizer::restore(&s, 5, Some((m, v)));
    let (m, mut v) = good();
    v.w[[1, 2]] = -1e-12;
    let err = restore((m, v)).unwrap_err();
    assert_eq!(
        err,
        OptimizerStateError::InvalidMoment {
            moment: "second",
            weights: "W",
            index: s.m + 2,
            value: "-0.000000000001".into()
        }
    );
    assert!(err.to_string().contains("second moment of W"), "{err}");
    for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
        let (mut m, v) = good();
        m.v[[0, 1]] = bad;
        assert!(
            matches!(
                restore((m, v)),
                Err(OptimizerStateError::InvalidMoment { moment: "first", weights: "V", index: 1, .. })
            ),
            "first moment {bad}"
        );
        let (m, mut v) = good();
        v.v[[2, 0]] = bad;
        assert!(
            matches!(
                restore((m, v)),
                Err(OptimizerStateError::InvalidMoment { moment: "second", weights: "V", .. })
            ),
            "second moment {bad}"
        );
    }
    // Negative first moments and a negative zero second moment are reachable and harmless.
    let (mut m, mut v) = good();
    m.w[[0, 0]] = -3.0;
    v.w[[0, 0]] = -0.0;
    let mut o = restore((m, v)).unwrap();
    let mut p = Params::<f32>::zeros(&s);
    let mut g = Gradients::zeros(&s);
    g.w[[0, 0]] = 1.0;
    assert!(matches!(o.apply(&mut p, &g), UpdateOutcome::Applied { .. }));
    assert!(p.w.iter().all(|x| x.is_finite()));
}

/// The norm is taken in f64, so a finite f32 gradient far beyond `sqrt(f32::MAX)` used to pass:
/// Adam's `g²` overflowed to `v = +∞` (the weight frozen for good), SGD's `lr·g` to an infinite
/// weight. Such an update is now refused like a non-finite one.
#[test]
fn f32_gradient_too_large_for_the_update_changes_nothing() {
    let bound = max_update_norm::<f32>();
    assert!((bound - 0.5 * f64::from(f32::MAX).sqrt()).abs() <= 1.0);
    for (kind, lr, big) in [(OptimizerKind::Adam, 0.1, 1e21f32), (OptimizerKind::Sgd, 10.0, 1e38)] {
        let s =
            ModelConfig { vocab_size: 3, hidden: 2, optimizer: kind, lr, clip: 0.0, ..Default::default() }
                .check()
                .unwrap();
        let mut p = Params::<f32>::init(&s);
        let before = p.clone();
        let mut g = Gradients::zeros(&s);
        g.w[[0, 1]] = big;
        let mut o = Optimizer::new(&s);
        let o_before = o.clone();
        assert_eq!(o.apply(&mut p, &g), UpdateOutcome::NonFinite, "{kind:?}");
        assert_eq!((&p, &o), (&before, &o_before), "{kind:?}");
        // The next ordinary gradient moves the weight: nothing was poisoned.
        g.w[[0, 1]] = 1.0;
        assert!(matches!(o.apply(&mut p, &g), UpdateOutcome::Applied { .. }));
        assert!(p.w[[0, 1]] < before.w[[0, 1]], "{kind:?}: the weight must still learn");
        assert!(p.w.iter().all(|x| x.is_finite()), "{kind:?}");
    }
    // Just below the bound an Adam update stays finite, moments included.
    let s = spec(OptimizerKind::Adam, 0.0);
    let (mut p, mut g, mut o) = (Params::<f32>::init(&s), Gradients::zeros(&s), Optimizer::new(&s));
    g.w[[0, 1]] = (0.999 * bound) as f32;
    assert!(matches!(o.apply(&mut p, &g), UpdateOutcome::Applied { .. }));
    let v = o.v.as_ref().unwrap();
    assert!(p.w.iter().chain(v.w.iter()).all(|x| x.is_finite()));
    // With clipping the applied gradient is bounded by the clip: the same gradient is applied.
    let s = spec(OptimizerKind::Adam, 1.0);
    let (mut p, mut g, mut o) = (Params::<f32>::init(&s), Gradients::zeros(&s), Optimizer::new(&s));
    g.w[[0, 1]] = 1e21;
    assert_eq!(o.apply(&mut p, &g), UpdateOutcome::Applied { grad_norm: f64::from(1e21f32), clipped: true });
    assert!(o.v.as_ref().unwrap().w.iter().all(|x| x.is_finite()));
}

/// Above `CHUNK` weights the norm and the Adam pass run chunked on the pool; the result must
/// be bit-identical to the sequential pass, with clipping active so that the norm matters.
#[test]
fn parallel_adam_with_clipping_is_bit_identical_to_sequential() {
    let s = ModelConfig {
        vocab_size: 64,
        hidden: 128,
        optimizer: OptimizerKind::Adam,
        lr: 0.01,
        clip: 0.5,
        ..Default::default()
    }
    .check()
    .unwrap();
    let mut rng = crate::core::rng::CounterRng::new(17);
    let mut grads = Vec::new();
    for _ in 0..3 {
        let mut g = Gradients::<f32>::zeros(&s);
        g.w.iter_mut().chain(g.v.iter_mut()).for_each(|x| *x = rng.normal() as f32);
        grads.push(g);
    }
    let run = |threads: usize| {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
        pool.install(|| {
            let mut p = Params::<f32>::init(&s);
            assert_eq!(parallel(p.w.len()), threads > 1, "W must take the pass under test");
            let mut o = Optimizer::new(&s);
            let outcomes: Vec<_> = grads.iter().map(|g| o.apply(&mut p, g)).collect();
            (p, o, outcomes)
        })
    };
    let (seq, par) = (run(1), run(4));
    assert!(seq.0.w.len() > CHUNK);
    assert!(seq.2.iter().all(|u| matches!(u, UpdateOutcome::Applied { clipped: true, .. })));
    let bits = |p: &Params<f32>, o: &Optimizer<f32>| -> Vec<u32> {
        let (m, v) = (o.m.as_ref().unwrap(), o.v.as_ref().unwrap());
        [&p.w, &p.v, &m.w, &m.v, &v.w, &v.v].iter().flat_map(|a| a.iter().map(|x| x.to_bits())).collect()
    };
    assert_eq!(seq.2, par.2, "norms");
    assert!(bits(&seq.0, &seq.1) == bits(&par.0, &par.1), "weights or moments differ");
}

/// Adam's moments must be built from the clipped gradient, not the raw one (the first step's
/// weight change is ±lr either way, so only the moments and the second step tell).
#[test]
fn adam_moments_are_built_from_the_clipped_gradient() {
    let s = spec(OptimizerKind::Adam, 1.0);
    let mut p = Params::<f64>::zeros(&s);
    let mut o = Optimizer::new(&s);
    let mut g = Gradients::zeros(&s);
    g.w[[0, 0]] = 3.0;
    g.v[[0, 0]] = 4.0;
    assert_eq!(o.apply(&mut p, &g), UpdateOutcome::Applied { grad_norm: 5.0, clipped: true });
    let close = |got: f64, want: f64| assert!((got - want).abs() <= 1e-14 * want.abs(), "{got} vs {want}");
    let (m, v) = (o.m.clone().unwrap(), o.v.clone().unwrap());
    close(m.w[[0, 0]], 0.1 * 0.6);
    close(m.v[[0, 0]], 0.1 * 0.8);
    close(v.w[[0, 0]], 0.001 * 0.36);
    close(v.v[[0, 0]], 0.001 * 0.64);
    // A second gradient inside the clip is used as it is.
    g.w[[0, 0]] = -0.3;
    g.v[[0, 0]] = 0.0;
    assert_eq!(o.apply(&mut p, &g), UpdateOutcome::Applied { grad_norm: 0.3, clipped: false });
    let m2 = 0.9 * 0.06 + 0.1 * -0.3;
    let v2 = 0.999 * 0.00036 + 0.001 * 0.09;
    close(o.m.as_ref().unwrap().w[[0, 0]], m2);
    close(o.v.as_ref().unwrap().w[[0, 0]], v2);
    let (bc1, bc2) = (1.0 - 0.9f64.powi(2), 1.0 - 0.999f64.powi(2));
    let step1 = 0.1 * 0.6 / (0.6 + 1e-8);
    let step2 = 0.1 / bc1 * m2 / (v2.sqrt() / bc2.sqrt() + 1e-8);
    close(p.w[[0, 0]], -step1 - step2);
}

#[test]
fn non_finite_gradient_changes_nothing() {
    for kind in [OptimizerKind::Adam, OptimizerKind::Sgd] {
        let s = spec(kind, 1.0);
        let mut p = Params::<f32>::init(&s);
        let before = p.clone();
        let mut g = Gradients::zeros(&s);
        g.w[[0, 0]] = 1.0;
        g.v[[0, 0]] = f32::NAN;
        let mut o = Optimizer::new(&s);
        let o_before = o.clone();
        assert_eq!(o.apply(&mut p, &g), UpdateOutcome::NonFinite);
        assert_eq!(p, before);
        assert_eq!(o, o_before);
    }
}
