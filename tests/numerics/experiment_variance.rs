//! The gradient-noise experiment at a tiny size: finite relative variances, UORO's above
//! KF-RTRL's, and the CLI's JSON and plot.

use kfrtrl::tools::experiment::variance::{VarianceConfig, run_variance};

#[test]
fn tiny_variance_experiment_orders_the_estimators() {
    let cfg = VarianceConfig {
        hidden: vec![4, 8],
        steps: 30,
        samples: 64,
        sequences: 2,
        vocab: 4,
        every: 10,
        ..VarianceConfig::default()
    };
    let r = run_variance(&cfg, |_, _| {}).unwrap();
    assert_eq!(r.rows.len(), 2 * 2 * 3);
    for row in &r.rows {
        assert!(row.rel_var.is_finite() && row.rel_var > 0.0, "{row:?}");
    }
    for n in [4, 8] {
        for t in [10, 20, 30] {
            let kf = r.get("kf-rtrl", n, t).unwrap();
            let uoro = r.get("uoro", n, t).unwrap();
            assert!(uoro > 2.0 * kf, "n={n} t={t}: uoro {uoro} vs kf {kf}");
        }
    }
}

/// Runs a tiny `kfrtrl experiment variance --json --plot <dir>/<file_name>` in a fresh
/// directory; returns the directory, the plot's path and stdout.
fn run_cli_with_plot(file_name: &str) -> (std::path::PathBuf, std::path::PathBuf, Vec<u8>) {
    let dir = std::env::temp_dir().join(format!("kfrtrl-test-variance-{}-{file_name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let plot = dir.join(file_name);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_kfrtrl"))
        .args(["experiment", "variance", "--hidden", "4,6", "--steps", "50", "--samples", "16"])
        .args(["--sequences", "1", "--json", "--plot"])
        .arg(&plot)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    (dir, plot, out.stdout)
}

#[test]
fn cli_prints_rows_and_draws_the_plot() {
    let (dir, plot, stdout) = run_cli_with_plot("variance.svg");
    let v: serde_json::Value = serde_json::from_slice(&stdout).unwrap();
    let rows = v["rows"].as_array().unwrap();
    for learner in ["kf-rtrl", "uoro"] {
        for n in [4, 6] {
            assert!(
                rows.iter()
                    .any(|r| r["learner"] == learner && r["n"] == n && r["t"] == 50 && r["rel_var"].is_f64()),
                "no row for {learner} n={n} t=50"
            );
        }
    }
    let svg = std::fs::read_to_string(&plot).unwrap();
    assert!(svg.starts_with("<svg") && svg.contains("kf-rtrl") && svg.contains("uoro"));
    let _ = std::fs::remove_dir_all(&dir);
}

/// Pixels of `rgb` (8-bit RGB) that have exactly the colour `c`.
fn count_colour(rgb: &[u8], c: [u8; 3]) -> usize {
    rgb.chunks_exact(3).filter(|p| *p == c).count()
}

#[test]
fn cli_draws_the_plot_as_png() {
    let (dir, plot, _) = run_cli_with_plot("variance.PNG");
    let decoder = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(&plot).unwrap()));
    let mut reader = decoder.read_info().unwrap();
    let mut rgb = vec![0; reader.output_buffer_size().unwrap()];
    let frame = reader.next_frame(&mut rgb).unwrap();
    // Two panels (over t, over n) side by side.
    assert_eq!((frame.width, frame.height), (1280, 440));
    assert_eq!(frame.color_type, png::ColorType::Rgb);
    let rgb = &rgb[..frame.buffer_size()];
    let white = count_colour(rgb, [255, 255, 255]);
    assert!(white > rgb.len() / 3 / 2, "the background is white: {white} white pixels");
    // The first two series' colours (kf-rtrl n=4 and n=6 in the first panel) are drawn.
    for c in [[31, 119, 180], [255, 127, 14]] {
        assert!(count_colour(rgb, c) > 50, "too few pixels of {c:?}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn cli_refuses_an_unknown_plot_format_or_a_missing_directory_before_running() {
    let refused = |plot: &str| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_kfrtrl"))
            .args(["experiment", "variance", "--hidden", "4", "--steps", "50", "--plot", plot])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2));
        // The argument parser refuses the name (clap's "invalid value ... for '--plot"), before
        // any step of the experiment.
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(stderr.contains(&format!("invalid value '{plot}' for '--plot")), "{stderr}");
        stderr
    };
    assert!(refused("variance.jpg").contains("use a .svg or .png file name"));
    let missing = std::env::temp_dir().join(format!("kfrtrl-no-such-dir-{}", std::process::id()));
    let stderr = refused(missing.join("variance.svg").to_str().unwrap());
    assert!(stderr.contains("does not exist"), "{stderr}");
}

/// The table's columns are t = 50 and t = T; with an --every that did not divide 50, the first
/// was never measured and printed NaN.
#[test]
fn cli_table_measures_t_50_whatever_every_is() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_kfrtrl"))
        .args(["experiment", "variance", "--hidden", "4", "--steps", "60", "--every", "7", "--samples", "8"])
        .args(["--sequences", "1"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        stdout.lines().nth(1).is_some_and(|l| l.contains("kf-rtrl@50/60") && l.contains("uoro@50/60")),
        "{stdout}"
    );
    assert!(!stdout.to_lowercase().contains("nan"), "{stdout}");
    let cfg = VarianceConfig {
        hidden: vec![4],
        steps: 20,
        samples: 8,
        sequences: 1,
        vocab: 4,
        every: 7,
        also_at: vec![3, 14, 50],
        ..VarianceConfig::default()
    };
    let times: Vec<usize> = run_variance(&cfg, |_, _| {})
        .unwrap()
        .rows
        .iter()
        .filter(|r| r.learner == "uoro")
        .map(|r| r.t)
        .collect();
    assert_eq!(times, [3, 7, 14, 20]);
}

/// OK's noise falls with its rank, OK-1's is no more than KF-RTRL's, for every cell (RESULTS'
/// RHN table comes from the same run at larger sizes).
#[test]
fn ok_variance_falls_with_rank_for_every_cell() {
    use kfrtrl::core::{CellKind, LearnerKind};
    use kfrtrl::tools::experiment::variance::Estimator;
    let est = |learner, rank| Estimator { learner, rank };
    for cell in CellKind::ALL {
        let cfg = VarianceConfig {
            cell,
            estimators: vec![
                est(LearnerKind::KfRtrl, 1),
                est(LearnerKind::Ok, 1),
                est(LearnerKind::Ok, 2),
                est(LearnerKind::Ok, 4),
            ],
            hidden: vec![6],
            steps: 20,
            samples: 200,
            sequences: 1,
            vocab: 4,
            every: 20,
            ..VarianceConfig::default()
        };
        let r = run_variance(&cfg, |_, _| {}).unwrap();
        let v = |l: &str| r.get(l, 6, 20).unwrap();
        eprintln!("{cell}: kf {} ok:1 {} ok:2 {} ok:4 {}", v("kf-rtrl"), v("ok:1"), v("ok:2"), v("ok:4"));
        assert!(v("ok:1") <= 1.1 * v("kf-rtrl"), "{cell}");
        assert!(v("ok:2") < v("ok:1") && v("ok:4") < v("ok:2"), "{cell}");
        assert!(v("ok:4") > 0.0, "{cell}: still random at rank 4");
    }
}

/// With given weights and a corpus, the experiment measures at those weights on windows of that
/// corpus, past the service's width limit for exact RTRL (72 > 64): a corpus of one repeated
/// token gives other numbers than a varied one, OK at full rank is exact there too, and a
/// corpus shorter than the sequences is refused.
#[test]
fn trained_weights_and_a_corpus_replace_the_random_ones() {
    use kfrtrl::core::{CellKind, LearnerKind, ModelConfig, Params};
    use kfrtrl::tools::experiment::variance::{Estimator, TrainedWeights};
    let config = ModelConfig {
        vocab_size: 3,
        cell: CellKind::Tanh,
        hidden: 72,
        init_std: 0.1,
        ..ModelConfig::default()
    };
    let params = Params::<f64>::init(&config.check().unwrap());
    let run = |tokens: Vec<u32>, rank: usize| {
        let cfg = VarianceConfig {
            estimators: vec![Estimator { learner: LearnerKind::Ok, rank }],
            steps: 6,
            samples: 4,
            sequences: 1,
            every: 3,
            trained: Some(TrainedWeights { config: config.clone(), params: params.clone(), tokens }),
            ..VarianceConfig::default()
        };
        run_variance(&cfg, |_, _| {})
    };
    let varied: Vec<u32> = (0..40).map(|i| (i * 7 % 3) as u32).collect();
    let a = run(varied.clone(), 1).unwrap();
    let b = run(vec![1; 40], 1).unwrap();
    assert_eq!(a.rows.iter().map(|r| r.n).collect::<Vec<_>>(), vec![72, 72]);
    let (va, vb) = (a.get("ok:1", 72, 6).unwrap(), b.get("ok:1", 72, 6).unwrap());
    assert!(va > 0.0 && vb > 0.0 && (va - vb).abs() > 1e-6 * va, "varied {va} vs repeated {vb}");
    // Rank 6 carries all 6 steps' terms: no reduction has dropped anything.
    let exact = run(varied, 6).unwrap();
    assert!(exact.get("ok:6", 72, 6).unwrap() < 1e-20, "{:?}", exact.rows);
    assert!(run(vec![0; 5], 1).is_err(), "a corpus shorter than the steps must be refused");
}
