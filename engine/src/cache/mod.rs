//! The bounded local cache of chunks fetched from a remote tier, shared by
//! every cairn process on the host that opens the same directory.
//!
//! Each chunk is one file under `chunks/`, named by its id and kept
//! decompressed with per-block CRCs (see [`entry`]); a file is written under
//! a temporary name and renamed into place, never changed after. Each
//! process keeps its own in-memory index of the files it knows, never
//! persisted: opening the cache rebuilds it by a scan, so a crash can lose
//! cached chunks but never serve a wrong one.
//!
//! Processes sharing the directory cooperate without talking:
//! - The size bound is the directory's: the bytes of every chunk file are
//!   counted in one shared ledger ([`ledger`]), reserved before a file is
//!   written and given back by whoever unlinks it. Each process evicts the
//!   least recently used files it knows; files other processes wrote are
//!   learned by listing the directory when they have added an eighth of
//!   the bound since the last look (or nothing known is left to evict),
//!   queued oldest first by modification time, which is when a process
//!   last wrote or mapped them.
//! - Another process's eviction, or an `open` or `mmap` that fails for want
//!   of descriptors or memory, is a miss: the chunk is fetched again. A
//!   file that fails its checks is deleted and fetched again.
//! - A temporary is deleted at open only if its writer is gone ([`files`]).
//!
//! A bounded number of chunk files stay mapped, their descriptors closed.
//! A file evicted while mapped (by this process's readers' [`HotChunks`],
//! or by another process) keeps its disk space until the mapping goes.

mod entry;
mod files;
mod hot;
mod index;
mod ledger;

use std::collections::HashSet;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

pub use entry::{file_len, CachedChunk, EntryError, BLOCK};
pub use hot::HotChunks;

use crate::error::ErrorKind;
use crate::id::ChunkId;
use files::{Listed, Temp};
use index::{Index, Slot};
use ledger::{Counts, Ledger, Users};

#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("cache I/O failed at {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Entry(#[from] EntryError),
    #[error("cache size {size} bytes is too small: give it at least {min} bytes")]
    TooSmall { size: u64, min: u64 },
}

impl CacheError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            CacheError::Entry(EntryError::Crc { .. } | EntryError::Invalid(_)) => {
                ErrorKind::Corrupt
            }
            CacheError::Entry(EntryError::OutOfRange { .. }) | CacheError::TooSmall { .. } => {
                ErrorKind::InvalidInput
            }
            _ => ErrorKind::Io,
        }
    }
}

fn io_at(path: &Path) -> impl FnOnce(io::Error) -> CacheError + '_ {
    move |source| CacheError::Io {
        path: path.to_owned(),
        source,
    }
}

/// The cache's counters.
#[derive(Debug, Default)]
pub struct CacheStats {
    pub hits: AtomicU64,
    pub misses: AtomicU64,
    pub inserts: AtomicU64,
    pub evictions: AtomicU64,
    pub crc_failures: AtomicU64,
    /// Invalid or abandoned files deleted when the index was rebuilt.
    pub discarded_on_open: AtomicU64,
    /// Misses on chunks this process knew but another had evicted.
    pub vanished: AtomicU64,
    /// Misses on chunks whose file could not be opened or mapped just then
    /// (out of descriptors or memory): fetched again, the file kept.
    pub open_failures: AtomicU64,
    /// Chunk files other processes wrote, learned from listings.
    pub adopted: AtomicU64,
    /// Listings of the directory after the open.
    pub looks: AtomicU64,
}

pub struct ChunkCache {
    dir: PathBuf,
    capacity: u64,
    max_open: usize,
    state: Mutex<Index>,
    ledger: Ledger,
    _users: Users,
    stats: CacheStats,
}

/// Mapped chunk files kept at once (their descriptors are closed once mapped).
const MAX_MAPPED: usize = 16384;
/// Four of the largest chunks.
pub const MIN_CAPACITY: u64 = 64 << 20;

impl ChunkCache {
    /// Opens the cache in `dir` holding at most `capacity` bytes on disk
    /// (with every process sharing the directory), indexing what the
    /// directory holds.
    pub fn open(dir: &Path, capacity: u64) -> Result<ChunkCache, CacheError> {
        let min = MIN_CAPACITY;
        if capacity < min {
            return Err(CacheError::TooSmall {
                size: capacity,
                min,
            });
        }
        let chunks = dir.join("chunks");
        fs::create_dir_all(&chunks).map_err(io_at(&chunks))?;
        let ledger_path = dir.join("chunks.ledger");
        let ledger = Ledger::open(&ledger_path).map_err(io_at(&ledger_path))?;
        let users_path = dir.join("chunks.users");
        let (users, alone) = Users::join(&users_path).map_err(io_at(&users_path))?;
        let (listing, inserted) = ledger
            .update(|c| Ok::<_, io::Error>((recount(c, &chunks)?, c.inserted)))
            .map_err(io_at(&ledger_path))?
            .map_err(io_at(&chunks))?;
        let stats = CacheStats::default();
        let (good, dropped) = tidy(&chunks, listing, alone, &stats);
        ledger
            .update(|c| c.used = c.used.saturating_sub(dropped))
            .map_err(io_at(&ledger_path))?;
        if alone {
            users.settle().map_err(io_at(&users_path))?;
        }
        let cache = ChunkCache {
            dir: chunks,
            capacity,
            max_open: MAX_MAPPED,
            state: Mutex::new(Index::new(inserted)),
            ledger,
            _users: users,
            stats,
        };
        cache.lock().adopt(good);
        cache.reserve(0)?;
        Ok(cache)
    }

    fn lock(&self) -> MutexGuard<'_, Index> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn ledger_err(&self) -> impl FnOnce(io::Error) -> CacheError {
        let path = self.dir.with_file_name("chunks.ledger");
        move |source| CacheError::Io { path, source }
    }

    pub fn stats(&self) -> &CacheStats {
        &self.stats
    }

    /// Bytes the cache directory's chunk files take, as every process
    /// sharing it counts them (reservations for files being written
    /// included).
    pub fn used_bytes(&self) -> u64 {
        self.ledger.read().map_or(0, |c| c.used)
    }

    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// Chunks this process knows to be cached.
    pub fn len(&self) -> usize {
        self.lock().slots.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn contains(&self, id: &ChunkId) -> bool {
        self.lock().slots.contains_key(id)
    }

    fn path_of(&self, id: &ChunkId) -> PathBuf {
        self.dir.join(id.to_hex())
    }

    /// The cached chunk, if present; counts a hit or a miss. A file
    /// another process evicted, or one that cannot be opened or mapped
    /// just now, is a miss; a file that fails its checks is deleted and
    /// reported as corrupt.
    pub fn get(&self, id: &ChunkId) -> Result<Option<Arc<CachedChunk>>, CacheError> {
        let mut s = self.lock();
        let tick = s.next_tick();
        let Some(slot) = s.slots.get_mut(id) else {
            drop(s);
            self.stats.misses.fetch_add(1, Ordering::Relaxed);
            return Ok(None);
        };
        if let Some((h, _)) = &slot.handle {
            slot.tick = tick;
            self.stats.hits.fetch_add(1, Ordering::Relaxed);
            return Ok(Some(h.clone()));
        }
        // Opened under the lock so eviction cannot race it: mapping an
        // existing file is a few microseconds, once per chunk.
        let handle = match CachedChunk::open(&self.path_of(id), *id) {
            Ok(h) => Arc::new(h),
            Err(EntryError::Io { source, .. }) => {
                // Forget it here; a file that is there stays for others.
                let slot = s.slots.remove(id).expect("found above");
                s.unqueue(&slot);
                drop(s);
                self.stats.misses.fetch_add(1, Ordering::Relaxed);
                if source.kind() == io::ErrorKind::NotFound {
                    self.stats.vanished.fetch_add(1, Ordering::Relaxed);
                } else {
                    let n = self.stats.open_failures.fetch_add(1, Ordering::Relaxed) + 1;
                    if n.is_power_of_two() {
                        tracing::warn!(chunk = %id, error = %source, failures = n, "cache: cannot open or map a cached chunk; fetching it again");
                    }
                }
                return Ok(None);
            }
            Err(e) => {
                drop(s);
                self.stats.crc_failures.fetch_add(1, Ordering::Relaxed);
                self.remove(id);
                return Err(e.into());
            }
        };
        self.stats.hits.fetch_add(1, Ordering::Relaxed);
        slot.tick = tick;
        slot.handle = Some((handle.clone(), tick));
        s.open.insert(tick, *id);
        s.close_to(self.max_open);
        Ok(Some(handle))
    }

    /// Reads from a cached chunk. A CRC failure removes the chunk (so the
    /// caller can fetch it again) and is reported, never served.
    pub fn read(&self, id: &ChunkId, offset: u64, buf: &mut [u8]) -> Result<bool, CacheError> {
        self.with_slice(None, id, offset, buf.len(), |s| buf.copy_from_slice(s))
            .map(|done| done.is_some())
    }

    /// Reads through `hot` (one reader's recently used chunks) first, so a
    /// hit there takes no lock shared with other readers; otherwise as
    /// [`ChunkCache::read`], remembering the chunk in `hot`.
    pub fn read_hot(
        &self,
        hot: &mut HotChunks,
        id: &ChunkId,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<bool, CacheError> {
        self.with_slice(Some(hot), id, offset, buf.len(), |s| buf.copy_from_slice(s))
            .map(|done| done.is_some())
    }

    /// Runs `f` on `len` CRC-checked bytes at `offset` of a cached chunk,
    /// in place in its mapping (no copy), looking in `hot` (if given) first
    /// as [`ChunkCache::read_hot`] does. `None` if the chunk is not cached.
    pub fn with_slice<T>(
        &self,
        mut hot: Option<&mut HotChunks>,
        id: &ChunkId,
        offset: u64,
        len: usize,
        f: impl FnOnce(&[u8]) -> T,
    ) -> Result<Option<T>, CacheError> {
        let chunk = match hot.as_deref_mut().and_then(|hot| hot.get(id)) {
            Some(chunk) => chunk,
            None => {
                let Some(chunk) = self.get(id)? else {
                    return Ok(None);
                };
                if let Some(hot) = hot.as_deref_mut() {
                    hot.put(*id, chunk.clone());
                }
                chunk
            }
        };
        match self.slice_of(&chunk, offset, len) {
            Ok(s) => Ok(Some(f(s))),
            Err(e) => {
                if let Some(hot) = hot {
                    hot.forget(id);
                }
                Err(e)
            }
        }
    }

    fn slice_of<'c>(
        &self,
        chunk: &'c CachedChunk,
        offset: u64,
        len: usize,
    ) -> Result<&'c [u8], CacheError> {
        chunk.slice_at(offset, len).map_err(|e| {
            if matches!(e, EntryError::Crc { .. }) {
                let id = chunk.id();
                tracing::warn!(chunk = %id, "cache: CRC mismatch, dropping the cached chunk");
                self.stats.crc_failures.fetch_add(1, Ordering::Relaxed);
                self.remove(&id);
            }
            e.into()
        })
    }

    /// Stores a verified chunk, evicting older ones to stay within bounds.
    /// If another process stored it first, its file is kept.
    pub fn insert(&self, id: ChunkId, raw: &[u8]) -> Result<(), CacheError> {
        let bytes = file_len(raw.len() as u32);
        let path = self.path_of(&id);
        self.reserve(bytes)?;
        let written = Temp::create(&self.dir, &id).and_then(|mut tmp| {
            tmp.write(&entry::encode_header(id, raw))?;
            tmp.write(raw)?;
            tmp.install(&path)
        });
        match written {
            Ok(true) => {}
            // Cached by another process meanwhile: its file is counted.
            Ok(false) => self.give_back(bytes),
            Err(source) => {
                self.give_back(bytes);
                return Err(CacheError::Io { path, source });
            }
        }
        // A chunk just fetched is usually read next: map it now, while its
        // pages are hot, rather than on that read.
        let handle = CachedChunk::open(&path, id).ok().map(Arc::new);
        let mut s = self.lock();
        let tick = s.next_tick();
        let mapped = handle.is_some();
        let slot = Slot {
            bytes,
            tick,
            queued: tick,
            handle: handle.map(|h| (h, tick)),
        };
        if let Some(old) = s.slots.insert(id, slot) {
            s.unqueue(&old);
        }
        s.lru.insert(tick, id);
        if mapped {
            s.open.insert(tick, id);
            s.close_to(self.max_open);
        }
        drop(s);
        self.stats.inserts.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Returns a reservation that did not become a file.
    fn give_back(&self, bytes: u64) {
        if let Err(e) = self
            .ledger
            .update(|c| c.used = c.used.saturating_sub(bytes))
        {
            tracing::warn!(error = %e, "cache: cannot update the size ledger");
        }
    }

    /// Drops a chunk (it failed a check); its file is deleted.
    pub fn remove(&self, id: &ChunkId) {
        let slot = {
            let mut s = self.lock();
            let Some(slot) = s.slots.remove(id) else {
                return;
            };
            s.unqueue(&slot);
            slot
        };
        let path = self.path_of(id);
        // Unlinked under the ledger's lock: whoever unlinks gives back.
        let removed = self.ledger.update(|c| {
            let removed = fs::remove_file(&path);
            if removed.is_ok() {
                c.used = c.used.saturating_sub(slot.bytes);
            }
            removed
        });
        match removed {
            Ok(Ok(())) => {}
            Ok(Err(e)) if e.kind() == io::ErrorKind::NotFound => {}
            Ok(Err(e)) | Err(e) => {
                tracing::warn!(chunk = %id, error = %e, "cache: could not delete a dropped chunk")
            }
        }
    }

    /// Evicts least recently used chunks until `incoming` more bytes fit
    /// in the directory's bound, then counts them in the shared ledger, so
    /// concurrent inserts (of any process) cannot together overshoot it.
    /// Looks at the directory first when others have added an eighth of
    /// the bound since the last look, or when nothing known is left to
    /// evict.
    fn reserve(&self, incoming: u64) -> Result<(), CacheError> {
        let reserved = self.ledger.update(|c| {
            let due = c.inserted.saturating_sub(self.lock().seen_inserted) > self.capacity / 8;
            let mut looked = false;
            if due {
                self.look(c)?;
                looked = true;
            }
            while c.used + incoming > self.capacity {
                let Some((victim, bytes)) = self.lock().take_least_recent() else {
                    if looked {
                        // Nothing left anyone could evict: let it in.
                        break;
                    }
                    self.look(c)?;
                    looked = true;
                    continue;
                };
                self.stats.evictions.fetch_add(1, Ordering::Relaxed);
                match fs::remove_file(self.path_of(&victim)) {
                    Ok(()) => c.used = c.used.saturating_sub(bytes),
                    // Another process evicted it and gave it back.
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => {
                        tracing::warn!(chunk = %victim, error = %e, "cache: cannot evict a chunk")
                    }
                }
            }
            c.used += incoming;
            c.inserted += incoming;
            self.lock().seen_inserted += incoming;
            Ok(())
        });
        reserved
            .map_err(self.ledger_err())?
            .map_err(io_at(&self.dir))
    }

    /// Under the ledger's lock: sets the count to what the directory holds
    /// ([`recount`]), learns the files other processes wrote and forgets
    /// those gone.
    fn look(&self, counts: &mut Counts) -> io::Result<()> {
        let listing = recount(counts, &self.dir)?;
        self.learn(listing, counts.inserted);
        Ok(())
    }

    /// Takes in a listing: indexes the chunk files other processes wrote,
    /// and forgets those gone (evicted elsewhere), letting their mappings go.
    fn learn(&self, listing: files::Listing, inserted: u64) {
        self.stats.looks.fetch_add(1, Ordering::Relaxed);
        let present: HashSet<ChunkId> = listing.chunks.iter().map(|c| c.id).collect();
        let mut s = self.lock();
        s.forget_all_but(&present);
        let adopted = s.adopt(listing.chunks);
        s.seen_inserted = inserted;
        drop(s);
        self.stats.adopted.fetch_add(adopted, Ordering::Relaxed);
    }

    /// Bytes the chunk files take on disk, by listing the directory (for tests
    /// and benchmarks that check the bound independently of the index).
    pub fn bytes_on_disk(&self) -> io::Result<u64> {
        Ok(files::list(&self.dir)?.bytes())
    }
}

/// Deletes what a listing of `chunks` shows that is of no use: abandoned
/// temporaries (every one, if no other process uses the directory), junk
/// (only then), chunk files that fail their checks. The good chunk files,
/// and the bytes deleted.
fn tidy(
    chunks: &Path,
    listing: files::Listing,
    alone: bool,
    stats: &CacheStats,
) -> (Vec<Listed>, u64) {
    let discard = |path: &Path| {
        tracing::info!(path = %path.display(), "cache: discarding an abandoned or invalid file");
        stats.discarded_on_open.fetch_add(1, Ordering::Relaxed);
        fs::remove_file(path)
    };
    for path in &listing.temps {
        if alone || files::is_abandoned(path) {
            let _ = discard(path);
        }
    }
    if alone {
        for path in &listing.other {
            let _ = discard(path);
        }
    }
    let mut good = Vec::with_capacity(listing.chunks.len());
    let mut dropped = 0;
    for c in listing.chunks {
        let path = chunks.join(c.id.to_hex());
        match entry::check_file(&path, c.id) {
            Ok(_) => good.push(c),
            // Gone meanwhile, or cannot be opened just now: neither indexed
            // nor deleted.
            Err(EntryError::Io { source, .. }) => {
                if source.kind() != io::ErrorKind::NotFound {
                    tracing::warn!(path = %path.display(), error = %source, "cache: cannot check a cached chunk; leaving it be");
                }
            }
            Err(_) => {
                if discard(&path).is_ok() {
                    dropped += c.bytes;
                }
            }
        }
    }
    (good, dropped)
}

/// Lists `dir` (the caller holds the ledger's lock) and sets the count to
/// the bytes of the chunk files there: it runs high after a process died
/// between reserving and giving back. Reservations of files other
/// processes are writing drop out of it too, so until their next recount
/// the bound may be passed by what was in flight.
fn recount(counts: &mut Counts, dir: &Path) -> io::Result<files::Listing> {
    let listing = files::list(dir)?;
    counts.used = listing.bytes();
    Ok(listing)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(seed: u8, len: usize) -> (ChunkId, Vec<u8>) {
        let raw: Vec<u8> = (0..len)
            .map(|i| (i as u8).wrapping_mul(seed).wrapping_add(seed))
            .collect();
        (ChunkId::of(&raw), raw)
    }

    const CAP: u64 = 96 << 20;

    #[test]
    fn reads_back_any_range_and_catches_a_flipped_byte() {
        let dir = tempfile::tempdir().unwrap();
        let cache = ChunkCache::open(dir.path(), CAP).unwrap();
        let (id, raw) = chunk(3, 65536 + 100);
        cache.insert(id, &raw).unwrap();
        for (off, len) in [
            (0, 4096),
            (4096, 8192),
            (10, 5000),
            (65536, 100),
            (65000, 636),
        ] {
            let mut buf = vec![0u8; len];
            assert!(cache.read(&id, off as u64, &mut buf).unwrap());
            assert_eq!(buf, raw[off..off + len]);
        }
        assert!(cache.read(&id, 65536, &mut [0u8; 200]).is_err());

        // Rot one byte of block 2 on disk; the handle is reopened after eviction
        // of the open file, but the CRC table in memory catches it either way.
        let path = dir.path().join("chunks").join(id.to_hex());
        let mut bytes = fs::read(&path).unwrap();
        let data_off = bytes.len() - raw.len();
        bytes[data_off + 2 * 4096 + 7] ^= 0x40;
        fs::write(&path, &bytes).unwrap();
        let mut buf = vec![0u8; 4096];
        assert!(cache.read(&id, 0, &mut buf).is_ok(), "block 0 is intact");
        let err = cache.read(&id, 8192, &mut buf).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Corrupt);
        assert!(!cache.contains(&id), "a corrupt chunk is dropped");
        assert!(!path.exists());
        assert_eq!(cache.stats().crc_failures.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn stays_within_its_bound_evicting_least_recently_used() {
        let dir = tempfile::tempdir().unwrap();
        let cache = ChunkCache::open(dir.path(), CAP).unwrap();
        let size = 4 << 20;
        let mut ids = Vec::new();
        for seed in 1..=80u8 {
            let (id, raw) = chunk(seed, size);
            cache.insert(id, &raw).unwrap();
            ids.push(id);
            // Keep the first chunk hot.
            assert!(cache.get(&ids[0]).unwrap().is_some());
            assert!(cache.bytes_on_disk().unwrap() <= CAP);
            assert_eq!(cache.bytes_on_disk().unwrap(), cache.used_bytes());
        }
        assert!(cache.contains(&ids[0]));
        assert!(!cache.contains(&ids[1]));
        assert!(cache.contains(&ids[79]));
        assert!(cache.stats().evictions.load(Ordering::Relaxed) > 0);
    }

    #[test]
    fn a_chunk_another_process_evicted_is_a_miss_not_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let other = ChunkCache::open(dir.path(), CAP).unwrap();
        let (id, raw) = chunk(4, 70_000);
        other.insert(id, &raw).unwrap();
        // This process learns the chunk at open (not mapped yet); the other
        // evicts it.
        let cache = ChunkCache::open(dir.path(), CAP).unwrap();
        assert!(cache.contains(&id));
        other.remove(&id);
        let mut buf = vec![0u8; 4096];
        assert!(!cache.read(&id, 0, &mut buf).unwrap(), "a miss");
        assert!(!cache.contains(&id), "forgotten, so it is fetched again");
        assert_eq!(cache.stats().vanished.load(Ordering::Relaxed), 1);
        // Fetched again, it is cached again (by whichever process).
        cache.insert(id, &raw).unwrap();
        assert!(cache.read(&id, 4096, &mut buf).unwrap());
        assert_eq!(buf, raw[4096..8192]);
    }

    #[test]
    fn the_bound_holds_for_every_process_sharing_the_directory() {
        let dir = tempfile::tempdir().unwrap();
        let a = ChunkCache::open(dir.path(), CAP).unwrap();
        let b = ChunkCache::open(dir.path(), CAP).unwrap();
        let size = 4 << 20;
        let mut all = Vec::new();
        for seed in 1..=60u8 {
            let (id, raw) = chunk(seed, size);
            let cache = if seed % 3 == 0 { &b } else { &a };
            cache.insert(id, &raw).unwrap();
            all.push((id, raw));
            let on_disk = a.bytes_on_disk().unwrap();
            assert!(
                on_disk <= CAP,
                "{on_disk} bytes on disk after {seed} inserts"
            );
            assert_eq!(a.used_bytes(), on_disk);
        }
        assert!(b.stats().adopted.load(Ordering::Relaxed) > 0);
        // What either still indexes reads back right or is a miss.
        let mut buf = vec![0u8; 4096];
        for cache in [&a, &b] {
            for (id, raw) in &all {
                if cache.read(id, 8192, &mut buf).unwrap() {
                    assert_eq!(buf, raw[8192..12288]);
                }
            }
        }
    }

    #[test]
    fn a_starting_process_leaves_live_writers_temporaries_alone() {
        let dir = tempfile::tempdir().unwrap();
        let running = ChunkCache::open(dir.path(), CAP).unwrap();
        let chunks = dir.path().join("chunks");
        // A write in progress (locked), a temporary just made (not yet
        // locked) and one whose writer died an hour ago.
        let live = Temp::create(&chunks, &ChunkId::of(b"live")).unwrap();
        let young = chunks.join(".tmp-young-00000000");
        fs::write(&young, b"").unwrap();
        let dead = chunks.join(".tmp-dead-00000000");
        fs::write(&dead, b"").unwrap();
        let hour_ago = std::time::SystemTime::now() - std::time::Duration::from_secs(3600);
        for p in [live.path(), dead.as_path()] {
            let f = fs::File::options().write(true).open(p).unwrap();
            f.set_modified(hour_ago).unwrap();
        }
        let second = ChunkCache::open(dir.path(), CAP).unwrap();
        assert!(live.path().exists() && young.exists());
        assert!(!dead.exists());
        assert_eq!(second.stats().discarded_on_open.load(Ordering::Relaxed), 1);
        // With nobody else using the directory, no temporary has a writer.
        let live_path = live.path().to_owned();
        drop((live, running, second));
        let alone = ChunkCache::open(dir.path(), CAP).unwrap();
        assert!(!live_path.exists() && !young.exists());
        assert_eq!(alone.stats().discarded_on_open.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn a_count_left_high_by_a_crash_is_set_right() {
        let dir = tempfile::tempdir().unwrap();
        let cache = ChunkCache::open(dir.path(), CAP).unwrap();
        // Opened on an empty directory: it will know none of the chunks.
        let early = ChunkCache::open(dir.path(), CAP).unwrap();
        let inflate = |by: u64| cache.ledger.update(|c| c.used += by).unwrap();
        let mut ids = Vec::new();
        for seed in 1..=3 {
            let (id, raw) = chunk(seed, 5 << 20);
            cache.insert(id, &raw).unwrap();
            ids.push(id);
        }
        // Processes that died holding reservations left the count high.
        inflate(10 * CAP);
        // The next process to open the directory counts what is there, and
        // evicts nothing for phantom bytes.
        let other = ChunkCache::open(dir.path(), CAP).unwrap();
        assert_eq!(other.used_bytes(), other.bytes_on_disk().unwrap());
        let (id, raw) = chunk(4, 5 << 20);
        other.insert(id, &raw).unwrap();
        ids.push(id);
        assert_eq!(other.stats().evictions.load(Ordering::Relaxed), 0);
        // So does a running process that finds nothing it knows to evict.
        inflate(10 * CAP);
        let (id, raw) = chunk(5, 5 << 20);
        early.insert(id, &raw).unwrap();
        ids.push(id);
        assert_eq!(early.stats().evictions.load(Ordering::Relaxed), 0);
        assert_eq!(early.used_bytes(), early.bytes_on_disk().unwrap());
        assert!(
            ids.iter().all(|id| early.contains(id)),
            "it learned the others' files"
        );
    }

    #[test]
    fn index_is_rebuilt_by_a_scan_and_junk_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let (a, ra) = chunk(1, 10000);
        let (b, rb) = chunk(2, 10000);
        {
            let cache = ChunkCache::open(dir.path(), CAP).unwrap();
            cache.insert(a, &ra).unwrap();
            cache.insert(b, &rb).unwrap();
        }
        let chunks = dir.path().join("chunks");
        fs::write(chunks.join(".tmp-dead-0001"), b"torn").unwrap();
        // A torn entry: right name, cut short.
        let pb = chunks.join(b.to_hex());
        let bytes = fs::read(&pb).unwrap();
        fs::write(&pb, &bytes[..bytes.len() - 10]).unwrap();
        let cache = ChunkCache::open(dir.path(), CAP).unwrap();
        assert!(cache.contains(&a));
        assert!(!cache.contains(&b));
        assert_eq!(cache.stats().discarded_on_open.load(Ordering::Relaxed), 2);
        let mut buf = vec![0u8; 10000];
        assert!(cache.read(&a, 0, &mut buf).unwrap());
        assert_eq!(buf, ra);
    }
}
