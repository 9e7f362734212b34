//! Reads that must wait for a fetch (a chunk in neither the cache nor the
//! queue's hot set) run here, on a few threads of their own, so that they
//! never hold one of the pool's threads ([`super::reactor`]) while
//! another disk's cached reads wait: one sandbox's cold reads or
//! read-ahead cannot starve another's warm ones. The requests complete
//! out of order, as virtio allows.

use std::sync::OnceLock;

use cairn_engine::sched::{background, Lane};

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
