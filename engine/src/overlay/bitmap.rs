//! A bitmap of atomics, one bit per block, shared by every queue.

use std::sync::atomic::{AtomicU64, Ordering};

pub struct Bitmap(Vec<AtomicU64>);

impl Bitmap {
    pub fn new(bits: u64) -> Bitmap {
        Bitmap((0..bits.div_ceil(64)).map(|_| AtomicU64::new(0)).collect())
    }

    pub fn get(&self, bit: u64) -> bool {
        self.0[(bit / 64) as usize].load(Ordering::Acquire) & (1 << (bit % 64)) != 0
    }

    /// Sets `bit`; true if it was clear.
    pub fn set(&self, bit: u64) -> bool {
        let mask = 1 << (bit % 64);
        self.0[(bit / 64) as usize].fetch_or(mask, Ordering::AcqRel) & mask == 0
    }

    pub fn clear(&self, bit: u64) {
        self.0[(bit / 64) as usize].fetch_and(!(1 << (bit % 64)), Ordering::AcqRel);
    }

    pub fn count(&self) -> u64 {
        self.0
            .iter()
            .map(|w| u64::from(w.load(Ordering::Acquire).count_ones()))
            .sum()
    }

    /// The bits set, in order (bits set or cleared meanwhile may or may not
    /// be seen).
    pub fn ones(&self) -> impl Iterator<Item = u64> + '_ {
        self.0.iter().enumerate().flat_map(|(i, w)| {
            let mut bits = w.load(Ordering::Acquire);
            std::iter::from_fn(move || {
                if bits == 0 {
                    return None;
                }
                let b = bits.trailing_zeros() as u64;
                bits &= bits - 1;
                Some(i as u64 * 64 + b)
            })
        })
    }

    /// Clears every bit, returning those that were set, in order. A bit set
    /// concurrently is either returned or stays set, never lost.
    pub fn take_all(&self) -> Vec<u64> {
        let mut out = Vec::new();
        for (i, w) in self.0.iter().enumerate() {
            if w.load(Ordering::Relaxed) == 0 {
                continue;
            }
            let mut bits = w.swap(0, Ordering::AcqRel);
            while bits != 0 {
                let b = bits.trailing_zeros() as u64;
                out.push(i as u64 * 64 + b);
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
        assert_eq!(b.take_all(), [3, 63, 64, 199]);
        assert_eq!(b.count(), 0);
        assert!(b.take_all().is_empty());
        b.set(5);
        b.clear(5);
        assert!(!b.get(5));
    }
}
