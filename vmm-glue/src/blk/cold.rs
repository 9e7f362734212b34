//! Reads that must wait for a fetch (a chunk in neither the cache nor the
//! queue's hot set) run here, on a few threads of their own, so that they
//! never hold one of the pool's threads ([`super::reactor`]) while
//! another disk's cached reads wait: one sandbox's cold reads or
//! read-ahead cannot starve another's warm ones. The requests complete
//! out of order, as virtio allows.

use std::sync::{Arc, Condvar, Mutex, OnceLock};

use cairn_engine::sched::{background, Lane};

use super::lock;

/// Threads that wait for fetches, whatever the number of disks: enough
/// for that many GETs in flight to a remote store, where a fetch is mostly
/// waiting (read-ahead fetches run on the store's runtime besides). They
/// run at background priority: on a busy host a thread with a cached read
/// to serve gets the CPU first.
pub const COLD_THREADS: usize = 16;

/// The process's cold-read threads, started on first use.
pub(crate) fn cold_reads() -> &'static Lane {
    static POOL: OnceLock<Lane> = OnceLock::new();
    POOL.get_or_init(|| {
        Lane::start("cairn-blk-cold", COLD_THREADS, background)
            .expect("cannot start the cold-read threads")
    })
}

/// How many of one disk's cold reads are under way, so that whoever must
/// stop the disk (a fence, a queue's stop) can wait for them: they write
/// guest memory and the used ring.
#[derive(Default)]
pub(crate) struct InFlight {
    count: Mutex<usize>,
    settled: Condvar,
}

/// One cold read under way: counted until dropped, even when the read
/// panics, so that a waiter never waits for a read that is gone.
pub(crate) struct ColdRead(Arc<InFlight>);

impl InFlight {
    pub(crate) fn enter(self: &Arc<Self>) -> ColdRead {
        *lock(&self.count) += 1;
        ColdRead(self.clone())
    }

    /// Waits until no cold read is under way.
    pub(crate) fn wait_settled(&self) {
        let mut n = lock(&self.count);
        while *n > 0 {
            n = self.settled.wait(n).unwrap_or_else(|p| p.into_inner());
        }
    }
}

impl Drop for ColdRead {
    fn drop(&mut self) {
        let mut n = lock(&self.0.count);
        *n -= 1;
        if *n == 0 {
            self.0.settled.notify_all();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn a_cold_read_that_panics_is_no_longer_waited_for() {
        let in_flight = Arc::new(InFlight::default());
        let lane = Lane::start("cold-test", 1, || {}).unwrap();
        let counted = in_flight.enter();
        lane.run(move || {
            let _counted = counted;
            panic!("a cold read that panics (injected)");
        });
        let (tx, rx) = std::sync::mpsc::channel();
        let waiter = in_flight.clone();
        std::thread::spawn(move || {
            waiter.wait_settled();
            let _ = tx.send(());
        });
        rx.recv_timeout(Duration::from_secs(10))
            .expect("the stop waits for a read that is gone");
    }
}
