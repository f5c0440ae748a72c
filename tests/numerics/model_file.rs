//! The model file: bit-exact round trip (continuing training after save + load gives exactly the
//! uninterrupted run), atomic writes, refusal of damaged files, and `kfrtrl train --save`.

use std::path::{Path, PathBuf};

use kfrtrl::core::model::UpdateUnit;
use kfrtrl::core::{
    CellKind, LearnerKind, ModelConfig, Optimizer, OptimizerKind, Params, SlotStep, StreamSet,
};
use kfrtrl::engine::model_file::{Counters, ModelFile, ModelFileError, from_bytes, load, save, to_bytes};
use kfrtrl::tools::train::{TrainConfig, evaluate, train};

fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("kfrtrl-test-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn config(optimizer: OptimizerKind) -> ModelConfig {
    ModelConfig {
        vocab_size: 5,
        cell: CellKind::Rhn,
        hidden: 6,
        learner: LearnerKind::KfRtrl,
        optimizer,
        lr: 1e-2,
        seed: 3,
        init_std: 0.3,
        ..ModelConfig::default()
    }
}

fn tokens(len: usize, b: usize) -> Vec<Vec<SlotStep>> {
    (0..len)
        .map(|t| (0..b).map(|s| SlotStep::learn(s, ((t * 7 + s * 3 + t / 3) % 5) as u32)).collect())
        .collect()
}

/// Steps `set` through `steps` with the weights and optimizer; returns the losses' bits.
fn run(
    set: &mut StreamSet<f32>,
    params: &mut Params<f32>,
    opt: &mut Optimizer<f32>,
    steps: &[Vec<SlotStep>],
) -> Vec<u64> {
    let mut out = Vec::new();
    let mut losses = vec![0.0; steps[0].len()];
    for x in steps {
        set.step(params, opt, x, &mut losses).unwrap();
        out.extend(losses.iter().map(|l| l.to_bits()));
    }
    out
}

#[test]
fn round_trip_is_bit_exact_and_training_continues_identically() {
    let dir = tmpdir("roundtrip");
    // With 10 tokens per update (3 a step: every 4 steps), the split at step 30 leaves 6 tokens'
    // gradients summed and not applied: they are saved and continue. With a ramp of 5 updates per
    // level the updates come every step first and the split falls on another count. Counting
    // steps, 7 per update, the split leaves 2 steps pending.
    let (by_tokens, by_steps) = (UpdateUnit::Tokens, UpdateUnit::Steps);
    for (optimizer, tokens_per_update, tokens_per_update_ramp, update_unit) in [
        (OptimizerKind::Adam, 1, 0, by_tokens),
        (OptimizerKind::Sgd, 1, 0, by_tokens),
        (OptimizerKind::Adam, 10, 0, by_tokens),
        (OptimizerKind::Sgd, 10, 0, by_tokens),
        (OptimizerKind::Adam, 10, 5, by_tokens),
        (OptimizerKind::Adam, 7, 0, by_steps),
    ] {
        let cfg = ModelConfig { tokens_per_update, tokens_per_update_ramp, update_unit, ..config(optimizer) };
        let spec = cfg.check().unwrap();
        let steps = tokens(60, 3);
        // Uninterrupted.
        let mut params = Params::<f32>::init(&spec);
        let mut opt = Optimizer::new(&spec);
        let mut set = StreamSet::<f32>::new(&spec, 3);
        let first = run(&mut set, &mut params, &mut opt, &steps[..30]);
        let mut set_b = set.clone();
        let rest_a = run(&mut set, &mut params, &mut opt, &steps[30..]);
        let final_a = params.clone();

        // Interrupted at step 30: the same first half, save, load, continue.
        let mut params = Params::<f32>::init(&spec);
        let mut opt = Optimizer::new(&spec);
        let mut set = StreamSet::<f32>::new(&spec, 3);
        assert_eq!(run(&mut set, &mut params, &mut opt, &steps[..30]), first);
        let mut metadata = serde_json::Map::new();
        metadata.insert("symbols".into(), serde_json::json!(["a", "b", "\n"]));
        let file = ModelFile {
            config: cfg.clone(),
            params: params.clone(),
            optimizer: opt.clone(),
            counters: Counters { steps: 30, symbols: 90, nonfinite_updates: 0 },
            metadata,
            extra: Vec::new(),
        };
        let path = dir.join(format!(
            "model-{}-{tokens_per_update}-{tokens_per_update_ramp}-{}.safetensors",
            optimizer.name(),
            update_unit.name()
        ));
        save(&path, &file).unwrap();
        let loaded = load(&path).unwrap();
        assert_eq!(loaded, file, "every field survives the round trip");
        // The schedule by hand: 3 tokens a step (1 step); update n waits for min(K, 1 + n / ramp).
        let (mut updates, mut waiting) = (0u64, 0.0);
        for _ in 0..30 {
            waiting += if update_unit == by_steps { 1.0 } else { 3.0 };
            let due = match tokens_per_update_ramp {
                0 => tokens_per_update as f64,
                ramp => (tokens_per_update as f64).min(1.0 + (updates / ramp) as f64),
            };
            if waiting >= due {
                updates += 1;
                waiting = 0.0;
            }
        }
        let pending = (tokens_per_update > 1).then_some(waiting);
        assert_eq!(loaded.optimizer.pending().map(|(_, count)| count), pending);
        assert_eq!(loaded.optimizer.steps, updates);
        assert!(waiting > 0.0 || tokens_per_update == 1, "the split leaves a sum pending");
        let (mut p2, mut o2) = (loaded.params, loaded.optimizer);
        let rest_b = run(&mut set_b, &mut p2, &mut o2, &steps[30..]);
        assert_eq!(rest_a, rest_b, "losses after the reload differ");
        assert_eq!(final_a, p2, "weights after the reload differ");
    }
}

#[test]
fn save_is_atomic_and_leaves_no_temporary_file() {
    let dir = tmpdir("atomic");
    let path = dir.join("m.safetensors");
    let a = ModelFile::init(&config(OptimizerKind::Adam)).unwrap();
    save(&path, &a).unwrap();
    let mut b = a.clone();
    b.params.w[[0, 0]] += 1.0;
    b.counters.steps = 7;
    save(&path, &b).unwrap();
    let names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, vec!["m.safetensors".to_string()], "only the target remains");
    assert_eq!(load(&path).unwrap(), b);
    // A failed save (directory missing) leaves nothing behind and reports the path.
    let bad = dir.join("missing").join("m.safetensors");
    let err = save(&bad, &a).unwrap_err();
    assert!(matches!(err, ModelFileError::Io { .. }), "{err}");
    assert!(err.to_string().contains("missing"), "{err}");
    // An inconsistent model is refused before anything is written.
    let mut c = a.clone();
    c.params.v = ndarray::Array2::zeros((2, 2));
    assert!(matches!(save(&dir.join("c.safetensors"), &c), Err(ModelFileError::Inconsistent(_))));
    assert!(!dir.join("c.safetensors").exists());
}

fn expect_invalid(bytes: &[u8], needle: &str) {
    match from_bytes(bytes) {
        Err(ModelFileError::Invalid { reason, .. }) => {
            assert!(reason.contains(needle), "reason {reason:?} should mention {needle:?}")
        }
        Err(e) => panic!("unexpected error {e}"),
        Ok(_) => panic!("a damaged file was accepted (expected {needle:?})"),
    }
}

#[test]
fn damaged_files_are_refused_with_a_clear_error() {
    let file = ModelFile::init(&config(OptimizerKind::Adam)).unwrap();
    let bytes = to_bytes(&file).unwrap();
    assert_eq!(from_bytes(&bytes).unwrap(), file);
    // A flipped bit in the tensor data.
    let mut b = bytes.clone();
    let last = b.len() - 3;
    b[last] ^= 0x10;
    expect_invalid(&b, "checksum");
    // Truncated.
    expect_invalid(&bytes[..bytes.len() - 4], "safetensors");
    expect_invalid(&bytes[..5], "safetensors");
    // Not a model file at all.
    expect_invalid(b"hello world, this is not a model", "safetensors");
    // A changed config (same length, so the table stays valid): the checksum catches it.
    let text = String::from_utf8_lossy(&bytes).into_owned();
    let pos = text.find("\\\"hidden\\\":6").expect("config in header");
    let mut b = bytes.clone();
    b[pos + 11] = b'7';
    expect_invalid(&b, "");
    // A load from disk names the file.
    let dir = tmpdir("damaged");
    let path = dir.join("bad.safetensors");
    let mut b = bytes.clone();
    b[last] ^= 0x01;
    std::fs::write(&path, &b).unwrap();
    let err = load(&path).unwrap_err().to_string();
    assert!(err.contains("bad.safetensors") && err.contains("checksum"), "{err}");
}

/// Loading used to set Adam's moments without checking their values: a negative second moment
/// (checksum intact) loaded fine and its `sqrt` turned the weights to NaN on the first update.
#[test]
fn negative_adam_second_moment_is_refused_on_load() {
    let mut file = ModelFile::init(&config(OptimizerKind::Adam)).unwrap();
    file.optimizer.v.as_mut().unwrap().v[[1, 2]] = -0.5;
    let bytes = to_bytes(&file).unwrap();
    expect_invalid(&bytes, "second moment of V");
    let dir = tmpdir("negative-moment");
    let path = dir.join("neg.safetensors");
    save(&path, &file).unwrap();
    let err = load(&path).unwrap_err().to_string();
    assert!(err.contains("neg.safetensors") && err.contains("-0.5"), "{err}");
}

fn kfrtrl_bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_kfrtrl"))
}

#[test]
fn train_save_then_load_gives_the_trained_model() {
    let dir = tmpdir("trainsave");
    let corpus = dir.join("corpus.txt");
    let text = "a b _ c\na _ b c\nc a b\n".repeat(40);
    std::fs::write(&corpus, &text).unwrap();
    let path = dir.join("model.safetensors");
    let out = std::process::Command::new(kfrtrl_bin())
        .args(["train", "--format", "ptb-char", "--cell", "tanh", "--hidden", "8", "--batch", "2"])
        .args(["--symbols", "400", "--seed", "5", "--json", "--eval"])
        .arg(&corpus)
        .arg("--corpus")
        .arg(&corpus)
        .arg("--save")
        .arg(&path)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let m = load(&path).unwrap();
    assert_eq!(m.config.hidden, 8);
    assert_eq!(m.config.cell, CellKind::Tanh);
    assert_eq!(m.counters.symbols, 400);
    assert_eq!(m.counters.steps, 200);
    // The default schedule counts steps and its first updates wait for 8 of them, whatever the
    // 2 streams: 200 steps, 25 updates (counting tokens, 2 a step, would make 50).
    assert_eq!((m.config.tokens_per_update_start, m.config.update_unit), (8, UpdateUnit::Steps));
    assert_eq!(m.optimizer.steps, 25);
    let symbols: Vec<String> = serde_json::from_value(m.metadata["symbols"].clone()).unwrap();
    assert_eq!(symbols.len(), m.config.vocab_size);
    // The saved weights give the reported held-out BPC.
    let (tokens, _) =
        kfrtrl::tools::corpus::tokenize_train(text.as_bytes(), kfrtrl::tools::corpus::Format::PtbChar)
            .unwrap();
    let bpc = evaluate(&m.spec().unwrap(), &m.params, &tokens);
    assert_eq!(bpc, report["eval_bpc"].as_f64().unwrap());
    // And the same run through the library gives the same weights.
    let cfg = TrainConfig {
        model: m.config.clone(),
        batch: 2,
        steps: 200,
        reset_every: None,
        eval_every: None,
        trace_every: None,
        checkpoint_every: None,
    };
    let (_, params, _) = train(&cfg, &tokens, None, |_| {}).unwrap();
    assert_eq!(params, m.params);
}

/// Version 2 of the format hashes each MiB of a tensor on its own and in parallel (the serial
/// checksum of version 1 bounded how fast a model could be moved between servers); files of
/// version 1 must still load, and no byte of a multi-chunk tensor may go unchecked.
#[test]
fn version_1_files_still_load_and_version_2_checks_every_chunk() {
    let mut file = ModelFile::init(&config(OptimizerKind::Adam)).unwrap();
    // 2.5 MiB of extra tensor: two whole chunks and a part, with a tail that is not 32 bytes.
    let values = 655_363;
    file.extra.push(kfrtrl::engine::model_file::ExtraTensor {
        name: "streams.big".into(),
        shape: vec![values],
        data: (0..values).map(|i| (i as f32 * 0.37).sin()).collect(),
    });
    let v1 = kfrtrl::engine::model_file::to_bytes_of_version(&file, 1).unwrap();
    assert_eq!(from_bytes(&v1).unwrap(), file, "a version-1 file loads");
    let v2 = to_bytes(&file).unwrap();
    assert_eq!(from_bytes(&v2).unwrap(), file);
    let header = String::from_utf8_lossy(&v2[..4096]).into_owned();
    assert!(header.contains("\"version\":\"2\""), "{header}");
    assert_ne!(v1, v2);
    let data_start = v2.len() - values * 4;
    for offset in [0, 8, 1 << 20, (1 << 20) + 17, (2 << 20) + 5, values * 4 - 1] {
        let mut b = v2.clone();
        b[data_start + offset] ^= 0x04;
        expect_invalid(&b, "checksum");
    }
    // Two 8-byte words of one block swapped (each lane sees the other's word).
    let mut b = v2.clone();
    let (first, second) = (data_start + 64, data_start + 72);
    let word: Vec<u8> = b[first..first + 8].to_vec();
    b.copy_within(second..second + 8, first);
    b[second..second + 8].copy_from_slice(&word);
    expect_invalid(&b, "checksum");
    // A version this build does not know.
    let needle = b"\"version\":\"2\"";
    let pos = v2.windows(needle.len()).position(|w| w == needle).expect("version in header");
    let mut b = v2.clone();
    b[pos + 11] = b'9';
    expect_invalid(&b, "version 9 is not supported");
}
