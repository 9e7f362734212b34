//! The vhost-user-blk device: one worker state per queue, each with its
//! own view of the disk, so no lock is shared by all queues on the I/O
//! path (the overlay's dirty map is atomic; FLUSH gathers every queue).
//! Queues are served in turns by the shared pool ([`super::reactor`]):
//! a turn runs requests worth at most [`TURN_BUDGET`], then the queue
//! goes back to the pool's ready queue (ordered as the reactor says, by
//! the disk's class and virtual time, both kept here).

use std::io;
use std::num::Wrapping;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cairn_engine::disk::LazyDisk;
use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost_user_backend::{VringRwLock, VringT};
use virtio_bindings::virtio_blk::VIRTIO_BLK_F_FLUSH;
use virtio_queue::{QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};

use super::cold::{cold_reads, InFlight};
use super::config::{DeviceConfig, CONFIG_LEN, WRITEBACK_OFFSET};
use super::exec::{execute, ExecConfig};
use super::lock;
use super::poll::Poller;
use super::request::{parse, Kind, Limits, Request, SECTOR};
use crate::activity::Activity;

pub(crate) type Memory = GuestMemoryAtomic<GuestMemoryMmap>;

/// What one turn of a queue may run before it yields its thread: each
/// request costs its bytes plus [`REQUEST_COST`].
const TURN_BUDGET: u64 = 128 * 1024;
const REQUEST_COST: u64 = 4096;
/// How long a disk counts as streaming after a cold read or read-ahead.
const STREAMING_FOR: Duration = Duration::from_secs(1);

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

/// Bytes the guest read, by where they came from: the host's cache or
/// the sandbox's own layers (`local`), or a fetch from the store that the
/// read waited for (`store`). The local share is the disk's share of what
/// the shared cache saves.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ReadCounts {
    pub local_bytes: u64,
    pub store_bytes: u64,
}

pub struct BlkBackend {
    cfg: DeviceConfig,
    exec: ExecConfig,
    limits: Limits,
    /// One per queue; each is locked by the pool thread running the
    /// queue's turn (and by the control path when guest memory changes
    /// or the queue stops).
    workers: Vec<Mutex<Worker>>,
    event_idx: AtomicBool,
    /// The cache mode: write-back only when the driver negotiated FLUSH
    /// (without it, virtio asks every write to be durable when it
    /// completes) and has not turned the cache off (CONFIG_WCE).
    cache: Mutex<CacheMode>,
    /// The connection being served, to cut.
    pub(crate) connection: Mutex<Option<UnixStream>>,
    /// Serving ended for good while a VMM was connected (see
    /// [`BlkServer::park_and_stop`]): the VMM's next request
    /// cuts its connection, and nothing is served.
    parked: AtomicBool,
    /// The view cold reads run on ([`super::cold`]), and how many are
    /// under way.
    cold_disk: Option<Arc<LazyDisk>>,
    cold_in_flight: Arc<InFlight>,
    read_local: AtomicU64,
    read_store: AtomicU64,
    /// What this disk's requests cost so far, in the pool's fair order
    /// (see [`super::reactor`]).
    pub(crate) vtime: AtomicU64,
    /// Milliseconds from the backend's making (`activity`'s clock) to
    /// its last cold read or read-ahead.
    streamed_ms: AtomicU64,
    /// Its last kicked queue or connection: how long it has been idle.
    activity: Activity,
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
        let cold_disk = disks.first().map(|d| Arc::new(d.disk().queue()));
        Arc::new(BlkBackend {
            cold_disk,
            cold_in_flight: Arc::default(),
            read_local: AtomicU64::new(0),
            read_store: AtomicU64::new(0),
            vtime: AtomicU64::new(0),
            streamed_ms: AtomicU64::new(0),
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
            connection: Mutex::new(None),
            parked: AtomicBool::new(false),
            activity: Activity::default(),
            cfg,
        })
    }

    /// Milliseconds since the backend was made.
    fn age_ms(&self) -> u64 {
        self.activity.age_ms()
    }

    fn touch(&self) {
        self.activity.touch();
    }

    /// Notes a cold read or a read-ahead: the disk streams.
    fn streamed(&self) {
        // Never 0, which means never.
        self.streamed_ms
            .fetch_max(self.age_ms() + 1, Ordering::Relaxed);
    }

    /// Whether it read cold or read ahead in the last [`STREAMING_FOR`]:
    /// its turns then yield to warm disks' (see [`super::reactor`]).
    pub(crate) fn streaming(&self) -> bool {
        let last = self.streamed_ms.load(Ordering::Relaxed);
        last != 0 && self.age_ms() + 1 < last + STREAMING_FOR.as_millis() as u64
    }

    /// How long since a queue was last kicked or a VMM connected.
    pub fn idle_for(&self) -> Duration {
        self.activity.idle_for()
    }

    /// Bytes read so far, by source.
    pub fn read_counts(&self) -> ReadCounts {
        ReadCounts {
            local_bytes: self.read_local.load(Ordering::Relaxed),
            store_bytes: self.read_store.load(Ordering::Relaxed),
        }
    }

    /// Whether completed writes may wait for a FLUSH to be durable.
    pub fn writeback(&self) -> bool {
        lock(&self.cache).writeback()
    }

    /// Waits for any turn under way and takes guest memory from every
    /// queue, so that a turn that starts later runs nothing; then makes
    /// what was written durable.
    pub(crate) fn fence(&self) {
        for w in &self.workers {
            lock(w).mem = None;
        }
        self.wait_for_cold_reads();
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
    pub(crate) fn park(&self) {
        self.parked.store(true, Ordering::Release);
        self.fence();
    }

    /// Cuts the connection if serving has ended; says whether it had.
    fn cut_if_parked(&self) -> bool {
        if !self.parked.load(Ordering::Acquire) {
            return false;
        }
        if let Some(conn) = lock(&self.connection).take() {
            tracing::info!("the VMM of a disk served elsewhere now asked for it: disconnecting it");
            let _ = conn.shutdown(std::net::Shutdown::Both);
        }
        true
    }

    /// Keeps the new connection's handle; cuts it at once if serving
    /// ended meanwhile.
    pub(crate) fn connected(&self, conn: Option<UnixStream>) {
        self.touch();
        *lock(&self.connection) = conn;
        self.cut_if_parked();
    }

    pub(crate) fn is_parked(&self) -> bool {
        self.parked.load(Ordering::Acquire)
    }

    /// Runs one turn of queue `index`: its requests until it has nothing
    /// available and stays empty for the poller's window, or until
    /// [`TURN_BUDGET`] was spent. Says whether requests are left (the
    /// pool then queues the next turn after the other queues waiting).
    pub(crate) fn process(self: &Arc<Self>, index: usize, vring: &VringRwLock) -> io::Result<bool> {
        if self.cut_if_parked() {
            // Left in the ring for the backend the VMM reconnects to.
            return Ok(false);
        }
        self.touch();
        let mut worker = lock(&self.workers[index]);
        if !vring.get_ref().get_queue().ready() {
            // Stopped (GET_VRING_BASE) since the kick came.
            return Ok(false);
        }
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
        let mut budget = TURN_BUDGET;
        loop {
            let drained = self.drain(
                index,
                vring,
                (&atomic, &mem),
                disk,
                scratch,
                event_idx,
                &mut budget,
            )?;
            if !event_idx || vring.needs_notification().map_err(qerr)? {
                vring.signal_used_queue()?;
            }
            if disk.took_fetches_ahead() {
                self.streamed();
            }
            if !drained {
                return Ok(true);
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
        Ok(false)
    }

    /// Runs the requests the queue holds, until it is empty with
    /// notifications on again (true) or `budget` ran out first (false).
    #[allow(clippy::too_many_arguments)]
    fn drain(
        self: &Arc<Self>,
        index: usize,
        vring: &VringRwLock,
        (atomic, mem): (&Memory, &GuestMemoryMmap),
        disk: &mut LazyDisk,
        scratch: &mut Vec<u8>,
        event_idx: bool,
        budget: &mut u64,
    ) -> io::Result<bool> {
        loop {
            if *budget == 0 {
                return Ok(false);
            }
            if event_idx {
                vring.disable_notification().map_err(qerr)?;
            }
            while *budget > 0 {
                let next = vring
                    .get_mut()
                    .get_queue_mut()
                    .iter(mem)
                    .map_err(qerr)?
                    .next();
                let Some(chain) = next else { break };
                let head = chain.head_index();
                let used = match parse(chain, mem, &self.limits) {
                    Ok(req) if self.is_cold(&req, disk) => {
                        tracing::trace!(
                            queue = index,
                            sector = req.sector,
                            len = req.data_len,
                            "cold read"
                        );
                        self.read_store.fetch_add(req.data_len, Ordering::Relaxed);
                        self.charge(budget, req.data_len);
                        self.streamed();
                        self.read_cold(req, head, vring.clone(), atomic.clone(), event_idx);
                        continue;
                    }
                    Ok(req) => {
                        tracing::trace!(queue = index, kind = ?req.kind, sector = req.sector, len = req.data_len, "request");
                        if matches!(req.kind, Kind::Read) {
                            self.read_local.fetch_add(req.data_len, Ordering::Relaxed);
                        }
                        self.charge(budget, req.data_len);
                        self.answer(&req, disk, mem, scratch)
                    }
                    Err(rej) => {
                        tracing::warn!(queue = index, "refused a request: {}", rej.why);
                        self.charge(budget, 0);
                        match rej.status.map(|at| mem.write_obj(rej.code, at)) {
                            Some(Ok(())) => 1,
                            _ => 0,
                        }
                    }
                };
                vring.add_used(head, used).map_err(qerr)?;
            }
            if *budget == 0 {
                return Ok(false);
            }
            if !event_idx || !vring.enable_notification().map_err(qerr)? {
                return Ok(true);
            }
        }
    }
}

impl BlkBackend {
    /// Runs `req` on `disk` and writes its status for the guest; returns
    /// the used length.
    fn answer(
        &self,
        req: &Request,
        disk: &LazyDisk,
        mem: &GuestMemoryMmap,
        scratch: &mut Vec<u8>,
    ) -> u32 {
        // Read per request: the guest may switch the cache between two
        // requests of one batch.
        let writethrough = !self.writeback();
        let done = execute(req, disk, mem, &self.exec, writethrough, scratch);
        match mem.write_obj(done.status, req.status) {
            Ok(()) => done.used_len,
            Err(e) => {
                tracing::warn!("cannot write the status byte: {e}");
                0
            }
        }
    }

    /// Charges a request of `bytes` to this turn's budget and the disk's
    /// virtual time.
    fn charge(&self, budget: &mut u64, bytes: u64) {
        let cost = REQUEST_COST.saturating_add(bytes);
        *budget = budget.saturating_sub(cost);
        self.vtime.fetch_add(cost, Ordering::Relaxed);
    }

    /// Whether `req` is a read that would wait for a fetch.
    fn is_cold(&self, req: &Request, disk: &LazyDisk) -> bool {
        matches!(req.kind, Kind::Read)
            && self.cold_disk.is_some()
            && req
                .sector
                .checked_mul(SECTOR)
                .is_some_and(|offset| disk.would_fetch(offset, req.data_len))
    }

    /// Runs the read `req` (chain `head`) on the cold-read threads; it
    /// completes there.
    fn read_cold(
        self: &Arc<Self>,
        req: Request,
        head: u16,
        vring: VringRwLock,
        mem: Memory,
        event_idx: bool,
    ) {
        // Counted from now, not from when a thread takes it: a fence that
        // comes between must wait for it.
        let counted = self.cold_in_flight.enter();
        let backend = self.clone();
        cold_reads().run(move || {
            let _counted = counted;
            backend.complete_cold(&req, head, &vring, &mem, event_idx);
        });
    }

    fn complete_cold(
        &self,
        req: &Request,
        head: u16,
        vring: &VringRwLock,
        mem: &Memory,
        event_idx: bool,
    ) {
        let Some(disk) = &self.cold_disk else { return };
        let used = self.answer(req, disk, &mem.memory(), &mut Vec::new());
        let answered = vring.add_used(head, used).map_err(qerr).and_then(|()| {
            if !event_idx || vring.needs_notification().map_err(qerr)? {
                vring.signal_used_queue()?;
            }
            Ok(())
        });
        if let Err(e) = answered {
            tracing::warn!("cannot complete a cold read: {e}");
        }
    }

    /// Waits until no cold read is under way (they write guest memory
    /// and the used ring).
    fn wait_for_cold_reads(&self) {
        self.cold_in_flight.wait_settled();
    }
}

fn qerr(e: virtio_queue::Error) -> io::Error {
    io::Error::other(e.to_string())
}

/// What the device offers and answers in the control path (called by
/// [`super::session`]).
impl BlkBackend {
    pub(crate) fn num_queues(&self) -> usize {
        usize::from(self.cfg.queues)
    }

    pub(crate) fn features(&self) -> u64 {
        self.cfg.features()
    }

    pub(crate) fn acked_features(&self, features: u64) {
        let flush = features & (1 << VIRTIO_BLK_F_FLUSH) != 0;
        if !flush {
            tracing::info!("the driver did not negotiate FLUSH: every write is made durable before it completes");
        }
        *lock(&self.cache) = CacheMode {
            flush_negotiated: flush,
            guest_wants_writeback: true,
        };
    }

    pub(crate) fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
    }

    pub(crate) fn set_event_idx(&self, enabled: bool) {
        self.event_idx.store(enabled, Ordering::Release);
    }

    pub(crate) fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let space = self.cfg.config_space(self.writeback());
        let start = (offset as usize).min(CONFIG_LEN);
        let end = start.saturating_add(size as usize).min(CONFIG_LEN);
        let mut out = space[start..end].to_vec();
        out.resize(size as usize, 0);
        out
    }

    pub(crate) fn set_config(&self, offset: u32, buf: &[u8]) -> io::Result<()> {
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

    pub(crate) fn update_memory(&self, mem: Memory) -> io::Result<()> {
        if self.parked.load(Ordering::Acquire) {
            // Kept from the queues: nothing is served here any more.
            return Ok(());
        }
        for w in &self.workers {
            lock(w).mem = Some(mem.clone());
        }
        Ok(())
    }

    /// Runs `stop` (which stops queue `index`'s ring) once no turn of that
    /// queue is under way.
    pub(crate) fn stop_queue(&self, index: usize, stop: impl FnOnce()) {
        match self.workers.get(index) {
            Some(w) => {
                let _turn = lock(w);
                self.wait_for_cold_reads();
                stop();
            }
            None => stop(),
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
