//! A seeded counter-based random number generator: every draw is a pure function of
//! `(key, counter)`, so signs can be replayed exactly, independently of batching or thread order.
//!
//! The mixing function is a double round of the SplitMix64 finaliser (Stafford's variant 13) over
//! the key and counter; it passes the usual avalanche tests and is all we need for random signs,
//! initial weights and synthetic data. It is not a cryptographic generator.

/// Golden-ratio increment of SplitMix64.
const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;

#[inline]
fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The 64 random bits at `counter` of the stream named by `key`.
#[inline]
pub fn bits(key: u64, counter: u64) -> u64 {
    mix64(mix64(key.wrapping_add(GOLDEN)) ^ counter.wrapping_mul(GOLDEN).wrapping_add(GOLDEN))
}

/// Derives an independent key from a parent key and a label (e.g. seed and stream id).
#[inline]
pub fn derive_key(parent: u64, label: u64) -> u64 {
    mix64(parent ^ mix64(label.wrapping_add(0x2545_F491_4F6C_DD1D)))
}

/// A random sign, +1 or -1, each with probability exactly 1/2.
#[inline]
pub fn sign(key: u64, counter: u64) -> f64 {
    if bits(key, counter) >> 63 == 0 { 1.0 } else { -1.0 }
}

/// A uniform draw in [0, 1) with 53 random bits.
#[inline]
pub fn uniform(key: u64, counter: u64) -> f64 {
    (bits(key, counter) >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
}

/// A sequential generator over one key, for initialisation and synthetic data.
#[derive(Debug, Clone)]
pub struct CounterRng {
    key: u64,
    counter: u64,
}

impl CounterRng {
    /// A generator for `key`, starting at counter 0.
    pub fn new(key: u64) -> Self {
        Self { key, counter: 0 }
    }

    /// A generator for `key` that has drawn `counter` words: it goes on as that one would.
    pub fn at(key: u64, counter: u64) -> Self {
        Self { key, counter }
    }

    /// The words drawn so far (with [`CounterRng::at`], where to resume).
    pub fn counter(&self) -> u64 {
        self.counter
    }

    /// The next 64 random bits.
    #[inline]
    pub fn next_u64(&mut self) -> u64 {
        let x = bits(self.key, self.counter);
        self.counter += 1;
        x
    }

    /// Uniform in [0, 1).
    #[inline]
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Uniform integer in `0..bound` (bound > 0), by rejection so that it is exactly uniform.
    pub fn below(&mut self, bound: u64) -> u64 {
        assert!(bound > 0, "below(0)");
        let zone = u64::MAX - (u64::MAX % bound);
        loop {
            let x = self.next_u64();
            if x < zone {
                return x % bound;
            }
        }
    }

    /// A standard normal draw (Box-Muller).
    pub fn normal(&mut self) -> f64 {
        let u1 = 1.0 - self.uniform(); // (0, 1]: keeps ln finite
        let u2 = self.uniform();
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }

    /// A random sign.
    #[inline]
    pub fn sign(&mut self) -> f64 {
        if self.next_u64() >> 63 == 0 { 1.0 } else { -1.0 }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_key_and_counter_give_same_bits_and_neighbours_differ() {
        assert_eq!(bits(7, 3), bits(7, 3));
        assert_ne!(bits(7, 3), bits(7, 4));
        assert_ne!(bits(7, 3), bits(8, 3));
        assert_ne!(derive_key(1, 2), derive_key(2, 1));
    }

    #[test]
    fn signs_are_balanced_and_uncorrelated_across_neighbouring_counters() {
        let n = 200_000u64;
        let mut sum = 0.0;
        let mut lag1 = 0.0;
        for c in 0..n {
            let s = sign(42, c);
            sum += s;
            lag1 += s * sign(42, c + 1);
        }
        // 5 standard deviations of a sum of n fair signs.
        let bound = 5.0 * (n as f64).sqrt();
        assert!(sum.abs() < bound, "sum {sum}");
        assert!(lag1.abs() < bound, "lag-1 correlation {lag1}");
    }

    /// Streams get keys `derive_key(parent, label)` for neighbouring labels (slot indices, name
    /// hashes); KF-RTRL.md §8.3 needs their signs independent, or the batch average keeps the
    /// noise it should remove. Sums of `n` products of fair independent signs have σ = √n.
    #[test]
    fn signs_of_neighbouring_stream_keys_are_uncorrelated() {
        let n = 1u64 << 20;
        let bound = 5.0 * (n as f64).sqrt();
        for parent in [0u64, 7, 0xDEAD_BEEF] {
            for (a, b) in [(0u64, 1u64), (1, 2), (0, 1 << 32)] {
                let (ka, kb) = (derive_key(parent, a), derive_key(parent, b));
                // KF-RTRL: one sign per advance, at the slot's sign counter.
                let kf: f64 = (0..n).map(|c| sign(ka, c) * sign(kb, c)).sum();
                assert!(kf.abs() < bound, "KF signs of labels {a}, {b} under {parent}: {kf} vs {bound}");
                // UORO: one key per advance, `derive_key(stream key, counter)`, and a sign per
                // state entry at counters 0..s of that key.
                let s = 16u64;
                let uoro: f64 = (0..n / s)
                    .flat_map(|c| (0..s).map(move |i| (c, i)))
                    .map(|(c, i)| sign(derive_key(ka, c), i) * sign(derive_key(kb, c), i))
                    .sum();
                assert!(uoro.abs() < bound, "UORO signs of labels {a}, {b} under {parent}: {uoro}");
                // Within one UORO stream, consecutive advances' keys are independent too.
                let steps: f64 = (0..n / s)
                    .flat_map(|c| (0..s).map(move |i| (c, i)))
                    .map(|(c, i)| sign(derive_key(ka, c), i) * sign(derive_key(ka, c + 1), i))
                    .sum();
                assert!(steps.abs() < bound, "UORO consecutive steps of label {a} under {parent}: {steps}");
            }
        }
    }

    #[test]
    fn normal_draws_have_unit_variance() {
        let mut rng = CounterRng::new(5);
        let n = 100_000;
        let xs: Vec<f64> = (0..n).map(|_| rng.normal()).collect();
        let mean = xs.iter().sum::<f64>() / n as f64;
        let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n as f64;
        assert!(mean.abs() < 0.02, "mean {mean}");
        assert!((var - 1.0).abs() < 0.02, "var {var}");
    }

    #[test]
    fn below_is_in_range_and_hits_every_value() {
        let mut rng = CounterRng::new(9);
        let mut seen = [false; 7];
        for _ in 0..1000 {
            let x = rng.below(7) as usize;
            seen[x] = true;
        }
        assert!(seen.iter().all(|&s| s));
    }
}
