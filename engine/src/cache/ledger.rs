//! What every process sharing a cache directory agrees on: the bytes its
//! chunk files take, in one small file updated under a lock.
//!
//! The bound is on the directory, not on one process's share of it: each
//! process reserves the bytes of a chunk here before writing it, and
//! whoever unlinks a chunk file gives its bytes back. A crash between the
//! two leaves the count high (the cache holds less than its bound, never
//! more) until the next process that lists the directory under the lock
//! sets it to what is there. `chunks.users` tells a process whether it is
//! alone: every open cache holds a shared lock on it. Layout:
//! `docs/formats/cache.md`.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::{Mutex, MutexGuard};

use crate::le::Reader;

const MAGIC: [u8; 4] = *b"CRNL";
const VERSION: u32 = 1;
const LEN: usize = 24;

/// The shared counts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    /// Bytes of chunk files, plus reservations for files being written.
    pub used: u64,
    /// Bytes reserved by inserts since the ledger was made, by any process
    /// (it tells a process how much others have added since it looked).
    pub inserted: u64,
}

/// Opens `path` for reading and writing, creating it empty if missing.
fn open_or_create(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
}

pub struct Ledger {
    /// Threads of one process share the descriptor, and with it the
    /// `flock`; the mutex keeps them apart.
    file: Mutex<File>,
}

impl Ledger {
    /// Opens (creating, never truncating) the ledger at `path`.
    pub fn open(path: &Path) -> io::Result<Ledger> {
        Ok(Ledger {
            file: Mutex::new(open_or_create(path)?),
        })
    }

    fn lock(&self) -> io::Result<Locked<'_>> {
        let file = self.file.lock().unwrap_or_else(|p| p.into_inner());
        file.lock()?;
        Ok(Locked { file })
    }

    /// Runs `f` on the counts with every other user of the directory kept
    /// out, and stores what it leaves. A new or damaged ledger reads as
    /// zero (opening the cache recounts).
    pub fn update<T>(&self, f: impl FnOnce(&mut Counts) -> T) -> io::Result<T> {
        let locked = self.lock()?;
        let before = locked.read()?;
        let mut counts = before.unwrap_or_default();
        let out = f(&mut counts);
        if Some(counts) != before {
            locked.write(counts)?;
        }
        Ok(out)
    }

    /// The counts as they stand.
    pub fn read(&self) -> io::Result<Counts> {
        Ok(self.lock()?.read()?.unwrap_or_default())
    }
}

struct Locked<'a> {
    file: MutexGuard<'a, File>,
}

impl Locked<'_> {
    fn read(&self) -> io::Result<Option<Counts>> {
        let mut buf = [0u8; LEN];
        let n = self.file.read_at(&mut buf, 0)?;
        // magic, version, bytes used, bytes ever inserted.
        let mut r = Reader::new(&buf[..n]);
        let fields = (r.array::<4>(), r.u32(), r.u64(), r.u64());
        let (Ok(magic), Ok(version), Ok(used), Ok(inserted)) = fields else {
            return Ok(None);
        };
        if magic != MAGIC || version != VERSION {
            return Ok(None);
        }
        Ok(Some(Counts { used, inserted }))
    }

    fn write(&self, c: Counts) -> io::Result<()> {
        let mut buf = [0u8; LEN];
        buf[0..4].copy_from_slice(&MAGIC);
        buf[4..8].copy_from_slice(&VERSION.to_le_bytes());
        buf[8..16].copy_from_slice(&c.used.to_le_bytes());
        buf[16..24].copy_from_slice(&c.inserted.to_le_bytes());
        // One write of 24 bytes at offset 0: another process sees all of
        // it or none of it.
        self.file.write_all_at(&buf, 0)
    }
}

impl Drop for Locked<'_> {
    fn drop(&mut self) {
        let _ = self.file.unlock();
    }
}

/// This process's share in the directory: a shared lock held while the
/// cache is open.
pub struct Users {
    file: File,
}

impl Users {
    /// Joins the users of the directory; `true` with it if no other
    /// process is using it (the caller may then set the ledger right).
    /// Call [`Users::settle`] once that is done.
    pub fn join(path: &Path) -> io::Result<(Users, bool)> {
        let file = open_or_create(path)?;
        let alone = match file.try_lock() {
            Ok(()) => true,
            Err(std::fs::TryLockError::WouldBlock) => {
                file.lock_shared()?;
                false
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(e),
        };
        Ok((Users { file }, alone))
    }

    /// Lets other processes in: trades the exclusive lock of a process
    /// that was alone for a shared one.
    pub fn settle(&self) -> io::Result<()> {
        self.file.unlock()?;
        self.file.lock_shared()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_are_shared_between_openers_and_damage_reads_as_zero() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("chunks.ledger");
        let a = Ledger::open(&path).unwrap();
        let b = Ledger::open(&path).unwrap();
        assert_eq!(a.read().unwrap(), Counts::default());
        a.update(|c| c.used += 100).unwrap();
        b.update(|c| {
            c.used += 20;
            c.inserted += 20;
        })
        .unwrap();
        assert_eq!(
            a.read().unwrap(),
            Counts {
                used: 120,
                inserted: 20
            }
        );
        std::fs::write(&path, b"junk").unwrap();
        assert_eq!(b.read().unwrap(), Counts::default());
    }

    #[test]
    fn only_a_lone_user_is_told_it_is_alone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("chunks.users");
        let (first, alone) = Users::join(&path).unwrap();
        assert!(alone);
        first.settle().unwrap();
        let (second, alone) = Users::join(&path).unwrap();
        assert!(!alone);
        drop(first);
        drop(second);
        assert!(Users::join(&path).unwrap().1);
    }
}
