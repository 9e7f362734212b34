//! The overlay directory's files: taking its lock, creating a new overlay
//! under it, reading its metadata, and moving a version 1 overlay (data
//! file and a journal of single records) to version 2 (a journal of
//! batches and a flush log).

use std::fs::{self, File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::journal::{self, JournalError};
use super::{OverlayError, BLOCK};
use crate::id::ManifestId;

pub const META_VERSION: u32 = 2;
pub const META: &str = "overlay.json";
pub const DATA: &str = "data";
pub const JOURNAL: &str = "dirty.journal";
pub const WAL: &str = "flush.log";
const LOCK: &str = "lock";
/// The journal of version 1 overlays.
const JOURNAL_V1: &str = "journal";

/// `overlay.json`: what the overlay is a layer of.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct OverlayMeta {
    pub version: u32,
    /// The manifest id of the image underneath.
    pub base: String,
    pub logical_size: u64,
    pub block_size: u64,
}

impl OverlayMeta {
    /// The metadata of a new overlay over image `base` of `logical_size` bytes.
    pub fn new(base: &ManifestId, logical_size: u64) -> OverlayMeta {
        OverlayMeta {
            version: META_VERSION,
            base: base.to_hex(),
            logical_size,
            block_size: BLOCK,
        }
    }
}

pub fn io_at(path: &Path) -> impl FnOnce(io::Error) -> OverlayError {
    let path = path.to_owned();
    move |source| OverlayError::Io { path, source }
}

fn malformed(dir: &Path, why: String) -> OverlayError {
    OverlayError::Malformed {
        dir: dir.to_owned(),
        why,
    }
}

/// Takes the overlay's lock: its lock file is created if missing, never
/// truncated, and held (`flock`) for as long as the returned file lives.
pub fn lock(dir: &Path) -> Result<File, OverlayError> {
    let path = dir.join(LOCK);
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => OverlayError::Missing(dir.to_owned()),
            _ => io_at(&path)(e),
        })?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(fs::TryLockError::WouldBlock) => Err(OverlayError::Busy {
            dir: dir.to_owned(),
        }),
        Err(fs::TryLockError::Error(e)) => Err(io_at(&path)(e)),
    }
}

/// Creates the files of an empty overlay over `base` in `dir`, whose lock
/// the caller holds. Files a creation that crashed before its metadata
/// was written left behind are replaced; the metadata goes last. With
/// `sync` false nothing is synced: the caller makes the files durable
/// (with [`sync_creation`]) before the overlay acknowledges a FLUSH.
pub fn create(dir: &Path, meta: &OverlayMeta, sync: bool) -> Result<(), OverlayError> {
    for name in [DATA, JOURNAL, WAL] {
        let path = dir.join(name);
        let file = create_new(&path)?;
        if name == DATA {
            file.set_len(meta.logical_size).map_err(io_at(&path))?;
        }
        if sync {
            file.sync_all().map_err(io_at(&path))?;
        }
    }
    write_meta(dir, meta, sync)
}

/// Makes an overlay created without syncs durable: its files, its
/// directory and the directory's entry in its parent.
pub fn sync_creation(dir: &Path) -> Result<(), OverlayError> {
    for name in [DATA, JOURNAL, WAL, META] {
        let path = dir.join(name);
        File::open(&path)
            .and_then(|f| f.sync_all())
            .map_err(io_at(&path))?;
    }
    for d in [Some(dir), dir.parent()].into_iter().flatten() {
        File::open(d).and_then(|f| f.sync_all()).map_err(io_at(d))?;
    }
    Ok(())
}

/// A new file at `path`, replacing a leftover (only called under the lock,
/// before the metadata that would make the leftover part of an overlay).
fn create_new(path: &Path) -> Result<File, OverlayError> {
    match fs::remove_file(path) {
        Ok(()) => {
            tracing::info!(path = %path.display(), "overlay: replacing a file an interrupted creation left")
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_at(path)(e)),
    }
    OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(io_at(path))
}

/// Writes `overlay.json` atomically: temporary file, sync, rename, sync of
/// the directory.
fn write_meta(dir: &Path, meta: &OverlayMeta, sync: bool) -> Result<(), OverlayError> {
    let tmp = dir.join(".overlay.json.tmp");
    let text = serde_json::to_vec_pretty(meta).expect("plain struct");
    fs::write(&tmp, text)
        .and_then(|()| match sync {
            true => File::open(&tmp)?.sync_all(),
            false => Ok(()),
        })
        .map_err(io_at(&tmp))?;
    let path = dir.join(META);
    fs::rename(&tmp, &path).map_err(io_at(&path))?;
    if !sync {
        return Ok(());
    }
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_at(dir))
}

pub fn meta_exists(dir: &Path) -> bool {
    dir.join(META).exists()
}

/// Reads `overlay.json`, moving a version 1 overlay to version 2 first
/// (under the lock the caller holds).
pub fn read_meta(dir: &Path) -> Result<OverlayMeta, OverlayError> {
    let path = dir.join(META);
    let text = match fs::read(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(OverlayError::Missing(dir.to_owned()))
        }
        Err(e) => return Err(io_at(&path)(e)),
    };
    let meta: OverlayMeta =
        serde_json::from_slice(&text).map_err(|e| malformed(dir, format!("{META}: {e}")))?;
    if meta.block_size != BLOCK || !(1..=META_VERSION).contains(&meta.version) {
        return Err(malformed(
            dir,
            format!(
                "version {} with {}-byte blocks; this build reads versions 1 to {META_VERSION} with {BLOCK}-byte blocks",
                meta.version, meta.block_size
            ),
        ));
    }
    if meta.version == 1 {
        return upgrade_v1(dir, meta);
    }
    Ok(meta)
}

/// Version 1 to 2: the old journal's extents become the first batch of the
/// new journal, an empty flush log is made, and the new metadata switches
/// over by rename; a crash before that rename leaves version 1 intact.
fn upgrade_v1(dir: &Path, meta: OverlayMeta) -> Result<OverlayMeta, OverlayError> {
    let old = dir.join(JOURNAL_V1);
    let bytes = fs::read(&old).map_err(io_at(&old))?;
    let (extents, good) = journal::v1::replay(&bytes).map_err(|e| corrupt(dir, JOURNAL_V1, e))?;
    if good < bytes.len() as u64 {
        tracing::warn!(overlay = %dir.display(), torn = bytes.len() as u64 - good, "version 1 journal had a torn tail (a crash during FLUSH); left out");
    }
    let path = dir.join(JOURNAL);
    let journal = create_new(&path)?;
    journal::append(&journal, 0, 1, 0, &extents)
        .and_then(|_| journal.sync_all())
        .map_err(io_at(&path))?;
    let wal = dir.join(WAL);
    create_new(&wal)?.sync_all().map_err(io_at(&wal))?;
    let meta = OverlayMeta {
        version: META_VERSION,
        ..meta
    };
    write_meta(dir, &meta, true)?;
    fs::remove_file(&old).map_err(io_at(&old))?;
    tracing::info!(overlay = %dir.display(), extents = extents.len(), "overlay upgraded from version 1 to 2");
    Ok(meta)
}

pub fn corrupt(dir: &Path, file: &str, e: impl std::fmt::Display) -> OverlayError {
    malformed(
        dir,
        format!("{file}: {e}; the file is kept as it is: restore the overlay from a backup or start a new one"),
    )
}

/// Opens one of the overlay's files for reading and writing.
pub fn open_rw(dir: &Path, name: &str) -> Result<(File, PathBuf), OverlayError> {
    let path = dir.join(name);
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .map_err(io_at(&path))?;
    Ok((file, path))
}

/// The journal's contents; a torn tail (a crash during a checkpoint) is cut
/// off and the cut synced.
pub fn replay_journal(
    dir: &Path,
    file: &File,
    path: &Path,
) -> Result<journal::Replayed, OverlayError> {
    let bytes = fs::read(path).map_err(io_at(path))?;
    let replayed = journal::replay(&bytes).map_err(|e: JournalError| corrupt(dir, JOURNAL, e))?;
    if replayed.good_len < bytes.len() as u64 {
        tracing::warn!(
            overlay = %dir.display(),
            torn = bytes.len() as u64 - replayed.good_len,
            "overlay journal had a torn tail (a crash during a checkpoint); cut it off"
        );
        file.set_len(replayed.good_len)
            .and_then(|()| file.sync_data())
            .map_err(io_at(path))?;
    }
    Ok(replayed)
}
