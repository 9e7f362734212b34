//! A host-side vhost-user-blk client for benchmarks and tests: libblkio (the
//! library QEMU and fio use) driving a backend's socket at a chosen queue
//! depth, on one of its queues.

use std::mem::MaybeUninit;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use blkio::{Blkio, Blkioq, Completion, MemoryRegion, ReqFlags};

/// The deepest queue a job may ask for; each slot has its own buffer.
pub const MAX_DEPTH: usize = 32;
/// The largest request a job may issue.
pub const MAX_REQUEST: usize = 1 << 20;

/// What a job issues, over and over until its time is up.
#[derive(Debug, Clone, Copy)]
pub enum Job {
    /// Reads of `bs` bytes at random `bs`-aligned offsets, `depth` in flight.
    RandRead { bs: usize, depth: usize },
    /// Reads of `bs` bytes one after another from the start (wrapping).
    SeqRead { bs: usize },
    /// Writes of `bs` bytes at random `bs`-aligned offsets, `depth` in
    /// flight, no FLUSH.
    RandWrite { bs: usize, depth: usize },
    /// A write of `bs` bytes at a random offset, then a FLUSH; one pair in
    /// flight.
    WriteFlush { bs: usize },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pattern {
    RandomRead,
    SequentialRead,
    RandomWrite,
}

/// The outcome of a job: operations done and each one's latency.
pub struct JobStats {
    pub ops: u64,
    pub bytes: u64,
    pub secs: f64,
    pub lat_us: Vec<f64>,
}

impl JobStats {
    pub fn iops(&self) -> f64 {
        self.ops as f64 / self.secs
    }
}

/// A request the device answered with an error status.
#[derive(Debug, thiserror::Error)]
#[error("request {slot} failed: {ret}")]
pub struct RequestFailed {
    pub slot: usize,
    /// libblkio's code: a negative errno (-EIO for an IOERR status).
    pub ret: i32,
}

pub struct Client {
    // Dropped last: the region and queues belong to it.
    qs: Vec<Blkioq>,
    /// The queue requests go to.
    on: usize,
    region: MemoryRegion,
    capacity: u64,
    rng: fastrand::Rng,
    _blkio: Blkio,
}

impl Client {
    /// Connects to the vhost-user-blk socket at `socket` with one queue.
    pub fn connect(socket: &Path) -> Result<Client> {
        Client::connect_with(socket, 1, false)
    }

    /// Connects with `queues` queues (the device may offer fewer), asking
    /// for a read-only disk if `read_only`.
    pub fn connect_with(socket: &Path, queues: usize, read_only: bool) -> Result<Client> {
        let path = socket.to_str().context("socket path is not UTF-8")?;
        let mut b = Blkio::new("virtio-blk-vhost-user").context("libblkio driver")?;
        b.set_str("path", path)?;
        b.set_bool("read-only", read_only)?;
        b.connect()
            .with_context(|| format!("connecting to {path}"))?;
        b.set_i32("num-queues", i32::try_from(queues).context("queues")?)?;
        let mut started = b.start().context("starting the vhost-user-blk device")?;
        let capacity = b.get_u64("capacity")?;
        let region = b.alloc_mem_region(MAX_DEPTH * MAX_REQUEST)?;
        b.map_mem_region(&region)?;
        Ok(Client {
            qs: std::mem::take(&mut started.queues),
            on: 0,
            region,
            capacity,
            rng: fastrand::Rng::with_seed(0x5eed),
            _blkio: b,
        })
    }

    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// The queues the device gave.
    pub fn queues(&self) -> usize {
        self.qs.len()
    }

    /// Sends the next requests on queue `q`.
    pub fn use_queue(&mut self, q: usize) {
        assert!(q < self.qs.len(), "queue {q} of {}", self.qs.len());
        self.on = q;
    }

    fn q(&mut self) -> &mut Blkioq {
        &mut self.qs[self.on]
    }

    fn slot(&self, slot: usize) -> *mut u8 {
        assert!(slot < MAX_DEPTH);
        (self.region.addr + slot * MAX_REQUEST) as *mut u8
    }

    /// The bytes of `slot` after a completed read of `len` bytes.
    fn slot_bytes(&self, slot: usize, len: usize) -> &[u8] {
        assert!(len <= MAX_REQUEST);
        // SAFETY: slot `slot` is `MAX_REQUEST` bytes inside the region
        // libblkio mapped for us (alive while `_blkio` is); nothing is in
        // flight into it when this is called (callers wait first).
        unsafe { std::slice::from_raw_parts(self.slot(slot), len) }
    }

    /// Waits for at least one completion; each one's slot, checked.
    fn reap(&mut self, out: &mut Vec<usize>) -> Result<()> {
        let mut done = [const { MaybeUninit::<Completion>::uninit() }; MAX_DEPTH];
        let n = self.q().do_io(&mut done, 1, None, None)?;
        for c in &done[..n] {
            // SAFETY: do_io initialised the first `n` completions.
            let c = unsafe { c.assume_init_read() };
            if c.ret != 0 {
                return Err(RequestFailed {
                    slot: c.user_data,
                    ret: c.ret,
                }
                .into());
            }
            out.push(c.user_data);
        }
        Ok(())
    }

    fn wait_one(&mut self) -> Result<()> {
        let mut slots = Vec::with_capacity(1);
        self.reap(&mut slots)
    }

    /// Sends a write of `data` (at most `MAX_REQUEST` bytes) at `offset`
    /// without waiting for it: see [`Client::completed_within`].
    pub fn submit_write(&mut self, offset: u64, data: &[u8]) {
        assert!(data.len() <= MAX_REQUEST);
        // SAFETY: slot 0 is `MAX_REQUEST` bytes of the region libblkio
        // mapped for us, and idle (every request was waited for).
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), self.slot(0), data.len()) };
        let buf = self.slot(0);
        self.q()
            .write(offset, buf, data.len(), 0, ReqFlags::empty());
    }

    /// Waits up to `timeout` for the request in flight: whether it
    /// completed (a backend that stopped answering leaves it in flight).
    pub fn completed_within(&mut self, timeout: Duration) -> Result<bool> {
        let mut done = [const { MaybeUninit::<Completion>::uninit() }; 1];
        let mut left = timeout;
        match self.q().do_io(&mut done, 1, Some(&mut left), None) {
            Ok(0) => Ok(false),
            Ok(_) => {
                // SAFETY: do_io initialised the first completion.
                let c = unsafe { done[0].assume_init_read() };
                if c.ret != 0 {
                    return Err(RequestFailed {
                        slot: c.user_data,
                        ret: c.ret,
                    }
                    .into());
                }
                Ok(true)
            }
            Err(e) if e.errno() == blkio::Errno::TIME => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// Reads `len` bytes at `offset`.
    pub fn read(&mut self, offset: u64, len: usize) -> Result<Vec<u8>> {
        let buf = self.slot(0);
        self.q().read(offset, buf, len, 0, ReqFlags::empty());
        self.wait_one()?;
        Ok(self.slot_bytes(0, len).to_vec())
    }

    /// Writes `data` (at most `MAX_REQUEST` bytes) at `offset`.
    pub fn write(&mut self, offset: u64, data: &[u8]) -> Result<()> {
        assert!(data.len() <= MAX_REQUEST);
        // SAFETY: slot 0 is `MAX_REQUEST` bytes of the region libblkio
        // mapped for us, and idle (every request was waited for).
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), self.slot(0), data.len()) };
        let buf = self.slot(0);
        self.q()
            .write(offset, buf, data.len(), 0, ReqFlags::empty());
        self.wait_one()
    }

    /// Writes `data` as one request of `pieces` equal buffers (one
    /// descriptor each), so it may be larger than one slot.
    pub fn write_pieces(&mut self, offset: u64, data: &[u8], pieces: usize) -> Result<()> {
        assert!(data.len() <= self.region.len && pieces > 0);
        let base = self.slot(0);
        // SAFETY: the region is `region.len` bytes libblkio mapped for us,
        // starting at slot 0, and idle (every request was waited for).
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), base, data.len()) };
        let each = data.len() / pieces;
        let iovecs: Vec<libc::iovec> = (0..pieces)
            .map(|i| libc::iovec {
                iov_base: base.wrapping_add(i * each).cast(),
                iov_len: each,
            })
            .collect();
        self.q()
            .writev(offset, iovecs.as_ptr(), pieces as u32, 0, ReqFlags::empty());
        self.wait_one()
    }

    /// WRITE_ZEROES of `len` bytes at `offset`.
    pub fn write_zeroes(&mut self, offset: u64, len: u64) -> Result<()> {
        self.q().write_zeroes(offset, len, 0, ReqFlags::empty());
        self.wait_one()
    }

    /// DISCARD of `len` bytes at `offset`.
    pub fn discard(&mut self, offset: u64, len: u64) -> Result<()> {
        self.q().discard(offset, len, 0, ReqFlags::empty());
        self.wait_one()
    }

    /// Reads the whole disk once, `MAX_REQUEST` at a time, 8 in flight.
    pub fn read_all(&mut self) -> Result<()> {
        let mut next = 0u64;
        let mut in_flight = 0;
        let mut slots = Vec::new();
        loop {
            while in_flight < 8 && next < self.capacity {
                let len = (MAX_REQUEST as u64).min(self.capacity - next) as usize;
                let buf = self.slot(in_flight);
                self.q().read(next, buf, len, in_flight, ReqFlags::empty());
                next += len as u64;
                in_flight += 1;
            }
            if in_flight == 0 {
                return Ok(());
            }
            slots.clear();
            self.reap(&mut slots)?;
            in_flight -= slots.len();
        }
    }

    fn random_offset(&mut self, bs: usize) -> u64 {
        self.rng.u64(..self.capacity / bs as u64) * bs as u64
    }

    /// Runs `job` for `secs` seconds.
    pub fn run(&mut self, job: Job, secs: f64) -> Result<JobStats> {
        let until = Instant::now() + Duration::from_secs_f64(secs);
        match job {
            Job::RandRead { bs, depth } => self.run_io(bs, depth, until, Pattern::RandomRead),
            Job::SeqRead { bs } => self.run_io(bs, 1, until, Pattern::SequentialRead),
            Job::RandWrite { bs, depth } => {
                for slot in 0..depth {
                    // SAFETY: the slot is ours and idle (nothing is in flight).
                    unsafe { std::ptr::write_bytes(self.slot(slot), slot as u8 + 1, bs) };
                }
                let stats = self.run_io(bs, depth, until, Pattern::RandomWrite)?;
                // Untimed: what the writes left for a sync is paid here, not
                // by whatever job runs next on this backend.
                self.flush()?;
                Ok(stats)
            }
            Job::WriteFlush { bs } => self.run_write_flush(bs, until),
        }
    }

    /// One FLUSH, waited for.
    pub fn flush(&mut self) -> Result<()> {
        self.q().flush(0, ReqFlags::empty());
        self.wait_one()
    }

    fn run_io(
        &mut self,
        bs: usize,
        depth: usize,
        until: Instant,
        pattern: Pattern,
    ) -> Result<JobStats> {
        assert!(depth <= MAX_DEPTH && bs <= MAX_REQUEST);
        let started = Instant::now();
        let mut issued_at = [started; MAX_DEPTH];
        let mut seq = 0u64;
        let mut lat_us = Vec::new();
        let mut slots = Vec::with_capacity(MAX_DEPTH);
        let mut submit = |c: &mut Client, slot: usize, issued_at: &mut [Instant; MAX_DEPTH]| {
            let offset = if pattern != Pattern::SequentialRead {
                c.random_offset(bs)
            } else {
                if seq + bs as u64 > c.capacity {
                    seq = 0;
                }
                seq += bs as u64;
                seq - bs as u64
            };
            issued_at[slot] = Instant::now();
            let buf = c.slot(slot);
            match pattern {
                Pattern::RandomWrite => c.q().write(offset, buf, bs, slot, ReqFlags::empty()),
                _ => c.q().read(offset, buf, bs, slot, ReqFlags::empty()),
            }
        };
        for slot in 0..depth {
            submit(self, slot, &mut issued_at);
        }
        let mut in_flight = depth;
        while in_flight > 0 {
            slots.clear();
            self.reap(&mut slots)?;
            let now = Instant::now();
            for &slot in &slots {
                lat_us.push((now - issued_at[slot]).as_secs_f64() * 1e6);
                if now < until {
                    submit(self, slot, &mut issued_at);
                } else {
                    in_flight -= 1;
                }
            }
        }
        let secs = started.elapsed().as_secs_f64();
        Ok(JobStats {
            ops: lat_us.len() as u64,
            bytes: (lat_us.len() * bs) as u64,
            secs,
            lat_us,
        })
    }

    fn run_write_flush(&mut self, bs: usize, until: Instant) -> Result<JobStats> {
        let started = Instant::now();
        let mut lat_us = Vec::new();
        let mut stamp = 0u8;
        while Instant::now() < until {
            stamp = stamp.wrapping_add(1);
            // SAFETY: slot 0 is ours and idle (every request was waited for).
            unsafe { std::ptr::write_bytes(self.slot(0), stamp, bs) };
            let offset = self.random_offset(bs);
            let t = Instant::now();
            let buf = self.slot(0);
            self.q().write(offset, buf, bs, 0, ReqFlags::empty());
            self.wait_one()?;
            self.q().flush(0, ReqFlags::empty());
            self.wait_one()?;
            lat_us.push(t.elapsed().as_secs_f64() * 1e6);
        }
        Ok(JobStats {
            ops: lat_us.len() as u64,
            bytes: (lat_us.len() * bs) as u64,
            secs: started.elapsed().as_secs_f64(),
            lat_us,
        })
    }
}
