//! Recorded working sets: the pages a resume touched, in the order it
//! first touched them, stored so the next resume can load them in one
//! sequential read (the idea of REAP).
//!
//! A working set is two things: the touched pages' bytes back to back, in
//! touch order, stored as a memory image of their own (so they are
//! chunked, compressed, packed together and fetched with merged ranged
//! GETs), and a small object `wsets/<snapshot id>` listing the runs of
//! pages (offset in the snapshot, length) in that order. Layout:
//! `docs/formats/working-set.md`.

use bytes::Bytes;

use super::{MemLayout, MemoryImage};
use crate::cache::HotChunks;
use crate::chunkstore::ChunkStore;
use crate::error::ErrorKind;
use crate::id::ManifestId;
use crate::import::{import_pieces, ImportError, ImportOptions, ImportReport, Piece};
use crate::layout;
use crate::le::{Reader, Truncated};
use crate::manifest::ManifestKind;
use crate::objstore::{ObjectStore, PutMode, StoreError};

const MAGIC: [u8; 8] = *b"CRNWSET\0";
const VERSION: u16 = 1;
/// Working sets are listed in units of this many bytes.
pub const UNIT: u64 = 4096;
const HEADER_LEN: usize = 8 + 2 + 2 + 4 + 32 + 8;
/// Readers refuse larger working-set objects before decoding.
pub const MAX_BYTES: usize = 64 << 20;
/// The least chunk size of a working set's pages image. It is read whole
/// and in order, never deduplicated, so large chunks cost nothing and
/// save the per-chunk work of every reader: a resume that prefetched a
/// working set stored in 64 KiB chunks spent more time opening and mapping
/// cache entries than copying pages (README, "Resume benchmark").
pub const PAGES_CHUNK_SIZE: u32 = 1 << 20;

/// Pages `[first, first + count)` of the snapshot, in [`UNIT`]s.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageRun {
    pub first: u64,
    pub count: u32,
}

impl PageRun {
    pub fn offset(&self) -> u64 {
        self.first * UNIT
    }

    pub fn len(&self) -> u64 {
        u64::from(self.count) * UNIT
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }
}

/// A snapshot's recorded working set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkingSet {
    /// The memory image holding the runs' bytes back to back.
    pub pages: ManifestId,
    pub runs: Vec<PageRun>,
}

#[derive(Debug, thiserror::Error)]
pub enum WorkingSetError {
    #[error("working set of {snapshot} is invalid: {why}")]
    Invalid { snapshot: ManifestId, why: String },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("storing the working set's pages failed")]
    Import(#[from] ImportError),
}

impl WorkingSetError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            WorkingSetError::Invalid { .. } => ErrorKind::Corrupt,
            WorkingSetError::Store(e) => e.kind(),
            WorkingSetError::Import(e) => e.kind(),
        }
    }
}

impl WorkingSet {
    /// Total bytes of the runs.
    pub fn bytes(&self) -> u64 {
        self.runs.iter().map(PageRun::len).sum()
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER_LEN + self.runs.len() * 12 + 4);
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        out.extend_from_slice(&[0, 0]);
        out.extend_from_slice(&(UNIT as u32).to_le_bytes());
        out.extend_from_slice(self.pages.as_bytes());
        out.extend_from_slice(&(self.runs.len() as u64).to_le_bytes());
        for r in &self.runs {
            out.extend_from_slice(&r.first.to_le_bytes());
            out.extend_from_slice(&r.count.to_le_bytes());
        }
        let crc = crc32fast::hash(&out);
        out.extend_from_slice(&crc.to_le_bytes());
        out
    }

    /// Decodes a working set of `snapshot`, an image of `size` bytes:
    /// every run must lie inside it.
    pub fn decode(
        bytes: &[u8],
        snapshot: ManifestId,
        size: u64,
    ) -> Result<WorkingSet, WorkingSetError> {
        let bad = |why: &str| WorkingSetError::Invalid {
            snapshot,
            why: why.to_owned(),
        };
        if bytes.len() > MAX_BYTES {
            return Err(bad("larger than a working set may be"));
        }
        if bytes.len() < HEADER_LEN + 4 || bytes[..8] != MAGIC {
            return Err(bad("bad magic or too short"));
        }
        let (body, crc) = bytes.split_at(bytes.len() - 4);
        let truncated = |e: Truncated| bad(&e.to_string());
        if crc32fast::hash(body) != Reader::new(crc).u32().map_err(truncated)? {
            return Err(bad("CRC mismatch"));
        }
        let mut r = Reader::new(body);
        r.skip(MAGIC.len()).map_err(truncated)?;
        if r.u16().map_err(truncated)? != VERSION || r.u16().map_err(truncated)? != 0 {
            return Err(bad("unknown version or reserved bytes set"));
        }
        if u64::from(r.u32().map_err(truncated)?) != UNIT {
            return Err(bad("unknown unit"));
        }
        let pages = ManifestId::from_bytes(r.array().map_err(truncated)?);
        let count = r.u64().map_err(truncated)?;
        if count.checked_mul(12) != Some(r.remaining() as u64) {
            return Err(bad("run count does not match the length"));
        }
        let mut runs = Vec::with_capacity(count as usize);
        while r.remaining() > 0 {
            runs.push(PageRun {
                first: r.u64().map_err(truncated)?,
                count: r.u32().map_err(truncated)?,
            });
        }
        let inside = |r: &PageRun| {
            r.count > 0
                && r.first
                    .checked_add(u64::from(r.count))
                    .and_then(|e| e.checked_mul(UNIT))
                    .is_some_and(|e| e <= size)
        };
        if !runs.iter().all(inside) {
            return Err(bad("a run lies outside the snapshot"));
        }
        Ok(WorkingSet { pages, runs })
    }

    /// The working set recorded for `snapshot`, if any.
    pub async fn load(
        store: &dyn ObjectStore,
        snapshot: ManifestId,
        size: u64,
    ) -> Result<Option<WorkingSet>, WorkingSetError> {
        match store.get(&layout::working_set_key(&snapshot), None).await {
            Ok(bytes) => WorkingSet::decode(&bytes, snapshot, size).map(Some),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Stores `runs` (in touch order) of `snapshot` as its working set,
    /// replacing an earlier one. Call from a plain thread.
    pub fn record(
        store: &ChunkStore,
        snapshot: &MemoryImage,
        runs: Vec<PageRun>,
        opts: &ImportOptions,
    ) -> Result<(WorkingSet, ImportReport), WorkingSetError> {
        let total: u64 = runs.iter().map(PageRun::len).sum();
        let mut opts = opts.clone();
        opts.chunk_size = opts.chunk_size.max(PAGES_CHUNK_SIZE);
        opts.kind = ManifestKind::Memory;
        opts.meta = MemLayout::single(total, UNIT as u32).encode();
        let mut hot = HotChunks::default();
        let mut next = 0usize;
        let source = snapshot.clone();
        let pieces = std::iter::from_fn(|| {
            // Whole chunks per piece: import cuts each piece on its own.
            let want = (8u64 << 20).max(u64::from(opts.chunk_size));
            let mut buf = Vec::new();
            while next < runs.len() && (buf.len() as u64) < want {
                let r = runs[next];
                let at = buf.len();
                buf.resize(at + r.len() as usize, 0);
                if let Err(e) = source.read(&mut hot, r.offset(), &mut buf[at..]) {
                    return Some(Err(ImportError::Read {
                        path: "working set".into(),
                        source: std::io::Error::other(e.to_string()),
                    }));
                }
                next += 1;
            }
            (!buf.is_empty()).then_some(Ok(Piece::Bytes(buf)))
        });
        let pieces = rechunk(pieces, u64::from(opts.chunk_size));
        let (manifest, report) = import_pieces(store, pieces, total, &opts, &|_| {})?;
        let ws = WorkingSet {
            pages: manifest.id(),
            runs,
        };
        let key = layout::working_set_key(&snapshot.manifest().id());
        store.runtime().block_on(async {
            crate::gc::keep(store.remote().as_ref(), &key).await?;
            store
                .remote()
                .put(&key, Bytes::from(ws.encode()), PutMode::Overwrite)
                .await
        })?;
        Ok((ws, report))
    }
}

/// A working set's runs by snapshot offset, to find where a page's bytes
/// sit in the working set's own image.
#[derive(Debug, Clone, Default)]
pub struct RunIndex {
    /// (run, offset of its bytes in the pages image), by run start.
    runs: Vec<(PageRun, u64)>,
}

impl RunIndex {
    pub fn new(ws: &WorkingSet) -> RunIndex {
        let mut at = 0;
        let mut runs: Vec<(PageRun, u64)> = ws
            .runs
            .iter()
            .map(|&r| {
                at += r.len();
                (r, at - r.len())
            })
            .collect();
        runs.sort_by_key(|(r, _)| r.first);
        RunIndex { runs }
    }

    /// The run holding snapshot bytes `[off, off + len)` whole, with the
    /// offset of its first byte in the pages image. Where runs overlap
    /// (a page recorded twice) the one starting last before `off` is
    /// asked; a miss only means the bytes come from the snapshot itself.
    pub fn find(&self, off: u64, len: u64) -> Option<(PageRun, u64)> {
        let i = self.runs.partition_point(|(r, _)| r.offset() <= off);
        let (run, at) = *self.runs.get(i.checked_sub(1)?)?;
        (off + len <= run.offset() + run.len()).then_some((run, at))
    }
}

/// Re-cuts byte pieces so that each but the last is a whole number of
/// `chunk` bytes (import cuts every piece from its own start).
fn rechunk(
    pieces: impl Iterator<Item = Result<Piece, ImportError>>,
    chunk: u64,
) -> impl Iterator<Item = Result<Piece, ImportError>> {
    let mut pieces = pieces.fuse();
    let mut carry: Vec<u8> = Vec::new();
    std::iter::from_fn(move || loop {
        match pieces.next() {
            Some(Ok(Piece::Bytes(b))) => {
                carry.extend_from_slice(&b);
                let whole = (carry.len() as u64 / chunk * chunk) as usize;
                if whole > 0 {
                    let rest = carry.split_off(whole);
                    return Some(Ok(Piece::Bytes(std::mem::replace(&mut carry, rest))));
                }
            }
            Some(other) => return Some(other),
            None => {
                return (!carry.is_empty()).then(|| Ok(Piece::Bytes(std::mem::take(&mut carry))))
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn any_working_set_round_trips(
            runs in proptest::collection::vec((0u64..1 << 30, 1u32..4096), 0..200),
            pages in any::<[u8; 32]>(),
        ) {
            let ws = WorkingSet {
                pages: ManifestId::from_bytes(pages),
                runs: runs.into_iter().map(|(first, count)| PageRun { first, count }).collect(),
            };
            let end = ws.runs.iter().map(|r| r.offset() + r.len()).max().unwrap_or(0);
            let snap = ManifestId::of(b"snap");
            let bytes = ws.encode();
            prop_assert_eq!(WorkingSet::decode(&bytes, snap, end).unwrap(), ws.clone());
            if end > 0 {
                prop_assert!(WorkingSet::decode(&bytes, snap, end - 1).is_err(), "a run past the end");
            }
        }

        #[test]
        fn the_run_index_finds_each_page_at_its_own_bytes(
            spans in proptest::collection::vec((0u64..64, 1u32..64), 1..100),
            seed in any::<u64>(),
        ) {
            // Disjoint runs (gap, length), in a shuffled touch order.
            let mut first = 0;
            let mut runs: Vec<PageRun> = spans
                .into_iter()
                .map(|(gap, count)| {
                    first += gap;
                    let r = PageRun { first, count };
                    first += u64::from(count);
                    r
                })
                .collect();
            fastrand::Rng::with_seed(seed).shuffle(&mut runs);
            let ws = WorkingSet { pages: ManifestId::of(b"pages"), runs };
            let index = RunIndex::new(&ws);
            let mut at = 0;
            for &r in &ws.runs {
                prop_assert_eq!(index.find(r.offset(), r.len()), Some((r, at)));
                let last = r.offset() + r.len() - UNIT;
                prop_assert_eq!(index.find(last, UNIT), Some((r, at)));
                prop_assert_eq!(index.find(last, 2 * UNIT), None, "past its run");
                at += r.len();
            }
        }

        #[test]
        fn any_bytes_decode_to_an_error_or_their_own_encoding(
            body in proptest::collection::vec(any::<u8>(), HEADER_LEN..HEADER_LEN + 60),
            size in any::<u64>(),
        ) {
            // A well-formed header over arbitrary runs, with its CRC.
            let mut bytes = body;
            bytes[..8].copy_from_slice(&MAGIC);
            bytes[8..10].copy_from_slice(&VERSION.to_le_bytes());
            bytes[10..12].fill(0);
            bytes[12..16].copy_from_slice(&(UNIT as u32).to_le_bytes());
            let runs = (bytes.len() - HEADER_LEN) / 12;
            bytes.truncate(HEADER_LEN + runs * 12);
            bytes[48..56].copy_from_slice(&(runs as u64).to_le_bytes());
            let crc = crc32fast::hash(&bytes);
            bytes.extend_from_slice(&crc.to_le_bytes());
            if let Ok(ws) = WorkingSet::decode(&bytes, ManifestId::of(b"snap"), size) {
                prop_assert_eq!(ws.encode(), bytes);
            }
        }
    }

    fn sample() -> WorkingSet {
        WorkingSet {
            pages: ManifestId::of(b"pages"),
            runs: vec![
                PageRun { first: 7, count: 1 },
                PageRun {
                    first: 0,
                    count: 16,
                },
                PageRun {
                    first: 512,
                    count: 512,
                },
            ],
        }
    }

    #[test]
    fn round_trips_and_rejects_damage() {
        let snap = ManifestId::of(b"snap");
        let ws = sample();
        let bytes = ws.encode();
        assert_eq!(WorkingSet::decode(&bytes, snap, 4 << 20).unwrap(), ws);
        assert_eq!(ws.bytes(), (1 + 16 + 512) * UNIT);
        // A run past the end of a smaller snapshot.
        assert!(WorkingSet::decode(&bytes, snap, 2 << 20).is_err());
        let mut rotten = bytes.clone();
        rotten[60] ^= 1;
        assert!(WorkingSet::decode(&rotten, snap, 4 << 20).is_err());
        assert!(WorkingSet::decode(&bytes[..bytes.len() - 5], snap, 4 << 20).is_err());
    }

    #[test]
    fn rechunk_keeps_bytes_and_cuts_whole_chunks() {
        let input = vec![vec![1u8; 5000], vec![2u8; 3000], vec![3u8; 100]];
        let all: Vec<u8> = input.concat();
        let out: Vec<Vec<u8>> = rechunk(input.into_iter().map(|b| Ok(Piece::Bytes(b))), 4096)
            .map(|p| match p.unwrap() {
                Piece::Bytes(b) => b,
                Piece::Known(_) => unreachable!(),
            })
            .collect();
        assert_eq!(out.concat(), all);
        assert!(out[..out.len() - 1].iter().all(|b| b.len() % 4096 == 0));
    }
    #[test]
    fn run_index_finds_the_run_holding_a_range() {
        let ws = WorkingSet {
            pages: ManifestId::of(b"pages"),
            runs: vec![
                PageRun {
                    first: 10,
                    count: 2,
                },
                PageRun { first: 0, count: 3 },
                PageRun {
                    first: 20,
                    count: 1,
                },
            ],
        };
        let ix = RunIndex::new(&ws);
        let run = |first, count| PageRun { first, count };
        assert_eq!(ix.find(0, UNIT), Some((run(0, 3), 2 * UNIT)));
        assert_eq!(ix.find(2 * UNIT, UNIT), Some((run(0, 3), 2 * UNIT)));
        assert_eq!(ix.find(11 * UNIT, UNIT), Some((run(10, 2), 0)));
        assert_eq!(ix.find(20 * UNIT, UNIT), Some((run(20, 1), 5 * UNIT)));
        assert_eq!(ix.find(3 * UNIT, UNIT), None, "between runs");
        assert_eq!(ix.find(11 * UNIT, 2 * UNIT), None, "past the run's end");
        assert_eq!(ix.find(30 * UNIT, UNIT), None);
    }
}
