//! A run is a function of its seed and inputs only: not of the thread count, nor of how the
//! pool schedules the parallel sections (sizes here are large enough to take every parallel
//! path: split GEMMs, chunked optimizer passes, per-stream sections).

use kfrtrl::core::{CellKind, LearnerKind, ModelConfig, Optimizer, Params, SlotStep, StreamSet};

fn run(threads: usize, cell: CellKind, learner: LearnerKind) -> (Params<f32>, Vec<f32>, Vec<u64>) {
    let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
    pool.install(|| {
        let spec = ModelConfig {
            vocab_size: 256,
            cell,
            hidden: 128,
            learner,
            ok_rank: 3,
            seed: 3,
            ..ModelConfig::default()
        }
        .check()
        .unwrap();
        let mut params = Params::<f32>::init(&spec);
        let mut opt = Optimizer::new(&spec);
        let batch = 6;
        let mut set = StreamSet::<f32>::new(&spec, batch);
        let mut losses = vec![0.0; batch];
        let mut loss_bits = Vec::new();
        for t in 0..25u32 {
            let inputs: Vec<SlotStep> = (0..batch)
                .filter(|b| !(t as usize + b).is_multiple_of(7))
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
                assert!(one.0 == other.0, "{cell} {learner}: weights differ with {name}");
                assert!(
                    one.1.iter().zip(&other.1).all(|(a, b)| a.to_bits() == b.to_bits()),
                    "{cell} {learner}: states differ with {name}"
                );
                assert_eq!(one.2, other.2, "{cell} {learner}: losses differ with {name}");
            }
        }
    }
}
