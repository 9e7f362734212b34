//! Carrying out a parsed request against the lazy disk.

use cairn_engine::disk::LazyDisk;
use virtio_bindings::virtio_blk::{VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory, Permissions};

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

/// The most scratch memory one request uses, however large it is: a
/// write is gathered and written this much at a time.
pub const SCRATCH_BYTES: usize = 1 << 20;

/// Runs `req`. `writethrough` flushes after every write (the driver did
/// not negotiate FLUSH, or turned the write cache off). `scratch` is
/// reused between requests and never grows past [`SCRATCH_BYTES`].
/// Failures become IOERR with a log line, never a panic.
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

/// Byte offset of `sector`, refusing an overflow.
fn byte_offset(sector: u64) -> Result<u64, String> {
    sector
        .checked_mul(SECTOR)
        .ok_or_else(|| format!("sector {sector} is past any disk"))
}

fn run<M: GuestMemory>(
    req: &Request,
    disk: &LazyDisk,
    mem: &M,
    cfg: &ExecConfig,
    writethrough: bool,
    scratch: &mut Vec<u8>,
) -> Result<u32, String> {
    let writes = matches!(
        req.kind,
        Kind::Write | Kind::Discard(_) | Kind::WriteZeroes(_)
    );
    if writes && cfg.read_only {
        return Err("the disk is read-only".into());
    }
    match &req.kind {
        Kind::Read => {
            let mut offset = byte_offset(req.sector)?;
            for &(addr, len) in &req.data {
                // Straight into the guest's buffer when it lies in one region.
                match with_guest_buffer(mem, addr, len, |buf| disk.read(offset, buf)) {
                    Some(read) => read.map_err(|e| e.to_string())?,
                    None => {
                        scratch.resize(len as usize, 0);
                        disk.read(offset, scratch).map_err(|e| e.to_string())?;
                        mem.write_slice(scratch, addr)
                            .map_err(|e| format!("writing guest memory at {:#x}: {e}", addr.0))?;
                    }
                }
                offset += u64::from(len);
            }
            Ok(req.data_len as u32)
        }
        Kind::Write => {
            let offset = byte_offset(req.sector)?;
            write_gathered(mem, &req.data, req.data_len, scratch, |at, bytes| {
                disk.write(offset + at, bytes).map_err(|e| e.to_string())
            })?;
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
                disk.write_zeroes(byte_offset(s.sector)?, u64::from(s.sectors) * SECTOR)
                    .map_err(|e| e.to_string())?;
            }
            if writethrough {
                disk.flush().map_err(|e| e.to_string())?;
            }
            Ok(0)
        }
    }
}

/// Hands the guest buffers `bufs` (`len` bytes, whole blocks) to `write`
/// (offset within the request, bytes), gathering at most
/// [`SCRATCH_BYTES`] at a time.
fn write_gathered<M: GuestMemory>(
    mem: &M,
    bufs: &[(GuestAddress, u32)],
    len: u64,
    scratch: &mut Vec<u8>,
    mut write: impl FnMut(u64, &[u8]) -> Result<(), String>,
) -> Result<(), String> {
    let mut offset = 0u64;
    scratch.resize(len.min(SCRATCH_BYTES as u64) as usize, 0);
    let mut filled = 0usize;
    for &(addr, n) in bufs {
        let mut done = 0usize;
        while done < n as usize {
            let take = (n as usize - done).min(scratch.len() - filled);
            let at = addr.unchecked_add(done as u64);
            mem.read_slice(&mut scratch[filled..filled + take], at)
                .map_err(|e| format!("reading guest memory at {:#x}: {e}", at.0))?;
            filled += take;
            done += take;
            if filled == scratch.len() {
                write(offset, scratch)?;
                offset += filled as u64;
                filled = 0;
            }
        }
    }
    if filled > 0 {
        write(offset, &scratch[..filled])?;
    }
    Ok(())
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

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryMmap;

    #[test]
    fn a_huge_write_is_gathered_through_bounded_scratch() {
        // The largest request the device allows: 126 descriptors of 1 MiB.
        let mib = 1u64 << 20;
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 127 << 20)]).unwrap();
        let bufs: Vec<(GuestAddress, u32)> = (0..126u64)
            .map(|i| {
                let at = GuestAddress(i * mib + 512);
                mem.write_slice(&[i as u8; 8], at).unwrap();
                (at, mib as u32)
            })
            .collect();
        let mut scratch = Vec::new();
        let mut pieces = Vec::new();
        write_gathered(&mem, &bufs, 126 * mib, &mut scratch, |at, bytes| {
            pieces.push((at, bytes.len(), bytes[0]));
            Ok(())
        })
        .unwrap();
        assert!(
            scratch.capacity() <= SCRATCH_BYTES,
            "{}",
            scratch.capacity()
        );
        assert_eq!(pieces.len(), 126);
        assert!(pieces
            .iter()
            .enumerate()
            .all(|(i, &(at, n, first))| at == i as u64 * mib
                && n == mib as usize
                && first == i as u8));
    }
}
