//! Steady-state throughput of one online learning step (`kfrtrl bench`): for a model and a batch
//! of `B` streams, the tokens per second of the full step (readout, gradient estimate, optimizer,
//! advance), the useful floating-point work per second, and, measured in the same run with the
//! same GEMM backend, the speed of a plain f32 GEMM of the shape of the step's heavy product.
//!
//! Two reproducible variants for a shared machine, where timings are noise: [`run_steps`] runs a
//! fixed number of steps (for instruction counts under `valgrind --tool=callgrind`), and
//! [`memory`] measures the resident memory per stream of a [`StreamSet`] against the size of the
//! state [`StreamSet::export_slot`] exports.

use std::time::{Duration, Instant};

use ndarray::Array2;
use serde::Serialize;

use crate::core::linalg::{Par, gemm};
use crate::core::rng::CounterRng;
use crate::core::{LearnerKind, ModelConfig, ModelSpec, Optimizer, Params, SlotStep, StreamSet};

/// One benchmark configuration.
#[derive(Debug, Clone)]
pub struct BenchConfig {
    /// The model (its vocabulary, cell, hidden size, learner and optimizer).
    pub model: ModelConfig,
    /// Streams stepped together.
    pub batch: usize,
    /// Repetitions measured (the median is reported).
    pub reps: usize,
    /// Target duration of one repetition.
    pub rep_seconds: f64,
}

/// The measurement of one configuration.
#[derive(Debug, Clone, Serialize)]
pub struct BenchResult {
    /// Cell name.
    pub cell: String,
    /// Learner name.
    pub learner: String,
    /// Hidden units.
    pub hidden: usize,
    /// Streams per step.
    pub batch: usize,
    /// Vocabulary size.
    pub vocab: usize,
    /// Optimizer name.
    pub optimizer: String,
    /// Threads in the pool.
    pub threads: usize,
    /// Median tokens per second over all streams.
    pub tokens_per_sec: f64,
    /// Slowest repetition.
    pub tokens_per_sec_min: f64,
    /// Fastest repetition.
    pub tokens_per_sec_max: f64,
    /// Useful floating-point work per second (GFLOP/s) at the median.
    pub gflops: f64,
    /// Median GFLOP/s of a plain f32 GEMM of the heavy product's shape, same backend, same run.
    pub peak_gflops: f64,
    /// `gflops / peak_gflops`.
    pub fraction_of_peak: f64,
    /// The flop count per token behind `gflops`.
    pub flops_per_token: f64,
    /// Repetitions measured.
    pub reps: usize,
}

/// A fixed-length run: exactly `steps` batched steps of `batch` streams, nothing calibrated by
/// time, so that its instruction count is a function of the configuration.
pub fn run_steps(
    model: &ModelConfig,
    batch: usize,
    steps: usize,
) -> Result<f64, crate::core::model::ConfigError> {
    let spec = model.check()?;
    let b = batch.max(1);
    let mut params = Params::<f32>::init(&spec);
    let mut opt = Optimizer::new(&spec);
    let mut set = StreamSet::<f32>::new(&spec, b);
    let mut rng = CounterRng::new(0xBE7C);
    let mut inputs: Vec<SlotStep> = (0..b).map(|s| SlotStep::learn(s, 0)).collect();
    let mut losses = vec![0.0; b];
    let mut loss_sum = 0.0;
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(rayon::current_num_threads())
        .build()
        .expect("thread pool");
    pool.install(|| {
        for _ in 0..steps {
            for x in inputs.iter_mut() {
                x.token = rng.below(spec.vocab as u64) as u32;
            }
            set.step(&mut params, &mut opt, &inputs, &mut losses).expect("valid batch");
            loss_sum += losses.iter().sum::<f64>();
        }
    });
    Ok(loss_sum / (steps * b).max(1) as f64)
}

/// Resident memory per stream of a [`StreamSet`], against the size of its exported state.
#[derive(Debug, Clone, Serialize)]
pub struct MemoryReport {
    /// Cell name.
    pub cell: String,
    /// Learner name.
    pub learner: String,
    /// Hidden units.
    pub hidden: usize,
    /// Vocabulary size.
    pub vocab: usize,
    /// Slots (streams) in the set.
    pub streams: usize,
    /// Resident bytes one more stream costs: `((R_C − R_1) − (R_1 − R_0)) / (C − 1)`, where `R_0`
    /// is the resident set (VmRSS) before, `R_1` after building and stepping a one-slot set, and
    /// `R_C` after building and stepping the `C`-slot set as well (the per-set costs, such as the
    /// gradient buffer and per-thread workspaces, cancel).
    pub resident_bytes_per_stream: f64,
    /// The `C`-slot set's whole growth `R_C − R_1` per stream, per-set costs included.
    pub resident_bytes_per_stream_with_set: f64,
    /// Bytes of one stream's exported state ([`crate::core::SlotState::bytes`]).
    pub state_bytes: usize,
    /// `resident_bytes_per_stream / state_bytes`.
    pub ratio: f64,
    /// What [`ModelSpec::stream_bytes`] claims per stream.
    pub spec_stream_bytes: u64,
}

/// Builds a [`StreamSet`] of one slot and one of `streams` slots, steps every slot a few times (so
/// that every page of its state is touched), and reports the growth of the process's resident
/// memory per stream. Run it alone in its process: other threads' allocations would be counted.
pub fn memory(model: &ModelConfig, streams: usize) -> Result<MemoryReport, String> {
    let spec = model.check().map_err(|e| e.to_string())?;
    let c = streams.max(1);
    let mut params = Params::<f32>::init(&spec);
    let mut opt = Optimizer::new(&spec);
    let inputs: Vec<SlotStep> = (0..c).map(|s| SlotStep::learn(s, (s % spec.vocab) as u32)).collect();
    let mut losses = vec![0.0; c];
    let mut stepped = |capacity: usize| -> Result<StreamSet<f32>, String> {
        let mut set = StreamSet::<f32>::new(&spec, capacity);
        for _ in 0..3 {
            set.step(&mut params, &mut opt, &inputs[..capacity], &mut losses).map_err(|e| e.to_string())?;
        }
        Ok(set)
    };
    // Warm up the pool and the GEMM backend, so that thread stacks and the backend's buffers are
    // resident before the baseline.
    drop(stepped(1)?);
    let r0 = resident_bytes()? as f64;
    let one = stepped(1)?;
    let r1 = resident_bytes()? as f64;
    let set = stepped(c)?;
    let rc = resident_bytes()? as f64;
    drop(one);
    let state_bytes = set.export_slot(0).bytes();
    let per_stream = if c > 1 { ((rc - r1) - (r1 - r0)) / (c - 1) as f64 } else { r1 - r0 };
    Ok(MemoryReport {
        cell: spec.cell().name().into(),
        learner: spec.config.learner_label(),
        hidden: spec.n,
        vocab: spec.vocab,
        streams: c,
        resident_bytes_per_stream: per_stream,
        resident_bytes_per_stream_with_set: (rc - r1) / c as f64,
        state_bytes,
        ratio: per_stream / state_bytes as f64,
        spec_stream_bytes: spec.stream_bytes(),
    })
}

/// The process's resident set size (`VmRSS` of `/proc/self/status`).
fn resident_bytes() -> Result<u64, String> {
    let status =
        std::fs::read_to_string("/proc/self/status").map_err(|e| format!("/proc/self/status: {e}"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().strip_suffix("kB"))
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(|kb| kb * 1024)
        .ok_or_else(|| "no VmRSS in /proc/self/status".to_string())
}

/// Useful flops per stream-step of a learner: the heavy product plus the lower-order terms.
pub fn flops_per_token(spec: &ModelSpec, batch: usize) -> f64 {
    let (n, r, m, v) = (spec.n as f64, spec.r as f64, spec.m as f64, spec.vocab as f64);
    let s = spec.state_len() as f64;
    let rn = r * n;
    let forward = 2.0 * rn * n + 2.0 * rn;
    // Logits, ∇V and δ = V_hᵀ e (TBPTT takes the last two in its window's backward pass).
    let readout = 3.0 * 2.0 * v * (n + 1.0);
    let update = 4.0 * (rn * m + v * (n + 1.0)) / batch as f64; // optimizer, shared by the batch
    let learner = match spec.learner() {
        LearnerKind::KfRtrl => {
            2.0 * s * s * rn // H_t A_{t-1}
                + 2.0 * n * rn // δᵀA
                + 2.0 * rn * m // ∇W += v ⊗ u
                + 3.0 * s * rn // norms, scaling
                + 4.0 * m
        }
        LearnerKind::Uoro => 2.0 * rn * n + 6.0 * rn * m,
        LearnerKind::Rtrl => 2.0 * s * s * rn * m + 2.0 * n * rn * m,
        // ∇W_h += dZᵀ H_prev and dZ W_h; the one-hot input and bias columns of ∇W. Recomputing
        // the forward step inside the window is work TBPTT chooses, not useful flops.
        LearnerKind::Tbptt => 2.0 * rn * n * 2.0 + 2.0 * 2.0 * rn,
        LearnerKind::Frozen => 0.0,
        LearnerKind::Ok => {
            let rank = spec.config.ok_rank as f64;
            let terms = rank + 1.0;
            2.0 * s * s * rn * rank // H_t [A_1 … A_R], one GEMM
                + terms * terms * (m + s * rn) // the two Gram matrices (half, multiply-add)
                + 2.0 * terms * rank * (s * rn + m) // the rebuild
                + terms * (2.0 * n * rn + 2.0 * rn * m) // δᵀA_l and ∇W += v_l ⊗ u_l
        }
    };
    forward + readout + update + learner
}

/// Runs one configuration.
pub fn run(cfg: &BenchConfig) -> Result<BenchResult, crate::core::model::ConfigError> {
    let spec = cfg.model.check()?;
    let b = cfg.batch.max(1);
    let mut params = Params::<f32>::init(&spec);
    let mut opt = Optimizer::new(&spec);
    let mut set = StreamSet::<f32>::new(&spec, b);
    let mut rng = CounterRng::new(0xBE7C);
    let data_len = 4096;
    let data: Vec<u32> = (0..data_len * b).map(|_| rng.below(spec.vocab as u64) as u32).collect();
    let mut inputs: Vec<SlotStep> = (0..b).map(|s| SlotStep::learn(s, 0)).collect();
    let mut losses = vec![0.0; b];
    let mut t = 0usize;
    let mut run_steps = |steps: usize, params: &mut Params<f32>| {
        for _ in 0..steps {
            let row = (t % data_len) * b;
            for (s, x) in inputs.iter_mut().enumerate() {
                x.token = data[row + s];
            }
            set.step(params, &mut opt, &inputs, &mut losses).expect("valid batch");
            t += 1;
        }
    };
    // Run the loop on a pool thread, as the engine's worker does: the step's parallel sections
    // then fork from inside the pool instead of handing work across from an outside thread.
    let mut rates = Vec::with_capacity(cfg.reps);
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(rayon::current_num_threads())
        .build()
        .expect("thread pool");
    pool.install(|| {
        // Warm up, then size repetitions to the target duration.
        let steps_per_rep = calibrate(cfg.rep_seconds, |k| run_steps(k, &mut params));
        for _ in 0..cfg.reps.max(1) {
            let start = Instant::now();
            run_steps(steps_per_rep, &mut params);
            rates.push((steps_per_rep * b) as f64 / start.elapsed().as_secs_f64());
        }
    });
    let peak = pool.install(|| gemm_peak(&spec, b, cfg.reps.max(1), cfg.rep_seconds));
    let flops = flops_per_token(&spec, b);
    let tps = median(&mut rates);
    let gflops = tps * flops / 1e9;
    Ok(BenchResult {
        cell: spec.cell().name().into(),
        learner: spec.config.learner_label(),
        hidden: spec.n,
        batch: b,
        vocab: spec.vocab,
        optimizer: spec.config.optimizer.name().into(),
        threads: rayon::current_num_threads(),
        tokens_per_sec: tps,
        tokens_per_sec_min: rates.iter().copied().fold(f64::INFINITY, f64::min),
        tokens_per_sec_max: rates.iter().copied().fold(0.0, f64::max),
        gflops,
        peak_gflops: peak,
        fraction_of_peak: gflops / peak,
        flops_per_token: flops,
        reps: rates.len(),
    })
}

/// GFLOP/s of a plain f32 GEMM `(s × s)·(s × B·r·n)`: the shape of KF-RTRL's heavy product for
/// the whole batch, single-threaded and on all threads; the faster of the two.
pub fn gemm_peak(spec: &ModelSpec, batch: usize, reps: usize, rep_seconds: f64) -> f64 {
    gemm_rate(spec, batch, reps, rep_seconds, Par::Single).max(gemm_rate(
        spec,
        batch,
        reps,
        rep_seconds,
        Par::AllThreads,
    ))
}

fn gemm_rate(spec: &ModelSpec, batch: usize, reps: usize, rep_seconds: f64, par: Par) -> f64 {
    let (s, wide) = (spec.state_len(), batch * spec.gate_rows());
    let mut rng = CounterRng::new(7);
    let a = Array2::from_shape_fn((s, s), |_| rng.uniform() as f32 - 0.5);
    let b = Array2::from_shape_fn((s, wide), |_| rng.uniform() as f32 - 0.5);
    let mut c = Array2::<f32>::zeros((s, wide));
    let mut once = |k: usize| {
        for _ in 0..k {
            gemm(1.0, a.view(), b.view(), 0.0, c.view_mut(), par);
        }
    };
    let k = calibrate(rep_seconds, &mut once);
    let flops = 2.0 * (s * s * wide) as f64 * k as f64;
    let mut rates: Vec<f64> = (0..reps)
        .map(|_| {
            let start = Instant::now();
            once(k);
            flops / start.elapsed().as_secs_f64() / 1e9
        })
        .collect();
    median(&mut rates)
}

/// Runs `f(k)` with growing `k` until one call lasts about a tenth of the target; returns the `k`
/// that lasts about `seconds`.
fn calibrate(seconds: f64, mut f: impl FnMut(usize)) -> usize {
    let mut k = 1usize;
    loop {
        let start = Instant::now();
        f(k);
        let el = start.elapsed();
        if el >= Duration::from_secs_f64(seconds / 10.0) || k >= 1 << 30 {
            let per = el.as_secs_f64() / k as f64;
            return ((seconds / per).ceil() as usize).max(1);
        }
        k *= 2;
    }
}

fn median(xs: &mut [f64]) -> f64 {
    xs.sort_by(|a, b| a.total_cmp(b));
    let n = xs.len();
    if n % 2 == 1 { xs[n / 2] } else { 0.5 * (xs[n / 2 - 1] + xs[n / 2]) }
}
