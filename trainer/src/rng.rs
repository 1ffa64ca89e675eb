//! Counter-based randomness for the diffusion noise.
//!
//! The noise of a training row is a pure function of (seed, step, the row's index in the global
//! batch), drawn in Rust on the host: it does not depend on the device, on libtorch's global
//! generator, on what ran before or on the number of ranks, so runs are reproducible, resumable
//! from a step number, and a rank draws the noise of its own rows only.

/// SplitMix64 (Steele, Lea, Flood 2014): tiny, fast, passes BigCrush as a stream generator.
#[derive(Debug, Clone)]
pub struct NoiseRng {
    state: u64,
}

impl NoiseRng {
    /// Independent streams for distinct `(seed, stream, step, index)` tuples.
    pub fn new(seed: u64, stream: u64, step: u64, index: u64) -> Self {
        let mut rng = Self { state: seed };
        for word in [stream, step, index] {
            rng.state ^= word.wrapping_mul(0xD2B7_4407_B1CE_6E93);
            rng.next_u64();
        }
        rng
    }

    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1) with 53 random bits.
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Uniform integer in [0, n).
    pub fn below(&mut self, n: usize) -> usize {
        ((self.next_u64() as u128 * n as u128) >> 64) as usize
    }
}

/// Streams used by the trainer, so that no two purposes share numbers.
pub mod stream {
    pub const TRAIN_NOISE: u64 = 1;
    pub const VALID_NOISE: u64 = 2;
    pub const SAMPLE: u64 = 3;
    pub const CLIP_SEARCH: u64 = 4;
    /// libtorch's generator (dropout) is re-seeded from this stream every training step.
    pub const TORCH_SEED: u64 = 5;
    /// The masks of one row of a training step's global batch (indexed by the row).
    pub const TRAIN_MASKS: u64 = 6;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uniform_moments_and_independent_streams() {
        let mut r = NoiseRng::new(1, 0, 0, 0);
        let xs: Vec<f64> = (0..100_000).map(|_| r.uniform()).collect();
        let mean = xs.iter().sum::<f64>() / xs.len() as f64;
        let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / xs.len() as f64;
        assert!((mean - 0.5).abs() < 0.01 && (var - 1.0 / 12.0).abs() < 0.01, "{mean} {var}");
        assert!(xs.iter().all(|x| (0.0..1.0).contains(x)));
        let a = NoiseRng::new(1, 0, 0, 0).next_u64();
        assert_eq!(a, NoiseRng::new(1, 0, 0, 0).next_u64());
        assert_ne!(a, NoiseRng::new(1, 0, 1, 0).next_u64());
        assert_ne!(a, NoiseRng::new(1, 1, 0, 0).next_u64());
        assert_ne!(a, NoiseRng::new(2, 0, 0, 0).next_u64());
    }
}
