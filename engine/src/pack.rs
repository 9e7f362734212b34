//! Packs: append-only files of frames with an index and footer at the end.
//!
//! Remote tiers store packs of tens of MiB, so a lazy read is one ranged GET
//! of one frame or of a run of adjacent frames. The writer appends frames
//! and only then writes the index and footer; a pack whose tail was torn by
//! a crash is recovered by scanning its frames (each carries its chunk id
//! and a CRC) up to the last whole one. Layout: `docs/formats/pack.md`.

use std::fs::{File, OpenOptions};
use std::io::{self, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use crate::error::ErrorKind;
use crate::frame::{self, FrameHeader, FRAME_HEADER_LEN};
use crate::id::{ChunkId, PackId};
use crate::le::{Reader, Truncated};

pub const PACK_MAGIC: [u8; 8] = *b"CRNPACK\0";
pub const PACK_VERSION: u32 = 1;
pub const PACK_HEADER_LEN: u64 = 16;
pub const INDEX_MAGIC: [u8; 8] = *b"CRNPIDX\0";
pub const INDEX_ENTRY_LEN: usize = 48;
pub const FOOTER_LEN: usize = 32;
/// Readers refuse indexes claiming more entries than this (192 MiB of index).
pub const MAX_INDEX_ENTRIES: u32 = 4 << 20;

#[derive(Debug, thiserror::Error)]
pub enum PackError {
    #[error("pack I/O failed at {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("pack index is malformed: {0}")]
    BadIndex(String),
    #[error("pack format version {0} is not supported (this build reads version {PACK_VERSION})")]
    UnsupportedVersion(u32),
    #[error("not a pack: bad magic")]
    BadMagic,
    #[error("frame at pack offset {offset} is bad")]
    Frame {
        offset: u64,
        #[source]
        source: frame::FrameError,
    },
}

/// A field of an index, footer or header that runs past its bytes.
impl From<Truncated> for PackError {
    fn from(e: Truncated) -> Self {
        PackError::BadIndex(e.to_string())
    }
}

impl PackError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            PackError::Io { .. } => ErrorKind::Io,
            PackError::UnsupportedVersion(_) => ErrorKind::Unsupported,
            PackError::Frame { source, .. } => source.kind(),
            _ => ErrorKind::Corrupt,
        }
    }
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> PackError + '_ {
    move |source| PackError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Where one chunk's frame sits in a pack.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IndexEntry {
    pub id: ChunkId,
    pub offset: u64,
    pub frame_len: u32,
    pub raw_len: u32,
}

impl IndexEntry {
    pub fn end(&self) -> u64 {
        self.offset + u64::from(self.frame_len)
    }
}

/// A pack's index: its entries in offset order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PackIndex {
    pub id: PackId,
    pub entries: Vec<IndexEntry>,
}

impl PackIndex {
    /// Builds the index of frames laid out in order (as a writer appends them).
    pub(crate) fn from_entries(entries: Vec<IndexEntry>) -> PackIndex {
        let id = PackId::of(&encode_entries(&entries));
        PackIndex { id, entries }
    }

    /// Offset where the index begins in the pack (the end of the last frame).
    pub fn index_offset(&self) -> u64 {
        self.entries.last().map_or(PACK_HEADER_LEN, IndexEntry::end)
    }

    /// The pack's tail: encoded entries then footer. Also stored alone as
    /// the pack's `.idx` object, so hosts learn a pack's contents in one GET.
    pub fn encode_tail(&self) -> Vec<u8> {
        let mut out = encode_entries(&self.entries);
        let crc = crc32fast::hash(&out);
        out.extend_from_slice(&self.index_offset().to_le_bytes());
        out.extend_from_slice(&(self.entries.len() as u32).to_le_bytes());
        out.extend_from_slice(&crc.to_le_bytes());
        out.extend_from_slice(&PACK_VERSION.to_le_bytes());
        out.extend_from_slice(&[0u8; 4]);
        out.extend_from_slice(&INDEX_MAGIC);
        out
    }

    /// Parses a tail (entries then footer) as written by [`encode_tail`].
    ///
    /// `tail` may have extra bytes in front (say, the end of a pack); only
    /// the last `FOOTER_LEN` bytes and the index before them are read.
    pub fn decode_tail(tail: &[u8]) -> Result<PackIndex, PackError> {
        let footer = parse_footer(tail)?;
        let index_len = footer.count as usize * INDEX_ENTRY_LEN;
        let Some(start) = (tail.len() - FOOTER_LEN).checked_sub(index_len) else {
            return Err(PackError::BadIndex(format!(
                "footer claims {} entries but only {} bytes precede it",
                footer.count,
                tail.len() - FOOTER_LEN
            )));
        };
        let raw = &tail[start..tail.len() - FOOTER_LEN];
        if crc32fast::hash(raw) != footer.crc {
            return Err(PackError::BadIndex("index CRC mismatch".into()));
        }
        let mut entries = Vec::with_capacity(footer.count as usize);
        let mut expect_offset = PACK_HEADER_LEN;
        let mut r = Reader::new(raw);
        while r.remaining() > 0 {
            let entry = IndexEntry {
                id: ChunkId::from_bytes(r.array()?),
                offset: r.u64()?,
                frame_len: r.u32()?,
                raw_len: r.u32()?,
            };
            if entry.offset != expect_offset || (entry.frame_len as usize) <= FRAME_HEADER_LEN {
                return Err(PackError::BadIndex(format!(
                    "entry for chunk {} at offset {} is not where the previous frame ends ({expect_offset})",
                    entry.id, entry.offset
                )));
            }
            expect_offset = entry.end();
            entries.push(entry);
        }
        if expect_offset != footer.index_offset {
            return Err(PackError::BadIndex(format!(
                "frames end at {expect_offset} but the index is said to start at {}",
                footer.index_offset
            )));
        }
        Ok(PackIndex::from_entries(entries))
    }

    /// Groups `wanted` entries (any order) into runs of frames that are
    /// back to back in the pack, so each run is one ranged read. Frames
    /// separated by at most `max_gap` bytes are merged too; the gap is read
    /// and thrown away, which is cheaper than another request.
    pub fn runs(mut wanted: Vec<IndexEntry>, max_gap: u64) -> Vec<Vec<IndexEntry>> {
        wanted.sort_by_key(|e| e.offset);
        wanted.dedup_by_key(|e| e.offset);
        let mut runs: Vec<Vec<IndexEntry>> = Vec::new();
        for e in wanted {
            match runs.last_mut() {
                Some(run) if e.offset <= run.last().map_or(0, IndexEntry::end) + max_gap => {
                    run.push(e)
                }
                _ => runs.push(vec![e]),
            }
        }
        runs
    }
}

fn encode_entries(entries: &[IndexEntry]) -> Vec<u8> {
    let mut out = Vec::with_capacity(entries.len() * INDEX_ENTRY_LEN + FOOTER_LEN);
    for e in entries {
        out.extend_from_slice(e.id.as_bytes());
        out.extend_from_slice(&e.offset.to_le_bytes());
        out.extend_from_slice(&e.frame_len.to_le_bytes());
        out.extend_from_slice(&e.raw_len.to_le_bytes());
    }
    out
}

struct Footer {
    index_offset: u64,
    count: u32,
    crc: u32,
}

fn parse_footer(tail: &[u8]) -> Result<Footer, PackError> {
    if tail.len() < FOOTER_LEN {
        return Err(PackError::BadIndex(format!(
            "{} bytes is too short for a footer",
            tail.len()
        )));
    }
    let mut r = Reader::new(&tail[tail.len() - FOOTER_LEN..]);
    let index_offset = r.u64()?;
    let count = r.u32()?;
    let crc = r.u32()?;
    let version = r.u32()?;
    let reserved = r.u32()?;
    if r.array::<8>()? != INDEX_MAGIC {
        return Err(PackError::BadIndex("bad footer magic".into()));
    }
    if version != PACK_VERSION {
        return Err(PackError::UnsupportedVersion(version));
    }
    if reserved != 0 {
        return Err(PackError::BadIndex(
            "reserved footer bytes are not zero".into(),
        ));
    }
    if count > MAX_INDEX_ENTRIES {
        return Err(PackError::BadIndex(format!(
            "{count} entries exceeds the limit of {MAX_INDEX_ENTRIES}"
        )));
    }
    Ok(Footer {
        index_offset,
        count,
        crc,
    })
}

fn pack_header() -> [u8; PACK_HEADER_LEN as usize] {
    let mut h = [0u8; PACK_HEADER_LEN as usize];
    h[0..8].copy_from_slice(&PACK_MAGIC);
    h[8..12].copy_from_slice(&PACK_VERSION.to_le_bytes());
    h
}

/// Splits the bytes of a run (read from `run[0].offset`) into its frames.
pub fn frames_of_run<'a>(
    run: &'a [IndexEntry],
    bytes: &'a [u8],
) -> impl Iterator<Item = (IndexEntry, Option<&'a [u8]>)> + 'a {
    let base = run.first().map_or(0, |e| e.offset);
    run.iter().copied().map(move |e| {
        let start = (e.offset - base) as usize;
        let end = start + e.frame_len as usize;
        (e, bytes.get(start..end))
    })
}

/// Appends frames to a pack file on local disk.
///
/// Frames reach the file as they are appended; `finish` writes the index
/// and footer and syncs. A crash before then leaves a pack that
/// [`recover`] completes up to its last whole frame.
pub struct PackWriter {
    path: PathBuf,
    out: BufWriter<File>,
    entries: Vec<IndexEntry>,
    len: u64,
}

impl PackWriter {
    pub fn create(path: &Path) -> Result<PackWriter, PackError> {
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(path)
            .map_err(io_err(path))?;
        let mut out = BufWriter::with_capacity(1 << 20, file);
        out.write_all(&pack_header()).map_err(io_err(path))?;
        Ok(PackWriter {
            path: path.to_owned(),
            out,
            entries: Vec::new(),
            len: PACK_HEADER_LEN,
        })
    }

    /// Appends one encoded frame (as made by `FrameEncoder`).
    pub fn append(&mut self, frame: &[u8]) -> Result<IndexEntry, PackError> {
        let header = FrameHeader::parse(frame).map_err(|source| PackError::Frame {
            offset: self.len,
            source,
        })?;
        debug_assert_eq!(header.frame_len(), frame.len());
        self.out.write_all(frame).map_err(io_err(&self.path))?;
        let entry = IndexEntry {
            id: header.id,
            offset: self.len,
            frame_len: frame.len() as u32,
            raw_len: header.raw_len,
        };
        self.len += frame.len() as u64;
        self.entries.push(entry);
        Ok(entry)
    }

    /// Bytes written so far (header and frames).
    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes index and footer and syncs the file.
    pub fn finish(mut self) -> Result<PackIndex, PackError> {
        let index = PackIndex::from_entries(std::mem::take(&mut self.entries));
        self.out
            .write_all(&index.encode_tail())
            .map_err(io_err(&self.path))?;
        let file = self
            .out
            .into_inner()
            .map_err(|e| io_err(&self.path)(e.into_error()))?;
        file.sync_all().map_err(io_err(&self.path))?;
        Ok(index)
    }
}

/// What [`recover`] found.
#[derive(Debug)]
pub struct Recovered {
    pub index: PackIndex,
    /// Bytes cut off the end (a torn frame, or a stale tail).
    pub truncated_bytes: u64,
    /// The pack was already whole.
    pub was_complete: bool,
}

/// Makes the pack at `path` whole: if its index and footer are intact it is
/// left alone; otherwise its frames are scanned, the file is cut after the
/// last whole frame and a fresh index and footer are written.
pub fn recover(path: &Path) -> Result<Recovered, PackError> {
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(io_err(path))?;
    let len = file.metadata().map_err(io_err(path))?.len();
    let mut header = [0u8; PACK_HEADER_LEN as usize];
    file.read_exact(&mut header).map_err(io_err(path))?;
    let mut r = Reader::new(&header);
    if r.array::<8>()? != PACK_MAGIC {
        return Err(PackError::BadMagic);
    }
    let version = r.u32()?;
    if version != PACK_VERSION {
        // Recovery rewrites the pack: never in a layout this build does not know.
        return Err(PackError::UnsupportedVersion(version));
    }
    if let Ok(index) = read_index(&mut file, len) {
        return Ok(Recovered {
            index,
            truncated_bytes: 0,
            was_complete: true,
        });
    }
    let mut reader = io::BufReader::with_capacity(1 << 20, &file);
    reader
        .seek(SeekFrom::Start(PACK_HEADER_LEN))
        .map_err(io_err(path))?;
    let mut entries = Vec::new();
    let mut offset = PACK_HEADER_LEN;
    let mut buf = Vec::new();
    loop {
        buf.resize(FRAME_HEADER_LEN, 0);
        if reader.read_exact(&mut buf).is_err() {
            break;
        }
        let Ok(h) = FrameHeader::parse(&buf) else {
            break;
        };
        buf.resize(h.frame_len(), 0);
        if reader.read_exact(&mut buf[FRAME_HEADER_LEN..]).is_err() {
            break;
        }
        if frame::decode(&buf).is_err() {
            break;
        }
        entries.push(IndexEntry {
            id: h.id,
            offset,
            frame_len: h.frame_len() as u32,
            raw_len: h.raw_len,
        });
        offset += h.frame_len() as u64;
    }
    drop(reader);
    let index = PackIndex::from_entries(entries);
    file.set_len(offset).map_err(io_err(path))?;
    file.seek(SeekFrom::Start(offset)).map_err(io_err(path))?;
    file.write_all(&index.encode_tail()).map_err(io_err(path))?;
    file.sync_all().map_err(io_err(path))?;
    Ok(Recovered {
        index,
        truncated_bytes: len - offset,
        was_complete: false,
    })
}

/// Reads and checks the index of a whole pack file.
fn read_index(file: &mut File, len: u64) -> Result<PackIndex, PackError> {
    let bad = |m: &str| PackError::BadIndex(m.to_owned());
    if len < PACK_HEADER_LEN + FOOTER_LEN as u64 {
        return Err(bad("too short for a footer"));
    }
    let mut footer = [0u8; FOOTER_LEN];
    file.seek(SeekFrom::Start(len - FOOTER_LEN as u64))
        .map_err(|_| bad("seek"))?;
    file.read_exact(&mut footer).map_err(|_| bad("read"))?;
    let f = parse_footer(&footer)?;
    let tail_len = f.count as u64 * INDEX_ENTRY_LEN as u64 + FOOTER_LEN as u64;
    if f.index_offset + tail_len != len {
        return Err(bad("footer does not match the file length"));
    }
    let mut tail = vec![0u8; tail_len as usize];
    file.seek(SeekFrom::Start(f.index_offset))
        .map_err(|_| bad("seek"))?;
    file.read_exact(&mut tail).map_err(|_| bad("read"))?;
    PackIndex::decode_tail(&tail)
}

/// Opens a finished pack file and returns its index.
pub fn open_index(path: &Path) -> Result<PackIndex, PackError> {
    let mut file = File::open(path).map_err(io_err(path))?;
    let len = file.metadata().map_err(io_err(path))?.len();
    read_index(&mut file, len)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::{FrameEncoder, Verify};

    fn chunk(i: u32) -> Vec<u8> {
        (0..5000u32).map(|j| ((i * 31 + j) % 251) as u8).collect()
    }

    fn write_pack(path: &Path, n: u32) -> PackIndex {
        let mut enc = FrameEncoder::new(1).unwrap();
        let mut w = PackWriter::create(path).unwrap();
        for i in 0..n {
            let c = chunk(i);
            w.append(&enc.encode(ChunkId::of(&c), &c)).unwrap();
        }
        w.finish().unwrap()
    }

    #[test]
    fn written_pack_reads_back_by_ranges() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p");
        let index = write_pack(&path, 20);
        assert_eq!(open_index(&path).unwrap(), index);
        let bytes = std::fs::read(&path).unwrap();
        let tail = &bytes[index.index_offset() as usize..];
        assert_eq!(PackIndex::decode_tail(tail).unwrap(), index);
        // Frames 3..=6 and 9 wanted: two runs.
        let wanted = [3, 9, 4, 5, 6].iter().map(|&i| index.entries[i]).collect();
        let runs = PackIndex::runs(wanted, 0);
        assert_eq!(runs.len(), 2);
        for run in runs {
            let start = run[0].offset as usize;
            let end = run.last().unwrap().end() as usize;
            for (e, f) in frames_of_run(&run, &bytes[start..end]) {
                let raw = frame::decode_chunk(f.unwrap(), e.id, Verify::Digest).unwrap();
                assert_eq!(ChunkId::of(&raw), e.id);
            }
        }
    }

    #[test]
    fn torn_pack_recovers_to_its_last_whole_frame() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p");
        let full = write_pack(&path, 10);
        let bytes = std::fs::read(&path).unwrap();
        // Cut in the middle of frame 7: frames 0..7 survive.
        let cut = full.entries[7].offset + 30;
        std::fs::write(&path, &bytes[..cut as usize]).unwrap();
        let r = recover(&path).unwrap();
        assert!(!r.was_complete);
        assert_eq!(r.index.entries, full.entries[..7]);
        assert_eq!(r.truncated_bytes, 30);
        assert_eq!(open_index(&path).unwrap(), r.index);
        // A rotten byte in frame 4's payload: frames 0..4 survive.
        let mut bytes = std::fs::read(&path).unwrap();
        let at = full.entries[4].offset as usize + FRAME_HEADER_LEN + 10;
        bytes[at] ^= 1;
        bytes.truncate(full.entries[6].end() as usize);
        std::fs::write(&path, &bytes).unwrap();
        let r = recover(&path).unwrap();
        assert_eq!(r.index.entries, full.entries[..4]);
        // A whole pack is left alone.
        let again = recover(&path).unwrap();
        assert!(again.was_complete);
        assert_eq!(again.index, r.index);
        // A pack of a version this build does not know is not rewritten.
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[8] = 9;
        std::fs::write(&path, &bytes).unwrap();
        assert!(matches!(
            recover(&path),
            Err(PackError::UnsupportedVersion(9))
        ));
        assert_eq!(std::fs::read(&path).unwrap(), bytes, "left untouched");
    }

    #[test]
    fn corrupt_index_is_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let index = write_pack(&dir.path().join("p"), 3);
        let mut tail = index.encode_tail();
        tail[5] ^= 1;
        assert!(matches!(
            PackIndex::decode_tail(&tail),
            Err(PackError::BadIndex(_))
        ));
        let mut tail = index.encode_tail();
        let n = tail.len();
        tail[n - FOOTER_LEN + 8] = 200; // count
        assert!(PackIndex::decode_tail(&tail).is_err());
        assert!(PackIndex::decode_tail(&[1, 2, 3]).is_err());
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        /// Entries of frames laid end to end from the pack header, as a
        /// writer appends them: (id seed, frame length, raw length) each.
        fn laid_out(frames: &[(u64, u32, u32)]) -> Vec<IndexEntry> {
            let mut offset = PACK_HEADER_LEN;
            frames
                .iter()
                .map(|&(seed, frame_len, raw_len)| {
                    let e = IndexEntry {
                        id: ChunkId::of(&seed.to_le_bytes()),
                        offset,
                        frame_len,
                        raw_len,
                    };
                    offset = e.end();
                    e
                })
                .collect()
        }

        fn frames() -> impl Strategy<Value = Vec<(u64, u32, u32)>> {
            proptest::collection::vec(
                (
                    any::<u64>(),
                    (FRAME_HEADER_LEN as u32 + 1)..=u32::MAX,
                    any::<u32>(),
                ),
                0..64,
            )
        }

        proptest! {
            #[test]
            fn a_tail_decodes_to_the_index_it_encodes(
                frames in frames(),
                prefix in proptest::collection::vec(any::<u8>(), 0..200),
            ) {
                let index = PackIndex::from_entries(laid_out(&frames));
                let tail = index.encode_tail();
                prop_assert_eq!(&PackIndex::decode_tail(&tail).unwrap(), &index);
                // Bytes in front (the end of a pack) are ignored.
                let mut with_prefix = prefix;
                with_prefix.extend_from_slice(&tail);
                prop_assert_eq!(PackIndex::decode_tail(&with_prefix).unwrap(), index);
            }

            #[test]
            fn arbitrary_bytes_decode_to_an_error_or_to_what_they_encode(
                bytes in proptest::collection::vec(any::<u8>(), 0..600),
            ) {
                if let Ok(index) = PackIndex::decode_tail(&bytes) {
                    prop_assert!(bytes.ends_with(&index.encode_tail()));
                }
            }

            #[test]
            fn a_damaged_tail_is_refused_never_a_panic(
                frames in frames(),
                flips in proptest::collection::vec((any::<prop::sample::Index>(), 1u8..=255), 1..4),
                cut in any::<prop::sample::Index>(),
                truncate in any::<bool>(),
            ) {
                let index = PackIndex::from_entries(laid_out(&frames));
                let mut tail = index.encode_tail();
                // At distinct places (two flips of one byte could cancel).
                let places: std::collections::BTreeMap<usize, u8> =
                    flips.iter().map(|(at, mask)| (at.index(tail.len()), *mask)).collect();
                for (i, mask) in places {
                    tail[i] ^= mask;
                }
                if truncate {
                    tail.truncate(cut.index(tail.len()));
                }
                // Flipped entries fail the CRC; a flipped or cut footer
                // fails its checks. Nothing decodes to other entries.
                prop_assert!(PackIndex::decode_tail(&tail).is_err());
            }

            #[test]
            fn runs_cover_each_wanted_frame_once_in_order_split_at_gaps(
                frames in proptest::collection::vec((any::<u64>(), 53u32..5000, any::<u32>()), 1..64),
                picks in proptest::collection::vec(any::<prop::sample::Index>(), 0..80),
                max_gap in 0u64..20_000,
            ) {
                let entries = laid_out(&frames);
                let wanted: Vec<IndexEntry> = picks.iter().map(|i| entries[i.index(entries.len())]).collect();
                let runs = PackIndex::runs(wanted.clone(), max_gap);
                let flat: Vec<IndexEntry> = runs.iter().flatten().copied().collect();
                let mut expect = wanted;
                expect.sort_by_key(|e| e.offset);
                expect.dedup();
                prop_assert_eq!(&flat, &expect);
                for run in &runs {
                    prop_assert!(!run.is_empty());
                    for pair in run.windows(2) {
                        prop_assert!(pair[1].offset <= pair[0].end() + max_gap);
                    }
                }
                for pair in runs.windows(2) {
                    let (a, b) = (pair[0].last().unwrap(), pair[1][0]);
                    prop_assert!(b.offset > a.end() + max_gap);
                }
            }
        }
    }

    #[test]
    fn runs_merge_small_gaps_only() {
        let e = |offset, len| IndexEntry {
            id: ChunkId::of(&[]),
            offset,
            frame_len: len,
            raw_len: 1,
        };
        let runs = PackIndex::runs(vec![e(100, 100), e(16, 84), e(300, 10), e(10_000, 5)], 100);
        assert_eq!(runs.iter().map(Vec::len).collect::<Vec<_>>(), vec![3, 1]);
    }
}
