//! The chunk store: the synchronous facade the data plane reads through.
//!
//! A read is served from the local cache; a miss fetches from the remote
//! tier on the async runtime while the calling thread waits on a
//! per-chunk pending slot, so concurrent misses of one chunk share one
//! fetch (single flight). Misses requested together that sit close in the
//! same pack are merged into one ranged GET. Every fetched frame is
//! checked (CRC, then BLAKE3 of the decompressed bytes against the id)
//! before it is cached; a chunk that fails is never cached or served.
//!
//! Every wait is bounded: a fetch's GETs run under
//! [`ChunkStoreConfig::fetch_deadline`] (short attempts, a bound in all),
//! and whatever the fetch ends with, every reader waiting on the chunk
//! gets it. A pack object found missing is marked lost; its chunks are
//! read from another pack that holds them, or fail with
//! [`ChunkStoreError::Lost`].
//!
//! The blocking calls (`read`, `fetch`, `read_chunk`) must be made from
//! plain threads, never from a task on the runtime they fetch with.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock, RwLock};

use tokio::runtime::Handle;

use crate::cache::{CacheError, ChunkCache, EntryError, HotChunks};
use crate::error::ErrorKind;
use crate::frame::{self, FrameError, Verify};
use crate::id::{ChunkId, PackId};
use crate::layout;
use crate::locate::{self, LocateError, Location, PackMap};
use crate::objstore::{Deadline, ObjectStore, StoreError};
use crate::pack::{self, IndexEntry, PackIndex};
use crate::sched::{self, Lane};

#[derive(Debug, Clone, thiserror::Error)]
pub enum ChunkStoreError {
    #[error("chunk {id} is in no pack of {store}: the store is missing data (run `cairn verify`)")]
    NotFound { id: ChunkId, store: String },
    #[error("fetching chunk {id} from {key} failed")]
    Remote {
        id: ChunkId,
        key: String,
        #[source]
        source: Arc<StoreError>,
    },
    #[error("chunk {id} from object {key} failed verification; it was not cached")]
    Corrupt {
        id: ChunkId,
        key: String,
        #[source]
        source: Arc<FrameError>,
    },
    #[error("local cache failed for chunk {id}")]
    Cache {
        id: ChunkId,
        #[source]
        source: Arc<CacheError>,
    },
    #[error("cannot load the store's pack indexes")]
    Locate(#[source] Arc<LocateError>),
    #[error("fetch of chunk {id} was cancelled: {why}")]
    Cancelled { id: ChunkId, why: &'static str },
    #[error("chunk {id} is only in pack {key} of {store}, and that pack object is missing (lost): `cairn verify` lists what is lost; importing the image again uploads it again")]
    Lost {
        id: ChunkId,
        key: String,
        store: String,
    },
}

impl ChunkStoreError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            ChunkStoreError::NotFound { .. } | ChunkStoreError::Lost { .. } => ErrorKind::NotFound,
            ChunkStoreError::Remote { source, .. } => source.kind(),
            ChunkStoreError::Corrupt { .. } => ErrorKind::Corrupt,
            ChunkStoreError::Cache { source, .. } => source.kind(),
            ChunkStoreError::Locate(e) => e.kind(),
            ChunkStoreError::Cancelled { .. } => ErrorKind::Transient,
        }
    }
}

/// Counters of the remote path.
#[derive(Debug, Default)]
pub struct FetchStats {
    /// Ranged GETs of pack bytes.
    pub remote_gets: AtomicU64,
    pub remote_bytes: AtomicU64,
    pub chunks_fetched: AtomicU64,
    pub digest_failures: AtomicU64,
    /// Requests that found the chunk already being fetched and waited.
    pub single_flight_waits: AtomicU64,
    pub fetch_errors: AtomicU64,
    /// Chunks fetched ahead of the guest by read-ahead.
    pub readahead_chunks: AtomicU64,
    /// Read-ahead requests dropped because its budget was spent.
    pub readahead_dropped: AtomicU64,
    /// Packs found missing on a read (their chunks looked for elsewhere).
    pub lost_packs: AtomicU64,
}

#[derive(Debug, Clone)]
pub struct ChunkStoreConfig {
    pub cache_dir: PathBuf,
    pub cache_capacity: u64,
    /// Frames at most this far apart in a pack are fetched in one GET.
    pub merge_gap: u64,
    /// A merged GET stops growing at this many bytes.
    pub max_run_bytes: u64,
    /// Read-ahead bytes in flight at most (all disks of this store): what
    /// is beyond is dropped, not queued, so read-ahead never holds up
    /// the reads a guest is waiting on.
    pub readahead_budget: u64,
    /// How long a fetch may wait on the remote tier (each GET, and in all)
    /// before its readers get an error: a guest or a VM is waiting. Longer
    /// runs get more ([`Deadline::for_bytes`]).
    pub fetch_deadline: Deadline,
}

impl ChunkStoreConfig {
    pub fn new(cache_dir: PathBuf, cache_capacity: u64) -> ChunkStoreConfig {
        ChunkStoreConfig {
            cache_dir,
            cache_capacity,
            merge_gap: 64 << 10,
            max_run_bytes: 8 << 20,
            readahead_budget: 4 << 20,
            fetch_deadline: Deadline::DATA_PATH,
        }
    }
}

/// What a fetch hands its waiters: the verified bytes of the chunk, so the
/// reader that missed is answered before the chunk is written to the cache.
type Outcome = Result<Arc<[u8]>, ChunkStoreError>;

/// One chunk in flight. It is answered (waiters get the bytes) before it
/// is settled (cached, or given up on, and out of the in-flight map).
#[derive(Default)]
struct Pending {
    state: Mutex<PendingState>,
    changed: Condvar,
}

#[derive(Default)]
struct PendingState {
    outcome: Option<Outcome>,
    settled: bool,
}

impl Pending {
    fn lock(&self) -> std::sync::MutexGuard<'_, PendingState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn complete(&self, outcome: Outcome) {
        let mut st = self.lock();
        if st.outcome.is_none() {
            st.outcome = Some(outcome);
            self.changed.notify_all();
        }
    }

    fn settle(&self) {
        self.lock().settled = true;
        self.changed.notify_all();
    }

    /// Waits for the answer.
    fn wait(&self) -> Outcome {
        self.wait_until(|st| st.outcome.is_some())
    }

    /// Waits until the chunk is cached (or failed for good).
    fn wait_settled(&self) -> Outcome {
        self.wait_until(|st| st.settled)
    }

    fn wait_until(&self, done: impl Fn(&PendingState) -> bool) -> Outcome {
        let mut st = self.lock();
        while !done(&st) || st.outcome.is_none() {
            st = self.changed.wait(st).unwrap_or_else(|p| p.into_inner());
        }
        st.outcome.clone().expect("checked above")
    }
}

struct Inner {
    remote: Arc<dyn ObjectStore>,
    rt: Handle,
    cache: ChunkCache,
    map: RwLock<PackMap>,
    index_dir: PathBuf,
    inflight: Mutex<HashMap<ChunkId, Arc<Pending>>>,
    stats: FetchStats,
    cfg: ChunkStoreConfig,
    /// Read-ahead bytes in flight.
    readahead_in_flight: AtomicU64,
}

/// What became of a read-ahead request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadAhead {
    /// Every chunk was local already.
    Cached,
    /// The missing chunks are being fetched.
    Fetching,
    /// Over the read-ahead budget: nothing was fetched.
    Dropped,
}

/// A cheap, clonable handle on a store with its local cache.
#[derive(Clone)]
pub struct ChunkStore {
    inner: Arc<Inner>,
}

/// Chunks this fetch owns. Whatever is still unanswered when it is dropped
/// (the runtime shut down, a task panicked) is failed, so no waiter hangs.
struct Claim {
    inner: Arc<Inner>,
    pending: HashMap<ChunkId, Arc<Pending>>,
}

impl Claim {
    /// Wakes the waiters of `id` without leaving the in-flight map.
    fn answer(&self, id: &ChunkId, outcome: &Outcome) {
        if let Some(p) = self.pending.get(id) {
            p.complete(outcome.clone());
        }
    }

    /// Answers `id` (unless already answered) and leaves the in-flight map.
    fn finish(&mut self, id: &ChunkId, outcome: Outcome) {
        if let Some(p) = self.pending.remove(id) {
            if outcome.is_err() {
                self.inner
                    .stats
                    .fetch_errors
                    .fetch_add(1, Ordering::Relaxed);
            }
            self.inner.lock_inflight().remove(id);
            p.complete(outcome);
            p.settle();
        }
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        let ids: Vec<ChunkId> = self.pending.keys().copied().collect();
        for id in ids {
            self.finish(
                &id,
                Err(ChunkStoreError::Cancelled {
                    id,
                    why: "the fetch task ended early",
                }),
            );
        }
    }
}

impl Inner {
    fn lock_inflight(&self) -> std::sync::MutexGuard<'_, HashMap<ChunkId, Arc<Pending>>> {
        self.inflight.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn map(&self) -> std::sync::RwLockReadGuard<'_, PackMap> {
        self.map.read().unwrap_or_else(|p| p.into_inner())
    }

    fn map_mut(&self) -> std::sync::RwLockWriteGuard<'_, PackMap> {
        self.map.write().unwrap_or_else(|p| p.into_inner())
    }

    fn lost(&self, id: ChunkId, pack: &PackId) -> ChunkStoreError {
        ChunkStoreError::Lost {
            id,
            key: layout::pack_key(pack),
            store: self.remote.uri().to_owned(),
        }
    }

    async fn refresh(&self) -> Result<usize, LocateError> {
        locate::refresh(&self.map, self.remote.as_ref(), &self.index_dir).await
    }

    /// As [`Inner::refresh`], within the fetch deadline: a reader is
    /// waiting on a chunk no known pack holds.
    async fn refresh_for_reader(&self) -> Result<usize, ChunkStoreError> {
        let limit = self.cfg.fetch_deadline.total;
        let refreshed = tokio::time::timeout(limit, self.refresh())
            .await
            .unwrap_or_else(|_| {
                Err(LocateError::Store(StoreError::new(
                    "list",
                    self.remote.uri(),
                    layout::PACKS,
                    ErrorKind::Transient,
                    format!("no answer within {limit:?}"),
                )))
            });
        refreshed.map_err(|e| ChunkStoreError::Locate(Arc::new(e)))
    }
}

impl ChunkStore {
    /// Opens the cache and loads the store's pack indexes.
    pub async fn open(
        remote: Arc<dyn ObjectStore>,
        cfg: ChunkStoreConfig,
    ) -> Result<ChunkStore, ChunkStoreError> {
        let cache_err = |e: CacheError| ChunkStoreError::Cache {
            id: ChunkId::from_bytes([0; 32]),
            source: Arc::new(e),
        };
        let cache = ChunkCache::open(&cfg.cache_dir, cfg.cache_capacity).map_err(cache_err)?;
        let store = ChunkStore {
            inner: Arc::new(Inner {
                remote,
                rt: Handle::current(),
                cache,
                map: RwLock::new(PackMap::default()),
                index_dir: cfg.cache_dir.join("indexes"),
                inflight: Mutex::new(HashMap::new()),
                stats: FetchStats::default(),
                cfg,
                readahead_in_flight: AtomicU64::new(0),
            }),
        };
        store.refresh().await?;
        Ok(store)
    }

    pub fn remote(&self) -> &Arc<dyn ObjectStore> {
        &self.inner.remote
    }

    pub fn runtime(&self) -> &Handle {
        &self.inner.rt
    }

    pub fn cache(&self) -> &ChunkCache {
        &self.inner.cache
    }

    pub fn stats(&self) -> &FetchStats {
        &self.inner.stats
    }

    pub fn config(&self) -> &ChunkStoreConfig {
        &self.inner.cfg
    }

    /// Loads pack indexes other writers have added since the last look,
    /// and notes which packs are lost (index there, pack object not).
    pub async fn refresh(&self) -> Result<usize, ChunkStoreError> {
        self.inner
            .refresh()
            .await
            .map_err(|e| ChunkStoreError::Locate(Arc::new(e)))
    }

    /// Records a pack this process has just uploaded.
    pub fn add_pack(&self, index: &PackIndex) {
        self.inner.map_mut().add(index);
    }

    /// Whether some pack that is not lost holds the chunk (as far as this
    /// host knows): what an import need not store again.
    pub fn contains(&self, id: &ChunkId) -> bool {
        self.inner.map().contains(id)
    }

    /// Whether a pack that is neither lost nor avoided by a writer's view
    /// of the collector holds the chunk: whether a writer may rely on it.
    pub fn holds_for(&self, id: &ChunkId, view: &crate::gc::WriterView) -> bool {
        self.with_pack_map(|m| m.holds_outside(id, |p| view.avoids(p)))
    }

    pub fn locate(&self, id: &ChunkId) -> Option<Location> {
        self.inner.map().locate(id)
    }

    /// Runs `f` with the pack map (for verification and statistics).
    pub fn with_pack_map<T>(&self, f: impl FnOnce(&PackMap) -> T) -> T {
        f(&self.inner.map())
    }

    /// Reads `buf.len()` bytes at `offset` of chunk `id`, fetching it first
    /// if it is not cached. A cached copy that fails its CRC is dropped and
    /// fetched again; it is never served.
    pub fn read(&self, id: &ChunkId, offset: u64, buf: &mut [u8]) -> Result<(), ChunkStoreError> {
        self.read_via(None, id, offset, buf)
    }

    /// As [`ChunkStore::read`], looking in `hot` (the caller's recently
    /// used chunks) before the shared cache.
    pub fn read_hot(
        &self,
        hot: &mut HotChunks,
        id: &ChunkId,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<(), ChunkStoreError> {
        self.read_via(Some(hot), id, offset, buf)
    }

    fn read_via(
        &self,
        hot: Option<&mut HotChunks>,
        id: &ChunkId,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<(), ChunkStoreError> {
        self.with_slice(hot, id, offset, buf.len(), |s| buf.copy_from_slice(s))
    }

    /// Runs `f` on the `len` bytes at `offset` of chunk `id`, fetching the
    /// chunk first if it is not cached: in place in the cache's mapping
    /// (CRC-checked) or in the fetched, verified bytes, never copied. A
    /// cached copy that fails its CRC is dropped and fetched again.
    pub fn with_slice<T>(
        &self,
        mut hot: Option<&mut HotChunks>,
        id: &ChunkId,
        offset: u64,
        len: usize,
        f: impl FnOnce(&[u8]) -> T,
    ) -> Result<T, ChunkStoreError> {
        let cache_err = |e: CacheError| ChunkStoreError::Cache {
            id: *id,
            source: Arc::new(e),
        };
        let mut f = Some(f);
        for _ in 0..4 {
            let cached = self
                .inner
                .cache
                .with_slice(hot.as_deref_mut(), id, offset, len, |s| {
                    (f.take().expect("called once"))(s)
                });
            match cached {
                Ok(Some(out)) => return Ok(out),
                // A miss, or the cache dropped a bad copy: fetch a good one.
                Ok(None) => {}
                Err(e) if e.kind() == ErrorKind::Corrupt => {}
                Err(e) => return Err(cache_err(e)),
            }
            // Serve straight from the fetched bytes; no waiter means the
            // chunk reached the cache meanwhile, so read it there.
            let (mut waits, claim) = self.claim_missing(std::slice::from_ref(id));
            self.run_here(claim);
            if let Some(pending) = waits.pop() {
                let raw = pending.wait()?;
                let start = usize::try_from(offset).unwrap_or(usize::MAX);
                let Some(src) = start.checked_add(len).and_then(|end| raw.get(start..end)) else {
                    return Err(cache_err(CacheError::Entry(EntryError::OutOfRange {
                        id: *id,
                        offset,
                        len,
                        raw_len: raw.len() as u32,
                    })));
                };
                return Ok((f.take().expect("called once"))(src));
            }
        }
        Err(ChunkStoreError::Cancelled {
            id: *id,
            why: "the chunk kept leaving the cache before it could be read (is the cache far too small?)",
        })
    }

    /// The whole chunk `id`, of `len` bytes.
    pub fn read_chunk(&self, id: &ChunkId, len: u32) -> Result<Vec<u8>, ChunkStoreError> {
        let mut buf = vec![0u8; len as usize];
        self.read(id, 0, &mut buf)?;
        Ok(buf)
    }

    /// Makes every chunk in `ids` local, fetching what is missing (merged
    /// where adjacent) and waiting for fetches already under way.
    pub fn fetch(&self, ids: &[ChunkId]) -> Result<(), ChunkStoreError> {
        let (waits, claim) = self.claim_missing(ids);
        self.run_here(claim);
        let mut first_err = None;
        for p in waits {
            if let Err(e) = p.wait_settled() {
                first_err.get_or_insert(e);
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    /// Starts fetching whatever of `ids` is not local, without waiting.
    pub fn prefetch(&self, ids: &[ChunkId]) {
        if let (_, Some(claim)) = self.claim_missing(ids) {
            self.inner.rt.spawn(fetch_claimed(claim, Caching::Behind));
        }
    }

    /// Read-ahead: starts fetching whatever of `ids` (chunks of about
    /// `chunk_bytes` each) is not local, in the background, if the
    /// read-ahead budget allows; otherwise drops the request.
    pub fn read_ahead(&self, ids: &[ChunkId], chunk_bytes: u64) -> ReadAhead {
        let inner = &self.inner;
        let missing: Vec<ChunkId> = ids
            .iter()
            .filter(|id| !inner.cache.contains(id))
            .copied()
            .collect();
        if missing.is_empty() {
            return ReadAhead::Cached;
        }
        let bytes = missing.len() as u64 * chunk_bytes;
        let budget = inner.cfg.readahead_budget;
        let taken = inner
            .readahead_in_flight
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                (used + bytes <= budget).then_some(used + bytes)
            })
            .is_ok();
        if !taken {
            inner
                .stats
                .readahead_dropped
                .fetch_add(1, Ordering::Relaxed);
            return ReadAhead::Dropped;
        }
        let (_, claim) = self.claim_missing(&missing);
        let Some(claim) = claim else {
            // Others are fetching them.
            inner.readahead_in_flight.fetch_sub(bytes, Ordering::AcqRel);
            return ReadAhead::Fetching;
        };
        inner
            .stats
            .readahead_chunks
            .fetch_add(claim.pending.len() as u64, Ordering::Relaxed);
        let done = self.inner.clone();
        self.inner.rt.spawn(async move {
            fetch_claimed(claim, Caching::Awaited).await;
            done.readahead_in_flight.fetch_sub(bytes, Ordering::AcqRel);
        });
        ReadAhead::Fetching
    }

    /// Runs a claimed fetch on the calling thread (as a plain ranged GET
    /// would be), sparing two thread hand-offs on a miss.
    fn run_here(&self, claim: Option<Claim>) {
        if let Some(claim) = claim {
            self.inner
                .rt
                .block_on(fetch_claimed(claim, Caching::Behind));
        }
    }

    /// Claims the missing chunks no one is fetching; returns the slots to
    /// wait on (ours and others') and the claim to fetch, if any.
    fn claim_missing(&self, ids: &[ChunkId]) -> (Vec<Arc<Pending>>, Option<Claim>) {
        let mut waits = Vec::new();
        let mut mine = HashMap::new();
        {
            let mut inflight = self.inner.lock_inflight();
            for id in ids {
                if let Some(p) = inflight.get(id) {
                    if !mine.contains_key(id) {
                        self.inner
                            .stats
                            .single_flight_waits
                            .fetch_add(1, Ordering::Relaxed);
                        waits.push(p.clone());
                    }
                    continue;
                }
                // Checked under the in-flight lock: a fetch inserts into the
                // cache before it leaves the in-flight map.
                if self.inner.cache.contains(id) {
                    continue;
                }
                let p = Arc::new(Pending::default());
                inflight.insert(*id, p.clone());
                mine.insert(*id, p.clone());
                waits.push(p);
            }
        }
        let claim = (!mine.is_empty()).then(|| Claim {
            inner: self.inner.clone(),
            pending: mine,
        });
        (waits, claim)
    }
}

/// Rounds of looking for another copy of chunks whose pack turned out
/// lost: each round marks at least one more pack lost, so this bounds the
/// GETs a read makes when copies after copies are gone.
const LOST_PACK_ROUNDS: usize = 4;

/// Locates the claimed chunks, groups them into merged runs per pack and
/// fetches the runs concurrently. Chunks of a pack found missing are
/// fetched from another pack that holds them, if one does.
async fn fetch_claimed(mut claim: Claim, caching: Caching) {
    let inner = claim.inner.clone();
    let unknown: Vec<ChunkId> = claim
        .pending
        .keys()
        .filter(|id| inner.map().locate(id).is_none())
        .copied()
        .collect();
    if !unknown.is_empty() {
        // Another host may have added packs since we last looked.
        if let Err(e) = inner.refresh_for_reader().await {
            for id in unknown {
                claim.finish(&id, Err(e.clone()));
            }
        }
    }
    for round in 0..=LOST_PACK_ROUNDS {
        let by_pack = locate_claimed(&mut claim, round > 0);
        let left = fetch_runs(&mut claim, by_pack, caching).await;
        if left.is_empty() {
            return;
        }
        // Chunks of lost packs: look for them elsewhere.
        for mut c in left {
            claim.pending.extend(std::mem::take(&mut c.pending));
        }
    }
    // Copy after copy was lost: give up on what is left.
    let ids: Vec<ChunkId> = claim.pending.keys().copied().collect();
    for id in ids {
        if let Some(loc) = inner.map().locate(&id) {
            claim.finish(&id, Err(inner.lost(id, &loc.pack)));
        }
    }
}

/// The claimed chunks by the pack to read each from. Those in no known
/// pack fail, and on a `retry` so do those left only in lost packs.
fn locate_claimed(claim: &mut Claim, retry: bool) -> HashMap<PackId, Vec<IndexEntry>> {
    let inner = claim.inner.clone();
    let mut by_pack: HashMap<PackId, Vec<IndexEntry>> = HashMap::new();
    let ids: Vec<ChunkId> = claim.pending.keys().copied().collect();
    for id in ids {
        match inner.map().locate(&id) {
            None => {
                let store = inner.remote.uri().to_owned();
                claim.finish(&id, Err(ChunkStoreError::NotFound { id, store }));
            }
            Some(loc) if retry && inner.map().is_lost(&loc.pack) => {
                claim.finish(&id, Err(inner.lost(id, &loc.pack)));
            }
            Some(loc) => by_pack.entry(loc.pack).or_default().push(loc.entry),
        }
    }
    by_pack
}

/// Fetches `by_pack` (chunks of `claim`) as merged runs, concurrently;
/// the claims handed back for packs found missing.
async fn fetch_runs(
    claim: &mut Claim,
    by_pack: HashMap<PackId, Vec<IndexEntry>>,
    caching: Caching,
) -> Vec<Claim> {
    let inner = claim.inner.clone();
    let mut runs = Vec::new();
    for (pack, entries) in by_pack {
        for run in split_long_runs(
            PackIndex::runs(entries, inner.cfg.merge_gap),
            inner.cfg.max_run_bytes,
        ) {
            let run_claim = Claim {
                inner: inner.clone(),
                pending: run
                    .iter()
                    .filter_map(|e| claim.pending.remove(&e.id).map(|p| (e.id, p)))
                    .collect(),
            };
            runs.push(fetch_run(run_claim, pack, run, caching));
        }
    }
    if runs.len() <= 1 {
        // The common miss: one run, no need for another task.
        return match runs.pop() {
            Some(run) => run.await.into_iter().collect(),
            None => Vec::new(),
        };
    }
    let tasks: Vec<_> = runs.into_iter().map(tokio::spawn).collect();
    let mut left = Vec::new();
    for t in tasks {
        // A panicked run fails its own chunks through its claim's Drop.
        if let Ok(Some(c)) = t.await {
            left.push(c);
        }
    }
    left
}

/// Runs this small are decoded on the async worker: a hop to the blocking
/// pool would cost more than the work.
const INLINE_DECODE_BYTES: usize = 512 << 10;

fn split_long_runs(runs: Vec<Vec<IndexEntry>>, max_bytes: u64) -> Vec<Vec<IndexEntry>> {
    let mut out = Vec::new();
    for run in runs {
        let mut cur: Vec<IndexEntry> = Vec::new();
        for e in run {
            if let Some(first) = cur.first() {
                if e.end() - first.offset > max_bytes {
                    out.push(std::mem::take(&mut cur));
                }
            }
            cur.push(e);
        }
        out.push(cur);
    }
    out
}

/// Whether a fetch returns once its waiters have their bytes (the chunks
/// are cached behind it) or only once the chunks are in the cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Caching {
    Behind,
    /// For read-ahead: its budget must cover the chunks until they are
    /// cached, or an unbounded backlog of decoded chunks could pile up.
    Awaited,
}

/// One ranged GET, then verify and cache each frame of the run. If the
/// pack object is missing, marks it lost and hands the claim back, so its
/// chunks can be looked for in other packs.
async fn fetch_run(
    mut claim: Claim,
    pack: PackId,
    run: Vec<IndexEntry>,
    caching: Caching,
) -> Option<Claim> {
    let inner = claim.inner.clone();
    let key = layout::pack_key(&pack);
    let (Some(first), Some(last)) = (run.first(), run.last()) else {
        return None;
    };
    let range = first.offset..last.end();
    let deadline = inner.cfg.fetch_deadline.for_bytes(range.end - range.start);
    let got = inner.remote.get_within(&key, Some(range), deadline).await;
    let lost = inner.map().is_lost(&pack);
    match &got {
        Err(e) if e.kind() == ErrorKind::NotFound => {
            if inner.map_mut().set_lost(&pack, true) {
                inner.stats.lost_packs.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(pack = %key, store = inner.remote.uri(), "a pack object is missing (deleted by a garbage collection that rewrote it, or lost): its chunks are read from other packs where they exist (`cairn verify` lists what is lost)");
            }
            return Some(claim);
        }
        Ok(_) if lost => {
            inner.map_mut().set_lost(&pack, false);
            tracing::info!(pack = %key, "a pack marked lost is there again");
        }
        _ => {}
    }
    let bytes = match got {
        Ok(b) => b,
        Err(e) => {
            tracing::warn!(pack = %key, error = %e, "fetching a pack range failed");
            let e = Arc::new(e);
            for entry in &run {
                let err = ChunkStoreError::Remote {
                    id: entry.id,
                    key: key.clone(),
                    source: e.clone(),
                };
                claim.finish(&entry.id, Err(err));
            }
            return None;
        }
    };
    inner.stats.remote_gets.fetch_add(1, Ordering::Relaxed);
    inner
        .stats
        .remote_bytes
        .fetch_add(bytes.len() as u64, Ordering::Relaxed);
    let inline = bytes.len() <= INLINE_DECODE_BYTES;
    let verify_all = move || {
        let outcomes: Vec<(ChunkId, Outcome)> = pack::frames_of_run(&run, &bytes)
            .map(|(entry, frame_bytes)| {
                let outcome = verify(&claim.inner, &key, entry, frame_bytes);
                claim.answer(&entry.id, &outcome);
                (entry.id, outcome)
            })
            .collect();
        (claim, outcomes)
    };
    let (claim, outcomes) = if inline {
        verify_all()
    } else {
        // Decompressing and hashing a long run is CPU work: keep it off
        // the async workers.
        match cpu_lane().spawn(verify_all).await {
            Ok(done) => done,
            // The claim went down with the job and failed its waiters.
            Err(_) => return None,
        }
    };
    // The waiters have their bytes; caching happens off their path. The
    // chunks stay in flight until cached, so no second fetch starts.
    let cached = cpu_lane().spawn(move || cache_and_finish(claim, outcomes));
    if caching == Caching::Awaited {
        let _ = cached.await;
    }
    None
}

/// The threads that decode, verify and cache fetched runs: one per core,
/// at background priority, however many fetches are in flight (see
/// [`crate::sched`]: hundreds of blocking-pool threads doing this made
/// the threads serving cached reads wait for a core).
fn cpu_lane() -> &'static Lane {
    static LANE: OnceLock<Lane> = OnceLock::new();
    LANE.get_or_init(|| {
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        Lane::start("cairn-decode", cores, sched::background)
            .expect("cannot start the chunk decoding threads")
    })
}

fn cache_and_finish(mut claim: Claim, outcomes: Vec<(ChunkId, Outcome)>) {
    for (id, outcome) in outcomes {
        if let Ok(raw) = &outcome {
            if let Err(e) = claim.inner.cache.insert(id, raw) {
                tracing::warn!(chunk = %id, error = %e, "cache: could not keep a fetched chunk");
            }
        }
        claim.finish(&id, outcome);
    }
}

fn verify(inner: &Inner, key: &str, entry: IndexEntry, frame_bytes: Option<&[u8]>) -> Outcome {
    let corrupt = |source: FrameError| {
        inner.stats.digest_failures.fetch_add(1, Ordering::Relaxed);
        tracing::error!(chunk = %entry.id, object = key, error = %source, "remote chunk failed verification; not cached");
        ChunkStoreError::Corrupt {
            id: entry.id,
            key: key.to_owned(),
            source: Arc::new(source),
        }
    };
    let frame_bytes = frame_bytes.ok_or_else(|| {
        corrupt(FrameError::Truncated {
            have: 0,
            need: entry.frame_len as usize,
        })
    })?;
    let raw = frame::decode_chunk(frame_bytes, entry.id, Verify::Digest).map_err(corrupt)?;
    inner.stats.chunks_fetched.fetch_add(1, Ordering::Relaxed);
    Ok(raw.into())
}
