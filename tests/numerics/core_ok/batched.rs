//! `ok:R` batched against each stream stepped alone, a slot's exported state continued in another
//! set, and f32 against f64 through many reductions.

#![allow(clippy::needless_range_loop)]

use super::*;

/// Batched = per-stream: five streams stepped together (resets, idle and non-learning inputs, SGD
/// updates) match the same streams stepped one set each; and a slot's exported state continues
/// bit for bit in another set (checkpoints, eviction, WAL replay all go through it).
#[test]
fn batched_equals_per_stream_and_export_import_continues_bit_for_bit() {
    for (cell, n, vocab) in [(CellKind::Rhn, 5, 4), (CellKind::Lstm, 3, 4), (CellKind::Tanh, 6, 4)] {
        let cfg = config(cell, n, vocab, LearnerKind::Ok, 3, true);
        let spec = check(&cfg);
        let params = Params::<f64>::init(&spec);
        let streams = 5;
        let mut batched = StreamSet::<f64>::new(&spec, streams);
        let mut single: Vec<StreamSet<f64>> = (0..streams).map(|_| StreamSet::new(&spec, 1)).collect();
        for b in 0..streams {
            batched.set_sign_key(b, derive_key(4, b as u64));
            single[b].set_sign_key(0, derive_key(4, b as u64));
        }
        let mut losses = vec![0.0; streams];
        let mut grad_err = 0.0f64;
        for t in 0..12usize {
            let inputs: Vec<SlotStep> = (0..streams)
                .filter(|b| (b + t) % 4 != 3)
                .map(|b| SlotStep {
                    slot: b,
                    token: ((t * 3 + b * 5) % vocab) as u32,
                    learn: (b + t) % 3 != 1,
                    reset: t == 6 && b == 2,
                })
                .collect();
            batched.score(&params, &inputs, &mut losses).unwrap();
            let mut sum = Gradients::<f64>::zeros(&spec);
            let mut count = 0.0;
            for x in &inputs {
                let one = [SlotStep { slot: 0, ..*x }];
                let c = single[x.slot].score(&params, &one, &mut losses).unwrap();
                let mut g = single[x.slot].gradients().clone();
                g.scale(c);
                sum.add(&g);
                count += c;
                single[x.slot].advance(&params, &one).unwrap();
            }
            if count > 0.0 {
                sum.scale(1.0 / count);
                grad_err = grad_err.max(rel(&batched.gradients().w, &sum.w));
            }
            batched.advance(&params, &inputs).unwrap();
        }
        for b in 0..streams {
            let (x, y) = (carried(&batched, b), carried(&single[b], 0));
            assert!(rel(&x, &y) < 1e-12, "{cell} stream {b}: factors differ");
        }
        assert!(grad_err < 1e-12, "{cell}: batched gradient rel {grad_err:.3e}");

        // A copied slot carries the same learner state.
        batched.copy_slot(1, 4);
        assert_eq!(batched.export_slot(1).tensors, batched.export_slot(4).tensors, "{cell}: copy_slot");
        // Export, import elsewhere, go on: bit for bit.
        let mut moved = StreamSet::<f64>::new(&spec, 3);
        moved.import_slot(2, &batched.export_slot(1)).unwrap();
        for t in 0..8u32 {
            batched.advance(&params, &[SlotStep::learn(1, t % vocab as u32)]).unwrap();
            moved.advance(&params, &[SlotStep::learn(2, t % vocab as u32)]).unwrap();
        }
        assert_eq!(
            batched.export_slot(1).tensors,
            moved.export_slot(2).tensors,
            "{cell}: resumed slot differs"
        );
    }
}

/// f32 follows f64: the same OK-8 run (RHN, the same forced outcome at every step, so that both
/// take the same path) in both precisions stays within a small relative distance: the
/// reduction's rebuild must not amplify f32 rounding.
#[test]
fn f32_tracks_f64_through_many_reductions() {
    let cfg = ModelConfig { init_std: 0.3, ..config(CellKind::Rhn, 16, 6, LearnerKind::Ok, 8, true) };
    let spec = check(&cfg);
    let p64 = Params::<f64>::init(&spec);
    let p32: Params<f32> = p64.cast();
    let mut s64 = StreamSet::<f64>::new(&spec, 1);
    let mut s32 = StreamSet::<f32>::new(&spec, 1);
    ok_mut(&mut s64).force_drop(0, Some(0));
    match s32.learner_mut() {
        Learner::Ok(l) => l.force_drop(0, Some(0)),
        _ => unreachable!(),
    }
    let toks = tokens(12, 400, 6);
    let mut worst = 0.0f64;
    for (t, &tok) in toks.iter().enumerate() {
        s64.advance(&p64, &[SlotStep::learn(0, tok)]).unwrap();
        s32.advance(&p32, &[SlotStep::learn(0, tok)]).unwrap();
        if t % 50 == 49 {
            let x = carried(&s64, 0);
            let y = match s32.learner() {
                Learner::Ok(l) => l
                    .factors(0, &spec)
                    .into_iter()
                    .map(|(u, a)| reference::kron_influence(&u.mapv(f64::from), &a.mapv(f64::from)))
                    .fold(Array2::<f64>::zeros(x.dim()), |acc, k| acc + k),
                _ => unreachable!(),
            };
            let e = rel(&y, &x);
            eprintln!("step {}: f32 vs f64 rel {e:.3e}", t + 1);
            worst = worst.max(e);
        }
    }
    assert!(worst < 1e-3, "f32 drifts from f64: {worst:.3e}");
}
