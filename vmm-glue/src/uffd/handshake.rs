//! The handshake of Firecracker's external page-fault handler protocol.
//!
//! The VMM connects to the handler's Unix socket and sends, in one
//! message, a UTF-8 JSON array describing its guest memory regions with
//! the userfaultfd attached as SCM_RIGHTS. Each object has
//! `base_host_virt_addr`, `size` and `offset` (where the region starts in
//! the memory file), and by release:
//! - 1.12 and later: `page_size` in bytes and the deprecated
//!   `page_size_kib`, which holds bytes despite its name;
//! - 1.7 to 1.11: `page_size_kib` only;
//! - 1.6 and older: no page size at all, which means the host's.
//!
//! All are accepted. The VMM has already called UFFDIO_API and registered
//! every region.

use std::fs::File;
use std::io;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use serde::Deserialize;
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

/// A handshake larger than this is refused (about 40,000 regions).
pub const MAX_HANDSHAKE_BYTES: usize = 4 << 20;
/// Regions one handshake may describe.
pub const MAX_REGIONS: usize = 4096;
/// The largest page size accepted (1 GiB huge pages).
const MAX_PAGE_SIZE: u64 = 1 << 30;

#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    #[error("the VMM sent nothing within {0:?} of connecting")]
    Timeout(Duration),
    #[error("the VMM closed the connection before sending its handshake ({0} bytes received)")]
    Closed(usize),
    #[error("reading the handshake failed")]
    Io(#[source] io::Error),
    #[error("the handshake is over {MAX_HANDSHAKE_BYTES} bytes")]
    TooLarge,
    #[error(
        "the handshake carried no userfaultfd (expected one SCM_RIGHTS descriptor with the JSON)"
    )]
    NoFd,
    #[error("the handshake is not a JSON array of regions: {0}")]
    Malformed(String),
    #[error("region {index} is invalid: {why}")]
    BadRegion { index: usize, why: String },
    #[error("regions {a} and {b} overlap in the VMM's address space")]
    Overlap { a: usize, b: usize },
}

/// One guest memory region as the VMM mapped it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct GuestRegion {
    /// Where the region is mapped in the VMM process.
    pub base: u64,
    pub size: u64,
    /// Where the region's bytes start in the memory file (the snapshot).
    pub offset: u64,
    pub page_size: u64,
}

impl GuestRegion {
    pub fn end(&self) -> u64 {
        self.base + self.size
    }

    pub fn contains(&self, addr: u64) -> bool {
        (self.base..self.end()).contains(&addr)
    }

    pub fn pages(&self) -> u64 {
        self.size / self.page_size
    }
}

/// Unknown fields are ignored, so a newer VMM's additions do not break it.
#[derive(Deserialize)]
struct WireRegion {
    base_host_virt_addr: u64,
    size: u64,
    offset: u64,
    #[serde(default)]
    page_size: Option<u64>,
    #[serde(default)]
    page_size_kib: Option<u64>,
}

/// Parses and checks the JSON of a handshake against a snapshot of
/// `image_size` bytes. Regions come back sorted by address.
pub fn parse_regions(json: &[u8], image_size: u64) -> Result<Vec<GuestRegion>, HandshakeError> {
    let wire: Vec<WireRegion> =
        serde_json::from_slice(json).map_err(|e| HandshakeError::Malformed(e.to_string()))?;
    if wire.is_empty() {
        return Err(HandshakeError::Malformed("no regions".into()));
    }
    if wire.len() > MAX_REGIONS {
        return Err(HandshakeError::Malformed(format!(
            "{} regions, more than {MAX_REGIONS}",
            wire.len()
        )));
    }
    let mut regions = Vec::with_capacity(wire.len());
    for (index, w) in wire.iter().enumerate() {
        let bad = |why: String| HandshakeError::BadRegion { index, why };
        let page_size = match (w.page_size, w.page_size_kib) {
            (Some(a), Some(b)) if a != b => {
                return Err(bad(format!(
                    "page_size {a} and page_size_kib {b} disagree (both are bytes)"
                )))
            }
            (Some(p), _) | (None, Some(p)) => p,
            // Firecracker 1.6 and older: no huge pages yet.
            (None, None) => host_page_size(),
        };
        if !page_size.is_power_of_two() || !(4096..=MAX_PAGE_SIZE).contains(&page_size) {
            return Err(bad(format!(
                "page size {page_size} is not a power of two from 4096 to 1 GiB"
            )));
        }
        let r = GuestRegion {
            base: w.base_host_virt_addr,
            size: w.size,
            offset: w.offset,
            page_size,
        };
        if r.size == 0 {
            return Err(bad("size 0".into()));
        }
        if !r.base.is_multiple_of(page_size)
            || !r.size.is_multiple_of(page_size)
            || !r.offset.is_multiple_of(page_size)
        {
            return Err(bad(format!(
                "base {:#x}, size {} and offset {} must be multiples of the page size {page_size}",
                r.base, r.size, r.offset
            )));
        }
        if r.base.checked_add(r.size).is_none() {
            return Err(bad("base + size overflows".into()));
        }
        match r.offset.checked_add(r.size) {
            Some(end) if end <= image_size => {}
            _ => {
                return Err(bad(format!(
                    "bytes {}..{} of the memory file, but the snapshot has {image_size} bytes",
                    r.offset,
                    r.offset.saturating_add(r.size)
                )))
            }
        }
        regions.push((index, r));
    }
    regions.sort_by_key(|(_, r)| r.base);
    for w in regions.windows(2) {
        if w[0].1.end() > w[1].1.base {
            return Err(HandshakeError::Overlap {
                a: w[0].0.min(w[1].0),
                b: w[0].0.max(w[1].0),
            });
        }
    }
    Ok(regions.into_iter().map(|(_, r)| r).collect())
}

/// The host's base page size.
fn host_page_size() -> u64 {
    // SAFETY: sysconf reads a constant of the running system; no memory
    // of ours is involved.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u64::try_from(size).unwrap_or(4096)
}

/// Reads a handshake from `stream`: the JSON bytes and the userfaultfd.
/// Waits at most `timeout` for it. A read of no bytes is retried (a VMM
/// may connect before it writes) until the deadline; a message split
/// over several reads is put back together.
pub fn receive(stream: &UnixStream, timeout: Duration) -> Result<(Vec<u8>, File), HandshakeError> {
    let deadline = Instant::now() + timeout;
    let mut json = Vec::new();
    let mut fd: Option<File> = None;
    let mut buf = vec![0u8; 256 << 10];
    let mut closed = false;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        stream
            .set_read_timeout(Some(left))
            .map_err(HandshakeError::Io)?;
        match stream.recv_with_fd(&mut buf) {
            Ok((0, None)) => {
                // Nothing yet, or the peer has gone: check again shortly.
                if peer_closed(stream) {
                    closed = true;
                    break;
                }
                std::thread::sleep(Duration::from_millis(1));
                continue;
            }
            Ok((n, got)) => {
                json.extend_from_slice(&buf[..n]);
                if got.is_some() && fd.is_none() {
                    fd = got;
                }
            }
            Err(e) if matches!(e.errno(), libc::EAGAIN | libc::EINTR) => continue,
            Err(e) => return Err(HandshakeError::Io(io::Error::from_raw_os_error(e.errno()))),
        }
        if json.len() > MAX_HANDSHAKE_BYTES {
            return Err(HandshakeError::TooLarge);
        }
        // Complete once it parses as JSON, or fails for a reason other
        // than running out of bytes.
        match serde_json::from_slice::<serde::de::IgnoredAny>(&json) {
            Err(e) if e.is_eof() => continue,
            _ => break,
        }
    }
    stream.set_read_timeout(None).map_err(HandshakeError::Io)?;
    match (json.is_empty(), fd) {
        (true, _) if closed => Err(HandshakeError::Closed(0)),
        (true, _) => Err(HandshakeError::Timeout(timeout)),
        // What came is parsed (and its faults named) by `parse_regions`.
        (false, Some(fd)) => Ok((json, fd)),
        (false, None) => Err(HandshakeError::NoFd),
    }
}

/// Whether the peer has closed its end (a zero-byte read means EOF then).
fn peer_closed(stream: &UnixStream) -> bool {
    use rustix::event::{poll, PollFd, PollFlags};
    let mut fds = [PollFd::new(stream, PollFlags::IN | PollFlags::RDHUP)];
    let zero = rustix::event::Timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    matches!(poll(&mut fds, Some(&zero)), Ok(n) if n > 0)
        && fds[0]
            .revents()
            .intersects(PollFlags::HUP | PollFlags::RDHUP)
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;

    #[test]
    fn accepts_every_release_shape() {
        let current = br#"[{"base_host_virt_addr":1073741824,"size":1073741824,"offset":0,"page_size":4096,"page_size_kib":4096}]"#;
        let newer = br#"[{"base_host_virt_addr":1073741824,"size":1073741824,"offset":0,"page_size":4096}]"#;
        let older = br#"[{"base_host_virt_addr":1073741824,"size":1073741824,"offset":0,"page_size_kib":4096}]"#;
        let oldest = br#"[{"base_host_virt_addr":1073741824,"size":1073741824,"offset":0}]"#;
        assert_eq!(host_page_size(), 4096, "x86-64");
        for json in [&current[..], &newer[..], &older[..], &oldest[..]] {
            let r = parse_regions(json, 2 * GIB).unwrap();
            assert_eq!(
                r,
                vec![GuestRegion {
                    base: GIB,
                    size: GIB,
                    offset: 0,
                    page_size: 4096
                }]
            );
        }
    }

    #[test]
    fn several_regions_come_back_sorted_and_huge_pages_are_fine() {
        let json = br#"[{"base_host_virt_addr":8589934592,"size":4194304,"offset":4096,"page_size":4096},
                        {"base_host_virt_addr":4294967296,"size":4194304,"offset":4194304,"page_size":2097152}]"#;
        // The first region's offset (4096) is not 2 MiB-aligned but its pages are 4 KiB.
        let r = parse_regions(json, 16 << 20).unwrap();
        assert_eq!(r[0].page_size, 2 << 20);
        assert_eq!(r[1].offset, 4096);
    }

    #[test]
    fn bad_handshakes_are_clear_errors() {
        let cases: &[(&[u8], &str)] = &[
            (b"not json", "not a JSON array"),
            (b"{}", "not a JSON array"),
            (b"[]", "no regions"),
            (br#"[{"base_host_virt_addr":4096,"size":4096,"offset":0,"page_size":4096,"page_size_kib":4}]"#, "disagree"),
            (br#"[{"base_host_virt_addr":4097,"size":4096,"offset":0,"page_size":4096}]"#, "multiples"),
            (br#"[{"base_host_virt_addr":4096,"size":6000,"offset":0,"page_size":4096}]"#, "multiples"),
            (br#"[{"base_host_virt_addr":4096,"size":4096,"offset":0,"page_size":3000}]"#, "power of two"),
            (br#"[{"base_host_virt_addr":4096,"size":0,"offset":0,"page_size":4096}]"#, "size 0"),
            (br#"[{"base_host_virt_addr":4096,"size":1073741824,"offset":0,"page_size":4096}]"#, "snapshot has"),
            (br#"[{"base_host_virt_addr":4096,"size":8192,"offset":0,"page_size":4096},{"base_host_virt_addr":8192,"size":4096,"offset":8192,"page_size":4096}]"#, "overlap"),
            (br#"[{"base_host_virt_addr":18446744073709547520,"size":8192,"offset":0,"page_size":4096}]"#, "overflows"),
        ];
        for (json, want) in cases {
            let err = parse_regions(json, 1 << 20).unwrap_err().to_string();
            assert!(
                err.contains(want),
                "{}: {err}",
                String::from_utf8_lossy(json)
            );
        }
    }
}
