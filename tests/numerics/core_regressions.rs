//! Regression tests, each named after the bug it pins down.

use kfrtrl::core::{
    CellKind, LearnerKind, ModelConfig, Optimizer, OptimizerKind, Params, SlotStep, StreamSet,
};

/// A token scored with `learn: false` at a TBPTT window boundary used to skip the learner
/// entirely, so the window was never flushed and its learned losses were silently dropped.
#[test]
fn tbptt_window_survives_a_predict_only_token_at_its_boundary() {
    let spec = ModelConfig {
        vocab_size: 5,
        cell: CellKind::Rhn,
        hidden: 4,
        learner: LearnerKind::Tbptt,
        tbptt_window: 3,
        init_std: 0.5,
        ..ModelConfig::default()
    }
    .check()
    .unwrap();
    let params = Params::<f64>::init(&spec);
    let tokens = [1u32, 3, 0, 4, 2, 2, 1];
    let run = |boundary_learns: bool| {
        let mut set = StreamSet::<f64>::new(&spec, 1);
        let mut loss = [0.0];
        let mut out = Vec::new();
        for (t, &tok) in tokens.iter().enumerate() {
            // Token index 3 is scored after the window's third advance: the flush point.
            let learn = t != 3 || boundary_learns;
            let x = [SlotStep { slot: 0, token: tok, learn, reset: false }];
            let c = set.score(&params, &x, &mut loss).unwrap();
            out.push((c, set.gradients().w.clone()));
            set.advance(&params, &x).unwrap();
        }
        out
    };
    let all = run(true);
    let partial = run(false);
    // With every token learning, the flush averages 3 losses; without the boundary token, 2.
    assert_eq!(all[3].0, 3.0);
    assert_eq!(partial[3].0, 2.0, "the window's two learned losses must still be flushed");
    let norm = partial[3].1.iter().map(|x| x * x).sum::<f64>().sqrt();
    assert!(norm > 1e-6, "flushed gradient is zero ({norm})");
    // The next window is unaffected by the predict-only token.
    assert_eq!(all[6].0, partial[6].0);
}

fn spec_of(cell: CellKind, learner: LearnerKind, hidden: usize, window: usize) -> kfrtrl::core::ModelSpec {
    ModelConfig {
        vocab_size: 5,
        cell,
        hidden,
        learner,
        tbptt_window: window,
        init_std: 0.5,
        ..ModelConfig::default()
    }
    .check()
    .unwrap()
}

fn kron(set: &StreamSet<f64>, slot: usize) -> ndarray::Array2<f64> {
    let spec = set.spec().clone();
    match set.learner() {
        kfrtrl::core::Learner::KfRtrl(kf) => {
            let (u, a) = kf.factors(slot, &spec);
            kfrtrl::core::learner::reference::kron_influence(&u, &a)
        }
        _ => unreachable!("a KF-RTRL set"),
    }
}

/// Signs used to be keyed by the stream's position, which a reset rewinds: every sequence of a
/// slot then replayed the same sign path, turning the estimator's noise into a fixed bias.
#[test]
fn kf_rtrl_draws_new_signs_after_a_reset() {
    let spec = spec_of(CellKind::Tanh, LearnerKind::KfRtrl, 4, 25);
    let params = Params::<f64>::init(&spec);
    let mut set = StreamSet::<f64>::new(&spec, 1);
    let tokens = [1u32, 3, 0, 4, 2, 2, 1, 0, 3, 3, 4, 1, 0, 2, 4, 4, 1, 3, 2, 0];
    let run = |set: &mut StreamSet<f64>| {
        set.reset(&params, 0);
        for &t in &tokens {
            set.advance(&params, &[SlotStep::learn(0, t)]).unwrap();
        }
        kron(set, 0)
    };
    let first = run(&mut set);
    assert_eq!(set.sign_counter(0), tokens.len() as u64);
    let second = run(&mut set);
    assert_eq!(set.sign_counter(0), 2 * tokens.len() as u64, "a reset must not rewind the sign counter");
    let diff = (&first - &second).mapv(f64::abs).sum();
    // The same states with different signs: the estimates differ (a repeat has chance 2^-19).
    assert!(diff > 1e-9, "the second sequence replayed the first one's signs ({diff})");
}

/// TBPTT used to drop the losses of an unfinished window at a reset, so sequences shorter than
/// the window never trained the recurrent weights.
#[test]
fn tbptt_flushes_its_window_at_a_reset() {
    let tokens = [1u32, 3, 0, 4, 2];
    let window_run = {
        // Window 4: the fifth token closes it (4 advances, 4 scored losses).
        let spec = spec_of(CellKind::Rhn, LearnerKind::Tbptt, 4, 4);
        let params = Params::<f64>::init(&spec);
        let mut set = StreamSet::<f64>::new(&spec, 1);
        let mut loss = [0.0];
        let mut last = (0.0, ndarray::Array2::zeros((0, 0)));
        for &t in &tokens {
            let x = [SlotStep::learn(0, t)];
            let c = set.score(&params, &x, &mut loss).unwrap();
            last = (c, set.gradients().w.mapv(|g| g * c));
            set.advance(&params, &x).unwrap();
        }
        last
    };
    // Window 25 and a reset on the sixth token: the reset flushes the same 4 losses, and the
    // reset token itself is scored from the zero state (a readout-only contribution).
    let spec = spec_of(CellKind::Rhn, LearnerKind::Tbptt, 4, 25);
    let params = Params::<f64>::init(&spec);
    let mut set = StreamSet::<f64>::new(&spec, 1);
    let mut loss = [0.0];
    for &t in &tokens {
        let x = [SlotStep::learn(0, t)];
        set.score(&params, &x, &mut loss).unwrap();
        set.advance(&params, &x).unwrap();
    }
    let x = [SlotStep { slot: 0, token: 3, learn: true, reset: true }];
    let c = set.score(&params, &x, &mut loss).unwrap();
    assert_eq!(window_run.0, 4.0);
    assert_eq!(c, 5.0, "4 flushed losses and the reset token's own");
    let flushed = set.gradients().w.mapv(|g| g * c);
    let err = (&flushed - &window_run.1).mapv(f64::abs).sum() / window_run.1.mapv(f64::abs).sum();
    assert!(err < 1e-12, "flush at reset differs from a closed window: {err:e}");
}

/// The public `StreamSet::reset` (the engine's on closing a stream) zeroed the slot without the
/// `finish_sequence` of the resets inside `score` and `advance`, dropping the losses TBPTT's
/// window had scored. It now carries them into the next update, exactly as a reset in `score`
/// does, or applies them at once with `apply_carried`.
#[test]
fn tbptt_public_reset_carries_the_scored_window() {
    let spec = spec_of(CellKind::Rhn, LearnerKind::Tbptt, 4, 25);
    let params = Params::<f64>::init(&spec);
    let warmed = || {
        let mut set = StreamSet::<f64>::new(&spec, 1);
        for &t in &[1u32, 3, 0, 4, 2] {
            let x = [SlotStep::learn(0, t)];
            set.score(&params, &x, &mut [0.0]).unwrap();
            set.advance(&params, &x).unwrap();
        }
        set
    };
    let bits = |set: &StreamSet<f64>| -> Vec<u64> {
        let g = set.gradients();
        g.w.iter().chain(g.v.iter()).map(|x| x.to_bits()).collect()
    };
    // Reference: the reset inside `score` flushes the 4 scored losses with the token's own.
    let mut reference = warmed();
    let c_ref = reference
        .score(&params, &[SlotStep { slot: 0, token: 3, learn: true, reset: true }], &mut [0.0])
        .unwrap();
    assert_eq!(c_ref, 5.0);

    let mut set = warmed();
    set.reset(&params, 0);
    assert_eq!((set.position(0), set.carried()), (0, 4.0), "the 4 scored losses are carried");
    let c = set.score(&params, &[SlotStep::learn(0, 3)], &mut [0.0]).unwrap();
    assert_eq!(c, c_ref, "the next score counts the carried losses");
    assert_eq!(set.carried(), 0.0);
    assert!(bits(&set) == bits(&reference), "the gradient differs from the reset inside score");
    assert!(set.gradients().w.iter().any(|&g| g != 0.0), "the recurrent weights get the window's gradient");

    // Applied at once: the same update as the window's 4 losses averaged by a score.
    let spec_sgd =
        ModelConfig { optimizer: OptimizerKind::Sgd, lr: 0.1, ..spec.config.clone() }.check().unwrap();
    let mut reference = warmed();
    let x = [SlotStep { slot: 0, token: 3, learn: false, reset: true }];
    assert_eq!(reference.score(&params, &x, &mut [0.0]).unwrap(), 4.0);
    let (mut p_ref, mut opt_ref) = (params.clone(), Optimizer::new(&spec_sgd));
    let expected = opt_ref.apply(&mut p_ref, reference.gradients());
    let mut set = warmed();
    set.reset(&params, 0);
    let (mut p, mut opt) = (params.clone(), Optimizer::new(&spec_sgd));
    assert_eq!(set.apply_carried(&mut p, &mut opt), Some(expected));
    assert_eq!((set.carried(), set.apply_carried(&mut p, &mut opt)), (0.0, None));
    assert!(p == p_ref && p != params, "apply_carried must apply the window's averaged gradient");
    // A slot that moves elsewhere (eviction) carries nothing: its window travels with it.
    let mut set = warmed();
    set.vacate(0);
    assert_eq!((set.position(0), set.carried()), (0, 0.0));
}

/// TBPTT used to drop its unfinished window at a reset inside `advance` (only `score` flushed
/// it), so in the copy task, which advances the inputs and then scores the targets, TBPTT with
/// resets never trained its recurrent weights (L = 1 at 2M steps).
#[test]
fn tbptt_carries_its_window_across_a_reset_inside_advance() {
    let inputs = [1u32, 3, 0, 4];
    let targets = [2u32, 2, 1, 0];
    let spec_window = |window| spec_of(CellKind::Lstm, LearnerKind::Tbptt, 4, window);
    let sums =
        |set: &StreamSet<f64>, c: f64| (set.gradients().w.mapv(|g| g * c), set.gradients().v.mapv(|g| g * c));
    // Reference 1: advance x_t, score y_t; window 4 closes at the fourth score with these 4 losses.
    let closed = {
        let spec = spec_window(4);
        let params = Params::<f64>::init(&spec);
        let mut set = StreamSet::<f64>::new(&spec, 1);
        let mut loss = [0.0];
        let mut c = 0.0;
        for (&x, &y) in inputs.iter().zip(&targets) {
            set.advance(&params, &[SlotStep::learn(0, x)]).unwrap();
            c = set.score(&params, &[SlotStep::learn(0, y)], &mut loss).unwrap();
        }
        assert_eq!(c, 4.0);
        sums(&set, c)
    };
    // Reference 2: a slot scored at the start of its sequence (a readout-only contribution).
    let spec = spec_window(25);
    let params = Params::<f64>::init(&spec);
    let readout_only = {
        let mut set = StreamSet::<f64>::new(&spec, 2);
        let c = set.score(&params, &[SlotStep::learn(1, 4)], &mut [0.0]).unwrap();
        assert_eq!(c, 1.0);
        sums(&set, c)
    };
    // Window 25: slot 0 starts a new sequence (a reset inside advance) before its window is full,
    // right after a score whose own (already applied) gradient is not zero: slot 1's readout.
    let mut set = StreamSet::<f64>::new(&spec, 2);
    let mut losses = [0.0; 2];
    for (t, (&x, &y)) in inputs.iter().zip(&targets).enumerate() {
        set.advance(&params, &[SlotStep::learn(0, x)]).unwrap();
        let scored = if t == 3 {
            vec![SlotStep::learn(0, y), SlotStep::learn(1, 1)]
        } else {
            vec![SlotStep::learn(0, y)]
        };
        let c = set.score(&params, &scored, &mut losses).unwrap();
        assert_eq!(c, if t == 3 { 1.0 } else { 0.0 }, "t={t}");
    }
    set.advance(&params, &[SlotStep { slot: 0, token: 2, learn: true, reset: true }]).unwrap();
    assert_eq!(set.position(0), 1);
    // The next score counts the 4 carried losses with its own (slot 0's is the first entry of its
    // new window; slot 1's is a readout contribution), averaged once.
    let c = set.score(&params, &[SlotStep::learn(0, 3), SlotStep::learn(1, 4)], &mut losses).unwrap();
    assert_eq!(c, 5.0, "the 4 losses of the window cut by the reset and slot 1's");
    let (w, v) = sums(&set, c);
    let (want_w, want_v) = (&closed.0 + &readout_only.0, &closed.1 + &readout_only.1);
    let rel = |a: &ndarray::Array2<f64>, b: &ndarray::Array2<f64>| {
        (a - b).mapv(f64::abs).sum() / b.mapv(f64::abs).sum()
    };
    assert!(rel(&w, &want_w) < 1e-12, "recurrent gradient: {:e}", rel(&w, &want_w));
    assert!(rel(&v, &want_v) < 1e-12, "readout gradient: {:e}", rel(&v, &want_v));
    // Counted once: the next score starts from a clean gradient.
    set.advance(&params, &[SlotStep::learn(0, 1)]).unwrap();
    assert_eq!(set.score(&params, &[SlotStep::learn(0, 0)], &mut losses).unwrap(), 0.0);
}

/// The production compression (not only the dense reference) has the paper's one-step mean
/// and variance: two copies of one stream, advanced with opposite forced signs.
#[test]
fn production_compression_has_the_one_step_mean_and_variance() {
    use kfrtrl::core::learner::reference::{kron_influence, step_terms};
    for cell in CellKind::ALL {
        let spec = spec_of(cell, LearnerKind::KfRtrl, 3, 25);
        let params = Params::<f64>::init(&spec);
        let mut set = StreamSet::<f64>::new(&spec, 2);
        for (i, &t) in [2u32, 0, 4, 1].iter().enumerate() {
            if let kfrtrl::core::Learner::KfRtrl(kf) = set.learner_mut() {
                kf.force_sign(0, Some(if i % 2 == 0 { 1.0 } else { -1.0 }));
            }
            set.advance(&params, &[SlotStep::learn(0, t)]).unwrap();
        }
        set.copy_slot(0, 1);
        let prev = set.state(0).to_vec();
        let g_prev = kron(&set, 0);
        let (u_prev, a_prev) = match set.learner() {
            kfrtrl::core::Learner::KfRtrl(kf) => kf.factors(0, &spec),
            _ => unreachable!(),
        };
        if let kfrtrl::core::Learner::KfRtrl(kf) = set.learner_mut() {
            kf.force_sign(0, Some(1.0));
            kf.force_sign(1, Some(-1.0));
        }
        let token = 3;
        set.advance(&params, &[SlotStep::learn(0, token), SlotStep::learn(1, token)]).unwrap();
        let terms = step_terms(&spec, &params, &prev, token);
        let b = terms.h.dot(&a_prev);
        let target = kron_influence(&u_prev, &b) + kron_influence(&terms.a, &terms.d);
        let (plus, minus) = (kron(&set, 0), kron(&set, 1));
        let mean = (&plus + &minus) / 2.0;
        let rel = (&mean - &target).mapv(|x| x * x).sum().sqrt() / target.mapv(|x| x * x).sum().sqrt();
        assert!(rel < 1e-12, "{cell}: mean of the two outcomes is off by {rel:e}");
        let var = ((&plus - &mean).mapv(|x| x * x).sum() + (&minus - &mean).mapv(|x| x * x).sum()) / 2.0;
        let norm = |x: &ndarray::Array2<f64>| x.mapv(|v| v * v).sum().sqrt();
        let norm1 = |x: &ndarray::Array1<f64>| x.dot(x).sqrt();
        let formula = 2.0 * norm1(&u_prev) * norm(&terms.d) * norm1(&terms.a) * norm(&b)
            + 2.0 * u_prev.dot(&terms.a) * (&b * &terms.d).sum();
        assert!(
            (var - formula).abs() <= 1e-12 * formula.abs(),
            "{cell}: variance {var} vs formula {formula}"
        );
        assert!(g_prev.iter().any(|&x| x != 0.0));
    }
}

/// `copy_slot` moves everything a stream owns: both copies then evolve identically.
#[test]
fn copied_slots_evolve_identically_for_every_learner() {
    for cell in CellKind::ALL {
        for learner in [LearnerKind::KfRtrl, LearnerKind::Uoro, LearnerKind::Rtrl, LearnerKind::Tbptt] {
            let spec = spec_of(cell, learner, 3, 3);
            let mut params = Params::<f64>::init(&spec);
            let mut opt = kfrtrl::core::Optimizer::new(&spec);
            let mut set = StreamSet::<f64>::new(&spec, 3);
            let mut losses = [0.0; 3];
            for &t in &[1u32, 4, 0, 2, 2] {
                set.step(&mut params, &mut opt, &[SlotStep::learn(0, t)], &mut losses).unwrap();
            }
            set.copy_slot(0, 2);
            // Step the original and the copy in separate batches with frozen weights.
            let frozen = params.clone();
            let mut grads = Vec::new();
            for slot in [0, 2] {
                for &t in &[3u32, 1, 4, 4] {
                    let x = [SlotStep::learn(slot, t)];
                    let c = set.score(&frozen, &x, &mut losses).unwrap();
                    grads.push((c, set.gradients().clone()));
                    set.advance(&frozen, &x).unwrap();
                }
            }
            assert_eq!(set.state(0), set.state(2), "{cell} {learner}: states");
            assert_eq!(set.position(0), set.position(2));
            assert_eq!(grads[..4], grads[4..], "{cell} {learner}: gradients");
        }
    }
}

/// `advance` alone honours `reset` (it used to ignore it when `score` was not called).
#[test]
fn advance_alone_applies_a_reset() {
    let spec = spec_of(CellKind::Lstm, LearnerKind::KfRtrl, 3, 25);
    let params = Params::<f64>::init(&spec);
    let mut a = StreamSet::<f64>::new(&spec, 1);
    let mut b = StreamSet::<f64>::new(&spec, 1);
    for &t in &[1u32, 2, 3] {
        a.advance(&params, &[SlotStep::learn(0, t)]).unwrap();
    }
    a.advance(&params, &[SlotStep { slot: 0, token: 4, learn: true, reset: true }]).unwrap();
    b.advance(&params, &[SlotStep::learn(0, 4)]).unwrap();
    assert_eq!(a.state(0), b.state(0));
    assert_eq!(a.position(0), 1);
}

/// The exact zero-factor branches of the compression (KF-RTRL.md §8) on a saturated step:
/// a tanh unit at exactly ±1 has `D = 0` and `B = 0` (both terms vanish: the factors become 0,
/// never 0/0), and an RHN whose carry gates are exactly 1 has `D = 0` but `B = A` (the old term
/// is kept exactly). A mutation that confused the two branches produced NaN here.
#[test]
fn saturated_steps_take_the_exact_zero_branches() {
    for (cell, expect_zero) in [(CellKind::Tanh, true), (CellKind::Rhn, false)] {
        let spec = spec_of(cell, LearnerKind::KfRtrl, 3, 25);
        let mut params = Params::<f64>::init(&spec);
        // Token 4 drives every pre-activation to +200: tanh(200) and σ(200) are exactly 1.
        params.w.column_mut(4).fill(200.0);
        let mut set = StreamSet::<f64>::new(&spec, 1);
        for &t in &[1u32, 2, 3] {
            set.advance(&params, &[SlotStep::learn(0, t)]).unwrap();
        }
        let before = kron(&set, 0);
        assert!(before.iter().any(|&x| x != 0.0));
        set.advance(&params, &[SlotStep::learn(0, 4)]).unwrap();
        let after = kron(&set, 0);
        assert!(after.iter().all(|x| x.is_finite()), "{cell}: non-finite factors");
        if expect_zero {
            assert!(
                after.iter().all(|&x| x == 0.0),
                "{cell}: a fully saturated tanh step must zero the influence"
            );
        } else {
            // H = diag(f) = I and D = 0: the influence is carried over unchanged.
            let rel = (&after - &before).mapv(f64::abs).sum() / before.mapv(f64::abs).sum();
            assert!(rel < 1e-14, "{cell}: carried influence changed by {rel:e}");
        }
    }
}
