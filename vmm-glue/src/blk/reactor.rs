//! One pool of threads, as many as the host has cores, that serves every
//! vhost-user-blk socket of the process: listeners, VMM connections and
//! queue kicks are all file descriptors in one epoll set. Each is watched
//! one-shot, so one thread at a time runs it and a busy source goes back
//! to the end of the ready list after each turn: a disk with work queued
//! cannot hold a thread while another waits (see [`super::backend`]'s
//! per-turn budget). An idle disk costs a few descriptors and no thread.

use std::collections::HashMap;
use std::io;
use std::os::fd::RawFd;
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
}

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
        });
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
            if let Err(e) =
                self.epoll
                    .ctl(ControlOperation::Modify, r.fd, EpollEvent::new(WATCHED, token.0))
            {
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
        let mut events = [EpollEvent::default(); 1];
        loop {
            // One event per wait: the others stay in the ready list for
            // the other threads, in the order they became ready.
            let n = match self.epoll.wait(-1, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::error!("the vhost-user-blk pool cannot wait: {e}");
                    std::thread::sleep(std::time::Duration::from_millis(10));
                    continue;
                }
            };
            for ev in &events[..n] {
                let token = ev.data();
                let Some(source) = lock(&self.sources).get(&token).map(|r| r.source.clone())
                else {
                    continue;
                };
                if source.ready(ev.event_set()) == Watch::Again {
                    self.rearm(Token(token));
                }
            }
        }
    }
}
