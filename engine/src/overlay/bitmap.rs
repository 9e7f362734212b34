//! A bitmap of atomics, one bit per block, shared by every queue. Two
//! levels: a region of [`REGION_WORDS`] words is allocated on the first bit
//! set in it, so a bitmap over a large, little-written disk costs memory in
//! proportion to what was written. It keeps a count of its set bits.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

/// Words per region: 32768 bits, 128 MiB of disk at 4 KiB blocks.
const REGION_WORDS: usize = 512;

type Region = Box<[AtomicU64; REGION_WORDS]>;

pub struct Bitmap {
    regions: Box<[OnceLock<Region>]>,
    ones: AtomicU64,
}

impl Bitmap {
    pub fn new(bits: u64) -> Bitmap {
        let words = bits.div_ceil(64) as usize;
        Bitmap {
            regions: (0..words.div_ceil(REGION_WORDS))
                .map(|_| OnceLock::new())
                .collect(),
            ones: AtomicU64::new(0),
        }
    }

    /// The word holding `bit`, if its region exists.
    fn word(&self, bit: u64) -> Option<&AtomicU64> {
        let w = (bit / 64) as usize;
        self.regions[w / REGION_WORDS]
            .get()
            .map(|r| &r[w % REGION_WORDS])
    }

    /// The word holding `bit`, its region made if need be.
    fn word_mut(&self, bit: u64) -> &AtomicU64 {
        let w = (bit / 64) as usize;
        let region = self.regions[w / REGION_WORDS]
            .get_or_init(|| Box::new(std::array::from_fn(|_| AtomicU64::new(0))));
        &region[w % REGION_WORDS]
    }

    /// Every allocated word with the index of its first bit.
    fn words(&self) -> impl Iterator<Item = (u64, &AtomicU64)> + '_ {
        self.regions.iter().enumerate().flat_map(|(r, region)| {
            region.get().into_iter().flat_map(move |words| {
                words
                    .iter()
                    .enumerate()
                    .map(move |(i, w)| (((r * REGION_WORDS + i) * 64) as u64, w))
            })
        })
    }

    pub fn get(&self, bit: u64) -> bool {
        self.word(bit)
            .is_some_and(|w| w.load(Ordering::Acquire) & (1 << (bit % 64)) != 0)
    }

    /// Sets `bit`; true if it was clear.
    pub fn set(&self, bit: u64) -> bool {
        let mask = 1 << (bit % 64);
        let was_clear = self.word_mut(bit).fetch_or(mask, Ordering::AcqRel) & mask == 0;
        if was_clear {
            self.ones.fetch_add(1, Ordering::AcqRel);
        }
        was_clear
    }

    pub fn clear(&self, bit: u64) {
        let mask = 1 << (bit % 64);
        let Some(w) = self.word(bit) else {
            return;
        };
        if w.fetch_and(!mask, Ordering::AcqRel) & mask != 0 {
            self.ones.fetch_sub(1, Ordering::AcqRel);
        }
    }

    /// Bits set (kept as they change: no scan).
    pub fn count(&self) -> u64 {
        self.ones.load(Ordering::Acquire)
    }

    /// The bits set, in order (bits set or cleared meanwhile may or may not
    /// be seen).
    pub fn ones(&self) -> impl Iterator<Item = u64> + '_ {
        self.words().flat_map(|(first, w)| {
            let mut bits = w.load(Ordering::Acquire);
            std::iter::from_fn(move || {
                if bits == 0 {
                    return None;
                }
                let b = bits.trailing_zeros() as u64;
                bits &= bits - 1;
                Some(first + b)
            })
        })
    }

    /// Clears every bit, returning those that were set, in order. A bit set
    /// concurrently is either returned or stays set, never lost.
    pub fn take_all(&self) -> Vec<u64> {
        let mut out = Vec::new();
        for (first, w) in self.words() {
            if w.load(Ordering::Relaxed) == 0 {
                continue;
            }
            let mut bits = w.swap(0, Ordering::AcqRel);
            self.ones
                .fetch_sub(u64::from(bits.count_ones()), Ordering::AcqRel);
            while bits != 0 {
                let b = bits.trailing_zeros() as u64;
                out.push(first + b);
                bits &= bits - 1;
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn take_all_returns_set_bits_in_order_and_clears_them() {
        let b = Bitmap::new(200);
        for bit in [199, 3, 64, 63, 3] {
            b.set(bit);
        }
        assert!(!b.set(64), "already set");
        assert_eq!(b.count(), 4);
        assert_eq!(b.ones().collect::<Vec<_>>(), [3, 63, 64, 199]);
        b.clear(63);
        b.clear(63);
        assert_eq!(b.count(), 3);
        assert_eq!(b.take_all(), [3, 64, 199]);
        assert_eq!(b.count(), 0);
        assert!(b.take_all().is_empty());
        b.set(5);
        b.clear(5);
        assert!(!b.get(5));
        // Regions far apart: only those written are made.
        let big = Bitmap::new(1 << 30);
        assert!(!big.get(1 << 29));
        big.set(1 << 29);
        big.set(7);
        assert_eq!(big.ones().collect::<Vec<_>>(), [7, 1 << 29]);
        assert_eq!(big.regions.iter().filter(|r| r.get().is_some()).count(), 2);
    }
}
