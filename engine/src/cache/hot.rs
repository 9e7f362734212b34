//! One reader's recently used chunks, kept mapped beside the shared index.

use std::collections::HashMap;
use std::sync::Arc;

use super::entry::CachedChunk;
use crate::id::ChunkId;

/// One reader's (one queue's) recently used chunks, mapped. Hits here skip
/// the cache's shared lock. An entry is let go after [`HotChunks::REFRESH`]
/// reads, so the shared LRU still hears of chunks in use; a chunk evicted
/// meanwhile stays readable through its mapping (eviction unlinks, it does
/// not truncate) until then, so the cache may exceed its bound by at most
/// `CAPACITY` chunks per reader.
pub struct HotChunks {
    entries: HashMap<ChunkId, (Arc<CachedChunk>, u64)>,
    reads: u64,
}

impl Default for HotChunks {
    fn default() -> HotChunks {
        HotChunks {
            entries: HashMap::with_capacity(Self::CAPACITY),
            reads: 0,
        }
    }
}

impl HotChunks {
    pub const CAPACITY: usize = 64;
    pub const REFRESH: u64 = 4096;

    pub(super) fn get(&mut self, id: &ChunkId) -> Option<Arc<CachedChunk>> {
        self.reads += 1;
        let (chunk, since) = self.entries.get(id)?;
        if self.reads - since > Self::REFRESH {
            self.entries.remove(id);
            return None;
        }
        Some(chunk.clone())
    }

    pub(super) fn put(&mut self, id: ChunkId, chunk: Arc<CachedChunk>) {
        if self.entries.len() >= Self::CAPACITY {
            // Drop the oldest entry.
            if let Some(old) = self
                .entries
                .iter()
                .min_by_key(|(_, (_, since))| *since)
                .map(|(id, _)| *id)
            {
                self.entries.remove(&old);
            }
        }
        self.entries.insert(id, (chunk, self.reads));
    }

    pub(super) fn forget(&mut self, id: &ChunkId) {
        self.entries.remove(id);
    }

    /// Whether `id` is held here (without counting a read).
    pub fn holds(&self, id: &ChunkId) -> bool {
        self.entries.contains_key(id)
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}
