//! What `kfrtrl train` reports: the prequential BPC against exact replays (frozen weights, and
//! the loss of each symbol under the weights before it was learned), and the evaluations a long
//! run prints while it runs.

use std::path::PathBuf;

use kfrtrl::core::{CellKind, LearnerKind, ModelConfig, Params};
use kfrtrl::train::{TrainConfig, evaluate, train};

fn config(learner: LearnerKind) -> ModelConfig {
    ModelConfig {
        vocab_size: 6,
        cell: CellKind::Rhn,
        hidden: 5,
        learner,
        lr: 0.05,
        clip: 0.0,
        seed: 11,
        init_std: 0.5,
        ..ModelConfig::default()
    }
}

fn text(len: usize) -> Vec<u32> {
    (0..len).map(|t| ((t * t + 3 * t + t / 5) % 6) as u32).collect()
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-9 * b.abs().max(1.0)
}

/// With frozen weights the prequential BPC is the BPC of each stream's own text: stream `s`
/// reads from offset `s·len/B` (wrapping), its state zeroed every `reset` symbols, and the last
/// 10% of the steps give `train_bpc_final`.
#[test]
fn frozen_prequential_bpc_is_the_mean_over_each_streams_own_text() {
    let tokens = text(97);
    let (b, steps, reset) = (3usize, 60u64, 20usize);
    let cfg = TrainConfig {
        model: config(LearnerKind::Frozen),
        batch: b,
        steps,
        reset_every: Some(reset as u64),
        eval_every: None,
    };
    let (report, params, _) = train(&cfg, &tokens, None, |_| {}).unwrap();
    let spec = cfg.model.check().unwrap();
    assert_eq!(params, Params::init(&spec), "frozen weights moved");
    let (mut all, mut tail) = (0.0, 0.0);
    let tail_from = (steps - steps / 10) as usize;
    for s in 0..b {
        let own: Vec<u32> =
            (0..steps as usize).map(|t| tokens[(s * tokens.len() / b + t) % tokens.len()]).collect();
        for chunk in own.chunks(reset) {
            all += evaluate(&spec, &params, chunk) * chunk.len() as f64;
        }
        // The tail (the last 6 steps) lies inside the last chunk: the chunk's loss less that of
        // its first 14 symbols.
        let last = &own[(steps as usize - reset)..];
        let upto = |n: usize| evaluate(&spec, &params, &last[..n]) * n as f64;
        tail += upto(reset) - upto(reset - (steps as usize - tail_from));
    }
    let n = (b as u64 * steps) as f64;
    assert!(close(report.train_bpc, all / n), "{} vs {}", report.train_bpc, all / n);
    let tail_n = (b * (steps as usize - tail_from)) as f64;
    assert!(close(report.train_bpc_final, tail / tail_n), "{} vs {}", report.train_bpc_final, tail / tail_n);
    assert_eq!(report.symbols, b as u64 * steps);
}

/// Each symbol's loss is taken before the weights learn from it: with the state zeroed before
/// every symbol, the loss added by step `k + 1` is the loss of symbol `k` under the weights after
/// `k` updates (and not after `k + 1`, which differ at this learning rate).
#[test]
fn prequential_loss_is_taken_before_learning_from_the_symbol() {
    let tokens = text(40);
    let run = |steps: u64| {
        let cfg = TrainConfig {
            model: config(LearnerKind::KfRtrl),
            batch: 1,
            steps,
            reset_every: Some(1),
            eval_every: None,
        };
        train(&cfg, &tokens, None, |_| {}).unwrap()
    };
    let spec = config(LearnerKind::KfRtrl).check().unwrap();
    for k in [0u64, 1, 7, 30] {
        let (before, params_k, _) = run(k.max(1));
        let (after, params_k1, _) = run(k + 1);
        let params_k = if k == 0 { Params::init(&spec) } else { params_k };
        let added = after.train_bpc * (k + 1) as f64 - if k == 0 { 0.0 } else { before.train_bpc * k as f64 };
        let symbol = [tokens[k as usize]];
        let expected = evaluate(&spec, &params_k, &symbol);
        assert!(close(added, expected), "step {}: {added} vs {expected}", k + 1);
        let learned = evaluate(&spec, &params_k1, &symbol);
        assert!((learned - expected).abs() > 1e-3, "step {}: learning did not change the loss", k + 1);
    }
}

fn corpus(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("kfrtrl-cli-train-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("corpus.txt");
    std::fs::write(&path, "a b _ c\na _ b c\nc a b\n".repeat(40)).unwrap();
    path
}

/// A run stopped before its end used to have reported nothing: the periodic evaluations reached
/// only the final JSON, and the progress bar is hidden when stderr is not a terminal.
#[test]
fn train_prints_each_periodic_evaluation_on_stderr_as_it_is_taken() {
    let corpus = corpus("evals");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_kfrtrl"))
        .args(["train", "--format", "ptb-char", "--cell", "tanh", "--hidden", "8", "--batch", "2"])
        .args(["--symbols", "400", "--eval-every", "100", "--seed", "3", "--json"])
        .arg("--corpus")
        .arg(&corpus)
        .arg("--eval")
        .arg(&corpus)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let evals = report["evals"].as_array().unwrap();
    assert_eq!(evals.len(), 4);
    let stderr = String::from_utf8(out.stderr).unwrap();
    let lines: Vec<&str> = stderr.lines().filter(|l| l.starts_with("eval at ")).collect();
    assert_eq!(lines.len(), evals.len(), "{stderr}");
    for (line, e) in lines.iter().zip(evals) {
        let expected = format!(
            "eval at {} symbols: {:.4} bpc",
            e["symbols"].as_u64().unwrap(),
            e["bpc"].as_f64().unwrap()
        );
        assert!(line.starts_with(&expected), "{line:?} does not start with {expected:?}");
    }
    std::fs::remove_dir_all(corpus.parent().unwrap()).unwrap();
}
