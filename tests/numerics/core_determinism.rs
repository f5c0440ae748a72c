//! A run is a function of its seed and inputs only: not of the thread count, nor of how the
//! pool schedules the parallel sections (sizes here are large enough to take every parallel
//! path: split GEMMs, chunked optimizer passes, per-stream sections).

use kfrtrl::core::{CellKind, LearnerKind, ModelConfig, Optimizer, Params, SlotStep, StreamSet};

fn run(threads: usize, cell: CellKind, learner: LearnerKind) -> (Params<f32>, Vec<f32>, Vec<u64>) {
    let config = ModelConfig { cell, learner, hidden: 128, ..ModelConfig::default() };
    run_config(threads, config, 6)
}

fn run_config(threads: usize, config: ModelConfig, batch: usize) -> (Params<f32>, Vec<f32>, Vec<u64>) {
    run_steps(threads, config, batch, 25, 7)
}

/// `steps` steps of `batch` streams; stream `b` skips the steps `t` where `skip` divides `t + b`.
fn run_steps(
    threads: usize,
    config: ModelConfig,
    batch: usize,
    steps: u32,
    skip: usize,
) -> (Params<f32>, Vec<f32>, Vec<u64>) {
    let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
    pool.install(|| {
        let spec = ModelConfig { vocab_size: 256, ok_rank: 3, seed: 3, ..config }.check().unwrap();
        let mut params = Params::<f32>::init(&spec);
        let mut opt = Optimizer::new(&spec);
        let mut set = StreamSet::<f32>::new(&spec, batch);
        let mut losses = vec![0.0; batch];
        let mut loss_bits = Vec::new();
        for t in 0..steps {
            let inputs: Vec<SlotStep> = (0..batch)
                .filter(|b| !(t as usize + b).is_multiple_of(skip))
                .map(|b| SlotStep {
                    slot: b,
                    token: (t * 31 + b as u32 * 17) % 256,
                    learn: t % 4 != 1,
                    reset: false,
                })
                .collect();
            set.step(&mut params, &mut opt, &inputs, &mut losses).unwrap();
            loss_bits.extend(losses[..inputs.len()].iter().map(|l| l.to_bits()));
        }
        let states = set.states().iter().copied().collect();
        (params, states, loss_bits)
    })
}

#[test]
fn results_do_not_depend_on_the_thread_count() {
    for cell in CellKind::ALL {
        for learner in [LearnerKind::KfRtrl, LearnerKind::Ok, LearnerKind::Uoro, LearnerKind::Tbptt] {
            let one = run(1, cell, learner);
            let two = run(2, cell, learner);
            let three = run(3, cell, learner);
            for (name, other) in [("2 threads", &two), ("3 threads", &three)] {
                assert_same_run(&one, other, &format!("{cell} {learner} with {name}"));
            }
        }
    }
}

/// The adaptive margin's probe and the pending updates of `tokens_per_update` are part of the
/// run: the same bits with one thread or two.
#[test]
fn the_margin_and_pending_updates_do_not_depend_on_the_thread_count() {
    let config = ModelConfig {
        cell: CellKind::Rhn,
        learner: LearnerKind::Ok,
        hidden: 64,
        influence_margin: Some(0.01),
        tokens_per_update: 5,
        ..ModelConfig::default()
    };
    assert_same_run(&run_config(1, config.clone(), 4), &run_config(2, config, 4), "with 2 threads");
}

/// Two streams at tanh n = 256: the forward and readout products are `2 × 256`, whose halves a
/// two-thread split made small enough for another kernel of the GEMM backend; every learner's
/// bits then depended on the thread count (`linalg::halves_keep_kernel`).
#[test]
fn two_streams_at_width_256_do_not_depend_on_the_thread_count() {
    for learner in [LearnerKind::KfRtrl, LearnerKind::Uoro, LearnerKind::Tbptt] {
        let config = ModelConfig { cell: CellKind::Tanh, learner, hidden: 256, ..ModelConfig::default() };
        assert_same_run(
            &run_config(1, config.clone(), 2),
            &run_config(2, config, 2),
            &format!("{learner} with 2 threads"),
        );
    }
}

/// TBPTT windows of 8 entries flush at most 64 slots per chunk: 130 streams in step flush in
/// three chunks (44, 43 and 43 slots) every 8 steps, one chunk after another on one thread, two
/// and then one side by side on two, all three at once on three.
#[test]
fn tbptt_chunks_side_by_side_do_not_depend_on_the_thread_count() {
    for cell in [CellKind::Tanh, CellKind::Rhn] {
        let config = ModelConfig {
            cell,
            learner: LearnerKind::Tbptt,
            hidden: 32,
            tbptt_window: 8,
            ..ModelConfig::default()
        };
        // A skip period longer than the run: every stream advances at every step.
        let one = run_steps(1, config.clone(), 130, 17, 1000);
        for threads in [2, 3] {
            let other = run_steps(threads, config.clone(), 130, 17, 1000);
            assert_same_run(&one, &other, &format!("{cell} tbptt:8 with {threads} threads"));
        }
    }
}

/// The same weights, states and losses, bit for bit.
fn assert_same_run(
    one: &(Params<f32>, Vec<f32>, Vec<u64>),
    other: &(Params<f32>, Vec<f32>, Vec<u64>),
    what: &str,
) {
    assert!(one.0 == other.0, "{what}: weights differ");
    assert!(one.1.iter().zip(&other.1).all(|(a, b)| a.to_bits() == b.to_bits()), "{what}: states differ");
    assert_eq!(one.2, other.2, "{what}: losses differ");
}
