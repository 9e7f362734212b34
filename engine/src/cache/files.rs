//! The chunks directory: what each name is, temporaries being written, and
//! listings of what is there.
//!
//! A chunk is written to `.tmp-<short id>-<random>`, created new and locked
//! (`flock`) by its writer for as long as it writes, then renamed to its
//! id without replacing a file already there (another process cached the
//! same chunk first: the temporary is dropped). A temporary is abandoned,
//! its writer gone, when nobody holds its lock; one that is locked, or
//! younger than [`TEMP_GRACE`] (the moment between creating and locking
//! it), belongs to a live writer and is left alone.

use std::ffi::OsStr;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use rustix::fs::{renameat_with, RenameFlags, CWD};
use rustix::io::Errno;

use crate::id::ChunkId;

const TEMP_PREFIX: &str = ".tmp-";
/// A temporary younger than this is never taken for abandoned.
pub const TEMP_GRACE: Duration = Duration::from_secs(60);

/// What a name in the chunks directory is.
pub enum Name {
    Chunk(ChunkId),
    Temp,
    Other,
}

pub fn classify(name: &OsStr) -> Name {
    let Some(name) = name.to_str() else {
        return Name::Other;
    };
    if name.starts_with(TEMP_PREFIX) {
        return Name::Temp;
    }
    name.parse().map_or(Name::Other, Name::Chunk)
}

/// A chunk file being written, locked by its writer.
pub struct Temp {
    path: PathBuf,
    file: File,
    done: bool,
}

impl Temp {
    pub fn create(dir: &Path, id: &ChunkId) -> io::Result<Temp> {
        let path = dir.join(format!(
            "{TEMP_PREFIX}{}-{:08x}",
            id.short(),
            fastrand::u32(..)
        ));
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)?;
        let temp = Temp {
            path,
            file,
            done: false,
        };
        temp.file.lock()?;
        Ok(temp)
    }

    #[cfg(test)]
    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn write(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.file.write_all(bytes)
    }

    /// Moves the file to `dest` unless a file is there already; whether
    /// it was moved. Either way the temporary is gone after.
    pub fn install(mut self, dest: &Path) -> io::Result<bool> {
        let moved = rename_unless_there(&self.path, dest)?;
        self.done = moved;
        Ok(moved)
    }
}

impl Drop for Temp {
    fn drop(&mut self) {
        if !self.done {
            let _ = fs::remove_file(&self.path);
        }
    }
}

/// `rename(from, to)` that fails rather than replace `to`: false if `to`
/// exists. Falls back to link-then-unlink where the file system has no
/// RENAME_NOREPLACE.
fn rename_unless_there(from: &Path, to: &Path) -> io::Result<bool> {
    match renameat_with(CWD, from, CWD, to, RenameFlags::NOREPLACE) {
        Ok(()) => Ok(true),
        Err(Errno::EXIST) => Ok(false),
        Err(Errno::INVAL | Errno::NOSYS | Errno::OPNOTSUPP) => match fs::hard_link(from, to) {
            Ok(()) => fs::remove_file(from).map(|()| true),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(false),
            Err(e) => Err(e),
        },
        Err(e) => Err(e.into()),
    }
}

/// Whether the temporary at `path` was left by a writer that is gone.
pub fn is_abandoned(path: &Path) -> bool {
    let Ok(file) = File::open(path) else {
        return false;
    };
    let old = file
        .metadata()
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.elapsed().ok())
        .is_some_and(|age| age > TEMP_GRACE);
    // The lock, if taken, goes with `file`.
    old && file.try_lock().is_ok()
}

/// A chunk file found by a listing.
pub struct Listed {
    pub id: ChunkId,
    pub bytes: u64,
    /// When a process last wrote or mapped it.
    pub mtime: SystemTime,
}

#[derive(Default)]
pub struct Listing {
    pub chunks: Vec<Listed>,
    pub temps: Vec<PathBuf>,
    pub other: Vec<PathBuf>,
}

impl Listing {
    pub fn bytes(&self) -> u64 {
        self.chunks.iter().map(|c| c.bytes).sum()
    }
}

/// What `dir` holds. Files that vanish while it looks (another process
/// evicting) are left out.
pub fn list(dir: &Path) -> io::Result<Listing> {
    let mut out = Listing::default();
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        match classify(&entry.file_name()) {
            Name::Chunk(id) => match entry.metadata() {
                Ok(m) => out.chunks.push(Listed {
                    id,
                    bytes: m.len(),
                    mtime: m.modified().unwrap_or(SystemTime::UNIX_EPOCH),
                }),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            },
            Name::Temp => out.temps.push(entry.path()),
            Name::Other => out.other.push(entry.path()),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_temporary_is_installed_once_and_never_replaces_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let id = ChunkId::of(b"x");
        let dest = dir.path().join(id.to_hex());
        let mut a = Temp::create(dir.path(), &id).unwrap();
        a.write(b"first").unwrap();
        let mut b = Temp::create(dir.path(), &id).unwrap();
        b.write(b"second").unwrap();
        assert!(a.install(&dest).unwrap());
        let b_path = b.path().to_owned();
        assert!(!b.install(&dest).unwrap());
        assert_eq!(fs::read(&dest).unwrap(), b"first");
        assert!(!b_path.exists(), "the losing temporary is dropped");
    }

    #[test]
    fn only_an_old_unlocked_temporary_is_abandoned() {
        let dir = tempfile::tempdir().unwrap();
        let id = ChunkId::of(b"y");
        let live = Temp::create(dir.path(), &id).unwrap();
        let hour_ago = SystemTime::now() - Duration::from_secs(3600);
        let age = |p: &Path| {
            File::options()
                .write(true)
                .open(p)
                .unwrap()
                .set_modified(hour_ago)
                .unwrap()
        };
        age(live.path());
        assert!(!is_abandoned(live.path()), "its writer holds the lock");
        let young = dir.path().join(".tmp-young");
        fs::write(&young, b"").unwrap();
        assert!(!is_abandoned(&young), "it may be about to be locked");
        let dead = dir.path().join(".tmp-dead");
        fs::write(&dead, b"").unwrap();
        age(&dead);
        assert!(is_abandoned(&dead));
    }
}
