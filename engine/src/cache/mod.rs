//! The bounded local cache of chunks fetched from a remote tier.
//!
//! Each chunk is one file under `chunks/`, named by its id and kept
//! decompressed with per-block CRCs (see [`entry`]). The in-memory index is
//! never persisted: opening the cache rebuilds it by scanning the
//! directory, deleting temporaries and anything that does not check out,
//! so a crash can lose cached chunks but never serve a wrong one. Total
//! size on disk stays within the bound by evicting least recently used
//! chunks before each insert. A bounded number of chunk files stay open.

mod entry;

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

pub use entry::{file_len, CachedChunk, EntryError, BLOCK};

use crate::error::ErrorKind;
use crate::id::ChunkId;

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

/// The cache's counters.
#[derive(Debug, Default)]
pub struct CacheStats {
    pub hits: AtomicU64,
    pub misses: AtomicU64,
    pub inserts: AtomicU64,
    pub evictions: AtomicU64,
    pub crc_failures: AtomicU64,
    /// Invalid or temporary files deleted when the index was rebuilt.
    pub discarded_on_open: AtomicU64,
}

struct Slot {
    bytes: u64,
    /// Tick of the last use.
    tick: u64,
    /// Tick under which the slot sits in `State::lru`. Behind `tick` when
    /// the slot was used since: a hit only bumps `tick`, and eviction
    /// requeues such slots instead of evicting them (lazy LRU: a hit costs
    /// one map lookup, not a reordering).
    queued: u64,
    /// The mapped file and the tick under which it sits in `State::open`.
    handle: Option<(Arc<CachedChunk>, u64)>,
}

struct State {
    slots: HashMap<ChunkId, Slot>,
    /// Every slot, by `Slot::queued`.
    lru: BTreeMap<u64, ChunkId>,
    /// Slots with a mapped file, by the tick they were queued under.
    open: BTreeMap<u64, ChunkId>,
    used: u64,
    tick: u64,
}

pub struct ChunkCache {
    dir: PathBuf,
    capacity: u64,
    max_open: usize,
    state: Mutex<State>,
    stats: CacheStats,
}

/// Mapped chunk files kept at once (their descriptors are closed once mapped).
const MAX_MAPPED: usize = 16384;
/// Four of the largest chunks.
pub const MIN_CAPACITY: u64 = 64 << 20;

impl ChunkCache {
    /// Opens the cache in `dir` holding at most `capacity` bytes on disk,
    /// rebuilding its index from what the directory holds.
    pub fn open(dir: &Path, capacity: u64) -> Result<ChunkCache, CacheError> {
        let min = MIN_CAPACITY;
        if capacity < min {
            return Err(CacheError::TooSmall {
                size: capacity,
                min,
            });
        }
        let chunks = dir.join("chunks");
        let io = |path: &Path| {
            let path = path.to_owned();
            move |source| CacheError::Io { path, source }
        };
        fs::create_dir_all(&chunks).map_err(io(&chunks))?;
        let cache = ChunkCache {
            dir: chunks.clone(),
            capacity,
            max_open: MAX_MAPPED,
            state: Mutex::new(State {
                slots: HashMap::new(),
                lru: BTreeMap::new(),
                open: BTreeMap::new(),
                used: 0,
                tick: 0,
            }),
            stats: CacheStats::default(),
        };
        let mut found = Vec::new();
        for entry in fs::read_dir(&chunks).map_err(io(&chunks))? {
            let entry = entry.map_err(io(&chunks))?;
            let path = entry.path();
            let id = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<ChunkId>().ok());
            let valid = id.and_then(|id| CachedChunk::open(&path, id).ok().map(|c| (id, c)));
            match valid {
                Some((id, c)) => {
                    let mtime = entry.metadata().and_then(|m| m.modified()).ok();
                    found.push((mtime, id, file_len(c.len())));
                }
                None => {
                    tracing::info!(path = %path.display(), "cache: discarding a temporary or invalid file");
                    fs::remove_file(&path).map_err(io(&path))?;
                    cache
                        .stats
                        .discarded_on_open
                        .fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        found.sort();
        {
            let mut s = cache.lock();
            for (_, id, bytes) in found {
                let tick = s.next_tick();
                s.slots.insert(
                    id,
                    Slot {
                        bytes,
                        tick,
                        queued: tick,
                        handle: None,
                    },
                );
                s.lru.insert(tick, id);
                s.used += bytes;
            }
        }
        cache.reserve(0)?;
        Ok(cache)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn stats(&self) -> &CacheStats {
        &self.stats
    }

    /// Bytes the cached chunks take on disk.
    pub fn used_bytes(&self) -> u64 {
        self.lock().used
    }

    pub fn capacity(&self) -> u64 {
        self.capacity
    }

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

    /// The cached chunk, if present; counts a hit or a miss.
    pub fn get(&self, id: &ChunkId) -> Result<Option<Arc<CachedChunk>>, CacheError> {
        let mut s = self.lock();
        let tick = s.next_tick();
        let Some(slot) = s.slots.get_mut(id) else {
            drop(s);
            self.stats.misses.fetch_add(1, Ordering::Relaxed);
            return Ok(None);
        };
        self.stats.hits.fetch_add(1, Ordering::Relaxed);
        slot.tick = tick;
        if let Some((h, _)) = &slot.handle {
            return Ok(Some(h.clone()));
        }
        // Opened under the lock so eviction cannot race it: mapping an
        // existing file is a few microseconds, once per chunk.
        let handle = match CachedChunk::open(&self.path_of(id), *id) {
            Ok(h) => Arc::new(h),
            Err(e) => {
                drop(s);
                self.stats.crc_failures.fetch_add(1, Ordering::Relaxed);
                self.remove(id);
                return Err(e.into());
            }
        };
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
    pub fn insert(&self, id: ChunkId, raw: &[u8]) -> Result<(), CacheError> {
        let bytes = file_len(raw.len() as u32);
        let path = self.path_of(&id);
        let tmp = self
            .dir
            .join(format!(".tmp-{}-{:08x}", id.short(), fastrand::u32(..)));
        let io = |p: &Path| {
            let path = p.to_owned();
            move |source| CacheError::Io { path, source }
        };
        self.reserve(bytes)?;
        let written = (|| {
            let mut f = fs::File::create(&tmp).map_err(io(&tmp))?;
            f.write_all(&entry::encode_header(id, raw))
                .map_err(io(&tmp))?;
            f.write_all(raw).map_err(io(&tmp))?;
            drop(f);
            fs::rename(&tmp, &path).map_err(io(&path))
        })();
        if let Err(e) = written {
            self.lock().used -= bytes;
            let _ = fs::remove_file(&tmp);
            return Err(e);
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
            s.used -= old.bytes;
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

    /// Drops a chunk (it failed a check); its file is deleted.
    pub fn remove(&self, id: &ChunkId) {
        let mut s = self.lock();
        if let Some(slot) = s.slots.remove(id) {
            s.unqueue(&slot);
            s.used -= slot.bytes;
            drop(s);
            if let Err(e) = fs::remove_file(self.path_of(id)) {
                tracing::warn!(chunk = %id, error = %e, "cache: could not delete a dropped chunk");
            }
        }
    }

    /// Evicts least recently used chunks until `incoming` more bytes fit,
    /// then counts them as used, so concurrent inserts cannot together
    /// overshoot the bound.
    fn reserve(&self, incoming: u64) -> Result<(), CacheError> {
        loop {
            let victim = {
                let mut s = self.lock();
                if s.used + incoming <= self.capacity {
                    s.used += incoming;
                    return Ok(());
                }
                let Some(id) = s.pop_least_recent() else {
                    s.used += incoming;
                    return Ok(());
                };
                let slot = s.slots.remove(&id).expect("lru and slots agree");
                s.unqueue(&slot);
                s.used -= slot.bytes;
                id
            };
            self.stats.evictions.fetch_add(1, Ordering::Relaxed);
            let path = self.path_of(&victim);
            match fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(source) => return Err(CacheError::Io { path, source }),
            }
        }
    }

    /// Bytes the chunk files take on disk, by listing the directory (for tests
    /// and benchmarks that check the bound independently of the index).
    pub fn bytes_on_disk(&self) -> io::Result<u64> {
        let mut total = 0;
        for e in fs::read_dir(&self.dir)? {
            match e?.metadata() {
                Ok(m) => total += m.len(),
                // Evicted between the listing and the look.
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        Ok(total)
    }
}

impl State {
    fn next_tick(&mut self) -> u64 {
        self.tick += 1;
        self.tick
    }

    /// Takes `slot` (already out of `slots`) out of the queues.
    fn unqueue(&mut self, slot: &Slot) {
        self.lru.remove(&slot.queued);
        if let Some((_, t)) = &slot.handle {
            self.open.remove(t);
        }
    }

    /// The least recently used chunk, taken out of `lru` (still in
    /// `slots`). Slots used since they were queued go to the back.
    fn pop_least_recent(&mut self) -> Option<ChunkId> {
        while let Some((queued, id)) = self.lru.pop_first() {
            let slot = self.slots.get_mut(&id).expect("lru and slots agree");
            if slot.tick == queued {
                return Some(id);
            }
            slot.queued = slot.tick;
            self.lru.insert(slot.tick, id);
        }
        None
    }

    /// Unmaps the least recently used files until at most `max` stay mapped.
    fn close_to(&mut self, max: usize) {
        while self.open.len() > max {
            let (queued, id) = self.open.pop_first().expect("non-empty");
            let slot = self.slots.get_mut(&id).expect("open and slots agree");
            let Some((h, _)) = slot.handle.take() else {
                continue;
            };
            if slot.tick != queued {
                // Used since it was mapped: keep it, queued anew. A slot's
                // own ticks never collide with another's.
                slot.handle = Some((h, slot.tick));
                self.open.insert(slot.tick, id);
            }
        }
    }
}

/// One reader's (one queue's) recently used chunks, mapped. Hits here skip
/// the cache's shared lock. An entry is let go after [`HotChunks::REFRESH`]
/// reads, so the shared LRU still hears of chunks in use; a chunk evicted
/// meanwhile stays readable through its mapping (eviction unlinks, it does
/// not truncate) until then, so the cache may exceed its bound by at most
/// `CAPACITY` chunks per reader.
pub struct HotChunks {
    entries: HashMap<ChunkId, (Arc<CachedChunk>, u64)>,
    reads: u64,
}

impl Default for HotChunks {
    fn default() -> HotChunks {
        HotChunks {
            entries: HashMap::with_capacity(Self::CAPACITY),
            reads: 0,
        }
    }
}

impl HotChunks {
    pub const CAPACITY: usize = 64;
    pub const REFRESH: u64 = 4096;

    fn get(&mut self, id: &ChunkId) -> Option<Arc<CachedChunk>> {
        self.reads += 1;
        let (chunk, since) = self.entries.get(id)?;
        if self.reads - since > Self::REFRESH {
            self.entries.remove(id);
            return None;
        }
        Some(chunk.clone())
    }

    fn put(&mut self, id: ChunkId, chunk: Arc<CachedChunk>) {
        if self.entries.len() >= Self::CAPACITY {
            // Drop the oldest entry.
            if let Some(old) = self
                .entries
                .iter()
                .min_by_key(|(_, (_, since))| *since)
                .map(|(id, _)| *id)
            {
                self.entries.remove(&old);
            }
        }
        self.entries.insert(id, (chunk, self.reads));
    }

    fn forget(&mut self, id: &ChunkId) {
        self.entries.remove(id);
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
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
