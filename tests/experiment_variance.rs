//! The gradient-noise experiment at a tiny size: finite relative variances, UORO's above
//! KF-RTRL's, and the CLI's JSON and plot.

use kfrtrl::experiment::variance::{VarianceConfig, run_variance};

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

#[test]
fn cli_prints_rows_and_draws_the_plot() {
    let dir = std::env::temp_dir().join(format!("kfrtrl-test-variance-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let plot = dir.join("variance.svg");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_kfrtrl"))
        .args(["experiment", "variance", "--hidden", "4,6", "--steps", "50", "--samples", "16"])
        .args(["--sequences", "1", "--json", "--plot"])
        .arg(&plot)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
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
