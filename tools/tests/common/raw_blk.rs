//! A bare vhost-user-blk frontend for the tests: one queue of 8
//! descriptors in a memfd the backend maps, requests written by hand. It
//! sends what a well-behaved client (libblkio) refuses to, such as a write
//! to a device that says it is read-only, so that the server's own checks
//! are reached.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::time::{Duration, Instant};

use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vmm_sys_util::eventfd::EventFd;

const MEM: usize = 1 << 20;
const QUEUE: u16 = 8;
const DESC: usize = 0;
const AVAIL: usize = 0x1000;
const USED: usize = 0x2000;
const HEADER: usize = 0x3000;
const DATA: usize = 0x4000;
const STATUS: usize = 0x6000;
const VIRTIO_F_VERSION_1: u64 = 1 << 32;
const PROTOCOL_FEATURES: u64 = 1 << 30;
const DESC_F_NEXT: u16 = 1;
const DESC_F_WRITE: u16 = 2;

pub const VIRTIO_BLK_T_IN: u32 = 0;
pub const VIRTIO_BLK_T_OUT: u32 = 1;
pub const VIRTIO_BLK_S_OK: u8 = 0;
pub const VIRTIO_BLK_S_IOERR: u8 = 1;

pub struct RawBlk {
    _frontend: Frontend,
    _kick_call: (EventFd, EventFd),
    kick: EventFd,
    _memfd: OwnedFd,
    base: *mut u8,
    /// Requests made so far (the next avail and used index).
    sent: u16,
}

impl RawBlk {
    /// Connects to the vhost-user-blk socket and sets up queue 0.
    pub fn connect(socket: &Path) -> RawBlk {
        // SAFETY: memfd_create with a NUL-terminated name; the descriptor
        // it returns is owned from here on.
        let fd = unsafe { libc::memfd_create(c"cairn-raw-blk".as_ptr(), 0) };
        assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
        // SAFETY: a fresh descriptor nothing else owns.
        let memfd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: sizing the memfd just made.
        assert_eq!(unsafe { libc::ftruncate(fd, MEM as i64) }, 0);
        // SAFETY: a fresh shared mapping of the whole memfd at an address
        // the kernel picks; it lives as long as this struct (never unmapped
        // before the process ends: the backend may still touch it).
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                MEM,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd,
                0,
            )
        };
        assert_ne!(base, libc::MAP_FAILED);
        let base = base.cast::<u8>();
        let mut f = Frontend::connect(socket, 1).expect("connecting to the backend");
        f.set_owner().unwrap();
        let offered = f.get_features().unwrap();
        f.set_features(offered & (VIRTIO_F_VERSION_1 | PROTOCOL_FEATURES | 0xffff))
            .unwrap();
        if offered & PROTOCOL_FEATURES != 0 {
            f.get_protocol_features().unwrap();
            f.set_protocol_features(VhostUserProtocolFeatures::empty())
                .unwrap();
        }
        f.set_mem_table(&[VhostUserMemoryRegionInfo {
            guest_phys_addr: 0,
            memory_size: MEM as u64,
            userspace_addr: base as u64,
            mmap_offset: 0,
            mmap_handle: memfd.as_raw_fd(),
        }])
        .unwrap();
        f.set_vring_num(0, QUEUE).unwrap();
        f.set_vring_addr(
            0,
            &VringConfigData {
                queue_max_size: QUEUE,
                queue_size: QUEUE,
                flags: 0,
                desc_table_addr: base as u64 + DESC as u64,
                used_ring_addr: base as u64 + USED as u64,
                avail_ring_addr: base as u64 + AVAIL as u64,
                log_addr: None,
            },
        )
        .unwrap();
        f.set_vring_base(0, 0).unwrap();
        let call = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let kick = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        f.set_vring_call(0, &call).unwrap();
        f.set_vring_kick(0, &kick).unwrap();
        if offered & PROTOCOL_FEATURES != 0 {
            f.set_vring_enable(0, true).unwrap();
        }
        let kick_clone = kick.try_clone().unwrap();
        RawBlk {
            _frontend: f,
            _kick_call: (call, kick_clone),
            kick,
            _memfd: memfd,
            base,
            sent: 0,
        }
    }

    fn put<T: Copy>(&self, at: usize, v: T) {
        // SAFETY: `at` is inside the mapping (the constants above) and
        // aligned for T; volatile because the backend reads it.
        unsafe { std::ptr::write_volatile(self.base.add(at).cast::<T>(), v) }
    }

    fn get<T: Copy>(&self, at: usize) -> T {
        // SAFETY: as in `put`; volatile because the backend writes it.
        unsafe { std::ptr::read_volatile(self.base.add(at).cast::<T>()) }
    }

    fn desc(&self, i: usize, addr: usize, len: u32, flags: u16, next: u16) {
        let at = DESC + 16 * i;
        self.put(at, addr as u64);
        self.put(at + 8, len);
        self.put(at + 12, flags);
        self.put(at + 14, next);
    }

    /// One request of `kind` at `sector` with `len` bytes of data (sent
    /// for a write, received for a read); its status byte and the data
    /// buffer afterwards.
    pub fn request(&mut self, kind: u32, sector: u64, data: &[u8]) -> (u8, Vec<u8>) {
        self.put(HEADER, kind);
        self.put(HEADER + 4, 0u32);
        self.put(HEADER + 8, sector);
        for (i, b) in data.iter().enumerate() {
            self.put(DATA + i, *b);
        }
        self.put(STATUS, 0xffu8);
        let data_flags = if kind == VIRTIO_BLK_T_IN {
            DESC_F_WRITE
        } else {
            0
        };
        self.desc(0, HEADER, 16, DESC_F_NEXT, 1);
        self.desc(1, DATA, data.len() as u32, data_flags | DESC_F_NEXT, 2);
        self.desc(2, STATUS, 1, DESC_F_WRITE, 0);
        let slot = usize::from(self.sent % QUEUE);
        self.put(AVAIL + 4 + 2 * slot, 0u16);
        self.sent = self.sent.wrapping_add(1);
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        self.put(AVAIL + 2, self.sent);
        self.kick.write(1).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.get::<u16>(USED + 2) != self.sent {
            assert!(Instant::now() < deadline, "the backend never answered");
            std::thread::sleep(Duration::from_millis(1));
        }
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        let out = (0..data.len()).map(|i| self.get(DATA + i)).collect();
        (self.get(STATUS), out)
    }
}
