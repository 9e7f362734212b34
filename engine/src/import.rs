//! Raw image import: a file in, chunks, packs and a manifest out.
//!
//! The import streams: a reader thread reads batches of chunks, all
//! cores hash them (zero chunks are skipped, known chunks deduplicated
//! against every pack in the store) and compress only the new ones, and
//! frames are appended to a pack in a local staging directory. Full packs
//! are uploaded in the background while the next fills. Memory stays
//! bounded by a few batches and packs in flight, whatever the image size.
//!
//! Crash safety: a pack is uploaded before its index object, and a pack
//! left in staging by a crash is recovered to its last whole frame and
//! uploaded by the next import, so a rerun after a failure re-sends
//! nothing that already reached the store.

use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::fs::{self, File};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc;

use bytes::Bytes;
use rayon::prelude::*;

use crate::chunkstore::ChunkStore;
use crate::error::ErrorKind;
use crate::frame::FrameEncoder;
use crate::gc::WriterView;
use crate::id::ChunkId;
use crate::layout;
use crate::manifest::{Manifest, ManifestError, ManifestKind};
use crate::objstore::{PutMode, StoreError};
use crate::pack::{self, PackError, PackIndex, PackWriter};

/// The default chunk size; README's "Chunk size" section has the measurements.
pub const DEFAULT_CHUNK_SIZE: u32 = 64 << 10;
pub const DEFAULT_ZSTD_LEVEL: i32 = 1;
pub const DEFAULT_PACK_TARGET: u64 = 32 << 20;
/// Packs being uploaded while the next one fills.
const UPLOADS_IN_FLIGHT: usize = 2;
/// Bytes read and hashed as one batch.
const BATCH_BYTES: usize = 8 << 20;

#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("staging directory {path}")]
    Staging {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Pack(#[from] PackError),
    #[error("upload to the store failed; rerun the import to resume (what was uploaded is kept)")]
    Store(#[from] StoreError),
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    #[error("invalid import options: {0}")]
    Options(String),
    #[error("an upload task failed: {0}")]
    Task(String),
    #[error("{0}")]
    Chunk(#[from] crate::chunkstore::ChunkStoreError),
    #[error("this write ran longer than the store's garbage-collection grace period ({grace_secs} s) and {missing} chunks it relied on were collected meanwhile; run it again (or collect with a longer --grace)")]
    Collected { missing: u64, grace_secs: u64 },
}

impl ImportError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            ImportError::Read { .. } | ImportError::Staging { .. } | ImportError::Task(_) => {
                ErrorKind::Io
            }
            ImportError::Pack(e) => e.kind(),
            ImportError::Store(e) => e.kind(),
            ImportError::Manifest(e) => e.kind(),
            ImportError::Options(_) => ErrorKind::InvalidInput,
            ImportError::Chunk(e) => e.kind(),
            ImportError::Collected { .. } => ErrorKind::Transient,
        }
    }
}

#[derive(Debug, Clone)]
pub struct ImportOptions {
    pub chunk_size: u32,
    pub zstd_level: i32,
    /// A pack is closed and uploaded once it reaches this many bytes.
    pub pack_target: u64,
    /// Where packs are built before upload (on local disk).
    pub staging_dir: PathBuf,
    /// What the manifest describes, and its layout metadata.
    pub kind: ManifestKind,
    pub meta: Vec<u8>,
}

impl ImportOptions {
    pub fn new(staging_dir: PathBuf) -> ImportOptions {
        ImportOptions {
            chunk_size: DEFAULT_CHUNK_SIZE,
            zstd_level: DEFAULT_ZSTD_LEVEL,
            pack_target: DEFAULT_PACK_TARGET,
            staging_dir,
            kind: ManifestKind::Disk,
            meta: Vec::new(),
        }
    }

    fn check(&self) -> Result<(), ImportError> {
        let cs = self.chunk_size;
        if !cs.is_power_of_two() || !(4096..=(16 << 20)).contains(&cs) {
            return Err(ImportError::Options(format!(
                "chunk size {cs} must be a power of two from 4 KiB to 16 MiB"
            )));
        }
        if !(1..=22).contains(&self.zstd_level) {
            return Err(ImportError::Options(format!(
                "zstd level {} must be 1 to 22",
                self.zstd_level
            )));
        }
        Ok(())
    }
}

/// What an import did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ImportReport {
    pub id: String,
    pub logical_bytes: u64,
    /// Frame bytes of the distinct chunks the image uses (shared or not).
    pub stored_bytes: u64,
    /// Frame bytes this import added to the store.
    pub new_bytes: u64,
    pub chunk_size: u32,
    pub chunks: u64,
    pub zero_chunks: u64,
    pub distinct_chunks: u64,
    pub new_chunks: u64,
    /// Stored (non-zero) chunk references per distinct chunk.
    pub dedup_ratio: f64,
    /// Packs found in staging from an earlier, interrupted import and uploaded.
    pub recovered_packs: u64,
}

thread_local! {
    static ENCODER: RefCell<Option<(i32, FrameEncoder)>> = const { RefCell::new(None) };
}

fn encode_frame(level: i32, id: ChunkId, raw: &[u8]) -> Vec<u8> {
    ENCODER.with(|cell| {
        let mut cell = cell.borrow_mut();
        if cell.as_ref().is_none_or(|(l, _)| *l != level) {
            let enc = FrameEncoder::new(level).expect("zstd context for a checked level");
            *cell = Some((level, enc));
        }
        let (_, enc) = cell.as_mut().expect("set above");
        enc.encode(id, raw)
    })
}

/// True if every byte is zero.
pub fn is_zero(bytes: &[u8]) -> bool {
    let mut words = bytes.chunks_exact(16);
    words
        .by_ref()
        .all(|w| u128::from_ne_bytes(w.try_into().expect("16 bytes")) == 0)
        && words.remainder().iter().all(|&b| b == 0)
}

/// A pack on its way to the store.
type Upload = tokio::task::JoinHandle<Result<PackIndex, ImportError>>;

struct Importer<'a> {
    store: &'a ChunkStore,
    opts: &'a ImportOptions,
    writer: Option<PackWriter>,
    uploads: Vec<Upload>,
    new_frames: HashMap<ChunkId, u32>,
    new_bytes: u64,
}

impl Importer<'_> {
    fn staging_file(&self) -> PathBuf {
        self.opts
            .staging_dir
            .join(format!("{:016x}.partial", fastrand::u64(..)))
    }

    fn append(&mut self, frame: &[u8]) -> Result<(), ImportError> {
        if self.writer.is_none() {
            self.writer = Some(PackWriter::create(&self.staging_file())?);
        }
        let w = self.writer.as_mut().expect("created above");
        let entry = w.append(frame)?;
        self.new_frames.insert(entry.id, entry.frame_len);
        self.new_bytes += u64::from(entry.frame_len);
        if w.len() >= self.opts.pack_target {
            self.seal()?;
        }
        Ok(())
    }

    /// Finishes the current pack and starts its upload.
    fn seal(&mut self) -> Result<(), ImportError> {
        let Some(w) = self.writer.take() else {
            return Ok(());
        };
        let path = w.path().to_owned();
        let index = w.finish()?;
        while self.uploads.len() >= UPLOADS_IN_FLIGHT {
            let oldest = self.uploads.remove(0);
            self.join(oldest)?;
        }
        self.uploads.push(
            self.store
                .runtime()
                .spawn(upload_pack(self.store.clone(), path, index)),
        );
        Ok(())
    }

    fn join(&self, upload: Upload) -> Result<(), ImportError> {
        let index = self
            .store
            .runtime()
            .block_on(upload)
            .map_err(|e| ImportError::Task(e.to_string()))??;
        self.store.add_pack(&index);
        Ok(())
    }

    fn finish(&mut self) -> Result<(), ImportError> {
        self.seal()?;
        let mut first_err = None;
        for u in std::mem::take(&mut self.uploads) {
            if let Err(e) = self.join(u) {
                first_err.get_or_insert(e);
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    /// Stores again those of `ids` that only packs `view` avoids hold
    /// (condemned by the collector): this import must not rely on them.
    /// Their bytes are still there: condemned packs are deleted only after
    /// the grace period. Chunks this import stored are skipped unless
    /// `own_too` (a session longer than the grace period: its own first
    /// packs may be condemned by now). A chunk in no pack is left to
    /// `cairn verify`, unless `own_too`: then it was collected.
    fn rescue(
        &mut self,
        ids: &HashSet<ChunkId>,
        view: &WriterView,
        own_too: bool,
    ) -> Result<(), ImportError> {
        let store = self.store;
        let mut rescued = 0;
        for id in ids {
            if (!own_too && self.new_frames.contains_key(id)) || store.holds_for(id, view) {
                continue;
            }
            if own_too && !store.contains(id) {
                return Err(ImportError::Collected {
                    missing: 1,
                    grace_secs: view.grace().map_or(0, |g| g.as_secs()),
                });
            }
            let Some(loc) = store.locate(id) else {
                continue;
            };
            let raw = store.read_chunk(id, loc.entry.raw_len)?;
            self.append(&encode_frame(self.opts.zstd_level, *id, &raw))?;
            rescued += 1;
        }
        if rescued > 0 {
            tracing::info!(
                rescued,
                "stored again chunks that only condemned packs held"
            );
        }
        Ok(())
    }
}

/// What a writer's session knows of the collector (`crate::gc`): the pack
/// map refreshed (deleted packs gone) and the condemned ones to avoid.
fn writer_view(store: &ChunkStore) -> Result<WriterView, ImportError> {
    store.runtime().block_on(async {
        store.refresh().await?;
        Ok(WriterView::load(store.remote().as_ref()).await?)
    })
}

/// After a session longer than the collector's grace period: every chunk
/// of `manifest` must still be in a pack that is there.
fn check_still_stored(store: &ChunkStore, manifest: &Manifest) -> Result<(), ImportError> {
    store.runtime().block_on(store.refresh())?;
    let missing = manifest
        .distinct_chunks()
        .iter()
        .filter(|c| !store.contains(c))
        .count() as u64;
    if missing > 0 {
        let grace_secs = store
            .runtime()
            .block_on(crate::gc::state::load(store.remote().as_ref()))?
            .0
            .grace_secs;
        return Err(ImportError::Collected {
            missing,
            grace_secs,
        });
    }
    Ok(())
}

/// Uploads a finished pack, then its index object, then drops the local file.
async fn upload_pack(
    store: ChunkStore,
    path: PathBuf,
    index: PackIndex,
) -> Result<PackIndex, ImportError> {
    crate::gc::guard::put_pack(store.remote().as_ref(), &index, &path).await?;
    tokio::fs::remove_file(&path)
        .await
        .map_err(|source| ImportError::Staging {
            path: path.clone(),
            source,
        })?;
    Ok(index)
}

/// Uploads packs an interrupted import left in staging. Returns how many.
fn recover_staging(store: &ChunkStore, dir: &Path) -> Result<u64, ImportError> {
    let staging = |source| ImportError::Staging {
        path: dir.to_owned(),
        source,
    };
    let mut recovered = 0;
    for entry in fs::read_dir(dir).map_err(staging)? {
        let path = entry.map_err(staging)?.path();
        if path.extension().is_none_or(|e| e != "partial") {
            continue;
        }
        match pack::recover(&path) {
            Ok(r) if !r.index.entries.is_empty() => {
                tracing::info!(path = %path.display(), frames = r.index.entries.len(), cut = r.truncated_bytes, "recovered an interrupted pack");
                let index = store
                    .runtime()
                    .block_on(upload_pack(store.clone(), path, r.index))?;
                store.add_pack(&index);
                recovered += 1;
            }
            // Empty or not even a pack header: nothing worth keeping.
            _ => fs::remove_file(&path).map_err(staging)?,
        }
    }
    Ok(recovered)
}

/// Where the next data at or after `pos` starts in `file` (`len` when only
/// a hole follows). Filesystems without SEEK_DATA report all data.
fn next_data(file: &File, pos: u64, len: u64) -> u64 {
    match rustix::fs::seek(file, rustix::fs::SeekFrom::Data(pos)) {
        Ok(at) => at.min(len),
        Err(rustix::io::Errno::NXIO) => len,
        Err(_) => pos,
    }
}

/// Reads the first `len` bytes of `file` on its own thread, in batches of
/// whole chunks of `cs` bytes. Whole chunks inside holes of a sparse file
/// are not read: they arrive as zero chunks.
fn spawn_reader(
    file: File,
    path: PathBuf,
    len: u64,
    cs: u64,
    batch: usize,
) -> mpsc::Receiver<Result<Piece, ImportError>> {
    let (tx, rx) = mpsc::sync_channel(2);
    std::thread::spawn(move || {
        let mut pos = 0u64;
        while pos < len {
            let holes = (next_data(&file, pos, len) - pos) / cs;
            let piece = if holes > 0 {
                pos += holes * cs;
                Ok(Piece::Known(vec![None; holes as usize]))
            } else {
                let want = (batch as u64).min(len - pos) as usize;
                let mut buf = vec![0u8; want];
                match read_fully_at(&file, &mut buf, pos) {
                    Ok(n) => {
                        buf.truncate(n);
                        pos = if n < want { len } else { pos + n as u64 };
                        Ok(Piece::Bytes(buf))
                    }
                    Err(source) => {
                        pos = len;
                        Err(ImportError::Read {
                            path: path.clone(),
                            source,
                        })
                    }
                }
            };
            if tx.send(piece).is_err() {
                return;
            }
        }
    });
    rx
}

/// Reads into `buf` at `pos` until it is full or the file ends; the count.
fn read_fully_at(file: &File, buf: &mut [u8], pos: u64) -> io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], pos + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

/// Imports the raw image at `path`. Call from a plain thread (it blocks on
/// the store's runtime). `progress` is told how many bytes were processed.
pub fn import_raw(
    store: &ChunkStore,
    path: &Path,
    opts: &ImportOptions,
    progress: &(dyn Fn(u64) + Sync),
) -> Result<(Manifest, ImportReport), ImportError> {
    opts.check()?;
    let read_err = |source| ImportError::Read {
        path: path.to_owned(),
        source,
    };
    let file = File::open(path).map_err(read_err)?;
    let logical = file.metadata().map_err(read_err)?.len();
    let cs = opts.chunk_size as usize;
    let batch = (BATCH_BYTES / cs).max(1) * cs;
    let rx = spawn_reader(file, path.to_owned(), logical, cs as u64, batch);
    let (manifest, report) = import_pieces(store, rx.into_iter(), logical, opts, progress)
        .map_err(|e| match e {
            ImportError::Read { source, .. } if source.kind() == io::ErrorKind::UnexpectedEof => {
                read_err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("the file changed size during import ({logical} bytes at start)"),
                ))
            }
            e => e,
        })?;
    Ok((manifest, report))
}

/// Part of an image, in order: bytes of whole chunks (the last may be
/// short) to cut, hash and store, or the ids of chunks known already.
pub enum Piece {
    Bytes(Vec<u8>),
    Known(Vec<Option<ChunkId>>),
}

/// Builds and stores the manifest of a `logical`-byte image from `pieces`,
/// storing every chunk the store does not have yet. The core of every
/// import (raw files, overlay snapshots).
pub fn import_pieces(
    store: &ChunkStore,
    pieces: impl Iterator<Item = Result<Piece, ImportError>>,
    logical: u64,
    opts: &ImportOptions,
    progress: &(dyn Fn(u64) + Sync),
) -> Result<(Manifest, ImportReport), ImportError> {
    opts.check()?;
    let count = Manifest::chunk_count_for(logical, opts.chunk_size);
    if count > crate::manifest::MAX_CHUNKS {
        return Err(ImportError::Options(format!(
            "{logical} bytes make {count} chunks of {} bytes, more than a manifest holds ({}): use a larger --chunk-size",
            opts.chunk_size,
            crate::manifest::MAX_CHUNKS
        )));
    }
    let staging = |source| ImportError::Staging {
        path: opts.staging_dir.clone(),
        source,
    };
    fs::create_dir_all(&opts.staging_dir).map_err(staging)?;
    // One import at a time per staging directory: recovery must not take
    // a pack another import is still writing.
    let lock = File::create(opts.staging_dir.join(".lock")).map_err(staging)?;
    lock.lock().map_err(staging)?;
    let recovered_packs = recover_staging(store, &opts.staging_dir)?;
    // See what is deleted and condemned now, and rely on neither.
    let view = writer_view(store)?;

    let cs = opts.chunk_size as usize;
    let mut imp = Importer {
        store,
        opts,
        writer: None,
        uploads: Vec::new(),
        new_frames: HashMap::new(),
        new_bytes: 0,
    };
    let mut chunks: Vec<Option<ChunkId>> = Vec::with_capacity(count as usize);
    // Chunks named by id (from a base image), not stored by this import.
    let mut known: HashSet<ChunkId> = HashSet::new();
    let mut done = 0u64;
    let result = (|| {
        for piece in pieces {
            let buf = match piece? {
                Piece::Bytes(b) => b,
                Piece::Known(ids) => {
                    for id in ids {
                        done += u64::from(
                            (logical.saturating_sub(chunks.len() as u64 * cs as u64)).min(cs as u64)
                                as u32,
                        );
                        known.extend(id);
                        chunks.push(id);
                    }
                    progress(done);
                    continue;
                }
            };
            let ids: Vec<Option<ChunkId>> = buf
                .par_chunks(cs)
                .map(|c| (!is_zero(c)).then(|| ChunkId::of(c)))
                .collect();
            // Decide sequentially (first occurrence wins), compress in parallel.
            let mut batch_new = HashSet::new();
            let fresh: Vec<usize> = ids
                .iter()
                .enumerate()
                .filter_map(|(i, id)| {
                    let id = (*id)?;
                    let new = !imp.new_frames.contains_key(&id)
                        && !store.holds_for(&id, &view)
                        && batch_new.insert(id);
                    new.then_some(i)
                })
                .collect();
            let level = opts.zstd_level;
            let frames: Vec<Vec<u8>> = fresh
                .par_iter()
                .map(|&i| {
                    let raw = &buf[i * cs..((i + 1) * cs).min(buf.len())];
                    encode_frame(level, ids[i].expect("fresh chunks are stored"), raw)
                })
                .collect();
            for f in &frames {
                imp.append(f)?;
            }
            chunks.extend(ids);
            done += buf.len() as u64;
            progress(done);
        }
        imp.rescue(&known, &view, false)?;
        imp.finish()?;
        if view.outlived_grace() {
            // A session longer than the grace period: what was condemned
            // since it began is stored again while its bytes are there.
            let fresh = writer_view(store)?;
            let all: HashSet<ChunkId> = chunks.iter().flatten().copied().collect();
            imp.rescue(&all, &fresh, true)?;
            imp.finish()?;
        }
        Ok(())
    })();
    if let Err(e) = result {
        // Let uploads already under way complete: the rerun will reuse them.
        let _ = imp.finish();
        return Err(e);
    }
    if done != logical || chunks.len() as u64 != count {
        return Err(ImportError::Read {
            path: opts.staging_dir.clone(),
            source: io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("the source gave {done} of {logical} bytes"),
            ),
        });
    }
    let manifest = Manifest {
        kind: opts.kind,
        logical_size: logical,
        chunk_size: opts.chunk_size,
        chunks,
        meta: opts.meta.clone(),
    };
    let encoded = manifest.encode();
    let id = crate::id::ManifestId::of(&encoded);
    let key = layout::manifest_key(&id);
    store.runtime().block_on(async {
        crate::gc::keep(store.remote().as_ref(), &key).await?;
        store
            .remote()
            .put(&key, Bytes::from(encoded), PutMode::IfAbsent)
            .await
    })?;
    if view.outlived_grace() {
        check_still_stored(store, &manifest)?;
    }

    let distinct = manifest.distinct_chunks();
    let stored_bytes = distinct
        .iter()
        .map(|c| {
            imp.new_frames
                .get(c)
                .map(|&l| u64::from(l))
                .or_else(|| store.locate(c).map(|l| u64::from(l.entry.frame_len)))
                .unwrap_or(0)
        })
        .sum();
    let stored_refs = manifest.chunks.len() - manifest.zero_chunks();
    let report = ImportReport {
        id: id.to_hex(),
        logical_bytes: logical,
        stored_bytes,
        new_bytes: imp.new_bytes,
        chunk_size: opts.chunk_size,
        chunks: manifest.chunks.len() as u64,
        zero_chunks: manifest.zero_chunks() as u64,
        distinct_chunks: distinct.len() as u64,
        new_chunks: imp.new_frames.len() as u64,
        dedup_ratio: if distinct.is_empty() {
            1.0
        } else {
            stored_refs as f64 / distinct.len() as f64
        },
        recovered_packs,
    };
    Ok((manifest, report))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_detection() {
        assert!(is_zero(&[0u8; 4096]));
        assert!(is_zero(&[]));
        for at in [0, 15, 16, 4095, 4099] {
            let mut b = vec![0u8; 4100];
            b[at] = 1;
            assert!(!is_zero(&b), "{at}");
        }
    }
}
