//! A slot exported from one stream set and imported into another slot of a fresh set of the same
//! spec continues bit for bit as the original: losses, states, gradients, weights and the exported
//! state itself, for every learner, cell and float type. Wrong layouts are refused with an error.

use kfrtrl::core::slot_state::names;
use kfrtrl::core::{
    CellKind, Float, KfStrategy, Learner, LearnerKind, ModelConfig, ModelSpec, Optimizer, OptimizerKind,
    Params, SlotState, SlotStateError, SlotStateLayout, SlotStep, StreamSet,
};

#[derive(Debug, Clone, Copy, PartialEq)]
enum Variant {
    Kf(KfStrategy),
    Uoro,
    Rtrl,
    Tbptt,
    Frozen,
    /// KF-RTRL (Jacobian) with the gradient taken after the reduction (no last-step record).
    KfAfterReduction,
    Ok,
}

const WINDOW: usize = 4;
const CAPACITY: usize = 4;

fn variants(cell: CellKind) -> Vec<Variant> {
    let mut v = vec![
        Variant::Kf(KfStrategy::Jacobian),
        Variant::Uoro,
        Variant::Rtrl,
        Variant::Tbptt,
        Variant::Frozen,
        Variant::KfAfterReduction,
        Variant::Ok,
    ];
    if cell == CellKind::Tanh {
        v.push(Variant::Kf(KfStrategy::Wide));
    }
    v
}

fn spec_for(cell: CellKind, variant: Variant, optimizer: OptimizerKind) -> ModelSpec {
    let learner = match variant {
        Variant::Kf(_) | Variant::KfAfterReduction => LearnerKind::KfRtrl,
        Variant::Ok => LearnerKind::Ok,
        Variant::Uoro => LearnerKind::Uoro,
        Variant::Rtrl => LearnerKind::Rtrl,
        Variant::Tbptt => LearnerKind::Tbptt,
        Variant::Frozen => LearnerKind::Frozen,
    };
    ModelConfig {
        vocab_size: 7,
        cell,
        hidden: 5,
        learner,
        tbptt_window: WINDOW,
        ok_rank: 3,
        gradient_before_reduction: variant != Variant::KfAfterReduction,
        optimizer,
        lr: 0.05,
        clip: 0.0,
        seed: 11,
        init_std: 0.4,
        ..ModelConfig::default()
    }
    .check()
    .unwrap()
}

fn new_set<T: Float>(spec: &ModelSpec, variant: Variant) -> StreamSet<T> {
    let mut set = StreamSet::<T>::new(spec, CAPACITY);
    if let (Variant::Kf(strategy), Learner::KfRtrl(kf)) = (variant, set.learner_mut()) {
        kf.set_strategy(spec, strategy);
    }
    for slot in 0..CAPACITY {
        set.set_sign_key(slot, 1000 + slot as u64);
    }
    set
}

fn token(t: usize, salt: usize) -> u32 {
    ((t * 5 + salt * 3 + t * t * salt) % 7) as u32
}

fn bits<T: Float>(xs: &[T]) -> Vec<u64> {
    xs.iter().map(|x| x.to_f64_lossless().to_bits()).collect()
}

/// A slot state with every float replaced by its bits (widened losslessly to f64).
fn state_bits<T: Float>(s: &SlotState<T>) -> SlotState<u64> {
    SlotState {
        position: s.position,
        sign_key: s.sign_key,
        sign_counter: s.sign_counter,
        counters: s.counters.clone(),
        indices: s.indices.clone(),
        tensors: s.tensors.iter().map(|(n, sh, v)| (n.clone(), sh.clone(), bits(v))).collect(),
    }
}

fn grad_bits<T: Float>(set: &StreamSet<T>) -> Vec<u64> {
    let g = set.gradients();
    bits(g.w.as_slice().unwrap()).into_iter().chain(bits(g.v.as_slice().unwrap())).collect()
}

fn param_bits<T: Float>(p: &Params<T>) -> Vec<u64> {
    bits(p.w.as_slice().unwrap()).into_iter().chain(bits(p.v.as_slice().unwrap())).collect()
}

/// A busy history for every slot: partial batches, predict-only tokens, a reset of slot 1.
fn warm_up<T: Float>(
    set: &mut StreamSet<T>,
    params: &mut Params<T>,
    opt: &mut Optimizer<T>,
    salt: usize,
    steps: usize,
) {
    let mut losses = [0.0; CAPACITY];
    for t in 0..steps {
        let inputs: Vec<SlotStep> = (0..CAPACITY)
            .filter(|b| !(t + b + salt).is_multiple_of(5))
            .map(|b| SlotStep {
                slot: b,
                token: token(t, b + salt),
                learn: (t + b) % 3 != 1,
                reset: t == 6 && b == 1,
            })
            .collect();
        set.step(params, opt, &inputs, &mut losses).unwrap();
    }
}

fn roundtrip<T: Float>(cell: CellKind, variant: Variant, optimizer: OptimizerKind) {
    let what = format!("{} {cell} {variant:?} {optimizer:?}", T::NAME);
    let spec = spec_for(cell, variant, optimizer);
    let (src_slot, dst_slot) = (1, 3);
    let mut params = Params::<T>::init(&spec);
    let mut opt = Optimizer::<T>::new(&spec);
    let mut a = new_set::<T>(&spec, variant);
    warm_up(&mut a, &mut params, &mut opt, 0, 13);
    let exported = a.export_slot(src_slot);
    assert!(exported.position > 0 && exported.position < exported.sign_counter, "{what}: history");
    if variant == Variant::Tbptt {
        let len = exported.counter(names::TBPTT_LEN).unwrap();
        assert!(len > 0 && len < WINDOW as u64, "{what}: the window must be partially filled, len {len}");
    }

    // A fresh set whose slots (the destination included) hold other streams.
    let mut b = new_set::<T>(&spec, variant);
    let mut other_params = params.clone();
    let mut other_opt = opt.clone();
    warm_up(&mut b, &mut other_params, &mut other_opt, 2, 9);
    b.import_slot(dst_slot, &exported).unwrap();
    assert_eq!(state_bits(&b.export_slot(dst_slot)), state_bits(&exported), "{what}: import then export");

    // Batched with the other slots, weights fixed: the tracked stream's losses and state agree.
    let fixed = params.clone();
    let (mut la, mut lb) = ([0.0; CAPACITY], [0.0; CAPACITY]);
    for t in 0..7 {
        let learn = t % 3 != 2;
        let tracked = token(t, 9);
        let batch = |slot_of_tracked: usize, salt: usize| -> Vec<SlotStep> {
            (0..CAPACITY)
                .map(|s| SlotStep {
                    slot: s,
                    token: if s == slot_of_tracked { tracked } else { token(t, s + salt) },
                    learn: if s == slot_of_tracked { learn } else { (t + s) % 2 == 0 },
                    reset: false,
                })
                .collect()
        };
        let (ba, bb) = (batch(src_slot, 4), batch(dst_slot, 6));
        a.score(&fixed, &ba, &mut la).unwrap();
        b.score(&fixed, &bb, &mut lb).unwrap();
        assert_eq!(la[src_slot].to_bits(), lb[dst_slot].to_bits(), "{what}: batched loss at {t}");
        a.advance(&fixed, &ba).unwrap();
        b.advance(&fixed, &bb).unwrap();
        assert_eq!(bits(a.state(src_slot)), bits(b.state(dst_slot)), "{what}: batched state at {t}");
        assert_eq!(
            state_bits(&a.export_slot(src_slot)),
            state_bits(&b.export_slot(dst_slot)),
            "{what}: batched export at {t}"
        );
    }

    // Alone, with weight updates: losses, gradients, weights, optimizer and exports agree.
    let (mut pa, mut pb) = (params.clone(), params);
    let (mut oa, mut ob) = (opt.clone(), opt);
    for t in 0..12 {
        let x = SlotStep { slot: 0, token: token(t, 5), learn: t % 4 != 3, reset: t == 7 };
        let ra = a.step(&mut pa, &mut oa, &[SlotStep { slot: src_slot, ..x }], &mut la).unwrap();
        let rb = b.step(&mut pb, &mut ob, &[SlotStep { slot: dst_slot, ..x }], &mut lb).unwrap();
        assert_eq!(ra, rb, "{what}: report at {t}");
        assert_eq!(la[0].to_bits(), lb[0].to_bits(), "{what}: loss at {t}");
        assert_eq!(grad_bits(&a), grad_bits(&b), "{what}: gradient at {t}");
        assert_eq!(param_bits(&pa), param_bits(&pb), "{what}: weights at {t}");
        assert_eq!(oa, ob, "{what}: optimizer at {t}");
        assert_eq!(bits(a.state(src_slot)), bits(b.state(dst_slot)), "{what}: state at {t}");
        assert_eq!(
            state_bits(&a.export_slot(src_slot)),
            state_bits(&b.export_slot(dst_slot)),
            "{what}: export at {t}"
        );
    }
    if variant != Variant::Frozen {
        assert_ne!(param_bits(&pa), param_bits(&fixed), "{what}: the weights must have learned");
    }
}

fn for_all(f: impl Fn(CellKind, Variant, OptimizerKind)) {
    for cell in CellKind::ALL {
        for (i, variant) in variants(cell).into_iter().enumerate() {
            let optimizer = if i % 2 == 0 { OptimizerKind::Adam } else { OptimizerKind::Sgd };
            f(cell, variant, optimizer);
        }
    }
}

#[test]
fn an_imported_slot_continues_bit_for_bit_f64() {
    for_all(roundtrip::<f64>);
}

#[test]
fn an_imported_slot_continues_bit_for_bit_f32() {
    for_all(roundtrip::<f32>);
}

/// The exported names and shapes are the layout's, which depends on the spec alone.
#[test]
fn exports_follow_the_layout_of_the_spec() {
    for_all(|cell, variant, optimizer| {
        let spec = spec_for(cell, variant, optimizer);
        let layout = SlotStateLayout::of(&spec);
        let set = new_set::<f32>(&spec, variant);
        assert_eq!(set.slot_state_layout(), layout);
        assert_eq!(StreamSet::<f32>::new(&spec, 1).slot_state_layout(), layout);
        let s = set.export_slot(2);
        let shapes = |t: &[(String, Vec<usize>, Vec<f32>)]| -> Vec<(String, Vec<usize>)> {
            t.iter()
                .map(|(n, sh, v)| {
                    assert_eq!(v.len(), sh.iter().product::<usize>());
                    (n.clone(), sh.clone())
                })
                .collect()
        };
        assert_eq!(shapes(&s.tensors), layout.tensors);
        assert_eq!(s.counters.iter().map(|(n, _)| n.clone()).collect::<Vec<_>>(), layout.counters);
        assert_eq!(
            s.indices.iter().map(|(n, sh, _)| (n.clone(), sh.clone())).collect::<Vec<_>>(),
            layout.indices
        );
        assert_eq!(s.bytes(), layout.bytes(4));
        assert_eq!(layout.tensors[0], (names::STATE.to_string(), vec![spec.state_len()]));
    });
    let kf = SlotStateLayout::of(&spec_for(
        CellKind::Lstm,
        Variant::Kf(KfStrategy::Jacobian),
        OptimizerKind::Adam,
    ));
    let names_of: Vec<&str> = kf.tensors.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names_of, ["state", "kf.u", "kf.a", "kf.scale", "kf.last_c", "kf.last_h", "kf.last_d"]);
    assert_eq!(kf.tensors[2].1, vec![10, 20]);
    assert_eq!(kf.tensors[3].1, Vec::<usize>::new());
    // [h; D] of an LSTM step: n = 5 and k·r·n = 2·4·5.
    assert_eq!((kf.tensors[5].1.clone(), kf.tensors[6].1.clone()), (vec![5], vec![40]));
    assert_eq!(kf.indices, [("kf.last_token".to_string(), vec![1])]);
    let after =
        SlotStateLayout::of(&spec_for(CellKind::Lstm, Variant::KfAfterReduction, OptimizerKind::Adam));
    assert_eq!(after.tensors.len(), 4);
    let ok = SlotStateLayout::of(&spec_for(CellKind::Rhn, Variant::Ok, OptimizerKind::Adam));
    let names_of: Vec<(&str, &[usize])> =
        ok.tensors.iter().map(|(n, s)| (n.as_str(), s.as_slice())).collect();
    // R + 1 = 4 terms; m = 7 + 5 + 1; k·n = 5 and r·n = 10.
    assert_eq!(
        names_of,
        [("state", &[5][..]), ("ok.u", &[4, 13][..]), ("ok.a", &[5, 40][..]), ("ok.weight", &[4][..])]
    );
}

/// Importing a slot at the start of a sequence into a busy slot leaves nothing of the occupant:
/// the slot then runs exactly as a never-used slot with the same key and counter.
#[test]
fn import_overwrites_every_trace_of_the_previous_occupant() {
    for_all(|cell, variant, optimizer| {
        let what = format!("{cell} {variant:?}");
        let spec = spec_for(cell, variant, optimizer);
        let mut params = Params::<f64>::init(&spec);
        let mut opt = Optimizer::<f64>::new(&spec);
        let mut busy = new_set::<f64>(&spec, variant);
        warm_up(&mut busy, &mut params, &mut opt, 1, 11);
        let mut fresh = new_set::<f64>(&spec, variant);
        let blank = fresh.export_slot(0);
        busy.import_slot(2, &blank).unwrap();
        let fixed = params.clone();
        let (mut l1, mut l2) = ([0.0; CAPACITY], [0.0; CAPACITY]);
        for t in 0..9 {
            let x = SlotStep { slot: 0, token: token(t, 3), learn: t % 3 != 0, reset: false };
            let c1 = fresh.score(&fixed, &[x], &mut l1).unwrap();
            let g1 = grad_bits(&fresh);
            let c2 = busy.score(&fixed, &[SlotStep { slot: 2, ..x }], &mut l2).unwrap();
            assert_eq!((c1, l1[0].to_bits(), g1), (c2, l2[0].to_bits(), grad_bits(&busy)), "{what} at {t}");
            fresh.advance(&fixed, &[x]).unwrap();
            busy.advance(&fixed, &[SlotStep { slot: 2, ..x }]).unwrap();
            assert_eq!(state_bits(&fresh.export_slot(0)), state_bits(&busy.export_slot(2)), "{what} at {t}");
        }
    });
}

/// Any float value is accepted, non-finite included, and comes back out unchanged.
#[test]
fn non_finite_values_are_imported_as_they_are() {
    let spec = spec_for(CellKind::Rhn, Variant::Kf(KfStrategy::Jacobian), OptimizerKind::Adam);
    let mut set = new_set::<f32>(&spec, Variant::Kf(KfStrategy::Jacobian));
    let mut s = set.export_slot(0);
    s.tensor_mut(names::KF_A).unwrap()[3] = f32::NAN;
    s.tensor_mut(names::KF_U).unwrap()[0] = f32::NEG_INFINITY;
    s.tensor_mut(names::STATE).unwrap()[1] = -0.0;
    set.import_slot(1, &s).unwrap();
    assert_eq!(state_bits(&set.export_slot(1)), state_bits(&s));
}

#[test]
fn wrong_layouts_are_refused_and_change_nothing() {
    let spec = spec_for(CellKind::Lstm, Variant::Tbptt, OptimizerKind::Sgd);
    let mut params = Params::<f64>::init(&spec);
    let mut opt = Optimizer::<f64>::new(&spec);
    let mut set = new_set::<f64>(&spec, Variant::Tbptt);
    warm_up(&mut set, &mut params, &mut opt, 0, 5);
    let good = set.export_slot(2);
    let before = state_bits(&set.export_slot(0));
    let refuse = |set: &mut StreamSet<f64>, s: &SlotState<f64>, slot: usize| -> SlotStateError {
        let err = set.import_slot(slot, s).unwrap_err();
        assert!(!err.to_string().is_empty());
        err
    };
    let edit = |f: &dyn Fn(&mut SlotState<f64>)| {
        let mut s = good.clone();
        f(&mut s);
        s
    };

    assert_eq!(
        refuse(&mut set, &good, CAPACITY),
        SlotStateError::SlotOutOfRange { slot: CAPACITY, capacity: CAPACITY }
    );
    let missing = edit(&|s| {
        s.tensors.retain(|(n, _, _)| n != names::TBPTT_ERR);
    });
    assert!(
        matches!(refuse(&mut set, &missing, 0), SlotStateError::Missing { name, .. } if name == names::TBPTT_ERR)
    );
    let extra = edit(&|s| s.tensors.push(("kf.u".into(), vec![1], vec![0.0])));
    assert!(matches!(refuse(&mut set, &extra, 0), SlotStateError::Unexpected { name, .. } if name == "kf.u"));
    let twice = edit(&|s| {
        let dup = s.tensors[0].clone();
        s.tensors.push(dup);
    });
    assert!(
        matches!(refuse(&mut set, &twice, 0), SlotStateError::Unexpected { name, .. } if name == names::STATE)
    );
    let reshaped = edit(&|s| s.tensors[0].1 = vec![2, spec.n]);
    assert!(matches!(refuse(&mut set, &reshaped, 0), SlotStateError::Shape { .. }));
    let short = edit(&|s| {
        s.tensors[1].2.pop();
    });
    assert!(matches!(refuse(&mut set, &short, 0), SlotStateError::Length { .. }));
    let no_counter = edit(&|s| {
        s.counters.pop();
    });
    assert!(matches!(refuse(&mut set, &no_counter, 0), SlotStateError::Missing { kind: "counter", .. }));
    let long = edit(&|s| s.counters[0].1 = WINDOW as u64 + 1);
    assert!(
        matches!(refuse(&mut set, &long, 0), SlotStateError::Value { name, .. } if name == names::TBPTT_LEN)
    );
    let overscored = edit(&|s| {
        s.counters[0].1 = 1;
        s.counters[1].1 = 2;
    });
    assert!(
        matches!(refuse(&mut set, &overscored, 0), SlotStateError::Value { name, .. } if name == names::TBPTT_SCORED)
    );
    let bad_token = edit(&|s| s.indices[0].2[0] = spec.vocab as u32);
    assert!(
        matches!(refuse(&mut set, &bad_token, 0), SlotStateError::Value { name, .. } if name == names::TBPTT_TOKENS)
    );

    // Another spec's state: another learner, or the same learner with another hidden size.
    let kf_spec = spec_for(CellKind::Lstm, Variant::Kf(KfStrategy::Jacobian), OptimizerKind::Sgd);
    let kf_state = new_set::<f64>(&kf_spec, Variant::Kf(KfStrategy::Jacobian)).export_slot(0);
    assert!(matches!(
        refuse(&mut set, &kf_state, 0),
        SlotStateError::Missing { .. } | SlotStateError::Unexpected { .. }
    ));
    let wide_spec = ModelConfig { hidden: 6, ..kf_spec.config.clone() }.check().unwrap();
    let mut kf_set = new_set::<f64>(&kf_spec, Variant::Kf(KfStrategy::Jacobian));
    let wide_state = StreamSet::<f64>::new(&wide_spec, 1).export_slot(0);
    assert!(matches!(refuse(&mut kf_set, &wide_state, 0), SlotStateError::Shape { .. }));

    assert_eq!(state_bits(&set.export_slot(0)), before, "a refused import changed the slot");
    set.import_slot(0, &good).unwrap();
    assert_eq!(state_bits(&set.export_slot(0)), state_bits(&good));
}
