//! Loading what a resume serves: the snapshot's manifest and layout, and
//! its recorded working set if one is there and sound.
//!
//! The snapshot is what the guest's memory is; without it there is no
//! resume. The working set only makes a resume faster: one that cannot
//! be loaded (its object or its pages image missing or corrupt) is logged,
//! reported and left out, and the snapshot is served on demand.

use std::sync::Arc;

use cairn_engine::catalog::{self, CatalogError};
use cairn_engine::chunkstore::ChunkStore;
use cairn_engine::memory::working_set::{RunIndex, WorkingSet, WorkingSetError};
use cairn_engine::memory::{MemLayout, MemoryImage};
use cairn_engine::ManifestId;

use super::server::{DisplayChain, ServeError};

/// A memory snapshot ready to serve, with its working set if recorded.
#[derive(Clone)]
pub struct ServedSnapshot {
    pub id: ManifestId,
    pub image: MemoryImage,
    pub layout: MemLayout,
    pub working_set: Option<Recorded>,
    /// Why a recorded working set was left out, if it was.
    pub working_set_error: Option<String>,
}

/// A snapshot's recorded working set: its runs, the image holding their
/// bytes back to back, and the runs by snapshot offset.
#[derive(Clone)]
pub struct Recorded {
    pub set: WorkingSet,
    pub pages: MemoryImage,
    pub(super) index: Arc<RunIndex>,
}

fn load_manifest(
    store: &ChunkStore,
    id: ManifestId,
) -> Result<cairn_engine::manifest::Manifest, ServeError> {
    store
        .runtime()
        .block_on(catalog::load_manifest(store.remote().as_ref(), &id))
        .map_err(|source: CatalogError| ServeError::Catalog {
            id: id.to_hex(),
            source: Box::new(source),
        })
}

impl ServedSnapshot {
    /// Loads manifest `id`, its layout and its working set. Call from a
    /// plain thread.
    pub fn open(store: &ChunkStore, id: ManifestId) -> Result<ServedSnapshot, ServeError> {
        let manifest = Arc::new(load_manifest(store, id)?);
        let layout = MemLayout::of(&manifest)?;
        let (working_set, working_set_error) = match Recorded::load(
            store,
            id,
            manifest.logical_size,
        ) {
            Ok(ws) => (ws, None),
            Err(e) => {
                let why = DisplayChain(&e).to_string();
                tracing::warn!(snapshot = %id.short(), error = %why, "the recorded working set cannot be used; serving on demand");
                (None, Some(why))
            }
        };
        Ok(ServedSnapshot {
            id,
            image: MemoryImage::new(manifest, store.clone()),
            layout,
            working_set,
            working_set_error,
        })
    }
}

impl Recorded {
    /// The working set recorded for snapshot `id` of `size` bytes, if any.
    fn load(store: &ChunkStore, id: ManifestId, size: u64) -> Result<Option<Recorded>, ServeError> {
        let ws = store
            .runtime()
            .block_on(WorkingSet::load(store.remote().as_ref(), id, size))?;
        let Some(ws) = ws else {
            return Ok(None);
        };
        let pages = Arc::new(load_manifest(store, ws.pages)?);
        if pages.logical_size != ws.bytes() {
            return Err(WorkingSetError::Invalid {
                snapshot: id,
                why: format!(
                    "its pages image has {} bytes, its runs {}",
                    pages.logical_size,
                    ws.bytes()
                ),
            }
            .into());
        }
        Ok(Some(Recorded {
            index: Arc::new(RunIndex::new(&ws)),
            set: ws,
            pages: MemoryImage::new(pages, store.clone()),
        }))
    }
}
