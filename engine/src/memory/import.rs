//! Importing a VMM memory file: a full one, or a diff over a parent.
//!
//! A full file is cut like a raw image (holes skipped). A diff file, as
//! Firecracker writes it, has the parent's size and holds only the pages
//! dirtied since the parent: what is not written (a hole) is the parent's.
//! Chunks with no written page take the parent's id unread; chunks with
//! some are the parent's bytes with the written pages laid over them. A
//! written page of zeros stays zeros: only holes mean "unchanged".

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::{LayoutError, MemLayout, MemoryImage};
use crate::cache::HotChunks;
use crate::chunkstore::ChunkStore;
use crate::id::ManifestId;
use crate::import::{import_pieces, import_raw, ImportError, ImportOptions, ImportReport, Piece};
use crate::manifest::{Manifest, ManifestKind};

#[derive(Debug, thiserror::Error)]
pub enum MemImportError {
    #[error(transparent)]
    Import(#[from] ImportError),
    #[error(transparent)]
    Layout(#[from] LayoutError),
    #[error("{path} is {size} bytes, but a diff must be the size of its parent {parent} ({parent_size} bytes)")]
    DiffSize {
        path: PathBuf,
        size: u64,
        parent: ManifestId,
        parent_size: u64,
    },
}

/// Chunks gathered into one piece of a diff import.
const BATCH_BYTES: u64 = 8 << 20;

/// Imports the memory file at `path` as a memory image with `layout`
/// (whose `parent` must be `parent`'s id when a parent is given). With a
/// parent, the file is a sparse diff over it. Call from a plain thread.
pub fn import_memory(
    store: &ChunkStore,
    path: &Path,
    layout: &MemLayout,
    parent: Option<Arc<Manifest>>,
    opts: &ImportOptions,
    progress: &(dyn Fn(u64) + Sync),
) -> Result<(Manifest, ImportReport), MemImportError> {
    let read_err = |source| ImportError::Read {
        path: path.to_owned(),
        source,
    };
    let file = File::open(path).map_err(read_err)?;
    let size = file.metadata().map_err(read_err)?.len();
    MemLayout::decode(&layout.encode(), size)?;
    let mut opts = opts.clone();
    opts.kind = ManifestKind::Memory;
    opts.meta = layout.encode();
    let Some(parent) = parent else {
        return Ok(import_raw(store, path, &opts, progress)?);
    };
    MemLayout::of(&parent)?;
    if size != parent.logical_size {
        return Err(MemImportError::DiffSize {
            path: path.to_owned(),
            size,
            parent: parent.id(),
            parent_size: parent.logical_size,
        });
    }
    // Same chunk size as the parent, so unchanged chunks are shared.
    opts.chunk_size = parent.chunk_size;
    let pieces = DiffPieces {
        file,
        path: path.to_owned(),
        image: MemoryImage::new(parent.clone(), store.clone()),
        hot: HotChunks::default(),
        next: 0,
    };
    Ok(import_pieces(store, pieces, size, &opts, progress)?)
}

/// The pieces of a diff import, chunk run by chunk run.
struct DiffPieces {
    file: File,
    path: PathBuf,
    image: MemoryImage,
    hot: HotChunks,
    /// The next chunk.
    next: usize,
}

impl DiffPieces {
    fn err(&self, source: io::Error) -> ImportError {
        ImportError::Read {
            path: self.path.clone(),
            source,
        }
    }

    /// The written (non-hole) extents within `[start, end)`.
    fn written(&self, start: u64, end: u64) -> io::Result<Vec<(u64, u64)>> {
        use rustix::fs::{seek, SeekFrom};
        let mut out = Vec::new();
        let mut pos = start;
        while pos < end {
            let data = match seek(&self.file, SeekFrom::Data(pos)) {
                Ok(at) => at,
                Err(rustix::io::Errno::NXIO) => break,
                Err(e) => return Err(e.into()),
            };
            if data >= end {
                break;
            }
            let hole = match seek(&self.file, SeekFrom::Hole(data)) {
                Ok(at) => at.min(end),
                Err(e) => return Err(e.into()),
            };
            out.push((data, hole));
            pos = hole;
        }
        Ok(out)
    }

    fn piece(&mut self) -> Result<Piece, ImportError> {
        let m = self.image.manifest().clone();
        let cs = u64::from(m.chunk_size);
        let n = m.chunks.len();
        let chunk_end = |i: usize| ((i as u64 + 1) * cs).min(m.logical_size);
        let start = self.next;
        let first_written = !self
            .written(start as u64 * cs, chunk_end(start))
            .map_err(|e| self.err(e))?
            .is_empty();
        // A run of unchanged chunks, or a batch of changed ones.
        let mut i = start;
        while i < n && (i - start) as u64 * cs < BATCH_BYTES {
            let written = !self
                .written(i as u64 * cs, chunk_end(i))
                .map_err(|e| self.err(e))?
                .is_empty();
            if written != first_written {
                break;
            }
            i += 1;
        }
        self.next = i;
        if !first_written {
            return Ok(Piece::Known(m.chunks[start..i].to_vec()));
        }
        let from = start as u64 * cs;
        let to = chunk_end(i - 1);
        let mut buf = vec![0u8; (to - from) as usize];
        self.image
            .read(&mut self.hot, from, &mut buf)
            .map_err(|e| self.err(io::Error::other(e.to_string())))?;
        for (a, b) in self.written(from, to).map_err(|e| self.err(e))? {
            let dst = &mut buf[(a - from) as usize..(b - from) as usize];
            self.file.read_exact_at(dst, a).map_err(|e| self.err(e))?;
        }
        Ok(Piece::Bytes(buf))
    }
}

impl Iterator for DiffPieces {
    type Item = Result<Piece, ImportError>;

    fn next(&mut self) -> Option<Self::Item> {
        (self.next < self.image.manifest().chunks.len()).then(|| self.piece())
    }
}
