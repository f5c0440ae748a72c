//! Bad flags of the subcommands: a clear error and exit code 2, never a panic or a silent
//! substitute.

use std::process::{Command, Output};

fn kfrtrl(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kfrtrl")).args(args).output().unwrap()
}

/// Panics unless `args` exit 2 with `needle` on stderr, nothing on stdout and no panic.
fn refused(args: &[&str], needle: &str) {
    let out = kfrtrl(args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
    assert!(stderr.contains(needle), "{args:?}: {needle:?} not in {stderr}");
    assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
    assert!(out.stdout.is_empty(), "{args:?}: {}", String::from_utf8_lossy(&out.stdout));
}

/// `--batch 0` used to run with one stream instead.
#[test]
fn a_batch_of_zero_is_refused_by_train_bench_and_copy() {
    refused(&["train", "--batch", "0", "--hidden", "4", "--symbols", "10"], "--batch must be at least 1");
    let bench = ["bench", "--cell", "tanh", "--hidden", "4", "--reps", "1", "--seconds", "0.01", "--json"];
    refused(&[&bench[..], &["--batch", "2,0"]].concat(), "--batch values must be at least 1");
    let copy = ["experiment", "copy", "--hidden", "4", "--steps", "10", "--json"];
    refused(&[&copy[..], &["--batch", "0"]].concat(), "--batch must be at least 1");
}

/// `experiment copy --steps 0` reported a run of zero steps instead of refusing it.
#[test]
fn a_copy_run_of_zero_steps_is_refused() {
    refused(&["experiment", "copy", "--hidden", "4", "--steps", "0", "--json"], "--steps must be at least 1");
}

/// A symbol count whose steps of `B` streams pass `u64::MAX` used to overflow (a panic in a
/// debug build, a wrapped count in a release build).
#[test]
fn train_refuses_more_symbols_than_can_be_counted() {
    let train = ["train", "--hidden", "4", "--batch", "8"];
    refused(&[&train[..], &["--symbols", "18446744073709551615"]].concat(), "more than can be counted");
    refused(&[&train[..], &["--epochs", "1e300"]].concat(), "more symbols than can be counted");
}

/// `bench --seconds` out of range reached `Duration::from_secs_f64`, which panics.
#[test]
fn bench_refuses_seconds_that_are_not_a_positive_duration() {
    let bench = ["bench", "--cell", "tanh", "--hidden", "4", "--batch", "1", "--reps", "1"];
    for seconds in ["--seconds=-1", "--seconds=NaN", "--seconds=inf", "--seconds=0", "--seconds=1e20"] {
        refused(&[&bench[..], &[seconds]].concat(), "--seconds must be positive");
    }
}

/// `bench --reps 0` ran one repetition anyway, and a huge count aborted on reserving its rates.
#[test]
fn bench_refuses_a_repetition_count_of_zero_or_beyond_its_bound() {
    let bench = ["bench", "--cell", "tanh", "--hidden", "4", "--batch", "1", "--seconds", "0.01"];
    for reps in ["--reps=0", "--reps=10001", "--reps=18446744073709551615"] {
        refused(&[&bench[..], &[reps]].concat(), "--reps must be between 1 and 10000");
    }
}

/// `healthcheck --timeout-secs 1e20` passed the positivity check and panicked in
/// `Duration::from_secs_f64`. It is unhealthy (exit 1: Docker reserves 2) with the reason.
#[test]
fn healthcheck_refuses_a_timeout_beyond_durations_range() {
    for timeout in ["1e20", "inf", "0", "-1"] {
        let out = kfrtrl(&[
            "healthcheck",
            "--url",
            "http://127.0.0.1:9/readyz",
            &format!("--timeout-secs={timeout}"),
        ]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{timeout}: {stderr}");
        assert!(stderr.contains("--timeout-secs must be positive"), "{timeout}: {stderr}");
    }
}

/// `experiment copy --learner frozen` was accepted, undocumented, and could never learn.
#[test]
fn copy_refuses_the_frozen_learner() {
    refused(
        &["experiment", "copy", "--learner", "frozen", "--hidden", "4", "--steps", "10", "--json"],
        "--learner frozen learns nothing",
    );
}

/// `train --eval-every` without `--eval` was silently ignored.
#[test]
fn train_refuses_eval_every_without_eval() {
    refused(&["train", "--hidden", "4", "--symbols", "10", "--eval-every", "5", "--json"], "--eval <EVAL>");
}

/// An allowed origin that is not `scheme://host[:port]` would never match a browser's `Origin`:
/// refused before the server starts.
#[test]
fn serve_refuses_an_allowed_origin_that_is_not_an_origin() {
    let dir = std::env::temp_dir().join(format!("kfrtrl-origins-{}", std::process::id()));
    let data = dir.to_str().unwrap();
    for list in ["nope", "https://ok.example,https://x.example/path"] {
        refused(&["serve", "--data-dir", data, "--allowed-origins", list], "is not `scheme://host[:port]`");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// A stream's share of the queue must hold the largest request, or that request could never be
/// admitted: refused before the server starts.
#[test]
fn serve_refuses_a_stream_queue_share_below_the_largest_request() {
    let dir = std::env::temp_dir().join(format!("kfrtrl-share-{}", std::process::id()));
    let data = dir.to_str().unwrap();
    refused(
        &["serve", "--data-dir", data, "--queue-tokens-per-stream", "0"],
        "limits.queue_tokens_per_stream must be positive",
    );
    refused(
        &["serve", "--data-dir", data, "--queue-requests-per-stream", "0"],
        "limits.queue_requests_per_stream must be positive",
    );
    refused(
        &["serve", "--data-dir", data, "--queue-tokens-per-stream", "100", "--max-tokens-per-request", "200"],
        "limits.queue_tokens_per_stream must be at least limits.max_tokens_per_request",
    );
    let _ = std::fs::remove_dir_all(&dir);
}
