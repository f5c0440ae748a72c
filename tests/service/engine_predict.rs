//! `predict` evaluates on a copy of a stream, from the stream's state, and changes nothing.
//! Regression: the copy carried a TBPTT stream's window of learned losses, so a predict that
//! started with `reset` (or ran past the window) backpropagated them and moved the weights.

use std::sync::Arc;

use kfrtrl::core::{CellKind, LearnerKind};
use kfrtrl::engine::{Engine, EngineLimits, EngineMetrics, Mode, ModelDefinition, TokenInput};

fn input(tokens: Vec<u32>, learn: bool, reset: bool) -> TokenInput {
    TokenInput { tokens, learn, reset, top_k: 3, return_losses: false }
}

/// An engine with one model "m": RHN n = 6, vocabulary 12, a TBPTT window of 5.
async fn engine_with_model(learner: LearnerKind, lr: f64) -> Arc<Engine> {
    let metrics = EngineMetrics::register(&prometheus::Registry::new()).unwrap();
    let engine = Arc::new(Engine::new(EngineLimits::default(), metrics));
    let definition = ModelDefinition {
        vocab_size: 12,
        cell: CellKind::Rhn,
        hidden: 6,
        learner,
        tbptt_window: 5,
        lr,
        // The default margin belongs to the learners that carry an influence.
        influence_margin: learner.carries_influence().then_some(kfrtrl::core::model::DEFAULT_MODEL_MARGIN),
        // An update at every step (the defaults' schedule waits for 8 tokens and more).
        tokens_per_update: 1,
        tokens_per_update_ramp: 0,
        tokens_per_update_start: 1,
        ..ModelDefinition::with_defaults("m", 4)
    };
    engine.create_model(definition).await.unwrap();
    engine
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn predict_never_changes_the_weights_for_any_learner() {
    for learner in [LearnerKind::Tbptt, LearnerKind::KfRtrl, LearnerKind::Uoro, LearnerKind::Rtrl] {
        let engine = engine_with_model(learner, 0.01).await;
        // Three learned tokens: TBPTT's window holds three scored losses, not yet flushed.
        engine.tokens("m", "s", input(vec![1, 2, 3], true, false), Mode::Consume).await.unwrap();
        let before = engine.snapshot("m").await.unwrap();
        let reset_first = input(vec![4, 5], false, true);
        let past_the_window = input((0..12).collect(), false, false);
        for x in [reset_first, past_the_window] {
            engine.tokens("m", "s", x, Mode::Predict).await.unwrap();
            let after = engine.snapshot("m").await.unwrap();
            assert!(after.params == before.params, "{learner}: a predict changed the weights");
            assert_eq!(after.stats.optimizer_updates, before.stats.optimizer_updates, "{learner}");
        }
        // The stream itself still learns (TBPTT: its window of 5 fills and flushes).
        engine.tokens("m", "s", input(vec![6, 7, 8], true, false), Mode::Consume).await.unwrap();
        let learned = engine.snapshot("m").await.unwrap();
        assert!(learned.params != before.params, "{learner}: the stream stopped learning");
    }
}

/// Regression guard (mutation testing found no test for it): a predict starts from the stream's
/// own state, the state the stream would continue from, not from a fresh one. Compared with the
/// stream consuming the same tokens without learning, for the online learners (a TBPTT stream's
/// window of learned losses fills at its first consumed token and flushes into an update, so
/// its consume moves the weights between the two tokens; the copied cell state is the same for
/// every learner).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn predict_continues_from_the_streams_state() {
    for learner in [LearnerKind::KfRtrl, LearnerKind::Uoro, LearnerKind::Rtrl] {
        let engine = engine_with_model(learner, 0.05).await;
        let pattern: Vec<u32> = (0..40).map(|i| [1, 2, 3, 1, 4][i % 5]).collect();
        engine.tokens("m", "s", input(pattern, true, false), Mode::Consume).await.unwrap();
        let probe = |reset| TokenInput { return_losses: true, ..input(vec![1, 2], false, reset) };
        let predicted = engine.tokens("m", "s", probe(false), Mode::Predict).await.unwrap();
        let from_fresh_state = engine.tokens("m", "s", probe(true), Mode::Predict).await.unwrap();
        let consumed = engine.tokens("m", "s", probe(false), Mode::Consume).await.unwrap();
        let finite = |losses: Option<Vec<Option<f64>>>| -> Vec<f64> {
            losses.unwrap().into_iter().map(|l| l.expect("a finite loss")).collect()
        };
        let (p, f, c) = (
            finite(predicted.losses_bits.clone()),
            finite(from_fresh_state.losses_bits),
            finite(consumed.losses_bits.clone()),
        );
        // The stream's state matters to the first token's loss, so the comparison below can fail.
        assert!((c[0] - f[0]).abs() > 1e-3, "{learner}: state-independent losses {c:?} {f:?}");
        for (a, b) in p.iter().zip(&c) {
            assert!(
                (a - b).abs() <= 1e-9 * b.abs().max(1.0),
                "{learner}: predict {p:?} against consume {c:?}"
            );
        }
        let tokens =
            |r: &kfrtrl::engine::TokensReply| r.predictions.iter().map(|x| x.token).collect::<Vec<_>>();
        assert_eq!(tokens(&predicted), tokens(&consumed), "{learner}");
    }
}
