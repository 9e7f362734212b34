//! Folding overlay layers into a new image.
//!
//! Chunks the overlay does not touch keep their parent's ids (nothing is
//! read or stored for them); each touched chunk is read through the lazy
//! disk (overlay over image), cut, hashed and stored like any import. The
//! snapshot has its parent's chunk size, so unchanged chunks are shared.

use std::io;
use std::sync::Arc;

use crate::chunkstore::ChunkStore;
use crate::disk::Disk;
use crate::import::{import_pieces, ImportError, ImportOptions, ImportReport, Piece};
use crate::manifest::Manifest;
use crate::overlay::{Overlay, BLOCK};

/// Chunks read per piece of the snapshot.
const BATCH_BYTES: u64 = 8 << 20;

/// Folds `overlay` (over `base`) into a new manifest, stored in `store`.
/// `opts.chunk_size` is ignored: the parent's is used.
pub fn snapshot_overlay(
    store: &ChunkStore,
    base: Arc<Manifest>,
    overlay: &Arc<Overlay>,
    opts: &ImportOptions,
    progress: &(dyn Fn(u64) + Sync),
) -> Result<(Manifest, ImportReport), ImportError> {
    let meta = overlay.meta();
    if meta.base != base.id().to_hex() || meta.logical_size != base.logical_size {
        return Err(ImportError::Options(format!(
            "overlay {} is a layer of image {} ({} bytes), not of {} ({} bytes)",
            overlay.dir().display(),
            meta.base,
            meta.logical_size,
            base.id(),
            base.logical_size
        )));
    }
    fold_layers(store, base, std::slice::from_ref(overlay), opts, progress)
}

/// Folds the disk `layers` (bottom to top) make over `base` into a new
/// manifest, stored in `store`: the state of a disk at the moment its top
/// layer here was frozen. Chunks no layer touches keep their ids.
pub fn fold_layers(
    store: &ChunkStore,
    base: Arc<Manifest>,
    layers: &[Arc<Overlay>],
    opts: &ImportOptions,
    progress: &(dyn Fn(u64) + Sync),
) -> Result<(Manifest, ImportReport), ImportError> {
    let mut opts = opts.clone();
    opts.chunk_size = base.chunk_size;
    // It reads exactly the chunks it needs: read-ahead would fetch
    // untouched ones, which the snapshot takes by id.
    let disk = Disk::open(base.clone(), store.clone(), layers.to_vec())
        .map_err(|e| ImportError::Options(e.to_string()))?
        .queue()
        .without_read_ahead();
    let cs = u64::from(base.chunk_size);
    let size = base.logical_size;
    let n = base.chunks.len();
    let touched = |i: usize| {
        let i = i as u64;
        let blocks = i * cs / BLOCK..((i + 1) * cs).min(size).div_ceil(BLOCK);
        layers.iter().any(|l| blocks.clone().any(|b| l.is_dirty(b)))
    };
    let mut i = 0usize;
    let pieces = std::iter::from_fn(move || {
        if i >= n {
            return None;
        }
        let start = i;
        let changed = touched(i);
        while i < n && touched(i) == changed && (!changed || (i - start) as u64 * cs < BATCH_BYTES)
        {
            i += 1;
        }
        if !changed {
            return Some(Ok(Piece::Known(base.chunks[start..i].to_vec())));
        }
        let from = start as u64 * cs;
        let to = (i as u64 * cs).min(size);
        let mut buf = vec![0u8; (to - from) as usize];
        Some(
            disk.read(from, &mut buf)
                .map(|()| Piece::Bytes(buf))
                .map_err(|e| ImportError::Read {
                    path: layers
                        .last()
                        .map(|l| l.dir().to_owned())
                        .unwrap_or_default(),
                    source: io::Error::other(e.to_string()),
                }),
        )
    });
    import_pieces(store, pieces, size, &opts, progress)
}
