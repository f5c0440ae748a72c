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
    /// A pending sum with a non-finite value or a count (tokens or steps) out of range.
    #[error("the pending gradient sum is not finite, or its count is out of range")]
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
    /// The gradients waiting for the next update (`tokens_per_update` above 1;
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
mod tests;
