//! Which pack holds which chunk: the union of every pack's index.
//!
//! Each pack's index is also stored alone as `packs/<id>.idx`, so a host
//! learns a pack's contents in one small GET and keeps a local copy, and
//! a refresh only fetches indexes it has not seen. Hosts sharing a bucket
//! see each other's packs on the next refresh.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::RwLock;

use bytes::Bytes;

use crate::error::ErrorKind;
use crate::id::{ChunkId, PackId};
use crate::layout;
use crate::objstore::{ObjectStore, StoreError};
use crate::pack::{IndexEntry, PackError, PackIndex};

#[derive(Debug, thiserror::Error)]
pub enum LocateError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("index object {key} is corrupt")]
    BadIndex {
        key: String,
        #[source]
        source: PackError,
    },
    #[error("index object {key} describes pack {actual}, not the pack it is named for")]
    Misnamed { key: String, actual: PackId },
}

impl LocateError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            LocateError::Store(e) => e.kind(),
            _ => ErrorKind::Corrupt,
        }
    }
}

/// Where one chunk's frame is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Location {
    pub pack: PackId,
    pub entry: IndexEntry,
}

/// The chunk → pack map, rebuilt from the store's index objects.
#[derive(Default)]
pub struct PackMap {
    packs: Vec<PackId>,
    known: HashSet<PackId>,
    chunks: HashMap<ChunkId, (u32, IndexEntry)>,
}

impl PackMap {
    pub fn locate(&self, id: &ChunkId) -> Option<Location> {
        self.chunks.get(id).map(|(p, entry)| Location {
            pack: self.packs[*p as usize],
            entry: *entry,
        })
    }

    pub fn contains(&self, id: &ChunkId) -> bool {
        self.chunks.contains_key(id)
    }

    pub fn pack_count(&self) -> usize {
        self.packs.len()
    }

    pub fn chunk_count(&self) -> usize {
        self.chunks.len()
    }

    pub fn packs(&self) -> &[PackId] {
        &self.packs
    }

    /// Adds a pack's index. A chunk in several packs keeps its first home.
    pub fn add(&mut self, index: &PackIndex) {
        if !self.known.insert(index.id) {
            return;
        }
        let p = self.packs.len() as u32;
        self.packs.push(index.id);
        for e in &index.entries {
            self.chunks.entry(e.id).or_insert((p, *e));
        }
    }
}

/// Loads every index object `map` does not know yet, preferring the local
/// copies under `local` (written on first fetch). No lock is held while
/// fetching. Returns how many packs were added.
pub async fn refresh(
    map: &RwLock<PackMap>,
    store: &dyn ObjectStore,
    local: &Path,
) -> Result<usize, LocateError> {
    let keys = store.list(layout::PACKS).await?;
    let todo: Vec<(String, PackId)> = {
        let m = map.read().unwrap_or_else(|p| p.into_inner());
        keys.into_iter()
            .filter_map(|k| layout::pack_of_index_key(&k).map(|p| (k, p)))
            .filter(|(_, p)| !m.known.contains(p))
            .collect()
    };
    let mut loaded = Vec::with_capacity(todo.len());
    for (key, pack) in &todo {
        loaded.push(load_index(store, local, key, *pack).await?);
    }
    let mut m = map.write().unwrap_or_else(|p| p.into_inner());
    for index in &loaded {
        m.add(index);
    }
    Ok(loaded.len())
}

fn local_copy(local: &Path, pack: &PackId) -> PathBuf {
    local.join(format!("{pack}.idx"))
}

async fn load_index(
    store: &dyn ObjectStore,
    local: &Path,
    key: &str,
    pack: PackId,
) -> Result<PackIndex, LocateError> {
    let path = local_copy(local, &pack);
    if let Ok(bytes) = tokio::fs::read(&path).await {
        match PackIndex::decode_tail(&bytes) {
            Ok(index) if index.id == pack => return Ok(index),
            _ => {
                tracing::warn!(path = %path.display(), "local index copy is bad; fetching it again")
            }
        }
    }
    let bytes: Bytes = store.get(key, None).await?;
    let index = PackIndex::decode_tail(&bytes).map_err(|source| LocateError::BadIndex {
        key: key.to_owned(),
        source,
    })?;
    if index.id != pack {
        return Err(LocateError::Misnamed {
            key: key.to_owned(),
            actual: index.id,
        });
    }
    // The local copy is an optimisation; failing to write it is not an error.
    if tokio::fs::create_dir_all(local).await.is_ok() {
        let tmp = local.join(format!(".tmp-{pack}"));
        if tokio::fs::write(&tmp, &bytes).await.is_ok() {
            let _ = tokio::fs::rename(&tmp, &path).await;
        }
    }
    Ok(index)
}
