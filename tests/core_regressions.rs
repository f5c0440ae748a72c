//! Regression tests, each named after the bug it pins down.

use kfrtrl::core::{CellKind, LearnerKind, ModelConfig, Params, SlotStep, StreamSet};

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
