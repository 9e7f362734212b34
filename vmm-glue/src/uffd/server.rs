//! The page server: one VMM connection, its faults, its prefetch.
//!
//! The fault loop (the thread that accepted the connection) polls the
//! userfaultfd and the socket. Each missing-page fault is answered with
//! UFFDIO_COPY from the chunk that holds the page (in place from the
//! cache's mapping, CRC-checked), or UFFDIO_ZEROPAGE where the image is
//! zero, resolving an aligned run of up to `fault_bytes` around the
//! faulting page. REMOVE events mark pages as given back: they read as
//! zeros afterwards. Prefetch workers install the recorded working set in
//! recorded order meanwhile, without waking the guest; a fault on a page
//! they are about to install waits for them, and the fault loop wakes it
//! once they are well past it, so the guest runs through installed pages
//! instead of faulting on each next one. When the VMM goes away (the
//! socket closes, or its address space is gone) the resume ends with a
//! report. When the server cannot go on (the store stays down, the
//! userfaultfd fails) it says so and, unless told not to, kills the VMM,
//! which would otherwise hang on its next fault.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{FromRawFd, IntoRawFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cairn_engine::cache::HotChunks;
use cairn_engine::catalog::{self, CatalogError};
use cairn_engine::chunkstore::{ChunkStore, ChunkStoreError};
use cairn_engine::import::ImportOptions;
use cairn_engine::memory::working_set::{PageRun, RunIndex, WorkingSet, WorkingSetError, UNIT};
use cairn_engine::memory::{LayoutError, MemLayout, MemoryImage, Segment};
use cairn_engine::ManifestId;
use rustix::event::{poll, PollFd, PollFlags, Timespec};
use userfaultfd::{Event, EventBuffer, Uffd};

use super::copy::{self, Install};
use super::handshake::{self, GuestRegion, HandshakeError};
use super::pages::PageStates;
use super::stats::{Counters, Histogram};

/// How much one fault resolves by default: the aligned 64 KiB around the
/// page (README, "Memory snapshots", has the sweep behind it).
pub const DEFAULT_FAULT_BYTES: u64 = 64 << 10;
/// Prefetch workers by default (README, "Resume benchmark").
pub const DEFAULT_PREFETCH_WORKERS: usize = 2;
/// Working-set bytes fetched ahead of the prefetch worker.
const PREFETCH_WINDOW: u64 = 8 << 20;
/// The most one prefetch copy installs, so a fault never waits long.
const PREFETCH_COPY_BYTES: u64 = 256 << 10;
/// A fault on a working-set page at most this many working-set bytes ahead
/// of the prefetcher waits for the prefetcher's copy instead of being
/// copied by the fault loop: the prefetcher installs it within about a
/// millisecond, in larger copies, and the two do not compete for the CPU
/// (README, "Resume benchmark", has the measurements).
const PREFETCH_LEAD: u64 = 4 << 20;
/// Working-set bytes one prefetch worker takes before the next one's turn.
const PREFETCH_STRIPE: u64 = 1 << 20;
/// A thread whose page the prefetcher installed is woken once the
/// prefetcher is this many working-set bytes past it, so that it runs
/// through pages already there instead of faulting on the next one.
const PREFETCH_WAKE_AHEAD: u64 = 1 << 20;
/// The longest a fault waits for the prefetcher before it is served anyway.
const PREFETCH_MAX_WAIT: Duration = Duration::from_millis(2);

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
    /// Threads installing the working set side by side, each taking every
    /// n-th stripe of it.
    pub prefetch_workers: usize,
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
            prefetch_workers: DEFAULT_PREFETCH_WORKERS,
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
    pub working_set: Option<Recorded>,
}

/// A snapshot's recorded working set: its runs, the image holding their
/// bytes back to back, and the runs by snapshot offset.
#[derive(Clone)]
pub struct Recorded {
    pub set: WorkingSet,
    pub pages: MemoryImage,
    index: Arc<RunIndex>,
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
                Some(Recorded {
                    index: Arc::new(RunIndex::new(&ws)),
                    set: ws,
                    pages: MemoryImage::new(pages, store.clone()),
                })
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
    /// Faults on working-set pages just ahead of the prefetcher, left for
    /// its copy to resolve.
    pub faults_waited_for_prefetch: u64,
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

/// The image a fault copies from, the snapshot offsets it may cover and
/// how a snapshot offset maps into it.
struct FaultSource<'a> {
    image: &'a MemoryImage,
    bounds: (u64, u64),
    /// (snapshot offset, image offset) of one byte.
    shift: (u64, u64),
}

impl<'a> FaultSource<'a> {
    fn snapshot(s: &'a Session<'_>) -> FaultSource<'a> {
        FaultSource {
            image: &s.snapshot.image,
            bounds: (0, u64::MAX),
            shift: (0, 0),
        }
    }

    fn at(&self, snapshot_offset: u64) -> u64 {
        snapshot_offset - self.shift.0 + self.shift.1
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum WaitState {
    /// Its page is due from the prefetcher.
    Wait,
    /// Its page is there: wake the thread.
    Wake,
    /// The prefetcher will not bring it in time: serve it.
    Serve,
}

/// A fault left to the prefetcher: its page and where that page is in the
/// working set's order.
struct Waiting {
    addr: u64,
    page: u64,
    at: u64,
    since: Instant,
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
    /// Prefetch workers still running: faults may be left to them.
    prefetch_running: AtomicUsize,
    /// Per worker: working-set bytes before the run it is installing.
    prefetch_cursors: Vec<AtomicU64>,
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
            prefetch_running: AtomicUsize::new(0),
            prefetch_cursors: (0..cfg.prefetch_workers.max(1))
                .map(|_| AtomicU64::new(0))
                .collect(),
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
                .map_or(0, |w| w.set.bytes()),
            zero_bytes: Counters::get(&c.zero_bytes),
            already_present: Counters::get(&c.already_present),
            faults_waited_for_prefetch: Counters::get(&c.faults_waited_for_prefetch),
            retried_busy: Counters::get(&c.retried_busy),
            removed_pages: Counters::get(&c.removed_pages),
            ..ResumeReport::default()
        }
    }

    /// Runs the fault loop (and the prefetch worker) until the VMM goes.
    fn run(&self, stream: &UnixStream) -> Result<(), ServeError> {
        std::thread::scope(|s| {
            let workers = match (&self.snapshot.working_set, self.cfg.prefetch) {
                (Some(recorded), true) => {
                    let n = self.prefetch_cursors.len();
                    self.prefetch_running.store(n, Ordering::Release);
                    (0..n)
                        .map(|k| {
                            s.spawn(move || {
                                if let Err(e) = self.prefetch(&recorded.set, &recorded.pages, k) {
                                    tracing::warn!(error = %DisplayChain(&e), "prefetch stopped; faults are still served on demand");
                                }
                                if self.prefetch_running.fetch_sub(1, Ordering::AcqRel) == 1 {
                                    *self.prefetch_done.lock().unwrap_or_else(|p| p.into_inner()) =
                                        Some(self.started.elapsed());
                                }
                            })
                        })
                        .collect()
                }
                _ => Vec::new(),
            };
            let result = self.fault_loop(stream);
            self.stop.store(true, Ordering::Release);
            for w in workers {
                let _ = w.join();
            }
            result
        })
    }

    fn fault_loop(&self, stream: &UnixStream) -> Result<(), ServeError> {
        let mut hot = HotChunks::default();
        let mut events = EventBuffer::new(64);
        let mut queued: VecDeque<u64> = VecDeque::new();
        let mut waiting: Vec<Waiting> = Vec::new();
        // While faults wait for the prefetcher, look at them this often.
        let recheck = Timespec {
            tv_sec: 0,
            tv_nsec: 100_000,
        };
        loop {
            let (uffd_ready, socket_ready) = if queued.is_empty() {
                self.faults_waiting.store(false, Ordering::Release);
                let mut fds = [
                    PollFd::new(&self.uffd, PollFlags::IN),
                    PollFd::new(stream, PollFlags::IN | PollFlags::RDHUP),
                ];
                match poll(&mut fds, (!waiting.is_empty()).then_some(&recheck)) {
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
                if let Some(w) = self.leave_to_prefetch(addr) {
                    waiting.push(w);
                } else if !self.serve_fault(&mut hot, &mut events, &mut queued, addr)? {
                    return Ok(());
                }
            }
            let mut i = 0;
            while i < waiting.len() {
                let state = self.waiting_state(&waiting[i]);
                if state == WaitState::Wait {
                    i += 1;
                    continue;
                }
                let w = waiting.swap_remove(i);
                if state == WaitState::Serve {
                    if !self.serve_fault(&mut hot, &mut events, &mut queued, w.addr)? {
                        return Ok(());
                    }
                    continue;
                }
                let ps = self.region_of(w.addr).map_or(UNIT, |rs| rs.r.page_size);
                if let Err(e) = self
                    .uffd
                    .wake((w.addr & !(ps - 1)) as *mut libc::c_void, ps as usize)
                {
                    tracing::warn!(error = %e, addr = w.addr, "waking a faulting thread failed");
                }
                self.counters
                    .faults_waited_for_prefetch
                    .fetch_add(1, Ordering::Relaxed);
                self.fault_served(w.since);
            }
        }
    }

    /// A fault to leave to the prefetcher: a working-set page it is about
    /// to install or is installing (its copies do not wake the guest: the
    /// fault loop does, see [`Session::waiting_state`]).
    fn leave_to_prefetch(&self, addr: u64) -> Option<Waiting> {
        if self.prefetch_running.load(Ordering::Acquire) == 0 {
            return None;
        }
        let rs = self.region_of(addr)?;
        let (r, ps) = (&rs.r, rs.r.page_size);
        let page = (addr - r.base) / ps;
        if rs.pages.is_removed(page) {
            return None;
        }
        let off = r.offset + page * ps;
        let (run, ws_at) = self.prefetching()?.index.find(off, ps)?;
        let at = ws_at + (off - run.offset());
        let cursor = self.prefetch_cursor();
        (rs.pages.is_present(page) || (cursor..cursor + PREFETCH_LEAD).contains(&at)).then(|| {
            Waiting {
                addr,
                page,
                at,
                since: Instant::now(),
            }
        })
    }

    /// How far every prefetch worker has come: what lies before this in
    /// the working set is installed or being installed.
    fn prefetch_cursor(&self) -> u64 {
        self.prefetch_cursors
            .iter()
            .map(|c| c.load(Ordering::Acquire))
            .min()
            .unwrap_or(u64::MAX)
    }

    /// Where a fault left to the prefetcher stands.
    fn waiting_state(&self, w: &Waiting) -> WaitState {
        let Some(rs) = self.region_of(w.addr) else {
            return WaitState::Serve;
        };
        let running =
            self.prefetch_running.load(Ordering::Acquire) > 0 && self.prefetching().is_some();
        let cursor = self.prefetch_cursor();
        let overdue = w.since.elapsed() >= PREFETCH_MAX_WAIT;
        if rs.pages.is_present(w.page) {
            // Installed (or being installed) without a wake-up: wake the
            // thread once the prefetcher is far enough ahead that it runs
            // a while before faulting again.
            if !running || overdue || cursor >= w.at.saturating_add(PREFETCH_WAKE_AHEAD) {
                WaitState::Wake
            } else {
                WaitState::Wait
            }
        } else if running && cursor <= w.at && !overdue {
            WaitState::Wait
        } else {
            WaitState::Serve
        }
    }

    /// Counts a fault answered `since` then in the latency histogram and
    /// notes the first one.
    fn fault_served(&self, since: Instant) {
        self.latency
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .record(since.elapsed());
        let mut first = self.first_fault.lock().unwrap_or_else(|p| p.into_inner());
        if first.is_none() {
            *first = Some(self.started.elapsed());
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
            let mut src = FaultSource::snapshot(self);
            let (first, end, zero) = if rs.pages.is_removed(page) {
                rs.pages.refill(page);
                (page, page + 1, true)
            } else {
                rs.pages.force(page);
                src = self.source_of(r.offset + page * ps, ps);
                let (first, end) = self.claim_around(rs, page, src.bounds);
                (first, end, false)
            };
            let install = if zero {
                self.counters.zero_bytes.fetch_add(ps, Ordering::Relaxed);
                copy::zero(&self.uffd, r.base + page * ps, ps, ps, &self.zeros, true)
                    .map_err(ServeError::Uffd)?
            } else {
                let at = src.at(r.offset + first * ps);
                self.install(hot, src.image, at, rs, first, end - first, true)?
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
        self.fault_served(t);
        Ok(true)
    }

    /// Claims the pages around `page` (already claimed) within its aligned
    /// run of `fault_bytes` and within the snapshot offsets `bounds`:
    /// `[first, end)`.
    fn claim_around(&self, rs: &RegionState, page: u64, bounds: (u64, u64)) -> (u64, u64) {
        let ps = rs.r.page_size;
        let per_run = (self.cfg.fault_bytes / ps).max(1);
        let in_bounds = |off: u64| off.saturating_sub(rs.r.offset) / ps;
        let w0 = (page / per_run * per_run).max(in_bounds(bounds.0.div_ceil(ps) * ps));
        let w1 = (page / per_run * per_run + per_run)
            .min(rs.pages.pages())
            .min(in_bounds(bounds.1));
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

    /// Where a fault at snapshot offset `off` takes its bytes from: the
    /// recorded working set's pages when prefetch is on and `off` is in a
    /// recorded run (those bytes are fetched, or being fetched, already,
    /// and the run bounds the copy to pages the guest will touch), else
    /// the snapshot itself.
    fn source_of(&self, off: u64, len: u64) -> FaultSource<'_> {
        if let Some(recorded) = self.prefetching() {
            if let Some((run, ws_at)) = recorded.index.find(off, len) {
                return FaultSource {
                    image: &recorded.pages,
                    bounds: (run.offset(), run.offset() + run.len()),
                    shift: (run.offset(), ws_at),
                };
            }
        }
        FaultSource::snapshot(self)
    }

    fn prefetching(&self) -> Option<&Recorded> {
        self.snapshot
            .working_set
            .as_ref()
            .filter(|_| self.cfg.prefetch)
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
    /// bytes from `image` at `src`; with `wake`, wakes threads faulting
    /// there (the prefetcher leaves that to the fault loop, in batches).
    #[allow(clippy::too_many_arguments)]
    fn install(
        &self,
        hot: &mut HotChunks,
        image: &MemoryImage,
        src: u64,
        rs: &RegionState,
        first: u64,
        pages: u64,
        wake: bool,
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
                    copy::zero(&self.uffd, dst + done, ps, ps, &self.zeros, wake)
                } else {
                    let mut bounce = vec![0u8; ps as usize];
                    image.read(hot, at, &mut bounce).map_err(store_err)?;
                    copy::copy(&self.uffd, dst + done, &bounce, ps, wake)
                }
                .map(|i| (i, ps))
            } else {
                match image.segment(at, len - done) {
                    Segment::Zero { len: n } => {
                        self.counters.zero_bytes.fetch_add(n, Ordering::Relaxed);
                        copy::zero(&self.uffd, dst + done, n, ps, &self.zeros, wake).map(|i| (i, n))
                    }
                    Segment::Data { id, at, len: n } => image
                        .with_segment(hot, &id, at, n, |bytes| {
                            copy::copy(&self.uffd, dst + done, bytes, ps, wake)
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

    /// Prefetch worker `worker`: installs its stripes of the working set
    /// (every n-th [`PREFETCH_STRIPE`] of it) in recorded order, fetching
    /// a window ahead, giving way to faults.
    fn prefetch(
        &self,
        ws: &WorkingSet,
        pages: &MemoryImage,
        worker: usize,
    ) -> Result<(), ServeError> {
        let workers = self.prefetch_cursors.len() as u64;
        let cursor = &self.prefetch_cursors[worker];
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
            if (src / PREFETCH_STRIPE) % workers != worker as u64 {
                src += run.len();
                continue;
            }
            cursor.store(src, Ordering::Release);
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
                installed += self.prefetch_pages(&mut hot, pages, ws_at, rs, (p0, p1), cursor)?;
                if self.stop.load(Ordering::Acquire) {
                    return Ok(());
                }
                if let Some(rate) = self.cfg.prefetch_rate {
                    let share = rate as f64 / workers as f64;
                    let due = Duration::from_secs_f64(installed as f64 / share);
                    if let Some(wait) = due.checked_sub(started.elapsed()) {
                        std::thread::sleep(wait);
                    }
                }
                off = rs.r.offset + p1 * ps;
            }
            src += run.len();
        }
        cursor.store(u64::MAX, Ordering::Release);
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
        (p0, p1): (u64, u64),
        cursor: &AtomicU64,
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
                // Faults first: when the fault loop has work, give it the
                // CPU once before copying. No more than that: a guest
                // faulting without pause would starve the prefetch that is
                // there to end its faults.
                if self.faults_waiting.load(Ordering::Acquire) {
                    std::thread::yield_now();
                }
                let generation = self.remove_generation.load(Ordering::Acquire);
                let installed_now = self
                    .install(hot, pages, ws_at + (p - p0) * ps, rs, p, q - p, false)
                    .inspect_err(|_| self.give_back(rs, p, q))?;
                match installed_now {
                    Install::Done { existed } => {
                        cursor.store(ws_at + (q - p0) * ps, Ordering::Release);
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

    /// Gives back the prefetcher's claim on pages `[p, q)` it could not
    /// install, and wakes any guest thread the fault loop left waiting on
    /// them: it faults again and is served on demand.
    fn give_back(&self, rs: &RegionState, p: u64, q: u64) {
        for x in p..q {
            rs.pages.unclaim(x);
        }
        let ps = rs.r.page_size;
        let (start, len) = (rs.r.base + p * ps, (q - p) * ps);
        if let Err(e) = self.uffd.wake(start as *mut libc::c_void, len as usize) {
            tracing::warn!(error = %e, start, len, "waking guest threads failed");
        }
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
