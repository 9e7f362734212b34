//! The fault loop: the thread that answers the guest.
//!
//! It polls the userfaultfd, the VMM's pidfd and the stop requests. Each
//! missing-page fault is answered with UFFDIO_COPY from the chunk that
//! holds the page (in place from the cache's mapping, CRC-checked), or
//! UFFDIO_ZEROPAGE where the image is zero, resolving an aligned run of up
//! to `fault_bytes` around the faulting page; or it is left to the prefetch
//! workers and woken once its page is there ([`Handoff::decide`]). REMOVE
//! events mark pages as given back: they read as zeros afterwards. The
//! resume ends when the VMM process exits, a copy finds its address space
//! gone, or a stop is requested; the socket closing means nothing
//! (Firecracker before 1.12 closes it right after the handshake).
//!
//! [`Handoff::decide`]: super::handoff::Handoff::decide

use std::collections::VecDeque;
use std::io;
use std::sync::atomic::Ordering;
use std::time::Instant;

use cairn_engine::cache::HotChunks;
use cairn_engine::memory::working_set::{PageRun, UNIT};
use cairn_engine::memory::MemoryImage;
use rustix::event::{poll, PollFd, PollFlags, Timespec};
use userfaultfd::{Event, EventBuffer};

use super::copy::{self, Install};
use super::handoff::{Decision, Place};
use super::inject::InjectionPoint;
use super::server::ServeError;
use super::session::{Copier, End, RegionState, Session};

/// While faults wait for the prefetcher, look at them this often.
const RECHECK: Timespec = Timespec {
    tv_sec: 0,
    tv_nsec: 100_000,
};

/// A fault not yet answered: its page and where that page is in the
/// working set's order.
struct Waiting {
    addr: u64,
    place: Option<Place>,
    since: Instant,
}

/// The image a fault copies from, the snapshot offsets it may cover and
/// how a snapshot offset maps into it.
struct FaultSource<'a> {
    image: &'a MemoryImage,
    bounds: (u64, u64),
    /// (snapshot offset, image offset) of one point.
    shift: (u64, u64),
    working_set: bool,
}

impl FaultSource<'_> {
    fn at(&self, snapshot_offset: u64) -> u64 {
        snapshot_offset - self.shift.0 + self.shift.1
    }
}

impl Session<'_> {
    /// Answers faults until the resume ends.
    pub(super) fn fault_loop(&self) -> Result<End, ServeError> {
        let mut hot = HotChunks::default();
        let mut events = EventBuffer::new(64);
        let mut queued: VecDeque<u64> = VecDeque::new();
        let mut waiting: Vec<Waiting> = Vec::new();
        loop {
            if queued.is_empty() {
                self.faults_waiting.store(false, Ordering::Release);
                let exit = self.vmm.exit_fd();
                let mut fds = [
                    PollFd::new(self.uffd, PollFlags::IN),
                    PollFd::new(self.stop, PollFlags::IN),
                    PollFd::new(&self.gone, PollFlags::IN),
                    // Without a pidfd, the stop request a second time.
                    match &exit {
                        Some(fd) => PollFd::new(fd, PollFlags::IN),
                        None => PollFd::new(self.stop, PollFlags::IN),
                    },
                ];
                match poll(&mut fds, (!waiting.is_empty()).then_some(&RECHECK)) {
                    Ok(_) => {}
                    Err(rustix::io::Errno::INTR) => continue,
                    Err(e) => return Err(ServeError::Uffd(e.into())),
                }
                let ready = |i: usize| !fds[i].revents().is_empty();
                if ready(1) {
                    return Ok(End::Stopped);
                }
                if ready(2) {
                    return Ok(End::AddressSpaceGone);
                }
                if exit.is_some() && ready(3) {
                    return Ok(End::VmmExited);
                }
                if ready(0) {
                    self.faults_waiting.store(true, Ordering::Release);
                    if self.read_events(&mut events, &mut queued)? {
                        return Ok(End::AddressSpaceGone);
                    }
                }
            }
            while let Some(addr) = queued.pop_front() {
                let w = self.waiting(addr);
                if !self.settle(&mut hot, &mut events, &mut queued, w, &mut waiting)? {
                    return Ok(End::AddressSpaceGone);
                }
            }
            for w in std::mem::take(&mut waiting) {
                if !self.settle(&mut hot, &mut events, &mut queued, w, &mut waiting)? {
                    return Ok(End::AddressSpaceGone);
                }
            }
        }
    }

    /// A fault just read, with its page's place in the working set.
    fn waiting(&self, addr: u64) -> Waiting {
        let place = self.region_of(addr).and_then(|rs| {
            let ps = rs.r.page_size;
            let off = rs.r.offset + (addr - rs.r.base) / ps * ps;
            let (run, run_at) = self.prefetching()?.index.find(off, ps)?;
            Some(Place {
                at: run_at + (off - run.offset()),
                run_at,
            })
        });
        Waiting {
            addr,
            place,
            since: Instant::now(),
        }
    }

    /// Waits, wakes or serves fault `w` as the handoff decides. Returns
    /// false when the VMM is gone.
    fn settle(
        &self,
        hot: &mut HotChunks,
        events: &mut EventBuffer,
        queued: &mut VecDeque<u64>,
        w: Waiting,
        waiting: &mut Vec<Waiting>,
    ) -> Result<bool, ServeError> {
        let Some(rs) = self.region_of(w.addr) else {
            return Err(ServeError::OutsideRegions { addr: w.addr });
        };
        let ps = rs.r.page_size;
        let page = (w.addr - rs.r.base) / ps;
        match self
            .handoff
            .decide(rs.pages.state(page), w.place, w.since.elapsed())
        {
            Decision::Wait => waiting.push(w),
            Decision::Wake => {
                let start = rs.r.base + page * ps;
                if let Err(e) = self.uffd.wake(start as *mut libc::c_void, ps as usize) {
                    tracing::warn!(error = %e, addr = w.addr, "waking a faulting thread failed");
                }
                self.counters
                    .faults_waited_for_prefetch
                    .fetch_add(1, Ordering::Relaxed);
                self.fault_served(w.since);
            }
            Decision::Serve => return self.serve_fault(hot, events, queued, rs, page, w.since),
        }
        Ok(true)
    }

    /// Reads pending events: REMOVEs are applied at once, faults queued.
    /// Holds `events` exclusively meanwhile (see [`super::session`]).
    /// Returns true when the userfaultfd says the VMM is gone.
    fn read_events(
        &self,
        events: &mut EventBuffer,
        queued: &mut VecDeque<u64>,
    ) -> Result<bool, ServeError> {
        let _exclusive = self.events.write().unwrap_or_else(|p| p.into_inner());
        let read = match self.uffd.read_events(events) {
            Ok(read) => read,
            Err(userfaultfd::Error::ReadEof) => return Ok(true),
            Err(e) => return Err(ServeError::Uffd(io::Error::other(e.to_string()))),
        };
        let mut removed = false;
        for event in read {
            match event.map_err(|e| ServeError::Uffd(io::Error::other(e.to_string())))? {
                Event::Pagefault { addr, .. } => {
                    if let Some(a) = &self.cfg.activity {
                        a.touch();
                    }
                    queued.push_back(addr as u64)
                }
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

    /// Answers the fault on `page` of `rs`. Returns false when the VMM is gone.
    fn serve_fault(
        &self,
        hot: &mut HotChunks,
        events: &mut EventBuffer,
        queued: &mut VecDeque<u64>,
        rs: &RegionState,
        page: u64,
        since: Instant,
    ) -> Result<bool, ServeError> {
        let (r, ps) = (&rs.r, rs.r.page_size);
        self.cfg.fault_injector.at(InjectionPoint::Fault {
            offset: r.offset + page * ps,
        });
        loop {
            rs.pages.force(page);
            let (first, end, install) = if rs.pages.is_removed(page) {
                self.counters.zero_bytes.fetch_add(ps, Ordering::Relaxed);
                let zeroed = copy::zero(self.uffd, r.base + page * ps, ps, ps, &self.zeros, true)
                    .map_err(ServeError::Uffd)?;
                (page, page + 1, zeroed)
            } else {
                let src = self.source_of(r.offset + page * ps, ps);
                let (first, end) = self.claim_around(rs, page, src.bounds);
                let at = src.at(r.offset + first * ps);
                match self.install(hot, src.image, at, rs, first, end - first, Copier::Fault) {
                    Ok(install) => (first, end, install),
                    Err(e @ ServeError::Store { .. }) if src.working_set => {
                        // The snapshot has the same bytes: serve from it.
                        self.prefetch_stopped(
                            format!(
                                "reading the working set failed: {}",
                                super::DisplayChain(&e)
                            ),
                            true,
                        );
                        self.give_back(rs, first, end, page, 0);
                        continue;
                    }
                    Err(e) => return Err(e),
                }
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
                Install::Busy { done, existed } => {
                    // Count what was installed, give back the rest, apply
                    // the pending events (faults among them wait their
                    // turn), retry.
                    self.counters.retried_busy.fetch_add(1, Ordering::Relaxed);
                    self.counters
                        .fault_bytes
                        .fetch_add(done - existed * ps, Ordering::Relaxed);
                    self.give_back(rs, first, end, page, done / ps);
                    if self.read_events(events, queued)? {
                        return Ok(false);
                    }
                }
                Install::Gone => return Ok(false),
            }
        }
        self.fault_served(since);
        Ok(true)
    }

    /// Gives back the claims on pages `[first + done, end)` but `page`'s.
    fn give_back(&self, rs: &RegionState, first: u64, end: u64, page: u64, done: u64) {
        for p in first + done..end {
            if p != page {
                rs.pages.unclaim(p);
            }
        }
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
                    working_set: true,
                };
            }
        }
        FaultSource {
            image: &self.snapshot.image,
            bounds: (0, u64::MAX),
            shift: (0, 0),
            working_set: false,
        }
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
}
