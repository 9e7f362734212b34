//! The blocks written since the last FLUSH, held in memory while they are
//! few, so that the FLUSH can log them in one batch (see [`super::wal`]).
//!
//! Each block is held once, whatever the number of writes to it; a block
//! made zero holds no data. The stash is bounded: a write that would take
//! it past [`STASH_BYTES`] spills it to the data file instead.

use std::collections::HashMap;

use super::wal::Entry;
use super::BLOCK;

/// The most a stash holds: the largest FLUSH that is logged, not
/// checkpointed (README, "Disk benchmark", has the measurements).
pub const STASH_BYTES: usize = 2 << 20;
/// What a zero block counts against the bound (its map entry).
const ZERO_COST: usize = 64;

#[derive(Clone, Copy)]
enum Slot {
    /// Offset of its data in `Stash::data`.
    Data(usize),
    Zero,
}

#[derive(Default)]
pub struct Stash {
    slots: HashMap<u64, Slot>,
    data: Vec<u8>,
    zeros: usize,
}

impl Stash {
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    pub fn len(&self) -> usize {
        self.slots.len()
    }

    fn cost(&self) -> usize {
        self.data.len() + self.zeros * ZERO_COST
    }

    /// Whether `blocks` more blocks (at worst all new, with data) fit.
    pub fn fits(&self, blocks: u64) -> bool {
        (blocks as usize).saturating_mul(BLOCK as usize) <= STASH_BYTES.saturating_sub(self.cost())
    }

    /// Holds `data` (whole blocks) as blocks `first..`.
    pub fn put(&mut self, first: u64, data: &[u8]) {
        for (i, block) in data.chunks_exact(BLOCK as usize).enumerate() {
            let b = first + i as u64;
            match self.slots.get(&b) {
                Some(&Slot::Data(at)) => self.data[at..at + BLOCK as usize].copy_from_slice(block),
                other => {
                    if matches!(other, Some(Slot::Zero)) {
                        self.zeros -= 1;
                    }
                    let at = self.data.len();
                    self.data.extend_from_slice(block);
                    self.slots.insert(b, Slot::Data(at));
                }
            }
        }
    }

    /// Holds blocks `first..first + count` as zeros. Space a block held
    /// before stays taken until the stash is emptied.
    pub fn put_zeros(&mut self, first: u64, count: u64) {
        for b in first..first + count {
            if !matches!(self.slots.insert(b, Slot::Zero), Some(Slot::Zero)) {
                self.zeros += 1;
            }
        }
    }

    /// Block `b`: `Some(None)` if it is zero, `Some(Some(data))` if held.
    pub fn get(&self, b: u64) -> Option<Option<&[u8]>> {
        self.slots.get(&b).map(|s| match *s {
            Slot::Data(at) => Some(&self.data[at..at + BLOCK as usize]),
            Slot::Zero => None,
        })
    }

    pub fn contains(&self, b: u64) -> bool {
        self.slots.contains_key(&b)
    }

    /// Every block held, by block number.
    pub fn entries(&self) -> Vec<Entry<'_>> {
        let mut out: Vec<Entry<'_>> = self
            .slots
            .keys()
            .map(|&b| (b, self.get(b).flatten()))
            .collect();
        out.sort_unstable_by_key(|e| e.0);
        out
    }

    pub fn blocks(&self) -> impl Iterator<Item = u64> + '_ {
        self.slots.keys().copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_block_is_held_once_however_often_it_is_written() {
        let mut s = Stash::default();
        let b = BLOCK as usize;
        for round in 0..1000u32 {
            s.put(7, &vec![round as u8; 2 * b]);
        }
        assert_eq!((s.len(), s.data.len()), (2, 2 * b));
        s.put_zeros(8, 2);
        s.put_zeros(8, 2);
        assert_eq!(s.zeros, 2);
        assert_eq!(s.get(7).unwrap().unwrap()[0], (999u32 as u8));
        assert_eq!(s.get(8), Some(None));
        s.put(9, &vec![5; b]);
        assert_eq!(s.zeros, 1);
        let e = s.entries();
        assert_eq!(e.iter().map(|e| e.0).collect::<Vec<_>>(), [7, 8, 9]);
        assert!(e[1].1.is_none() && e[2].1.unwrap()[0] == 5);
    }

    #[test]
    fn the_bound_counts_data_and_zero_entries() {
        let mut s = Stash::default();
        let max_blocks = (STASH_BYTES / BLOCK as usize) as u64;
        assert!(s.fits(max_blocks) && !s.fits(max_blocks + 1));
        s.put(0, &vec![1; BLOCK as usize]);
        assert!(!s.fits(max_blocks));
        assert!(s.fits(max_blocks - 1));
        s.put_zeros(10, 100);
        assert!(!s.fits(max_blocks - 1));
    }
}
