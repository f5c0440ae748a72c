//! Optimizers (SGD, Adam) with clipping by global norm, and the gradient buffers they consume.
//!
//! A step whose gradient is not finite is refused before it touches the weights: the caller gets
//! [`UpdateOutcome::NonFinite`] and the weights and optimizer moments stay exactly as they were.
//! So is a finite gradient too large for the update's arithmetic in `T` (see
//! [`max_update_norm`]): the norm is accumulated in f64, so f32 entries up to `f32::MAX` pass the
//! finiteness check, and Adam's `g²` would overflow to a second moment of `+∞` that freezes its
//! weight for good.

use ndarray::Array2;
use rayon::prelude::*;

use super::float::{Float, sum_squares};
use super::model::{ClipScope, ModelSpec, OptimizerKind, Params};

/// Gradients of all weights, shaped like [`Params`].
#[derive(Debug, Clone, PartialEq)]
pub struct Gradients<T> {
    /// Gradient of `W`.
    pub w: Array2<T>,
    /// Gradient of `V`.
    pub v: Array2<T>,
}

impl<T: Float> Gradients<T> {
    /// Zero gradients for a model.
    pub fn zeros(spec: &ModelSpec) -> Self {
        let p = Params::<T>::zeros(spec);
        Self { w: p.w, v: p.v }
    }

    /// The same values in standard (row-major, contiguous) layout, which every pass relies on.
    pub(crate) fn into_standard_layout(self) -> Self {
        let fix = |a: Array2<T>| if a.is_standard_layout() { a } else { a.as_standard_layout().into_owned() };
        Self { w: fix(self.w), v: fix(self.v) }
    }

    /// Sets every entry to zero.
    pub fn clear(&mut self) {
        self.map_in_place(|_| T::zero());
    }

    /// Multiplies every entry by `c`.
    pub fn scale(&mut self, c: T) {
        self.map_in_place(|x| x * c);
    }

    fn map_in_place(&mut self, f: impl Fn(T) -> T + Sync + Send) {
        let pass = |chunk: &mut [T]| chunk.iter_mut().for_each(|x| *x = f(*x));
        for a in [&mut self.w, &mut self.v] {
            let a = a.as_slice_mut().expect("gradients are standard layout");
            if parallel(a.len()) {
                a.par_chunks_mut(CHUNK).for_each(pass);
            } else {
                a.chunks_mut(CHUNK).for_each(pass);
            }
        }
    }

    /// `self += other`.
    pub fn add(&mut self, other: &Self) {
        self.w.scaled_add(T::one(), &other.w);
        self.v.scaled_add(T::one(), &other.v);
    }

    /// `self += c · other`.
    pub fn add_scaled(&mut self, other: &Self, c: T) {
        self.w.scaled_add(c, &other.w);
        self.v.scaled_add(c, &other.v);
    }

    /// Euclidean norm over all entries, accumulated in f64.
    pub fn norm(&self) -> f64 {
        let (w, v) = self.group_norms();
        w.hypot(v)
    }

    /// Euclidean norms of the `W` and the `V` gradient, accumulated in f64.
    pub fn group_norms(&self) -> (f64, f64) {
        let w = par_sum_squares(self.w.as_slice().expect("gradients are standard layout"));
        let v = par_sum_squares(self.v.as_slice().expect("gradients are standard layout"));
        (w.sqrt(), v.sqrt())
    }
}

/// Why saved optimizer state does not fit a model.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OptimizerStateError {
    /// Adam needs its moments.
    #[error("the Adam optimizer needs its first and second moments")]
    MissingMoments,
    /// SGD has no moments.
    #[error("the SGD optimizer has no moments")]
    UnexpectedMoments,
    /// Moments shaped for another model.
    #[error("moments of shapes {found:?} do not fit the model's weights {expected:?}")]
    Shape {
        /// Shapes of `W` and `V`.
        expected: [(usize, usize); 2],
        /// Shapes given.
        found: [(usize, usize); 2],
    },
    /// A moment no sequence of finite gradients can produce: a NaN or infinity, or a negative
    /// second moment (its square root is NaN). Either would reach the weights on the first
    /// update and never leave them.
    #[error(
        "Adam's {moment} moment of {weights} holds {value} at index {index}; \
         moments must be finite and second moments non-negative"
    )]
    InvalidMoment {
        /// `"first"` or `"second"`.
        moment: &'static str,
        /// `"W"` or `"V"`.
        weights: &'static str,
        /// Row-major index of the first bad entry.
        index: usize,
        /// The entry, as text.
        value: String,
    },
    /// A pending gradient sum for a model that updates at every step.
    #[error("a pending gradient sum, but the model updates at every step (tokens_per_update 1)")]
    UnexpectedPending,
    /// A pending sum with a non-finite value or a token count out of range.
    #[error("the pending gradient sum is not finite, or its token count is out of range")]
    BadPending,
}

/// What one optimizer call did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum UpdateOutcome {
    /// The weights were updated; `grad_norm` is the norm before clipping.
    Applied {
        /// Global gradient norm before clipping.
        grad_norm: f64,
        /// Whether clipping scaled the gradient down.
        clipped: bool,
    },
    /// The gradient had a NaN or infinity, or its norm after clipping exceeded
    /// [`max_update_norm`]: nothing changed.
    NonFinite,
}

/// Optimizer state for one model.
#[derive(Debug, Clone, PartialEq)]
pub struct Optimizer<T> {
    kind: OptimizerKind,
    lr: f64,
    clip: f64,
    clip_scope: ClipScope,
    /// Number of updates applied so far.
    pub steps: u64,
    /// Adam's first moments (empty for SGD).
    pub m: Option<Gradients<T>>,
    /// Adam's second moments (empty for SGD).
    pub v: Option<Gradients<T>>,
    /// The token gradients waiting for the next update (`tokens_per_update` above 1;
    /// [`crate::core::pending`]).
    pub pending: Option<super::pending::PendingUpdate<T>>,
}

/// Element-wise passes over more than this many weights run on the pool, in chunks of it.
const CHUNK: usize = 1 << 14;

/// Whether an element-wise pass over `len` weights runs on the pool. The passes are independent
/// per element, so the result never depends on how the work is split.
fn parallel(len: usize) -> bool {
    len > CHUNK && rayon::current_num_threads() > 1
}

/// Sum of squares in f64 over fixed chunks (at most 64 partial sums, added in order), so that
/// the result is bit-identical however the pool schedules the chunks.
fn par_sum_squares<T: Float>(xs: &[T]) -> f64 {
    const MAX_PARTS: usize = 64;
    if !parallel(xs.len()) {
        return fixed_chunk_sum(xs, xs.len().div_ceil(MAX_PARTS).max(CHUNK));
    }
    let chunk = xs.len().div_ceil(MAX_PARTS).max(CHUNK);
    let mut parts = [0.0f64; MAX_PARTS];
    parts.par_iter_mut().zip(xs.par_chunks(chunk)).for_each(|(p, c)| *p = sum_squares(c));
    parts.iter().sum()
}

/// The sequential twin of [`par_sum_squares`]: the same chunks, the same order.
fn fixed_chunk_sum<T: Float>(xs: &[T], chunk: usize) -> f64 {
    xs.chunks(chunk).map(sum_squares).sum()
}

/// The first entry of a saved moment that fails `ok`, as an error.
fn check_moment<T: Float>(
    g: &Gradients<T>,
    moment: &'static str,
    ok: impl Fn(T) -> bool,
) -> Result<(), OptimizerStateError> {
    for (weights, a) in [("W", &g.w), ("V", &g.v)] {
        if let Some((index, x)) = a.iter().enumerate().find(|(_, x)| !ok(**x)) {
            return Err(OptimizerStateError::InvalidMoment { moment, weights, index, value: x.to_string() });
        }
    }
    Ok(())
}

/// The largest gradient norm (after clipping) an update applies; larger ones are refused as
/// [`UpdateOutcome::NonFinite`]. At `sqrt(T::MAX)/2` every entry has `g² ≤ T::MAX/4`, so Adam's
/// `β2·v + (1−β2)·g²` stays finite for any finite `v ≥ 0` (rounding included), and SGD's step
/// `lr·g` (lr ≤ 10) is far from `T::MAX`. For f32 that is about 9.2e18, beyond any gradient
/// a working model produces; for f64 the f64 norm itself overflows first.
pub fn max_update_norm<T: Float>() -> f64 {
    0.5 * T::max_value().to_f64_lossless().sqrt()
}

/// One chunk of weights, gradient, first and second moments, as zipped iterators yield it.
type AdamChunk<'a, T> = (((&'a mut [T], &'a [T]), &'a mut [T]), &'a mut [T]);

const BETA1: f64 = 0.9;
const BETA2: f64 = 0.999;
const ADAM_EPS: f64 = 1e-8;

impl<T: Float> Optimizer<T> {
    /// A fresh optimizer for a model, as its config says.
    pub fn new(spec: &ModelSpec) -> Self {
        let c = &spec.config;
        let adam = c.optimizer == OptimizerKind::Adam;
        Self {
            kind: c.optimizer,
            lr: c.lr,
            clip: c.clip,
            clip_scope: c.clip_scope,
            steps: 0,
            m: adam.then(|| Gradients::zeros(spec)),
            v: adam.then(|| Gradients::zeros(spec)),
            pending: super::pending::PendingUpdate::new(spec),
        }
    }

    /// Rebuilds a saved optimizer: kind, learning rate and clip from `spec`, `steps` updates
    /// applied so far, and Adam's first and second moments `(m, v)` (`None` for SGD).
    pub fn restore(
        spec: &ModelSpec,
        steps: u64,
        moments: Option<(Gradients<T>, Gradients<T>)>,
    ) -> Result<Self, OptimizerStateError> {
        let mut opt = Self::new(spec);
        match (opt.kind, moments) {
            (OptimizerKind::Sgd, None) => {}
            (OptimizerKind::Sgd, Some(_)) => return Err(OptimizerStateError::UnexpectedMoments),
            (OptimizerKind::Adam, None) => return Err(OptimizerStateError::MissingMoments),
            (OptimizerKind::Adam, Some((m, v))) => {
                let zeros = Gradients::<T>::zeros(spec);
                for g in [&m, &v] {
                    if g.w.dim() != zeros.w.dim() || g.v.dim() != zeros.v.dim() {
                        return Err(OptimizerStateError::Shape {
                            expected: [zeros.w.dim(), zeros.v.dim()],
                            found: [g.w.dim(), g.v.dim()],
                        });
                    }
                }
                check_moment(&m, "first", |x| x.is_finite())?;
                check_moment(&v, "second", |x| x.is_finite() && x >= T::zero())?;
                (opt.m, opt.v) = (Some(m.into_standard_layout()), Some(v.into_standard_layout()));
            }
        }
        opt.steps = steps;
        Ok(opt)
    }

    /// The optimizer kind.
    pub fn kind(&self) -> OptimizerKind {
        self.kind
    }

    /// The learning rate.
    pub fn lr(&self) -> f64 {
        self.lr
    }

    /// The global-norm clip (0: none).
    pub fn clip(&self) -> f64 {
        self.clip
    }

    /// Which weights the clip measures.
    pub fn clip_scope(&self) -> ClipScope {
        self.clip_scope
    }

    /// The factors that clip the `W` and the `V` gradient, given their norms.
    fn clip_factors(&self, w_norm: f64, v_norm: f64) -> (f64, f64) {
        let factor = |norm: f64| if self.clip > 0.0 && norm > self.clip { self.clip / norm } else { 1.0 };
        match self.clip_scope {
            ClipScope::Global => {
                let f = factor(w_norm.hypot(v_norm));
                (f, f)
            }
            ClipScope::Recurrent => (factor(w_norm), 1.0),
            ClipScope::PerGroup => (factor(w_norm), factor(v_norm)),
        }
    }

    /// Whether [`Optimizer::apply`] would refuse `g` (not finite, or too large once clipped).
    pub(crate) fn would_refuse(&self, g: &Gradients<T>) -> bool {
        let (w_norm, v_norm) = g.group_norms();
        if !w_norm.hypot(v_norm).is_finite() {
            return true;
        }
        let (w_scale, v_scale) = self.clip_factors(w_norm, v_norm);
        (w_scale * w_norm).hypot(v_scale * v_norm) > max_update_norm::<T>()
    }

    /// Applies one update with gradient `g` (already averaged), clipped first as the clip scope
    /// says.
    pub fn apply(&mut self, params: &mut Params<T>, g: &Gradients<T>) -> UpdateOutcome {
        let (w_norm, v_norm) = g.group_norms();
        let norm = w_norm.hypot(v_norm);
        if !norm.is_finite() {
            return UpdateOutcome::NonFinite;
        }
        let (w_scale, v_scale) = self.clip_factors(w_norm, v_norm);
        let clipped = w_scale < 1.0 || v_scale < 1.0;
        let applied_norm = (w_scale * w_norm).hypot(v_scale * v_norm);
        if applied_norm > max_update_norm::<T>() {
            return UpdateOutcome::NonFinite;
        }
        self.steps += 1;
        match self.kind {
            OptimizerKind::Sgd => {
                for (p, g, gscale) in [(&mut params.w, &g.w, w_scale), (&mut params.v, &g.v, v_scale)] {
                    let c = T::from_f64_rounded(-self.lr * gscale);
                    let p = p.as_slice_mut().expect("weights are standard layout");
                    let g = g.as_slice().expect("gradients are standard layout");
                    let update = |(p, g): (&mut [T], &[T])| {
                        for (p, &g) in p.iter_mut().zip(g) {
                            *p = *p + c * g;
                        }
                    };
                    if parallel(p.len()) {
                        p.par_chunks_mut(CHUNK).zip(g.par_chunks(CHUNK)).for_each(update);
                    } else {
                        p.chunks_mut(CHUNK).zip(g.chunks(CHUNK)).for_each(update);
                    }
                }
            }
            OptimizerKind::Adam => {
                let t = self.steps as f64;
                let bc1 = 1.0 - BETA1.powf(t);
                let bc2 = 1.0 - BETA2.powf(t);
                // θ -= lr/bc1 · m / (sqrt(v/bc2) + ε), with m, v of the clipped gradient.
                let step = T::from_f64_rounded(self.lr / bc1);
                let inv_sqrt_bc2 = T::from_f64_rounded(1.0 / bc2.sqrt());
                let eps = T::from_f64_rounded(ADAM_EPS);
                let b1 = T::from_f64_rounded(BETA1);
                let b2 = T::from_f64_rounded(BETA2);
                let one = T::one();
                let (m, v) = (self.m.as_mut().expect("adam m"), self.v.as_mut().expect("adam v"));
                let update = |gs: T, (((p, g), m), v): AdamChunk<'_, T>| {
                    for (((p, &g), m), v) in p.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut()) {
                        let g = g * gs;
                        *m = b1 * *m + (one - b1) * g;
                        *v = b2 * *v + (one - b2) * g * g;
                        *p = *p - step * *m / ((*v).sqrt() * inv_sqrt_bc2 + eps);
                    }
                };
                for (p, g, m, v, gscale) in [
                    (&mut params.w, &g.w, &mut m.w, &mut v.w, w_scale),
                    (&mut params.v, &g.v, &mut m.v, &mut v.v, v_scale),
                ] {
                    let gs = T::from_f64_rounded(gscale);
                    let update = |chunk: AdamChunk<'_, T>| update(gs, chunk);
                    let p = p.as_slice_mut().expect("standard layout");
                    let g = g.as_slice().expect("standard layout");
                    let m = m.as_slice_mut().expect("standard layout");
                    let v = v.as_slice_mut().expect("standard layout");
                    if parallel(p.len()) {
                        p.par_chunks_mut(CHUNK)
                            .zip(g.par_chunks(CHUNK))
                            .zip(m.par_chunks_mut(CHUNK))
                            .zip(v.par_chunks_mut(CHUNK))
                            .for_each(update);
                    } else {
                        p.chunks_mut(CHUNK)
                            .zip(g.chunks(CHUNK))
                            .zip(m.chunks_mut(CHUNK))
                            .zip(v.chunks_mut(CHUNK))
                            .for_each(update);
                    }
                }
            }
        }
        UpdateOutcome::Applied { grad_norm: norm, clipped }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::model::ModelConfig;

    fn spec(opt: OptimizerKind, clip: f64) -> ModelSpec {
        // The global scope: these tests were written for it; the scopes have a test of their own.
        let clip_scope = ClipScope::Global;
        ModelConfig {
            vocab_size: 3,
            hidden: 2,
            optimizer: opt,
            lr: 0.1,
            clip,
            clip_scope,
            ..Default::default()
        }
        .check()
        .unwrap()
    }

    #[test]
    fn sgd_moves_against_the_gradient_by_lr() {
        let s = spec(OptimizerKind::Sgd, 0.0);
        let mut p = Params::<f64>::zeros(&s);
        let mut g = Gradients::zeros(&s);
        g.w[[0, 0]] = 2.0;
        g.v[[1, 1]] = -1.0;
        let mut o = Optimizer::new(&s);
        assert!(matches!(o.apply(&mut p, &g), UpdateOutcome::Applied { clipped: false, .. }));
        assert_eq!(p.w[[0, 0]], -0.2);
        assert_eq!(p.v[[1, 1]], 0.1);
    }

    #[test]
    fn clipping_rescales_to_the_clip_norm() {
        let s = spec(OptimizerKind::Sgd, 1.0);
        let mut p = Params::<f64>::zeros(&s);
        let mut g = Gradients::zeros(&s);
        g.w[[0, 0]] = 3.0;
        g.v[[0, 0]] = 4.0;
        let mut o = Optimizer::new(&s);
        let out = o.apply(&mut p, &g);
        assert_eq!(out, UpdateOutcome::Applied { grad_norm: 5.0, clipped: true });
        assert!((p.w[[0, 0]] + 0.1 * 0.6).abs() < 1e-15);
        assert!((p.v[[0, 0]] + 0.1 * 0.8).abs() < 1e-15);
    }

    /// The readout's exact gradient must not shrink because the recurrent estimate is large.
    #[test]
    fn recurrent_and_per_group_clips_spare_the_readout() {
        let run = |scope: ClipScope, w: f64, v: f64| {
            let s =
                ModelConfig { clip_scope: scope, ..spec(OptimizerKind::Sgd, 1.0).config }.check().unwrap();
            let mut p = Params::<f64>::zeros(&s);
            let mut g = Gradients::zeros(&s);
            g.w[[0, 0]] = w;
            g.v[[0, 0]] = v;
            let out = Optimizer::new(&s).apply(&mut p, &g);
            (out, -p.w[[0, 0]] / 0.1, -p.v[[0, 0]] / 0.1)
        };
        let close = |a: f64, b: f64| (a - b).abs() < 1e-12;
        let (out, w, v) = run(ClipScope::Recurrent, 30.0, 0.5);
        assert_eq!(out, UpdateOutcome::Applied { grad_norm: 30.0f64.hypot(0.5), clipped: true });
        assert!(close(w, 1.0) && close(v, 0.5), "{w} {v}");
        // A readout above the bound is still not clipped under the recurrent scope.
        let (_, w, v) = run(ClipScope::Recurrent, 0.5, 7.0);
        assert!(close(w, 0.5) && close(v, 7.0), "{w} {v}");
        let (_, w, v) = run(ClipScope::PerGroup, 30.0, 7.0);
        assert!(close(w, 1.0) && close(v, 1.0), "{w} {v}");
        let (out, w, v) = run(ClipScope::PerGroup, 0.6, 0.7);
        assert!(
            close(w, 0.6) && close(v, 0.7) && matches!(out, UpdateOutcome::Applied { clipped: false, .. })
        );
        // The global scope shrinks both by the joint norm (the old behaviour).
        let (_, w, v) = run(ClipScope::Global, 30.0, 0.5);
        let joint = 30.0f64.hypot(0.5);
        assert!(close(w, 30.0 / joint) && close(v, 0.5 / joint), "{w} {v}");
    }

    #[test]
    fn adam_first_step_moves_each_weight_by_lr_in_sign_direction() {
        let s = spec(OptimizerKind::Adam, 0.0);
        let mut p = Params::<f64>::zeros(&s);
        let mut g = Gradients::zeros(&s);
        g.w[[0, 1]] = 0.5;
        g.w[[1, 2]] = -3.0;
        let mut o = Optimizer::new(&s);
        o.apply(&mut p, &g);
        // With bias correction, step 1 is lr·g/(|g| + ε).
        assert!((p.w[[0, 1]] + 0.1).abs() < 1e-6);
        assert!((p.w[[1, 2]] - 0.1).abs() < 1e-6);
        assert_eq!(p.w[[0, 0]], 0.0);
        // Step 2 with the same gradient: m/sqrt(v) stays ±1 after bias correction.
        o.apply(&mut p, &g);
        assert!((p.w[[0, 1]] + 0.2).abs() < 1e-6);
    }

    #[test]
    fn restore_rebuilds_an_equal_optimizer_and_refuses_misfits() {
        let s = spec(OptimizerKind::Adam, 1.0);
        let mut p = Params::<f64>::init(&s);
        let mut g = Gradients::zeros(&s);
        g.w[[1, 2]] = 0.25;
        let mut o = Optimizer::new(&s);
        o.apply(&mut p, &g);
        let (m, v) = (o.m.clone().unwrap(), o.v.clone().unwrap());
        let restored = Optimizer::restore(&s, o.steps, Some((m.clone(), v.clone()))).unwrap();
        assert_eq!(restored, o);
        assert_eq!((restored.lr(), restored.clip()), (0.1, 1.0));
        assert_eq!(Optimizer::<f64>::restore(&s, 1, None), Err(OptimizerStateError::MissingMoments));
        let other = ModelConfig { vocab_size: 4, hidden: 2, ..Default::default() }.check().unwrap();
        let wrong = Gradients::<f64>::zeros(&other);
        assert!(matches!(
            Optimizer::restore(&s, 1, Some((wrong.clone(), wrong))),
            Err(OptimizerStateError::Shape { .. })
        ));
        let sgd = spec(OptimizerKind::Sgd, 0.0);
        assert_eq!(
            Optimizer::<f64>::restore(&sgd, 3, Some((m, v))),
            Err(OptimizerStateError::UnexpectedMoments)
        );
        assert_eq!(Optimizer::<f64>::restore(&sgd, 3, None).unwrap().steps, 3);
    }

    /// `restore` used to check shapes only: a saved negative second moment made `sqrt(v)` NaN and
    /// the first update wrote NaN into the weights, for good.
    #[test]
    fn restore_refuses_non_finite_or_negative_moments() {
        let s = spec(OptimizerKind::Adam, 0.0);
        let good = || (Gradients::<f32>::zeros(&s), Gradients::<f32>::zeros(&s));
        let restore = |(m, v)| Optimizer::restore(&s, 5, Some((m, v)));
        let (m, mut v) = good();
        v.w[[1, 2]] = -1e-12;
        let err = restore((m, v)).unwrap_err();
        assert_eq!(
            err,
            OptimizerStateError::InvalidMoment {
                moment: "second",
                weights: "W",
                index: s.m + 2,
                value: "-0.000000000001".into()
            }
        );
        assert!(err.to_string().contains("second moment of W"), "{err}");
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            let (mut m, v) = good();
            m.v[[0, 1]] = bad;
            assert!(
                matches!(
                    restore((m, v)),
                    Err(OptimizerStateError::InvalidMoment { moment: "first", weights: "V", index: 1, .. })
                ),
                "first moment {bad}"
            );
            let (m, mut v) = good();
            v.v[[2, 0]] = bad;
            assert!(
                matches!(
                    restore((m, v)),
                    Err(OptimizerStateError::InvalidMoment { moment: "second", weights: "V", .. })
                ),
                "second moment {bad}"
            );
        }
        // Negative first moments and a negative zero second moment are reachable and harmless.
        let (mut m, mut v) = good();
        m.w[[0, 0]] = -3.0;
        v.w[[0, 0]] = -0.0;
        let mut o = restore((m, v)).unwrap();
        let mut p = Params::<f32>::zeros(&s);
        let mut g = Gradients::zeros(&s);
        g.w[[0, 0]] = 1.0;
        assert!(matches!(o.apply(&mut p, &g), UpdateOutcome::Applied { .. }));
        assert!(p.w.iter().all(|x| x.is_finite()));
    }

    /// The norm is taken in f64, so a finite f32 gradient far beyond `sqrt(f32::MAX)` used to pass:
    /// Adam's `g²` overflowed to `v = +∞` (the weight frozen for good), SGD's `lr·g` to an infinite
    /// weight. Such an update is now refused like a non-finite one.
    #[test]
    fn f32_gradient_too_large_for_the_update_changes_nothing() {
        let bound = max_update_norm::<f32>();
        assert!((bound - 0.5 * f64::from(f32::MAX).sqrt()).abs() <= 1.0);
        for (kind, lr, big) in [(OptimizerKind::Adam, 0.1, 1e21f32), (OptimizerKind::Sgd, 10.0, 1e38)] {
            let s = ModelConfig {
                vocab_size: 3,
                hidden: 2,
                optimizer: kind,
                lr,
                clip: 0.0,
                ..Default::default()
            }
            .check()
            .unwrap();
            let mut p = Params::<f32>::init(&s);
            let before = p.clone();
            let mut g = Gradients::zeros(&s);
            g.w[[0, 1]] = big;
            let mut o = Optimizer::new(&s);
            let o_before = o.clone();
            assert_eq!(o.apply(&mut p, &g), UpdateOutcome::NonFinite, "{kind:?}");
            assert_eq!((&p, &o), (&before, &o_before), "{kind:?}");
            // The next ordinary gradient moves the weight: nothing was poisoned.
            g.w[[0, 1]] = 1.0;
            assert!(matches!(o.apply(&mut p, &g), UpdateOutcome::Applied { .. }));
            assert!(p.w[[0, 1]] < before.w[[0, 1]], "{kind:?}: the weight must still learn");
            assert!(p.w.iter().all(|x| x.is_finite()), "{kind:?}");
        }
        // Just below the bound an Adam update stays finite, moments included.
        let s = spec(OptimizerKind::Adam, 0.0);
        let (mut p, mut g, mut o) = (Params::<f32>::init(&s), Gradients::zeros(&s), Optimizer::new(&s));
        g.w[[0, 1]] = (0.999 * bound) as f32;
        assert!(matches!(o.apply(&mut p, &g), UpdateOutcome::Applied { .. }));
        let v = o.v.as_ref().unwrap();
        assert!(p.w.iter().chain(v.w.iter()).all(|x| x.is_finite()));
        // With clipping the applied gradient is bounded by the clip: the same gradient is applied.
        let s = spec(OptimizerKind::Adam, 1.0);
        let (mut p, mut g, mut o) = (Params::<f32>::init(&s), Gradients::zeros(&s), Optimizer::new(&s));
        g.w[[0, 1]] = 1e21;
        assert_eq!(
            o.apply(&mut p, &g),
            UpdateOutcome::Applied { grad_norm: f64::from(1e21f32), clipped: true }
        );
        assert!(o.v.as_ref().unwrap().w.iter().all(|x| x.is_finite()));
    }

    /// Above `CHUNK` weights the norm and the Adam pass run chunked on the pool; the result must
    /// be bit-identical to the sequential pass, with clipping active so that the norm matters.
    #[test]
    fn parallel_adam_with_clipping_is_bit_identical_to_sequential() {
        let s = ModelConfig {
            vocab_size: 64,
            hidden: 128,
            optimizer: OptimizerKind::Adam,
            lr: 0.01,
            clip: 0.5,
            ..Default::default()
        }
        .check()
        .unwrap();
        let mut rng = crate::core::rng::CounterRng::new(17);
        let mut grads = Vec::new();
        for _ in 0..3 {
            let mut g = Gradients::<f32>::zeros(&s);
            g.w.iter_mut().chain(g.v.iter_mut()).for_each(|x| *x = rng.normal() as f32);
            grads.push(g);
        }
        let run = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
            pool.install(|| {
                let mut p = Params::<f32>::init(&s);
                assert_eq!(parallel(p.w.len()), threads > 1, "W must take the pass under test");
                let mut o = Optimizer::new(&s);
                let outcomes: Vec<_> = grads.iter().map(|g| o.apply(&mut p, g)).collect();
                (p, o, outcomes)
            })
        };
        let (seq, par) = (run(1), run(4));
        assert!(seq.0.w.len() > CHUNK);
        assert!(seq.2.iter().all(|u| matches!(u, UpdateOutcome::Applied { clipped: true, .. })));
        let bits = |p: &Params<f32>, o: &Optimizer<f32>| -> Vec<u32> {
            let (m, v) = (o.m.as_ref().unwrap(), o.v.as_ref().unwrap());
            [&p.w, &p.v, &m.w, &m.v, &v.w, &v.v].iter().flat_map(|a| a.iter().map(|x| x.to_bits())).collect()
        };
        assert_eq!(seq.2, par.2, "norms");
        assert!(bits(&seq.0, &seq.1) == bits(&par.0, &par.1), "weights or moments differ");
    }

    /// Adam's moments must be built from the clipped gradient, not the raw one (the first step's
    /// weight change is ±lr either way, so only the moments and the second step tell).
    #[test]
    fn adam_moments_are_built_from_the_clipped_gradient() {
        let s = spec(OptimizerKind::Adam, 1.0);
        let mut p = Params::<f64>::zeros(&s);
        let mut o = Optimizer::new(&s);
        let mut g = Gradients::zeros(&s);
        g.w[[0, 0]] = 3.0;
        g.v[[0, 0]] = 4.0;
        assert_eq!(o.apply(&mut p, &g), UpdateOutcome::Applied { grad_norm: 5.0, clipped: true });
        let close =
            |got: f64, want: f64| assert!((got - want).abs() <= 1e-14 * want.abs(), "{got} vs {want}");
        let (m, v) = (o.m.clone().unwrap(), o.v.clone().unwrap());
        close(m.w[[0, 0]], 0.1 * 0.6);
        close(m.v[[0, 0]], 0.1 * 0.8);
        close(v.w[[0, 0]], 0.001 * 0.36);
        close(v.v[[0, 0]], 0.001 * 0.64);
        // A second gradient inside the clip is used as it is.
        g.w[[0, 0]] = -0.3;
        g.v[[0, 0]] = 0.0;
        assert_eq!(o.apply(&mut p, &g), UpdateOutcome::Applied { grad_norm: 0.3, clipped: false });
        let m2 = 0.9 * 0.06 + 0.1 * -0.3;
        let v2 = 0.999 * 0.00036 + 0.001 * 0.09;
        close(o.m.as_ref().unwrap().w[[0, 0]], m2);
        close(o.v.as_ref().unwrap().w[[0, 0]], v2);
        let (bc1, bc2) = (1.0 - 0.9f64.powi(2), 1.0 - 0.999f64.powi(2));
        let step1 = 0.1 * 0.6 / (0.6 + 1e-8);
        let step2 = 0.1 / bc1 * m2 / (v2.sqrt() / bc2.sqrt() + 1e-8);
        close(p.w[[0, 0]], -step1 - step2);
    }

    #[test]
    fn non_finite_gradient_changes_nothing() {
        for kind in [OptimizerKind::Adam, OptimizerKind::Sgd] {
            let s = spec(kind, 1.0);
            let mut p = Params::<f32>::init(&s);
            let before = p.clone();
            let mut g = Gradients::zeros(&s);
            g.w[[0, 0]] = 1.0;
            g.v[[0, 0]] = f32::NAN;
            let mut o = Optimizer::new(&s);
            let o_before = o.clone();
            assert_eq!(o.apply(&mut p, &g), UpdateOutcome::NonFinite);
            assert_eq!(p, before);
            assert_eq!(o, o_before);
        }
    }
}
