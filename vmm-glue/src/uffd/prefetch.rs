//! Prefetch workers: the recorded working set installed ahead of the guest.
//!
//! Each worker takes every n-th stripe of the working set
//! ([`Handoff::owner`]) and installs its runs in recorded order, fetching
//! the working set's image a window ahead, claiming each contiguous
//! stretch of pages before one UFFDIO_COPY (up to 256 KiB) that does not
//! wake the guest (the fault loop does, see [`super::handoff`]). Only whole
//! pages a run covers are installed, from their own bytes: a 2 MiB page a
//! run covers in part (a working set recorded with 4 KiB pages, served to
//! huge pages) is left to faults, which copy it whole from the snapshot.
//!
//! A worker gives its claims back however a stretch ends (an error, a
//! panic), tells the handoff it stopped whatever happened, and looks at
//! the halt flag between stretches. An error reading the working set's
//! image stops every worker and turns faults to the snapshot.
//!
//! [`Handoff::owner`]: super::handoff::Handoff::owner

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use cairn_engine::cache::HotChunks;
use cairn_engine::memory::MemoryImage;

use super::copy::Install;
use super::inject::InjectionPoint;
use super::pages::PageStates;
use super::server::{DisplayChain, ServeError};
use super::session::{Copier, RegionState, Session};
use super::snapshot::Recorded;

/// Working-set bytes fetched ahead of a prefetch worker.
const PREFETCH_WINDOW: u64 = 8 << 20;
/// The most one prefetch copy installs, so a fault never waits long.
const PREFETCH_COPY_BYTES: u64 = 256 << 10;
/// Prefetch workers run at this nice value, below the fault loop and the
/// guest's vCPUs: with two workers on a two-core host, a first fault
/// waited up to 8 ms for a CPU at nice 0, under 1 ms at 5 (README, "Resume
/// benchmark").
const PREFETCH_NICE: i32 = 5;
/// The longest a rate-limited worker sleeps before looking at the halt flag.
const PACE_SLICE: Duration = Duration::from_millis(5);

/// Claims on pages `[from, to)` of a region not yet installed: given back
/// when dropped, so a stretch that ends in an error or a panic leaves no
/// page claimed that nobody will install.
struct Claims<'r> {
    pages: &'r PageStates,
    from: u64,
    to: u64,
}

impl Claims<'_> {
    /// Pages before `page` are settled (installed, or found there).
    fn settled_to(&mut self, page: u64) {
        self.from = self.from.max(page.min(self.to));
    }
}

impl Drop for Claims<'_> {
    fn drop(&mut self) {
        for p in self.from..self.to {
            self.pages.unclaim(p);
        }
    }
}

/// Tells the handoff that worker `k` stopped, however it stopped.
struct Finished<'s, 'a> {
    session: &'s Session<'a>,
    k: usize,
}

impl Drop for Finished<'_, '_> {
    fn drop(&mut self) {
        let s = self.session;
        if std::thread::panicking() {
            s.prefetch_stopped(format!("prefetch worker {} panicked", self.k), false);
        }
        if s.handoff.finish(self.k) {
            let _ = s.prefetch_done.set(s.started.elapsed());
        }
    }
}

/// Where a worker is and what it has done, for pacing.
struct Progress {
    started: Instant,
    installed: u64,
}

impl Session<'_> {
    /// Prefetch worker `k`, run on its own thread.
    pub(super) fn prefetch_worker(&self, recorded: &Recorded, k: usize) {
        let _finished = Finished { session: self, k };
        // On Linux this thread's own nice value (any thread may lower its
        // priority): a fault, a vCPU that cannot run, goes first.
        if let Err(e) = rustix::process::setpriority_process(None, PREFETCH_NICE) {
            tracing::debug!(error = %e, "lowering a prefetch worker's priority failed");
        }
        if let Err(e) = self.prefetch(recorded, k) {
            let unreadable = matches!(e, ServeError::Store { .. });
            let what = if unreadable {
                "reading the working set failed"
            } else {
                "installing failed"
            };
            self.prefetch_stopped(
                format!("prefetch worker {k}: {what}: {}", DisplayChain(&e)),
                unreadable,
            );
        }
    }

    fn halted(&self) -> bool {
        self.halt.load(Ordering::Acquire) || self.working_set_failed.load(Ordering::Acquire)
    }

    fn prefetch(&self, recorded: &Recorded, k: usize) -> Result<(), ServeError> {
        let pages = &recorded.pages;
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
        let mut progress = Progress {
            started: Instant::now(),
            installed: 0,
        };
        let mut src = 0u64;
        for run in &recorded.set.runs {
            let run_at = src;
            src += run.len();
            if self.handoff.owner(run_at) != k {
                continue;
            }
            if self.halted() {
                return Ok(());
            }
            self.handoff.advance(k, run_at);
            // Keep one window in flight ahead of where we read.
            let chunk_now = (run_at / cs) as usize;
            if chunk_now + window_chunks > fetched_to {
                fetched_to = chunk_now + window_chunks;
                store.prefetch(&ids(fetched_to));
            }
            let (mut off, end) = (run.offset(), run.offset() + run.len());
            while off < end {
                let Some(rs) = self
                    .regions
                    .iter()
                    .find(|rs| (rs.r.offset..rs.r.offset + rs.r.size).contains(&off))
                else {
                    // No region holds these bytes: go to the next that does.
                    off = self
                        .regions
                        .iter()
                        .map(|rs| rs.r.offset)
                        .filter(|&o| o > off)
                        .min()
                        .unwrap_or(end)
                        .min(end);
                    continue;
                };
                let ps = rs.r.page_size;
                let piece_end = end.min(rs.r.offset + rs.r.size);
                // The whole pages of the region within [off, piece_end).
                let p0 = (off - rs.r.offset).div_ceil(ps);
                let p1 = (piece_end - rs.r.offset) / ps;
                if p0 < p1 {
                    let ws_at = run_at + (rs.r.offset + p0 * ps - run.offset());
                    self.prefetch_pages(&mut hot, pages, ws_at, rs, (p0, p1), k, &mut progress)?;
                }
                off = piece_end;
            }
        }
        Ok(())
    }

    /// Installs pages `[p0, p1)` of `rs` that are neither claimed nor
    /// removed, from the working-set image at `ws_at` (page `p0`'s bytes).
    #[allow(clippy::too_many_arguments)]
    fn prefetch_pages(
        &self,
        hot: &mut HotChunks,
        pages: &MemoryImage,
        ws_at: u64,
        rs: &RegionState,
        (p0, p1): (u64, u64),
        k: usize,
        progress: &mut Progress,
    ) -> Result<(), ServeError> {
        let ps = rs.r.page_size;
        let per_copy = (PREFETCH_COPY_BYTES / ps).max(1);
        let mut p = p0;
        while p < p1 {
            if self.halted() {
                return Ok(());
            }
            // Skip what is there; claim a contiguous stretch.
            if !rs.pages.claim(p) {
                p += 1;
                continue;
            }
            let mut q = p + 1;
            while q < p1 && q - p < per_copy && rs.pages.claim(q) {
                q += 1;
            }
            let mut claims = Claims {
                pages: &rs.pages,
                from: p,
                to: q,
            };
            self.cfg.fault_injector.at(InjectionPoint::PrefetchCopy {
                worker: k,
                offset: rs.r.offset + p * ps,
                len: (q - p) * ps,
            });
            // Faults first: when the fault loop has work, give it the CPU
            // once before copying. No more than that: a guest faulting
            // without pause would starve the prefetch that is there to end
            // its faults.
            if self.faults_waiting.load(Ordering::Acquire) {
                std::thread::yield_now();
            }
            let generation = self.remove_generation.load(Ordering::Acquire);
            let src = ws_at + (p - p0) * ps;
            match self.install(hot, pages, src, rs, p, q - p, Copier::Prefetch)? {
                Install::Done { existed } => {
                    claims.settled_to(q);
                    self.handoff.advance(k, ws_at + (q - p0) * ps);
                    self.handoff.installed_some();
                    let bytes = (q - p - existed) * ps;
                    self.counters
                        .already_present
                        .fetch_add(existed, Ordering::Relaxed);
                    self.counters
                        .prefetch_bytes
                        .fetch_add(bytes, Ordering::Relaxed);
                    progress.installed += bytes;
                    self.pace(progress);
                }
                Install::Busy { done, existed } => {
                    // A REMOVE is pending, or some page was given back: let
                    // the fault loop apply it, then install only what is
                    // still wanted (claims skip removed pages).
                    self.counters.retried_busy.fetch_add(1, Ordering::Relaxed);
                    let resume = p + done / ps;
                    claims.settled_to(resume);
                    drop(claims);
                    self.counters
                        .prefetch_bytes
                        .fetch_add(done - existed * ps, Ordering::Relaxed);
                    let t = Instant::now();
                    while self.remove_generation.load(Ordering::Acquire) == generation
                        && !rs.pages.any_removed(resume, q)
                        && t.elapsed() < Duration::from_millis(5)
                        && !self.halted()
                    {
                        std::thread::yield_now();
                    }
                    q = resume;
                }
                Install::Gone => {
                    self.gone.request();
                    return Ok(());
                }
            }
            p = q;
        }
        Ok(())
    }

    /// Sleeps as long as `--prefetch-rate` asks, looking at the halt flag.
    fn pace(&self, progress: &Progress) {
        let Some(rate) = self.cfg.prefetch_rate else {
            return;
        };
        let share = rate.get() as f64 / self.handoff.workers() as f64;
        let due = Duration::from_secs_f64(progress.installed as f64 / share);
        while let Some(wait) = due.checked_sub(progress.started.elapsed()) {
            if self.halted() || wait.is_zero() {
                return;
            }
            std::thread::sleep(wait.min(PACE_SLICE));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::uffd::handoff::PageState;

    #[test]
    fn claims_not_settled_are_given_back_when_a_stretch_panics() {
        let pages = PageStates::new(16);
        assert!((2..8).all(|p| pages.claim(p)));
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let mut claims = Claims {
                pages: &pages,
                from: 2,
                to: 8,
            };
            claims.settled_to(4);
            panic!("fault injector: a prefetch stretch panics half copied");
        }));
        assert!(outcome.is_err());
        assert!(
            (2..4).all(|p| pages.state(p) == PageState::Claimed),
            "settled pages stay"
        );
        assert!(
            (4..8).all(|p| pages.state(p) == PageState::Absent),
            "the rest are free for faults to take"
        );
    }
}
