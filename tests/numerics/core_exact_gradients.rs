//! Exact-gradient oracle tests of the numeric core (KF-RTRL.md §2, §4, §8, §9 T1/T7/T8/T11).
//!
//! Every oracle here is written from the equations, independently of the learners under test:
//! - [`Trace`] / [`bptt`]: a plain forward pass and a full backpropagation through time that use
//!   only [`Params`] and [`CellKind::forward`] (for the cell's values and element-wise derivatives);
//! - [`total_loss`] / [`final_state`]: plain forward passes, differentiated by central finite
//!   differences (h = 1e-6).
//!
//! Conventions (the crate's, see the API brief): at the step that consumes token `x_t`, the loss
//! `L_t = CE(softmax(V [h_{t-1}; 1]), x_t)` is scored from the state before the advance (the first
//! from `h_0 = 0`), then `s_t = cell(W a_t, s_{t-1})` with `a_t = [onehot(x_t); h_{t-1}; 1]`.
//!
//! All tests run in f64 with the weights frozen (score + advance, never apply), except the frozen
//! learner and the non-finite guard, which exercise `step`. Relative errors are
//! `‖measured − oracle‖_F / ‖oracle‖_F`, and every assertion prints the measured value.

use kfrtrl::core::learner::reference::kron_influence;
use kfrtrl::core::model::{ClipScope, UpdateUnit};
use kfrtrl::core::rng::CounterRng;
use kfrtrl::core::{
    CellKind, Learner, LearnerKind, ModelConfig, ModelSpec, Optimizer, OptimizerKind, Params, SlotStep,
    StreamSet, UpdateOutcome,
};
use ndarray::{Array1, Array2};

mod other_learners;

// ---------------------------------------------------------------------------------------------
// Set-up helpers
// ---------------------------------------------------------------------------------------------

/// Per-cell sizes for the exact-gradient tests (n ≤ 6, vocab ≤ 5).
fn sizes(cell: CellKind) -> (usize, usize) {
    match cell {
        CellKind::Tanh => (5, 4),
        CellKind::Rhn => (4, 5),
        CellKind::Lstm => (3, 4),
    }
}

fn config(cell: CellKind, n: usize, vocab: usize, learner: LearnerKind, seed: u64) -> ModelConfig {
    ModelConfig {
        vocab_size: vocab,
        cell,
        hidden: n,
        learner,
        tbptt_window: 4,
        optimizer: OptimizerKind::Sgd,
        lr: 0.1,
        clip: 0.0,
        clip_scope: ClipScope::Global,
        ok_rank: 2,
        gradient_before_reduction: false,
        influence_decay: 1.0,
        influence_margin: None,
        tokens_per_update: 1,
        tokens_per_update_ramp: 0,
        tokens_per_update_start: 1,
        update_unit: UpdateUnit::Tokens,
        seed,
        init_std: 0.5,
        uoro_epsilon: 0.0,
    }
}

fn spec_for(cell: CellKind, learner: LearnerKind, seed: u64) -> ModelSpec {
    let (n, vocab) = sizes(cell);
    config(cell, n, vocab, learner, seed).check().expect("valid config")
}

/// Deterministic random tokens in `0..vocab`.
fn tokens(key: u64, vocab: usize, len: usize) -> Vec<u32> {
    let mut rng = CounterRng::new(key);
    (0..len).map(|_| rng.below(vocab as u64) as u32).collect()
}

fn seed_of(cell: CellKind) -> u64 {
    match cell {
        CellKind::Tanh => 101,
        CellKind::Rhn => 202,
        CellKind::Lstm => 303,
    }
}

fn norm(a: &[f64]) -> f64 {
    a.iter().map(|x| x * x).sum::<f64>().sqrt()
}

/// `‖a − b‖ / ‖b‖` (Frobenius over the flattened entries).
fn rel(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    let diff: f64 = a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum::<f64>().sqrt();
    let nb = norm(b);
    if nb == 0.0 { diff } else { diff / nb }
}

fn flat(a: &Array2<f64>) -> Vec<f64> {
    a.iter().copied().collect()
}

fn learn(token: u32) -> [SlotStep; 1] {
    [SlotStep::learn(0, token)]
}

// ---------------------------------------------------------------------------------------------
// Independent oracle: forward pass, BPTT, finite differences
// ---------------------------------------------------------------------------------------------

/// Everything a plain forward pass over `adv` computes, from a given start state.
struct Trace {
    /// `states[0]` is the start state, `states[t]` the state after advance `t`.
    states: Vec<Vec<f64>>,
    /// `a_t` of each advance.
    a: Vec<Vec<f64>>,
    /// Element-wise derivatives `D` (`k·r·n`) of each advance.
    d: Vec<Vec<f64>>,
    /// Element-wise carry (`k·k·n`) of each advance.
    carry: Vec<Vec<f64>>,
}

fn h_of<'a>(spec: &ModelSpec, state: &'a [f64]) -> &'a [f64] {
    &state[(spec.k - 1) * spec.n..]
}

fn forward(spec: &ModelSpec, params: &Params<f64>, start: &[f64], adv: &[u32]) -> Trace {
    let (n, r, k, m, vocab) = (spec.n, spec.r, spec.k, spec.m, spec.vocab);
    let cell = spec.config.cell;
    let mut tr = Trace { states: vec![start.to_vec()], a: vec![], d: vec![], carry: vec![] };
    for &x in adv {
        let prev = tr.states.last().unwrap().clone();
        let mut a = vec![0.0; m];
        a[x as usize] = 1.0;
        a[vocab..vocab + n].copy_from_slice(h_of(spec, &prev));
        a[m - 1] = 1.0;
        let z: Vec<f64> =
            (0..r * n).map(|row| (0..m).map(|col| params.w[[row, col]] * a[col]).sum()).collect();
        let mut next = vec![0.0; k * n];
        let mut d = vec![0.0; k * r * n];
        let mut carry = vec![0.0; k * k * n];
        cell.forward(n, &z, &prev, &mut next, &mut d, &mut carry);
        tr.states.push(next);
        tr.a.push(a);
        tr.d.push(d);
        tr.carry.push(carry);
    }
    tr
}

/// Loss (nats) of `target` under `softmax(V [h; 1])`, and `e = softmax − onehot`.
fn readout(spec: &ModelSpec, params: &Params<f64>, h: &[f64], target: u32) -> (f64, Vec<f64>) {
    let n = spec.n;
    let logits: Vec<f64> = (0..spec.vocab)
        .map(|o| params.v[[o, n]] + (0..n).map(|l| params.v[[o, l]] * h[l]).sum::<f64>())
        .collect();
    let max = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let sum: f64 = logits.iter().map(|y| (y - max).exp()).sum();
    let lse = max + sum.ln();
    let mut e: Vec<f64> = logits.iter().map(|y| (y - lse).exp()).collect();
    e[target as usize] -= 1.0;
    (lse - logits[target as usize], e)
}

/// `Σ loss` of the readouts `scored = [(state index, target)]` after advancing `adv` from `start`.
fn total_loss(
    spec: &ModelSpec,
    params: &Params<f64>,
    start: &[f64],
    adv: &[u32],
    scored: &[(usize, u32)],
) -> f64 {
    let tr = forward(spec, params, start, adv);
    scored.iter().map(|&(i, y)| readout(spec, params, h_of(spec, &tr.states[i]), y).0).sum()
}

/// Full BPTT of `total_loss` w.r.t. `W` and `V`, with `start` a constant.
fn bptt(
    spec: &ModelSpec,
    params: &Params<f64>,
    start: &[f64],
    adv: &[u32],
    scored: &[(usize, u32)],
) -> (Array2<f64>, Array2<f64>) {
    let (n, r, k, m) = (spec.n, spec.r, spec.k, spec.m);
    let (s_len, hoff, hcol) = (k * n, (k - 1) * n, spec.vocab);
    let tr = forward(spec, params, start, adv);
    let mut gw = Array2::<f64>::zeros((r * n, m));
    let mut gv = Array2::<f64>::zeros((spec.vocab, n + 1));
    // Adjoint of the state at index `idx`, walking backwards from the last state.
    let mut g = vec![0.0; s_len];
    for idx in (0..=adv.len()).rev() {
        let h = h_of(spec, &tr.states[idx]).to_vec();
        for &(_, y) in scored.iter().filter(|&&(i, _)| i == idx) {
            let (_, e) = readout(spec, params, &h, y);
            for (o, &eo) in e.iter().enumerate() {
                for l in 0..n {
                    gv[[o, l]] += eo * h[l];
                    g[hoff + l] += eo * params.v[[o, l]];
                }
                gv[[o, n]] += eo;
            }
        }
        if idx == 0 {
            break;
        }
        // Through advance `idx`: states[idx-1] -> states[idx].
        let (a, d, carry) = (&tr.a[idx - 1], &tr.d[idx - 1], &tr.carry[idx - 1]);
        let mut dz = vec![0.0; r * n];
        for q in 0..r {
            for j in 0..n {
                dz[q * n + j] = (0..k).map(|blk| g[blk * n + j] * d[(blk * r + q) * n + j]).sum();
            }
        }
        for row in 0..r * n {
            for col in 0..m {
                gw[[row, col]] += dz[row] * a[col];
            }
        }
        let mut gp = vec![0.0; s_len];
        for bj in 0..k {
            for j in 0..n {
                gp[bj * n + j] = (0..k).map(|bi| carry[(bi * k + bj) * n + j] * g[bi * n + j]).sum();
            }
        }
        for l in 0..n {
            gp[hoff + l] += (0..r * n).map(|row| params.w[[row, hcol + l]] * dz[row]).sum::<f64>();
        }
        g = gp;
    }
    (gw, gv)
}

const FD_H: f64 = 1e-6;

/// Central finite differences of `total_loss` w.r.t. every entry of `W` and `V`.
fn fd_loss_gradient(
    spec: &ModelSpec,
    params: &Params<f64>,
    start: &[f64],
    adv: &[u32],
    scored: &[(usize, u32)],
) -> (Array2<f64>, Array2<f64>) {
    let mut gw = Array2::<f64>::zeros(params.w.dim());
    let mut gv = Array2::<f64>::zeros(params.v.dim());
    let mut p = params.clone();
    for idx in 0..params.w.len() {
        let (row, col) = (idx / params.w.ncols(), idx % params.w.ncols());
        let w0 = params.w[[row, col]];
        p.w[[row, col]] = w0 + FD_H;
        let lp = total_loss(spec, &p, start, adv, scored);
        p.w[[row, col]] = w0 - FD_H;
        let lm = total_loss(spec, &p, start, adv, scored);
        p.w[[row, col]] = w0;
        gw[[row, col]] = (lp - lm) / (2.0 * FD_H);
    }
    for idx in 0..params.v.len() {
        let (row, col) = (idx / params.v.ncols(), idx % params.v.ncols());
        let v0 = params.v[[row, col]];
        p.v[[row, col]] = v0 + FD_H;
        let lp = total_loss(spec, &p, start, adv, scored);
        p.v[[row, col]] = v0 - FD_H;
        let lm = total_loss(spec, &p, start, adv, scored);
        p.v[[row, col]] = v0;
        gv[[row, col]] = (lp - lm) / (2.0 * FD_H);
    }
    (gw, gv)
}

/// Central finite-difference Jacobian `d state_T / d W`, `s × P` with `P` ordered like `W`.
fn fd_state_jacobian(spec: &ModelSpec, params: &Params<f64>, adv: &[u32]) -> Array2<f64> {
    let s_len = spec.k * spec.n;
    let zero = vec![0.0; s_len];
    let p_len = params.w.len();
    let mut jac = Array2::<f64>::zeros((s_len, p_len));
    let mut p = params.clone();
    for idx in 0..p_len {
        let (row, col) = (idx / params.w.ncols(), idx % params.w.ncols());
        let w0 = params.w[[row, col]];
        p.w[[row, col]] = w0 + FD_H;
        let sp = forward(spec, &p, &zero, adv).states.pop().unwrap();
        p.w[[row, col]] = w0 - FD_H;
        let sm = forward(spec, &p, &zero, adv).states.pop().unwrap();
        p.w[[row, col]] = w0;
        for i in 0..s_len {
            jac[[i, idx]] = (sp[i] - sm[i]) / (2.0 * FD_H);
        }
    }
    jac
}

/// Scored pairs of a plain sequence: token `x_{i+1}` is scored from state `i`, `i = 0..T`.
fn sequence_scores(toks: &[u32]) -> Vec<(usize, u32)> {
    toks.iter().enumerate().map(|(i, &y)| (i, y)).collect()
}

// ---------------------------------------------------------------------------------------------
// Oracle self-check: BPTT against finite differences (so a failure below is attributable)
// ---------------------------------------------------------------------------------------------

#[test]
fn oracle_bptt_matches_finite_differences() {
    for cell in CellKind::ALL {
        let spec = spec_for(cell, LearnerKind::Rtrl, seed_of(cell));
        let params = Params::<f64>::init(&spec);
        let toks = tokens(seed_of(cell) ^ 0xAB, spec.vocab, 8);
        let zero = vec![0.0; spec.state_len()];
        let scored = sequence_scores(&toks);
        let (bw, bv) = bptt(&spec, &params, &zero, &toks, &scored);
        let (fw, fv) = fd_loss_gradient(&spec, &params, &zero, &toks, &scored);
        let (ew, ev) = (rel(&flat(&bw), &flat(&fw)), rel(&flat(&bv), &flat(&fv)));
        println!("{cell}: oracle BPTT vs FD: W rel {ew:.3e} (|g| {:.3e}), V rel {ev:.3e}", norm(&flat(&fw)));
        assert!(norm(&flat(&fw)) > 1e-2, "{cell}: W gradient too small to be a meaningful test");
        assert!(ew <= 1e-6, "{cell}: oracle BPTT vs FD on W: rel {ew:.3e}");
        assert!(ev <= 1e-6, "{cell}: oracle BPTT vs FD on V: rel {ev:.3e}");
    }
}

// ---------------------------------------------------------------------------------------------
// 1. Exact RTRL: summed per-step gradients == full BPTT == finite differences (T1, T11)
// 2. Exact RTRL: influence after T steps == finite-difference Jacobian d state_T / d W
// ---------------------------------------------------------------------------------------------

#[test]
fn rtrl_summed_gradients_equal_bptt_and_finite_differences_for_every_cell() {
    const T: usize = 8;
    for cell in CellKind::ALL {
        let spec = spec_for(cell, LearnerKind::Rtrl, seed_of(cell));
        let params = Params::<f64>::init(&spec);
        let toks = tokens(seed_of(cell) ^ 0x51, spec.vocab, T);
        let mut set = StreamSet::<f64>::new(&spec, 1);
        let mut sum_w = Array2::<f64>::zeros(params.w.dim());
        let mut sum_v = Array2::<f64>::zeros(params.v.dim());
        let mut sum_loss = 0.0;
        let mut losses = [0.0];
        for &x in &toks {
            let c = set.score(&params, &learn(x), &mut losses).unwrap();
            assert_eq!(c, 1.0, "{cell}: batch of one learning input must give 1 contribution");
            sum_w.scaled_add(c, &set.gradients().w);
            sum_v.scaled_add(c, &set.gradients().v);
            sum_loss += losses[0];
            set.advance(&params, &learn(x)).unwrap();
        }
        let zero = vec![0.0; spec.state_len()];
        let scored = sequence_scores(&toks);
        let oracle_loss = total_loss(&spec, &params, &zero, &toks, &scored);
        let el = (sum_loss - oracle_loss).abs() / oracle_loss.abs();
        let (bw, bv) = bptt(&spec, &params, &zero, &toks, &scored);
        let (fw, fv) = fd_loss_gradient(&spec, &params, &zero, &toks, &scored);
        let ew_b = rel(&flat(&sum_w), &flat(&bw));
        let ev_b = rel(&flat(&sum_v), &flat(&bv));
        let ew_f = rel(&flat(&sum_w), &flat(&fw));
        let ev_f = rel(&flat(&sum_v), &flat(&fv));
        println!(
            "{cell}: loss rel {el:.3e}; RTRL vs BPTT: W {ew_b:.3e}, V {ev_b:.3e}; RTRL vs FD: W {ew_f:.3e}, V {ev_f:.3e} (|gW| {:.3e})",
            norm(&flat(&bw))
        );
        assert!(norm(&flat(&bw)) > 1e-2, "{cell}: W gradient too small to be a meaningful test");
        assert!(el <= 1e-12, "{cell}: summed losses vs oracle: rel {el:.3e}");
        assert!(ew_b <= 1e-12, "{cell}: RTRL vs BPTT on W: rel {ew_b:.3e}");
        assert!(ev_b <= 1e-12, "{cell}: RTRL vs BPTT on V: rel {ev_b:.3e}");
        assert!(ew_f <= 1e-6, "{cell}: RTRL vs FD on W: rel {ew_f:.3e}");
        assert!(ev_f <= 1e-6, "{cell}: RTRL vs FD on V: rel {ev_f:.3e}");

        // 2. Influence after T advances == FD Jacobian of the final state.
        let g = match set.learner() {
            Learner::Rtrl(l) => l.influence(0).to_owned(),
            _ => unreachable!(),
        };
        let fd = fd_state_jacobian(&spec, &params, &toks);
        let eg = rel(&flat(&g), &flat(&fd));
        let es = rel(set.state(0), forward(&spec, &params, &zero, &toks).states.last().unwrap());
        println!(
            "{cell}: RTRL influence vs FD Jacobian: rel {eg:.3e} (|G| {:.3e}); state rel {es:.3e}",
            norm(&flat(&fd))
        );
        assert!(es <= 1e-13, "{cell}: state after T advances vs oracle: rel {es:.3e}");
        assert!(eg <= 1e-6, "{cell}: RTRL influence vs FD Jacobian: rel {eg:.3e}");
    }
}

// ---------------------------------------------------------------------------------------------
// 3. Truncated BPTT: windows of K advances, start state constant
// ---------------------------------------------------------------------------------------------

#[test]
#[allow(non_snake_case)]
fn tbptt_windows_equal_truncated_bptt_for_every_cell() {
    for (cell, K) in CellKind::ALL.into_iter().flat_map(|c| [(c, 4usize), (c, 1usize)]) {
        let (n, vocab) = sizes(cell);
        let cfg =
            ModelConfig { tbptt_window: K, ..config(cell, n, vocab, LearnerKind::Tbptt, seed_of(cell)) };
        let spec = cfg.check().unwrap();
        assert_eq!(spec.config.tbptt_window, K);
        let params = Params::<f64>::init(&spec);
        let toks = tokens(seed_of(cell) ^ 0x7B, spec.vocab, 2 * K + 1);
        let zero = vec![0.0; spec.state_len()];
        let full = forward(&spec, &params, &zero, &toks);
        let mut set = StreamSet::<f64>::new(&spec, 1);
        let mut losses = [0.0];
        let mut worst_w = 0.0f64;
        let mut worst_v = 0.0f64;
        for (t0, &x) in toks.iter().enumerate() {
            let t = t0 + 1; // 1-based step: scores x_t from h_{t-1}
            let c = set.score(&params, &learn(x), &mut losses).unwrap();
            let gw = set.gradients().w.mapv(|g| g * c);
            let gv = set.gradients().v.mapv(|g| g * c);
            if t == 1 {
                // Readout only: e_1 ⊗ [h_0; 1].
                assert_eq!(c, 1.0, "{cell}: step 1 contributions");
                let (_, e) = readout(&spec, &params, &vec![0.0; spec.n], x);
                let mut ev = Array2::<f64>::zeros(params.v.dim());
                for (o, &eo) in e.iter().enumerate() {
                    ev[[o, spec.n]] = eo;
                }
                let er = rel(&flat(&gv), &flat(&ev));
                let wmax = gw.iter().fold(0.0f64, |a, &b| a.max(b.abs()));
                println!("{cell}: TBPTT step 1: V rel {er:.3e}, max |gW| {wmax:.3e}");
                assert!(er <= 1e-12, "{cell}: step 1 readout gradient: rel {er:.3e}");
                assert_eq!(wmax, 0.0, "{cell}: step 1 must emit no W gradient (max |gW| {wmax:.3e})");
            } else if t == K + 1 || t == 2 * K + 1 {
                // Flush of the window of advances (t-K)..(t-1), losses L_{t-K+1}..L_t, started from
                // state s_{t-K-1} (a constant).
                assert_eq!(c, K as f64, "{cell}: step {t}: a full window has K contributions");
                let w0 = t - K - 1; // index of the window's start state
                let start = &full.states[w0];
                let adv = &toks[w0..w0 + K];
                let scored: Vec<(usize, u32)> = (1..=K).map(|i| (i, toks[w0 + i])).collect();
                let (bw, bv) = bptt(&spec, &params, start, adv, &scored);
                let ew = rel(&flat(&gw), &flat(&bw));
                let ev = rel(&flat(&gv), &flat(&bv));
                worst_w = worst_w.max(ew);
                worst_v = worst_v.max(ev);
                println!(
                    "{cell} K={K}: TBPTT flush at step {t} (start s_{w0}): W rel {ew:.3e} (|gW| {:.3e}), V rel {ev:.3e}",
                    norm(&flat(&bw))
                );
                assert!(norm(&flat(&bw)) > 1e-2, "{cell}: window W gradient too small to be meaningful");
                assert!(
                    ew <= 1e-12,
                    "{cell}: TBPTT window ending at step {t} vs truncated BPTT on W: rel {ew:.3e}"
                );
                assert!(
                    ev <= 1e-12,
                    "{cell}: TBPTT window ending at step {t} vs truncated BPTT on V: rel {ev:.3e}"
                );
                if w0 > 0 {
                    // Control: the untruncated gradient of the same losses differs (the start state
                    // really is treated as a constant), so the check above can tell them apart.
                    let scored_full: Vec<(usize, u32)> = (1..=K).map(|i| (w0 + i, toks[w0 + i])).collect();
                    let (uw, _) = bptt(&spec, &params, &zero, &toks[..w0 + K], &scored_full);
                    let du = rel(&flat(&uw), &flat(&bw));
                    println!(
                        "{cell}: control: untruncated vs truncated window gradient differ by rel {du:.3e}"
                    );
                    assert!(du > 1e-6, "{cell}: control: truncation made no difference (rel {du:.3e})");
                    let et = rel(&flat(&gw), &flat(&uw));
                    assert!(et > 1e-6, "{cell}: TBPTT equals the untruncated gradient (rel {et:.3e})");
                }
            } else {
                let wmax = gw.iter().chain(gv.iter()).fold(0.0f64, |a, &b| a.max(b.abs()));
                assert_eq!(c, 0.0, "{cell}: step {t} inside a window must have 0 contributions, got {c}");
                assert_eq!(
                    wmax, 0.0,
                    "{cell}: step {t} inside a window emitted a gradient (max |g| {wmax:.3e})"
                );
            }
            set.advance(&params, &learn(x)).unwrap();
            let es = rel(set.state(0), &full.states[t]);
            assert!(es <= 1e-13, "{cell}: state after step {t}: rel {es:.3e}");
        }
        println!("{cell} K={K}: TBPTT worst window error: W {worst_w:.3e}, V {worst_v:.3e}");
    }
}
