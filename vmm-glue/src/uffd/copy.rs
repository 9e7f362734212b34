//! UFFDIO_COPY and UFFDIO_ZEROPAGE with the protocol's rules applied.
//!
//! EEXIST means the page is already there (installed by the other side of
//! a race): it counts as done and the page is skipped. EAGAIN means the
//! VMM's address space is changing (a REMOVE event is pending): the caller
//! must read and apply pending events, then retry from where the copy
//! stopped. ESRCH means the VMM process is gone.

use std::io;

use libc::c_void;
use userfaultfd::{Error as UffdError, Uffd};

/// How an install ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Install {
    /// Every page is there; `existed` of them already were.
    Done { existed: u64 },
    /// Stopped after `done` bytes: events are pending (EAGAIN).
    Busy { done: u64 },
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
            Err(UffdError::PartiallyCopied(_)) => return Ok(Install::Busy { done: off }),
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
                Install::Busy { done } => return Ok(Install::Busy { done: at + done }),
                Install::Gone => return Ok(Install::Gone),
            }
        }
        return Ok(Install::Done { existed });
    }
    // SAFETY: the range lies in a region the VMM registered with this
    // userfaultfd (checked by the caller); the kernel maps zero pages
    // there and touches no memory of this process.
    match unsafe { uffd.zeropage(dst as *mut c_void, len as usize, wake) } {
        Ok(n) if n as u64 == len => Ok(Install::Done { existed: 0 }),
        // Part done, or a page already present, or events pending: the
        // crate does not say how far it got, so go page by page.
        Ok(_) | Err(UffdError::ZeropageFailed(_)) if len > page => {
            let mut existed = 0;
            for at in (0..len).step_by(page as usize) {
                match zero(uffd, dst + at, page, page, zeros, wake)? {
                    Install::Done { existed: e } => existed += e,
                    Install::Busy { done } => return Ok(Install::Busy { done: at + done }),
                    Install::Gone => return Ok(Install::Gone),
                }
            }
            Ok(Install::Done { existed })
        }
        Err(UffdError::ZeropageFailed(e)) if e as i32 == libc::EEXIST => {
            let _ = uffd.wake(dst as *mut c_void, page as usize);
            Ok(Install::Done { existed: 1 })
        }
        Err(UffdError::ZeropageFailed(e)) if e as i32 == libc::EAGAIN => {
            Ok(Install::Busy { done: 0 })
        }
        Err(UffdError::ZeropageFailed(e)) if e as i32 == libc::ESRCH => Ok(Install::Gone),
        Ok(n) => Err(io::Error::other(format!(
            "UFFDIO_ZEROPAGE at {dst:#x} installed {n} of {len} bytes"
        ))),
        Err(e) => Err(fail("UFFDIO_ZEROPAGE", dst, len as usize, e)),
    }
}
