//! The vhost-user-blk backend: one worker thread per queue, each with its
//! own view of the disk, so no lock is shared by all queues on the I/O
//! path (the overlay's dirty map is atomic; FLUSH gathers every queue).

use std::io;
use std::num::Wrapping;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use cairn_engine::disk::LazyDisk;
use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost::vhost_user::Listener;
use vhost_user_backend::{ShutdownHandle, VhostUserBackend, VhostUserDaemon, VringRwLock, VringT};
use virtio_bindings::virtio_blk::VIRTIO_BLK_F_FLUSH;
use virtio_queue::{QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

use super::config::{DeviceConfig, CONFIG_LEN, QUEUE_SIZE, WRITEBACK_OFFSET};
use super::exec::{execute, ExecConfig};
use super::poll::Poller;
use super::request::{parse, Limits};

type Memory = GuestMemoryAtomic<GuestMemoryMmap>;

struct Worker {
    disk: LazyDisk,
    mem: Option<Memory>,
    scratch: Vec<u8>,
    poller: Poller,
}

/// What the driver negotiated and asked for of the write cache. Until
/// the features are acknowledged, it is what the device offers (FLUSH,
/// write-back): a frontend may read the config space that early.
#[derive(Debug, Clone, Copy)]
struct CacheMode {
    flush_negotiated: bool,
    guest_wants_writeback: bool,
}

impl Default for CacheMode {
    fn default() -> CacheMode {
        CacheMode {
            flush_negotiated: true,
            guest_wants_writeback: true,
        }
    }
}

impl CacheMode {
    fn writeback(&self) -> bool {
        self.flush_negotiated && self.guest_wants_writeback
    }
}

pub struct BlkBackend {
    cfg: DeviceConfig,
    exec: ExecConfig,
    limits: Limits,
    /// One per queue; each is locked by its own worker thread (and by the
    /// control thread when guest memory changes).
    workers: Vec<Mutex<Worker>>,
    event_idx: AtomicBool,
    /// The cache mode: write-back only when the driver negotiated FLUSH
    /// (without it, virtio asks every write to be durable when it
    /// completes) and has not turned the cache off (CONFIG_WCE).
    cache: Mutex<CacheMode>,
    exits: Mutex<Vec<(EventConsumer, EventNotifier)>>,
    /// The connection being served, to cut.
    connection: Mutex<Option<ShutdownHandle>>,
    /// Serving ended for good while a VMM was connected (see
    /// [`BlkServer::park_and_stop`]): the VMM's next request
    /// cuts its connection, and nothing is served.
    parked: AtomicBool,
    /// When the backend was made, and milliseconds from then to its last
    /// kicked queue or connection: how long it has been idle.
    born: Instant,
    last_active_ms: AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl BlkBackend {
    /// A backend over `disks`, one per queue (`cfg.queues` of them).
    pub fn new(cfg: DeviceConfig, disks: Vec<LazyDisk>) -> Arc<BlkBackend> {
        assert_eq!(
            disks.len(),
            usize::from(cfg.queues),
            "one disk view per queue"
        );
        let exec = ExecConfig {
            read_only: cfg.read_only,
            serial: cfg.serial.clone(),
        };
        Arc::new(BlkBackend {
            limits: cfg.limits(),
            exec,
            workers: disks
                .into_iter()
                .map(|disk| {
                    Mutex::new(Worker {
                        disk,
                        mem: None,
                        scratch: Vec::new(),
                        poller: Poller::new(cfg.poll),
                    })
                })
                .collect(),
            event_idx: AtomicBool::new(false),
            cache: Mutex::new(CacheMode::default()),
            exits: Mutex::new(Vec::new()),
            connection: Mutex::new(None),
            parked: AtomicBool::new(false),
            born: Instant::now(),
            last_active_ms: AtomicU64::new(0),
            cfg,
        })
    }

    fn touch(&self) {
        let ms = self.born.elapsed().as_millis() as u64;
        self.last_active_ms.fetch_max(ms, Ordering::Relaxed);
    }

    /// How long since a queue was last kicked or a VMM connected.
    pub fn idle_for(&self) -> Duration {
        let last = Duration::from_millis(self.last_active_ms.load(Ordering::Relaxed));
        self.born.elapsed().saturating_sub(last)
    }

    /// Whether completed writes may wait for a FLUSH to be durable.
    pub fn writeback(&self) -> bool {
        lock(&self.cache).writeback()
    }

    /// Fresh exit events for the worker threads of a new connection.
    fn new_session(&self) -> io::Result<()> {
        let mut exits = lock(&self.exits);
        exits.clear();
        for _ in 0..self.cfg.queues {
            exits.push(new_event_consumer_and_notifier(EventFlag::empty())?);
        }
        Ok(())
    }

    /// Tells this connection's worker threads to exit, then fences the
    /// queues.
    fn end_session(&self) {
        for (_, notifier) in lock(&self.exits).iter() {
            let _ = notifier.notify();
        }
        self.fence();
    }

    /// Waits for any request the workers are running and takes guest
    /// memory from every queue, so that a worker that wakes once more runs
    /// nothing; then makes what was written durable.
    fn fence(&self) {
        for w in &self.workers {
            lock(w).mem = None;
        }
        // Whatever ended the serving, what was written stays put.
        if let Some(w) = self.workers.first() {
            if let Err(e) = lock(w).disk.flush() {
                tracing::error!("flush after disconnect failed: {e}");
            }
        }
    }

    /// Ends serving for good but leaves a connected VMM its connection
    /// until its next request: QEMU (7.2 at least) never reconnects to a
    /// backend that went while its device was stopped (a paused VM, or one
    /// whose driver has not started the device yet), and does reconnect to
    /// one that goes while the device runs. Its control messages (a
    /// paused VM resuming starts the device) are answered meanwhile, and
    /// its first request, unserved, cuts it.
    fn park(&self) {
        self.parked.store(true, Ordering::Release);
        self.fence();
    }

    /// Cuts the connection if serving has ended; says whether it had.
    fn cut_if_parked(&self) -> bool {
        if !self.parked.load(Ordering::Acquire) {
            return false;
        }
        if let Some(h) = lock(&self.connection).take() {
            tracing::info!("the VMM of a disk served elsewhere now asked for it: disconnecting it");
            h.shutdown();
        }
        true
    }

    /// Keeps the new connection's handle; cuts it at once if serving
    /// ended meanwhile.
    fn connected(&self, handle: Option<ShutdownHandle>) {
        self.touch();
        *lock(&self.connection) = handle;
        self.cut_if_parked();
    }

    /// Serves the queue `index` until it has nothing available and stays
    /// empty for the poller's window.
    fn process(&self, index: usize, vring: &VringRwLock) -> io::Result<()> {
        if self.cut_if_parked() {
            // Left in the ring for the backend the VMM reconnects to.
            return Ok(());
        }
        self.touch();
        let mut worker = lock(&self.workers[index]);
        let Worker {
            disk,
            mem,
            scratch,
            poller,
        } = &mut *worker;
        poller.woke(Instant::now());
        let Some(atomic) = mem.clone() else {
            return Err(io::Error::other("queue kicked before guest memory was set"));
        };
        let mem = atomic.memory();
        let event_idx = self.event_idx.load(Ordering::Acquire);
        loop {
            self.drain(index, vring, &mem, disk, scratch, event_idx)?;
            if !event_idx || vring.needs_notification().map_err(qerr)? {
                vring.signal_used_queue()?;
            }
            // Drained and answered: watch the ring a little before sleeping.
            let more = poller.watch(|| {
                let state = vring.get_ref();
                let queue = state.get_queue();
                let avail = queue.avail_idx(&*mem, Ordering::Acquire).map_err(qerr)?;
                Ok::<_, io::Error>(avail != Wrapping(queue.next_avail()))
            })?;
            if !more {
                break;
            }
        }
        poller.slept(Instant::now());
        Ok(())
    }

    /// Runs every request the queue holds, until it is empty with
    /// notifications on again.
    fn drain(
        &self,
        index: usize,
        vring: &VringRwLock,
        mem: &GuestMemoryMmap,
        disk: &mut LazyDisk,
        scratch: &mut Vec<u8>,
        event_idx: bool,
    ) -> io::Result<()> {
        loop {
            if event_idx {
                vring.disable_notification().map_err(qerr)?;
            }
            let chains: Vec<_> = vring
                .get_mut()
                .get_queue_mut()
                .iter(mem)
                .map_err(qerr)?
                .collect();
            for chain in chains {
                let head = chain.head_index();
                let used = match parse(chain, mem, &self.limits) {
                    Ok(req) => {
                        tracing::trace!(queue = index, kind = ?req.kind, sector = req.sector, len = req.data_len, "request");
                        // Read per request: the guest may switch the cache
                        // between two requests of one batch.
                        let writethrough = !self.writeback();
                        let done = execute(&req, disk, mem, &self.exec, writethrough, scratch);
                        match mem.write_obj(done.status, req.status) {
                            Ok(()) => done.used_len,
                            Err(e) => {
                                tracing::warn!("cannot write the status byte: {e}");
                                0
                            }
                        }
                    }
                    Err(rej) => {
                        tracing::warn!(queue = index, "refused a request: {}", rej.why);
                        match rej.status.map(|at| mem.write_obj(rej.code, at)) {
                            Some(Ok(())) => 1,
                            _ => 0,
                        }
                    }
                };
                vring.add_used(head, used).map_err(qerr)?;
            }
            if !event_idx || !vring.enable_notification().map_err(qerr)? {
                return Ok(());
            }
        }
    }
}

fn qerr(e: virtio_queue::Error) -> io::Error {
    io::Error::other(e.to_string())
}

impl VhostUserBackend for BlkBackend {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        usize::from(self.cfg.queues)
    }

    fn max_queue_size(&self) -> usize {
        QUEUE_SIZE
    }

    fn features(&self) -> u64 {
        self.cfg.features()
    }

    fn acked_features(&self, features: u64) {
        let flush = features & (1 << VIRTIO_BLK_F_FLUSH) != 0;
        if !flush {
            tracing::info!("the driver did not negotiate FLUSH: every write is made durable before it completes");
        }
        *lock(&self.cache) = CacheMode {
            flush_negotiated: flush,
            guest_wants_writeback: true,
        };
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
    }

    fn set_event_idx(&self, enabled: bool) {
        self.event_idx.store(enabled, Ordering::Release);
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let space = self.cfg.config_space(self.writeback());
        let start = (offset as usize).min(CONFIG_LEN);
        let end = start.saturating_add(size as usize).min(CONFIG_LEN);
        let mut out = space[start..end].to_vec();
        out.resize(size as usize, 0);
        out
    }

    fn set_config(&self, offset: u32, buf: &[u8]) -> io::Result<()> {
        if offset == WRITEBACK_OFFSET && buf.len() == 1 {
            let mut cache = lock(&self.cache);
            cache.guest_wants_writeback = buf[0] != 0;
            tracing::info!(
                writeback = cache.writeback(),
                "guest set the write cache mode"
            );
            return Ok(());
        }
        tracing::warn!(
            offset,
            len = buf.len(),
            "guest wrote a read-only config field"
        );
        Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "only the writeback byte is writable",
        ))
    }

    fn update_memory(&self, mem: Memory) -> io::Result<()> {
        if self.parked.load(Ordering::Acquire) {
            // Kept from the queues: nothing is served here any more.
            return Ok(());
        }
        for w in &self.workers {
            lock(w).mem = Some(mem.clone());
        }
        Ok(())
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        (0..self.cfg.queues).map(|q| 1u64 << q).collect()
    }

    fn exit_event(&self, thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        let exits = lock(&self.exits);
        let (c, n) = exits.get(thread_index)?;
        Some((c.try_clone().ok()?, n.try_clone().ok()?))
    }

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[VringRwLock],
        _thread_id: usize,
    ) -> io::Result<()> {
        if evset != EventSet::IN {
            return Err(io::Error::other(format!("unexpected event set {evset:?}")));
        }
        let index = usize::from(device_event);
        let vring = vrings
            .get(index)
            .ok_or_else(|| io::Error::other(format!("event for unknown queue {index}")))?;
        self.process(index, vring)
    }
}

/// Listens on `socket` and serves one VMM connection after another until
/// the process ends; `ready` runs once the socket accepts connections.
pub fn serve(socket: &Path, backend: Arc<BlkBackend>, ready: impl FnOnce()) -> io::Result<()> {
    serve_until(socket, None, backend, ready, &AtomicBool::new(false))
}

/// As [`serve`], until `stop` is set and the listener woken (a connection
/// that says nothing, as [`BlkServer::stop`] makes); a VMM connected then
/// is served until it goes (or, parked, until its next request).
fn serve_until(
    socket: &Path,
    bound: Option<std::os::unix::net::UnixListener>,
    backend: Arc<BlkBackend>,
    ready: impl FnOnce(),
    stop: &AtomicBool,
) -> io::Result<()> {
    // Bound here, not by `Listener::new`, whose drop would remove the
    // path: a parked server's path may be another's by then.
    let bound = match bound {
        Some(l) => l,
        None => {
            let _ = std::fs::remove_file(socket);
            std::os::unix::net::UnixListener::bind(socket)?
        }
    };
    let mut listener = Listener::from(bound);
    ready();
    while !stop.load(Ordering::Acquire) {
        backend.new_session()?;
        let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
        let mut daemon = VhostUserDaemon::new("cairn-blk".into(), backend.clone(), mem)
            .map_err(|e| io::Error::other(e.to_string()))?;
        daemon
            .start(&mut listener)
            .map_err(|e| io::Error::other(e.to_string()))?;
        backend.connected(daemon.shutdown_handle());
        let woken = stop.load(Ordering::Acquire);
        if !woken {
            tracing::info!("VMM connected");
        }
        let result = daemon.wait();
        backend.connected(None);
        backend.end_session();
        match result {
            _ if woken => {}
            Ok(()) => tracing::info!("VMM disconnected"),
            Err(e) => tracing::info!("VMM connection ended: {e}"),
        }
    }
    // A parked server's path was given up at the switch (it may be
    // another's now).
    if !backend.parked.load(Ordering::Acquire) {
        let _ = std::fs::remove_file(socket);
    }
    Ok(())
}

/// A vhost-user-blk socket served on a thread of its own until stopped.
pub struct BlkServer {
    socket: std::path::PathBuf,
    backend: Arc<BlkBackend>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<io::Result<()>>>,
}

impl BlkServer {
    /// Starts serving `backend` on `socket`; returns once the socket
    /// accepts connections.
    pub fn start(socket: &Path, backend: Arc<BlkBackend>) -> io::Result<BlkServer> {
        BlkServer::start_on(socket, None, backend)
    }

    /// [`BlkServer::start`] on `listener` if given, already bound at
    /// `socket` (connections waiting in its backlog are served).
    pub fn start_on(
        socket: &Path,
        listener: Option<std::os::unix::net::UnixListener>,
        backend: Arc<BlkBackend>,
    ) -> io::Result<BlkServer> {
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, rx) = std::sync::mpsc::channel();
        let thread = {
            let (socket, stop, backend) = (socket.to_owned(), stop.clone(), backend.clone());
            std::thread::Builder::new()
                .name("cairn-blk".into())
                .spawn(move || {
                    serve_until(
                        &socket,
                        listener,
                        backend,
                        || {
                            let _ = tx.send(());
                        },
                        &stop,
                    )
                })?
        };
        if rx.recv().is_err() {
            // The thread ended before the socket was ready: its error.
            return Err(match thread.join() {
                Ok(Err(e)) => e,
                _ => io::Error::other("the vhost-user-blk server thread ended at start"),
            });
        }
        Ok(BlkServer {
            socket: socket.to_owned(),
            backend,
            stop,
            thread: Some(thread),
        })
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// How long since its disk was last asked for anything.
    pub fn idle_for(&self) -> Duration {
        self.backend.idle_for()
    }

    /// Whether a VMM is connected now.
    pub fn vmm_connected(&self) -> bool {
        lock(&self.backend.connection).is_some()
    }

    /// Stops taking connections and waits for the thread: at once if no
    /// VMM is connected, else when it disconnects.
    pub fn stop(mut self) -> io::Result<()> {
        self.stop.store(true, Ordering::Release);
        self.join()
    }

    /// Stops serving at once, for a disk that another backend serves
    /// next: requests in flight are answered, every completed write is
    /// durable, and none is served after this returns; the socket's path
    /// is removed. A connected VMM keeps its connection until its next
    /// request (a paused one's comes after it resumes), which cuts it: it
    /// then reconnects, by its path, to the next backend, where that
    /// request and those after it are served (as after any backend
    /// restart).
    pub fn park_and_stop(mut self) -> io::Result<()> {
        self.stop.store(true, Ordering::Release);
        self.backend.park();
        if self.vmm_connected() {
            let _ = std::fs::remove_file(&self.socket);
            // The thread ends with that connection.
            drop(self.thread.take());
            return Ok(());
        }
        // (A VMM that connects meanwhile is cut at once.)
        let joined = self.join();
        let _ = std::fs::remove_file(&self.socket);
        joined
    }

    fn join(&mut self) -> io::Result<()> {
        // Wake the accept; it sees the flag once this connection ends.
        drop(std::os::unix::net::UnixStream::connect(&self.socket));
        match self.thread.take().map(|t| t.join()) {
            Some(Ok(r)) => r,
            Some(Err(_)) => Err(io::Error::other(
                "the vhost-user-blk server thread panicked",
            )),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backend() -> Arc<BlkBackend> {
        let cfg = DeviceConfig {
            capacity_bytes: 1 << 20,
            read_only: false,
            queues: 0,
            serial: "t".into(),
            poll: super::super::config::DEFAULT_POLL,
        };
        BlkBackend::new(cfg, Vec::new())
    }

    fn writeback_byte(b: &BlkBackend) -> u8 {
        b.get_config(WRITEBACK_OFFSET, 1)[0]
    }

    #[test]
    fn the_write_cache_is_write_back_only_when_flush_was_negotiated() {
        let b = backend();
        let offered = b.features();
        // Before negotiation the config shows what is offered.
        assert_eq!(writeback_byte(&b), 1);
        b.acked_features(offered & !(1 << VIRTIO_BLK_F_FLUSH));
        assert!(!b.writeback());
        assert_eq!(writeback_byte(&b), 0);
        // A driver without FLUSH cannot turn write-back on.
        b.set_config(WRITEBACK_OFFSET, &[1]).unwrap();
        assert_eq!(writeback_byte(&b), 0);
        b.acked_features(offered);
        assert!(b.writeback());
        b.set_config(WRITEBACK_OFFSET, &[0]).unwrap();
        assert!(!b.writeback());
        assert_eq!(writeback_byte(&b), 0);
        b.set_config(WRITEBACK_OFFSET, &[1]).unwrap();
        assert_eq!(writeback_byte(&b), 1);
        assert!(b.set_config(0, &[1; 8]).is_err(), "capacity is read-only");
    }
}
