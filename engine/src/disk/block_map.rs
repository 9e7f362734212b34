//! Which layer holds each block of a disk: one lookup per block however
//! many layers the disk has (the map is flattened, not a walk down the
//! stack).
//!
//! A number per block: 0 for the image underneath, else the number of the
//! topmost layer that wrote it. Two levels: regions of [`REGION`] blocks
//! are allocated on the first write into them, so the map costs memory in
//! proportion to what was written, not to the disk's size.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;

/// Blocks per region: 2 MiB of disk, 2 KiB of map once written (writes
/// scattered over a large disk each cost a region; the disk benchmark's 4
/// KiB writes all over a 64 GiB disk are the case to watch).
pub const REGION: u64 = 512;

type Region = Box<[AtomicU32; REGION as usize]>;

pub struct BlockMap {
    regions: Vec<OnceLock<Region>>,
}

impl BlockMap {
    pub fn new(blocks: u64) -> BlockMap {
        BlockMap {
            regions: (0..blocks.div_ceil(REGION))
                .map(|_| OnceLock::new())
                .collect(),
        }
    }

    pub fn get(&self, b: u64) -> u32 {
        self.regions[(b / REGION) as usize]
            .get()
            .map_or(0, |r| r[(b % REGION) as usize].load(Ordering::Acquire))
    }

    pub fn set(&self, b: u64, layer: u32) {
        let region = self.regions[(b / REGION) as usize]
            .get_or_init(|| Box::new(std::array::from_fn(|_| AtomicU32::new(0))));
        region[(b % REGION) as usize].store(layer, Ordering::Release);
    }

    /// Regions allocated so far.
    pub fn regions_in_use(&self) -> usize {
        self.regions.iter().filter(|r| r.get().is_some()).count()
    }

    /// Memory the map takes.
    pub fn bytes(&self) -> usize {
        self.regions.len() * std::mem::size_of::<OnceLock<Region>>()
            + self.regions_in_use() * REGION as usize * std::mem::size_of::<AtomicU32>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unwritten_blocks_read_as_the_image_and_regions_come_on_first_write() {
        let m = BlockMap::new(10 * REGION + 5);
        assert_eq!((m.get(0), m.get(10 * REGION + 4)), (0, 0));
        m.set(10 * REGION + 4, 7);
        m.set(3, 2);
        m.set(3, 9);
        assert_eq!((m.get(3), m.get(4), m.get(10 * REGION + 4)), (9, 0, 7));
        assert_eq!(m.regions_in_use(), 2);
    }
}
