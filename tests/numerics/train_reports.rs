//! What `kfrtrl train` reports: the prequential BPC against exact replays (frozen weights, and
//! the loss of each symbol under the weights before it was learned), and the evaluations a long
//! run prints while it runs.

use std::path::PathBuf;

use kfrtrl::core::{CellKind, LearnerKind, ModelConfig, Params};
use kfrtrl::tools::train::{TrainConfig, evaluate, train};

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
        trace_every: None,
        checkpoint_every: None,
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
            trace_every: None,
            checkpoint_every: None,
        };
        train(&cfg, &tokens, None, |_| {}).unwrap()
    };
    let spec = config(LearnerKind::KfRtrl).check().unwrap();
    for k in [0u64, 1, 7, 30] {
        let (params_k, loss_before_k) = match k {
            0 => (Params::init(&spec), 0.0),
            _ => {
                let (before, params, _) = run(k);
                (params, before.train_bpc * k as f64)
            }
        };
        let (after, params_k1, _) = run(k + 1);
        let added = after.train_bpc * (k + 1) as f64 - loss_before_k;
        let symbol = [tokens[k as usize]];
        let expected = evaluate(&spec, &params_k, &symbol);
        assert!(close(added, expected), "step {}: {added} vs {expected}", k + 1);
        let learned = evaluate(&spec, &params_k1, &symbol);
        assert!((learned - expected).abs() > 1e-3, "step {}: learning did not change the loss", k + 1);
    }
}

pub(crate) fn corpus(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("kfrtrl-cli-train-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("corpus.txt");
    std::fs::write(&path, "a b _ c\na _ b c\nc a b\n".repeat(40)).unwrap();
    path
}

/// `kfrtrl train --format ptb-char --batch 2 --json ARGS` on `corpus`, evaluated on it too.
fn train_on_itself(corpus: &std::path::Path, args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_kfrtrl"))
        .args(["train", "--format", "ptb-char", "--batch", "2", "--json"])
        .args(args)
        .arg("--corpus")
        .arg(corpus)
        .arg("--eval")
        .arg(corpus)
        .output()
        .unwrap()
}

/// A run stopped before its end used to have reported nothing: the periodic evaluations reached
/// only the final JSON, and the progress bar is hidden when stderr is not a terminal.
#[test]
fn train_prints_each_periodic_evaluation_on_stderr_as_it_is_taken() {
    let corpus = corpus("evals");
    let out = train_on_itself(
        &corpus,
        &["--cell", "tanh", "--hidden", "8", "--symbols", "400", "--eval-every", "100", "--seed", "3"],
    );
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

/// A period of 0 means none: `--reset-every 0` resets nothing and `--eval-every 0` evaluates
/// nothing, without reaching a division by zero (mutation testing found neither tested).
#[test]
fn a_period_of_zero_is_no_reset_and_no_evaluation() {
    let tokens = text(50);
    let run = |reset_every, eval_every| {
        let cfg = TrainConfig {
            model: config(LearnerKind::KfRtrl),
            batch: 2,
            steps: 30,
            reset_every,
            eval_every,
            trace_every: None,
            checkpoint_every: None,
        };
        train(&cfg, &tokens, Some(&tokens[..20]), |_| {}).unwrap()
    };
    let (none, params_none, _) = run(None, None);
    let (zero, params_zero, _) = run(Some(0), Some(0));
    assert_eq!(params_zero, params_none);
    assert_eq!(zero.train_bpc, none.train_bpc);
    assert!(zero.evals.is_empty());
    assert_eq!(none.nonfinite_updates, 0, "a healthy run skips no update");
    let (_, params_reset, _) = run(Some(7), None);
    assert_ne!(params_reset, params_none, "resets change the run");
    // Evaluations fall on the steps that cross a multiple of the period.
    let (every_14, _, _) = run(None, Some(14));
    let at: Vec<u64> = every_14.evals.iter().map(|e| e.symbols).collect();
    assert_eq!(at, [14, 28, 42, 56]);
}

/// `train_bpc_final` was 0 for a run of fewer than ten steps (its last 10% had no step); it is
/// over at least the last step. Runs of 8 and 9 steps share their first 8, so the 9th step's BPC
/// is `9·t₉ − 8·t₈` of their `train_bpc`s.
#[test]
fn train_bpc_final_of_a_run_shorter_than_ten_steps_is_its_last_steps() {
    let tokens = text(60);
    let run = |steps| {
        let cfg = TrainConfig {
            model: config(LearnerKind::KfRtrl),
            batch: 2,
            steps,
            reset_every: None,
            eval_every: None,
            trace_every: None,
            checkpoint_every: None,
        };
        train(&cfg, &tokens, None, |_| {}).unwrap().0
    };
    let one = run(1);
    assert!(one.train_bpc > 0.0 && close(one.train_bpc_final, one.train_bpc), "{one:?}");
    let (eight, nine) = (run(8), run(9));
    let last = 9.0 * nine.train_bpc - 8.0 * eight.train_bpc;
    assert!(close(nine.train_bpc_final, last), "{} vs {last}", nine.train_bpc_final);
}

/// A run whose steps of every stream pass `u64::MAX` symbols is refused before it starts (the
/// count overflowed).
#[test]
fn train_refuses_a_run_whose_symbol_count_overflows() {
    let cfg = TrainConfig {
        model: config(LearnerKind::Frozen),
        batch: 2,
        steps: u64::MAX / 2 + 1,
        reset_every: None,
        eval_every: None,
        trace_every: None,
        checkpoint_every: None,
    };
    let e = train(&cfg, &text(10), None, |_| {}).unwrap_err();
    assert_eq!(e.field, "steps", "{e}");
}

/// The running BPC of the progress bar and the evaluation lines: the first step's BPC, then an
/// exponential average with weight 0.001 on each new step's.
#[test]
fn running_bpc_is_the_exponential_average_of_the_steps_bpc() {
    let tokens = text(60);
    let cfg = TrainConfig {
        model: config(LearnerKind::Frozen),
        batch: 3,
        steps: 12,
        reset_every: None,
        eval_every: None,
        trace_every: None,
        checkpoint_every: None,
    };
    let mut reported = Vec::new();
    let (_, params, _) = train(&cfg, &tokens, None, |p| reported.push((p.symbols, p.recent_bpc))).unwrap();
    let spec = cfg.model.check().unwrap();
    // Stream s reads from offset 20·s; with frozen weights its first t losses are a replay.
    let stream_sum = |s: usize, t: usize| match t {
        0 => 0.0,
        _ => evaluate(&spec, &params, &tokens[20 * s..20 * s + t]) * t as f64,
    };
    let step_bpc = |t: usize| (0..3).map(|s| stream_sum(s, t + 1) - stream_sum(s, t)).sum::<f64>() / 3.0;
    let mut recent = step_bpc(0);
    for (t, &(symbols, got)) in reported.iter().enumerate() {
        if t > 0 {
            recent = 0.999 * recent + 0.001 * step_bpc(t);
        }
        assert_eq!(symbols, 3 * (t as u64 + 1));
        assert!(close(got, recent), "step {}: {got} vs {recent}", t + 1);
    }
}

/// The trace records every `trace_every`-th step: its clipped flag agrees with the gradient norms
/// and the clip scope, and the influence norms are those of the carried factors (none for TBPTT).
#[test]
fn the_trace_reports_gradient_and_influence_norms_every_n_steps() {
    let tokens = text(97);
    for (learner, carries) in
        [(LearnerKind::KfRtrl, true), (LearnerKind::Ok, true), (LearnerKind::Tbptt, false)]
    {
        let model = ModelConfig { clip: 0.05, ..config(learner) };
        let cfg = TrainConfig {
            model,
            batch: 3,
            steps: 40,
            reset_every: None,
            eval_every: None,
            trace_every: Some(7),
            checkpoint_every: None,
        };
        let mut seen = Vec::new();
        let (report, _, _) = train(&cfg, &tokens, None, |p| seen.extend(p.trace)).unwrap();
        let steps: Vec<u64> = report.trace.iter().map(|t| t.symbols / 3).collect();
        assert_eq!(steps, [7, 14, 21, 28, 35], "{learner}");
        assert_eq!(seen.len(), report.trace.len(), "{learner}: every point reaches the progress callback");
        for t in &report.trace {
            // TBPTT's gradient is empty between its windows' ends.
            assert!(t.grad_norm_w.is_finite() && (t.grad_norm_v > 0.0 || !carries), "{learner}: {t:?}");
            // The default clip scope measures W alone.
            assert_eq!(t.clipped, t.grad_norm_w > 0.05, "{learner}: {t:?}");
            assert_eq!(t.influence_norm_max > 0.0, carries, "{learner}: {t:?}");
            assert!(t.influence_norm_mean <= t.influence_norm_max, "{learner}: {t:?}");
        }
    }
}

/// The trace's Jacobian growth rate is that of each stream's own trajectory: replaying the
/// streams of a run with frozen weights through [`TangentProbe`]s seeded as the run seeds them
/// gives the same mean and largest rate at every point.
#[test]
fn the_trace_reports_the_growth_rate_of_each_streams_jacobians() {
    use kfrtrl::core::probe::TangentProbe;
    use kfrtrl::core::{Params, SlotStep, StreamSet};
    let tokens = text(50);
    let cfg = TrainConfig {
        model: ModelConfig { init_std: 0.8, ..config(LearnerKind::Frozen) },
        batch: 2,
        steps: 20,
        reset_every: None,
        eval_every: None,
        trace_every: Some(10),
        checkpoint_every: None,
    };
    let (report, params, _) = train(&cfg, &tokens, None, |_| {}).unwrap();
    let spec = cfg.model.check().unwrap();
    assert_eq!(params, Params::<f32>::init(&spec), "frozen weights");
    let mut set = StreamSet::<f32>::new(&spec, 2);
    let mut probes: Vec<TangentProbe> =
        (0..2).map(|s| TangentProbe::new(&spec, spec.config.seed ^ s)).collect();
    let mut want = Vec::new();
    for t in 0..20 {
        let inputs: Vec<SlotStep> = (0..2).map(|s| SlotStep::learn(s, tokens[(s * 25 + t) % 50])).collect();
        for (probe, x) in probes.iter_mut().zip(&inputs) {
            probe.step(&spec, &params, x.token, set.state(x.slot));
        }
        set.advance(&params, &inputs).unwrap();
        if t % 10 == 9 {
            let rates: Vec<f64> = probes.iter_mut().map(|p| p.take_rate().unwrap()).collect();
            want.push(((rates[0] + rates[1]) / 2.0, rates[0].max(rates[1])));
        }
    }
    let got: Vec<(f64, f64)> =
        report.trace.iter().map(|t| (t.tangent_growth_mean, t.tangent_growth_max)).collect();
    assert_eq!(got, want);
    assert!(want.iter().all(|&(mean, max)| mean.is_finite() && mean < max), "{want:?}");
}

/// Regression (issue 17): `kfrtrl train`'s defaults (the server's default model) did not learn
/// `abcdefgh` repeated on one stream: the last 10% stayed at 3.5 bits, above uniform over the 8
/// letters. Now within 4,800 symbols the model puts `a` after `h` with probability ≥ 0.9.
#[test]
fn the_defaults_learn_abcdefgh_repeated() {
    use kfrtrl::core::{SlotStep, StreamSet};
    let text: Vec<u32> = b"abcdefgh".repeat(600).iter().map(|&b| u32::from(b)).collect();
    let cfg = TrainConfig {
        model: ModelConfig::model_defaults(ModelConfig::default().learner),
        batch: 1,
        steps: 4_800,
        reset_every: None,
        eval_every: None,
        trace_every: None,
        checkpoint_every: None,
    };
    let (report, params, _) = train(&cfg, &text, None, |_| {}).unwrap();
    eprintln!("{} last 10%: {:.4} bits", report.learner, report.train_bpc_final);
    assert!(report.train_bpc_final < 0.5, "{}", report.train_bpc_final);
    // A fresh stream reads a few periods with the learned weights, then predicts after `h`.
    let spec = cfg.model.check().unwrap();
    let mut set = StreamSet::<f32>::new(&spec.config.frozen().check().unwrap(), 1);
    for &t in &text[..64] {
        set.advance(&params, &[SlotStep { slot: 0, token: t, learn: false, reset: false }]).unwrap();
    }
    let mut probs = vec![0.0f32; 256];
    set.predict(&params, 0, &mut probs);
    assert!(probs[usize::from(b'a')] >= 0.9, "p(a | …h) = {}", probs[usize::from(b'a')]);
}

/// A run with an influence decay or margin evaluated its held-out file with a frozen copy that
/// kept the option, which only learners with an influence may have: the run panicked at its end
/// after training (session 14 lost a 30-minute result to it).
#[test]
fn a_run_with_an_influence_decay_or_margin_evaluates_its_held_out_file() {
    let corpus = corpus("margin-eval");
    for option in [["--influence-margin", "0.01"], ["--influence-decay", "0.99"]] {
        let args = ["--hidden", "6", "--symbols", "200", "--eval-every", "100", "--learner", "ok:2"];
        let out = train_on_itself(&corpus, &[&args[..], &option[..]].concat());
        assert!(out.status.success(), "{option:?}: {}", String::from_utf8_lossy(&out.stderr));
        let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let bpc = report["eval_bpc"].as_f64().unwrap();
        assert!(bpc.is_finite() && bpc > 0.0, "{option:?}: eval {bpc}");
        assert_eq!(report["evals"].as_array().unwrap().len(), 2);
    }
    std::fs::remove_dir_all(corpus.parent().unwrap()).unwrap();
}
