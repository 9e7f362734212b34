//! One resume's shared state, and the one way pages get installed.
//!
//! A session runs the fault loop on the calling thread
//! ([`super::fault_loop`]) and the prefetch workers beside it
//! ([`super::prefetch`]), which meet in the page bitmaps
//! ([`super::pages`]) and the [`Handoff`]. Both install pages through
//! [`Session::install`]. A prefetch copy checks that none of its pages was
//! given back and copies under the shared side of `events`; the fault
//! loop reads userfaultfd events (and applies REMOVEs) under the exclusive
//! side. So a copy either lands before the REMOVE is read (and the
//! kernel's zap that follows clears it), fails with EAGAIN while the REMOVE
//! is pending, or sees the page given back and skips it: snapshot bytes
//! never land in a page the guest gave back.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::{Duration, Instant};

use cairn_engine::cache::HotChunks;
use cairn_engine::memory::working_set::{PageRun, UNIT};
use cairn_engine::memory::{MemoryImage, Segment};
use userfaultfd::Uffd;

use super::copy::{self, Install};
use super::handoff::{Handoff, Limits};
use super::handshake::GuestRegion;
use super::pages::PageStates;
use super::server::{ServeConfig, ServeError};
use super::snapshot::{Recorded, ServedSnapshot};
use super::stats::{Counters, Histogram};
use super::stop::Stop;
use super::vmm::VmmProcess;

/// A fault on a working-set page at most this many working-set bytes ahead
/// of the prefetcher waits for the prefetcher's copy instead of being
/// copied by the fault loop: the prefetcher installs it within about a
/// millisecond, in larger copies, and the two do not compete for the CPU
/// (README, "Resume benchmark", has the measurements).
const PREFETCH_LEAD: u64 = 4 << 20;
/// A thread whose page the prefetcher installed is woken once the
/// prefetcher is this many working-set bytes past it, so that it runs
/// through pages already there instead of faulting on the next one.
const PREFETCH_WAKE_AHEAD: u64 = 1 << 20;
/// The longest a fault waits for the prefetcher before it is served anyway.
const PREFETCH_MAX_WAIT: Duration = Duration::from_millis(2);
/// Working-set bytes one prefetch worker takes before the next one's turn.
const PREFETCH_STRIPE: u64 = 1 << 20;

/// Why a resume ended (without an error).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum End {
    /// The VMM process exited (its pidfd).
    VmmExited,
    /// A copy found the VMM's address space gone (ESRCH).
    AddressSpaceGone,
    /// The server was asked to stop.
    Stopped,
}

pub(super) struct RegionState {
    pub r: GuestRegion,
    pub pages: PageStates,
}

/// Who installs: the fault loop wakes the faulting thread; a prefetch
/// worker does not, and checks for given-back pages under `events`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Copier {
    Fault,
    Prefetch,
}

pub(super) struct Session<'a> {
    pub snapshot: &'a ServedSnapshot,
    pub regions: Vec<RegionState>,
    pub uffd: &'a Uffd,
    pub vmm: &'a VmmProcess,
    pub cfg: &'a ServeConfig,
    /// The operator's stop.
    pub stop: &'a Stop,
    /// When the handshake was done.
    pub started: Instant,
    pub counters: Counters,
    pub latency: Mutex<Histogram>,
    pub first_fault: OnceLock<Duration>,
    pub prefetch_done: OnceLock<Duration>,
    /// Why prefetch stopped before the end of the working set.
    pub prefetch_stopped: OnceLock<String>,
    pub recorded: Mutex<Vec<PageRun>>,
    pub handoff: Handoff,
    /// Shared by prefetch copies, exclusive while the fault loop reads events.
    pub events: RwLock<()>,
    /// Bumped each time the fault loop applies REMOVE events.
    pub remove_generation: AtomicU64,
    /// The fault loop has events to handle: prefetch workers yield once.
    pub faults_waiting: AtomicBool,
    /// Prefetch workers stop (the session ends).
    pub halt: AtomicBool,
    /// Reading the working set's image failed: faults take their bytes
    /// from the snapshot and prefetch stops.
    pub working_set_failed: AtomicBool,
    /// A prefetch worker found the VMM's address space gone.
    pub gone: Stop,
    /// A page of zeros as large as the largest page.
    pub zeros: Vec<u8>,
}

impl<'a> Session<'a> {
    pub fn new(
        snapshot: &'a ServedSnapshot,
        regions: Vec<GuestRegion>,
        uffd: &'a Uffd,
        vmm: &'a VmmProcess,
        cfg: &'a ServeConfig,
        stop: &'a Stop,
    ) -> Result<Session<'a>, ServeError> {
        let largest = regions.iter().map(|r| r.page_size).max().unwrap_or(UNIT);
        let limits = Limits {
            lead: PREFETCH_LEAD,
            wake_ahead: PREFETCH_WAKE_AHEAD,
            max_wait: PREFETCH_MAX_WAIT,
            stripe: PREFETCH_STRIPE,
        };
        Ok(Session {
            snapshot,
            regions: regions
                .into_iter()
                .map(|r| RegionState {
                    pages: PageStates::new(r.pages()),
                    r,
                })
                .collect(),
            uffd,
            vmm,
            cfg,
            stop,
            started: Instant::now(),
            counters: Counters::default(),
            latency: Mutex::new(Histogram::default()),
            first_fault: OnceLock::new(),
            prefetch_done: OnceLock::new(),
            prefetch_stopped: OnceLock::new(),
            recorded: Mutex::new(Vec::new()),
            handoff: Handoff::new(cfg.prefetch_workers, limits),
            events: RwLock::new(()),
            remove_generation: AtomicU64::new(0),
            faults_waiting: AtomicBool::new(false),
            halt: AtomicBool::new(false),
            working_set_failed: AtomicBool::new(false),
            gone: Stop::new().map_err(ServeError::Uffd)?,
            zeros: vec![0u8; largest as usize],
        })
    }

    /// Runs the fault loop, and the prefetch workers beside it, until the
    /// VMM goes or a stop is requested.
    pub fn run(&self) -> Result<End, ServeError> {
        /// Stops the workers however the fault loop ends, panics included.
        struct Halt<'s>(&'s AtomicBool);
        impl Drop for Halt<'_> {
            fn drop(&mut self) {
                self.0.store(true, Ordering::Release);
            }
        }
        std::thread::scope(|s| {
            let workers: Vec<_> = match self.prefetching() {
                Some(recorded) => {
                    self.handoff.start();
                    (0..self.handoff.workers())
                        .map(|k| s.spawn(move || self.prefetch_worker(recorded, k)))
                        .collect()
                }
                None => Vec::new(),
            };
            let halt = Halt(&self.halt);
            let end = self.fault_loop();
            drop(halt);
            for w in workers {
                // A worker's panic was logged and reported by its guard.
                let _ = w.join();
            }
            end
        })
    }

    /// The recorded working set, while it is to be prefetched and used.
    pub fn prefetching(&self) -> Option<&'a Recorded> {
        self.snapshot
            .working_set
            .as_ref()
            .filter(|_| self.cfg.prefetch && !self.working_set_failed.load(Ordering::Acquire))
    }

    /// Prefetch stopped early: say why once, and stop every worker if the
    /// working set itself cannot be read.
    pub fn prefetch_stopped(&self, why: String, working_set_unreadable: bool) {
        if working_set_unreadable {
            self.working_set_failed.store(true, Ordering::Release);
        }
        tracing::warn!(why = %why, "prefetch stopped; faults are served on demand from the snapshot");
        let _ = self.prefetch_stopped.set(why);
    }

    pub fn region_of(&self, addr: u64) -> Option<&RegionState> {
        let i = self.regions.partition_point(|rs| rs.r.end() <= addr);
        self.regions.get(i).filter(|rs| rs.r.contains(addr))
    }

    /// Installs `pages` pages of region `rs` from page `first`, their bytes
    /// taken from `image` at `src`. Every page it finds or puts there is
    /// marked installed.
    #[allow(clippy::too_many_arguments)]
    pub fn install(
        &self,
        hot: &mut HotChunks,
        image: &MemoryImage,
        src: u64,
        rs: &RegionState,
        first: u64,
        pages: u64,
        copier: Copier,
    ) -> Result<Install, ServeError> {
        let ps = rs.r.page_size;
        let dst = rs.r.base + first * ps;
        let len = pages * ps;
        let what = if Arc::ptr_eq(image.manifest(), self.snapshot.image.manifest()) {
            "the snapshot"
        } else {
            "the working set's pages"
        };
        let store_err = |source| ServeError::Store {
            what,
            offset: src,
            source,
        };
        let mut existed = 0;
        let mut done = 0u64;
        while done < len {
            let at = src + done;
            let (outcome, n) = if ps > UNIT {
                // A huge page is one copy from contiguous bytes.
                if image.is_zero(at, ps) {
                    self.counters.zero_bytes.fetch_add(ps, Ordering::Relaxed);
                    (self.put(rs, dst + done, None, ps, copier), ps)
                } else {
                    let mut bounce = vec![0u8; ps as usize];
                    image.read(hot, at, &mut bounce).map_err(store_err)?;
                    (self.put(rs, dst + done, Some(&bounce), ps, copier), ps)
                }
            } else {
                match image.segment(at, len - done) {
                    Segment::Zero { len: n } => {
                        self.counters.zero_bytes.fetch_add(n, Ordering::Relaxed);
                        (self.put(rs, dst + done, None, n, copier), n)
                    }
                    Segment::Data { id, at, len: n } => {
                        let put = |bytes: &[u8]| self.put(rs, dst + done, Some(bytes), n, copier);
                        (
                            image
                                .with_segment(hot, &id, at, n, put)
                                .map_err(store_err)?,
                            n,
                        )
                    }
                }
            };
            let p = first + done / ps;
            match outcome.map_err(ServeError::Uffd)? {
                Install::Done { existed: e } => {
                    rs.pages.set_installed(p, p + n / ps);
                    existed += e;
                    done += n;
                }
                Install::Busy {
                    done: d,
                    existed: e,
                } => {
                    rs.pages.set_installed(p, p + d / ps);
                    return Ok(Install::Busy {
                        done: done + d,
                        existed: existed + e,
                    });
                }
                Install::Gone => return Ok(Install::Gone),
            }
        }
        Ok(Install::Done { existed })
    }

    /// One copy of `len` bytes to `dst` in `rs`: `bytes`, or zeros.
    fn put(
        &self,
        rs: &RegionState,
        dst: u64,
        bytes: Option<&[u8]>,
        len: u64,
        copier: Copier,
    ) -> std::io::Result<Install> {
        let ps = rs.r.page_size;
        let wake = copier == Copier::Fault;
        let _shared = match copier {
            Copier::Fault => None,
            Copier::Prefetch => {
                let gate = self.events.read().unwrap_or_else(|p| p.into_inner());
                let p = (dst - rs.r.base) / ps;
                if rs.pages.any_removed(p, p + len / ps) {
                    return Ok(Install::Busy {
                        done: 0,
                        existed: 0,
                    });
                }
                Some(gate)
            }
        };
        match bytes {
            Some(b) => copy::copy(self.uffd, dst, b, ps, wake),
            None => copy::zero(self.uffd, dst, len, ps, &self.zeros, wake),
        }
    }

    /// Counts a fault answered `since` then in the latency histogram and
    /// notes the first one.
    pub fn fault_served(&self, since: Instant) {
        self.latency
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .record(since.elapsed());
        if self.first_fault.set(self.started.elapsed()).is_ok() {
            self.handoff.answered();
        }
    }
}
