//! What `kfrtrl train` saves and how `--init` continues it: the save's checks, the weights,
//! optimizer, place in the corpus and streams' states of a stopped run, checkpoints during a
//! run, and a server checkpoint as a starting point.

use kfrtrl::engine::model_file::load;

use super::train_reports::corpus;

fn kfrtrl(args: &[&str], paths: &[(&str, &std::path::Path)]) -> std::process::Output {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_kfrtrl"));
    cmd.arg("train").args(args);
    for (flag, path) in paths {
        cmd.arg(flag).arg(path);
    }
    cmd.output().unwrap()
}

fn json(out: &std::process::Output) -> serde_json::Value {
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// A `--save` in a missing directory used to fail only after the whole run, with no report. It
/// is refused when the flags are parsed: before the corpus is even read.
#[test]
fn train_refuses_a_save_path_in_a_missing_directory_before_training() {
    let dir = std::env::temp_dir().join(format!("kfrtrl-cli-train-save-missing-{}", std::process::id()));
    let out = kfrtrl(
        &["--symbols", "20"],
        &[("--corpus", &dir.join("missing-corpus.txt")), ("--save", &dir.join("nowhere").join("m.st"))],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("nowhere") && stderr.contains("does not exist"), "{stderr}");
    assert!(!stderr.contains("missing-corpus"), "the corpus was read first: {stderr}");
    assert!(out.stdout.is_empty());
    let corpus = corpus("save-dir");
    let out = kfrtrl(&["--symbols", "20"], &[("--corpus", &corpus), ("--save", corpus.parent().unwrap())]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("not a file name"), "{stderr}");
    std::fs::remove_dir_all(corpus.parent().unwrap()).unwrap();
}

/// A save that fails at the end (here: a directory that exists but takes no files) used to throw
/// the run's report away; the report is printed first, then the failure exits 2.
#[test]
fn train_prints_its_report_even_when_the_save_fails() {
    let corpus = corpus("save-fails");
    let out = kfrtrl(
        &["--format", "ptb-char", "--hidden", "4", "--symbols", "20", "--json"],
        &[("--corpus", &corpus), ("--save", std::path::Path::new("/proc/self/model.st"))],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("/proc/self/model.st"), "{stderr}");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("the report is on stdout");
    assert_eq!(report["symbols"], 24);
    std::fs::remove_dir_all(corpus.parent().unwrap()).unwrap();
}

/// `--init` continues a saved model where it stopped: its weights, Adam moments, place in the
/// corpus, reset phase and sign counters. Stopped at a multiple of the reset period, two runs of
/// an online learner give the weights of one uninterrupted run exactly, and the same evaluations.
#[test]
fn train_continued_with_init_equals_one_uninterrupted_run() {
    for learner in ["kf-rtrl", "uoro", "rtrl"] {
        continued_equals_uninterrupted(learner);
    }
}

fn continued_equals_uninterrupted(learner: &str) {
    let corpus = corpus(&format!("init-{learner}"));
    let dir = corpus.parent().unwrap();
    let (full, half, rest) = (dir.join("full.st"), dir.join("half.st"), dir.join("rest.st"));
    let common =
        ["--format", "ptb-char", "--batch", "2", "--reset-every", "50", "--eval-every", "200", "--json"];
    let model = [
        "--cell",
        "rhn",
        "--hidden",
        "6",
        "--seed",
        "4",
        "--lr",
        "0.01",
        "--clip",
        "0",
        "--learner",
        learner,
    ];
    let one = json(&kfrtrl(
        &[&common[..], &model, &["--symbols", "800"]].concat(),
        &[("--corpus", &corpus), ("--eval", &corpus), ("--save", &full)],
    ));
    let first = json(&kfrtrl(
        &[&common[..], &model, &["--symbols", "400"]].concat(),
        &[("--corpus", &corpus), ("--eval", &corpus), ("--save", &half)],
    ));
    // Format, batch and reset period are the saved run's unless given (regression: the batch
    // fell back to 8 and the resets stopped, which made a continued PTB run worse).
    let second = json(&kfrtrl(
        &["--eval-every", "200", "--json", "--symbols", "400"],
        &[("--corpus", &corpus), ("--eval", &corpus), ("--init", &half), ("--save", &rest)],
    ));
    assert_eq!(second["batch"], 2);
    let (a, b) = (load(&full).unwrap(), load(&rest).unwrap());
    assert_eq!(a.params, b.params, "{learner}");
    assert_eq!(a.optimizer, b.optimizer);
    assert_eq!(a.counters, b.counters);
    assert_eq!(a.config, b.config);
    assert_eq!(a.metadata["symbols"], b.metadata["symbols"]);
    assert_eq!(second["start_symbols"], 400);
    assert_eq!(second["symbols"], 400);
    assert_eq!(one["eval_bpc"], second["eval_bpc"]);
    let evals = |r: &serde_json::Value| r["evals"].as_array().unwrap().clone();
    assert_eq!(evals(&one), [evals(&first), evals(&second)].concat());
    // The flags that may change between runs do.
    let faster = dir.join("faster.st");
    json(&kfrtrl(
        &[&common[..], &["--symbols", "400", "--lr", "0.02"]].concat(),
        &[("--corpus", &corpus), ("--eval", &corpus), ("--init", &half), ("--save", &faster)],
    ));
    let c = load(&faster).unwrap();
    assert_eq!(c.config.lr, 0.02);
    assert_eq!(c.optimizer.steps, a.optimizer.steps);
    assert_ne!(c.params, a.params);
    std::fs::remove_dir_all(dir).unwrap();
}

/// What `--init` cannot change or read is refused before any training, with the reason.
#[test]
fn train_init_refuses_a_changed_model_or_a_foreign_corpus() {
    let corpus = corpus("init-refusals");
    let dir = corpus.parent().unwrap();
    let saved = dir.join("saved.st");
    json(&kfrtrl(
        &["--format", "ptb-char", "--hidden", "4", "--symbols", "20", "--json"],
        &[("--corpus", &corpus), ("--save", &saved)],
    ));
    let refused_with = |args: &[&str], corpus: &std::path::Path, init: &std::path::Path, needle: &str| {
        let out = kfrtrl(args, &[("--corpus", corpus), ("--init", init)]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{stderr}");
        assert!(stderr.contains(needle), "{needle:?} not in {stderr}");
        assert!(out.stdout.is_empty());
    };
    let refused =
        |args: &[&str], corpus: &std::path::Path, needle: &str| refused_with(args, corpus, &saved, needle);
    refused(&["--hidden", "8"], &corpus, "cannot be used with");
    refused(&["--cell", "tanh"], &corpus, "cannot be used with");
    refused(&["--format", "bytes"], &corpus, "was trained on the ptb-char format, not bytes");
    let foreign = dir.join("foreign.txt");
    std::fs::write(&foreign, "a b z\n").unwrap();
    refused(&[], &foreign, "symbol \"z\" is not in the model's vocabulary");
    refused(&[], &dir.join("missing.txt"), "missing.txt");
    refused_with(&[], &corpus, &dir.join("missing.st"), "missing.st");
    std::fs::remove_dir_all(dir).unwrap();
}

/// A server checkpoint holds a byte-level model whose counters count write-ahead-log records:
/// `--init` takes its weights, starts at the corpus's beginning and adds up its symbols; a
/// checkpoint of a model with another vocabulary (no symbol list) is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn train_init_continues_a_server_checkpoint() {
    use kfrtrl::engine::{
        Engine, EngineLimits, EngineMetrics, Mode, ModelDefinition, TokenInput, checkpoint,
    };
    let corpus = corpus("init-server");
    let dir = corpus.parent().unwrap().to_path_buf();
    let metrics = EngineMetrics::register(&prometheus::Registry::new()).unwrap();
    let engine = Engine::new(EngineLimits::default(), metrics);
    let mut files = Vec::new();
    for (name, vocab_size) in [("bytes", 256), ("small", 16)] {
        let def = ModelDefinition { vocab_size, hidden: 6, ..ModelDefinition::with_defaults(name, 4) };
        engine.create_model(def).await.unwrap();
        let input = TokenInput {
            tokens: vec![1, 2, 3, 4, 5],
            learn: true,
            reset: false,
            top_k: 1,
            return_losses: false,
        };
        engine.tokens(name, "s", input, Mode::Consume).await.unwrap();
        let file = checkpoint::into_model_file(engine.snapshot(name).await.unwrap()).unwrap();
        assert!(file.counters.steps > 0 && file.counters.symbols == 5, "{:?}", file.counters);
        let path = dir.join(format!("{name}.ckpt"));
        kfrtrl::engine::model_file::save(&path, &file).unwrap();
        files.push((path, file));
    }
    engine.shutdown().await;
    let (bytes_path, bytes_file) = &files[0];
    let out = dir.join("continued.st");
    let report = json(&kfrtrl(
        &["--symbols", "40", "--batch", "2", "--learner", "frozen", "--json"],
        &[("--corpus", &corpus), ("--init", bytes_path), ("--save", &out)],
    ));
    assert_eq!(report["start_symbols"], 5);
    let continued = load(&out).unwrap();
    assert_eq!(continued.params, bytes_file.params);
    assert_eq!(continued.counters.steps, 20);
    assert_eq!(continued.counters.symbols, 45);
    assert_eq!(continued.config.hidden, 6);
    assert_eq!(continued.metadata["corpus_format"], "bytes");
    let small = kfrtrl(&["--symbols", "40"], &[("--corpus", &corpus), ("--init", &files[1].0)]);
    let stderr = String::from_utf8_lossy(&small.stderr);
    assert_eq!(small.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("the model's vocabulary has 16 symbols, the bytes format 256"), "{stderr}");
    std::fs::remove_dir_all(dir).unwrap();
}

/// Regression: `--init` started the streams at zero, so a run without resets (a server's
/// protocol, issue 17's long char-PTB epochs) continued as another run and a long one could not
/// be split across machines. The file now holds the streams' states, `--checkpoint-every`
/// writes it during the run, and a run stopped anywhere continues bit for bit.
#[test]
fn train_continued_without_resets_equals_one_uninterrupted_run() {
    for learner in ["ok:2", "tbptt:7"] {
        let corpus = corpus(&format!("resume-{}", learner.replace(':', "")));
        let dir = corpus.parent().unwrap();
        let (full, half, rest) = (dir.join("full.st"), dir.join("half.st"), dir.join("rest.st"));
        let common = [
            "--format",
            "ptb-char",
            "--batch",
            "3",
            "--eval-every",
            "150",
            "--json",
            "--hidden",
            "6",
            "--seed",
            "4",
            "--lr",
            "0.01",
            "--learner",
            learner,
        ];
        let one = json(&kfrtrl(
            &[&common[..], &["--symbols", "600"]].concat(),
            &[("--corpus", &corpus), ("--eval", &corpus), ("--save", &full)],
        ));
        // The first part fails after its checkpoints and before its final save (its trace plot
        // cannot be written), as a run stopped early would: its file is the checkpoint at 240.
        let first = kfrtrl(
            &[&common[..], &["--symbols", "300", "--checkpoint-every", "40", "--trace-every", "1000"]]
                .concat(),
            &[
                ("--corpus", &corpus),
                ("--eval", &corpus),
                ("--save", &half),
                ("--trace-plot", std::path::Path::new("/proc/self/trace.svg")),
            ],
        );
        let stderr = String::from_utf8_lossy(&first.stderr);
        assert_eq!(first.status.code(), Some(2), "{stderr}");
        for symbols in [120, 240] {
            let line = format!("checkpoint at {symbols} symbols: {}", half.display());
            assert!(stderr.contains(&line), "{line:?} not in {stderr}");
        }
        assert!(!stderr.contains("checkpoint at 300 symbols"), "none at the last step: {stderr}");
        let first: serde_json::Value = serde_json::from_slice(&first.stdout).expect("the report is out");
        let checkpoint = load(&half).unwrap();
        assert_eq!((checkpoint.counters.steps, checkpoint.counters.symbols), (80, 240));
        let second = json(&kfrtrl(
            &["--eval-every", "150", "--json", "--symbols", "360"],
            &[("--corpus", &corpus), ("--eval", &corpus), ("--init", &half), ("--save", &rest)],
        ));
        let (a, b) = (load(&full).unwrap(), load(&rest).unwrap());
        assert_eq!(a.params, b.params, "{learner}");
        assert_eq!(a.optimizer, b.optimizer, "{learner}");
        assert_eq!(a.counters, b.counters);
        assert_eq!(a.extra, b.extra, "{learner}: the streams at the end");
        assert_eq!(one["eval_bpc"], second["eval_bpc"]);
        let evals = |r: &serde_json::Value| r["evals"].as_array().unwrap().clone();
        let before: Vec<_> =
            evals(&first).into_iter().filter(|e| e["symbols"].as_u64().unwrap() <= 240).collect();
        assert_eq!(evals(&one), [before, evals(&second)].concat());
        // Streams that do not fit the continued run (another batch) start at zero, with a note.
        let other = kfrtrl(
            &["--batch", "2", "--symbols", "20", "--json"],
            &[("--corpus", &corpus), ("--init", &half)],
        );
        let stderr = String::from_utf8_lossy(&other.stderr);
        assert!(
            stderr.contains("streams are not continued (it saved 3 streams, this run has 2)"),
            "{stderr}"
        );
        json(&other);
        std::fs::remove_dir_all(dir).unwrap();
    }
}

/// A checkpoint period of zero, or one without a file to write, is refused before training.
#[test]
fn train_refuses_a_checkpoint_period_of_zero_or_without_save() {
    let corpus = corpus("checkpoint-refusals");
    let out = kfrtrl(
        &["--symbols", "20", "--checkpoint-every", "0"],
        &[("--corpus", &corpus), ("--save", &corpus.with_extension("st"))],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("--checkpoint-every must be at least 1"), "{stderr}");
    let out = kfrtrl(&["--symbols", "20", "--checkpoint-every", "5"], &[("--corpus", &corpus)]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("--save"), "{stderr}");
    std::fs::remove_dir_all(corpus.parent().unwrap()).unwrap();
}
