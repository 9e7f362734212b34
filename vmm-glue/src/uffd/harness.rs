//! A stand-in for the VMM side of a resume, for tests and benchmarks.
//!
//! It does what Firecracker does on a snapshot resume with an external
//! page-fault handler: maps each guest memory region as private anonymous
//! memory (with `MAP_HUGETLB` for huge-page regions), creates a
//! userfaultfd asking for REMOVE events, registers every region in
//! MISSING mode and sends the handshake (JSON plus the descriptor) over
//! the handler's socket, in the shape of a given Firecracker release and
//! keeping or closing the socket as that release does ([`Release`]). Then
//! the caller plays the guest: it touches
//! guest memory (by offset in the memory file) from as many threads as it
//! likes and compares what it reads with the source. It is real memory and
//! a real userfaultfd: nothing is simulated but the VMM process itself.

use std::io::{self, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::Mutex;

use userfaultfd::{FeatureFlags, Uffd, UffdBuilder};
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

/// A region to map: its size and page size (4096, or 2 MiB for huge pages).
#[derive(Debug, Clone, Copy)]
pub struct RegionSpec {
    pub size: u64,
    pub page_size: u64,
}

/// Which Firecracker releases' handshake the harness speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Release {
    /// 1.6 and older: regions without a page size; the socket is dropped
    /// right after the handshake.
    V1_6,
    /// 1.7 to 1.11: `page_size_kib` only (in bytes); the socket is dropped
    /// right after the handshake.
    V1_7,
    /// 1.12 and later: `page_size` and `page_size_kib`; the socket is kept
    /// until the VMM exits.
    V1_12,
}

impl Release {
    pub fn keeps_socket(self) -> bool {
        self == Release::V1_12
    }

    /// By name: "1.6", "1.7" or "1.12".
    pub fn parse(name: &str) -> Option<Release> {
        match name {
            "1.6" => Some(Release::V1_6),
            "1.7" => Some(Release::V1_7),
            "1.12" => Some(Release::V1_12),
            _ => None,
        }
    }
}

struct Mapped {
    base: *mut u8,
    size: u64,
    page_size: u64,
    /// Where the region starts in the memory file.
    offset: u64,
}

/// The VMM's side: mapped guest memory, its userfaultfd and the socket.
pub struct VmmHarness {
    regions: Vec<Mapped>,
    /// `None` once closed (see [`VmmHarness::close_uffd`]).
    uffd: Mutex<Option<Uffd>>,
    stream: Option<UnixStream>,
}

// SAFETY: the mappings are owned by the harness for its whole life and
// only accessed through volatile byte reads and writes or plain copies,
// which are sound from any thread (the memory is shared by design, as
// guest memory is among vCPU threads).
unsafe impl Send for VmmHarness {}
// SAFETY: as above.
unsafe impl Sync for VmmHarness {}

fn map_region(size: u64, page_size: u64) -> io::Result<*mut u8> {
    let mut flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE;
    if page_size > 4096 {
        flags |= libc::MAP_HUGETLB;
    }
    // SAFETY: a fresh anonymous mapping at an address the kernel picks;
    // no existing memory is affected.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            size as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            flags,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    Ok(p.cast())
}

impl VmmHarness {
    /// Maps the regions back to back in the memory file and registers them
    /// with a non-blocking userfaultfd, as Firecracker does.
    pub fn new(specs: &[RegionSpec]) -> io::Result<VmmHarness> {
        VmmHarness::with_uffd(specs, true)
    }

    /// As [`VmmHarness::new`], with a blocking userfaultfd if `non_blocking`
    /// is false (as a VMM other than Firecracker may pass).
    pub fn with_uffd(specs: &[RegionSpec], non_blocking: bool) -> io::Result<VmmHarness> {
        let uffd = UffdBuilder::new()
            .close_on_exec(true)
            .non_blocking(non_blocking)
            .user_mode_only(false)
            .require_features(FeatureFlags::EVENT_REMOVE)
            .create()
            .map_err(|e| io::Error::other(format!("creating a userfaultfd: {e}")))?;
        let mut harness = VmmHarness {
            regions: Vec::new(),
            uffd: Mutex::new(None),
            stream: None,
        };
        let mut offset = 0;
        for s in specs {
            let base = map_region(s.size, s.page_size)?;
            harness.regions.push(Mapped {
                base,
                size: s.size,
                page_size: s.page_size,
                offset,
            });
            uffd.register(base.cast(), s.size as usize)
                .map_err(|e| io::Error::other(format!("registering a region: {e}")))?;
            offset += s.size;
        }
        harness.uffd = Mutex::new(Some(uffd));
        Ok(harness)
    }

    /// For a test whose prerequisite (`what`) this machine lacks: under
    /// CI (`CI=true`, which provides every prerequisite) it fails; anywhere
    /// else it prints a note and the test goes on without that part.
    pub fn missing_prerequisite(what: &str) {
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            panic!("{what}: CI provides this (CI=true); a test may not skip it there");
        }
        eprintln!("note: {what}; skipped");
    }

    /// Whether `count` huge pages of 2 MiB are free here now (a mapping
    /// with `MAP_NORESERVE`, as the harness makes, succeeds without them
    /// and faults with SIGBUS on first touch, so the pool is read).
    pub fn huge_pages_available(count: u64) -> bool {
        let Ok(info) = std::fs::read_to_string("/proc/meminfo") else {
            return false;
        };
        let field = |name: &str| -> u64 {
            info.lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0)
        };
        // The harness maps with the default huge page size.
        let two_mib = info
            .lines()
            .any(|l| l.starts_with("Hugepagesize:") && l.trim_end().ends_with(" 2048 kB"));
        two_mib && field("HugePages_Free:").saturating_sub(field("HugePages_Rsvd:")) >= count
    }

    /// Bytes of guest memory (the memory file's size).
    pub fn size(&self) -> u64 {
        self.regions.iter().map(|r| r.size).sum()
    }

    /// The handshake Firecracker 1.12 sends, with both page size fields.
    pub fn handshake_json(&self) -> String {
        self.handshake_json_of(Release::V1_12)
    }

    /// The handshake `release` sends.
    pub fn handshake_json_of(&self, release: Release) -> String {
        let items: Vec<String> = self
            .regions
            .iter()
            .map(|r| {
                let page = match release {
                    Release::V1_6 => String::new(),
                    Release::V1_7 => format!(r#","page_size_kib":{}"#, r.page_size),
                    Release::V1_12 => {
                        format!(r#","page_size":{0},"page_size_kib":{0}"#, r.page_size)
                    }
                };
                format!(
                    r#"{{"base_host_virt_addr":{},"size":{},"offset":{}{page}}}"#,
                    r.base as u64, r.size, r.offset
                )
            })
            .collect();
        format!("[{}]", items.join(","))
    }

    /// The userfaultfd (-1 once closed).
    pub fn uffd_fd(&self) -> RawFd {
        self.uffd
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map_or(-1, |u| u.as_raw_fd())
    }

    /// Closes the VMM's userfaultfd. Once the page server has closed its
    /// copy too, the regions are unregistered and threads blocked in a
    /// fault wake up (reading zeros): how a test gets its threads back
    /// after the server failed on purpose.
    pub fn close_uffd(&self) {
        *self.uffd.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }

    /// Connects to the page server and sends the handshake as 1.12 does.
    pub fn connect(&mut self, socket: &Path) -> io::Result<()> {
        self.connect_as(socket, Release::V1_12)
    }

    /// Connects and sends the handshake as `release` does, closing the
    /// socket right after it if that release did.
    pub fn connect_as(&mut self, socket: &Path, release: Release) -> io::Result<()> {
        let json = self.handshake_json_of(release);
        let stream = send_handshake(socket, json.as_bytes(), Some(self.uffd_fd()))?;
        self.stream = release.keeps_socket().then_some(stream);
        Ok(())
    }

    /// Closes the connection, as a VMM that exits does.
    pub fn disconnect(&mut self) {
        self.stream = None;
    }

    fn at(&self, offset: u64) -> (*mut u8, &Mapped) {
        let r = self
            .regions
            .iter()
            .find(|r| (r.offset..r.offset + r.size).contains(&offset))
            .unwrap_or_else(|| panic!("offset {offset} is outside guest memory"));
        // SAFETY: `offset - r.offset` is within the region's mapping.
        (unsafe { r.base.add((offset - r.offset) as usize) }, r)
    }

    /// Reads the byte at `offset` of the memory file, as a guest would.
    pub fn read_byte(&self, offset: u64) -> u8 {
        let (p, _) = self.at(offset);
        // SAFETY: `p` points into a live mapping of ours; a missing page
        // faults and is filled by the page server.
        unsafe { p.read_volatile() }
    }

    /// Writes the byte at `offset`, as a guest would.
    pub fn write_byte(&self, offset: u64, value: u8) {
        let (p, _) = self.at(offset);
        // SAFETY: as in `read_byte`; the mapping is writable.
        unsafe { p.write_volatile(value) }
    }

    /// Copies guest memory at `offset` into `buf` (within one region).
    pub fn read(&self, offset: u64, buf: &mut [u8]) {
        let (p, r) = self.at(offset);
        assert!(
            offset + buf.len() as u64 <= r.offset + r.size,
            "read crosses a region"
        );
        // SAFETY: the source range lies in one live mapping of ours and
        // does not overlap `buf`, which is ordinary heap or stack memory.
        unsafe { std::ptr::copy_nonoverlapping(p, buf.as_mut_ptr(), buf.len()) }
    }

    /// Gives pages back (`madvise(MADV_DONTNEED)`), as a balloon does: the
    /// page server gets a REMOVE event and later faults there read zeros.
    pub fn remove(&self, offset: u64, len: u64) -> io::Result<()> {
        let (p, r) = self.at(offset);
        assert!(offset.is_multiple_of(r.page_size) && len.is_multiple_of(r.page_size));
        // SAFETY: the range lies in one of our mappings; dropping its pages
        // is what the caller asked for.
        let rc = unsafe { libc::madvise(p.cast(), len as usize, libc::MADV_DONTNEED) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// The page size of the region holding `offset`.
    pub fn page_size_at(&self, offset: u64) -> u64 {
        self.at(offset).1.page_size
    }
}

impl Drop for VmmHarness {
    fn drop(&mut self) {
        for r in &self.regions {
            // SAFETY: each region was mapped by `new` and is unmapped once.
            unsafe { libc::munmap(r.base.cast(), r.size as usize) };
        }
    }
}

/// Connects to `socket` and sends `json` with `fd` attached (or none), as
/// the handshake does. For tests of bad handshakes too.
pub fn send_handshake(socket: &Path, json: &[u8], fd: Option<RawFd>) -> io::Result<UnixStream> {
    let mut stream = UnixStream::connect(socket)?;
    match fd {
        Some(fd) => {
            stream
                .send_with_fd(json, fd)
                .map_err(|e| io::Error::from_raw_os_error(e.errno()))?;
        }
        None => stream.write_all(json)?,
    }
    Ok(stream)
}

/// Deterministic guest memory of `size` bytes (whole 4 KiB pages) that
/// looks like a guest's: zero pages, text-like compressible pages, random
/// pages and repeated pages, mixed at page granularity in stretches.
pub fn synthetic_memory(size: u64, seed: u64) -> Vec<u8> {
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut out = vec![0u8; size as usize];
    let text = b"the quick brown fox jumps over the lazy dog; fn main() { let x = 42; } ";
    let mut page = 0usize;
    let pages = (size / 4096) as usize;
    while page < pages {
        let stretch = rng.usize(1..=32).min(pages - page);
        let kind = rng.u8(..10);
        for p in page..page + stretch {
            let dst = &mut out[p * 4096..(p + 1) * 4096];
            match kind {
                0..=3 => {}
                4..=6 => {
                    let salt = rng.u8(..);
                    for (i, b) in dst.iter_mut().enumerate() {
                        *b = text[(i + usize::from(salt)) % text.len()];
                    }
                    dst[..8].copy_from_slice(&(p as u64).to_le_bytes());
                }
                7 | 8 => rng.fill(dst),
                _ => dst.fill(0xa5),
            }
        }
        page += stretch;
    }
    out
}
