//! The handoff between the fault loop and the prefetch workers.
//!
//! Prefetch workers install the recorded working set in recorded order
//! without waking the guest. A fault on a page they are about to install
//! is better left to them (they copy in larger pieces, and the two would
//! otherwise compete for the CPU), and the thread is woken once they are a
//! little past its page, so that it runs through installed pages instead
//! of faulting on each next one. [`Handoff`] holds where the workers are
//! and makes that call for each fault: wait, wake, or serve now. Its rules:
//! - only an installed page is woken for; a claimed one is waited for;
//! - a fault that has waited `max_wait` is woken if its page is there and
//!   served on demand otherwise, whatever the prefetcher is doing;
//! - no fault waits before the first one is answered (the guest's first
//!   progress is not traded for batching: it is what a resume waits for);
//! - nothing is left to a worker that is not running (done, failed,
//!   panicked), to workers that have not yet installed anything, nor is a
//!   page its worker has passed or will not reach within `lead`.
//!
//! Workers share the working set by stripes: a run belongs to the worker
//! of the stripe it starts in ([`Handoff::owner`]).
//!
//! It knows nothing of userfaultfd: page states come in, decisions go out.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

/// What a fault finds at its page (see [`super::pages`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PageState {
    /// Nobody has it.
    Absent,
    /// A prefetch worker is copying it.
    Claimed,
    /// It is in the VMM's memory.
    Installed,
    /// The VMM gave it back: it reads as zeros.
    Removed,
}

/// What to do with a fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Its page is due from the prefetcher: look again later.
    Wait,
    /// Its page is there: wake the thread.
    Wake,
    /// The fault loop installs it now.
    Serve,
}

/// How far ahead of the prefetcher a fault is left to it, and for how long.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// A fault on a page at most this many working-set bytes ahead of the
    /// prefetcher waits for it.
    pub lead: u64,
    /// A thread whose page is installed is woken once the prefetcher is
    /// this many working-set bytes past it.
    pub wake_ahead: u64,
    /// The longest a fault waits for the prefetcher.
    pub max_wait: Duration,
    /// Working-set bytes one worker takes before the next one's turn.
    pub stripe: u64,
}

/// Where a page is in the working set: its byte, and its run's first byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Place {
    pub at: u64,
    pub run_at: u64,
}

/// Where the prefetch workers are, and the decisions that follow.
pub struct Handoff {
    /// Per worker: working-set bytes before the stretch it is installing
    /// (`u64::MAX` once it is done).
    cursors: Vec<AtomicU64>,
    running: AtomicUsize,
    /// Some worker has installed its first stretch.
    started: AtomicBool,
    /// The first fault was answered.
    first_answered: AtomicBool,
    limits: Limits,
}

impl Handoff {
    /// A handoff for `workers` workers, none running yet.
    pub fn new(workers: usize, limits: Limits) -> Handoff {
        Handoff {
            cursors: (0..workers.max(1)).map(|_| AtomicU64::new(0)).collect(),
            running: AtomicUsize::new(0),
            started: AtomicBool::new(false),
            first_answered: AtomicBool::new(false),
            limits,
        }
    }

    pub fn workers(&self) -> usize {
        self.cursors.len()
    }

    /// Every worker is about to run.
    pub fn start(&self) {
        self.running.store(self.cursors.len(), Ordering::Release);
    }

    /// Worker `k` is at working-set byte `at`: what lies before it in its
    /// stripes is installed or being installed.
    pub fn advance(&self, k: usize, at: u64) {
        self.cursors[k].store(at, Ordering::Release);
    }

    /// A worker installed a stretch: faults may be left to the workers.
    pub fn installed_some(&self) {
        if !self.started.load(Ordering::Relaxed) {
            self.started.store(true, Ordering::Release);
        }
    }

    /// A fault was answered: later ones may wait.
    pub fn answered(&self) {
        if !self.first_answered.load(Ordering::Relaxed) {
            self.first_answered.store(true, Ordering::Release);
        }
    }

    /// Worker `k` stopped, done or not. True for the last one.
    pub fn finish(&self, k: usize) -> bool {
        self.cursors[k].store(u64::MAX, Ordering::Release);
        self.running.fetch_sub(1, Ordering::AcqRel) == 1
    }

    pub fn running(&self) -> bool {
        self.running.load(Ordering::Acquire) > 0
    }

    /// The worker that installs the run starting at working-set byte `run_at`.
    pub fn owner(&self, run_at: u64) -> usize {
        ((run_at / self.limits.stripe.max(1)) % self.cursors.len() as u64) as usize
    }

    /// What to do with a fault whose page is in `state`, at `place` in the
    /// working set (None: not in it), that has waited `waited`.
    pub fn decide(&self, state: PageState, place: Option<Place>, waited: Duration) -> Decision {
        let running = self.running() && self.first_answered.load(Ordering::Acquire);
        let overdue = waited >= self.limits.max_wait;
        // Where the page's worker is (u64::MAX once it stopped).
        let cursor = |p: Place| self.cursors[self.owner(p.run_at)].load(Ordering::Acquire);
        match state {
            PageState::Removed => Decision::Serve,
            PageState::Installed => {
                let far_enough =
                    place.is_none_or(|p| cursor(p) >= p.at.saturating_add(self.limits.wake_ahead));
                if !running || overdue || far_enough {
                    Decision::Wake
                } else {
                    Decision::Wait
                }
            }
            _ if !running || overdue => Decision::Serve,
            PageState::Claimed => Decision::Wait,
            PageState::Absent => {
                let due = place.is_some_and(|p| {
                    let c = cursor(p);
                    self.started.load(Ordering::Acquire) && c <= p.at && p.at - c < self.limits.lead
                });
                if due {
                    Decision::Wait
                } else {
                    Decision::Serve
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);
    const NOW: Duration = Duration::ZERO;

    /// `workers` workers started, stripes of 1000 bytes: with two, runs
    /// starting in [0, 1000) are worker 0's, in [1000, 2000) worker 1's.
    fn started(workers: usize) -> Handoff {
        let h = Handoff::new(
            workers,
            Limits {
                lead: 100,
                wake_ahead: 10,
                max_wait: 2 * MS,
                stripe: 1000,
            },
        );
        h.start();
        h
    }

    /// Two workers started, a first fault answered.
    fn handoff() -> Handoff {
        let h = started(2);
        h.answered();
        h
    }

    fn at(at: u64) -> Option<Place> {
        Some(Place { at, run_at: at })
    }

    use Decision::*;
    use PageState::*;

    #[test]
    fn a_claimed_page_is_waited_for_never_woken() {
        let h = handoff();
        h.installed_some();
        assert_eq!(h.decide(Claimed, at(5), NOW), Wait);
        assert_eq!(h.decide(Claimed, at(5), MS), Wait);
        // Far behind the cursor and still only claimed: still not woken.
        h.advance(0, 900);
        assert_eq!(h.decide(Claimed, at(5), MS), Wait);
    }

    #[test]
    fn an_overdue_fault_is_served_whatever_the_prefetcher_does() {
        let h = handoff();
        h.installed_some();
        for state in [Absent, Claimed] {
            assert_eq!(h.decide(state, at(5), 2 * MS), Serve, "{state:?}");
        }
        assert_eq!(h.decide(Installed, at(5), 2 * MS), Wake);
    }

    #[test]
    fn an_installed_page_is_woken_once_its_worker_is_past_it() {
        let h = handoff();
        h.installed_some();
        h.advance(0, 12);
        h.advance(1, 1500);
        assert_eq!(h.decide(Installed, at(5), NOW), Wait, "cursor 12 < 5 + 10");
        h.advance(0, 15);
        assert_eq!(h.decide(Installed, at(5), NOW), Wake);
        assert_eq!(h.decide(Installed, None, NOW), Wake);
        assert_eq!(h.decide(Installed, at(1495), NOW), Wait, "worker 1 at 1500");
    }

    #[test]
    fn absent_pages_wait_only_just_ahead_of_their_started_worker() {
        let h = handoff();
        assert_eq!(
            h.decide(Absent, at(0), NOW),
            Serve,
            "the first faults never wait for the workers to start"
        );
        h.installed_some();
        h.advance(0, 50);
        h.advance(1, 1000);
        assert_eq!(h.decide(Absent, at(50), NOW), Wait);
        assert_eq!(h.decide(Absent, at(149), NOW), Wait);
        assert_eq!(h.decide(Absent, at(150), NOW), Serve, "past the lead");
        assert_eq!(h.decide(Absent, at(49), NOW), Serve, "passed over");
        assert_eq!(h.decide(Absent, None, NOW), Serve, "not in the working set");
        assert_eq!(h.decide(Removed, at(55), NOW), Serve);
        // A page deep in a run that started in worker 1's stripe.
        let deep = Some(Place {
            at: 1050,
            run_at: 1040,
        });
        assert_eq!(h.decide(Absent, deep, NOW), Wait);
        assert_eq!(h.owner(999), 0);
        assert_eq!(h.owner(1000), 1);
        assert_eq!(h.owner(2000), 0);
    }

    #[test]
    fn no_fault_waits_before_the_first_is_answered() {
        let h = started(1);
        h.installed_some();
        assert_eq!(h.decide(Absent, at(5), NOW), Serve);
        assert_eq!(h.decide(Claimed, at(5), NOW), Serve);
        assert_eq!(h.decide(Installed, at(5), NOW), Wake, "no wake-ahead");
        h.answered();
        assert_eq!(h.decide(Absent, at(5), NOW), Wait);
        assert_eq!(h.decide(Installed, at(5), NOW), Wait);
    }

    #[test]
    fn nothing_is_left_to_a_worker_that_stopped() {
        let h = handoff();
        h.installed_some();
        h.advance(0, 50);
        h.advance(1, 1000);
        assert!(!h.finish(1));
        assert_eq!(h.decide(Absent, at(1010), NOW), Serve, "worker 1 is gone");
        assert_eq!(h.decide(Absent, at(60), NOW), Wait, "worker 0 still runs");
        assert_eq!(h.decide(Installed, at(1010), NOW), Wake);
        assert!(h.finish(0), "the last one");
        assert!(!h.running());
        assert_eq!(h.decide(Claimed, at(60), NOW), Serve);
        assert_eq!(h.decide(Absent, at(60), NOW), Serve);
        assert_eq!(h.decide(Installed, at(60), NOW), Wake);
    }
}
