//! The private, writable layer of one disk.
//!
//! Written blocks go to a sparse data file at their own offset; a dirty map
//! says which blocks the overlay holds (the rest come from the image). A
//! FLUSH syncs the data file, then appends the blocks made dirty since the
//! last FLUSH to the journal and syncs it: every write acknowledged before
//! a completed FLUSH survives a crash, and a reopened overlay serves on.
//!
//! Queues write through their own [`OverlayQueue`] with its own list of
//! not-yet-journaled blocks, so no lock is shared by all queues on the
//! write path; the dirty map is a bitmap of atomics. A FLUSH on any queue
//! covers writes completed on every queue, as virtio asks.

pub mod journal;
mod uring;

use std::fs::{self, File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use serde::{Deserialize, Serialize};

use crate::error::ErrorKind;
use crate::id::ManifestId;

/// The overlay's block: the unit of its dirty map and of its writes.
pub const BLOCK: u64 = 4096;
const META_VERSION: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum OverlayError {
    #[error("overlay I/O failed at {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{0} is not a cairn overlay (no overlay.json): create it with `cairn disk serve IMAGE --overlay DIR`")]
    Missing(PathBuf),
    #[error("overlay {dir} is malformed: {why}")]
    Malformed { dir: PathBuf, why: String },
    #[error("overlay {dir} is in use by another process")]
    Busy { dir: PathBuf },
    #[error(
        "overlay {dir} belongs to image {found}, not {wanted}: use another --overlay directory"
    )]
    OtherImage {
        dir: PathBuf,
        found: String,
        wanted: String,
    },
    #[error("blocks {first}..{end} are outside the disk's {blocks} blocks")]
    OutOfRange { first: u64, end: u64, blocks: u64 },
}

impl OverlayError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            OverlayError::Io { .. } => ErrorKind::Io,
            OverlayError::Missing(_) => ErrorKind::NotFound,
            OverlayError::Malformed { .. } => ErrorKind::Corrupt,
            OverlayError::Busy { .. } | OverlayError::OtherImage { .. } => ErrorKind::InvalidInput,
            OverlayError::OutOfRange { .. } => ErrorKind::InvalidInput,
        }
    }
}

/// `overlay.json`: what the overlay is a layer of.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct OverlayMeta {
    pub version: u32,
    /// The manifest id of the image underneath.
    pub base: String,
    pub logical_size: u64,
    pub block_size: u64,
}

const META: &str = "overlay.json";
const DATA: &str = "data";
const JOURNAL: &str = "journal";
const LOCK: &str = "lock";

/// The journal file and what FLUSH knows; only FLUSH takes it.
struct JournalState {
    file: File,
    end: u64,
    /// `Overlay::writes` at the last completed FLUSH.
    synced_writes: u64,
    /// Blocks a failed FLUSH took from the queues: the next one retries.
    unjournaled: Vec<u64>,
}

/// A bitmap of atomics, one bit per block.
struct Bitmap(Vec<AtomicU64>);

impl Bitmap {
    fn new(bits: u64) -> Bitmap {
        Bitmap((0..bits.div_ceil(64)).map(|_| AtomicU64::new(0)).collect())
    }

    fn get(&self, bit: u64) -> bool {
        self.0[(bit / 64) as usize].load(Ordering::Acquire) & (1 << (bit % 64)) != 0
    }

    fn set(&self, bit: u64) {
        self.0[(bit / 64) as usize].fetch_or(1 << (bit % 64), Ordering::AcqRel);
    }
}

pub struct Overlay {
    dir: PathBuf,
    meta: OverlayMeta,
    blocks: u64,
    data: File,
    /// Blocks the overlay holds (written, even if not yet flushed).
    dirty: Bitmap,
    /// Blocks the journal names (survive a crash).
    durable: Bitmap,
    /// The journal and its end; only FLUSH takes it.
    journal: Mutex<JournalState>,
    /// Writes completed so far (bumped after each one lands in the data
    /// file): a FLUSH with none since the last one has nothing to sync.
    writes: AtomicU64,
    /// Syncs of the data file so far.
    data_syncs: AtomicU64,
    /// Every queue's not-yet-journaled blocks; taken when a queue is made
    /// and by FLUSH.
    queues: Mutex<Vec<Arc<Mutex<Vec<u64>>>>>,
    _lock: File,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Overlay {
    /// Opens the overlay in `dir`, creating it over image `base` of
    /// `logical_size` bytes if the directory holds none. Refuses an overlay
    /// of another image.
    pub fn open_or_create(
        dir: &Path,
        base: &ManifestId,
        logical_size: u64,
    ) -> Result<Arc<Overlay>, OverlayError> {
        if !dir.join(META).exists() {
            create(dir, base, logical_size)?;
        }
        let o = Overlay::open(dir)?;
        if o.meta.base != base.to_hex() {
            return Err(OverlayError::OtherImage {
                dir: dir.to_owned(),
                found: o.meta.base.clone(),
                wanted: base.to_hex(),
            });
        }
        Ok(o)
    }

    /// Opens an existing overlay, replaying its journal; a torn journal
    /// tail (a crash mid-FLUSH) is cut off.
    pub fn open(dir: &Path) -> Result<Arc<Overlay>, OverlayError> {
        let io = |p: &Path| {
            let path = p.to_owned();
            move |source| OverlayError::Io { path, source }
        };
        let meta_path = dir.join(META);
        let text = match fs::read(&meta_path) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(OverlayError::Missing(dir.to_owned()))
            }
            Err(e) => return Err(io(&meta_path)(e)),
        };
        let malformed = |why: String| OverlayError::Malformed {
            dir: dir.to_owned(),
            why,
        };
        let meta: OverlayMeta =
            serde_json::from_slice(&text).map_err(|e| malformed(format!("{META}: {e}")))?;
        if meta.version != META_VERSION || meta.block_size != BLOCK {
            return Err(malformed(format!(
                "version {} with {}-byte blocks; this build reads version {META_VERSION} with {BLOCK}-byte blocks",
                meta.version, meta.block_size
            )));
        }
        let lock_path = dir.join(LOCK);
        let lock_file = File::create(&lock_path).map_err(io(&lock_path))?;
        match lock_file.try_lock() {
            Ok(()) => {}
            Err(fs::TryLockError::WouldBlock) => {
                return Err(OverlayError::Busy {
                    dir: dir.to_owned(),
                })
            }
            Err(fs::TryLockError::Error(e)) => return Err(io(&lock_path)(e)),
        }
        let data_path = dir.join(DATA);
        let data = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&data_path)
            .map_err(io(&data_path))?;
        let len = data.metadata().map_err(io(&data_path))?.len();
        if len != meta.logical_size {
            return Err(malformed(format!(
                "data file is {len} bytes, the disk {}",
                meta.logical_size
            )));
        }
        let journal_path = dir.join(JOURNAL);
        let journal = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&journal_path)
            .map_err(io(&journal_path))?;
        let bytes = fs::read(&journal_path).map_err(io(&journal_path))?;
        let (extents, good) = journal::replay(&bytes);
        if good < bytes.len() {
            tracing::warn!(
                overlay = %dir.display(),
                torn = bytes.len() - good,
                "overlay journal had a torn tail (a crash during FLUSH); cut it off"
            );
            journal
                .set_len(good as u64)
                .and_then(|()| journal.sync_data())
                .map_err(io(&journal_path))?;
        }
        let blocks = meta.logical_size.div_ceil(BLOCK);
        let dirty = Bitmap::new(blocks);
        let durable = Bitmap::new(blocks);
        for e in &extents {
            let end = e.start + u64::from(e.count);
            if end > blocks {
                return Err(malformed(format!(
                    "journal names blocks {}..{end} of a {blocks}-block disk",
                    e.start
                )));
            }
            for b in e.start..end {
                dirty.set(b);
                durable.set(b);
            }
        }
        Ok(Arc::new(Overlay {
            dir: dir.to_owned(),
            meta,
            blocks,
            data,
            dirty,
            durable,
            journal: Mutex::new(JournalState {
                file: journal,
                end: good as u64,
                synced_writes: 0,
                unjournaled: Vec::new(),
            }),
            writes: AtomicU64::new(0),
            data_syncs: AtomicU64::new(0),
            queues: Mutex::new(Vec::new()),
            _lock: lock_file,
        }))
    }

    pub fn meta(&self) -> &OverlayMeta {
        &self.meta
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Number of blocks of the disk.
    pub fn blocks(&self) -> u64 {
        self.blocks
    }

    /// The blocks that hold bytes `start..end` of the disk (cut at its end).
    pub fn blocks_in(&self, start: u64, end: u64) -> std::ops::Range<u64> {
        start / BLOCK..end.min(self.meta.logical_size).div_ceil(BLOCK)
    }

    /// Whether the overlay holds block `b` (else the image does).
    pub fn is_dirty(&self, b: u64) -> bool {
        self.dirty.get(b)
    }

    /// Syncs of the data file so far (FLUSHes with nothing new skip it).
    pub fn data_syncs(&self) -> u64 {
        self.data_syncs.load(Ordering::Relaxed)
    }

    /// Number of blocks the overlay holds.
    pub fn dirty_count(&self) -> u64 {
        self.dirty
            .0
            .iter()
            .map(|w| u64::from(w.load(Ordering::Acquire).count_ones()))
            .sum()
    }

    /// A handle for one queue's I/O.
    pub fn queue(self: &Arc<Self>) -> OverlayQueue {
        let pending = Arc::new(Mutex::new(Vec::new()));
        lock(&self.queues).push(pending.clone());
        OverlayQueue {
            overlay: self.clone(),
            pending,
            ring: uring::Ring::new(),
        }
    }

    fn io_err(&self, name: &str) -> impl FnOnce(io::Error) -> OverlayError {
        let path = self.dir.join(name);
        move |source| OverlayError::Io { path, source }
    }

    fn check_range(&self, first: u64, count: u64) -> Result<(), OverlayError> {
        let end = first.saturating_add(count);
        if end > self.blocks {
            return Err(OverlayError::OutOfRange {
                first,
                end,
                blocks: self.blocks,
            });
        }
        Ok(())
    }

    /// Makes every write completed before this call durable.
    pub fn flush(&self) -> Result<(), OverlayError> {
        let mut j = lock(&self.journal);
        // Read before taking the queues' blocks: a write that lands after
        // this is covered by the next FLUSH, never skipped.
        let writes = self.writes.load(Ordering::Acquire);
        let mut blocks = std::mem::take(&mut j.unjournaled);
        for q in lock(&self.queues).iter() {
            blocks.append(&mut lock(q));
        }
        if writes == j.synced_writes && blocks.is_empty() {
            return Ok(());
        }
        let result = self.sync_and_journal(&mut j, &mut blocks);
        match &result {
            Ok(()) => j.synced_writes = writes,
            Err(_) => j.unjournaled = blocks,
        }
        result
    }

    /// Syncs the data file, then journals `blocks` (those not durable yet).
    fn sync_and_journal(
        &self,
        j: &mut JournalState,
        blocks: &mut Vec<u64>,
    ) -> Result<(), OverlayError> {
        // Data first: a journal record must never name unsynced data.
        self.data.sync_data().map_err(self.io_err(DATA))?;
        self.data_syncs.fetch_add(1, Ordering::Relaxed);
        blocks.retain(|&b| !self.durable.get(b));
        if blocks.is_empty() {
            return Ok(());
        }
        let extents = journal::coalesce(blocks.clone());
        j.end = journal::append(&j.file, j.end, &extents).map_err(self.io_err(JOURNAL))?;
        for e in extents {
            for b in e.start..e.start + u64::from(e.count) {
                self.durable.set(b);
            }
        }
        Ok(())
    }
}

fn create(dir: &Path, base: &ManifestId, logical_size: u64) -> Result<(), OverlayError> {
    let io = |p: &Path| {
        let path = p.to_owned();
        move |source| OverlayError::Io { path, source }
    };
    fs::create_dir_all(dir).map_err(io(dir))?;
    let data_path = dir.join(DATA);
    let data = File::create(&data_path).map_err(io(&data_path))?;
    data.set_len(logical_size).map_err(io(&data_path))?;
    data.sync_all().map_err(io(&data_path))?;
    let journal_path = dir.join(JOURNAL);
    File::create(&journal_path)
        .and_then(|f| f.sync_all())
        .map_err(io(&journal_path))?;
    let meta = OverlayMeta {
        version: META_VERSION,
        base: base.to_hex(),
        logical_size,
        block_size: BLOCK,
    };
    // The metadata goes last, by rename: an overlay without it is not one.
    let tmp = dir.join(".overlay.json.tmp");
    let text = serde_json::to_vec_pretty(&meta).expect("plain struct");
    fs::write(&tmp, text)
        .and_then(|()| File::open(&tmp)?.sync_all())
        .map_err(io(&tmp))?;
    let meta_path = dir.join(META);
    fs::rename(&tmp, &meta_path).map_err(io(&meta_path))?;
    File::open(dir).and_then(|d| d.sync_all()).map_err(io(dir))
}

/// One queue's access to the overlay.
pub struct OverlayQueue {
    overlay: Arc<Overlay>,
    pending: Arc<Mutex<Vec<u64>>>,
    ring: uring::Ring,
}

impl OverlayQueue {
    pub fn overlay(&self) -> &Arc<Overlay> {
        &self.overlay
    }

    /// Reads whole blocks from `first` (they should be dirty; clean blocks
    /// read as zeros).
    pub fn read_blocks(&self, first: u64, buf: &mut [u8]) -> Result<(), OverlayError> {
        let o = &self.overlay;
        o.check_range(first, (buf.len() as u64).div_ceil(BLOCK))?;
        self.ring
            .read_exact_at(&o.data, buf, first * BLOCK)
            .map_err(o.io_err(DATA))
    }

    /// Writes whole blocks from `first` and marks them dirty.
    pub fn write_blocks(&self, first: u64, data: &[u8]) -> Result<(), OverlayError> {
        let o = &self.overlay;
        let count = (data.len() as u64).div_ceil(BLOCK);
        o.check_range(first, count)?;
        self.ring
            .write_all_at(&o.data, data, first * BLOCK)
            .map_err(o.io_err(DATA))?;
        self.mark(first, count);
        Ok(())
    }

    /// Makes `count` blocks from `first` read as zeros and frees their space.
    pub fn zero_blocks(&self, first: u64, count: u64) -> Result<(), OverlayError> {
        let o = &self.overlay;
        o.check_range(first, count)?;
        let (off, len) = (first * BLOCK, count * BLOCK);
        let len = len.min(o.meta.logical_size - off);
        self.ring
            .punch_hole(&o.data, off, len)
            .map_err(o.io_err(DATA))?;
        self.mark(first, count);
        Ok(())
    }

    /// Records a completed write of `count` blocks from `first`.
    fn mark(&self, first: u64, count: u64) {
        let o = &self.overlay;
        let mut fresh = Vec::new();
        for b in first..first + count {
            o.dirty.set(b);
            if !o.durable.get(b) {
                fresh.push(b);
            }
        }
        if !fresh.is_empty() {
            lock(&self.pending).append(&mut fresh);
        }
        o.writes.fetch_add(1, Ordering::AcqRel);
    }

    pub fn flush(&self) -> Result<(), OverlayError> {
        self.overlay.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> ManifestId {
        ManifestId::from_bytes([7; 32])
    }

    #[test]
    fn flushed_writes_survive_a_reopen_and_unflushed_ones_stay_unclaimed() {
        let dir = tempfile::tempdir().unwrap();
        let o = Overlay::open_or_create(dir.path(), &base(), 64 * BLOCK).unwrap();
        let q = o.queue();
        q.write_blocks(3, &[0xab; 2 * BLOCK as usize]).unwrap();
        q.zero_blocks(10, 1).unwrap();
        q.flush().unwrap();
        q.write_blocks(20, &[0xcd; BLOCK as usize]).unwrap();
        drop(q);
        drop(o);
        let o = Overlay::open(dir.path()).unwrap();
        let dirty: Vec<u64> = (0..64).filter(|&b| o.is_dirty(b)).collect();
        assert_eq!(dirty, [3, 4, 10]);
        // A FLUSH with no write since the last one syncs nothing; a rewrite
        // of a journaled block syncs the data but journals nothing new.
        let q = o.queue();
        let syncs = o.data_syncs();
        q.flush().unwrap();
        assert_eq!(o.data_syncs(), syncs);
        q.write_blocks(3, &[0xab; BLOCK as usize]).unwrap();
        q.flush().unwrap();
        assert_eq!(o.data_syncs(), syncs + 1);
        q.flush().unwrap();
        assert_eq!(o.data_syncs(), syncs + 1);
        drop(q);
        let mut buf = vec![0u8; 2 * BLOCK as usize];
        o.queue().read_blocks(3, &mut buf).unwrap();
        assert!(buf.iter().all(|&x| x == 0xab));
    }

    #[test]
    fn a_flush_on_one_queue_covers_writes_on_another() {
        let dir = tempfile::tempdir().unwrap();
        let o = Overlay::open_or_create(dir.path(), &base(), 64 * BLOCK).unwrap();
        let (a, b) = (o.queue(), o.queue());
        b.write_blocks(7, &[1; BLOCK as usize]).unwrap();
        a.flush().unwrap();
        drop((a, b, o));
        assert!(Overlay::open(dir.path()).unwrap().is_dirty(7));
    }

    #[test]
    fn out_of_range_other_image_busy_and_torn_journal() {
        let dir = tempfile::tempdir().unwrap();
        let o = Overlay::open_or_create(dir.path(), &base(), 8 * BLOCK).unwrap();
        let q = o.queue();
        assert!(matches!(
            q.write_blocks(7, &[0; 2 * BLOCK as usize]),
            Err(OverlayError::OutOfRange { .. })
        ));
        assert!(matches!(
            Overlay::open(dir.path()),
            Err(OverlayError::Busy { .. })
        ));
        q.write_blocks(1, &[9; BLOCK as usize]).unwrap();
        q.flush().unwrap();
        drop((q, o));
        let other = ManifestId::from_bytes([8; 32]);
        assert!(matches!(
            Overlay::open_or_create(dir.path(), &other, 8 * BLOCK),
            Err(OverlayError::OtherImage { .. })
        ));
        // A crash mid-append leaves half a record: cut off, the rest kept.
        let j = dir.path().join(JOURNAL);
        let mut bytes = fs::read(&j).unwrap();
        bytes.extend_from_slice(&journal::encode(journal::Extent { start: 5, count: 1 })[..13]);
        fs::write(&j, &bytes).unwrap();
        let o = Overlay::open(dir.path()).unwrap();
        assert!(o.is_dirty(1) && !o.is_dirty(5));
        assert_eq!(fs::metadata(&j).unwrap().len(), journal::RECORD_LEN as u64);
    }
}
