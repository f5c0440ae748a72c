//! The shared weights of one model: the recurrent matrix `W` and the softmax readout `V`.
//!
//! `W` stacks the `r` gate matrices row-wise, `(r·n) × m` with `m = vocab + n + 1`, columns ordered
//! as `a_t = [x_t; h_{t-1}; 1]`: input tokens are one-hot, so a token selects one column of `W`.
//! `V` is `vocab × (n + 1)`, the last column being the readout bias.

use ndarray::{Array2, ArrayView2, s};

use super::float::Float;
use super::model::ModelSpec;
use super::rng::{CounterRng, derive_key};

/// The shared weights of one model.
#[derive(Debug, Clone, PartialEq)]
pub struct Params<T> {
    /// Recurrent weights, `(r·n) × m`.
    pub w: Array2<T>,
    /// Readout weights, `vocab × (n + 1)`.
    pub v: Array2<T>,
}

impl<T: Float> Params<T> {
    /// Zero weights of the right shapes.
    pub fn zeros(spec: &ModelSpec) -> Self {
        Self { w: Array2::zeros((spec.gate_rows(), spec.m)), v: Array2::zeros((spec.vocab, spec.n + 1)) }
    }

    /// Gaussian initialisation `N(0, init_std²)` from the model's seed (KF-RTRL.md §2.3).
    pub fn init(spec: &ModelSpec) -> Self {
        let mut p = Self::zeros(spec);
        let std = spec.config.init_std;
        let mut rng = CounterRng::new(derive_key(spec.config.seed, 0x5745_4947_4854)); // "WEIGHT"
        p.w.iter_mut().for_each(|x| *x = T::from_f64_rounded(std * rng.normal()));
        p.v.iter_mut().for_each(|x| *x = T::from_f64_rounded(std * rng.normal()));
        p
    }

    /// The block of `W` that multiplies `h_{t-1}`, `(r·n) × n`.
    pub fn w_h(&self, spec: &ModelSpec) -> ArrayView2<'_, T> {
        self.w.slice(s![.., spec.h_col()..spec.h_col() + spec.n])
    }

    /// Converts to another float type (for f32/f64 comparisons).
    pub fn cast<U: Float>(&self) -> Params<U> {
        Params {
            w: self.w.mapv(|x| U::from_f64_rounded(x.to_f64_lossless())),
            v: self.v.mapv(|x| U::from_f64_rounded(x.to_f64_lossless())),
        }
    }

    /// True when every weight is finite.
    pub fn all_finite(&self) -> bool {
        self.w.iter().chain(self.v.iter()).all(|x| x.is_finite())
    }
}
