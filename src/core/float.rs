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

/// Whether every element is finite.
pub fn all_finite<'a, T: Float>(xs: impl IntoIterator<Item = &'a T>) -> bool {
    xs.into_iter().all(|x| x.is_finite())
}

/// Sum of squares accumulated in f64, so that f32 factors neither overflow nor lose small terms.
/// Eight independent accumulators let the compiler vectorise the widening loop.
#[inline]
pub fn sum_squares<T: Float>(xs: &[T]) -> f64 {
    let mut acc = [0.0f64; 8];
    let chunks = xs.chunks_exact(8);
    let rest = chunks.remainder();
    for c in chunks {
        for (a, &x) in acc.iter_mut().zip(c) {
            let x = x.to_f64_lossless();
            *a += x * x;
        }
    }
    let mut total: f64 = acc.iter().sum();
    for &x in rest {
        let x = x.to_f64_lossless();
        total += x * x;
    }
    total
}

/// `Σ a_i b_i` accumulated in f64 in eight independent lanes (vectorised like [`sum_squares`]).
#[inline]
pub fn dot_f64<T: Float>(a: &[T], b: &[T]) -> f64 {
    debug_assert_eq!(a.len(), b.len());
    let mut acc = [0.0f64; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i].to_f64_lossless() * y[i].to_f64_lossless();
        }
    }
    let mut total: f64 = acc.iter().sum();
    for (&x, &y) in ra.iter().zip(rb) {
        total += x.to_f64_lossless() * y.to_f64_lossless();
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dots_match_a_plain_loop_at_every_remainder() {
        for len in 0..20 {
            let xs: Vec<f32> = (0..len).map(|i| i as f32 * 0.37 - 2.0).collect();
            let ys: Vec<f32> = (0..len).map(|i| 1.5 - i as f32 * 0.11).collect();
            let plain: f64 = xs.iter().zip(&ys).map(|(&x, &y)| f64::from(x) * f64::from(y)).sum();
            assert!((dot_f64(&xs, &ys) - plain).abs() <= 1e-12 * plain.abs().max(1.0), "len {len}");
        }
    }

    #[test]
    fn sums_match_a_plain_loop_at_every_remainder() {
        for len in 0..20 {
            let xs: Vec<f32> = (0..len).map(|i| i as f32 * 0.37 - 2.0).collect();
            let ss: f64 = xs.iter().map(|&x| f64::from(x) * f64::from(x)).sum();
            assert!((sum_squares(&xs) - ss).abs() <= 1e-12 * ss.max(1.0), "len {len}");
        }
    }

    #[test]
    fn f32_squares_do_not_overflow() {
        let big = [3e30f32; 4];
        let expected = 4.0 * f64::from(big[0]).powi(2);
        assert!(expected > f64::from(f32::MAX));
        assert!((sum_squares(&big) - expected).abs() <= 1e-15 * expected);
    }
}
