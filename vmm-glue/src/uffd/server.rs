//! One VMM connection from accept to report: who the VMM is (a pidfd), the
//! handshake, the session ([`super::session`]), its end, the recording.
//!
//! When the server cannot go on (the store stays down, the userfaultfd
//! fails, it panics) or is stopped while the VMM runs, it kills the VMM
//! first, unless told not to, then closes its userfaultfd
//! ([`super::vmm::VmmGuard`]): the VMM would otherwise hang on its next
//! fault.

use std::io;
use std::num::NonZeroU64;
use std::os::unix::net::UnixStream;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cairn_engine::catalog::CatalogError;
use cairn_engine::chunkstore::ChunkStoreError;
use cairn_engine::import::ImportOptions;
use cairn_engine::memory::working_set::{PageRun, WorkingSet, WorkingSetError};
use cairn_engine::memory::LayoutError;

use super::handshake::{self, HandshakeError};
use super::inject::FaultInjector;
use super::report::ResumeReport;
use super::session::{End, Session};
use super::snapshot::ServedSnapshot;
use super::stop::Stop;
use super::vmm::{VmmGuard, VmmProcess};
use crate::activity::Activity;

/// How much one fault resolves by default: the aligned 64 KiB around the
/// page (README, "Memory snapshots", has the sweep behind it).
pub const DEFAULT_FAULT_BYTES: u64 = 64 << 10;
/// Prefetch workers by default (README, "Resume benchmark").
pub const DEFAULT_PREFETCH_WORKERS: usize = 2;

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("handshake failed")]
    Handshake(#[from] HandshakeError),
    #[error("fault at {addr:#x} is outside every region the VMM described")]
    OutsideRegions { addr: u64 },
    #[error("cannot read {what} at offset {offset}")]
    Store {
        /// The snapshot, or the working set's pages.
        what: &'static str,
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

/// How the server behaves; every field but the injector is a knob of
/// `cairn mem serve`.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// Bytes one fault resolves: the aligned run around the faulting page
    /// (at least one page).
    pub fault_bytes: u64,
    /// Install the recorded working set ahead of the guest.
    pub prefetch: bool,
    /// Prefetch at most this many bytes a second (None: as fast as faults allow).
    pub prefetch_rate: Option<NonZeroU64>,
    /// Threads installing the working set side by side, each taking every
    /// n-th stripe of it.
    pub prefetch_workers: usize,
    /// Record the pages this resume touches and store them as the
    /// snapshot's working set (staged through these options).
    pub record: Option<ImportOptions>,
    /// Kill the VMM (SIGKILL) when the resume ends while it still runs:
    /// the server failed, panicked or was stopped.
    pub kill_vmm: bool,
    pub handshake_timeout: Duration,
    /// Touched by every page fault (the daemon's idle suspend).
    pub activity: Option<Arc<Activity>>,
    /// Test-only: see [`FaultInjector`].
    pub fault_injector: FaultInjector,
}

impl Default for ServeConfig {
    fn default() -> ServeConfig {
        ServeConfig {
            fault_bytes: DEFAULT_FAULT_BYTES,
            prefetch: true,
            prefetch_rate: None,
            prefetch_workers: DEFAULT_PREFETCH_WORKERS,
            record: None,
            kill_vmm: true,
            handshake_timeout: Duration::from_secs(10),
            activity: None,
            fault_injector: FaultInjector::default(),
        }
    }
}

/// Serves one connection: handshake, faults until the VMM goes (or `stop`
/// is requested), report. When it ends with the VMM still there (an
/// error, a panic, a stop) the VMM is killed first if `cfg.kill_vmm`.
pub fn serve_connection(
    snapshot: &ServedSnapshot,
    stream: UnixStream,
    cfg: &ServeConfig,
    stop: &Stop,
) -> Result<ResumeReport, ServeError> {
    let accepted = Instant::now();
    let vmm = VmmProcess::of_peer(&stream);
    let span = tracing::info_span!("resume", snapshot = %snapshot.id.short(), vmm_pid = vmm.pid());
    let _enter = span.enter();
    tracing::info!("a VMM connected");
    let mut guard = VmmGuard::new(vmm, cfg.kill_vmm);
    let result = serve_guarded(snapshot, &stream, cfg, stop, &mut guard, accepted);
    match &result {
        Ok(r) => tracing::info!(faults = r.faults, end = ?r.end, "resume done"),
        Err(e) => tracing::error!(error = %DisplayChain(e), "the page server cannot go on"),
    }
    result
}

/// An error with its causes, on one line (the engine's).
pub use cairn_engine::error::DisplayChain;

fn serve_guarded(
    snapshot: &ServedSnapshot,
    stream: &UnixStream,
    cfg: &ServeConfig,
    stop: &Stop,
    guard: &mut VmmGuard,
    accepted: Instant,
) -> Result<ResumeReport, ServeError> {
    let (json, fd) = handshake::receive(stream, cfg.handshake_timeout)?;
    guard.adopt(fd).map_err(ServeError::Uffd)?;
    let regions = handshake::parse_regions(&json, snapshot.image.size())?;
    let layout_differs = regions.len() != snapshot.layout.regions.len()
        || regions
            .iter()
            .zip(&snapshot.layout.regions)
            .any(|(a, b)| a.offset != b.offset || a.size != b.size);
    if layout_differs {
        tracing::warn!(?regions, recorded = ?snapshot.layout.regions, "the VMM's regions differ from those recorded with the snapshot");
    }
    let remote_bytes = || {
        snapshot
            .image
            .store()
            .stats()
            .remote_bytes
            .load(Ordering::Relaxed)
    };
    let remote_before = remote_bytes();
    let uffd = guard
        .uffd()
        .ok_or_else(|| ServeError::Uffd(io::Error::other("no userfaultfd")))?;
    let session = Session::new(snapshot, regions, uffd, guard.vmm(), cfg, stop)?;
    let handshake_us = (session.started - accepted).as_secs_f64() * 1e6;
    let end = session.run()?;
    let mut report = session.report();
    let runs = std::mem::take(&mut *session.recorded.lock().unwrap_or_else(|p| p.into_inner()));
    drop(session);
    if end != End::Stopped {
        guard.disarm();
    }
    // Kill (if still armed) and close the userfaultfd before recording,
    // which takes a while.
    guard.end();
    report.end = Some(end);
    report.handshake_us = handshake_us;
    report.remote_bytes = remote_bytes() - remote_before;
    if let Some(opts) = &cfg.record {
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
