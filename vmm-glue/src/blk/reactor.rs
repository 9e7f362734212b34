//! One pool of threads, as many as the host has cores, that serves every
//! vhost-user-blk socket of the process: listeners, VMM connections and
//! queue kicks are all file descriptors in one epoll set. Each is watched
//! one-shot, so one thread at a time runs it, for one bounded turn (see
//! [`super::backend`]'s per-turn budget). An idle disk costs a few
//! descriptors and no thread.
//!
//! Ready sources are run in start-time fair order: each disk has a
//! virtual time, the bytes its turns served, and the ready source with
//! the lowest runs next (control messages first). A disk that became
//! ready starts at no less than the virtual time of the last turn run, so
//! idling earns no credit. A disk reading a little (a warm 4 KiB read)
//! is thus served before disks streaming megabytes, however many of them
//! are queued.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

/// What a source wants after its turn.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Watch {
    /// Watch the descriptor again.
    Again,
    /// Leave it unwatched (its owner re-arms or removes it).
    Pause,
}

/// Something the pool runs when its descriptor is readable.
pub(crate) trait Source: Send + Sync {
    /// Runs on a pool thread; `events` are what epoll reported.
    fn ready(&self, events: EventSet) -> Watch;

    /// The virtual time of the disk it serves (advanced by its turns), or
    /// None for control sources, which run before any queue.
    fn vtime(&self) -> Option<&AtomicU64> {
        None
    }
}

/// A registration; never reused, so a stale event finds nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct Token(u64);

struct Registered {
    fd: RawFd,
    source: Arc<dyn Source>,
}

pub(crate) struct Reactor {
    epoll: Epoll,
    /// Registrations by token. Re-arming and removal both happen under
    /// this lock, so a descriptor number closed and reused by a new
    /// registration is never re-armed with an old token.
    sources: Mutex<HashMap<u64, Registered>>,
    next: AtomicU64,
    threads: usize,
    ready: Mutex<ReadyQueue>,
    /// Written when ready sources were queued, to wake a thread waiting
    /// in epoll to take one.
    nudge: vmm_sys_util::eventfd::EventFd,
}

/// Ready sources by start tag: (virtual time, arrival, token).
#[derive(Default)]
struct ReadyQueue {
    heap: BinaryHeap<Reverse<(u64, u64, u64)>>,
    arrivals: u64,
    /// The start tag of the last turn run.
    clock: u64,
}

/// The nudge eventfd's token (registrations start at 1).
const NUDGE: u64 = 0;

const WATCHED: EventSet = EventSet::IN.union(EventSet::ONE_SHOT);

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Reactor {
    /// The process's pool, started on first use.
    pub(crate) fn global() -> &'static Arc<Reactor> {
        static POOL: OnceLock<Arc<Reactor>> = OnceLock::new();
        POOL.get_or_init(|| {
            let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
            Reactor::start(threads).expect("cannot start the vhost-user-blk thread pool")
        })
    }

    fn start(threads: usize) -> io::Result<Arc<Reactor>> {
        let reactor = Arc::new(Reactor {
            epoll: Epoll::new()?,
            sources: Mutex::new(HashMap::new()),
            next: AtomicU64::new(1),
            threads,
            ready: Mutex::new(ReadyQueue::default()),
            nudge: vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK)?,
        });
        reactor.epoll.ctl(
            ControlOperation::Add,
            reactor.nudge.as_raw_fd(),
            EpollEvent::new(EventSet::IN, NUDGE),
        )?;
        for i in 0..threads {
            let r = reactor.clone();
            std::thread::Builder::new()
                .name(format!("cairn-blk-{i}"))
                .spawn(move || r.run())?;
        }
        Ok(reactor)
    }

    /// How many threads serve every disk.
    pub(crate) fn threads(&self) -> usize {
        self.threads
    }

    /// Watches `fd` (which `source` keeps open until it is removed).
    pub(crate) fn add(&self, fd: RawFd, source: Arc<dyn Source>) -> io::Result<Token> {
        let token = self.next.fetch_add(1, Ordering::Relaxed);
        let mut sources = lock(&self.sources);
        self.epoll
            .ctl(ControlOperation::Add, fd, EpollEvent::new(WATCHED, token))?;
        sources.insert(token, Registered { fd, source });
        Ok(Token(token))
    }

    /// Watches a paused source again.
    pub(crate) fn rearm(&self, token: Token) {
        let sources = lock(&self.sources);
        if let Some(r) = sources.get(&token.0) {
            if let Err(e) = self.epoll.ctl(
                ControlOperation::Modify,
                r.fd,
                EpollEvent::new(WATCHED, token.0),
            ) {
                tracing::error!("cannot watch a vhost-user descriptor again: {e}");
            }
        }
    }

    /// Stops watching; a turn already running finishes.
    pub(crate) fn remove(&self, token: Token) {
        let mut sources = lock(&self.sources);
        if let Some(r) = sources.remove(&token.0) {
            let _ = self
                .epoll
                .ctl(ControlOperation::Delete, r.fd, EpollEvent::default());
        }
    }

    fn run(&self) {
        let mut events = [EpollEvent::default(); 64];
        loop {
            if let Some((token, source, events)) = self.next_ready() {
                if source.ready(events) == Watch::Again {
                    self.rearm(Token(token));
                }
                continue;
            }
            let n = match self.epoll.wait(-1, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::error!("the vhost-user-blk pool cannot wait: {e}");
                    std::thread::sleep(std::time::Duration::from_millis(10));
                    continue;
                }
            };
            self.enqueue(&events[..n]);
        }
    }

    /// Queues the sources epoll reported, by start tag; wakes another
    /// thread if more than one is queued.
    fn enqueue(&self, events: &[EpollEvent]) {
        let sources = lock(&self.sources);
        let mut ready = lock(&self.ready);
        for ev in events {
            let token = ev.data();
            if token == NUDGE {
                let _ = self.nudge.read();
                continue;
            }
            let Some(r) = sources.get(&token) else {
                continue;
            };
            let tag = r.source.vtime().map_or(0, |v| {
                let tag = v.load(Ordering::Relaxed).max(ready.clock);
                v.store(tag, Ordering::Relaxed);
                tag
            });
            ready.arrivals += 1;
            let arrival = ready.arrivals;
            ready.heap.push(Reverse((tag, arrival, token)));
        }
        if ready.heap.len() > 1 {
            let _ = self.nudge.write(1);
        }
    }

    /// The ready source with the lowest start tag.
    fn next_ready(&self) -> Option<(u64, Arc<dyn Source>, EventSet)> {
        loop {
            let Reverse((tag, _, token)) = {
                let mut ready = lock(&self.ready);
                let top = ready.heap.pop()?;
                ready.clock = ready.clock.max(top.0 .0);
                top
            };
            let _ = tag;
            if let Some(r) = lock(&self.sources).get(&token) {
                return Some((token, r.source.clone(), EventSet::IN));
            }
        }
    }
}
