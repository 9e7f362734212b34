//! The page server: one VMM connection, its faults, its prefetch.
//!
//! The fault loop (the thread that accepted the connection) polls the
//! userfaultfd and the socket. Each missing-page fault is answered with
//! UFFDIO_COPY from the chunk that holds the page (in place from the
//! cache's mapping, CRC-checked), or UFFDIO_ZEROPAGE where the image is
//! zero, resolving an aligned run of up to `fault_bytes` around the
//! faulting page. REMOVE events mark pages as given back: they read as
//! zeros afterwards. A prefetch worker installs the recorded working set
//! in recorded order meanwhile, giving way whenever the fault loop has
//! work. When the VMM goes away (the socket closes, or its address space
//! is gone) the resume ends with a report. When the server cannot go on
//! (the store stays down, the userfaultfd fails) it says so and, unless
//! told not to, kills the VMM, which would otherwise hang on its next fault.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{FromRawFd, IntoRawFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cairn_engine::cache::HotChunks;
use cairn_engine::catalog::{self, CatalogError};
use cairn_engine::chunkstore::{ChunkStore, ChunkStoreError};
use cairn_engine::import::ImportOptions;
use cairn_engine::memory::working_set::{PageRun, WorkingSet, WorkingSetError, UNIT};
use cairn_engine::memory::{LayoutError, MemLayout, MemoryImage, Segment};
use cairn_engine::ManifestId;
use rustix::event::{poll, PollFd, PollFlags};
use userfaultfd::{Event, EventBuffer, Uffd};

use super::copy::{self, Install};
use super::handshake::{self, GuestRegion, HandshakeError};
use super::pages::PageStates;
use super::stats::{Counters, Histogram};

/// How much one fault resolves by default: the aligned 64 KiB around the
/// page (README, "Memory snapshots", has the sweep behind it).
pub const DEFAULT_FAULT_BYTES: u64 = 64 << 10;
/// Working-set bytes fetched ahead of the prefetch worker.
const PREFETCH_WINDOW: u64 = 8 << 20;
/// The most one prefetch copy installs, so a fault never waits long.
const PREFETCH_COPY_BYTES: u64 = 256 << 10;
/// The longest a prefetch copy waits for the fault loop to be idle.
const PREFETCH_MAX_YIELD: Duration = Duration::from_micros(200);

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("handshake failed")]
    Handshake(#[from] HandshakeError),
    #[error("fault at {addr:#x} is outside every region the VMM described")]
    OutsideRegions { addr: u64 },
    #[error("cannot read the snapshot for the page at offset {offset}")]
    Store {
        offset: u64,
        #[source]
        source: ChunkStoreError,
    },
    #[error("userfaultfd failed")]
    Uffd(#[source] io::Error),
    #[error("loading snapshot {id}")]
    Catalog {
        id: String,
        #[source]
        source: Box<CatalogError>,
    },
    #[error(transparent)]
    Layout(#[from] LayoutError),
    #[error("working set")]
    WorkingSet(#[from] WorkingSetError),
}

/// How the server behaves; every field is a knob of `cairn mem serve`.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// Bytes one fault resolves: the aligned run around the faulting page
    /// (at least one page).
    pub fault_bytes: u64,
    /// Install the recorded working set ahead of the guest.
    pub prefetch: bool,
    /// Prefetch at most this many bytes a second (None: as fast as faults allow).
    pub prefetch_rate: Option<u64>,
    /// Record the pages this resume touches and store them as the
    /// snapshot's working set (staged through these options).
    pub record: Option<ImportOptions>,
    /// Kill the VMM (SIGKILL) when the server cannot go on.
    pub kill_vmm_on_failure: bool,
    pub handshake_timeout: Duration,
}

impl Default for ServeConfig {
    fn default() -> ServeConfig {
        ServeConfig {
            fault_bytes: DEFAULT_FAULT_BYTES,
            prefetch: true,
            prefetch_rate: None,
            record: None,
            kill_vmm_on_failure: true,
            handshake_timeout: Duration::from_secs(10),
        }
    }
}

/// A memory snapshot ready to serve, with its working set if recorded.
#[derive(Clone)]
pub struct ServedSnapshot {
    pub id: ManifestId,
    pub image: MemoryImage,
    pub layout: MemLayout,
    pub working_set: Option<(WorkingSet, MemoryImage)>,
}

impl ServedSnapshot {
    /// Loads manifest `id`, its layout and its working set. Call from a
    /// plain thread.
    pub fn open(store: &ChunkStore, id: ManifestId) -> Result<ServedSnapshot, ServeError> {
        let remote = store.remote().clone();
        let load = |id: ManifestId| {
            store
                .runtime()
                .block_on(catalog::load_manifest(remote.as_ref(), &id))
                .map_err(|source| ServeError::Catalog {
                    id: id.to_hex(),
                    source: Box::new(source),
                })
        };
        let manifest = Arc::new(load(id)?);
        let layout = MemLayout::of(&manifest)?;
        let size = manifest.logical_size;
        let ws = store
            .runtime()
            .block_on(WorkingSet::load(remote.as_ref(), id, size))?;
        let working_set = match ws {
            Some(ws) => {
                let pages = Arc::new(load(ws.pages)?);
                if pages.logical_size != ws.bytes() {
                    return Err(WorkingSetError::Invalid {
                        snapshot: id,
                        why: format!(
                            "its pages image has {} bytes, its runs {}",
                            pages.logical_size,
                            ws.bytes()
                        ),
                    }
                    .into());
                }
                Some((ws, MemoryImage::new(pages, store.clone())))
            }
            None => None,
        };
        Ok(ServedSnapshot {
            id,
            image: MemoryImage::new(manifest, store.clone()),
            layout,
            working_set,
        })
    }
}

/// What one resume did, for the operator.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct ResumeReport {
    pub snapshot: String,
    pub vmm_pid: Option<i32>,
    pub regions: Vec<GuestRegion>,
    /// From accepting the connection to a checked handshake.
    pub handshake_us: f64,
    /// From the checked handshake to the first fault answered.
    pub first_fault_us: Option<f64>,
    pub faults: u64,
    pub fault_p50_us: f64,
    pub fault_p99_us: f64,
    pub fault_max_us: f64,
    pub fault_bytes: u64,
    pub prefetch_bytes: u64,
    /// From the handshake to the last working-set page installed.
    pub prefetch_ms: Option<f64>,
    pub working_set_bytes: u64,
    pub zero_bytes: u64,
    pub already_present: u64,
    pub fault_on_prefetching: u64,
    pub retried_busy: u64,
    pub removed_pages: u64,
    pub remote_bytes: u64,
    pub recorded_runs: Option<usize>,
    pub recorded_bytes: Option<u64>,
    pub seconds: f64,
}

/// Serves one connection: handshake, faults until the VMM goes, report.
/// On failure the VMM is killed first if `cfg.kill_vmm_on_failure`.
pub fn serve_connection(
    snapshot: &ServedSnapshot,
    stream: UnixStream,
    cfg: &ServeConfig,
) -> Result<ResumeReport, ServeError> {
    let accepted = Instant::now();
    let pid = rustix::net::sockopt::socket_peercred(&stream)
        .ok()
        .map(|c| c.pid);
    let span = tracing::info_span!("resume", snapshot = %snapshot.id.short(), vmm_pid = pid.map(|p| p.as_raw_nonzero().get()));
    let _enter = span.enter();
    tracing::info!("a VMM connected");
    let result = handshake_and_serve(snapshot, &stream, cfg, accepted);
    match &result {
        Ok(r) => tracing::info!(faults = r.faults, "the VMM went away; resume done"),
        Err(e) => {
            tracing::error!(error = %DisplayChain(e), "the page server cannot go on");
            if cfg.kill_vmm_on_failure {
                if let Some(pid) = pid {
                    tracing::error!(
                        pid = pid.as_raw_nonzero().get(),
                        "killing the VMM, which would otherwise hang on its next fault"
                    );
                    let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
                }
            }
        }
    }
    result.map(|mut r| {
        r.vmm_pid = pid.map(|p| p.as_raw_nonzero().get());
        r
    })
}

/// An error with its causes, on one line.
pub struct DisplayChain<'a>(pub &'a (dyn std::error::Error + 'static));

impl std::fmt::Display for DisplayChain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)?;
        let mut cur = self.0.source();
        while let Some(e) = cur {
            write!(f, ": {e}")?;
            cur = e.source();
        }
        Ok(())
    }
}

fn handshake_and_serve(
    snapshot: &ServedSnapshot,
    stream: &UnixStream,
    cfg: &ServeConfig,
    accepted: Instant,
) -> Result<ResumeReport, ServeError> {
    let (json, fd) = handshake::receive(stream, cfg.handshake_timeout)?;
    let regions = handshake::parse_regions(&json, snapshot.image.size())?;
    // SAFETY: `fd` is the descriptor the VMM passed, owned by us from
    // `receive`; ownership moves into the Uffd, which closes it once.
    let uffd = unsafe { Uffd::from_raw_fd(File::into_raw_fd(fd)) };
    let layout_differs = regions.len() != snapshot.layout.regions.len()
        || regions
            .iter()
            .zip(&snapshot.layout.regions)
            .any(|(a, b)| a.offset != b.offset || a.size != b.size);
    if layout_differs {
        tracing::warn!(?regions, recorded = ?snapshot.layout.regions, "the VMM's regions differ from those recorded with the snapshot");
    }
    let handshake_done = Instant::now();
    let remote_before = snapshot
        .image
        .store()
        .stats()
        .remote_bytes
        .load(Ordering::Relaxed);
    let session = Session::new(snapshot, regions, uffd, cfg, handshake_done);
    let served = session.run(stream);
    let mut report = session.report();
    report.handshake_us = (handshake_done - accepted).as_secs_f64() * 1e6;
    report.remote_bytes = snapshot
        .image
        .store()
        .stats()
        .remote_bytes
        .load(Ordering::Relaxed)
        - remote_before;
    served?;
    if let Some(opts) = &cfg.record {
        let runs = session
            .recorded
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let bytes = runs.iter().map(PageRun::len).sum();
        if !runs.is_empty() {
            let (ws, _) = WorkingSet::record(snapshot.image.store(), &snapshot.image, runs, opts)?;
            tracing::info!(runs = ws.runs.len(), bytes, pages = %ws.pages.short(), "working set recorded");
            report.recorded_runs = Some(ws.runs.len());
        } else {
            report.recorded_runs = Some(0);
        }
        report.recorded_bytes = Some(bytes);
    }
    report.seconds = accepted.elapsed().as_secs_f64();
    Ok(report)
}

struct RegionState {
    r: GuestRegion,
    pages: PageStates,
}

/// One resume's shared state.
struct Session<'a> {
    snapshot: &'a ServedSnapshot,
    regions: Vec<RegionState>,
    uffd: Uffd,
    cfg: &'a ServeConfig,
    started: Instant,
    counters: Counters,
    latency: Mutex<Histogram>,
    first_fault: Mutex<Option<Duration>>,
    prefetch_done: Mutex<Option<Duration>>,
    recorded: Mutex<Vec<PageRun>>,
    /// The fault loop has events to handle: the prefetcher waits.
    faults_waiting: AtomicBool,
    /// Bumped each time the fault loop applies REMOVE events.
    remove_generation: AtomicU64,
    stop: AtomicBool,
    /// A page of zeros as large as the largest page.
    zeros: Vec<u8>,
}

impl<'a> Session<'a> {
    fn new(
        snapshot: &'a ServedSnapshot,
        regions: Vec<GuestRegion>,
        uffd: Uffd,
        cfg: &'a ServeConfig,
        started: Instant,
    ) -> Session<'a> {
        let largest = regions.iter().map(|r| r.page_size).max().unwrap_or(4096);
        Session {
            snapshot,
            regions: regions
                .into_iter()
                .map(|r| RegionState {
                    pages: PageStates::new(r.pages()),
                    r,
                })
                .collect(),
            uffd,
            cfg,
            started,
            counters: Counters::default(),
            latency: Mutex::new(Histogram::default()),
            first_fault: Mutex::new(None),
            prefetch_done: Mutex::new(None),
            recorded: Mutex::new(Vec::new()),
            faults_waiting: AtomicBool::new(false),
            remove_generation: AtomicU64::new(0),
            stop: AtomicBool::new(false),
            zeros: vec![0u8; largest as usize],
        }
    }

    fn report(&self) -> ResumeReport {
        let c = &self.counters;
        let h = self.latency.lock().unwrap_or_else(|p| p.into_inner());
        let ms = |d: Option<Duration>| d.map(|d| d.as_secs_f64() * 1e3);
        ResumeReport {
            snapshot: self.snapshot.id.to_hex(),
            regions: self.regions.iter().map(|r| r.r).collect(),
            first_fault_us: ms(*self.first_fault.lock().unwrap_or_else(|p| p.into_inner()))
                .map(|m| m * 1e3),
            faults: Counters::get(&c.faults),
            fault_p50_us: h.quantile_us(0.5),
            fault_p99_us: h.quantile_us(0.99),
            fault_max_us: h.max_us(),
            fault_bytes: Counters::get(&c.fault_bytes),
            prefetch_bytes: Counters::get(&c.prefetch_bytes),
            prefetch_ms: ms(*self.prefetch_done.lock().unwrap_or_else(|p| p.into_inner())),
            working_set_bytes: self
                .snapshot
                .working_set
                .as_ref()
                .map_or(0, |(ws, _)| ws.bytes()),
            zero_bytes: Counters::get(&c.zero_bytes),
            already_present: Counters::get(&c.already_present),
            fault_on_prefetching: Counters::get(&c.fault_on_prefetching),
            retried_busy: Counters::get(&c.retried_busy),
            removed_pages: Counters::get(&c.removed_pages),
            ..ResumeReport::default()
        }
    }

    /// Runs the fault loop (and the prefetch worker) until the VMM goes.
    fn run(&self, stream: &UnixStream) -> Result<(), ServeError> {
        std::thread::scope(|s| {
            let prefetcher = match (&self.snapshot.working_set, self.cfg.prefetch) {
                (Some((ws, pages)), true) => Some(s.spawn(move || {
                    if let Err(e) = self.prefetch(ws, pages) {
                        tracing::warn!(error = %DisplayChain(&e), "prefetch stopped; faults are still served on demand");
                    }
                })),
                _ => None,
            };
            let result = self.fault_loop(stream);
            self.stop.store(true, Ordering::Release);
            if let Some(p) = prefetcher {
                let _ = p.join();
            }
            result
        })
    }

    fn fault_loop(&self, stream: &UnixStream) -> Result<(), ServeError> {
        let mut hot = HotChunks::default();
        let mut events = EventBuffer::new(64);
        let mut queued: VecDeque<u64> = VecDeque::new();
        loop {
            let (uffd_ready, socket_ready) = if queued.is_empty() {
                self.faults_waiting.store(false, Ordering::Release);
                let mut fds = [
                    PollFd::new(&self.uffd, PollFlags::IN),
                    PollFd::new(stream, PollFlags::IN | PollFlags::RDHUP),
                ];
                match poll(&mut fds, None) {
                    Ok(_) => {}
                    Err(rustix::io::Errno::INTR) => continue,
                    Err(e) => return Err(ServeError::Uffd(e.into())),
                }
                (!fds[0].revents().is_empty(), !fds[1].revents().is_empty())
            } else {
                (false, false)
            };
            if socket_ready && vmm_gone(stream) {
                return Ok(());
            }
            if uffd_ready {
                self.faults_waiting.store(true, Ordering::Release);
                if self.read_events(&mut events, &mut queued)? {
                    return Ok(());
                }
            }
            while let Some(addr) = queued.pop_front() {
                if !self.serve_fault(&mut hot, &mut events, &mut queued, addr)? {
                    return Ok(());
                }
            }
        }
    }

    /// Reads pending events: REMOVEs are applied at once, faults queued.
    /// Returns true when the userfaultfd says the VMM is gone.
    fn read_events(
        &self,
        events: &mut EventBuffer,
        queued: &mut VecDeque<u64>,
    ) -> Result<bool, ServeError> {
        let read = match self.uffd.read_events(events) {
            Ok(read) => read,
            Err(userfaultfd::Error::ReadEof) => return Ok(true),
            Err(e) => return Err(ServeError::Uffd(io::Error::other(e.to_string()))),
        };
        let mut removed = false;
        for event in read {
            match event.map_err(|e| ServeError::Uffd(io::Error::other(e.to_string())))? {
                Event::Pagefault { addr, .. } => queued.push_back(addr as u64),
                Event::Remove { start, end } => {
                    self.apply_remove(start as u64, end as u64);
                    removed = true;
                }
                Event::Unmap { start, end } => {
                    tracing::warn!(
                        start = start as u64,
                        end = end as u64,
                        "the VMM unmapped guest memory"
                    );
                    self.apply_remove(start as u64, end as u64);
                    removed = true;
                }
                other => tracing::warn!(event = ?other, "unexpected userfaultfd event ignored"),
            }
        }
        if removed {
            self.remove_generation.fetch_add(1, Ordering::AcqRel);
        }
        Ok(false)
    }

    fn apply_remove(&self, start: u64, end: u64) {
        for rs in &self.regions {
            let (a, b) = (start.max(rs.r.base), end.min(rs.r.end()));
            if a < b {
                let ps = rs.r.page_size;
                let (first, last) = ((a - rs.r.base) / ps, (b - rs.r.base).div_ceil(ps));
                rs.pages.remove(first, last);
                self.counters
                    .removed_pages
                    .fetch_add(last - first, Ordering::Relaxed);
            }
        }
    }

    fn region_of(&self, addr: u64) -> Option<&RegionState> {
        let i = self.regions.partition_point(|rs| rs.r.end() <= addr);
        self.regions.get(i).filter(|rs| rs.r.contains(addr))
    }

    /// Answers one fault. Returns false when the VMM is gone.
    fn serve_fault(
        &self,
        hot: &mut HotChunks,
        events: &mut EventBuffer,
        queued: &mut VecDeque<u64>,
        addr: u64,
    ) -> Result<bool, ServeError> {
        let t = Instant::now();
        let rs = self
            .region_of(addr)
            .ok_or(ServeError::OutsideRegions { addr })?;
        let (r, ps) = (&rs.r, rs.r.page_size);
        let page = (addr - r.base) / ps;
        loop {
            let (first, end, zero) = if rs.pages.is_removed(page) {
                rs.pages.refill(page);
                (page, page + 1, true)
            } else {
                if rs.pages.is_present(page) {
                    self.counters
                        .fault_on_prefetching
                        .fetch_add(1, Ordering::Relaxed);
                }
                rs.pages.force(page);
                let (first, end) = self.claim_around(rs, page);
                (first, end, false)
            };
            let install = if zero {
                self.counters.zero_bytes.fetch_add(ps, Ordering::Relaxed);
                copy::zero(&self.uffd, r.base + page * ps, ps, ps, &self.zeros)
                    .map_err(ServeError::Uffd)?
            } else {
                self.install(
                    hot,
                    &self.snapshot.image,
                    r.offset + first * ps,
                    rs,
                    first,
                    end - first,
                )?
            };
            match install {
                Install::Done { existed } => {
                    let bytes = (end - first) * ps;
                    self.counters.faults.fetch_add(1, Ordering::Relaxed);
                    self.counters
                        .fault_bytes
                        .fetch_add(bytes - existed * ps, Ordering::Relaxed);
                    self.counters
                        .already_present
                        .fetch_add(existed, Ordering::Relaxed);
                    // A run another thread's fault had installed is not
                    // a first touch.
                    if self.cfg.record.is_some() && existed < end - first {
                        self.record(PageRun {
                            first: (r.offset + first * ps) / UNIT,
                            count: (bytes / UNIT) as u32,
                        });
                    }
                    break;
                }
                Install::Busy { done } => {
                    // Give back what was not installed, apply the pending
                    // events (faults among them wait their turn), retry.
                    self.counters.retried_busy.fetch_add(1, Ordering::Relaxed);
                    for p in first + done / ps..end {
                        if p != page {
                            rs.pages.unclaim(p);
                        }
                    }
                    if self.read_events(events, queued)? {
                        return Ok(false);
                    }
                }
                Install::Gone => return Ok(false),
            }
        }
        let took = t.elapsed();
        self.latency
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .record(took);
        let mut first = self.first_fault.lock().unwrap_or_else(|p| p.into_inner());
        if first.is_none() {
            *first = Some(self.started.elapsed());
        }
        Ok(true)
    }

    /// Claims the pages around `page` (already claimed) within its aligned
    /// run of `fault_bytes`: `[first, end)`.
    fn claim_around(&self, rs: &RegionState, page: u64) -> (u64, u64) {
        let per_run = (self.cfg.fault_bytes / rs.r.page_size).max(1);
        let w0 = page / per_run * per_run;
        let w1 = (w0 + per_run).min(rs.pages.pages());
        let mut first = page;
        while first > w0 && rs.pages.claim(first - 1) {
            first -= 1;
        }
        let mut end = page + 1;
        while end < w1 && rs.pages.claim(end) {
            end += 1;
        }
        (first, end)
    }

    fn record(&self, run: PageRun) {
        let mut runs = self.recorded.lock().unwrap_or_else(|p| p.into_inner());
        match runs.last_mut() {
            Some(last) if last.first + u64::from(last.count) == run.first => {
                last.count += run.count
            }
            _ => runs.push(run),
        }
    }

    /// Installs `pages` pages of region `rs` from `first`, taking their
    /// bytes from `image` at `src`.
    fn install(
        &self,
        hot: &mut HotChunks,
        image: &MemoryImage,
        src: u64,
        rs: &RegionState,
        first: u64,
        pages: u64,
    ) -> Result<Install, ServeError> {
        let ps = rs.r.page_size;
        let dst = rs.r.base + first * ps;
        let len = pages * ps;
        let store_err = |source| ServeError::Store {
            offset: src,
            source,
        };
        let mut existed = 0;
        let mut done = 0u64;
        while done < len {
            let at = src + done;
            let outcome = if ps > UNIT {
                // A huge page is one copy from contiguous bytes.
                if image.is_zero(at, ps) {
                    self.counters.zero_bytes.fetch_add(ps, Ordering::Relaxed);
                    copy::zero(&self.uffd, dst + done, ps, ps, &self.zeros)
                } else {
                    let mut bounce = vec![0u8; ps as usize];
                    image.read(hot, at, &mut bounce).map_err(store_err)?;
                    copy::copy(&self.uffd, dst + done, &bounce, ps)
                }
                .map(|i| (i, ps))
            } else {
                match image.segment(at, len - done) {
                    Segment::Zero { len: n } => {
                        self.counters.zero_bytes.fetch_add(n, Ordering::Relaxed);
                        copy::zero(&self.uffd, dst + done, n, ps, &self.zeros).map(|i| (i, n))
                    }
                    Segment::Data { id, at, len: n } => image
                        .with_segment(hot, &id, at, n, |bytes| {
                            copy::copy(&self.uffd, dst + done, bytes, ps)
                        })
                        .map_err(store_err)?
                        .map(|i| (i, n)),
                }
            };
            match outcome.map_err(ServeError::Uffd)? {
                (Install::Done { existed: e }, n) => {
                    existed += e;
                    done += n;
                }
                (Install::Busy { done: d }, _) => return Ok(Install::Busy { done: done + d }),
                (Install::Gone, _) => return Ok(Install::Gone),
            }
        }
        Ok(Install::Done { existed })
    }

    /// The prefetch worker: installs the working set in recorded order,
    /// fetching it a window ahead, giving way to faults.
    fn prefetch(&self, ws: &WorkingSet, pages: &MemoryImage) -> Result<(), ServeError> {
        let mut hot = HotChunks::default();
        let store = pages.store();
        let m = pages.manifest();
        let cs = u64::from(m.chunk_size);
        let window_chunks = (PREFETCH_WINDOW / cs).max(1) as usize;
        let ids = |from: usize| -> Vec<_> {
            m.chunks
                .iter()
                .skip(from)
                .take(window_chunks)
                .flatten()
                .copied()
                .collect()
        };
        store.prefetch(&ids(0));
        let mut fetched_to = 0usize; // chunks asked for beyond window 0
        let started = Instant::now();
        let mut installed = 0u64;
        let mut src = 0u64;
        for run in &ws.runs {
            if self.stop.load(Ordering::Acquire) {
                return Ok(());
            }
            // Keep one window in flight ahead of where we read.
            let chunk_now = (src / cs) as usize;
            if chunk_now + window_chunks > fetched_to {
                fetched_to = chunk_now + window_chunks;
                store.prefetch(&ids(fetched_to));
            }
            let mut off = run.offset();
            let end = run.offset() + run.len();
            while off < end {
                let Some(rs) = self
                    .regions
                    .iter()
                    .find(|rs| (rs.r.offset..rs.r.offset + rs.r.size).contains(&off))
                else {
                    // Recorded from another layout: skip what has no region.
                    off += UNIT;
                    continue;
                };
                let ps = rs.r.page_size;
                let piece_end = end.min(rs.r.offset + rs.r.size);
                let (p0, p1) = (
                    (off - rs.r.offset) / ps,
                    (piece_end - rs.r.offset).div_ceil(ps),
                );
                let ws_at = src + (off - run.offset());
                installed += self.prefetch_pages(&mut hot, pages, ws_at, rs, p0, p1)?;
                if self.stop.load(Ordering::Acquire) {
                    return Ok(());
                }
                if let Some(rate) = self.cfg.prefetch_rate {
                    let due = Duration::from_secs_f64(installed as f64 / rate as f64);
                    if let Some(wait) = due.checked_sub(started.elapsed()) {
                        std::thread::sleep(wait);
                    }
                }
                off = rs.r.offset + p1 * ps;
            }
            src += run.len();
        }
        *self.prefetch_done.lock().unwrap_or_else(|p| p.into_inner()) =
            Some(self.started.elapsed());
        Ok(())
    }

    /// Installs pages `[p0, p1)` of `rs` that are neither present nor
    /// removed, from the working-set image at `ws_at` (page `p0`'s bytes).
    /// Returns the bytes installed.
    fn prefetch_pages(
        &self,
        hot: &mut HotChunks,
        pages: &MemoryImage,
        ws_at: u64,
        rs: &RegionState,
        p0: u64,
        p1: u64,
    ) -> Result<u64, ServeError> {
        let ps = rs.r.page_size;
        let per_copy = (PREFETCH_COPY_BYTES / ps).max(1);
        let mut installed = 0;
        let mut p = p0;
        while p < p1 {
            // Skip what is there; claim a contiguous stretch.
            if !rs.pages.claim(p) {
                p += 1;
                continue;
            }
            let mut q = p + 1;
            while q < p1 && q - p < per_copy && rs.pages.claim(q) {
                q += 1;
            }
            {
                // Faults first: wait (briefly) while the fault loop has
                // work, so a prefetch copy does not compete with it. The
                // wait is bounded, or a guest faulting without pause would
                // starve the prefetch that is there to end its faults.
                let waited = Instant::now();
                while self.faults_waiting.load(Ordering::Acquire)
                    && waited.elapsed() < PREFETCH_MAX_YIELD
                {
                    if self.stop.load(Ordering::Acquire) {
                        return Ok(installed);
                    }
                    std::thread::yield_now();
                }
                let generation = self.remove_generation.load(Ordering::Acquire);
                match self.install(hot, pages, ws_at + (p - p0) * ps, rs, p, q - p)? {
                    Install::Done { existed } => {
                        let bytes = (q - p - existed) * ps;
                        self.counters
                            .already_present
                            .fetch_add(existed, Ordering::Relaxed);
                        self.counters
                            .prefetch_bytes
                            .fetch_add(bytes, Ordering::Relaxed);
                        installed += bytes;
                    }
                    Install::Busy { done } => {
                        // A REMOVE is pending: let the fault loop apply it,
                        // then install only what is still wanted.
                        self.counters.retried_busy.fetch_add(1, Ordering::Relaxed);
                        let resume = p + done / ps;
                        installed += done;
                        for x in resume..q {
                            rs.pages.unclaim(x);
                        }
                        let t = Instant::now();
                        while self.remove_generation.load(Ordering::Acquire) == generation
                            && t.elapsed() < Duration::from_millis(5)
                            && !self.stop.load(Ordering::Acquire)
                        {
                            std::thread::yield_now();
                        }
                        q = resume;
                    }
                    Install::Gone => {
                        self.stop.store(true, Ordering::Release);
                        return Ok(installed);
                    }
                }
            }
            p = q;
        }
        Ok(installed)
    }
}

/// Whether the VMM closed its end of the socket (it sends nothing after
/// the handshake; anything it does send is read and dropped).
fn vmm_gone(stream: &UnixStream) -> bool {
    let mut buf = [0u8; 512];
    let _ = stream.set_nonblocking(true);
    let gone = match (&*stream).read(&mut buf) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => e.kind() != io::ErrorKind::WouldBlock && e.kind() != io::ErrorKind::Interrupted,
    };
    let _ = stream.set_nonblocking(false);
    gone
}
