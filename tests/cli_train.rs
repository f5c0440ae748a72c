//! `kfrtrl train` through its command line: what a long run reports while it runs.

use std::path::PathBuf;

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
