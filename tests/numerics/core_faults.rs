//! A non-finite value in one stream costs that stream its learner state and nothing else: the
//! step's update is skipped with the weights and optimizer bit-identical, exactly the faulty slot
//! is reported and reset, the other slots carry on untouched, and the next step learns.

use kfrtrl::core::slot_state::names;
use kfrtrl::core::{
    CellKind, KfStrategy, Learner, LearnerKind, ModelConfig, ModelSpec, Optimizer, OptimizerKind, Params,
    SlotState, SlotStep, StreamSet, UpdateOutcome,
};

const CAPACITY: usize = 4;
const WINDOW: usize = 4;
const FAULTY: usize = 2;

#[derive(Debug, Clone, Copy, PartialEq)]
enum Variant {
    Kf(KfStrategy),
    Uoro,
    Rtrl,
    Tbptt,
    Frozen,
}

impl Variant {
    fn learner(self) -> LearnerKind {
        match self {
            Variant::Kf(_) => LearnerKind::KfRtrl,
            Variant::Uoro => LearnerKind::Uoro,
            Variant::Rtrl => LearnerKind::Rtrl,
            Variant::Tbptt => LearnerKind::Tbptt,
            Variant::Frozen => LearnerKind::Frozen,
        }
    }

    /// The learner tensor a fault is injected into, and the entry (from the end: the last rows
    /// of `A` and `G` belong to `h`, which the next gradient reads).
    fn factor(self) -> Option<(&'static str, usize)> {
        match self {
            Variant::Kf(_) => Some((names::KF_A, 3)),
            Variant::Uoro => Some((names::UORO_THETA, 5)),
            Variant::Rtrl => Some((names::RTRL_G, 7)),
            // The first readout error of a full window, backpropagated at the next score.
            Variant::Tbptt => Some((names::TBPTT_ERR, 1)),
            Variant::Frozen => None,
        }
    }
}

fn all_variants() -> Vec<(CellKind, Variant)> {
    let mut v = Vec::new();
    for cell in CellKind::ALL {
        for variant in
            [Variant::Kf(KfStrategy::Jacobian), Variant::Uoro, Variant::Rtrl, Variant::Tbptt, Variant::Frozen]
        {
            v.push((cell, variant));
        }
    }
    v.push((CellKind::Tanh, Variant::Kf(KfStrategy::Wide)));
    v
}

fn spec_for(cell: CellKind, variant: Variant) -> ModelSpec {
    ModelConfig {
        vocab_size: 7,
        cell,
        hidden: 5,
        learner: variant.learner(),
        tbptt_window: WINDOW,
        optimizer: OptimizerKind::Adam,
        lr: 0.05,
        clip: 0.0,
        seed: 5,
        init_std: 0.4,
        ..ModelConfig::default()
    }
    .check()
    .unwrap()
}

struct Run {
    spec: ModelSpec,
    params: Params<f32>,
    opt: Optimizer<f32>,
    set: StreamSet<f32>,
    losses: [f64; CAPACITY],
}

fn batch(t: usize, learn: bool) -> Vec<SlotStep> {
    (0..CAPACITY)
        .map(|b| SlotStep { slot: b, token: ((t * 3 + b * 5) % 7) as u32, learn, reset: false })
        .collect()
}

/// `WINDOW` learning steps of every slot: TBPTT's windows are then full, to be backpropagated at
/// the next score.
fn warmed_up(cell: CellKind, variant: Variant) -> Run {
    let spec = spec_for(cell, variant);
    let mut run = Run {
        params: Params::init(&spec),
        opt: Optimizer::new(&spec),
        set: StreamSet::new(&spec, CAPACITY),
        losses: [0.0; CAPACITY],
        spec,
    };
    if let (Variant::Kf(strategy), Learner::KfRtrl(kf)) = (variant, run.set.learner_mut()) {
        kf.set_strategy(&run.spec, strategy);
    }
    for t in 0..WINDOW {
        run.set.step(&mut run.params, &mut run.opt, &batch(t, true), &mut run.losses).unwrap();
    }
    run
}

fn inject(run: &mut Run, edit: impl FnOnce(&mut SlotState<f32>)) {
    let mut s = run.set.export_slot(FAULTY);
    edit(&mut s);
    run.set.import_slot(FAULTY, &s).unwrap();
}

fn bits(s: &SlotState<f32>) -> Vec<(String, Vec<u32>)> {
    s.tensors.iter().map(|(n, _, v)| (n.clone(), v.iter().map(|x| x.to_bits()).collect())).collect()
}

fn param_bits(p: &Params<f32>) -> Vec<u32> {
    p.w.iter().chain(p.v.iter()).map(|x| x.to_bits()).collect()
}

/// What every slot looks like after `inputs` are scored and advanced with fixed weights, from a
/// copy of the set with `reset_learner` slots' learner state reset first.
fn reference(run: &Run, inputs: &[SlotStep], reset_learner: &[usize]) -> Vec<Vec<(String, Vec<u32>)>> {
    let mut set = run.set.clone();
    for &slot in reset_learner {
        set.learner_mut().reset(slot);
    }
    let mut losses = [0.0; CAPACITY];
    set.score(&run.params, inputs, &mut losses).unwrap();
    set.advance(&run.params, inputs).unwrap();
    (0..CAPACITY).map(|b| bits(&set.export_slot(b))).collect()
}

fn exports(run: &Run) -> Vec<Vec<(String, Vec<u32>)>> {
    (0..CAPACITY).map(|b| bits(&run.set.export_slot(b))).collect()
}

fn assert_next_step_learns(run: &mut Run, what: &str) {
    let before = param_bits(&run.params);
    // TBPTT updates once its windows are full again.
    for t in 0..WINDOW {
        let report =
            run.set.step(&mut run.params, &mut run.opt, &batch(7 + t, true), &mut run.losses).unwrap();
        assert_eq!(report.faulted, 0, "{what}: next step {report:?}");
        assert!(run.set.last_faulted_slots().is_empty(), "{what}");
        assert_ne!(report.update, Some(UpdateOutcome::NonFinite), "{what}");
        if run.spec.learner() != LearnerKind::Tbptt {
            break;
        }
    }
    if run.spec.learner() != LearnerKind::Frozen {
        assert_ne!(param_bits(&run.params), before, "{what}: the next steps must learn");
    }
    assert!(run.params.all_finite(), "{what}");
}

/// Non-finite learner factors in one slot: the update is refused, exactly that slot is reported
/// and restarts its learner, the others advance as if nothing happened.
#[test]
fn non_finite_factors_cost_only_their_slot() {
    for bad in [f32::NAN, f32::INFINITY] {
        for (cell, variant) in all_variants() {
            let Some((tensor, entry)) = variant.factor() else { continue };
            let what = format!("{cell} {variant:?} {bad}");
            let mut run = warmed_up(cell, variant);
            inject(&mut run, |s| {
                let values = s.tensor_mut(tensor).unwrap();
                let at = if tensor == names::TBPTT_ERR { entry } else { values.len() - 1 - entry };
                values[at] = bad;
            });
            let (params_before, opt_before) = (param_bits(&run.params), run.opt.clone());
            let inputs = batch(5, true);
            let expected = reference(&run, &inputs, &[FAULTY]);

            let report = run.set.step(&mut run.params, &mut run.opt, &inputs, &mut run.losses).unwrap();
            assert_eq!(report.update, Some(UpdateOutcome::NonFinite), "{what}");
            assert_eq!((report.faulted, run.set.last_faulted_slots()), (1, &[FAULTY][..]), "{what}");
            assert!(run.set.last_restarted_slots().is_empty(), "{what}: the cell state was finite");
            assert_eq!(param_bits(&run.params), params_before, "{what}: weights");
            assert_eq!(run.opt, opt_before, "{what}: optimizer");
            assert_eq!(exports(&run), expected, "{what}: slot states after the step");
            assert_eq!(run.set.position(FAULTY), WINDOW as u64 + 1, "{what}: the stream keeps its position");
            assert_next_step_learns(&mut run, &what);
        }
    }
}

/// A slot whose cell state is not finite has a non-finite loss; it restarts from the start of a
/// sequence, whether or not its token learns. A predict-only fault leaves the update of the
/// others exactly as if the faulty slot had not been in the batch.
#[test]
fn a_non_finite_state_restarts_its_stream() {
    for (cell, variant) in all_variants() {
        for learn in [true, false] {
            let what = format!("{cell} {variant:?} learn={learn}");
            let mut run = warmed_up(cell, variant);
            inject(&mut run, |s| s.tensor_mut(names::STATE).unwrap()[cell.state_blocks() * 5 - 1] = f32::NAN);
            let mut inputs = batch(5, true);
            inputs[FAULTY].learn = learn;

            let mut without = Run {
                spec: run.spec.clone(),
                params: run.params.clone(),
                opt: run.opt.clone(),
                set: run.set.clone(),
                losses: [0.0; CAPACITY],
            };
            let others: Vec<SlotStep> = inputs.iter().copied().filter(|x| x.slot != FAULTY).collect();
            let report_without = without
                .set
                .step(&mut without.params, &mut without.opt, &others, &mut without.losses)
                .unwrap();
            let params_before = param_bits(&run.params);

            let report = run.set.step(&mut run.params, &mut run.opt, &inputs, &mut run.losses).unwrap();
            assert!(run.losses[FAULTY].is_nan(), "{what}");
            assert_eq!(run.set.last_faulted_slots(), &[FAULTY], "{what}");
            assert_eq!(run.set.last_restarted_slots(), &[FAULTY], "{what}");
            assert_eq!(run.set.position(FAULTY), 1, "{what}: restarted, then consumed its token");
            assert!(run.set.state(FAULTY).iter().all(|x| x.is_finite()), "{what}");
            if learn && variant != Variant::Frozen && variant != Variant::Tbptt {
                assert_eq!(report.update, Some(UpdateOutcome::NonFinite), "{what}");
                assert_eq!(param_bits(&run.params), params_before, "{what}: weights");
            } else if !learn && variant != Variant::Tbptt {
                // (TBPTT backpropagates the faulty slot's full window at this score: its earlier
                // losses count, so the update differs from the one without it.)
                assert_eq!(report.update, report_without.update, "{what}");
                assert_eq!(
                    param_bits(&run.params),
                    param_bits(&without.params),
                    "{what}: the others' update"
                );
                for b in (0..CAPACITY).filter(|&b| b != FAULTY) {
                    assert_eq!(
                        bits(&run.set.export_slot(b)),
                        bits(&without.set.export_slot(b)),
                        "{what}: slot {b}"
                    );
                }
            }
            assert!(run.params.all_finite(), "{what}");
            assert_next_step_learns(&mut run, &what);
        }
    }
}

/// Finite factors whose product overflows f32 (a genuine overflow, not an injected NaN): only
/// recomputing each slot's contribution can tell which slot made the infinite gradient.
#[test]
fn an_overflowing_contribution_is_traced_to_its_slot() {
    for (cell, variant) in all_variants().into_iter().filter(|(_, v)| matches!(v, Variant::Kf(_))) {
        let what = format!("{cell} {variant:?}");
        let mut run = warmed_up(cell, variant);
        inject(&mut run, |s| {
            s.tensor_mut(names::KF_U).unwrap().iter_mut().for_each(|x| *x = 1e30);
            s.tensor_mut(names::KF_A).unwrap().iter_mut().for_each(|x| *x = 1.0);
            s.tensor_mut(names::KF_SCALE).unwrap()[0] = 1e30;
        });
        let params_before = param_bits(&run.params);
        let report = run.set.step(&mut run.params, &mut run.opt, &batch(5, true), &mut run.losses).unwrap();
        assert!(run.losses.iter().all(|l| l.is_finite()), "{what}");
        assert_eq!(report.update, Some(UpdateOutcome::NonFinite), "{what}");
        assert_eq!(run.set.last_faulted_slots(), &[FAULTY], "{what}");
        assert_eq!(param_bits(&run.params), params_before, "{what}");
        assert_next_step_learns(&mut run, &what);
    }
}

/// A refused update that no slot explains resets the learners of the whole batch: three slots
/// whose contributions are each finite (2·10^38 per entry) but whose sum overflows f32.
#[test]
fn an_untraceable_fault_resets_the_whole_batch() {
    let mut run = warmed_up(CellKind::Rhn, Variant::Kf(KfStrategy::Jacobian));
    let inputs: Vec<SlotStep> = batch(5, true).into_iter().filter(|x| x.slot != 1).collect();
    let n = run.spec.n;
    for x in &inputs {
        // With A = 1, every entry of the slot's ∇W is u · scale · Σ_j δ_j, δ = V_hᵀ(p − e_y).
        let mut probs = vec![0.0f32; run.spec.vocab];
        run.set.predict(&run.params, x.slot, &mut probs);
        probs[x.token as usize] -= 1.0;
        let delta_sum: f64 = (0..n)
            .map(|j| {
                probs.iter().enumerate().map(|(o, &e)| e as f64 * run.params.v[[o, j]] as f64).sum::<f64>()
            })
            .sum();
        let mut s = run.set.export_slot(x.slot);
        s.tensor_mut(names::KF_U).unwrap().fill((2e8 / delta_sum) as f32);
        s.tensor_mut(names::KF_A).unwrap().fill(1.0);
        s.tensor_mut(names::KF_SCALE).unwrap()[0] = 1e30;
        run.set.import_slot(x.slot, &s).unwrap();
    }
    let params_before = param_bits(&run.params);
    let report = run.set.step(&mut run.params, &mut run.opt, &inputs, &mut run.losses).unwrap();
    assert_eq!(report.update, Some(UpdateOutcome::NonFinite));
    assert_eq!(report.faulted, 3);
    assert_eq!(run.set.last_faulted_slots(), &[0, 2, 3]);
    assert!(run.set.last_restarted_slots().is_empty());
    assert_eq!(param_bits(&run.params), params_before);
    assert_next_step_learns(&mut run, "after the batch reset");
}

/// A healthy step reports no fault and reuses the preallocated lists.
#[test]
fn healthy_steps_report_nothing() {
    let mut run = warmed_up(CellKind::Lstm, Variant::Uoro);
    inject(&mut run, |s| *s.tensor_mut(names::UORO_S).unwrap().last_mut().unwrap() = f32::NAN);
    run.set.step(&mut run.params, &mut run.opt, &batch(5, true), &mut run.losses).unwrap();
    assert_eq!(run.set.last_faulted_slots(), &[FAULTY]);
    let report = run.set.step(&mut run.params, &mut run.opt, &batch(6, true), &mut run.losses).unwrap();
    assert_eq!(report.faulted, 0);
    assert!(run.set.last_faulted_slots().is_empty());
}
