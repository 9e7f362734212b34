//! The overlay's data-file I/O through io_uring: each queue has its own
//! small ring, so queues share no lock on the I/O path. A request waits for
//! its own completion (one entry in flight per ring); a kernel or sandbox
//! without io_uring falls back to plain positioned reads and writes.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::sync::{Mutex, MutexGuard};

use io_uring::{opcode, squeue, types, IoUring};

const ENTRIES: u32 = 8;

pub struct Ring(Option<Mutex<IoUring>>);

impl Ring {
    pub fn new() -> Ring {
        match IoUring::new(ENTRIES) {
            Ok(r) => Ring(Some(Mutex::new(r))),
            Err(e) => {
                tracing::warn!("io_uring unavailable ({e}); the overlay uses pread/pwrite");
                Ring(None)
            }
        }
    }

    fn lock(&self) -> Option<MutexGuard<'_, IoUring>> {
        let m = self.0.as_ref()?;
        Some(m.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Submits `entry` and waits for its result (bytes moved).
    ///
    /// SAFETY: the caller keeps every buffer `entry` points at alive and
    /// untouched until this returns; it returns only after the completion.
    #[allow(unsafe_code)]
    unsafe fn run(ring: &mut IoUring, entry: squeue::Entry) -> io::Result<usize> {
        // SAFETY: the ring is empty (one entry in flight, always reaped
        // below) and the caller upholds the buffer contract above.
        unsafe { ring.submission().push(&entry) }
            .map_err(|_| io::Error::other("io_uring submission queue full"))?;
        loop {
            match ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
            if let Some(cqe) = ring.completion().next() {
                let res = cqe.result();
                return if res < 0 {
                    Err(io::Error::from_raw_os_error(-res))
                } else {
                    Ok(res as usize)
                };
            }
        }
    }

    /// Moves `len` bytes in as many submissions as it takes: `entry(done,
    /// n)` builds the one for bytes `done..done + n`. A submission that
    /// moves nothing fails with `stuck`.
    ///
    /// SAFETY: every entry `entry` builds must point only at memory that
    /// stays valid, and is not otherwise used, until this returns.
    #[allow(unsafe_code)]
    unsafe fn run_all(
        ring: &mut IoUring,
        len: usize,
        stuck: io::ErrorKind,
        mut entry: impl FnMut(usize, u32) -> squeue::Entry,
    ) -> io::Result<()> {
        let mut done = 0;
        while done < len {
            let n = (len - done).min(u32::MAX as usize) as u32;
            // SAFETY: passed on to our caller.
            match unsafe { Ring::run(ring, entry(done, n)) }? {
                0 => return Err(stuck.into()),
                moved => done += moved,
            }
        }
        Ok(())
    }

    /// Fills `buf` from `file` at `offset`; a read past the end fails.
    #[allow(unsafe_code)]
    pub fn read_exact_at(&self, file: &File, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let Some(mut ring) = self.lock() else {
            return file.read_exact_at(buf, offset);
        };
        let (fd, ptr) = (types::Fd(file.as_raw_fd()), buf.as_mut_ptr());
        // SAFETY: every entry points into `buf`, borrowed mutably for the
        // whole call.
        unsafe {
            Ring::run_all(
                &mut ring,
                buf.len(),
                io::ErrorKind::UnexpectedEof,
                |done, n| {
                    opcode::Read::new(fd, ptr.wrapping_add(done), n)
                        .offset(offset + done as u64)
                        .build()
                },
            )
        }
    }

    /// Writes all of `buf` to `file` at `offset`.
    #[allow(unsafe_code)]
    pub fn write_all_at(&self, file: &File, buf: &[u8], offset: u64) -> io::Result<()> {
        let Some(mut ring) = self.lock() else {
            return file.write_all_at(buf, offset);
        };
        let (fd, ptr) = (types::Fd(file.as_raw_fd()), buf.as_ptr());
        // SAFETY: every entry points into `buf`, borrowed for the whole call.
        unsafe {
            Ring::run_all(&mut ring, buf.len(), io::ErrorKind::WriteZero, |done, n| {
                opcode::Write::new(fd, ptr.wrapping_add(done), n)
                    .offset(offset + done as u64)
                    .build()
            })
        }
    }

    /// Frees `len` bytes at `offset` of `file` (they read as zeros after),
    /// keeping its size.
    #[allow(unsafe_code)]
    pub fn punch_hole(&self, file: &File, offset: u64, len: u64) -> io::Result<()> {
        use rustix::fs::FallocateFlags;
        let flags = FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE;
        let Some(mut ring) = self.lock() else {
            return rustix::fs::fallocate(file, flags, offset, len).map_err(io::Error::from);
        };
        let entry = opcode::Fallocate::new(types::Fd(file.as_raw_fd()), len)
            .offset(offset)
            .mode(flags.bits() as i32)
            .build();
        // SAFETY: no buffers: the entry carries only numbers.
        unsafe { Ring::run(&mut ring, entry) }.map(drop)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_reads_and_punches_round_trip_through_the_ring() {
        let ring = Ring::new();
        assert!(ring.0.is_some(), "io_uring should be available here");
        let f = tempfile::tempfile().unwrap();
        f.set_len(1 << 20).unwrap();
        let data: Vec<u8> = (0..3 * 4096u32).map(|i| (i % 251) as u8).collect();
        ring.write_all_at(&f, &data, 8192).unwrap();
        let mut back = vec![0u8; data.len()];
        ring.read_exact_at(&f, &mut back, 8192).unwrap();
        assert_eq!(back, data);
        ring.punch_hole(&f, 12288, 4096).unwrap();
        ring.read_exact_at(&f, &mut back, 8192).unwrap();
        assert_eq!(back[..4096], data[..4096]);
        assert!(back[4096..8192].iter().all(|&b| b == 0));
        assert_eq!(back[8192..], data[8192..]);
        let mut past = [0u8; 16];
        assert!(ring.read_exact_at(&f, &mut past, (1 << 20) - 8).is_err());
    }
}
