//! UFFDIO_COPY and UFFDIO_ZEROPAGE with the protocol's rules applied.
//!
//! EEXIST means the page is already there (installed by the other side of
//! a race): it counts as done and the page is skipped. EAGAIN with nothing
//! done means the VMM's address space is changing (a REMOVE event is
//! pending): the caller must read and apply pending events, then retry
//! from where the copy stopped; with part done it only says where the
//! kernel stopped (at a page already there), and the copy goes on from
//! there, so every page is counted once, by whoever installed it. ESRCH
//! means the VMM process is gone.

use std::io;
use std::os::fd::AsRawFd;

use libc::c_void;
use userfaultfd::{Error as UffdError, Uffd};

/// How an install ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Install {
    /// Every page is there; `existed` of them already were.
    Done { existed: u64 },
    /// Stopped after `done` bytes, `existed` pages of which already were
    /// there: events are pending (EAGAIN).
    Busy { done: u64, existed: u64 },
    /// The VMM's address space is gone.
    Gone,
}

fn errno_of(e: &UffdError) -> Option<i32> {
    match e {
        UffdError::CopyFailed(errno) | UffdError::ZeropageFailed(errno) => Some(*errno as i32),
        UffdError::SystemError(errno) => Some(*errno as i32),
        _ => None,
    }
}

fn fail(what: &str, dst: u64, len: usize, e: UffdError) -> io::Error {
    let errno = errno_of(&e).map_or(String::new(), |n| {
        format!(": {}", io::Error::from_raw_os_error(n))
    });
    io::Error::other(format!(
        "{what} of {len} bytes at {dst:#x} failed{errno} ({e})"
    ))
}

/// Installs `src` at `dst` (both whole pages of `page` bytes) and, with
/// `wake`, wakes any thread faulting there.
pub fn copy(uffd: &Uffd, dst: u64, src: &[u8], page: u64, wake: bool) -> io::Result<Install> {
    let len = src.len() as u64;
    let (mut off, mut existed) = (0u64, 0u64);
    while off < len {
        let rest = (len - off) as usize;
        // SAFETY: `src[off..]` is `rest` readable bytes; the kernel copies
        // them into the VMM's registered range at `dst + off`, which is
        // inside a region the VMM described (checked by the caller), and
        // never writes to memory of this process.
        let r = unsafe {
            uffd.copy(
                src.as_ptr().add(off as usize) as *const c_void,
                (dst + off) as *mut c_void,
                rest,
                wake,
            )
        };
        match r {
            Ok(n) => off += n as u64,
            // The crate reports EAGAIN as a partial copy; a negative count
            // (the errno) means nothing was copied.
            Err(UffdError::PartiallyCopied(n)) if (n as isize) > 0 => off += n as u64,
            Err(UffdError::PartiallyCopied(_)) => return Ok(Install::Busy { done: off, existed }),
            Err(UffdError::CopyFailed(e)) if e as i32 == libc::EEXIST => {
                existed += 1;
                // Whoever installed it may not have woken this page's waiters.
                let _ = uffd.wake((dst + off) as *mut c_void, page as usize);
                off += page;
            }
            Err(UffdError::CopyFailed(e)) if e as i32 == libc::ESRCH => return Ok(Install::Gone),
            Err(e) => return Err(fail("UFFDIO_COPY", dst + off, rest, e)),
        }
    }
    Ok(Install::Done { existed })
}

/// Installs zero pages over `[dst, dst + len)` (waking faulting threads
/// with `wake`). Huge pages take no ZEROPAGE: they are copied from `zeros`
/// (at least one page of zeros).
pub fn zero(
    uffd: &Uffd,
    dst: u64,
    len: u64,
    page: u64,
    zeros: &[u8],
    wake: bool,
) -> io::Result<Install> {
    if page > 4096 {
        let mut existed = 0;
        for at in (0..len).step_by(page as usize) {
            match copy(uffd, dst + at, &zeros[..page as usize], page, wake)? {
                Install::Done { existed: e } => existed += e,
                Install::Busy { done, existed: e } => {
                    return Ok(Install::Busy {
                        done: at + done,
                        existed: existed + e,
                    })
                }
                Install::Gone => return Ok(Install::Gone),
            }
        }
        return Ok(Install::Done { existed });
    }
    let (mut off, mut existed) = (0u64, 0u64);
    while off < len {
        match zeropage(uffd, dst + off, len - off, wake) {
            Ok(n) => off += n,
            // Part done: up to a page already there, or events pending.
            Err((libc::EAGAIN, n)) if n > 0 => off += n,
            Err((libc::EAGAIN, _)) => return Ok(Install::Busy { done: off, existed }),
            Err((libc::EEXIST, _)) => {
                existed += 1;
                // Whoever installed it may not have woken this page's waiters.
                let _ = uffd.wake((dst + off) as *mut c_void, page as usize);
                off += page;
            }
            Err((libc::ESRCH, _)) => return Ok(Install::Gone),
            Err((errno, _)) => {
                return Err(io::Error::other(format!(
                    "UFFDIO_ZEROPAGE of {} bytes at {:#x} failed: {}",
                    len - off,
                    dst + off,
                    io::Error::from_raw_os_error(errno)
                )))
            }
        }
    }
    Ok(Install::Done { existed })
}

/// `struct uffdio_zeropage` of <linux/userfaultfd.h>.
#[repr(C)]
struct UffdioZeropage {
    start: u64,
    len: u64,
    mode: u64,
    zeropage: i64,
}

/// `UFFDIO_ZEROPAGE`: `_IOWR(0xAA, 0x04, struct uffdio_zeropage)`.
const UFFDIO_ZEROPAGE: libc::c_ulong = 0xC020_AA04;
const UFFDIO_ZEROPAGE_MODE_DONTWAKE: u64 = 1;

/// One UFFDIO_ZEROPAGE over `[dst, dst + len)`: the bytes zeroed, or the
/// errno with the bytes zeroed before it (the userfaultfd crate drops
/// those, and a partial zeroing reports EAGAIN).
fn zeropage(uffd: &Uffd, dst: u64, len: u64, wake: bool) -> Result<u64, (i32, u64)> {
    let mut arg = UffdioZeropage {
        start: dst,
        len,
        mode: if wake {
            0
        } else {
            UFFDIO_ZEROPAGE_MODE_DONTWAKE
        },
        zeropage: 0,
    };
    // SAFETY: `arg` is a live uffdio_zeropage the kernel reads and writes
    // back; the range lies in a region the VMM registered with this
    // userfaultfd (checked by the caller), where the kernel maps zero pages;
    // no memory of this process is written but `arg`.
    let rc = unsafe { libc::ioctl(uffd.as_raw_fd(), UFFDIO_ZEROPAGE, &mut arg) };
    let done = u64::try_from(arg.zeropage).unwrap_or(0);
    if rc == 0 {
        Ok(done)
    } else {
        Err((io::Error::last_os_error().raw_os_error().unwrap_or(0), done))
    }
}
