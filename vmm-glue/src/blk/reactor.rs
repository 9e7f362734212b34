//! One pool of threads serves every vhost-user-blk socket of the
//! process: listeners, VMM connections and queue kicks are all file
//! descriptors in one epoll set. Each is watched one-shot, so one thread
//! at a time runs it, for one bounded turn (see [`super::backend`]'s
//! per-turn budget). An idle disk costs a few descriptors and no thread.
//!
//! Two kinds of thread, as many of each as the host has cores:
//! - **Warm threads** wait in epoll and run control messages (listeners,
//!   connections) first, then the queues of warm disks. They ask for a
//!   short scheduling slice ([`cairn_engine::sched::latency_sensitive`]).
//! - **Stream threads** run the queues of streaming disks (a disk that
//!   read cold or read ahead in the last second), at background priority.
//!
//! The split is what keeps a warm read fast beside a hundred streams: the
//! scheduler shares a core by what each thread has used, so threads that
//! also served the streams' cached reads (40% of a core, measured) lost
//! their turn to the load's threads for up to milliseconds, while threads
//! that serve only warm disks use little and preempt on waking. Streams
//! are never starved: their threads get the cores whenever no warm turn
//! runs, and their share of a busy core otherwise.
//!
//! Within a class, turns follow start-time fair order: each disk has a
//! virtual time (what its requests cost), the lowest runs next, and a
//! disk that became ready starts at no less than the class's last turn's
//! tag, so idling earns no credit.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use cairn_engine::sched;

use super::lock;

/// What a source wants after its turn.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Watch {
    /// Watch the descriptor again.
    Again,
    /// Leave it unwatched (its owner re-arms or removes it).
    Pause,
    /// It has more to do: queue its next turn now, by its tag (no
    /// descriptor event, so no other thread is woken for it).
    Requeue,
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
    /// Threads of each kind.
    threads: usize,
    ready: Mutex<ReadyQueue>,
    /// Written when ready sources were queued, to wake a warm thread
    /// waiting in epoll to take one.
    nudge: vmm_sys_util::eventfd::EventFd,
    /// Signalled when a streaming queue was queued.
    streams: Condvar,
}

type Heap = BinaryHeap<Reverse<(u64, u64, u64)>>;

/// A kind of pool thread: its name, how it is scheduled, its loop.
type ThreadKind = (&'static str, fn(), fn(&Reactor));

/// One class's ready queues by start tag (virtual time, arrival, token).
#[derive(Default)]
struct Fair {
    heap: Heap,
    /// The start tag of the class's last turn.
    clock: u64,
}

impl Fair {
    fn push(&mut self, vtime: &AtomicU64, arrival: u64, token: u64) {
        let tag = vtime.load(Ordering::Relaxed).max(self.clock);
        vtime.store(tag, Ordering::Relaxed);
        self.heap.push(Reverse((tag, arrival, token)));
    }

    fn pop(&mut self) -> Option<u64> {
        let Reverse((tag, _, token)) = self.heap.pop()?;
        self.clock = self.clock.max(tag);
        Some(token)
    }
}

/// Ready sources: control tokens in arrival order, then queues by class.
#[derive(Default)]
struct ReadyQueue {
    control: VecDeque<u64>,
    warm: Fair,
    streaming: Fair,
    arrivals: u64,
}

impl ReadyQueue {
    /// A warm thread's next turn: control first, then a warm queue.
    fn pop_warm(&mut self) -> Option<u64> {
        self.control.pop_front().or_else(|| self.warm.pop())
    }

    fn warm_len(&self) -> usize {
        self.control.len() + self.warm.heap.len()
    }
}

/// Which turns a thread takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Warm,
    Stream,
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
            streams: Condvar::new(),
        });
        reactor.epoll.ctl(
            ControlOperation::Add,
            reactor.nudge.as_raw_fd(),
            EpollEvent::new(EventSet::IN, NUDGE),
        )?;
        let kinds: [ThreadKind; 2] = [
            ("cairn-blk", sched::latency_sensitive, Reactor::run_warm),
            ("cairn-blk-stream", sched::background, Reactor::run_streams),
        ];
        for i in 0..threads {
            for (name, setup, run) in kinds {
                let r = reactor.clone();
                std::thread::Builder::new()
                    .name(format!("{name}-{i}"))
                    .spawn(move || {
                        setup();
                        run(&r)
                    })?;
            }
        }
        Ok(reactor)
    }

    /// How many threads serve every disk.
    pub(crate) fn threads(&self) -> usize {
        2 * self.threads
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

    fn run_warm(&self) {
        let mut events = [EpollEvent::default(); 64];
        loop {
            // What became ready since is queued before the next turn is
            // chosen: a queue kicked now may have the lowest tag.
            if let Ok(n) = self.epoll.wait(0, &mut events) {
                self.enqueue(&events[..n]);
            }
            if let Some((token, source)) = self.next_ready(Kind::Warm) {
                self.turn(token, &*source, Kind::Warm);
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

    fn run_streams(&self) {
        loop {
            let (token, source) = self.next_ready(Kind::Stream).expect("waits for one");
            self.turn(token, &*source, Kind::Stream);
        }
    }

    /// Runs `source` on a thread of `kind`.
    fn turn(&self, token: u64, source: &dyn Source, kind: Kind) {
        match source.ready() {
            Watch::Again => self.rearm(Token(token)),
            Watch::Pause => {}
            Watch::Requeue => match source.share() {
                Some(share) => self.queue(&mut lock(&self.ready), token, share, kind),
                None => self.rearm(Token(token)),
            },
        }
    }

    /// Queues a ready queue in its class, by start tag, from a thread of
    /// kind `from`; wakes a thread of that class unless `from` is one
    /// that will take it next (a warm thread, with nothing else waiting).
    fn queue(&self, ready: &mut ReadyQueue, token: u64, share: Share<'_>, from: Kind) {
        ready.arrivals += 1;
        let arrival = ready.arrivals;
        if share.streaming {
            ready.streaming.push(share.vtime, arrival, token);
            self.streams.notify_one();
        } else {
            ready.warm.push(share.vtime, arrival, token);
            // A stream thread's queue that turned warm: the warm threads
            // may all be asleep in epoll.
            if from == Kind::Stream || ready.warm_len() > 1 {
                let _ = self.nudge.write(1);
            }
        }
    }

    /// Queues the sources epoll reported (see [`Reactor::queue`]).
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
            match r.source.share() {
                Some(share) => self.queue(&mut ready, token, share, Kind::Warm),
                None => {
                    ready.control.push_back(token);
                    if ready.warm_len() > 1 {
                        let _ = self.nudge.write(1);
                    }
                }
            }
        }
    }

    /// The ready source a thread of `kind` runs next (see the module's
    /// doc): a warm thread gets None when no warm turn waits, a stream
    /// thread waits for one.
    fn next_ready(&self, kind: Kind) -> Option<(u64, Arc<dyn Source>)> {
        loop {
            let token = {
                let mut ready = lock(&self.ready);
                match kind {
                    Kind::Warm => ready.pop_warm()?,
                    Kind::Stream => loop {
                        if let Some(token) = ready.streaming.pop() {
                            break token;
                        }
                        ready = self.streams.wait(ready).unwrap_or_else(|p| p.into_inner());
                    },
                }
            };
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
    fn warm_threads_take_control_then_warm_queues_by_tag_and_streams_have_their_own_order() {
        let vtime = |t: u64| AtomicU64::new(t);
        let mut q = ReadyQueue::default();
        // Warm tokens 1-5 (tags 50..10), streaming 100-102 (tags 2, 0, 1),
        // control 7000 last.
        for t in 1..=5u64 {
            q.arrivals += 1;
            q.warm.push(&vtime(60 - t * 10), q.arrivals, t);
        }
        for (t, tag) in [(100, 2), (101, 0), (102, 1)] {
            q.arrivals += 1;
            q.streaming.push(&vtime(tag), q.arrivals, t);
        }
        q.control.push_back(7000);
        let warm: Vec<u64> = std::iter::from_fn(|| q.pop_warm()).collect();
        assert_eq!(warm, [7000, 5, 4, 3, 2, 1], "control, then warm by tag");
        assert_eq!(q.warm.clock, 50, "the clock is the class's highest tag run");
        let streams: Vec<u64> = std::iter::from_fn(|| q.streaming.pop()).collect();
        assert_eq!(streams, [101, 102, 100], "streams by their own tags");

        // A disk ready again starts at no less than its class's clock:
        // idling earns no credit.
        let idle = vtime(3);
        q.warm.push(&idle, 99, 9);
        assert_eq!(idle.load(Ordering::Relaxed), 50);
    }

    /// A queue that streams for its first turn, wants another, and is
    /// warm by then.
    struct TurnsWarm {
        fd: vmm_sys_util::eventfd::EventFd,
        vtime: AtomicU64,
        runs: AtomicU64,
    }

    impl Source for TurnsWarm {
        fn ready(&self) -> Watch {
            let _ = self.fd.read();
            match self.runs.fetch_add(1, Ordering::SeqCst) {
                0 => Watch::Requeue,
                _ => Watch::Pause,
            }
        }

        fn share(&self) -> Option<Share<'_>> {
            Some(Share {
                vtime: &self.vtime,
                streaming: self.runs.load(Ordering::SeqCst) == 0,
            })
        }
    }

    #[test]
    fn a_stream_threads_queue_that_turned_warm_wakes_a_warm_thread() {
        let reactor = Reactor::start(1).unwrap();
        let source = Arc::new(TurnsWarm {
            fd: vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK).unwrap(),
            vtime: AtomicU64::new(0),
            runs: AtomicU64::new(0),
        });
        reactor.add(source.fd.as_raw_fd(), source.clone()).unwrap();
        source.fd.write(1).unwrap();
        let until = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while source.runs.load(Ordering::SeqCst) < 2 && std::time::Instant::now() < until {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert_eq!(
            source.runs.load(Ordering::SeqCst),
            2,
            "the second turn, queued warm by a stream thread, ran"
        );
    }
}
