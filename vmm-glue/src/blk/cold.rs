//! Reads that must wait for a fetch (a chunk in neither the cache nor the
//! queue's hot set) run here, on a few threads of their own, so that they
//! never hold one of the pool's threads ([`super::reactor`]) while
//! another disk's cached reads wait: one sandbox's cold reads or
//! read-ahead cannot starve another's warm ones. The requests complete
//! out of order, as virtio allows.

use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex, OnceLock};

/// Threads that wait for fetches, whatever the number of disks: enough
/// for that many GETs in flight to a remote store, where a fetch is mostly
/// waiting (read-ahead fetches run on the store's runtime besides).
pub const COLD_THREADS: usize = 16;

/// The cold-read threads' nice value.
const COLD_NICE: libc::c_int = 10;

type Job = Box<dyn FnOnce() + Send>;

pub(crate) struct ColdPool {
    jobs: Sender<Job>,
}

impl ColdPool {
    /// The process's pool, started on first use.
    pub(crate) fn global() -> &'static ColdPool {
        static POOL: OnceLock<ColdPool> = OnceLock::new();
        POOL.get_or_init(|| {
            let (jobs, rx) = channel::<Job>();
            let rx = Arc::new(Mutex::new(rx));
            for i in 0..COLD_THREADS {
                let rx = rx.clone();
                std::thread::Builder::new()
                    .name(format!("cairn-blk-cold-{i}"))
                    .spawn(move || run(&rx))
                    .expect("cannot start the cold-read threads");
            }
            ColdPool { jobs }
        })
    }

    pub(crate) fn run(&self, job: impl FnOnce() + Send + 'static) {
        // The threads never end, so the channel never closes.
        let _ = self.jobs.send(Box::new(job));
    }
}

/// Lowers the calling thread below the pool's threads (nice 10): on a
/// busy host a thread with a cached read to serve gets the CPU before one
/// waiting for a fetch.
fn lower_priority() {
    // SAFETY: setpriority has no memory effects; who 0 is this thread.
    if unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, COLD_NICE) } != 0 {
        tracing::debug!(
            "cannot lower a thread's priority: {}",
            std::io::Error::last_os_error()
        );
    }
}

fn run(rx: &Mutex<Receiver<Job>>) {
    lower_priority();
    loop {
        let job = match super::lock(rx).recv() {
            Ok(job) => job,
            Err(_) => return,
        };
        job();
    }
}
