//! T5: KF-RTRL's estimate is unbiased by Monte Carlo at n = 32 over 50 steps, and a forced sign
//! (the negative control) fails the same test.

use super::*;

// ---------------------------------------------------------------------------------------------
// 6. T5: Monte-Carlo unbiasedness at n = 32, T = 50
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq)]
enum SignMode {
    Random,
    AllPlus,
    /// Random signs except the last `k` advances, forced to +1.
    LastPlus(usize),
}

#[derive(Debug)]
struct McStats {
    draws: usize,
    /// ‖mean − G‖_F.
    err: f64,
    /// sqrt(tr Var / N).
    sigma: f64,
    g_norm: f64,
    secs: f64,
}

fn monte_carlo(
    set: &mut StreamSet<f64>,
    params: &Params<f64>,
    toks: &[u32],
    g: &Array2<f64>,
    mode: SignMode,
    key_seed: u64,
    budget: Duration,
    min_batches: usize,
    max_batches: usize,
) -> McStats {
    let spec = set.spec().clone();
    let (s_len, rn, m) = (spec.state_len(), spec.gate_rows(), spec.m);
    let cap = set.capacity();
    let mut sum = Array2::<f64>::zeros((s_len * rn, m));
    let mut sumsq = 0.0f64;
    let mut batches = 0usize;
    let start = Instant::now();
    let mut amat = Array2::<f64>::zeros((s_len * rn, cap));
    let mut umat = Array2::<f64>::zeros((cap, m));
    while batches < max_batches && (batches < min_batches || start.elapsed() < budget) {
        for b in 0..cap {
            set.reset(params, b);
            set.set_sign_key(b, derive_key(key_seed, (batches * cap + b) as u64));
            let forced = if mode == SignMode::AllPlus { Some(1.0) } else { None };
            kf_mut(set).force_sign(b, forced);
        }
        for (t, &tok) in toks.iter().enumerate() {
            if let SignMode::LastPlus(k) = mode
                && t + k == toks.len()
            {
                for b in 0..cap {
                    kf_mut(set).force_sign(b, Some(1.0));
                }
            }
            set.advance(params, &all_slots(cap, tok)).unwrap();
        }
        for b in 0..cap {
            let (u, a) = kf(set).factors(b, &spec);
            amat.column_mut(b).assign(&Array1::from_iter(a.iter().copied()));
            umat.row_mut(b).assign(&u);
            sumsq += u.dot(&u) * a.iter().map(|x| x * x).sum::<f64>();
        }
        sum += &amat.dot(&umat);
        batches += 1;
    }
    let draws = batches * cap;
    let nd = draws as f64;
    // Row (i·rn + c), column col  <->  G[i, c·m + col]: the same row-major memory.
    let mean = (sum / nd).into_shape_with_order((s_len, rn * m)).unwrap();
    let mean_sq = fro(mean.view()).powi(2);
    let tr_var = ((sumsq - nd * mean_sq) / (nd - 1.0)).max(0.0);
    McStats {
        draws,
        err: fro((&mean - g).view()),
        sigma: (tr_var / nd).sqrt(),
        g_norm: fro(g.view()),
        secs: start.elapsed().as_secs_f64(),
    }
}

#[test]
fn t5_monte_carlo_unbiasedness_n32_t50() {
    let (n, vocab, t_len, cap) = (32, 8, 50, 256);
    let cfg = config(CellKind::Tanh, n, vocab, LearnerKind::KfRtrl, 5);
    let spec = check(&cfg);
    let mut params = Params::<f64>::init(&spec);
    // Contracting recurrence: ‖W_h‖_F = 0.9 (so the spectral norm is at most 0.9).
    let hc = spec.h_col();
    let wh_norm = fro(params.w.slice(s![.., hc..hc + n]));
    params.w.slice_mut(s![.., hc..hc + n]).mapv_inplace(|x| x * 0.9 / wh_norm);
    let toks = tokens(0xC0FFEE, t_len, vocab);

    let mut exact = StreamSet::<f64>::new(&rtrl_spec(&cfg), 1);
    for &tok in &toks {
        exact.advance(&params, &[SlotStep::learn(0, tok)]).unwrap();
    }
    let g = exact_influence(&exact, 0);

    let mut set = StreamSet::<f64>::new(&spec, cap);
    let st = monte_carlo(&mut set, &params, &toks, &g, SignMode::Random, 77, Duration::ZERO, 64, 64);
    let z = st.err / st.sigma;
    eprintln!(
        "T5: N = {} draws in {:.1} s, ‖mean − G‖ = {:.4e}, sqrt(trVar/N) = {:.4e}, ratio {z:.3} (bound 5), ‖G‖ = {:.4e}, rel {:.3e}",
        st.draws,
        st.secs,
        st.err,
        st.sigma,
        st.g_norm,
        st.err / st.g_norm
    );
    assert!(st.sigma > 0.0, "the estimator should be random: sqrt(trVar/N) = {:.3e}", st.sigma);
    assert!(
        st.err <= 5.0 * st.sigma,
        "‖mean − G‖ = {:.4e} > 5·sqrt(trVar/N) = {:.4e} (ratio {z:.3}, N = {})",
        st.err,
        5.0 * st.sigma,
        st.draws
    );

    // Negative control 1: s ≡ +1 must fail the same bound.
    let plus = monte_carlo(&mut set, &params, &toks, &g, SignMode::AllPlus, 78, Duration::ZERO, 2, 2);
    eprintln!(
        "T5 control s≡+1: N = {}, ‖mean − G‖ = {:.4e}, 5·sqrt(trVar/N) = {:.4e}",
        plus.draws,
        plus.err,
        5.0 * plus.sigma
    );
    assert!(
        plus.err > 5.0 * plus.sigma,
        "s ≡ +1 should fail the z-test: ‖mean − G‖ = {:.4e} <= 5·sqrt(trVar/N) = {:.4e}",
        plus.err,
        5.0 * plus.sigma
    );

    // Negative control 2: a noisy but biased estimator (random signs, the last advances forced to
    // +1) must fail too, which shows the test has power in the presence of noise.
    let last = monte_carlo(&mut set, &params, &toks, &g, SignMode::LastPlus(3), 79, Duration::ZERO, 8, 8);
    eprintln!(
        "T5 control last 3 signs +1: N = {}, ‖mean − G‖ = {:.4e}, 5·sqrt(trVar/N) = {:.4e} (ratio {:.1})",
        last.draws,
        last.err,
        5.0 * last.sigma,
        last.err / last.sigma
    );
    assert!(
        last.err > 5.0 * last.sigma,
        "last 3 signs ≡ +1 should fail the z-test: ‖mean − G‖ = {:.4e} <= 5·sqrt(trVar/N) = {:.4e}",
        last.err,
        5.0 * last.sigma
    );
}
