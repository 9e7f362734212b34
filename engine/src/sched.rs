//! Which of the process's threads get a core first on a busy host, and
//! how many may compete for one.
//!
//! The threads that answer a VMM's queue (the vhost-user-blk pool) do
//! short bursts of work that a guest waits for. Fetching, decompressing,
//! verifying and caching chunks is long bursts of CPU that a hundred
//! streams multiply. Two things keep the first from waiting behind the
//! second:
//!
//! - **Few competitors.** The scheduler shares a core by weight among the
//!   runnable threads: with hundreds of blocking-pool threads each
//!   decoding or caching a run, a pool thread's fair share is under 1%
//!   of a core, and once it has used that it waits its turn (measured:
//!   514 such threads in 1.5 s beside 100 streams, and pool threads
//!   waiting up to 10 ms for a core). A [`Lane`] runs such work on a
//!   fixed few threads instead, so the work queues, not the threads.
//! - **Weights and slices.** [`latency_sensitive`] asks the scheduler
//!   (EEVDF, Linux 6.12 and later) for a short slice: an earlier virtual
//!   deadline, so the thread preempts a busy one as soon as it wakes,
//!   without real-time priority and without privilege; older kernels
//!   ignore the request. [`background`] lowers a thread's weight (nice
//!   10): it still gets the cores whenever nothing latency-sensitive
//!   runs.

#![allow(unsafe_code)]

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};

/// The slice the latency-sensitive threads ask for: the kernel's
/// smallest (0.1 ms).
const SHORT_SLICE_NS: u64 = 100_000;

/// The nice value of background threads.
const BACKGROUND_NICE: libc::c_int = 10;

/// Asks for a short scheduling slice for the calling thread (see the
/// module's doc). Failure only costs latency, so it is logged, not
/// returned.
pub fn latency_sensitive() {
    let attr = libc::sched_attr {
        size: std::mem::size_of::<libc::sched_attr>() as u32,
        sched_policy: libc::SCHED_OTHER as u32,
        sched_flags: 0,
        sched_nice: current_nice(),
        sched_priority: 0,
        sched_runtime: SHORT_SLICE_NS,
        sched_deadline: 0,
        sched_period: 0,
    };
    // SAFETY: sched_setattr reads `attr`, which lives across the call and
    // whose `size` field gives its length; pid 0 is the calling thread.
    let rc = unsafe { libc::syscall(libc::SYS_sched_setattr, 0, &attr as *const _, 0u32) };
    if rc != 0 {
        tracing::debug!(
            "cannot ask for a short scheduling slice: {}",
            std::io::Error::last_os_error()
        );
    }
}

fn current_nice() -> libc::c_int {
    // SAFETY: getpriority has no memory effects; who 0 is this thread.
    unsafe { libc::getpriority(libc::PRIO_PROCESS, 0) }
}

/// Lowers the calling thread's weight (nice 10; see the module's doc).
pub fn background() {
    // SAFETY: setpriority has no memory effects; who 0 is this thread.
    if unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, BACKGROUND_NICE) } != 0 {
        tracing::debug!(
            "cannot lower a thread's priority: {}",
            std::io::Error::last_os_error()
        );
    }
}

type Job = Box<dyn FnOnce() + Send>;

/// A fixed set of threads that run jobs in arrival order.
pub struct Lane {
    jobs: Sender<Job>,
}

impl Lane {
    /// Starts `threads` threads named `name-N`, each running `setup`
    /// first (e.g. [`background`]). They live as long as the process.
    pub fn start(name: &str, threads: usize, setup: fn()) -> std::io::Result<Lane> {
        let (jobs, rx) = channel::<Job>();
        let rx = Arc::new(Mutex::new(rx));
        for i in 0..threads.max(1) {
            let rx = rx.clone();
            std::thread::Builder::new()
                .name(format!("{name}-{i}"))
                .spawn(move || {
                    setup();
                    serve(&rx)
                })?;
        }
        Ok(Lane { jobs })
    }

    /// Queues `job`.
    pub fn run(&self, job: impl FnOnce() + Send + 'static) {
        // The threads never end, so the channel never closes.
        let _ = self.jobs.send(Box::new(job));
    }

    /// Queues `f`; its result arrives on the receiver (which errs if `f`
    /// panicked).
    pub fn spawn<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> tokio::sync::oneshot::Receiver<T> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.run(move || {
            let _ = tx.send(f());
        });
        rx
    }
}

fn serve(rx: &Mutex<Receiver<Job>>) {
    loop {
        let job = match rx.lock().unwrap_or_else(|p| p.into_inner()).recv() {
            Ok(job) => job,
            Err(_) => return,
        };
        // A job that panics loses its own result, not the thread.
        if catch_unwind(AssertUnwindSafe(job)).is_err() {
            tracing::error!(
                thread = std::thread::current().name().unwrap_or("?"),
                "a job panicked"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The calling thread's requested slice, in nanoseconds.
    fn slice() -> u64 {
        // SAFETY: all-zero is a valid sched_attr (plain integers).
        let mut attr: libc::sched_attr = unsafe { std::mem::zeroed() };
        let size = std::mem::size_of::<libc::sched_attr>() as u32;
        // SAFETY: sched_getattr writes at most `size` bytes into `attr`.
        let rc =
            unsafe { libc::syscall(libc::SYS_sched_getattr, 0, &mut attr as *mut _, size, 0u32) };
        assert_eq!(rc, 0, "{}", std::io::Error::last_os_error());
        attr.sched_runtime
    }

    #[test]
    fn a_lane_runs_every_job_on_its_own_threads_and_survives_a_panic() {
        let lane = Lane::start("cairn-test-lane", 2, background).unwrap();
        let bad = lane.spawn(|| -> u32 { panic!("a job that fails") });
        let got: Vec<(u32, String, libc::c_int)> = (0..20)
            .map(|i| {
                lane.spawn(move || {
                    (
                        i,
                        std::thread::current().name().unwrap().to_owned(),
                        current_nice(),
                    )
                })
            })
            .map(|rx| rx.blocking_recv().unwrap())
            .collect();
        assert!(bad.blocking_recv().is_err(), "a panicked job's result errs");
        for (i, (n, name, nice)) in got.into_iter().enumerate() {
            assert_eq!(n as usize, i);
            assert!(name.starts_with("cairn-test-lane-"), "{name}");
            assert_eq!(nice, BACKGROUND_NICE);
        }
    }

    #[test]
    fn background_threads_are_niced_and_latency_sensitive_ones_get_a_short_slice() {
        std::thread::spawn(|| {
            background();
            assert_eq!(current_nice(), BACKGROUND_NICE);
        })
        .join()
        .unwrap();
        std::thread::spawn(|| {
            background();
            latency_sensitive();
            assert_eq!(slice(), SHORT_SLICE_NS);
            assert_eq!(current_nice(), BACKGROUND_NICE, "the nice value is kept");
        })
        .join()
        .unwrap();
    }
}
