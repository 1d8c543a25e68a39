//! What the traffic is made of: the popular CPFs (cache hits), where new ones start
//! (misses), the inputs the proxy must refuse, and the seeded randomness that makes a run's
//! sequence of choices reproducible.

use score_validation::Cpf;

/// Inputs the proxy must refuse with `400` before they reach the cache or the upstream.
pub(crate) const BAD_CPFS: [&str; 6] = [
    "12345678900",    // check digits do not match
    "1234",           // too short
    "11111111111",    // all digits the same
    "",               // missing
    "016.587.390-6x", // not a digit
    "abcdefghijk",    // not digits at all
];

/// How many distinct CPFs each client keeps asking about again (the cache's working set).
pub(crate) const POPULAR_CPFS: u32 = 40;

/// First nine digits of the popular CPFs; new ones are counted from [`NEW_CPF_BASE`] on.
pub(crate) const POPULAR_BASE: u32 = 100_000_000;
pub(crate) const NEW_CPF_BASE: u32 = 300_000_000;

/// The `k`-th popular CPF (the next valid one from its base).
pub(crate) fn popular_cpf(k: u32) -> String {
    let mut base = POPULAR_BASE + k * 7919;
    loop {
        if let Some(cpf) = Cpf::from_base(base) {
            return cpf.to_string();
        }
        base += 1;
    }
}

/// A small seeded generator (SplitMix64): the mix must be reproducible, and no randomness
/// here needs to be unpredictable.
pub(crate) struct SplitMix64(pub(crate) u64);

impl SplitMix64 {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (`n > 0`), close enough for traffic shaping.
    pub(crate) fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_mix_is_reproducible_and_cpfs_are_valid() {
        let (mut a, mut b) = (SplitMix64(7), SplitMix64(7));
        let xs: Vec<u64> = (0..10).map(|_| a.below(100)).collect();
        let ys: Vec<u64> = (0..10).map(|_| b.below(100)).collect();
        assert_eq!(xs, ys);
        for k in 0..POPULAR_CPFS {
            assert!(Cpf::parse(&popular_cpf(k)).is_ok());
        }
        for bad in BAD_CPFS {
            assert!(Cpf::parse(bad).is_err());
        }
    }
}
