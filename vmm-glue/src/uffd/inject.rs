//! A fault injector for tests: named points of a session where a test can
//! make a part fail (panic) or pause on demand, to reproduce what the real
//! parts do only by chance (a prefetch worker dying with pages claimed, a
//! REMOVE landing between a claim and its copy). Off unless a test sets
//! one; nothing in production sets it.

use std::fmt;
use std::sync::Arc;

/// Where a session calls its injector.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InjectionPoint {
    /// A prefetch worker claimed `len` bytes at `offset` of the memory file
    /// and is about to copy them.
    PrefetchCopy {
        worker: usize,
        offset: u64,
        len: u64,
    },
    /// The fault loop is about to serve a fault at `offset` of the memory file.
    Fault { offset: u64 },
}

/// Test-only fault injector: `None` (the default) does nothing.
#[derive(Clone, Default)]
pub struct FaultInjector(Option<Arc<dyn Fn(InjectionPoint) + Send + Sync>>);

impl FaultInjector {
    pub fn new(f: impl Fn(InjectionPoint) + Send + Sync + 'static) -> FaultInjector {
        FaultInjector(Some(Arc::new(f)))
    }

    pub(super) fn at(&self, point: InjectionPoint) {
        if let Some(f) = &self.0 {
            f(point);
        }
    }
}

impl fmt::Debug for FaultInjector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.0.is_some() {
            "FaultInjector(set)"
        } else {
            "FaultInjector(none)"
        })
    }
}
