//! The scalar type the numeric core is generic over: `f32` in production, `f64` in the oracle tests.

use std::fmt::{Debug, Display};
use std::iter::Sum;

use ndarray::{LinalgScalar, ScalarOperand};
use num_traits::{Float as NumFloat, FromPrimitive, ToPrimitive};

/// A floating-point scalar usable by every kernel of the core.
pub trait Float:
    NumFloat
    + LinalgScalar
    + ScalarOperand
    + FromPrimitive
    + ToPrimitive
    + Sum
    + Debug
    + Display
    + Default
    + Send
    + Sync
    + 'static
{
    /// Name of the type as written in configs and reports (`"f32"`, `"f64"`).
    const NAME: &'static str;

    /// Lossless widening to f64 (norms and loss sums are accumulated in f64).
    fn to_f64_lossless(self) -> f64;

    /// Rounding conversion from f64.
    fn from_f64_rounded(x: f64) -> Self;
}

impl Float for f32 {
    const NAME: &'static str = "f32";
    #[inline]
    fn to_f64_lossless(self) -> f64 {
        f64::from(self)
    }
    #[inline]
    fn from_f64_rounded(x: f64) -> Self {
        x as f32
    }
}

impl Float for f64 {
    const NAME: &'static str = "f64";
    #[inline]
    fn to_f64_lossless(self) -> f64 {
        self
    }
    #[inline]
    fn from_f64_rounded(x: f64) -> Self {
        x
    }
}

/// Sum of squares accumulated in f64, so that f32 factors neither overflow nor lose small terms.
#[inline]
pub fn sum_squares<T: Float>(xs: &[T]) -> f64 {
    xs.iter()
        .map(|&x| {
            let x = x.to_f64_lossless();
            x * x
        })
        .sum()
}

/// Dot product accumulated in f64.
#[inline]
pub fn dot_f64<T: Float>(xs: &[T], ys: &[T]) -> f64 {
    debug_assert_eq!(xs.len(), ys.len());
    xs.iter()
        .zip(ys)
        .map(|(&x, &y)| x.to_f64_lossless() * y.to_f64_lossless())
        .sum()
}
