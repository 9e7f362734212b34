//! Deterministic data for the suite.
//!
//! The Python benchmark draws every name, value and string from the global
//! `random` module after `random.seed(42)`, and each concurrent reader from its
//! own `random.Random(thread_id)`. [`PyRandom`] is CPython's generator
//! (MT19937 seeded through `init_by_array`, 53-bit `random()`, `getrandbits`,
//! `randint` by rejection over `getrandbits`, `choices` over a population), so
//! for the ported modes the rows written and the query bounds are the same,
//! bit for bit, as in a Python run of the same size.
//!
//! The storage mode is ours and has no Python reference; it uses
//! [`SplitMix64`], which is fast enough to fill hundreds of MiB of payload.

/// Python's `string.ascii_letters + string.digits`, the population of the
/// benchmark's `random_string`.
pub(crate) const ALNUM: &[u8; 62] =
    b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";

const MT_N: usize = 624;
const MT_M: usize = 397;

/// CPython's `random.Random`, limited to what the benchmark calls.
pub(crate) struct PyRandom {
    state: [u32; MT_N],
    next: usize,
}

impl PyRandom {
    /// `random.seed(seed)` / `random.Random(seed)` for a non-negative integer
    /// below 2^32: CPython feeds the integer's 32-bit words to `init_by_array`
    /// (zero becomes the one-word key `[0]`).
    pub(crate) fn seed(seed: u32) -> Self {
        let mut rng = Self::from_u32(19_650_218);
        let key = [seed];
        let mt = &mut rng.state;
        let (mut i, mut j) = (1usize, 0usize);
        for _ in 0..MT_N.max(key.len()) {
            let prev = mt[i - 1] ^ (mt[i - 1] >> 30);
            mt[i] = (mt[i] ^ prev.wrapping_mul(1_664_525))
                .wrapping_add(key[j])
                .wrapping_add(j as u32);
            i += 1;
            j += 1;
            if i >= MT_N {
                mt[0] = mt[MT_N - 1];
                i = 1;
            }
            if j >= key.len() {
                j = 0;
            }
        }
        for _ in 0..MT_N - 1 {
            let prev = mt[i - 1] ^ (mt[i - 1] >> 30);
            mt[i] = (mt[i] ^ prev.wrapping_mul(1_566_083_941)).wrapping_sub(i as u32);
            i += 1;
            if i >= MT_N {
                mt[0] = mt[MT_N - 1];
                i = 1;
            }
        }
        mt[0] = 0x8000_0000;
        rng
    }

    /// The reference `init_genrand`.
    fn from_u32(seed: u32) -> Self {
        let mut state = [0u32; MT_N];
        state[0] = seed;
        for i in 1..MT_N {
            let prev = state[i - 1] ^ (state[i - 1] >> 30);
            state[i] = 1_812_433_253u32.wrapping_mul(prev).wrapping_add(i as u32);
        }
        Self { state, next: MT_N }
    }

    fn twist(&mut self) {
        let mt = &mut self.state;
        for i in 0..MT_N {
            let y = (mt[i] & 0x8000_0000) | (mt[(i + 1) % MT_N] & 0x7fff_ffff);
            let mag = if y & 1 == 0 { 0 } else { 0x9908_b0df };
            mt[i] = mt[(i + MT_M) % MT_N] ^ (y >> 1) ^ mag;
        }
        self.next = 0;
    }

    /// The reference `genrand_int32` (tempered output).
    fn next_u32(&mut self) -> u32 {
        if self.next >= MT_N {
            self.twist();
        }
        let mut y = self.state[self.next];
        self.next += 1;
        y ^= y >> 11;
        y ^= (y << 7) & 0x9d2c_5680;
        y ^= (y << 15) & 0xefc6_0000;
        y ^ (y >> 18)
    }

    /// `random.random()`: 53 bits from two outputs, in [0, 1).
    pub(crate) fn random(&mut self) -> f64 {
        let a = f64::from(self.next_u32() >> 5);
        let b = f64::from(self.next_u32() >> 6);
        (a * 67_108_864.0 + b) * (1.0 / 9_007_199_254_740_992.0)
    }

    /// `random.getrandbits(k)` for 1 <= k <= 64: low 32-bit word first, the
    /// last word keeping its top bits.
    fn getrandbits(&mut self, k: u32) -> u64 {
        debug_assert!((1..=64).contains(&k));
        if k <= 32 {
            return u64::from(self.next_u32() >> (32 - k));
        }
        let low = u64::from(self.next_u32());
        let high = u64::from(self.next_u32() >> (64 - k));
        low | (high << 32)
    }

    /// `random.randint(low, high)`: `low + _randbelow(high - low + 1)`, where
    /// `_randbelow(n)` draws `n.bit_length()` bits until the value is below `n`.
    pub(crate) fn randint(&mut self, low: i64, high: i64) -> i64 {
        let n = high.abs_diff(low) + 1;
        let bits = u64::BITS - n.leading_zeros();
        loop {
            let r = self.getrandbits(bits);
            if r < n {
                return low.wrapping_add_unsigned(r);
            }
        }
    }

    /// The benchmark's `random_string(length)`:
    /// `random.choices(ascii_letters + digits, k=length)`, which picks
    /// `population[floor(random() * 62)]` for each character.
    pub(crate) fn alnum_string(&mut self, length: usize) -> String {
        (0..length)
            .map(|_| {
                let index = (self.random() * ALNUM.len() as f64) as usize;
                char::from(ALNUM[index])
            })
            .collect()
    }
}

/// SplitMix64 (Steele, Lea, Flood), for the storage mode's payloads.
pub(crate) struct SplitMix64(u64);

impl SplitMix64 {
    pub(crate) fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub(crate) fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        mix64(self.0)
    }

    /// A value in `0..n` (multiply-shift; the bias is below 2^-40 for the
    /// ranges used here).
    pub(crate) fn below(&mut self, n: u64) -> u64 {
        ((u128::from(self.next_u64()) * u128::from(n)) >> 64) as u64
    }

    /// In `[0, 1)` with 53 bits.
    pub(crate) fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / 9_007_199_254_740_992.0)
    }

    /// Fills `buf` with `len` bytes: random bytes, or alphanumeric text when
    /// `text` is set.
    pub(crate) fn fill(&mut self, buf: &mut Vec<u8>, len: usize, text: bool) {
        buf.clear();
        while buf.len() < len {
            let word = self.next_u64().to_le_bytes();
            let take = (len - buf.len()).min(word.len());
            buf.extend_from_slice(&word[..take]);
        }
        if text {
            for byte in buf.iter_mut() {
                *byte = ALNUM[usize::from(*byte) % ALNUM.len()];
            }
        }
    }
}

/// SplitMix64's finaliser: a bijection on u64, so distinct inputs give
/// distinct outputs.
pub(crate) fn mix64(x: u64) -> u64 {
    let mut z = x;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Values printed by CPython 3.11 for the same calls (`random.seed(42)`,
    /// `random.Random(0)`).
    #[test]
    fn matches_cpython() {
        let mut rng = PyRandom::seed(42);
        assert_eq!(rng.random(), 0.6394267984578837);
        assert_eq!(rng.random(), 0.025010755222666936);
        let mut rng = PyRandom::seed(42);
        assert_eq!(rng.alnum_string(10), "NbrnTP3fAb");
        assert_eq!(rng.randint(1, 60000), 14329);
        let mut rng = PyRandom::seed(0);
        assert_eq!(rng.random(), 0.8444218515250481);
        let mut rng = PyRandom::seed(7);
        assert_eq!(rng.getrandbits(40), 1_040_772_936_760);
        assert_eq!(rng.getrandbits(64), 7_283_207_964_119_141_687);
        assert_eq!(rng.randint(-5, 1 << 40), 105_874_957_387);
    }

    #[test]
    fn splitmix_fill_text_is_alphanumeric() {
        let mut rng = SplitMix64::new(1);
        let mut buf = Vec::new();
        rng.fill(&mut buf, 1000, true);
        assert_eq!(buf.len(), 1000);
        assert!(buf.iter().all(u8::is_ascii_alphanumeric));
        rng.fill(&mut buf, 13, false);
        assert_eq!(buf.len(), 13);
    }
}
