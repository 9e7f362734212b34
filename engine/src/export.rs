//! Raw image export: a manifest's bytes back into a file, byte for byte.
//!
//! Zero chunks become holes (the file is sparse where the image was
//! zero); stored chunks are fetched in batches, merged per pack, with the
//! next batch prefetched while the current one is written.

use std::fs::OpenOptions;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::chunkstore::{ChunkStore, ChunkStoreError};
use crate::error::ErrorKind;
use crate::manifest::Manifest;

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("cannot write {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Chunk(#[from] ChunkStoreError),
}

impl ExportError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            ExportError::Write { .. } => ErrorKind::Io,
            ExportError::Chunk(e) => e.kind(),
        }
    }
}

const BATCH_CHUNKS: usize = 64;

/// Writes the image `manifest` describes to `path` (created or truncated).
pub fn export_raw(
    store: &ChunkStore,
    manifest: &Manifest,
    path: &Path,
    progress: &dyn Fn(u64),
) -> Result<(), ExportError> {
    let werr = |source| ExportError::Write {
        path: path.to_owned(),
        source,
    };
    let file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .map_err(werr)?;
    file.set_len(manifest.logical_size).map_err(werr)?;
    let indexed: Vec<(usize, &Option<crate::id::ChunkId>)> =
        manifest.chunks.iter().enumerate().collect();
    let batches: Vec<_> = indexed.chunks(BATCH_CHUNKS).collect();
    let ids_of = |batch: &[(usize, &Option<crate::id::ChunkId>)]| -> Vec<crate::id::ChunkId> {
        batch.iter().filter_map(|(_, id)| **id).collect()
    };
    let mut done = 0u64;
    for (n, batch) in batches.iter().enumerate() {
        store.fetch(&ids_of(batch))?;
        if let Some(next) = batches.get(n + 1) {
            store.prefetch(&ids_of(next));
        }
        for &(i, id) in batch.iter() {
            let len = manifest.chunk_len(i);
            if let Some(id) = id {
                let bytes = store.read_chunk(id, len)?;
                file.write_all_at(&bytes, i as u64 * u64::from(manifest.chunk_size))
                    .map_err(werr)?;
            }
            done += u64::from(len);
        }
        progress(done);
    }
    file.sync_all().map_err(werr)?;
    Ok(())
}
