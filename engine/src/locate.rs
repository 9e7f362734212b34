//! Which pack holds which chunk: the union of every pack's index.
//!
//! Each pack's index is also stored alone as `packs/<id>.idx`, so a host
//! learns a pack's contents in one small GET and keeps a local copy, and
//! a refresh only fetches indexes it has not seen. Hosts sharing a bucket
//! see each other's packs on the next refresh.
//!
//! A pack is uploaded before its index object, so an index whose pack
//! object is not there means the pack was lost (deleted by hand, a bucket
//! rule). Such a pack is marked lost: a listing shows it, or a GET of it
//! answers "not found". Lookups then prefer another pack holding the same
//! chunk (two imports can store one chunk twice, and a re-import after
//! the loss stores it again), and an import does not count a chunk held
//! only by lost packs as stored, so importing the image again repairs it.

use std::collections::hash_map::Entry;
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
    known: HashMap<PackId, u32>,
    /// Packs whose object is missing though their index is there.
    lost: HashSet<u32>,
    /// Each chunk's first home.
    chunks: HashMap<ChunkId, (u32, IndexEntry)>,
    /// Further homes of chunks stored more than once (rare).
    more: HashMap<ChunkId, Vec<(u32, IndexEntry)>>,
}

impl PackMap {
    /// Every home of `id`, the first first.
    fn homes(&self, id: &ChunkId) -> impl Iterator<Item = (u32, IndexEntry)> + '_ {
        let more = self.more.get(id).into_iter().flatten();
        self.chunks.get(id).into_iter().chain(more).copied()
    }

    fn location(&self, (p, entry): (u32, IndexEntry)) -> Location {
        Location {
            pack: self.packs[p as usize],
            entry,
        }
    }

    /// Where to read `id`: its first home whose pack is not lost, else
    /// (every copy lost) its first home, so the read says what is missing.
    pub fn locate(&self, id: &ChunkId) -> Option<Location> {
        let first = self.chunks.get(id)?;
        let home = self
            .homes(id)
            .find(|(p, _)| !self.lost.contains(p))
            .unwrap_or(*first);
        Some(self.location(home))
    }

    /// Whether a pack that is not lost holds the chunk.
    pub fn contains(&self, id: &ChunkId) -> bool {
        self.homes(id).any(|(p, _)| !self.lost.contains(&p))
    }

    /// Whether a pack that is neither lost nor `avoided` holds the chunk.
    pub fn holds_outside(&self, id: &ChunkId, avoided: impl Fn(&PackId) -> bool) -> bool {
        self.homes(id)
            .any(|(p, _)| !self.lost.contains(&p) && !avoided(&self.packs[p as usize]))
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

    /// Adds a pack's index; a pack known already is no longer lost (it
    /// was just uploaded again).
    pub fn add(&mut self, index: &PackIndex) {
        if let Some(p) = self.known.get(&index.id) {
            self.lost.remove(p);
            return;
        }
        let p = self.packs.len() as u32;
        self.packs.push(index.id);
        self.known.insert(index.id, p);
        for e in &index.entries {
            match self.chunks.entry(e.id) {
                Entry::Vacant(v) => {
                    v.insert((p, *e));
                }
                Entry::Occupied(_) => self.more.entry(e.id).or_default().push((p, *e)),
            }
        }
    }

    /// Marks `pack` as lost (or found again). Returns whether that changed.
    pub fn set_lost(&mut self, pack: &PackId, lost: bool) -> bool {
        match self.known.get(pack) {
            Some(&p) if lost => self.lost.insert(p),
            Some(p) => self.lost.remove(p),
            None => false,
        }
    }

    pub fn is_lost(&self, pack: &PackId) -> bool {
        self.known.get(pack).is_some_and(|p| self.lost.contains(p))
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
    let present: HashSet<&str> = keys.iter().map(String::as_str).collect();
    let todo: Vec<(&String, PackId)> = {
        let m = map.read().unwrap_or_else(|p| p.into_inner());
        keys.iter()
            .filter_map(|k| layout::pack_of_index_key(k).map(|p| (k, p)))
            .filter(|(_, p)| !m.known.contains_key(p))
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
    // The listing shows which packs are there: mark the others lost.
    for i in 0..m.packs.len() {
        let pack = m.packs[i];
        let lost = !present.contains(layout::pack_key(&pack).as_str());
        let retired = lost && !present.contains(layout::pack_index_key(&pack).as_str());
        if retired {
            // Deleted, index and all (a garbage collection): not news.
            if m.set_lost(&pack, true) {
                let _ = std::fs::remove_file(local_copy(local, &pack));
                tracing::debug!(pack = %layout::pack_key(&pack), "a pack was deleted from the store");
            }
        } else if m.set_lost(&pack, lost) && lost {
            tracing::error!(pack = %layout::pack_key(&pack), store = store.uri(), "a pack object is missing though its index is there: it is lost (`cairn verify` lists what it held)");
        }
    }
    Ok(loaded.len())
}

pub(crate) fn local_copy(local: &Path, pack: &PackId) -> PathBuf {
    local.join(format!("{pack}.idx"))
}

pub(crate) async fn load_index(
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
        // Unique: processes sharing the cache may fetch the same index.
        let tmp = local.join(format!(".tmp-{pack}-{:08x}", fastrand::u32(..)));
        if tokio::fs::write(&tmp, &bytes).await.is_err()
            || tokio::fs::rename(&tmp, &path).await.is_err()
        {
            let _ = tokio::fs::remove_file(&tmp).await;
        }
    }
    Ok(index)
}
