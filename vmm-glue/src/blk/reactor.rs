//! One pool of threads, as many as the host has cores, that serves every
//! vhost-user-blk socket of the process: listeners, VMM connections and
//! queue kicks are all file descriptors in one epoll set. Each is watched
//! one-shot, so one thread at a time runs it, for one bounded turn (see
//! [`super::backend`]'s per-turn budget). An idle disk costs a few
//! descriptors and no thread.
//!
//! Which ready source runs next:
//! - control messages (listeners, connections) first;
//! - then the queues of warm disks, before those of streaming disks (a
//!   disk that read cold or read ahead in the last second), except that
//!   every [`STREAMING_TURN`]th turn goes to a streaming disk if one
//!   waits: a disk whose reads are served from the cache is not made to
//!   wait behind others' streams, and streams are never starved;
//! - within a class, start-time fair order: each disk has a virtual time
//!   (what its requests cost), the lowest runs next, and a disk that
//!   became ready starts at no less than the last turn's tag, so idling
//!   earns no credit.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use super::lock;

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
    /// Runs on a pool thread when its descriptor is readable (or hung
    /// up: a read then says so).
    fn ready(&self) -> Watch;

    /// The share of the disk it serves, or None for control sources,
    /// which run before any queue.
    fn share(&self) -> Option<Share<'_>> {
        None
    }
}

/// A queue's place in the order.
pub(crate) struct Share<'a> {
    /// Its disk's virtual time, advanced by its turns.
    pub vtime: &'a AtomicU64,
    /// Whether its disk read cold or read ahead lately.
    pub streaming: bool,
}

/// One turn in this many goes to a streaming disk if one waits.
const STREAMING_TURN: u64 = 4;

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

type Heap = BinaryHeap<Reverse<(u64, u64, u64)>>;

/// Ready sources: control tokens in arrival order; queues by class (warm,
/// streaming), each by start tag (virtual time, arrival, token).
#[derive(Default)]
struct ReadyQueue {
    control: VecDeque<u64>,
    warm: Heap,
    streaming: Heap,
    arrivals: u64,
    /// The start tag of the last turn run.
    clock: u64,
    picks: u64,
}

impl ReadyQueue {
    fn len(&self) -> usize {
        self.control.len() + self.warm.len() + self.streaming.len()
    }

    fn pop(&mut self) -> Option<u64> {
        if let Some(token) = self.control.pop_front() {
            return Some(token);
        }
        self.picks += 1;
        let streaming_turn = self.picks.is_multiple_of(STREAMING_TURN);
        let heap = if !self.streaming.is_empty() && (streaming_turn || self.warm.is_empty()) {
            &mut self.streaming
        } else {
            &mut self.warm
        };
        let Reverse((tag, _, token)) = heap.pop()?;
        self.clock = self.clock.max(tag);
        Some(token)
    }
}

/// The nudge eventfd's token (registrations start at 1).
const NUDGE: u64 = 0;

const WATCHED: EventSet = EventSet::IN.union(EventSet::ONE_SHOT);

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
            // What became ready since is queued before the next turn is
            // chosen: a queue kicked now may have the lowest tag.
            if let Ok(n) = self.epoll.wait(0, &mut events) {
                self.enqueue(&events[..n]);
            }
            if let Some((token, source)) = self.next_ready() {
                if source.ready() == Watch::Again {
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
            let Some(share) = r.source.share() else {
                ready.control.push_back(token);
                continue;
            };
            let tag = share.vtime.load(Ordering::Relaxed).max(ready.clock);
            share.vtime.store(tag, Ordering::Relaxed);
            ready.arrivals += 1;
            let entry = Reverse((tag, ready.arrivals, token));
            if share.streaming {
                ready.streaming.push(entry);
            } else {
                ready.warm.push(entry);
            }
        }
        if ready.len() > 1 {
            let _ = self.nudge.write(1);
        }
    }

    /// The ready source to run next (see the module's doc).
    fn next_ready(&self) -> Option<(u64, Arc<dyn Source>)> {
        loop {
            let token = lock(&self.ready).pop()?;
            if let Some(r) = lock(&self.sources).get(&token) {
                return Some((token, r.source.clone()));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_first_then_warm_queues_with_every_fourth_turn_to_a_stream() {
        let mut q = ReadyQueue::default();
        // Tokens: 1-9 warm (tags 10..90), 100-103 streaming (tags 0..3:
        // lower than any warm tag, still after them), 7000 control.
        for t in 1..=9u64 {
            q.arrivals += 1;
            q.warm.push(Reverse((t * 10, q.arrivals, t)));
        }
        for t in 100..=103u64 {
            q.arrivals += 1;
            q.streaming.push(Reverse((t - 100, q.arrivals, t)));
        }
        q.control.push_back(7000);
        let order: Vec<u64> = std::iter::from_fn(|| q.pop()).collect();
        assert_eq!(
            order,
            [7000, 1, 2, 3, 100, 4, 5, 6, 101, 7, 8, 9, 102, 103],
            "control, then warm by tag, a stream every fourth pick, streams once no warm queue waits"
        );
        assert_eq!(q.clock, 90, "the clock is the highest tag run");
    }
}
