//! The overlay's journal: which blocks hold data, made durable at FLUSH.
//!
//! An append-only file of fixed 24-byte records, each naming a run of
//! blocks that the overlay's data file holds (`docs/formats/overlay.md`).
//! A record is appended only after the data it covers was synced, and the
//! journal is synced before the FLUSH is acknowledged. A torn tail (a crash
//! mid-append) fails its CRC and is cut off when the journal is replayed.

use std::fs::File;
use std::io::{self, Write};
use std::os::unix::fs::FileExt;

pub const RECORD_LEN: usize = 24;
const MAGIC: [u8; 4] = *b"CRNJ";
const OP_DIRTY: u8 = 1;

/// A run of `count` blocks from `start`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub start: u64,
    pub count: u32,
}

pub fn encode(e: Extent) -> [u8; RECORD_LEN] {
    let mut r = [0u8; RECORD_LEN];
    r[0..4].copy_from_slice(&MAGIC);
    r[4] = OP_DIRTY;
    r[8..16].copy_from_slice(&e.start.to_le_bytes());
    r[16..20].copy_from_slice(&e.count.to_le_bytes());
    let crc = crc32fast::hash(&r[..20]);
    r[20..24].copy_from_slice(&crc.to_le_bytes());
    r
}

fn decode(r: &[u8]) -> Option<Extent> {
    let crc = u32::from_le_bytes(r[20..24].try_into().ok()?);
    if r[0..4] != MAGIC || r[4] != OP_DIRTY || r[5..8] != [0; 3] || crc32fast::hash(&r[..20]) != crc
    {
        return None;
    }
    Some(Extent {
        start: u64::from_le_bytes(r[8..16].try_into().ok()?),
        count: u32::from_le_bytes(r[16..20].try_into().ok()?),
    })
}

/// Replays `bytes`: the extents of every whole, valid record, and the
/// length of that valid prefix (anything after it is a torn tail).
pub fn replay(bytes: &[u8]) -> (Vec<Extent>, usize) {
    let mut out = Vec::new();
    let mut good = 0;
    for r in bytes.chunks_exact(RECORD_LEN) {
        match decode(r) {
            Some(e) => {
                out.push(e);
                good += RECORD_LEN;
            }
            None => break,
        }
    }
    (out, good)
}

/// Appends `extents` at `at` and syncs; returns the new end.
pub fn append(file: &File, at: u64, extents: &[Extent]) -> io::Result<u64> {
    let mut buf = Vec::with_capacity(extents.len() * RECORD_LEN);
    for e in extents {
        buf.write_all(&encode(*e))?;
    }
    file.write_all_at(&buf, at)?;
    file.sync_data()?;
    Ok(at + buf.len() as u64)
}

/// Merges block numbers into sorted, maximal extents.
pub fn coalesce(mut blocks: Vec<u64>) -> Vec<Extent> {
    blocks.sort_unstable();
    blocks.dedup();
    let mut out: Vec<Extent> = Vec::new();
    for b in blocks {
        match out.last_mut() {
            Some(e) if e.start + u64::from(e.count) == b && e.count < u32::MAX => e.count += 1,
            _ => out.push(Extent { start: b, count: 1 }),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_torn_or_rotten_tail_is_cut_at_the_last_whole_record() {
        let a = Extent { start: 5, count: 3 };
        let b = Extent {
            start: 1 << 40,
            count: 1,
        };
        let mut bytes = [encode(a), encode(b)].concat();
        assert_eq!(replay(&bytes), (vec![a, b], 48));
        bytes.extend_from_slice(&encode(a)[..10]);
        assert_eq!(replay(&bytes), (vec![a, b], 48));
        bytes[30] ^= 1;
        assert_eq!(replay(&bytes), (vec![a], 24));
    }

    #[test]
    fn blocks_coalesce_into_maximal_runs() {
        let e = coalesce(vec![9, 3, 4, 5, 3, 11, 10]);
        assert_eq!(
            e,
            [Extent { start: 3, count: 3 }, Extent { start: 9, count: 3 }]
        );
    }
}
