//! Carrying out a parsed request against the lazy disk.

use cairn_engine::disk::LazyDisk;
use virtio_bindings::virtio_blk::{VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK};
use vm_memory::{Bytes, GuestAddress, GuestMemory, Permissions};

use super::request::{Kind, Request, SECTOR};

/// Per-device settings a request needs.
#[derive(Debug, Clone)]
pub struct ExecConfig {
    pub read_only: bool,
    pub serial: String,
}

/// The status for the guest and the bytes written into its buffers
/// (status byte included): the used length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Done {
    pub status: u8,
    pub used_len: u32,
}

/// Runs `req`. `writethrough` flushes after every write (the guest turned
/// the write cache off through CONFIG_WCE). `scratch` is reused between
/// requests. Failures become IOERR with a log line, never a panic.
pub fn execute<M: GuestMemory>(
    req: &Request,
    disk: &LazyDisk,
    mem: &M,
    cfg: &ExecConfig,
    writethrough: bool,
    scratch: &mut Vec<u8>,
) -> Done {
    match run(req, disk, mem, cfg, writethrough, scratch) {
        Ok(written) => Done {
            status: VIRTIO_BLK_S_OK as u8,
            used_len: written + 1,
        },
        Err(why) => {
            tracing::warn!(kind = ?req.kind, sector = req.sector, len = req.data_len, "request failed: {why}");
            Done {
                status: VIRTIO_BLK_S_IOERR as u8,
                used_len: 1,
            }
        }
    }
}

fn run<M: GuestMemory>(
    req: &Request,
    disk: &LazyDisk,
    mem: &M,
    cfg: &ExecConfig,
    writethrough: bool,
    scratch: &mut Vec<u8>,
) -> Result<u32, String> {
    let offset = req.sector * SECTOR;
    let writes = matches!(
        req.kind,
        Kind::Write | Kind::Discard(_) | Kind::WriteZeroes(_)
    );
    if writes && cfg.read_only {
        return Err("the disk is read-only".into());
    }
    match &req.kind {
        Kind::Read => {
            // The common request, one buffer: read straight into it.
            if let [(addr, len)] = req.data[..] {
                if let Some(read) = with_guest_buffer(mem, addr, len, |buf| disk.read(offset, buf))
                {
                    read.map_err(|e| e.to_string())?;
                    return Ok(len);
                }
            }
            scratch.resize(req.data_len as usize, 0);
            disk.read(offset, scratch).map_err(|e| e.to_string())?;
            scatter(mem, &req.data, scratch)?;
            Ok(req.data_len as u32)
        }
        Kind::Write => {
            scratch.resize(req.data_len as usize, 0);
            gather(mem, &req.data, scratch)?;
            disk.write(offset, scratch).map_err(|e| e.to_string())?;
            if writethrough {
                disk.flush().map_err(|e| e.to_string())?;
            }
            Ok(0)
        }
        Kind::Flush => {
            disk.flush().map_err(|e| e.to_string())?;
            Ok(0)
        }
        Kind::GetId => {
            let mut id = [0u8; VIRTIO_BLK_ID_BYTES as usize];
            let s = cfg.serial.as_bytes();
            let n = s.len().min(id.len());
            id[..n].copy_from_slice(&s[..n]);
            scatter(mem, &req.data, &id)?;
            Ok(id.len() as u32)
        }
        Kind::Discard(segs) | Kind::WriteZeroes(segs) => {
            for s in segs {
                disk.write_zeroes(s.sector * SECTOR, u64::from(s.sectors) * SECTOR)
                    .map_err(|e| e.to_string())?;
            }
            if writethrough {
                disk.flush().map_err(|e| e.to_string())?;
            }
            Ok(0)
        }
    }
}

/// Runs `f` on the guest buffer of `len` bytes at `addr` as a byte slice,
/// if the buffer lies in one region of guest memory (else `None`).
#[allow(unsafe_code)]
fn with_guest_buffer<M: GuestMemory, R>(
    mem: &M,
    addr: GuestAddress,
    len: u32,
    f: impl FnOnce(&mut [u8]) -> R,
) -> Option<R> {
    let slice = mem
        .get_slices(addr, len as usize, Permissions::Write)
        .ok()?
        .next()?
        .ok()?;
    if slice.len() != len as usize {
        return None; // spans regions: the caller copies through scratch
    }
    let guard = slice.ptr_guard_mut();
    // SAFETY: the slice is `len` bytes mapped in one region, which stays
    // mapped while `mem` is borrowed (the slice's lifetime is tied to it),
    // and the byte slice lives only for the call of `f`. The request parser
    // checked the buffer is device-writable: by the virtio contract the
    // guest does not touch it until the request is completed, and a guest
    // that does can only scramble bytes of its own buffer (any byte value
    // is valid for `u8`). No dirty-page bitmap is kept (`Bitmap = ()`), so
    // none is bypassed.
    let buf = unsafe { std::slice::from_raw_parts_mut(guard.as_ptr(), len as usize) };
    Some(f(buf))
}

/// Copies `src` into the guest buffers in order (as much as fits).
fn scatter<M: GuestMemory>(
    mem: &M,
    bufs: &[(GuestAddress, u32)],
    mut src: &[u8],
) -> Result<(), String> {
    for &(addr, len) in bufs {
        if src.is_empty() {
            break;
        }
        let n = (len as usize).min(src.len());
        mem.write_slice(&src[..n], addr)
            .map_err(|e| format!("writing guest memory at {:#x}: {e}", addr.0))?;
        src = &src[n..];
    }
    Ok(())
}

/// Fills `dst` from the guest buffers in order.
fn gather<M: GuestMemory>(
    mem: &M,
    bufs: &[(GuestAddress, u32)],
    dst: &mut [u8],
) -> Result<(), String> {
    let mut at = 0usize;
    for &(addr, len) in bufs {
        let n = len as usize;
        mem.read_slice(&mut dst[at..at + n], addr)
            .map_err(|e| format!("reading guest memory at {:#x}: {e}", addr.0))?;
        at += n;
    }
    Ok(())
}
