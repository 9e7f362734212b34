//! Which pages of a region are installed or were given back.
//!
//! One bit per page in two bitmaps of atomics, shared by the fault loop
//! and the prefetch worker. A page is claimed (its `present` bit set)
//! before it is copied, so the two never both copy it, except the page a
//! guest is faulting on, which the fault loop always installs (the kernel
//! installs it once; the loser sees EEXIST). `removed` marks pages the VMM
//! gave back (UFFD_EVENT_REMOVE): they read as zeros from then on. Only
//! the fault loop sets `removed`.

use std::sync::atomic::{AtomicU64, Ordering};

pub struct PageStates {
    present: Vec<AtomicU64>,
    removed: Vec<AtomicU64>,
    pages: u64,
}

fn bit(page: u64) -> (usize, u64) {
    ((page / 64) as usize, 1u64 << (page % 64))
}

impl PageStates {
    pub fn new(pages: u64) -> PageStates {
        let words = pages.div_ceil(64) as usize;
        PageStates {
            present: (0..words).map(|_| AtomicU64::new(0)).collect(),
            removed: (0..words).map(|_| AtomicU64::new(0)).collect(),
            pages,
        }
    }

    pub fn pages(&self) -> u64 {
        self.pages
    }

    /// Claims `page` for copying unless it is present or removed.
    pub fn claim(&self, page: u64) -> bool {
        let (w, b) = bit(page);
        if self.removed[w].load(Ordering::Acquire) & b != 0 {
            return false;
        }
        self.present[w].fetch_or(b, Ordering::AcqRel) & b == 0
    }

    /// Marks `page` present whatever it was (the fault loop's own page).
    pub fn force(&self, page: u64) {
        let (w, b) = bit(page);
        self.present[w].fetch_or(b, Ordering::AcqRel);
    }

    /// Gives back a claim that was not copied.
    pub fn unclaim(&self, page: u64) {
        let (w, b) = bit(page);
        self.present[w].fetch_and(!b, Ordering::AcqRel);
    }

    pub fn is_present(&self, page: u64) -> bool {
        let (w, b) = bit(page);
        self.present[w].load(Ordering::Acquire) & b != 0
    }

    pub fn is_removed(&self, page: u64) -> bool {
        let (w, b) = bit(page);
        self.removed[w].load(Ordering::Acquire) & b != 0
    }

    /// The VMM gave pages `[first, end)` back: they are gone and read as zeros.
    pub fn remove(&self, first: u64, end: u64) {
        for page in first..end.min(self.pages) {
            let (w, b) = bit(page);
            self.removed[w].fetch_or(b, Ordering::AcqRel);
            self.present[w].fetch_and(!b, Ordering::AcqRel);
        }
    }

    /// A removed page was installed (with zeros) again.
    pub fn refill(&self, page: u64) {
        self.force(page);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn claims_are_exclusive_and_removal_blocks_them() {
        let s = PageStates::new(130);
        assert!(s.claim(129));
        assert!(!s.claim(129));
        s.unclaim(129);
        assert!(s.claim(129));
        s.remove(0, 200);
        assert!(!s.is_present(129) && s.is_removed(129));
        assert!(!s.claim(5), "removed pages are not prefetched");
        s.refill(5);
        assert!(s.is_present(5));
    }
}
