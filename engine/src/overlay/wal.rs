//! The flush log: what makes a small FLUSH one sync.
//!
//! A FLUSH whose writes fit (the common case: a database commit, a file
//! system's journal commit) appends them, data and block numbers, as one
//! batch to this file and syncs it: one `fdatasync` of a file whose space
//! was written before, so the host file system has no metadata to commit.
//! The blocks then go to the data file unsynced. A checkpoint syncs the
//! data file and the journal, after which the generation's batches are
//! dead. The log has two halves and generation `g` writes half `g % 2`:
//! when one fills, the next generation goes on in the other half while the
//! full one is checkpointed in the background, so a FLUSH waits for a
//! checkpoint only if the other half fills before it is done.
//!
//! Batches start on 4 KiB boundaries (`docs/formats/overlay.md`): a header
//! (magic, entry count, generation, sequence, CRCs), the block numbers,
//! then the data of every block that is not zero. Only the last batch can
//! be torn by a crash (the next is written only after this one is synced),
//! so replay stops at a bad batch unless a valid one of the same
//! generation follows it, which is corruption.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

use super::BLOCK;
use crate::le::{Reader, Truncated};

const MAGIC: [u8; 4] = *b"CRNW";
const HEADER_FIELDS: usize = 64;
const ALIGN: u64 = 4096;
/// Entry flag: the block reads as zeros (no data follows for it).
const ZERO: u64 = 1 << 63;
/// The log is written ahead in steps of this many zeros, so appends land
/// in space the file system has allocated already.
const GROW_STEP: u64 = 4 << 20;

/// One block of a batch: its number and its data (`None`: zeros).
pub type Entry<'a> = (u64, Option<&'a [u8]>);

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WalError {
    #[error("flush-log batch {seq} at byte {at} is damaged but batch {next_seq} follows it: the log is corrupt, not torn by a crash")]
    Corrupt { at: u64, seq: u64, next_seq: u64 },
    #[error(
        "flush-log batch {seq} at byte {at} names block {block}, past the disk's {blocks} blocks"
    )]
    OutOfRange {
        at: u64,
        seq: u64,
        block: u64,
        blocks: u64,
    },
}

/// A batch as replay found it.
pub struct Batch {
    pub entries: Vec<(u64, bool)>,
    /// The data of the entries that are not zero, back to back.
    pub data: Vec<u8>,
}

fn header_area(count: usize) -> u64 {
    (HEADER_FIELDS as u64 + count as u64 * 8).div_ceil(ALIGN) * ALIGN
}

fn batch_len(count: usize, data_blocks: usize) -> u64 {
    header_area(count) + data_blocks as u64 * BLOCK
}

fn header_crc(header: &[u8], count: usize) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&header[..28]);
    h.update(&header[32..HEADER_FIELDS + count * 8]);
    h.finalize()
}

/// Encodes a batch of `entries` (at most one per block).
pub fn encode(gen: u64, seq: u64, entries: &[Entry<'_>]) -> Vec<u8> {
    let data_blocks = entries.iter().filter(|(_, d)| d.is_some()).count();
    let head = header_area(entries.len()) as usize;
    let mut b = vec![0u8; head];
    b[0..4].copy_from_slice(&MAGIC);
    b[4..8].copy_from_slice(&(entries.len() as u32).to_le_bytes());
    b[8..16].copy_from_slice(&gen.to_le_bytes());
    b[16..24].copy_from_slice(&seq.to_le_bytes());
    b.reserve(data_blocks * BLOCK as usize);
    let mut data_crc = crc32fast::Hasher::new();
    for (i, (block, data)) in entries.iter().enumerate() {
        let word = match data {
            Some(_) => *block,
            None => *block | ZERO,
        };
        b[HEADER_FIELDS + i * 8..HEADER_FIELDS + i * 8 + 8].copy_from_slice(&word.to_le_bytes());
    }
    for d in entries.iter().filter_map(|(_, d)| *d) {
        debug_assert_eq!(d.len(), BLOCK as usize);
        data_crc.update(d);
        b.extend_from_slice(d);
    }
    b[24..28].copy_from_slice(&data_crc.finalize().to_le_bytes());
    let crc = header_crc(&b, entries.len());
    b[28..32].copy_from_slice(&crc.to_le_bytes());
    b
}

/// A batch header read at some position: whether it is one of `gen`, its
/// sequence number and where the next batch would start.
struct Header {
    gen: u64,
    seq: u64,
    entries: Vec<(u64, bool)>,
    data_crc: u32,
    len: u64,
}

/// Reads and checks the header at `at`, looking no further than `limit`.
fn read_header(file: &File, at: u64, limit: u64) -> io::Result<Option<Header>> {
    if at + ALIGN > limit {
        return Ok(None);
    }
    let mut first = vec![0u8; ALIGN as usize];
    file.read_exact_at(&mut first, at)?;
    let mut r = Reader::new(&first);
    let (Ok(magic), Ok(count)) = (r.array::<4>(), r.u32()) else {
        return Ok(None);
    };
    if magic != MAGIC {
        return Ok(None);
    }
    let count = count as usize;
    let area = header_area(count);
    if at + area > limit {
        return Ok(None);
    }
    let mut head = first;
    if area > ALIGN {
        head.resize(area as usize, 0);
        file.read_exact_at(&mut head[ALIGN as usize..], at + ALIGN)?;
    }
    // After magic and count (read above): generation, sequence, the data's
    // CRC, the header's CRC; the entries start at HEADER_FIELDS.
    let fields = |r: &mut Reader| -> Result<_, Truncated> {
        r.skip(8)?;
        let (gen, seq, data_crc, crc) = (r.u64()?, r.u64()?, r.u32()?, r.u32()?);
        r.skip(HEADER_FIELDS - r.pos())?;
        let entries: Vec<(u64, bool)> = (0..count)
            .map(|_| r.u64().map(|w| (w & !ZERO, w & ZERO == 0)))
            .collect::<Result<_, _>>()?;
        Ok((gen, seq, data_crc, crc, entries))
    };
    let Ok((gen, seq, data_crc, crc, entries)) = fields(&mut Reader::new(&head)) else {
        return Ok(None);
    };
    if header_crc(&head, count) != crc {
        return Ok(None);
    }
    let data_blocks = entries.iter().filter(|(_, has_data)| *has_data).count();
    Ok(Some(Header {
        gen,
        seq,
        data_crc,
        len: batch_len(count, data_blocks),
        entries,
    }))
}

/// The bytes of the log generation `gen` writes, in a log of `capacity`:
/// generation 1 (the first) the first half, 2 the second, 3 the first...
pub fn region(gen: u64, capacity: u64) -> (u64, u64) {
    let half = capacity / 2 / ALIGN * ALIGN;
    let start = ((gen + 1) % 2) * half;
    (start, start + half)
}

/// Replays generation `gen` of the log in `file` (of `capacity` bytes at
/// most): hands each whole batch to `apply` in order. A bad batch ends the
/// generation (a torn tail) unless a valid batch of `gen` with a later
/// sequence number follows it. Returns the number of batches applied.
pub fn replay(
    file: &File,
    gen: u64,
    capacity: u64,
    blocks: u64,
    mut apply: impl FnMut(Batch) -> io::Result<()>,
) -> Result<u64, ReplayError> {
    let (mut at, end) = region(gen, capacity);
    let limit = file.metadata()?.len().min(end);
    let mut seq = 0u64;
    loop {
        let header = read_header(file, at, limit)?;
        let Some(h) = header.filter(|h| h.gen == gen && h.seq == seq + 1) else {
            check_nothing_follows(file, at, gen, seq, limit)?;
            return Ok(seq);
        };
        if at + h.len > limit {
            check_nothing_follows(file, at, gen, seq, limit)?;
            return Ok(seq);
        }
        let mut data = vec![0u8; (h.len - header_area(h.entries.len())) as usize];
        file.read_exact_at(&mut data, at + header_area(h.entries.len()))?;
        if crc32fast::hash(&data) != h.data_crc {
            // The header is whole: the next batch would start right after.
            if let Some(next) = read_header(file, at + h.len, limit)? {
                if next.gen == gen && next.seq > h.seq {
                    return Err(WalError::Corrupt {
                        at,
                        seq: h.seq,
                        next_seq: next.seq,
                    }
                    .into());
                }
            }
            return Ok(seq);
        }
        if let Some(&(block, _)) = h.entries.iter().find(|(b, _)| *b >= blocks) {
            return Err(WalError::OutOfRange {
                at,
                seq: h.seq,
                block,
                blocks,
            }
            .into());
        }
        apply(Batch {
            entries: h.entries,
            data,
        })?;
        seq = h.seq;
        at += h.len;
    }
}

/// After a bad or missing header at `at`: a valid batch of `gen` later on
/// means the log is corrupt.
fn check_nothing_follows(
    file: &File,
    at: u64,
    gen: u64,
    seq: u64,
    limit: u64,
) -> Result<(), ReplayError> {
    let mut q = at + ALIGN;
    while q + ALIGN <= limit {
        if let Some(h) = read_header(file, q, limit)? {
            if h.gen == gen && h.seq > seq {
                return Err(WalError::Corrupt {
                    at,
                    seq: seq + 1,
                    next_seq: h.seq,
                }
                .into());
            }
        }
        q += ALIGN;
    }
    Ok(())
}

#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error(transparent)]
    Wal(#[from] WalError),
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// The writing end of the log: one generation at a time.
pub struct WalWriter {
    gen: u64,
    /// The next batch's sequence number.
    seq: u64,
    /// Where the next batch goes (in the generation's half).
    head: u64,
    /// For each half, where the bytes written (with data or zeros) from
    /// its start end.
    written: [u64; 2],
    capacity: u64,
}

impl WalWriter {
    /// A writer starting generation `gen` in an empty log (as
    /// [`WalWriter::new`] finds a log file with nothing written).
    pub fn empty(gen: u64, capacity: u64) -> WalWriter {
        WalWriter {
            gen,
            seq: 1,
            head: region(gen, capacity).0,
            written: [region(1, capacity).0, region(2, capacity).0],
            capacity,
        }
    }

    /// A writer starting generation `gen` in its half of the log in `file`,
    /// which may grow to `capacity`.
    pub fn new(gen: u64, file: &File, capacity: u64) -> io::Result<WalWriter> {
        let len = file.metadata()?.len();
        let mut written = [0; 2];
        for (half, w) in written.iter_mut().enumerate() {
            let (start, end) = region(half as u64 + 1, capacity);
            // The first hole from the half's start (the file's end if none).
            let hole = match rustix::fs::seek(file, rustix::fs::SeekFrom::Hole(start)) {
                Ok(at) => at,
                Err(rustix::io::Errno::NXIO) => start,
                Err(e) => return Err(e.into()),
            };
            *w = (hole.min(len) / ALIGN * ALIGN).clamp(start, end);
        }
        Ok(WalWriter {
            gen,
            seq: 1,
            head: region(gen, capacity).0,
            written,
            capacity,
        })
    }

    pub fn generation(&self) -> u64 {
        self.gen
    }

    /// Whether this generation has any batch.
    pub fn is_empty(&self) -> bool {
        self.seq == 1
    }

    /// Whether a batch of `count` entries, `data_blocks` with data, fits
    /// in this generation's half.
    pub fn fits(&self, count: usize, data_blocks: usize) -> bool {
        self.head + batch_len(count, data_blocks) <= region(self.gen, self.capacity).1
    }

    /// Whether such a batch fits in an empty half.
    pub fn fits_at_all(&self, count: usize, data_blocks: usize) -> bool {
        batch_len(count, data_blocks) <= self.capacity / 2 / ALIGN * ALIGN
    }

    /// Writes one batch (not synced: the caller syncs `file`).
    pub fn append(&mut self, file: &File, entries: &[Entry<'_>]) -> io::Result<()> {
        let batch = encode(self.gen, self.seq, entries);
        let end = self.head + batch.len() as u64;
        let (start, half_end) = region(self.gen, self.capacity);
        let written = &mut self.written[usize::from(start > 0)];
        if end > *written {
            // Zeros ahead, so the next appends need no allocation.
            let to = (start + (end - start).div_ceil(GROW_STEP) * GROW_STEP).min(half_end.max(end));
            let zeros = vec![0u8; (1 << 20).min(to - *written) as usize];
            let mut at = *written;
            while at < to {
                let n = (to - at).min(zeros.len() as u64) as usize;
                file.write_all_at(&zeros[..n], at)?;
                at += n as u64;
            }
            *written = to;
        }
        file.write_all_at(&batch, self.head)?;
        self.head = end;
        self.seq += 1;
        Ok(())
    }

    /// Counts `batches` found in this generation by a replay (the next
    /// checkpoint must then end the generation).
    pub fn recovered(&mut self, batches: u64) {
        self.seq = batches + 1;
    }

    /// Starts the next generation, at the beginning of the other half.
    pub fn next_generation(&mut self) {
        self.gen += 1;
        self.seq = 1;
        self.head = region(self.gen, self.capacity).0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CAP: u64 = 16 << 20;

    fn block(fill: u8) -> Vec<u8> {
        vec![fill; BLOCK as usize]
    }

    fn collect(file: &File, gen: u64) -> Result<Vec<Vec<(u64, bool)>>, ReplayError> {
        let mut out = Vec::new();
        replay(file, gen, CAP, 1 << 20, |b| {
            let with_data = b.entries.iter().filter(|e| e.1).count();
            assert_eq!(b.data.len(), with_data * BLOCK as usize);
            out.push(b.entries);
            Ok(())
        })?;
        Ok(out)
    }

    #[test]
    fn an_empty_writer_is_the_one_an_empty_log_file_gives() {
        let f = tempfile::tempfile().unwrap();
        for gen in [1, 2, 3] {
            let (a, b) = (
                WalWriter::new(gen, &f, CAP).unwrap(),
                WalWriter::empty(gen, CAP),
            );
            assert_eq!(
                (a.gen, a.seq, a.head, a.written),
                (b.gen, b.seq, b.head, b.written)
            );
        }
    }

    #[test]
    fn generations_alternate_between_the_halves_and_replay_in_order() {
        let f = tempfile::tempfile().unwrap();
        let (a, b) = (block(1), block(2));
        let mut w = WalWriter::new(1, &f, CAP).unwrap();
        w.append(&f, &[(7, Some(&a)), (9, None)]).unwrap();
        w.append(&f, &[(7, Some(&b))]).unwrap();
        let mut seen = Vec::new();
        replay(&f, 1, CAP, 100, |batch| {
            seen.push(batch.data[0]);
            Ok(())
        })
        .unwrap();
        assert_eq!(seen, [1, 2]);
        assert_eq!(collect(&f, 1).unwrap()[0], [(7, true), (9, false)]);
        // Space is written ahead, in steps.
        assert_eq!(f.metadata().unwrap().len(), GROW_STEP);
        // The next generation writes the other half: the first stays
        // readable (its checkpoint may still be running).
        w.next_generation();
        assert_eq!(region(2, CAP).0, CAP / 2);
        assert!(collect(&f, 2).unwrap().is_empty());
        w.append(&f, &[(1, Some(&a))]).unwrap();
        assert_eq!(collect(&f, 2).unwrap(), [vec![(1, true)]]);
        assert_eq!(collect(&f, 1).unwrap().len(), 2);
        // The one after starts over the first half.
        w.next_generation();
        w.append(&f, &[(5, None)]).unwrap();
        assert_eq!(collect(&f, 3).unwrap(), [vec![(5, false)]]);
        // A new writer finds what each half has written ahead.
        let again = WalWriter::new(4, &f, CAP).unwrap();
        assert_eq!(again.written, [GROW_STEP, CAP / 2 + GROW_STEP]);
    }

    #[test]
    fn a_torn_last_batch_is_dropped_and_a_torn_middle_is_corruption() {
        let f = tempfile::tempfile().unwrap();
        let mut w = WalWriter::new(1, &f, CAP).unwrap();
        for fill in 1..=3 {
            w.append(&f, &[(u64::from(fill), Some(&block(fill)))])
                .unwrap();
        }
        let batch = batch_len(1, 1);
        // Rot the data of the last batch: torn tail, two batches stand.
        f.write_all_at(&[0xee], 2 * batch + ALIGN + 5).unwrap();
        assert_eq!(collect(&f, 1).unwrap().len(), 2);
        // Rot the first batch's data: batch 2 follows, so it is corruption.
        f.write_all_at(&[0xee], ALIGN + 5).unwrap();
        assert!(matches!(
            collect(&f, 1),
            Err(ReplayError::Wal(WalError::Corrupt {
                seq: 1,
                next_seq: 2,
                ..
            }))
        ));
        // A damaged header with a valid batch after it: corruption too.
        let g = tempfile::tempfile().unwrap();
        let mut w = WalWriter::new(1, &g, CAP).unwrap();
        for fill in 1..=2 {
            w.append(&g, &[(u64::from(fill), Some(&block(fill)))])
                .unwrap();
        }
        g.write_all_at(&[0xee], 10).unwrap();
        assert!(matches!(
            collect(&g, 1),
            Err(ReplayError::Wal(WalError::Corrupt { next_seq: 2, .. }))
        ));
    }

    #[test]
    fn a_block_past_the_disk_is_refused_and_a_half_is_kept() {
        let f = tempfile::tempfile().unwrap();
        let cap = 2 * (2 * ALIGN + BLOCK);
        let mut w = WalWriter::new(1, &f, cap).unwrap();
        assert!(w.fits(1, 1));
        w.append(&f, &[(500, Some(&block(1)))]).unwrap();
        assert!(!w.fits(1, 1) && w.fits_at_all(1, 1));
        assert!(matches!(
            replay(&f, 1, cap, 100, |_| Ok(())),
            Err(ReplayError::Wal(WalError::OutOfRange { block: 500, .. }))
        ));
        // Many entries take more than one header block.
        let g = tempfile::tempfile().unwrap();
        let mut w = WalWriter::new(1, &g, CAP).unwrap();
        let entries: Vec<Entry<'_>> = (0..1000).map(|b| (b, None)).collect();
        w.append(&g, &entries).unwrap();
        assert_eq!(collect(&g, 1).unwrap()[0].len(), 1000);
    }
}
