//! Which pages of a region are claimed, installed or given back.
//!
//! Three bitmaps of atomics, one bit per page, shared by the fault loop
//! and the prefetch workers:
//! - `claimed`: someone copies (or copied) the page. A page is claimed
//!   before it is copied, so two copiers never both copy it, except the
//!   page a guest is faulting on, which the fault loop always installs
//!   (the kernel installs it once; the loser sees EEXIST).
//! - `installed`: the page is in the VMM's memory (a copy returned, or
//!   found it there). Only an installed page is one a waiting fault may be
//!   woken for: a claim is a promise, not a page.
//! - `removed`: the VMM gave the page back (UFFD_EVENT_REMOVE). It reads as
//!   zeros from then on and is never prefetched. Only the fault loop sets it.

use std::sync::atomic::{AtomicU64, Ordering};

use super::handoff::PageState;

pub struct PageStates {
    claimed: Vec<AtomicU64>,
    installed: Vec<AtomicU64>,
    removed: Vec<AtomicU64>,
    pages: u64,
}

fn bit(page: u64) -> (usize, u64) {
    ((page / 64) as usize, 1u64 << (page % 64))
}

fn bitmap(words: usize) -> Vec<AtomicU64> {
    (0..words).map(|_| AtomicU64::new(0)).collect()
}

fn test(map: &[AtomicU64], page: u64) -> bool {
    let (w, b) = bit(page);
    map[w].load(Ordering::Acquire) & b != 0
}

impl PageStates {
    pub fn new(pages: u64) -> PageStates {
        let words = pages.div_ceil(64) as usize;
        PageStates {
            claimed: bitmap(words),
            installed: bitmap(words),
            removed: bitmap(words),
            pages,
        }
    }

    pub fn pages(&self) -> u64 {
        self.pages
    }

    /// Claims `page` for copying unless it is claimed or removed.
    pub fn claim(&self, page: u64) -> bool {
        let (w, b) = bit(page);
        if self.removed[w].load(Ordering::Acquire) & b != 0 {
            return false;
        }
        self.claimed[w].fetch_or(b, Ordering::AcqRel) & b == 0
    }

    /// Claims `page` whatever it was (the fault loop's own page).
    pub fn force(&self, page: u64) {
        let (w, b) = bit(page);
        self.claimed[w].fetch_or(b, Ordering::AcqRel);
    }

    /// Gives back a claim that was not copied.
    pub fn unclaim(&self, page: u64) {
        let (w, b) = bit(page);
        self.claimed[w].fetch_and(!b, Ordering::AcqRel);
    }

    /// Pages `[first, end)` are in the VMM's memory.
    pub fn set_installed(&self, first: u64, end: u64) {
        for page in first..end.min(self.pages) {
            let (w, b) = bit(page);
            self.installed[w].fetch_or(b, Ordering::AcqRel);
        }
    }

    pub fn is_removed(&self, page: u64) -> bool {
        test(&self.removed, page)
    }

    /// Whether any page of `[first, end)` was given back.
    pub fn any_removed(&self, first: u64, end: u64) -> bool {
        (first..end.min(self.pages)).any(|p| self.is_removed(p))
    }

    /// What a fault on `page` finds.
    pub fn state(&self, page: u64) -> PageState {
        if test(&self.removed, page) {
            PageState::Removed
        } else if test(&self.installed, page) {
            PageState::Installed
        } else if test(&self.claimed, page) {
            PageState::Claimed
        } else {
            PageState::Absent
        }
    }

    /// The VMM gave pages `[first, end)` back: they are gone and read as zeros.
    pub fn remove(&self, first: u64, end: u64) {
        for page in first..end.min(self.pages) {
            let (w, b) = bit(page);
            self.removed[w].fetch_or(b, Ordering::AcqRel);
            self.claimed[w].fetch_and(!b, Ordering::AcqRel);
            self.installed[w].fetch_and(!b, Ordering::AcqRel);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn claims_are_exclusive_installs_are_separate_and_removal_blocks_both() {
        let s = PageStates::new(130);
        assert_eq!(s.state(129), PageState::Absent);
        assert!(s.claim(129));
        assert!(!s.claim(129));
        assert_eq!(s.state(129), PageState::Claimed, "a claim is not a page");
        s.unclaim(129);
        assert!(s.claim(129));
        s.set_installed(129, 130);
        assert_eq!(s.state(129), PageState::Installed);
        s.remove(0, 200);
        assert_eq!(s.state(129), PageState::Removed);
        assert!(!s.claim(5), "removed pages are not prefetched");
        assert!(s.any_removed(4, 6) && !PageStates::new(8).any_removed(0, 8));
        s.force(5);
        s.set_installed(5, 6);
        assert_eq!(
            s.state(5),
            PageState::Removed,
            "given back stays given back"
        );
    }
}
