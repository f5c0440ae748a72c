//! Batched learners equal each stream run alone: many streams stepped together (their windows
//! backpropagated as one GEMM per entry) give the sum of the gradients the same streams give one
//! set each, for every cell, with streams that start at different steps (so that windows complete
//! at different times and a flush holds some of the streams only), a reset in the middle of a
//! window, and tokens that are scored without learning.

use kfrtrl::core::model::ClipScope;
use kfrtrl::core::rng::CounterRng;
use kfrtrl::core::{CellKind, LearnerKind, ModelConfig, OptimizerKind, Params, SlotStep, StreamSet};

fn config(cell: CellKind, n: usize, vocab: usize, learner: LearnerKind, window: usize) -> ModelConfig {
    ModelConfig {
        vocab_size: vocab,
        cell,
        hidden: n,
        learner,
        tbptt_window: window,
        optimizer: OptimizerKind::Sgd,
        lr: 0.1,
        clip: 0.0,
        clip_scope: ClipScope::Global,
        seed: 17,
        // Unsaturated gates at every width, so that the gradients are not sums of cancelling terms.
        init_std: 1.0 / (n as f64).sqrt(),
        ..Default::default()
    }
}

fn rel(a: &[f64], b: &[f64]) -> f64 {
    let diff = a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum::<f64>().sqrt();
    let nb = b.iter().map(|x| x * x).sum::<f64>().sqrt();
    if nb == 0.0 { diff } else { diff / nb }
}

/// What stream `b` does at step `t`: nothing before its start (`stagger · b`), a reset at one
/// step, a predict-only token at others.
fn step_of(b: usize, t: usize, token: u32, stagger: usize) -> Option<SlotStep> {
    let start = stagger * b;
    (t >= start).then(|| SlotStep {
        slot: b,
        token,
        learn: (t + b) % 7 != 3,
        reset: t == start + 11 && b % 2 == 1,
    })
}

/// Runs `streams` streams together and one set per stream, with frozen weights, and returns the
/// worst relative difference of the summed gradients over all steps and how many steps flushed
/// windows of several streams at once.
fn batched_vs_alone(
    cell: CellKind,
    n: usize,
    vocab: usize,
    streams: usize,
    window: usize,
    stagger: usize,
) -> (f64, usize) {
    let spec = config(cell, n, vocab, LearnerKind::Tbptt, window).check().unwrap();
    let params = Params::<f64>::init(&spec);
    let mut batched = StreamSet::<f64>::new(&spec, streams);
    let mut alone: Vec<StreamSet<f64>> = (0..streams).map(|_| StreamSet::new(&spec, 1)).collect();
    let mut rng = CounterRng::new(99);
    let mut losses = vec![0.0; streams];
    let (mut worst, mut shared_flushes) = (0.0f64, 0);
    for t in 0..6 * window + 3 * streams {
        let steps: Vec<SlotStep> =
            (0..streams).filter_map(|b| step_of(b, t, rng.below(vocab as u64) as u32, stagger)).collect();
        if steps.is_empty() {
            continue;
        }
        let c = batched.score(&params, &steps, &mut losses).unwrap();
        let (mut sum_w, mut sum_v) = (0.0 * &batched.gradients().w, 0.0 * &batched.gradients().v);
        let mut flushing = 0;
        for x in &steps {
            let one = [SlotStep { slot: 0, ..*x }];
            let cb = alone[x.slot].score(&params, &one, &mut losses).unwrap();
            sum_w = sum_w + cb * &alone[x.slot].gradients().w;
            sum_v = sum_v + cb * &alone[x.slot].gradients().v;
            flushing += usize::from(cb > 1.0);
        }
        shared_flushes += usize::from(flushing > 1);
        let got_w: Vec<f64> = batched.gradients().w.iter().map(|g| g * c).collect();
        let got_v: Vec<f64> = batched.gradients().v.iter().map(|g| g * c).collect();
        let (ew, ev) = (rel(&got_w, sum_w.as_slice().unwrap()), rel(&got_v, sum_v.as_slice().unwrap()));
        worst = worst.max(ew).max(ev);
        assert!(ew <= 1e-13 && ev <= 1e-13, "{cell} n={n}: step {t}: W rel {ew:.3e}, V rel {ev:.3e}");
        batched.advance(&params, &steps).unwrap();
        for x in &steps {
            alone[x.slot].advance(&params, &[SlotStep { slot: 0, ..*x }]).unwrap();
        }
    }
    (worst, shared_flushes)
}

#[test]
fn tbptt_batched_windows_equal_each_stream_alone() {
    for cell in CellKind::ALL {
        // Small and exact; then wide enough that the GEMMs split over threads.
        for (n, vocab, streams) in [(5, 4, 5), (64, 11, 12)] {
            let (worst, shared) = batched_vs_alone(cell, n, vocab, streams, 4, 3);
            println!(
                "{cell} n={n} B={streams}: worst relative difference {worst:.3e}, {shared} shared flushes"
            );
            assert!(shared >= 3, "{cell}: too few steps flushed several streams together ({shared})");
        }
    }
}

/// Windows of 64 entries flush at most 8 slots per chunk: 20 streams in step flush in three
/// chunks (7, 7 and 6 slots), side by side on a pool of two or three threads.
#[test]
fn tbptt_windows_flushed_in_several_chunks_equal_each_stream_alone() {
    for threads in [1, 2, 3] {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
        for cell in CellKind::ALL {
            let (worst, shared) = pool.install(|| batched_vs_alone(cell, 5, 4, 20, 64, 0));
            println!(
                "{cell}, {threads} threads: worst relative difference {worst:.3e}, {shared} shared flushes"
            );
            assert!(shared >= 2, "{cell}: too few steps flushed several streams together ({shared})");
        }
    }
}
