//! Updates that wait for enough tokens or steps (`tokens_per_update`, `update_unit`,
//! `core::pending`): the weights move only once the accumulated gradients reach the count, by the
//! optimizer's step on their average, weighted by each step's tokens (or equally, counting
//! steps); a non-finite step is refused without touching the sum; a saved sum is checked when
//! restored.

use kfrtrl::core::model::UpdateUnit;
use kfrtrl::core::optim::UpdateOutcome;
use kfrtrl::core::{
    CellKind, Gradients, LearnerKind, ModelConfig, Optimizer, OptimizerKind, Params, SlotStep, StreamSet,
};

fn config(tokens_per_update: usize) -> ModelConfig {
    ramped(tokens_per_update, 0)
}

fn ramped(tokens_per_update: usize, tokens_per_update_ramp: u64) -> ModelConfig {
    ramped_from(tokens_per_update, tokens_per_update_ramp, 1)
}

fn ramped_from(
    tokens_per_update: usize,
    tokens_per_update_ramp: u64,
    tokens_per_update_start: usize,
) -> ModelConfig {
    ModelConfig {
        vocab_size: 5,
        cell: CellKind::Rhn,
        hidden: 5,
        learner: LearnerKind::Ok,
        ok_rank: 2,
        optimizer: OptimizerKind::Adam,
        lr: 1e-2,
        clip: 1.0,
        seed: 4,
        init_std: 0.3,
        tokens_per_update,
        tokens_per_update_ramp,
        tokens_per_update_start,
        ..ModelConfig::default()
    }
}

/// The schedule against a hand-made accumulation: each step's averaged gradient times its
/// token count summed, averaged and applied by an every-step optimizer once 10 tokens are in.
/// Steps carry 1 to 3 learning tokens (a predict-only input adds none), so updates come at
/// irregular steps.
#[test]
fn updates_wait_for_enough_tokens_and_apply_their_average() {
    let applied = check_schedule(config(10), 40, |_| 10.0);
    assert!(applied.len() >= 4, "updates at {applied:?}");
}

/// With a ramp of 3 updates per level, update `n` waits for `min(6, 1 + n / 3)` tokens: the
/// first three at every step, then longer, up to 6 tokens.
#[test]
fn a_ramp_reaches_the_tokens_per_update_three_updates_per_level() {
    let applied = check_schedule(ramped(6, 3), 120, |n| 6f64.min(1.0 + (n / 3) as f64));
    assert_eq!(&applied[..3], &[0, 1, 2], "one token is due at first: every step updates");
    assert!(applied.len() > 20, "the ramp reached its end: updates at {applied:?}");
    let gaps: Vec<usize> = applied.windows(2).map(|w| w[1] - w[0]).collect();
    assert!(gaps[gaps.len() - 8..].iter().all(|&g| g >= 2), "6 tokens take 2 steps or more: {gaps:?}");
}

/// A ramp that starts at 3 tokens: update `n` waits for `min(7, 3 + n / 4)`.
#[test]
fn a_ramp_can_start_above_one_token() {
    let applied = check_schedule(ramped_from(7, 4, 3), 150, |n| 7f64.min(3.0 + (n / 4) as f64));
    assert!(applied.len() > 20, "the ramp reached its end: updates at {applied:?}");
    assert!(ramped_from(7, 4, 8).check().is_err(), "the start is at most the count");
    assert!(ramped_from(7, 4, 0).check().is_err());
}

/// Counting steps: each step's averaged gradient counts once, whatever its one or two learning
/// tokens, so that 5 per update come every 5 steps exactly, with the plain mean of the 5 steps'
/// gradients (a tokens count would weight the steps 1 or 2 and update at irregular steps).
#[test]
fn counting_steps_updates_every_k_steps_with_the_mean_of_their_gradients() {
    let cfg = ModelConfig { update_unit: UpdateUnit::Steps, ..config(5) };
    let applied = check_schedule(cfg, 40, |_| 5.0);
    assert_eq!(applied, vec![4, 9, 14, 19, 24, 29, 34, 39]);
    let by_tokens = check_schedule(config(5), 40, |_| 5.0);
    assert_ne!(by_tokens, applied, "tokens count the streams of a step");
}

/// A ramp counts steps too: update `n` waits for `min(7, 3 + n / 4)` steps.
#[test]
fn a_ramp_can_count_steps() {
    let cfg = ModelConfig { update_unit: UpdateUnit::Steps, ..ramped_from(7, 4, 3) };
    let applied = check_schedule(cfg, 150, |n| 7f64.min(3.0 + (n / 4) as f64));
    let gaps: Vec<usize> = applied.windows(2).map(|w| w[1] - w[0]).collect();
    assert_eq!(&gaps[..3], &[3, 3, 3], "three steps per update at first: {applied:?}");
    assert!(gaps[gaps.len() - 3..].iter().all(|&g| g == 7), "seven at the end: {gaps:?}");
}

/// Runs `steps` steps of three streams (1 to 3 learning tokens a step) with the configuration's
/// schedule beside an every-step optimizer fed the hand-made average once `due(updates)` tokens
/// (or steps, per the configuration's unit) are in; the weights and the pending count must agree
/// at every step. Returns the steps that updated.
fn check_schedule(cfg: ModelConfig, steps: usize, due: impl Fn(u64) -> f64) -> Vec<usize> {
    let spec = cfg.check().unwrap();
    let every_step = config(1).check().unwrap();
    let (mut params, mut opt) = (Params::<f64>::init(&spec), Optimizer::new(&spec));
    let (mut ref_params, mut ref_opt) = (params.clone(), Optimizer::<f64>::new(&every_step));
    let mut set = StreamSet::<f64>::new(&spec, 3);
    let mut reference = set.clone();
    let (mut sum, mut count) = (Gradients::<f64>::zeros(&spec), 0.0);
    let mut losses = [0.0; 3];
    let mut applied_at = Vec::new();
    for t in 0..steps {
        let width = 1 + t % 3;
        let steps: Vec<SlotStep> = (0..width)
            .map(|s| {
                let token = ((t * 7 + s * 3) % 5) as u32;
                if s == 2 {
                    SlotStep { slot: s, token, learn: false, reset: false }
                } else {
                    SlotStep::learn(s, token)
                }
            })
            .collect();
        let report = set.step(&mut params, &mut opt, &steps, &mut losses).unwrap();
        let c = reference.score(&ref_params, &steps, &mut losses).unwrap();
        if c > 0.0 {
            let weight = match cfg.update_unit {
                UpdateUnit::Tokens => c,
                UpdateUnit::Steps => 1.0,
            };
            sum.add_scaled(reference.gradients(), weight);
            count += weight;
        }
        if count > 0.0 && count >= due(applied_at.len() as u64) {
            sum.scale(1.0 / count);
            assert_eq!(ref_opt.apply(&mut ref_params, &sum), report.update.expect("an update is due"));
            sum.clear();
            count = 0.0;
            applied_at.push(t);
        } else {
            assert_eq!(
                report.update,
                None,
                "step {t}: no update before {} tokens",
                due(applied_at.len() as u64)
            );
        }
        reference.advance(&ref_params, &steps).unwrap();
        assert_eq!(params, ref_params, "step {t}");
        assert_eq!(opt.pending().unwrap().1, count, "step {t}");
        assert_eq!(opt.steps, applied_at.len() as u64, "step {t}");
    }
    applied_at
}

/// A step whose gradient is not finite, or too large, is refused on its own: the tokens summed before it stay,
/// and the update comes when enough finite tokens are in.
#[test]
fn a_non_finite_step_is_refused_without_touching_the_pending_sum() {
    let spec = config(4).check().unwrap();
    let mut params = Params::<f64>::init(&spec);
    let before = params.clone();
    let mut opt = Optimizer::<f64>::new(&spec);
    let mut g = Gradients::<f64>::zeros(&spec);
    g.w.fill(0.01);
    assert_eq!(opt.step(&mut params, &g, 2.0), None);
    let mut bad = g.clone();
    bad.v[[0, 0]] = f64::NAN;
    assert_eq!(opt.step(&mut params, &bad, 1.0), Some(UpdateOutcome::NonFinite));
    assert_eq!(opt.pending().unwrap().1, 2.0);
    assert!(opt.pending().unwrap().0.norm().is_finite());
    assert_eq!(params, before, "nothing reached the weights");
    // Finite but too large for an update once clipped (the readout is never clipped here):
    // refused at its own step too, as an every-step model would refuse it.
    let mut huge = g.clone();
    huge.v.fill(2e153); // norm about 1.1e154: finite, above f64's max_update_norm (6.7e153)
    assert_eq!(opt.step(&mut params, &huge, 1.0), Some(UpdateOutcome::NonFinite));
    assert_eq!(opt.pending().unwrap().1, 2.0);
    assert!(matches!(opt.step(&mut params, &g, 2.0), Some(UpdateOutcome::Applied { .. })));
    assert_eq!(opt.pending().unwrap().1, 0.0);
    assert!(params.w.iter().all(|x| x.is_finite()) && params != before);
    assert_eq!(opt.step(&mut params, &g, 0.0), None, "no tokens, no update");
}

/// A restored sum must fit: its shape, finite values, a count below the period; a model that
/// updates at every step has none to restore.
#[test]
fn a_restored_pending_sum_is_checked() {
    let spec = config(4).check().unwrap();
    let mut opt = Optimizer::<f64>::new(&spec);
    let g = Gradients::<f64>::zeros(&spec);
    assert!(opt.restore_pending(g.clone(), 3.0).is_ok());
    assert!(opt.restore_pending(g.clone(), 4.0).is_err(), "a full sum would have been applied");
    assert!(opt.restore_pending(g.clone(), -1.0).is_err());
    let mut nan = g.clone();
    nan.w[[0, 0]] = f64::NAN;
    assert!(opt.restore_pending(nan, 1.0).is_err());
    let other = config(4);
    let small = ModelConfig { hidden: 3, ..other }.check().unwrap();
    assert!(opt.restore_pending(Gradients::zeros(&small), 1.0).is_err());
    let mut every_step = Optimizer::<f64>::new(&config(1).check().unwrap());
    assert!(every_step.restore_pending(g, 1.0).is_err());
    assert!(ModelConfig { tokens_per_update: 0, ..config(1) }.check().is_err());
}

/// With a ramp the count must be below what the next update waits for, which grows with the
/// updates already applied; a ramp needs more than one token per update to ramp to.
#[test]
fn a_restored_pending_sum_is_checked_against_the_ramp() {
    let spec = ramped(4, 10).check().unwrap();
    let g = Gradients::<f64>::zeros(&spec);
    let mut fresh = Optimizer::<f64>::new(&spec);
    assert!(fresh.restore_pending(g.clone(), 0.0).is_ok());
    assert!(fresh.restore_pending(g.clone(), 1.0).is_err(), "the first update waits for one token");
    let mut aged = Optimizer::<f64>::restore(&spec, 25, Some((g.clone(), g.clone()))).unwrap();
    assert!(aged.restore_pending(g.clone(), 2.0).is_ok());
    assert!(aged.restore_pending(g.clone(), 3.0).is_err(), "update 25 waits for 1 + 25 / 10 = 3");
    let mut done = Optimizer::<f64>::restore(&spec, 1000, Some((g.clone(), g.clone()))).unwrap();
    assert!(done.restore_pending(g, 3.0).is_ok(), "the ramp ends at 4");
    assert!(ramped(1, 10).check().is_err(), "nothing to ramp to");
    assert!(ramped(4, (1 << 32) + 1).check().is_err());
    assert!(ramped(4, 1 << 32).check().is_ok());
}
