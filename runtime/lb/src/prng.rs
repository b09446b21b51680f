//! A small deterministic pseudo-random generator (SplitMix64) with the few distributions the
//! strategies and the synthetic load generator need. Every user passes an explicit seed, so runs
//! are reproducible bit for bit on every platform.

/// SplitMix64 (Steele, Lea, Flood 2014): 64 bits of state, passes BigCrush, and any seed
/// (including 0) is fine.
#[derive(Clone, Debug)]
pub struct SplitMix64 {
    state: u64,
}

impl SplitMix64 {
    /// A generator started from `seed`.
    pub fn new(seed: u64) -> Self {
        SplitMix64 { state: seed }
    }

    /// The next 64 random bits.
    #[allow(clippy::should_implement_trait)]
    pub fn next(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, 1)` with 53 bits of precision.
    pub fn next_f64(&mut self) -> f64 {
        (self.next() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Uniform in `0..n` (`n > 0`), without modulo bias worth mentioning (Lemire's multiply).
    pub fn below(&mut self, n: u64) -> u64 {
        assert!(n > 0, "below(0)");
        ((self.next() as u128 * n as u128) >> 64) as u64
    }

    /// Standard normal (Box–Muller; one of the pair is dropped to keep the state simple).
    pub fn normal(&mut self) -> f64 {
        let u1 = 1.0 - self.next_f64(); // (0, 1]
        let u2 = self.next_f64();
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    }

    /// Exponential with mean 1.
    pub fn exponential(&mut self) -> f64 {
        -(1.0 - self.next_f64()).ln()
    }

    /// Pareto with scale 1 and shape `alpha` (values ≥ 1; mean `alpha / (alpha - 1)`).
    pub fn pareto(&mut self, alpha: f64) -> f64 {
        (1.0 - self.next_f64()).powf(-1.0 / alpha)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deterministic_and_in_range() {
        let mut a = SplitMix64::new(42);
        let mut b = SplitMix64::new(42);
        for _ in 0..1000 {
            assert_eq!(a.next(), b.next());
        }
        let mut r = SplitMix64::new(0);
        assert_ne!(r.next(), 0);
        for _ in 0..10_000 {
            let x = r.next_f64();
            assert!((0.0..1.0).contains(&x));
            assert!(r.below(7) < 7);
            assert!(r.pareto(1.5) >= 1.0);
            assert!(r.exponential() >= 0.0);
        }
    }

    #[test]
    fn moments_are_plausible() {
        let mut r = SplitMix64::new(3);
        let n = 200_000;
        let mean = |f: &mut dyn FnMut() -> f64| (0..n).map(|_| f()).sum::<f64>() / n as f64;
        assert!((mean(&mut || r.next_f64()) - 0.5).abs() < 0.01);
        let mut r = SplitMix64::new(4);
        assert!(mean(&mut || r.normal()).abs() < 0.01);
        let mut r = SplitMix64::new(5);
        assert!((mean(&mut || r.exponential()) - 1.0).abs() < 0.02);
    }
}
