//! The overlay's journal: which blocks of the data file hold data durably.
//!
//! An append-only file of batches (`docs/formats/overlay.md`). A batch is
//! written by a checkpoint after the data it names was synced, and synced
//! before the checkpoint completes; one write and one sync, so only the
//! last batch can be torn by a crash. Replay therefore cuts a bad batch at
//! the end (a crash mid-append) but refuses a bad batch followed by a good
//! one: that is corruption, and guessing would lose or invent data.
//!
//! Each batch also says which flush-log generation it checkpointed: the
//! log's batches of that generation are in the data file and journal now.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

use crate::le::Reader;

pub const HEADER_LEN: usize = 32;
pub const EXTENT_LEN: usize = 16;
const MAGIC: [u8; 4] = *b"CRNB";

/// A run of `count` blocks from `start`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub start: u64,
    pub count: u32,
}

impl Extent {
    pub fn end(&self) -> u64 {
        self.start + u64::from(self.count)
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum JournalError {
    #[error("the batch at byte {at} is damaged but a valid batch follows at byte {next}: the journal is corrupt, not torn by a crash")]
    Corrupt { at: u64, next: u64 },
}

/// What a replay found.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Replayed {
    pub extents: Vec<Extent>,
    /// Bytes of whole, valid batches (anything after is a torn tail).
    pub good_len: u64,
    /// The last valid batch's sequence number (0: none).
    pub last_seq: u64,
    /// The newest flush-log generation a batch checkpointed (0: none).
    pub checkpointed: u64,
}

/// One batch: `seq` (the previous batch's plus one), the flush-log
/// generation it checkpoints (0: none) and its extents.
pub fn encode(seq: u64, checkpointed: u64, extents: &[Extent]) -> Vec<u8> {
    let mut b = Vec::with_capacity(HEADER_LEN + extents.len() * EXTENT_LEN);
    b.extend_from_slice(&MAGIC);
    b.extend_from_slice(&(extents.len() as u32).to_le_bytes());
    b.extend_from_slice(&seq.to_le_bytes());
    b.extend_from_slice(&checkpointed.to_le_bytes());
    b.extend_from_slice(&[0; 4]);
    b.extend_from_slice(&[0; 4]); // the CRC, below
    for e in extents {
        b.extend_from_slice(&e.start.to_le_bytes());
        b.extend_from_slice(&e.count.to_le_bytes());
        b.extend_from_slice(&[0; 4]);
    }
    let crc = batch_crc(&b);
    b[28..32].copy_from_slice(&crc.to_le_bytes());
    b
}

fn batch_crc(batch: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&batch[..28]);
    h.update(&batch[HEADER_LEN..]);
    h.finalize()
}

/// An extent record: start, count, 4 bytes of padding.
fn read_extent(r: &mut Reader) -> Option<Extent> {
    let e = Extent {
        start: r.u64().ok()?,
        count: r.u32().ok()?,
    };
    r.skip(4).ok()?;
    Some(e)
}

/// The batch at the start of `bytes` if it is whole and valid:
/// (seq, checkpointed, extents, length).
fn decode(bytes: &[u8]) -> Option<(u64, u64, Vec<Extent>, usize)> {
    // Header: magic, count, seq, checkpointed, reserved (zero), CRC.
    let mut r = Reader::new(bytes);
    if r.array::<4>().ok()? != MAGIC {
        return None;
    }
    let count = r.u32().ok()? as usize;
    let (seq, checkpointed) = (r.u64().ok()?, r.u64().ok()?);
    if r.u32().ok()? != 0 {
        return None;
    }
    let crc = r.u32().ok()?;
    let len = count
        .checked_mul(EXTENT_LEN)?
        .checked_add(HEADER_LEN)
        .filter(|&l| l <= bytes.len())?;
    let batch = &bytes[..len];
    if batch_crc(batch) != crc {
        return None;
    }
    let mut extents = Vec::with_capacity(count);
    for _ in 0..count {
        extents.push(read_extent(&mut r)?);
    }
    Some((seq, checkpointed, extents, len))
}

/// Replays a journal: every valid batch in order; a damaged last batch is
/// a torn tail (left out of `good_len`), a damaged batch with a valid one
/// after it an error.
pub fn replay(bytes: &[u8]) -> Result<Replayed, JournalError> {
    let mut out = Replayed::default();
    let mut pos = 0usize;
    while pos < bytes.len() {
        match decode(&bytes[pos..]) {
            Some((seq, gen, extents, len)) if seq == out.last_seq + 1 => {
                out.extents.extend(extents);
                out.checkpointed = out.checkpointed.max(gen);
                out.last_seq = seq;
                pos += len;
            }
            _ => {
                // Batches are multiples of 16 bytes long: look for any valid
                // one from here on (this one may be whole but out of order).
                let later = (pos..bytes.len())
                    .step_by(EXTENT_LEN)
                    .find(|&q| decode(&bytes[q..]).is_some_and(|(s, ..)| s > out.last_seq));
                if let Some(next) = later {
                    return Err(JournalError::Corrupt {
                        at: pos as u64,
                        next: next as u64,
                    });
                }
                break;
            }
        }
    }
    out.good_len = pos as u64;
    Ok(out)
}

/// Writes one batch at `at` (not synced); returns the new end.
pub fn append(
    file: &File,
    at: u64,
    seq: u64,
    checkpointed: u64,
    extents: &[Extent],
) -> io::Result<u64> {
    let batch = encode(seq, checkpointed, extents);
    file.write_all_at(&batch, at)?;
    Ok(at + batch.len() as u64)
}

/// Merges block numbers into sorted, maximal extents.
pub fn coalesce(mut blocks: Vec<u64>) -> Vec<Extent> {
    blocks.sort_unstable();
    blocks.dedup();
    let mut out: Vec<Extent> = Vec::new();
    for b in blocks {
        match out.last_mut() {
            Some(e) if e.end() == b && e.count < u32::MAX => e.count += 1,
            _ => out.push(Extent { start: b, count: 1 }),
        }
    }
    out
}

/// The journal of overlays made before the flush log (overlay version 1):
/// fixed 24-byte records, one per extent, each appended and synced alone.
pub mod v1 {
    use super::{Extent, JournalError, Reader};

    pub const RECORD_LEN: usize = 24;
    const MAGIC: [u8; 4] = *b"CRNJ";
    const OP_DIRTY: u8 = 1;

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

    fn decode(record: &[u8]) -> Option<Extent> {
        // magic, op, 3 zero bytes, start, count, CRC of what precedes it.
        let mut r = Reader::new(record);
        let ok = r.array::<4>().ok()? == MAGIC
            && r.u8().ok()? == OP_DIRTY
            && r.array::<3>().ok()? == [0; 3];
        let (start, count, crc) = (r.u64().ok()?, r.u32().ok()?, r.u32().ok()?);
        (ok && crc32fast::hash(&record[..20]) == crc).then_some(Extent { start, count })
    }

    /// Every valid record up to the first bad one, and the length of that
    /// prefix; a bad record with a valid one after it is corruption.
    pub fn replay(bytes: &[u8]) -> Result<(Vec<Extent>, u64), JournalError> {
        let mut out = Vec::new();
        let records: Vec<&[u8]> = bytes.chunks(RECORD_LEN).collect();
        for (i, r) in records.iter().enumerate() {
            match decode(r) {
                Some(e) => out.push(e),
                None => {
                    if let Some(j) = (i + 1..records.len()).find(|&j| decode(records[j]).is_some())
                    {
                        return Err(JournalError::Corrupt {
                            at: (i * RECORD_LEN) as u64,
                            next: (j * RECORD_LEN) as u64,
                        });
                    }
                    return Ok((out, (i * RECORD_LEN) as u64));
                }
            }
        }
        Ok((out, bytes.len() as u64))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(start: u64, count: u32) -> Extent {
        Extent { start, count }
    }

    #[test]
    fn batches_replay_in_order_and_a_torn_last_batch_is_cut() {
        let a = encode(1, 0, &[e(5, 3), e(1 << 40, 1)]);
        let b = encode(2, 7, &[e(9, 1)]);
        let mut bytes = [a.clone(), b.clone()].concat();
        let r = replay(&bytes).unwrap();
        assert_eq!(r.extents, [e(5, 3), e(1 << 40, 1), e(9, 1)]);
        assert_eq!(
            (r.good_len, r.last_seq, r.checkpointed),
            (bytes.len() as u64, 2, 7)
        );
        // Half of a third batch: torn.
        bytes.extend_from_slice(&encode(3, 0, &[e(11, 2)])[..40]);
        let r = replay(&bytes).unwrap();
        assert_eq!((r.good_len, r.last_seq), ((a.len() + b.len()) as u64, 2));
        // The last batch whole but with a flipped bit: torn too.
        let mut rotten = [a.clone(), b.clone()].concat();
        let n = rotten.len();
        rotten[n - 3] ^= 1;
        assert_eq!(replay(&rotten).unwrap().good_len, a.len() as u64);
    }

    #[test]
    fn a_bad_batch_followed_by_a_good_one_is_corruption() {
        let a = encode(1, 0, &[e(5, 3)]);
        let b = encode(2, 0, &[e(9, 1)]);
        let c = encode(3, 0, &[e(20, 4)]);
        let mut bytes = [a.clone(), b.clone(), c].concat();
        bytes[a.len() + 20] ^= 0x10;
        assert_eq!(
            replay(&bytes),
            Err(JournalError::Corrupt {
                at: a.len() as u64,
                next: (a.len() + b.len()) as u64
            })
        );
        // A batch out of sequence is not accepted as the next one.
        let skipped = [a, encode(3, 0, &[e(1, 1)])].concat();
        assert!(replay(&skipped).is_err());
    }

    #[test]
    fn v1_records_replay_with_the_same_rule() {
        let mut bytes = [v1::encode(e(5, 3)), v1::encode(e(9, 1))].concat();
        assert_eq!(v1::replay(&bytes).unwrap(), (vec![e(5, 3), e(9, 1)], 48));
        bytes.extend_from_slice(&v1::encode(e(1, 1))[..10]);
        assert_eq!(v1::replay(&bytes).unwrap().1, 48);
        let mut mid = [
            v1::encode(e(5, 3)),
            v1::encode(e(9, 1)),
            v1::encode(e(2, 1)),
        ]
        .concat();
        mid[30] ^= 1;
        assert!(v1::replay(&mid).is_err());
    }

    #[test]
    fn blocks_coalesce_into_maximal_runs() {
        assert_eq!(coalesce(vec![9, 3, 4, 5, 3, 11, 10]), [e(3, 3), e(9, 3)]);
    }
}
