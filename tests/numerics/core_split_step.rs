//! A step split in two (`step_states`, then `advance_learner`), as the server runs it to answer
//! before the learner's update: what a reply reads at the split (every slot's prediction) is what
//! it would read after the whole step, for every cell and learner, and the pending half is
//! tracked (an empty batch leaves nothing pending; scoring with a half pending is refused).
//! `step` itself is the two halves, so the weights, states and factors after the split step are
//! compared with `step`'s only as a guard against the two drifting apart; the learners' exact
//! oracles (`core_kf_rtrl.rs`, `core_exact_gradients.rs`) check the step's numbers.

use kfrtrl::core::{CellKind, LearnerKind, ModelConfig, ModelSpec, Optimizer, Params, SlotStep, StreamSet};

fn spec(cell: CellKind, learner: LearnerKind) -> ModelSpec {
    ModelConfig {
        vocab_size: 11,
        cell,
        hidden: 9,
        learner,
        tbptt_window: 3,
        seed: 5,
        ..ModelConfig::default()
    }
    .check()
    .unwrap()
}

/// Batch `t` of a schedule with missing slots, empty batches, resets and inputs that do not learn.
fn inputs(t: u32, batch: usize) -> Vec<SlotStep> {
    if t % 7 == 6 {
        return Vec::new();
    }
    (0..batch)
        .filter(|b| !(t as usize + b).is_multiple_of(5))
        .map(|b| SlotStep {
            slot: b,
            token: (t * 7 + b as u32 * 3) % 11,
            learn: t % 4 != 2,
            reset: (t as usize + 2 * b).is_multiple_of(9),
        })
        .collect()
}

fn probs(set: &StreamSet<f64>, params: &Params<f64>, slot: usize) -> Vec<u64> {
    let mut p = vec![0.0; 11];
    set.predict(params, slot, &mut p);
    p.iter().map(|x| x.to_bits()).collect()
}

#[test]
fn split_step_is_the_same_step() {
    let batch = 4;
    for cell in CellKind::ALL {
        for learner in [LearnerKind::KfRtrl, LearnerKind::Uoro, LearnerKind::Rtrl, LearnerKind::Tbptt] {
            let spec = spec(cell, learner);
            let (mut p_whole, mut p_split) = (Params::<f64>::init(&spec), Params::<f64>::init(&spec));
            let (mut o_whole, mut o_split) = (Optimizer::new(&spec), Optimizer::new(&spec));
            let (mut whole, mut split) =
                (StreamSet::<f64>::new(&spec, batch), StreamSet::<f64>::new(&spec, batch));
            let (mut l_whole, mut l_split) = (vec![0.0; batch], vec![0.0; batch]);
            for t in 0..30 {
                let x = inputs(t, batch);
                let r_whole = whole.step(&mut p_whole, &mut o_whole, &x, &mut l_whole).unwrap();
                let r_split = split.step_states(&mut p_split, &mut o_split, &x, &mut l_split).unwrap();
                assert_eq!(split.learner_pending(), !x.is_empty(), "{cell} {learner} t={t}");
                // What a reply reads at the split is what it would read after the whole step.
                for b in 0..batch {
                    assert_eq!(
                        probs(&split, &p_split, b),
                        probs(&whole, &p_whole, b),
                        "{cell} {learner} t={t}"
                    );
                }
                split.advance_learner(&p_split, &x);
                assert!(!split.learner_pending());
                assert_eq!(r_whole, r_split, "{cell} {learner} t={t}");
                assert_eq!(l_whole, l_split, "{cell} {learner} t={t}");
                assert!(p_whole == p_split, "{cell} {learner} t={t}: weights differ");
                for b in 0..batch {
                    assert!(
                        whole.export_slot(b) == split.export_slot(b),
                        "{cell} {learner} t={t}: slot {b} differs"
                    );
                }
            }
        }
    }
}

#[test]
#[should_panic(expected = "advance_learner first")]
fn scoring_with_the_learner_half_pending_is_refused() {
    let spec = spec(CellKind::Rhn, LearnerKind::KfRtrl);
    let mut params = Params::<f64>::init(&spec);
    let mut opt = Optimizer::new(&spec);
    let mut set = StreamSet::<f64>::new(&spec, 2);
    let mut losses = vec![0.0; 2];
    let x = [SlotStep::learn(0, 1), SlotStep::learn(1, 2)];
    set.step_states(&mut params, &mut opt, &x, &mut losses).unwrap();
    set.score(&params, &x, &mut losses).unwrap();
}

#[test]
fn advance_learner_without_a_pending_advance_changes_nothing() {
    let spec = spec(CellKind::Lstm, LearnerKind::KfRtrl);
    let mut params = Params::<f64>::init(&spec);
    let mut opt = Optimizer::new(&spec);
    let mut set = StreamSet::<f64>::new(&spec, 2);
    let mut losses = vec![0.0; 2];
    let x = [SlotStep::learn(0, 1), SlotStep::learn(1, 2)];
    set.step(&mut params, &mut opt, &x, &mut losses).unwrap();
    let before = (set.export_slot(0), set.export_slot(1));
    set.advance_learner(&params, &x);
    assert!(before == (set.export_slot(0), set.export_slot(1)));
}
