//! A request to stop, seen by threads that sleep in `poll`.
//!
//! An eventfd that becomes readable once [`Stop::request`] is called and
//! stays so. The accept loop and a session's fault loop poll it beside
//! their sockets and the userfaultfd; an operator's SIGTERM requests one.

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use rustix::event::{eventfd, EventfdFlags};

/// Cheap to clone; every clone is the same request.
#[derive(Clone)]
pub struct Stop(Arc<Inner>);

struct Inner {
    fd: OwnedFd,
    requested: AtomicBool,
}

impl Stop {
    pub fn new() -> io::Result<Stop> {
        let fd = eventfd(0, EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK)?;
        Ok(Stop(Arc::new(Inner {
            fd,
            requested: AtomicBool::new(false),
        })))
    }

    /// Asks every watcher to stop. Idempotent.
    pub fn request(&self) {
        if !self.0.requested.swap(true, Ordering::AcqRel) {
            // The counter only needs to be non-zero; nobody reads it.
            if let Err(e) = rustix::io::write(&self.0.fd, &1u64.to_ne_bytes()) {
                tracing::error!(error = %e, "signalling a stop failed");
            }
        }
    }

    pub fn requested(&self) -> bool {
        self.0.requested.load(Ordering::Acquire)
    }
}

impl AsFd for Stop {
    /// Readable once a stop was requested.
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.0.fd.as_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustix::event::{poll, PollFd, PollFlags, Timespec};

    #[test]
    fn a_request_makes_every_clone_readable_and_stays() {
        let stop = Stop::new().unwrap();
        let other = stop.clone();
        let ready = |s: &Stop| {
            let mut fds = [PollFd::new(s, PollFlags::IN)];
            poll(&mut fds, Some(&Timespec::default())).unwrap() == 1
        };
        assert!(!ready(&other) && !other.requested());
        stop.request();
        stop.request();
        assert!(ready(&other) && other.requested());
        assert!(ready(&other), "level-triggered: it stays readable");
    }
}
