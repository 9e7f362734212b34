//! The private, writable layer of one disk.
//!
//! The overlay holds the blocks the guest wrote; every other block comes
//! from the image. Its files (`docs/formats/overlay.md`): a sparse data
//! file where block `b` lives at byte `b * 4096`, a journal naming the
//! blocks the data file holds durably, and a flush log.
//!
//! Writes since the last FLUSH are held in memory while they are few (the
//! [`stash`]); a FLUSH then appends them to the flush log in one batch and
//! syncs that file alone, one `fdatasync` of preallocated space, before
//! writing them into the data file unsynced. When the writes since the
//! last FLUSH are many, they go straight to the data file, and the FLUSH
//! is a checkpoint: sync the data file, journal the blocks it holds that
//! no batch of the journal names yet, sync the journal; the flush log's
//! generation is then dead. Every write completed before a FLUSH that
//! succeeded survives a crash; a write never flushed reads after a crash
//! as it was written or as before, never as zeros that were never written.
//!
//! A failed sync poisons the overlay: Linux reports a writeback error once
//! and may drop the pages that failed, so a later sync that succeeds says
//! nothing about them. Every write, FLUSH and read of an overlay block
//! fails from then on; reopening the overlay replays what was durable.

mod bitmap;
mod files;
pub mod journal;
mod stash;
pub mod wal;

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

pub use files::OverlayMeta;
pub use stash::STASH_BYTES;

use crate::error::ErrorKind;
use crate::id::ManifestId;
use bitmap::Bitmap;
use files::{io_at, DATA, JOURNAL, WAL};
use stash::Stash;
use wal::WalWriter;

/// The overlay's block: the unit of its dirty map and of its writes.
pub const BLOCK: u64 = 4096;
/// The flush log's largest size; a FLUSH that would not fit checkpoints.
pub const WAL_CAPACITY: u64 = 32 << 20;

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
    #[error("overlay {dir} failed earlier ({cause}); it takes no more writes or flushes: restart the server to replay what was made durable")]
    Poisoned { dir: PathBuf, cause: String },
    #[error("overlay {dir} is a frozen layer: it takes no more writes")]
    Frozen { dir: PathBuf },
}

impl OverlayError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            OverlayError::Io { .. } | OverlayError::Poisoned { .. } => ErrorKind::Io,
            OverlayError::Missing(_) => ErrorKind::NotFound,
            OverlayError::Malformed { .. } => ErrorKind::Corrupt,
            OverlayError::Busy { .. }
            | OverlayError::OtherImage { .. }
            | OverlayError::Frozen { .. } => ErrorKind::InvalidInput,
            OverlayError::OutOfRange { .. } => ErrorKind::InvalidInput,
        }
    }
}

/// Syncs done so far, by file.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Syncs {
    pub data: u64,
    pub wal: u64,
    pub journal: u64,
}

#[derive(Default)]
struct SyncCounters {
    data: AtomicU64,
    wal: AtomicU64,
    journal: AtomicU64,
}

/// The writes since the last FLUSH that are held in memory.
#[derive(Default)]
struct Staging {
    current: Stash,
    /// The stash a FLUSH is logging, until it is in the data file.
    flushing: Option<Arc<Stash>>,
    /// The writes of this epoch outgrew the stash: they go to the data file.
    direct: bool,
}

/// What only a FLUSH touches.
struct FlushState {
    wal: WalWriter,
    /// `Overlay::writes` at the last FLUSH that succeeded.
    synced_writes: u64,
    /// The checkpoint of the flush log's previous generation, running.
    background: Option<std::thread::JoinHandle<()>>,
}

/// The journal's end; a checkpoint takes it.
struct JournalState {
    end: u64,
    /// The last batch's sequence number.
    seq: u64,
}

/// An overlay's open files: the data file, the flush log, the journal and
/// the lock, held while they are open.
struct Files {
    data: File,
    wal: File,
    journal: File,
    _lock: File,
}

impl Files {
    /// Opens the files of the overlay in `dir`, whose lock is `lock`.
    fn open(dir: &Path, lock: File) -> Result<Files, OverlayError> {
        Ok(Files {
            data: files::open_rw(dir, DATA)?.0,
            wal: files::open_rw(dir, WAL)?.0,
            journal: files::open_rw(dir, JOURNAL)?.0,
            _lock: lock,
        })
    }
}

pub struct Overlay {
    dir: PathBuf,
    meta: OverlayMeta,
    blocks: u64,
    /// Open from the start, except for an overlay made by
    /// [`Overlay::create_fresh`]: made at its first write.
    files: OnceLock<Files>,
    /// Held while a fresh overlay's files are made.
    making_files: Mutex<()>,
    /// Blocks the overlay holds (written, even if not yet flushed).
    dirty: Bitmap,
    /// Blocks the journal names.
    durable: Bitmap,
    /// Blocks in the data file or the flush log that the journal does not
    /// name yet: the next checkpoint journals them.
    unjournaled: Bitmap,
    /// Blocks held in a stash (the current one or the one being flushed).
    staged: Bitmap,
    staging: Mutex<Staging>,
    flush: Mutex<FlushState>,
    journal: Mutex<JournalState>,
    /// Writes completed so far: a FLUSH with none since the last has
    /// nothing to do.
    writes: AtomicU64,
    /// The data file took a write since the last checkpoint began.
    data_written: AtomicBool,
    /// A frozen layer: read-only from then on.
    frozen: AtomicBool,
    /// Made by [`Overlay::create_fresh`] and not synced yet.
    unsynced: AtomicBool,
    /// Run when the overlay's creation is synced, before that FLUSH
    /// answers (see [`Overlay::before_first_sync`]).
    first_sync_hook: OnceLock<FirstSyncHook>,
    poison: OnceLock<String>,
    syncs: SyncCounters,
}

/// See [`Overlay::before_first_sync`].
pub type FirstSyncHook = Arc<dyn Fn() -> std::io::Result<()> + Send + Sync>;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Overlay {
    /// Opens the overlay in `dir`, creating it over image `base` of
    /// `logical_size` bytes if the directory holds none. Refuses an overlay
    /// of another image. Creation happens under the overlay's lock, so two
    /// processes starting on one fresh directory never wipe each other.
    pub fn open_or_create(
        dir: &Path,
        base: &ManifestId,
        logical_size: u64,
    ) -> Result<Arc<Overlay>, OverlayError> {
        std::fs::create_dir_all(dir).map_err(io_at(dir))?;
        let lock_file = files::lock(dir)?;
        if !files::meta_exists(dir) {
            files::create(dir, &OverlayMeta::new(base, logical_size), true)?;
        }
        let o = Overlay::open_locked(dir, lock_file)?;
        if o.meta.base != base.to_hex() {
            return Err(OverlayError::OtherImage {
                dir: dir.to_owned(),
                found: o.meta.base.clone(),
                wanted: base.to_hex(),
            });
        }
        Ok(o)
    }

    /// An overlay over image `base` to be made in `dir`, which must not
    /// exist: nothing touches the disk until its first write, which makes
    /// its directory and files without syncing them; its first FLUSH with
    /// writes in it makes them durable before it answers. A crash before
    /// that loses only an overlay that never acknowledged a write, which
    /// [`Overlay::is_whole`] tells. So a fresh layer costs nothing until
    /// it is written, and no sync until it is flushed.
    pub fn create_fresh(dir: &Path, base: &ManifestId, logical_size: u64) -> Arc<Overlay> {
        let o = Overlay::new(dir, OverlayMeta::new(base, logical_size), None, 0, 0);
        o.unsynced.store(true, Ordering::Release);
        Arc::new(o)
    }

    /// The overlay's files, made now if it is fresh and has none yet.
    fn files(&self) -> Result<&Files, OverlayError> {
        if let Some(f) = self.files.get() {
            return Ok(f);
        }
        let _making = lock(&self.making_files);
        if let Some(f) = self.files.get() {
            return Ok(f);
        }
        let made = (|| {
            std::fs::create_dir(&self.dir).map_err(io_at(&self.dir))?;
            let lock_file = files::lock(&self.dir)?;
            files::create(&self.dir, &self.meta, false)?;
            Files::open(&self.dir, lock_file)
        })()
        .map_err(|e| self.poisoned(e))?;
        Ok(self.files.get_or_init(|| made))
    }

    /// The overlay's files, which any write has made.
    fn opened(&self) -> &Files {
        self.files
            .get()
            .expect("an overlay's files exist from its first write on")
    }

    /// Has `hook` run when an overlay made by [`Overlay::create_fresh`]
    /// is synced, before the FLUSH that syncs it answers: for what the
    /// caller wrote unsynced that names the overlay (a record listing it).
    /// A failing hook fails that FLUSH (and poisons the overlay). Set once.
    pub fn before_first_sync(&self, hook: FirstSyncHook) {
        let _ = self.first_sync_hook.set(hook);
    }

    /// Whether `dir` holds an overlay's metadata (written last): false
    /// for one [`Overlay::create_fresh`] made and a crash cut before its
    /// first FLUSH (it held no acknowledged write).
    pub fn is_whole(dir: &Path) -> bool {
        files::meta_exists(dir)
    }

    /// Opens an existing overlay: replays its journal (a torn tail, a crash
    /// during a checkpoint, is cut off; damage before the tail is an error
    /// and the file is left as it is), then its flush log, and checkpoints
    /// what the log held.
    pub fn open(dir: &Path) -> Result<Arc<Overlay>, OverlayError> {
        let lock_file = files::lock(dir)?;
        Overlay::open_locked(dir, lock_file)
    }

    fn open_locked(dir: &Path, lock_file: File) -> Result<Arc<Overlay>, OverlayError> {
        let meta = files::read_meta(dir)?;
        let malformed = |why: String| OverlayError::Malformed {
            dir: dir.to_owned(),
            why,
        };
        let opened = Files::open(dir, lock_file)?;
        let data_path = dir.join(DATA);
        let len = opened.data.metadata().map_err(io_at(&data_path))?.len();
        if len != meta.logical_size {
            return Err(malformed(format!(
                "data file is {len} bytes, the disk {}",
                meta.logical_size
            )));
        }
        let replayed = files::replay_journal(dir, &opened.journal, &dir.join(JOURNAL))?;
        let blocks = meta.logical_size.div_ceil(BLOCK);
        for e in &replayed.extents {
            if e.end() > blocks {
                return Err(malformed(format!(
                    "journal names blocks {}..{} of a {blocks}-block disk",
                    e.start,
                    e.end()
                )));
            }
        }
        let wal = WalWriter::new(replayed.checkpointed + 1, &opened.wal, WAL_CAPACITY)
            .map_err(io_at(&dir.join(WAL)))?;
        let o = Arc::new(Overlay::new(
            dir,
            meta,
            Some((opened, wal)),
            replayed.good_len,
            replayed.last_seq,
        ));
        for e in &replayed.extents {
            for b in e.start..e.end() {
                o.dirty.set(b);
                o.durable.set(b);
            }
        }
        o.recover_flush_log()?;
        Ok(o)
    }

    /// An overlay with `files` open and its flush log's writer (none for
    /// a fresh one), its journal ending at `journal_end` after batch
    /// `journal_seq`.
    fn new(
        dir: &Path,
        meta: OverlayMeta,
        files: Option<(Files, WalWriter)>,
        journal_end: u64,
        journal_seq: u64,
    ) -> Overlay {
        let blocks = meta.logical_size.div_ceil(BLOCK);
        let (opened, wal) = match files {
            Some((f, w)) => (OnceLock::from(f), w),
            None => (OnceLock::new(), WalWriter::empty(1, WAL_CAPACITY)),
        };
        Overlay {
            dir: dir.to_owned(),
            blocks,
            files: opened,
            making_files: Mutex::new(()),
            dirty: Bitmap::new(blocks),
            durable: Bitmap::new(blocks),
            unjournaled: Bitmap::new(blocks),
            staged: Bitmap::new(blocks),
            staging: Mutex::new(Staging::default()),
            flush: Mutex::new(FlushState {
                wal,
                synced_writes: 0,
                background: None,
            }),
            journal: Mutex::new(JournalState {
                end: journal_end,
                seq: journal_seq,
            }),
            writes: AtomicU64::new(0),
            data_written: AtomicBool::new(false),
            frozen: AtomicBool::new(false),
            unsynced: AtomicBool::new(false),
            first_sync_hook: OnceLock::new(),
            poison: OnceLock::new(),
            syncs: SyncCounters::default(),
            meta,
        }
    }

    /// Puts the batches of the flush log's generations the journal does not
    /// say were checkpointed into the data file, and checkpoints them: the
    /// next generation and, if it has batches, the one after (its
    /// predecessor's checkpoint may have been running at the crash).
    fn recover_flush_log(&self) -> Result<(), OverlayError> {
        let mut fs = lock(&self.flush);
        let first = fs.wal.generation();
        let mut applied = self.replay_generation(first)?;
        if applied > 0 {
            let next = self.replay_generation(first + 1)?;
            if next > 0 {
                fs.wal.next_generation();
                applied = next;
            }
        }
        if applied == 0 {
            return Ok(());
        }
        fs.wal.recovered(applied);
        self.checkpoint(&mut fs, None)
    }

    /// Replays generation `gen` of the flush log into the data file; the
    /// number of batches it had.
    fn replay_generation(&self, gen: u64) -> Result<u64, OverlayError> {
        let wal_path = self.dir.join(WAL);
        let applied = wal::replay(
            &self.opened().wal,
            gen,
            WAL_CAPACITY,
            self.blocks,
            |batch| {
                let mut data = batch.data.chunks_exact(BLOCK as usize);
                for (b, has_data) in batch.entries {
                    match has_data {
                        true => self.write_data(b, data.next().expect("one block per entry"))?,
                        false => self.punch_data(b, 1)?,
                    }
                    self.dirty.set(b);
                    if !self.durable.get(b) {
                        self.unjournaled.set(b);
                    }
                }
                Ok(())
            },
        )
        .map_err(|e| match e {
            wal::ReplayError::Wal(e) => files::corrupt(&self.dir, WAL, e),
            wal::ReplayError::Io(e) => io_at(&wal_path)(e),
        })?;
        if applied > 0 {
            tracing::info!(overlay = %self.dir.display(), gen, batches = applied, "replayed the flush log");
        }
        Ok(applied)
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

    /// Number of blocks the overlay holds.
    pub fn dirty_count(&self) -> u64 {
        self.dirty.count()
    }

    /// The blocks the overlay holds, in order.
    pub fn dirty_blocks(&self) -> impl Iterator<Item = u64> + '_ {
        self.dirty.ones()
    }

    /// Makes every write so far durable and refuses writes from now on:
    /// the overlay becomes a frozen layer of its disk. The caller keeps
    /// writes out while this runs ([`crate::disk::Disk::freeze`] does).
    pub fn freeze(self: &Arc<Self>) -> Result<(), OverlayError> {
        self.flush()?;
        self.frozen.store(true, Ordering::Release);
        Ok(())
    }

    pub fn is_frozen(&self) -> bool {
        self.frozen.load(Ordering::Acquire)
    }

    /// Syncs so far, by file.
    pub fn syncs(&self) -> Syncs {
        Syncs {
            data: self.syncs.data.load(Ordering::Relaxed),
            wal: self.syncs.wal.load(Ordering::Relaxed),
            journal: self.syncs.journal.load(Ordering::Relaxed),
        }
    }

    /// Blocks held in memory for the next FLUSH.
    pub fn stashed_blocks(&self) -> usize {
        let st = lock(&self.staging);
        st.current.len() + st.flushing.as_ref().map_or(0, |f| f.len())
    }

    /// Whether a failure poisoned the overlay.
    pub fn is_poisoned(&self) -> bool {
        self.poison.get().is_some()
    }

    fn check_poison(&self) -> Result<(), OverlayError> {
        match self.poison.get() {
            None => Ok(()),
            Some(cause) => Err(OverlayError::Poisoned {
                dir: self.dir.clone(),
                cause: cause.clone(),
            }),
        }
    }

    /// Poisons the overlay with `e` as the cause (the first cause stays).
    fn poisoned(&self, e: OverlayError) -> OverlayError {
        let cause = crate::error::DisplayChain(&e).to_string();
        if self.poison.set(cause).is_ok() {
            tracing::error!(overlay = %self.dir.display(), error = %crate::error::DisplayChain(&e), "overlay poisoned: it takes no more writes or flushes");
        }
        e
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

    /// Bytes of block `b` inside the disk (the last block may be short).
    fn block_len(&self, b: u64) -> usize {
        BLOCK.min(self.meta.logical_size - b * BLOCK) as usize
    }

    fn write_data(&self, b: u64, block: &[u8]) -> io::Result<()> {
        self.opened()
            .data
            .write_all_at(&block[..self.block_len(b)], b * BLOCK)
    }

    fn punch_data(&self, first: u64, count: u64) -> io::Result<()> {
        use rustix::fs::FallocateFlags;
        let off = first * BLOCK;
        let len = (count * BLOCK).min(self.meta.logical_size - off);
        let flags = FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE;
        rustix::fs::fallocate(&self.opened().data, flags, off, len).map_err(io::Error::from)
    }

    /// Reads whole blocks from `first` (they should be dirty; clean blocks
    /// read as zeros). The last block of the disk may be short.
    pub fn read_blocks(&self, first: u64, buf: &mut [u8]) -> Result<(), OverlayError> {
        self.check_poison()?;
        let count = (buf.len() as u64).div_ceil(BLOCK);
        self.check_range(first, count)?;
        let b = BLOCK as usize;
        let mut i = 0u64;
        while i < count {
            let at = (i as usize) * b;
            if !self.staged.get(first + i) {
                let mut j = i + 1;
                while j < count && !self.staged.get(first + j) {
                    j += 1;
                }
                let end = (j as usize * b).min(buf.len());
                self.read_data(&mut buf[at..end], first + i)?;
                i = j;
                continue;
            }
            let end = (at + b).min(buf.len());
            let out = &mut buf[at..end];
            let held = {
                let st = lock(&self.staging);
                let found = st
                    .current
                    .get(first + i)
                    .or_else(|| st.flushing.as_ref().and_then(|f| f.get(first + i)));
                match found {
                    Some(Some(data)) => {
                        out.copy_from_slice(&data[..out.len()]);
                        true
                    }
                    Some(None) => {
                        out.fill(0);
                        true
                    }
                    None => false,
                }
            };
            if !held {
                // Put in the data file since the bit was read.
                self.read_data(out, first + i)?;
            }
            i += 1;
        }
        Ok(())
    }

    /// Reads the data file from block `b` on; an overlay with no files yet
    /// holds nothing, which reads as zeros.
    fn read_data(&self, buf: &mut [u8], b: u64) -> Result<(), OverlayError> {
        match self.files.get() {
            Some(f) => f
                .data
                .read_exact_at(buf, b * BLOCK)
                .map_err(io_at(&self.dir.join(DATA))),
            None => {
                buf.fill(0);
                Ok(())
            }
        }
    }

    /// Writes whole blocks from `first` (the last block of the disk may be
    /// short) and marks them dirty.
    pub fn write_blocks(&self, first: u64, data: &[u8]) -> Result<(), OverlayError> {
        let count = (data.len() as u64).div_ceil(BLOCK);
        self.store(first, count, Some(data))
    }

    /// Makes `count` blocks from `first` read as zeros and frees their space.
    pub fn zero_blocks(&self, first: u64, count: u64) -> Result<(), OverlayError> {
        self.store(first, count, None)
    }

    /// A write (`Some`) or zeroing (`None`) of blocks `first..first + count`.
    fn store(&self, first: u64, count: u64, data: Option<&[u8]>) -> Result<(), OverlayError> {
        self.check_poison()?;
        if self.is_frozen() {
            return Err(OverlayError::Frozen {
                dir: self.dir.clone(),
            });
        }
        self.check_range(first, count)?;
        let files = self.files()?;
        {
            let mut st = lock(&self.staging);
            if !st.direct {
                if st.current.fits(count) {
                    match data {
                        Some(d) if !(d.len() as u64).is_multiple_of(BLOCK) => {
                            let mut padded = d.to_vec();
                            padded.resize((count * BLOCK) as usize, 0);
                            st.current.put(first, &padded);
                        }
                        Some(d) => st.current.put(first, d),
                        None => st.current.put_zeros(first, count),
                    }
                    for b in first..first + count {
                        self.staged.set(b);
                        self.dirty.set(b);
                    }
                    drop(st);
                    self.writes.fetch_add(1, Ordering::AcqRel);
                    return Ok(());
                }
                self.spill(&mut st).map_err(|e| self.poisoned(e))?;
            }
        }
        let done = match data {
            Some(d) => files.data.write_all_at(d, first * BLOCK),
            None => self.punch_data(first, count),
        };
        done.map_err(io_at(&self.dir.join(DATA)))?;
        self.data_written_blocks(first..first + count);
        self.writes.fetch_add(1, Ordering::AcqRel);
        Ok(())
    }

    /// Records blocks that went into the data file outside any FLUSH.
    fn data_written_blocks(&self, blocks: impl Iterator<Item = u64>) {
        for b in blocks {
            self.dirty.set(b);
            if !self.durable.get(b) {
                self.unjournaled.set(b);
            }
        }
        self.data_written.store(true, Ordering::Release);
    }

    /// The stash outgrew its bound: every block it (and a FLUSH still
    /// logging one) holds goes to the data file, and the rest of this
    /// epoch's writes go there directly.
    fn spill(&self, st: &mut Staging) -> Result<(), OverlayError> {
        if let Some(f) = st.flushing.take() {
            self.apply(&f, Some(&st.current))?;
            self.unstage(&f, &st.current);
            self.data_written_blocks(f.blocks());
        }
        let current = std::mem::take(&mut st.current);
        self.apply(&current, None)?;
        self.unstage(&current, &Stash::default());
        self.data_written_blocks(current.blocks());
        st.direct = true;
        Ok(())
    }

    /// Writes the blocks `stash` holds into the data file, except those
    /// `newer` holds.
    fn apply(&self, stash: &Stash, newer: Option<&Stash>) -> Result<(), OverlayError> {
        let mut entries = stash.entries();
        if let Some(newer) = newer {
            entries.retain(|(b, _)| !newer.contains(*b));
        }
        let mut i = 0;
        while i < entries.len() {
            let (b, data) = entries[i];
            let done = match data {
                Some(d) => {
                    i += 1;
                    self.write_data(b, d)
                }
                None => {
                    // One hole for a run of zero blocks.
                    let mut n = 1;
                    while i + n < entries.len()
                        && entries[i + n].0 == b + n as u64
                        && entries[i + n].1.is_none()
                    {
                        n += 1;
                    }
                    i += n;
                    self.punch_data(b, n as u64)
                }
            };
            done.map_err(io_at(&self.dir.join(DATA)))?;
        }
        Ok(())
    }

    /// Clears the staged bit of the blocks `stash` holds, except those
    /// `newer` holds.
    fn unstage(&self, stash: &Stash, newer: &Stash) {
        for b in stash.blocks().filter(|b| !newer.contains(*b)) {
            self.staged.clear(b);
        }
    }

    /// Makes every write completed before this call durable.
    pub fn flush(self: &Arc<Self>) -> Result<(), OverlayError> {
        let mut fs = lock(&self.flush);
        self.check_poison()?;
        // Read before taking anything: a write that lands after this is
        // covered by the next FLUSH, never skipped.
        let writes = self.writes.load(Ordering::Acquire);
        if writes == fs.synced_writes {
            return Ok(());
        }
        if self.unsynced.load(Ordering::Acquire) {
            files::sync_creation(&self.dir).map_err(|e| self.poisoned(e))?;
            if let Some(hook) = self.first_sync_hook.get() {
                hook().map_err(|e| self.poisoned(io_at(&self.dir)(e)))?;
            }
            self.unsynced.store(false, Ordering::Release);
        }
        let (taken, direct) = {
            let mut st = lock(&self.staging);
            let taken = Arc::new(std::mem::take(&mut st.current));
            if !taken.is_empty() {
                st.flushing = Some(taken.clone());
            }
            (taken, std::mem::replace(&mut st.direct, false))
        };
        let data_written = self.data_written.swap(false, Ordering::AcqRel);
        let entries = taken.entries();
        let with_data = entries.iter().filter(|e| e.1.is_some()).count();
        let result = if direct || data_written || !fs.wal.fits_at_all(entries.len(), with_data) {
            self.checkpoint(&mut fs, Some(&taken))
        } else {
            self.log(&mut fs, &taken, &entries)
        };
        match result {
            Ok(()) => {
                fs.synced_writes = writes;
                Ok(())
            }
            Err(e) => Err(self.poisoned(e)),
        }
    }

    /// A small FLUSH: one batch in the flush log, one sync; then the blocks
    /// go to the data file, unsynced. When the generation's half of the
    /// log is full, the next generation starts in the other half and the
    /// full one is checkpointed in the background.
    fn log(
        self: &Arc<Self>,
        fs: &mut FlushState,
        taken: &Arc<Stash>,
        entries: &[wal::Entry<'_>],
    ) -> Result<(), OverlayError> {
        if entries.is_empty() {
            return Ok(());
        }
        let with_data = entries.iter().filter(|e| e.1.is_some()).count();
        if !fs.wal.fits(entries.len(), with_data) {
            self.join_background(fs)?;
            let full = fs.wal.generation();
            fs.wal.next_generation();
            let o = self.clone();
            let spawned = std::thread::Builder::new()
                .name("cairn-checkpoint".into())
                .spawn(move || {
                    if let Err(e) = o.commit_to_journal(full, true) {
                        o.poisoned(e);
                    }
                });
            match spawned {
                Ok(h) => fs.background = Some(h),
                // No thread to be had: checkpoint here.
                Err(_) => {
                    self.commit_to_journal(full, true)?;
                }
            }
        }
        let wal_path = self.dir.join(WAL);
        let wal_file = &self.opened().wal;
        fs.wal.append(wal_file, entries).map_err(io_at(&wal_path))?;
        self.sync(wal_file, WAL, &self.syncs.wal)?;
        self.settle(taken)?;
        self.mark_unjournaled(entries.iter().map(|e| e.0));
        Ok(())
    }

    /// Notes blocks in the data file that the journal may not name yet.
    fn mark_unjournaled(&self, blocks: impl Iterator<Item = u64>) {
        for b in blocks {
            if !self.durable.get(b) {
                self.unjournaled.set(b);
            }
        }
    }

    /// Waits for the background checkpoint, if one runs.
    fn join_background(&self, fs: &mut FlushState) -> Result<(), OverlayError> {
        if let Some(h) = fs.background.take() {
            let _ = h.join();
        }
        self.check_poison()
    }

    /// Waits for a background checkpoint to end (for tests and tools that
    /// reopen the overlay right after dropping it).
    pub fn wait_for_checkpoint(&self) {
        let _ = self.join_background(&mut lock(&self.flush));
    }

    /// Puts a logged stash into the data file, unless a spill did already.
    fn settle(&self, taken: &Arc<Stash>) -> Result<(), OverlayError> {
        let mut st = lock(&self.staging);
        if !st.flushing.as_ref().is_some_and(|f| Arc::ptr_eq(f, taken)) {
            return Ok(());
        }
        self.apply(taken, Some(&st.current))?;
        self.unstage(taken, &st.current);
        st.flushing = None;
        Ok(())
    }

    /// A checkpoint in the FLUSH: `taken` (if any) into the data file, and
    /// everything committed to the journal; the flush log's current
    /// generation, if it has batches, ends.
    fn checkpoint(
        &self,
        fs: &mut FlushState,
        taken: Option<&Arc<Stash>>,
    ) -> Result<(), OverlayError> {
        self.join_background(fs)?;
        if let Some(taken) = taken {
            self.settle(taken)?;
            self.mark_unjournaled(taken.blocks());
        }
        if self.commit_to_journal(fs.wal.generation(), !fs.wal.is_empty())? {
            fs.wal.next_generation();
        }
        Ok(())
    }

    /// Syncs the data file, then journals the blocks it holds that no batch
    /// names yet, recording that flush-log generation `gen` is checkpointed,
    /// and syncs the journal. Writes no batch if there is nothing to name
    /// and `always` is false; says whether it wrote one.
    fn commit_to_journal(&self, gen: u64, always: bool) -> Result<bool, OverlayError> {
        let mut j = lock(&self.journal);
        // Taken before the sync: each of these was written before it.
        let blocks = self.unjournaled.take_all();
        let opened = self.opened();
        self.sync(&opened.data, DATA, &self.syncs.data)?;
        let fresh: Vec<u64> = blocks
            .into_iter()
            .filter(|&b| !self.durable.get(b))
            .collect();
        if fresh.is_empty() && !always {
            return Ok(false);
        }
        let extents = journal::coalesce(fresh);
        let path = self.dir.join(JOURNAL);
        j.end = journal::append(&opened.journal, j.end, j.seq + 1, gen, &extents)
            .map_err(io_at(&path))?;
        self.sync(&opened.journal, JOURNAL, &self.syncs.journal)?;
        j.seq += 1;
        for e in extents {
            for b in e.start..e.end() {
                self.durable.set(b);
            }
        }
        Ok(true)
    }

    fn sync(&self, file: &File, name: &str, counter: &AtomicU64) -> Result<(), OverlayError> {
        file.sync_data().map_err(io_at(&self.dir.join(name)))?;
        counter.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

#[cfg(test)]
mod tests;
