//! The gradient-noise experiment (KF-RTRL.md §6.1, test T9): how far the estimators' gradients
//! (KF-RTRL, OK of any rank, UORO) are from the exact RTRL gradient, over time and over the
//! hidden size, for any cell.
//!
//! Setup, for each hidden size `n`:
//! - an RNN of [`VarianceConfig::cell`] (f64) over a vocabulary of [`VarianceConfig::vocab`] one-hot tokens with fixed
//!   random weights: input columns and bias `N(0, input_std²)`, recurrent block `W_h` Gaussian
//!   and then scaled so that its spectral norm (computed by power iteration) is
//!   [`VarianceConfig::contraction`] (0.9): since `|tanh'| ≤ 1`, `‖H_t‖ ≤ 0.9` and the dynamics
//!   contract;
//! - [`VarianceConfig::sequences`] independent random token sequences of length `T`; for each,
//!   exact RTRL runs in one slot and each estimator in [`VarianceConfig::samples`] slots of one
//!   [`StreamSet`] that all read the same tokens, every slot with its own sign key
//!   ([`StreamSet::set_sign_key`]), so the slots are independent draws of the estimator;
//! - at every `every`-th step `t` (and at `T` and [`VarianceConfig::also_at`]), a fixed random
//!   `δ_t ~ N(0, I_n)` (the same for all slots) gives the exact gradient `g = δ_tᵀ G_t` and the
//!   estimates `ĝ = δ_tᵀ Ĝ_t` with respect to every entry of the cell's weight matrix `W` (all
//!   its columns, for `a_t = [x; h; 1]`: input, recurrent block `W_h` and bias alike), and the
//!   relative variance is `mean_slots ‖ĝ − g‖² / ‖g‖²`, averaged over the sequences.
//!
//! With [`VarianceConfig::trained`], the weights are a trained model's instead (its cell, width
//! and vocabulary), and each sequence is a window of a real corpus at a random offset: the
//! noise the learner has where it is used, not only on contracting random weights. Exact RTRL
//! is the oracle at any width up to [`crate::core::model::limits::MAX_RTRL_ORACLE_HIDDEN`].

use std::time::Instant;

use ndarray::{Array1, Array2, s};
use rayon::prelude::*;
use serde::Serialize;

use crate::core::model::ConfigError;
use crate::core::rng::{CounterRng, derive_key};
use crate::core::{CellKind, Learner, LearnerKind, ModelConfig, ModelSpec, Params, SlotStep, StreamSet};

/// One estimator to measure: a learner and, for `ok`, its rank.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Estimator {
    /// `kf-rtrl`, `ok` or `uoro`.
    pub learner: LearnerKind,
    /// Rank of `ok`.
    pub rank: usize,
}

impl Estimator {
    /// The estimator's label in the rows (`kf-rtrl`, `ok:8`, `uoro`).
    pub fn label(&self) -> String {
        match self.learner {
            LearnerKind::Ok => format!("ok:{}", self.rank),
            l => l.name().to_string(),
        }
    }
}

/// What to measure.
#[derive(Debug, Clone)]
pub struct VarianceConfig {
    /// The cell (`W_h` is scaled block by block to the contraction).
    pub cell: CellKind,
    /// The estimators compared with exact RTRL.
    pub estimators: Vec<Estimator>,
    /// Hidden sizes.
    pub hidden: Vec<usize>,
    /// Steps `T` of each sequence.
    pub steps: usize,
    /// Independent sign draws (slots) per estimator.
    pub samples: usize,
    /// Independent input sequences (and weights) the relative variance is averaged over.
    pub sequences: usize,
    /// Vocabulary of the random one-hot inputs.
    pub vocab: usize,
    /// Measure every this many steps (and at `T`).
    pub every: usize,
    /// Further steps to measure at (those past `T` are ignored), such as the columns of a table
    /// that `every` need not divide.
    pub also_at: Vec<usize>,
    /// Spectral norm of the recurrent block.
    pub contraction: f64,
    /// Standard deviation of the input columns and the bias of `W`.
    pub input_std: f64,
    /// Seed of weights, inputs, `δ` and signs.
    pub seed: u64,
    /// A trained model's weights and a tokenized corpus to read, in place of the random
    /// contracting weights and random tokens (`cell`, `hidden` and `vocab` are then the model's).
    pub trained: Option<TrainedWeights>,
}

/// A trained model and the corpus its sequences are cut from.
#[derive(Debug, Clone)]
pub struct TrainedWeights {
    /// The cell, width and vocabulary of the model (its learner is ignored).
    pub config: ModelConfig,
    /// Its weights.
    pub params: Params<f64>,
    /// The corpus, in the model's vocabulary (at least `steps` tokens).
    pub tokens: Vec<u32>,
}

impl Default for VarianceConfig {
    fn default() -> Self {
        Self {
            cell: CellKind::Tanh,
            estimators: vec![
                Estimator { learner: LearnerKind::KfRtrl, rank: 1 },
                Estimator { learner: LearnerKind::Uoro, rank: 1 },
            ],
            hidden: vec![8, 16, 32, 64],
            steps: 200,
            samples: 500,
            sequences: 4,
            vocab: 8,
            every: 10,
            also_at: Vec::new(),
            contraction: 0.9,
            input_std: 1.0,
            seed: 0,
            trained: None,
        }
    }
}

/// One measurement.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct VarianceRow {
    /// The estimator's label: `kf-rtrl`, `ok:R` or `uoro`.
    pub learner: String,
    /// Hidden size.
    pub n: usize,
    /// Time step (tokens consumed).
    pub t: usize,
    /// `E‖ĝ−g‖² / ‖g‖²`.
    pub rel_var: f64,
}

/// All measurements.
#[derive(Debug, Clone, Serialize)]
pub struct VarianceReport {
    /// One row per learner, `n` and measured `t`.
    pub rows: Vec<VarianceRow>,
    /// Sign draws per estimator.
    pub samples: usize,
    /// Input sequences averaged over.
    pub sequences: usize,
    /// Vocabulary size.
    pub vocab: usize,
    /// Spectral norm of the recurrent block.
    pub contraction: f64,
    /// Wall time.
    pub seconds: f64,
}

impl VarianceReport {
    /// The relative variance of a learner at `(n, t)`, if measured.
    pub fn get(&self, learner: &str, n: usize, t: usize) -> Option<f64> {
        self.rows.iter().find(|r| r.learner == learner && r.n == n && r.t == t).map(|r| r.rel_var)
    }
}

/// Largest singular value of `m` by power iteration on `mᵀm`.
pub fn spectral_norm(m: &Array2<f64>) -> f64 {
    let mut v = Array1::from_elem(m.ncols(), 1.0 / (m.ncols() as f64).sqrt());
    let mut sigma = 0.0;
    for _ in 0..500 {
        let w = m.t().dot(&m.dot(&v));
        let norm = w.dot(&w).sqrt();
        if norm == 0.0 {
            return 0.0;
        }
        let next = norm.sqrt();
        v = w / norm;
        if (next - sigma).abs() <= 1e-12 * next {
            return next;
        }
        sigma = next;
    }
    sigma
}

/// The weights of one run: inputs and bias `N(0, input_std²)`, each gate's block of `W_h` with
/// spectral norm `contraction`; the readout is unused.
pub fn contracting_weights(spec: &ModelSpec, contraction: f64, input_std: f64, key: u64) -> Params<f64> {
    let mut p = Params::<f64>::zeros(spec);
    let mut rng = CounterRng::new(key);
    let n = spec.n;
    p.w.iter_mut().for_each(|x| *x = input_std * rng.normal());
    for gate in 0..spec.r {
        let rows = gate * n..(gate + 1) * n;
        let mut wh = p.w.slice(s![rows.clone(), spec.h_col()..spec.h_col() + n]).to_owned();
        wh.iter_mut().for_each(|x| *x = rng.normal() / (n as f64).sqrt());
        let sn = spectral_norm(&wh);
        if sn > 0.0 {
            wh *= contraction / sn;
        }
        p.w.slice_mut(s![rows, spec.h_col()..spec.h_col() + n]).assign(&wh);
    }
    p.v.iter_mut().for_each(|x| *x = 0.1 * rng.normal());
    p
}

fn spec_for(
    cell: CellKind,
    e: Estimator,
    n: usize,
    vocab: usize,
    seed: u64,
) -> Result<ModelSpec, ConfigError> {
    ModelConfig {
        vocab_size: vocab,
        cell,
        hidden: n,
        learner: e.learner,
        ok_rank: e.rank,
        seed,
        uoro_epsilon: 0.0,
        ..ModelConfig::default()
    }
    .check_as_oracle()
}

/// `Σ_i (ĝ_i − g_i)²` for the gradient of one Kronecker sum `Σ_l u_l ⊗ A_l`: `ĝ = Σ_l (A_lᵀδ) ⊗ u_l`.
fn kronecker_error(terms: &[(Array1<f64>, Array2<f64>)], delta: &Array1<f64>, g: &[f64], m: usize) -> f64 {
    let alphas: Vec<Array1<f64>> = terms.iter().map(|(_, a)| a.t().dot(delta)).collect();
    let rows = alphas.first().map_or(0, |a| a.len());
    let mut e = 0.0;
    for row in 0..rows {
        let g_row = &g[row * m..(row + 1) * m];
        for (col, &gv) in g_row.iter().enumerate() {
            let est: f64 = terms.iter().zip(&alphas).map(|((u, _), al)| al[row] * u[col]).sum();
            let d = est - gv;
            e += d * d;
        }
    }
    e
}

/// `Σ_i (ĝ_i − g_i)²` of every slot of an estimator, `ĝ = δᵀĜ` (`g` flattened like `W`).
fn slot_errors(set: &StreamSet<f64>, spec: &ModelSpec, delta: &Array1<f64>, g: &[f64]) -> Vec<f64> {
    let m = spec.m;
    (0..set.capacity())
        .into_par_iter()
        .map(|slot| match set.learner() {
            Learner::KfRtrl(kf) => kronecker_error(&[kf.factors(slot, spec)], delta, g, m),
            Learner::Ok(ok) => kronecker_error(&ok.factors(slot, spec), delta, g, m),
            Learner::Uoro(uo) => {
                let (st, th) = uo.factors(slot);
                let c = st.dot(delta);
                th.iter().zip(g).map(|(&t, &gv)| (c * t - gv).powi(2)).sum()
            }
            _ => unreachable!("only estimators are compared"),
        })
        .collect()
}

/// Runs the experiment; `on_progress(n, sequence)` is called when a sequence is done.
pub fn run_variance(
    cfg: &VarianceConfig,
    mut on_progress: impl FnMut(usize, usize),
) -> Result<VarianceReport, ConfigError> {
    let start = Instant::now();
    let every = cfg.every.max(1);
    let times: Vec<usize> =
        (1..=cfg.steps).filter(|t| t % every == 0 || *t == cfg.steps || cfg.also_at.contains(t)).collect();
    let estimators = &cfg.estimators;
    let mut rows = Vec::new();
    let seqs = cfg.sequences.max(1);
    let samples = cfg.samples.max(1);
    let (cell, vocab, hidden) = match &cfg.trained {
        Some(t) => {
            if t.tokens.len() < cfg.steps {
                return Err(ConfigError {
                    field: "corpus",
                    reason: format!("has {} tokens, fewer than the {} steps", t.tokens.len(), cfg.steps),
                });
            }
            (t.config.cell, t.config.vocab_size, vec![t.config.hidden])
        }
        None => (cfg.cell, cfg.vocab, cfg.hidden.clone()),
    };
    for &n in &hidden {
        // sums[e][i]: Σ over sequences of the relative variance at times[i].
        let mut sums = vec![vec![0.0; times.len()]; estimators.len()];
        for q in 0..seqs {
            let run_key = derive_key(derive_key(cfg.seed, n as u64), q as u64);
            let exact = Estimator { learner: LearnerKind::Rtrl, rank: 1 };
            let exact_spec = spec_for(cell, exact, n, vocab, cfg.seed)?;
            let params = match &cfg.trained {
                Some(t) => t.params.clone(),
                None => {
                    contracting_weights(&exact_spec, cfg.contraction, cfg.input_std, derive_key(run_key, 1))
                }
            };
            let mut exact = StreamSet::<f64>::new(&exact_spec, 1);
            let mut sets = Vec::new();
            for (e, &kind) in estimators.iter().enumerate() {
                let spec = spec_for(cell, kind, n, vocab, cfg.seed)?;
                let mut set = StreamSet::<f64>::new(&spec, samples);
                for slot in 0..samples {
                    set.set_sign_key(slot, derive_key(derive_key(run_key, 10 + e as u64), slot as u64));
                }
                sets.push((spec, set));
            }
            let mut rng = CounterRng::new(derive_key(run_key, 2));
            let window = cfg.trained.as_ref().map(|t| {
                let start = rng.below((t.tokens.len() - cfg.steps + 1) as u64) as usize;
                &t.tokens[start..start + cfg.steps]
            });
            let mut next_time = 0;
            for t in 1..=cfg.steps {
                let token = match window {
                    Some(w) => w[t - 1],
                    None => rng.below(vocab as u64) as u32,
                };
                exact.advance(&params, &[SlotStep::learn(0, token)]).expect("valid token");
                let batch: Vec<SlotStep> = (0..samples).map(|slot| SlotStep::learn(slot, token)).collect();
                for (_, set) in sets.iter_mut() {
                    set.advance(&params, &batch).expect("valid token");
                }
                if times.get(next_time) != Some(&t) {
                    continue;
                }
                let delta = Array1::from_iter((0..exact_spec.state_len()).map(|_| rng.normal()));
                let Learner::Rtrl(rtrl) = exact.learner() else { unreachable!("exact RTRL") };
                let g: Vec<f64> = rtrl.influence(0).t().dot(&delta).to_vec();
                let g2: f64 = g.iter().map(|x| x * x).sum();
                for (e, (spec, set)) in sets.iter().enumerate() {
                    let errs = slot_errors(set, spec, &delta, &g);
                    let mean = errs.iter().sum::<f64>() / errs.len() as f64;
                    sums[e][next_time] += mean / g2;
                }
                next_time += 1;
            }
            on_progress(n, q);
        }
        for (e, kind) in estimators.iter().enumerate() {
            for (i, &t) in times.iter().enumerate() {
                rows.push(VarianceRow { learner: kind.label(), n, t, rel_var: sums[e][i] / seqs as f64 });
            }
        }
    }
    Ok(VarianceReport {
        rows,
        samples,
        sequences: seqs,
        vocab: cfg.vocab,
        contraction: cfg.contraction,
        seconds: start.elapsed().as_secs_f64(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn power_iteration_finds_the_largest_singular_value() {
        let m = Array2::from_shape_vec((2, 2), vec![3.0, 0.0, 0.0, -5.0]).unwrap();
        assert!((spectral_norm(&m) - 5.0).abs() < 1e-9);
        let spec =
            spec_for(CellKind::Tanh, Estimator { learner: LearnerKind::Rtrl, rank: 1 }, 6, 4, 0).unwrap();
        let p = contracting_weights(&spec, 0.9, 1.0, 3);
        let wh = p.w.slice(s![.., spec.h_col()..spec.h_col() + 6]).to_owned();
        assert!((spectral_norm(&wh) - 0.9).abs() < 1e-9);
    }
}
